// AdamW (torch.optim.AdamW semantics: decoupled weight decay, bias correction) and the global
// gradient norm used for clipping (torch.nn.utils.clip_grad_norm_). fp32 parameters and moments.
#pragma once
#include <cmath>
#include <cstdint>

namespace qk {

struct AdamWParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.0;
  int64_t step = 1;  // 1-based (bias correction)
};

// The per-step scalars of the update below, computed in float64 and rounded once to fp32; shared by
// the CPU and CUDA updates so both round them identically.
struct AdamWScalars {
  float clip, decay, oneMinusB1, b2, oneMinusB2, stepSize, bc2Sqrt, eps;
};
inline AdamWScalars adamwScalars(const AdamWParams& o, float clip) {
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(o.step));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(o.step));
  AdamWScalars s;
  s.clip = clip;
  s.decay = static_cast<float>(1.0 - o.lr * o.weightDecay);
  s.oneMinusB1 = static_cast<float>(1.0 - o.beta1);
  s.b2 = static_cast<float>(o.beta2);
  s.oneMinusB2 = static_cast<float>(1.0 - o.beta2);
  s.stepSize = static_cast<float>(o.lr / bc1);
  s.bc2Sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(o.eps);
  return s;
}

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
