#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/ops.h"

namespace qk {

namespace {
inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

void rngSeed(uint64_t seed, uint64_t state[4]) {
  uint64_t z = seed;
  for (int i = 0; i < 4; ++i) {  // splitmix64
    z += 0x9e3779b97f4a7c15ull;
    uint64_t x = z;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    state[i] = x ^ (x >> 31);
  }
}

uint64_t rngNext(uint64_t s[4]) {  // xoshiro256**
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double rngUniform(uint64_t s[4]) { return static_cast<double>(rngNext(s) >> 11) * 0x1.0p-53; }

int32_t sampleToken(const float* logits, int64_t vocab, const SamplingParams& p, const int32_t* recent,
                    int64_t nRecent, uint64_t state[4]) {
  // Scratch reused across calls on the same thread (no allocation in steady state).
  thread_local std::vector<float> work;
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<float> prob;

  // 1. repetition penalty, computed from the original logit so a repeated id counts once
  const float* L = logits;
  if (p.repetitionPenalty != 1.f && recent && nRecent > 0) {
    work.assign(logits, logits + vocab);
    for (int64_t i = 0; i < nRecent; ++i) {
      const int32_t id = recent[i];
      if (id < 0 || id >= vocab) continue;
      const float l = logits[id];
      work[id] = l > 0.f ? l / p.repetitionPenalty : l * p.repetitionPenalty;
    }
    L = work.data();
  }

  // 2. greedy: argmax, ties to the lowest id, no RNG draw
  int32_t best = 0;
  for (int32_t i = 1; i < vocab; ++i)
    if (L[i] > L[best]) best = i;
  if (p.temperature <= 0.f) return best;

  // 3. temperature: prob_i = exp(l_i/T - l_best/T) (unnormalised, <= 1; SIMD exp)
  const double u = rngUniform(state);  // exactly one draw per sampled token
  const float invT = 1.f / p.temperature;
  prob.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) prob[i] = L[i] * invT;
  expShiftSum(prob.data(), L[best] * invT, vocab);
  // The total in float64 over the fp32 probabilities, as the walks below add them: expShiftSum's fp32
  // total is off by ~4e-6 relative at V = 32k, which moved ~2% of the draws across a token boundary
  // (and away from the CUDA sampler's exact fixed-point total, cuda/sampling.cu).
  double fullMass = 0.0;
  for (int32_t i = 0; i < vocab; ++i) fullMass += prob[i];
  auto weight = [&](int32_t i) { return static_cast<double>(prob[i]); };
  const bool cutK = p.topK > 0 && p.topK < vocab, cutP = p.topP < 1.f;

  if (!cutK && !cutP) {  // full distribution: walk in id order, no sort
    const double target = u * fullMass;
    double cum = 0.0;
    for (int32_t i = 0; i < vocab; ++i) {
      cum += weight(i);
      if (cum > target) return i;
    }
    return best;
  }

  // Candidates ranked lazily: better(a, b) = higher logit, then lower id. The first `sorted`
  // entries of idx are the best ones in rank order.
  auto better = [&](int32_t a, int32_t b) { return L[a] > L[b] || (L[a] == L[b] && a < b); };
  idx.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) idx[i] = i;
  const int64_t n = cutK ? p.topK : vocab;  // 4. top-k: candidates are exactly the n best
  int64_t sorted = 0;
  auto ensureSorted = [&](int64_t k) {
    k = std::min<int64_t>(k, n);
    if (k <= sorted) return;
    if (k < vocab) std::nth_element(idx.begin() + sorted, idx.begin() + k, idx.end(), better);
    std::sort(idx.begin() + sorted, idx.begin() + k, better);
    sorted = k;
  };
  if (cutK) ensureSorted(n);

  // 5. softmax mass of the candidates
  double total = 0.0;
  if (cutK) {
    for (int64_t i = 0; i < n; ++i) total += weight(idx[i]);
  } else {
    total = fullMass;
  }

  // 6. top-p: the smallest rank-order prefix whose mass reaches topP · total (at least one token)
  int64_t keep = n;
  double kept = total;
  if (cutP) {
    const double target = static_cast<double>(p.topP) * total;
    double cum = 0.0;
    int64_t i = 0, chunk = 64;
    keep = -1;
    while (keep < 0) {
      ensureSorted(i + chunk);
      for (; i < sorted; ++i) {
        cum += weight(idx[i]);
        if (cum >= target) {
          keep = i + 1;
          break;
        }
      }
      if (keep < 0 && sorted >= n) keep = n;  // rounding: everything kept
      chunk *= 4;
    }
    kept = keep == n ? total : cum;
  }

  // 7. one draw walks the kept tokens in rank order
  ensureSorted(keep);
  const double target = u * kept;
  double cum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += weight(idx[i]);
    if (cum > target) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace qk
