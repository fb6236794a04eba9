#include "cpu/attention.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/ops.h"
#include "cpu/thread_pool.h"

namespace qk {

void attentionHead(const AttentionShape& s, const float* q, const float* k, const float* v, int32_t pos,
                   float* scores, float* out) {
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
