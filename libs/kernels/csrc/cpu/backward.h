// Training kernels: the backward pass of every op of the decoder forward (ops.h, attention.h,
// matmul.h), plus the few training-only forwards that must save something for their backward
// (attention with its log-sum-exp, the LoRA linear with its low-rank activation, the fused
// lm_head + softmax + cross-entropy). llm.c style: each op's forward and backward side by side,
// fp32 everywhere, shapes in the comments. N = tokens (B rows × T positions), H = hidden.
//
// Threading (thread_pool.h is not re-entrant): every multi-row entry point here is one (or a
// sequence of) qk::parallelFor region(s) or calls the matmul kernels, so call them from the top
// level only, never inside a parallelFor body.
//
// Determinism: every reduction has a fixed order that does not depend on thread timing or on the
// thread count (rows are owned by one task; attention dK/dV are owned per (row, kv head); the
// matmul kernels reduce each output element in a fixed K order), so the same inputs give the same
// bits on every run.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/attention.h"
#include "cpu/matmul.h"
#include "cpu/ops.h"

namespace qk {

// ---- RMSNorm (forward: ops.h rmsNormForward) --------------------------------------------------
// y = x·r·w, r = (mean(x²) + eps)^-½.  Weights frozen (no dw).
// dx (=|+=) r·(dy⊙w) − x·r³·mean(dy⊙w⊙x)          x, dy, dx: [rows, dim]; dx must not alias x / dy
void rmsNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim, float eps,
                     bool accumulate);

// ---- LayerNorm (forward: ops.h layerNormForward; biased variance) -----------------------------
// x̂ = (x − μ)·r, y = x̂⊙w + b.  g = dy⊙w (w may be null = 1)
// dx (=|+=) r·(g − mean(g) − x̂·mean(g⊙x̂))           dx must not alias x / dy
void layerNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim,
                       float eps, bool accumulate);

// ---- RoPE (forward: ops.h ropeForward, rotate_half) --------------------------------------------
// The forward is a rotation by +θ of each pair (x[j], x[j+hd/2]); its Jacobian is orthogonal, so
// the backward is the rotation by −θ, in place on dx [T, nHeads·hd]:
//   d1 = dy1·c + dy2·s,  d2 = dy2·c − dy1·s
void ropeBackward(float* dx, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                  const float* sinT);

// ---- activations (forward: ops.h activationForward / gatedActivationForward) -----------------
// y = act(x):  dx = dy·act'(x).  dx may alias dy.
//   silu' = σ(x)·(1 + x·(1 − σ(x))),  relu' = [x > 0],  gelu' = Φ(x) + x·φ(x)  (exact erf form)
void activationBackward(Activation act, const float* x, const float* dy, float* dx, int64_t n);
// y = act(g)·u:  dg = dy·u·act'(g),  du = dy·act(g).  dg may alias dy (du must not).
void gatedActivationBackward(Activation act, const float* gate, const float* up, const float* dy, float* dgate,
                             float* dup, int64_t n);

// ---- attention for training: B rows × T positions, no KV cache -------------------------------
// Token i = b·T + t attends to keys j = b·T + start[i] .. i (start[i] <= t is the row-local first
// position of its segment: causal, and never across a packed example). GQA: head h reads kv head
// h / (nHeads / nKvHeads). q, out, dq, dout: [N, nHeads·hd]; k, v, dk, dv: [N, nKvHeads·hd].
//   forward:  s_j = scale·q_i·k_j,  p = softmax(s),  out_i = Σ_j p_j v_j,  lse_i = log Σ_j e^{s_j}   lse: [N, nHeads]
//   backward (p recomputed from lse, flash-attention style):
//     D_i = dout_i·out_i,  dp_j = dout_i·v_j,  ds_j = p_j·(dp_j − D_i)
//     dq_i = scale·Σ_j ds_j k_j,   dk_j += scale·ds_j q_i,   dv_j += p_j dout_i
// The backward runs one task per (row, kv head): it owns those dk/dv rows, so the sums over
// queries (and over the heads of the group) happen in a fixed order. Queries go in blocks of 16:
// p and ds of the block are kept transposed, then each key row gets dk_j, dv_j from the block's
// queries in one pass (no per-pair read-modify-write). dq, dk, dv are overwritten.
void attentionTrainForward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                           const float* k, const float* v, float* out, float* lse);
void attentionTrainBackward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                            const float* k, const float* v, const float* out, const float* lse, const float* dout,
                            float* dq, float* dk, float* dv);

