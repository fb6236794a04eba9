// AdamW (torch.optim.AdamW semantics: decoupled weight decay, bias correction) and the global
// gradient norm used for clipping (torch.nn.utils.clip_grad_norm_). fp32 parameters and moments.
#pragma once
#include <cstdint>

namespace qk {

struct AdamWParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.0;
  int64_t step = 1;  // 1-based (bias correction)
};

// Σ g[i]² in float64, in a fixed order (blocks of 4096 elements, block sums added in order):
// the same bits for the same input whatever the thread count. Single-threaded.
double sumSquares(const float* g, int64_t n);

// One AdamW update of n parameters, then g = 0. Per element, in fp32, in torch's operation order
// (_single_tensor_adamw):
//   g  ← g·clip
//   p  ← p·(1 − lr·wd)
//   m  ← m + (1 − β1)·(g − m)                      (torch lerp_)
//   v  ← v·β2 + (1 − β2)·g·g                       (mul_ + addcmul_)
//   p  ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
// The scalars are computed in float64 and rounded once. The AVX2 variant does the same IEEE
// operations in the same order (no FMA contraction), so it matches the scalar loop bit for bit.
// Single-threaded (cheap: LoRA parameters are few).
void adamwUpdate(float* p, float* g, float* m, float* v, int64_t n, const AdamWParams& o, float clip);

}  // namespace qk
