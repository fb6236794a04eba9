#include "cpu/attention.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/cpu_features.h"
#include "cpu/ops.h"
#include "cpu/thread_pool.h"

namespace qk {

#if defined(__x86_64__)
namespace {
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// The same math as the generic head below with the per-position work inlined (no call or
// dispatch per cache row): head dims that are a multiple of 8.
__attribute__((target("avx2,fma"))) void attentionHeadAvx2(const AttentionShape& s, const float* q, const float* k,
                                                           const float* v, int32_t pos, float* scores, float* out) {
  const int hd = s.headDim;
  const int64_t stride = static_cast<int64_t>(s.nKvHeads) * hd, n = static_cast<int64_t>(pos) + 1;
  // scores[j] = scale · q·k_j, four cache rows at a time
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + j * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int c = 0; c < hd; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + c), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + stride + c), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * stride + c), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * stride + c), a3);
    }
    scores[j] = s.scale * hsum8(a0);
    scores[j + 1] = s.scale * hsum8(a1);
    scores[j + 2] = s.scale * hsum8(a2);
    scores[j + 3] = s.scale * hsum8(a3);
  }
  for (; j < n; ++j) {
    __m256 a0 = _mm256_setzero_ps();
    for (int c = 0; c < hd; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + j * stride + c), a0);
    scores[j] = s.scale * hsum8(a0);
  }
  // softmax numerator; out = Σ e_j v_j / Σ e_j
  const float m = maxOf(scores, n);
  const float sum = expShiftSum(scores, m, n);
  for (int c = 0; c < hd; c += 8) _mm256_storeu_ps(out + c, _mm256_setzero_ps());
  for (j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(scores[j]);
    const float* vj = v + j * stride;
    for (int c = 0; c < hd; c += 8)
      _mm256_storeu_ps(out + c, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + c), _mm256_loadu_ps(out + c)));
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int c = 0; c < hd; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(inv, _mm256_loadu_ps(out + c)));
}
}  // namespace
#endif

void attentionHead(const AttentionShape& s, const float* q, const float* k, const float* v, int32_t pos,
                   float* scores, float* out) {
#if defined(__x86_64__)
  if (s.headDim % 8 == 0 && simdLevel() >= SimdLevel::Avx2) return attentionHeadAvx2(s, q, k, v, pos, scores, out);
#endif
  const int hd = s.headDim;
  const int64_t stride = static_cast<int64_t>(s.nKvHeads) * hd;  // one cache row = all kv heads
  const int64_t n = static_cast<int64_t>(pos) + 1;
  // scores[j] = scale · q·k_j
  for (int64_t j = 0; j < n; ++j) scores[j] = s.scale * dot(q, k + j * stride, hd);
  // softmax numerator in place; normalise at the end (out = Σ e_j v_j / Σ e_j)
  float m = maxOf(scores, n);
  float sum = expShiftSum(scores, m, n);
  std::memset(out, 0, sizeof(float) * hd);
  for (int64_t j = 0; j < n; ++j) axpy(scores[j], v + j * stride, out, hd);
  scale(out, 1.f / sum, hd);
}

void attentionForward(const AttentionShape& s, const float* q, const float* const* kBase,
                      const float* const* vBase, const int32_t* pos, int64_t T, float* out) {
  const int hd = s.headDim, group = s.nHeads / s.nKvHeads;
  const int64_t width = static_cast<int64_t>(s.nHeads) * hd;
  const int64_t items = T * s.nHeads;
  int64_t maxLen = 0, work = 0;
  for (int64_t t = 0; t < T; ++t) {
    maxLen = std::max<int64_t>(maxLen, pos[t] + 1);
    work += static_cast<int64_t>(pos[t] + 1);
  }
  work *= static_cast<int64_t>(s.nHeads) * hd;

  auto runItem = [&](int64_t item, std::vector<float>& scores) {
    const int64_t t = item / s.nHeads;
    const int h = static_cast<int>(item % s.nHeads);
    const int kvh = h / group;
    attentionHead(s, q + t * width + static_cast<int64_t>(h) * hd, kBase[t] + static_cast<int64_t>(kvh) * hd,
                  vBase[t] + static_cast<int64_t>(kvh) * hd, pos[t], scores.data(),
                  out + t * width + static_cast<int64_t>(h) * hd);
  };

  thread_local std::vector<float> tlScores;
  // Tiny problems (short decode) run on the caller's thread: a region costs more than the work.
  const int parts = static_cast<int>(std::min<int64_t>(numThreads(), items));
  if (work < 16384 || parts <= 1) {
    if (static_cast<int64_t>(tlScores.size()) < maxLen) tlScores.resize(maxLen);
    for (int64_t i = 0; i < items; ++i) runItem(i, tlScores);
    return;
  }
  parallelFor(parts, 1, [&](int64_t b, int64_t e, int) {
    if (static_cast<int64_t>(tlScores.size()) < maxLen) tlScores.resize(maxLen);
    for (int64_t part = b; part < e; ++part)
      for (int64_t i = part; i < items; i += parts) runItem(i, tlScores);
  });
}

}  // namespace qk