// ---- softmax + cross-entropy over rows of logits ----------------------------------------------
// Per row r (labels[r] in [0, V)):  loss[r] = logsumexp(z_r) − z_r[label_r]  (float64)
// grad: z_r ← (softmax(z_r) − onehot(label_r))·gradScale, in place (the logits become dlogits).
void softmaxCrossEntropy(float* logits, int64_t rows, int64_t V, const int32_t* labels, double* loss, float gradScale,
                         bool grad);

// ---- fused lm_head + softmax + cross-entropy, chunked over rows ------------------------------
// h [M, H] (final-normed hidden rows that have a label), lm_head W [V, H] frozen (any dtype).
// Per chunk of `chunkRows` rows: logits [c, V] = h_c·Wᵀ (linearForward), loss and dlogits in place,
// dh_c = dlogits·W (linearBackwardInput, NF4 dequantized tile by tile). Never more than
// [chunkRows, V] logits exist (`logits` is the caller's scratch, grown as needed).
// Returns Σ_r loss[r] (float64, summed in row order); dh [M, H] is written when non-null with
// d(Σ_r loss[r]·gradScale)/dh.
double lmHeadCrossEntropy(const float* h, int64_t M, const WeightView& w, const int32_t* labels, int64_t chunkRows,
                          float gradScale, float* dh, std::vector<float>& logits);
// Rows per chunk so that one chunk of logits stays within 32M floats (128 MiB): ceil-balanced.
int64_t lmHeadChunkRows(int64_t M, int64_t V);

// ---- dropout on the LoRA branch input (inverted: kept elements scaled by 1/(1−p)) ------------
// Counter-based: element e = r·cols + c of a [rows, cols] matrix is kept iff bits(key, e) >= p·2³²,
// bits(key, e) = fmix32(fmix32(e_lo ^ key_lo) + (e_hi ^ key_hi)) (murmur3's 32-bit finalizer; 8 lanes
// at a time in AVX2, the scalar path gives the same bits). The key is dropoutKey(seed, stream) (a
// splitmix64 mix; stream = the module), so a recompute in backward regenerates the forward's mask.
uint64_t dropoutKey(uint64_t seed, uint64_t stream);
// y (=|+=) x ⊙ mask/(1−p). Forward (y = drop(x)) and backward (dx += drop'(dy)) are the same map.
// y may alias x when !accumulate.
void dropoutApply(const float* x, float* y, int64_t rows, int64_t cols, float p, uint64_t key, bool accumulate);

// ---- linear with a trainable LoRA branch (forward: matmul.h linearForward + the branch) ------
//   y = x·Wᵀ + b + s·u·Bᵀ,  u = drop(x)·Aᵀ            x [N, in], W [out, in] frozen, A [r, in], B [out, r]
// backward, given dy [N, out]:
//   dx  (=|+=) dy·W                                    (linearBackwardInput; skipped when !needDx)
//   du  = s·dy·B                 [N, r]
//   dB += s·dyᵀ·u                [out, r]             ⎫ reductions over the N tokens: a streaming kernel,
//   dA += duᵀ·drop(x)            [r, in]              ⎭ one task per 64 columns, tokens summed in order
//   dx += drop'(du·A)            [N, in]
struct LoraBranch {
  const float* a = nullptr;  // [r, in]
  const float* b = nullptr;  // [out, r]
  float* ga = nullptr;       // [r, in] gradient accumulators (backward)
  float* gb = nullptr;       // [out, r]
  int rank = 0;
  float scaling = 0.f;
  float dropout = 0.f;       // 0: no dropout (evaluation, or p = 0)
  uint64_t key = 0;          // dropoutKey(seed, module)
};
// u: [N, r] output (kept for the backward), or null to use internal scratch. lora may be null.
void loraLinearForward(const float* x, int64_t N, const WeightView& w, const float* bias, const LoraBranch* lora,
                       float* y, bool accumulate, float* u);
// u: the forward's u (same x, same mask). lora may be null (frozen linear: dx only).
void loraLinearBackward(const float* x, const float* u, const float* dy, int64_t N, const WeightView& w,
                        const LoraBranch* lora, float* dx, bool accumulate, bool needDx);

}  // namespace qk
