// AdamW update and gradient norm (see adamw.h).
#include "cpu/adamw.h"

#include <algorithm>
#include <cmath>

#include "cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QK_X86 1
#else
#define QK_X86 0
#endif

namespace qk {

double sumSquares(const float* g, int64_t n) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += 4096) {
    const int64_t e = std::min<int64_t>(n, b + 4096);
    double s = 0.0;
    for (int64_t i = b; i < e; ++i) s += static_cast<double>(g[i]) * g[i];
    total += s;
  }
  return total;
}

namespace {

inline void updateScalar(float* p, float* g, float* m, float* v, int64_t b, int64_t e, const AdamWScalars& s) {
  for (int64_t i = b; i < e; ++i) {
    const float gi = g[i] * s.clip;
    float pi = p[i] * s.decay;
    const float mi = m[i] + s.oneMinusB1 * (gi - m[i]);
    const float vi = v[i] * s.b2 + s.oneMinusB2 * (gi * gi);
    const float denom = std::sqrt(vi) / s.bc2Sqrt + s.eps;
    pi = pi - s.stepSize * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    g[i] = 0.f;
  }
}

#if QK_X86
__attribute__((target("avx2"))) void updateAvx2(float* p, float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const __m256 clip = _mm256_set1_ps(s.clip), decay = _mm256_set1_ps(s.decay), omb1 = _mm256_set1_ps(s.oneMinusB1),
               b2 = _mm256_set1_ps(s.b2), omb2 = _mm256_set1_ps(s.oneMinusB2), step = _mm256_set1_ps(s.stepSize),
               bc2 = _mm256_set1_ps(s.bc2Sqrt), eps = _mm256_set1_ps(s.eps), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), clip);
    __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
    const __m256 m0 = _mm256_loadu_ps(m + i);
    const __m256 mi = _mm256_add_ps(m0, _mm256_mul_ps(omb1, _mm256_sub_ps(gi, m0)));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), b2), _mm256_mul_ps(omb2, _mm256_mul_ps(gi, gi)));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
    pi = _mm256_sub_ps(pi, _mm256_mul_ps(step, _mm256_div_ps(mi, denom)));
    _mm256_storeu_ps(p + i, pi);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(g + i, zero);
  }
  updateScalar(p, g, m, v, i, n, s);
}
#endif

}  // namespace

void adamwUpdate(float* p, float* g, float* m, float* v, int64_t n, const AdamWParams& o, float clip) {
  const AdamWScalars s = adamwScalars(o, clip);
#if QK_X86
  if (simdLevel() >= SimdLevel::Avx2) return updateAvx2(p, g, m, v, n, s);
#endif
  updateScalar(p, g, m, v, 0, n, s);
}

}  // namespace qk
