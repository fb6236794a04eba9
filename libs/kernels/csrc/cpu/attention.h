// Causal multi-head attention over a KV cache (forward), with grouped-query attention.
#pragma once
#include <cstdint>

namespace qk {

struct AttentionShape {
  int nHeads = 0;    // query heads
  int nKvHeads = 0;  // key/value heads; query head h reads kv head h / (nHeads / nKvHeads)
  int headDim = 0;
  float scale = 1.f;  // multiplies q·k (1/sqrt(hd) for Llama; 1 for OPT whose q is pre-scaled)
};

// For each token t (T of them, from any mix of sequences) and head h:
//   s[j] = scale · q[t,h,:]·K[t][j, kvh, :]   for j = 0..pos[t]   (causal: the cache holds the
//   p = softmax(s)                                                  token's own k/v at pos[t])
//   out[t,h,:] = Σ_j p[j] · V[t][j, kvh, :]
// q, out: [T, nHeads·hd]. kBase[t] / vBase[t]: start of token t's sequence cache for this layer,
// rows of nKvHeads·hd floats, position-major. Parallel over (token, head) pairs, interleaved so
// the causal triangle's cost is spread evenly over threads. Must not be called inside a
// parallel region.
void attentionForward(const AttentionShape& s, const float* q, const float* const* kBase,
                      const float* const* vBase, const int32_t* pos, int64_t T, float* out);

// Single (token, head) reference used by attentionForward; `scores` needs pos+1 floats.
void attentionHead(const AttentionShape& s, const float* q, const float* k, const float* v, int32_t pos,
                   float* scores, float* out);

}  // namespace qk
