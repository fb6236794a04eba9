// Next-token sampling with a caller-owned RNG (xoshiro256**, seeded by splitmix64), so the same
// seed and the same logits give the same tokens on every run and thread.
#pragma once
#include <cstdint>

namespace qk {

struct SamplingParams {
  float temperature = 0.f;        // 0 → argmax (ties → lowest id); otherwise logits / temperature
  int topK = 0;                   // <= 0: off; keeps the k best (ordered by logit desc, then id asc)
  float topP = 1.f;               // >= 1: off; nucleus after top-k: smallest prefix with mass >= topP
  float repetitionPenalty = 1.f;  // HF: over `recent` ids, logit > 0 ? logit / p : logit · p
};

void rngSeed(uint64_t seed, uint64_t state[4]);  // splitmix64 expansion of the seed
uint64_t rngNext(uint64_t state[4]);             // xoshiro256**
double rngUniform(uint64_t state[4]);            // [0, 1), 53 bits

// Order of operations (Hugging Face generate): repetition penalty → greedy, or temperature →
// top-k → softmax → top-p (renormalised) → one draw u ∈ [0,1) walks the kept tokens in order of
// decreasing probability (in id order when nothing is cut). Exactly one RNG draw per call when
// temperature > 0, none when greedy.
// `logits` is not modified.
int32_t sampleToken(const float* logits, int64_t vocab, const SamplingParams& p, const int32_t* recent,
                    int64_t nRecent, uint64_t state[4]);

// One batch row's sampling: what sampleToken takes besides the logits (the engines' forwardSample).
struct RowSampling {
  SamplingParams p;
  const int32_t* recent = nullptr;  // repetition-penalty context (host ids), nRecent of them
  int64_t nRecent = 0;
  uint64_t* rng = nullptr;          // the sequence's RNG state[4], advanced in place
};

}  // namespace qk
