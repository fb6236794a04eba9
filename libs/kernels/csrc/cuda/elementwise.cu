// Per-row and elementwise kernels: RMSNorm / LayerNorm forward and backward, RoPE, activations,
// dropout, the LoRA branch (composed from gemmF32 + dropout), AdamW and the gradient sum of squares.
// CPU counterparts: cpu/ops.cpp, cpu/backward.cpp, cpu/adamw.cpp (same formulas; comments there).
#include <cmath>

#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

constexpr int kRowThreads = 256;

// ---- norms: one block per row, fp32 reductions in a fixed order ------------------------------
// The forward kernels may run in place (y == x: the engine's OPT post-LN, model_cuda.cu), so x and y
// are not __restrict__; each element is read and then written by the same thread after the last
// reduction's barrier, so in place is race-free.
__global__ void __launch_bounds__(kRowThreads)
    rmsNormKernel(const float* x, const float* __restrict__ w, float* y, int64_t dim, float eps) {
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  const float var = blockSum(ss, red) / static_cast<float>(dim);
  const float r = 1.f / sqrtf(var + eps);
  float* yr = y + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

__global__ void __launch_bounds__(kRowThreads)
    layerNormKernel(const float* x, const float* __restrict__ w, const float* __restrict__ b, float* y, int64_t dim,
                    float eps) {
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * dim;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
  const float mean = blockSum(s, red) / static_cast<float>(dim);
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
  const float rstd = 1.f / sqrtf(blockSum(v, red) / static_cast<float>(dim) + eps);
  float* yr = y + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float o = (xr[i] - mean) * rstd;
    if (w) o *= w[i];
    if (b) o += b[i];
    yr[i] = o;
  }
}

// dx (=|+=) r·(dy⊙w) − x·r³·mean(dy⊙w⊙x)
__global__ void __launch_bounds__(kRowThreads)
    rmsNormBackwardKernel(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ w,
                          float* __restrict__ dx, int64_t dim, float eps, bool accumulate) {
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * dim;
  const float* gr = dy + blockIdx.x * dim;
  float ss = 0.f, c = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    ss += xr[i] * xr[i];
    c += gr[i] * w[i] * xr[i];
  }
  const float var = blockSum(ss, red) / static_cast<float>(dim);
  c = blockSum(c, red);
  const float r = 1.f / sqrtf(var + eps);
  const float k = c * r * r * r / static_cast<float>(dim);
  float* o = dx + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = r * gr[i] * w[i] - xr[i] * k;
    o[i] = accumulate ? o[i] + d : d;
  }
}

// dx (=|+=) r·(g − mean(g) − x̂·mean(g⊙x̂)), g = dy⊙w
__global__ void __launch_bounds__(kRowThreads)
    layerNormBackwardKernel(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ w,
                            float* __restrict__ dx, int64_t dim, float eps, bool accumulate) {
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * dim;
  const float* gr = dy + blockIdx.x * dim;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
  const float mean = blockSum(s, red) / static_cast<float>(dim);
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
  const float r = 1.f / sqrtf(blockSum(v, red) / static_cast<float>(dim) + eps);
  float sg = 0.f, sgx = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float g = w ? gr[i] * w[i] : gr[i];
    sg += g;
    sgx += g * (xr[i] - mean) * r;
  }
  const float mg = blockSum(sg, red) / static_cast<float>(dim);
  const float mgx = blockSum(sgx, red) / static_cast<float>(dim);
  float* o = dx + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float g = w ? gr[i] * w[i] : gr[i];
    const float d = r * (g - mg - (xr[i] - mean) * r * mgx);
    o[i] = accumulate ? o[i] + d : d;
  }
}

// ---- RoPE: one thread per (token, head, pair); ropePair (common.cuh) is bit-identical to the CPU.
template <bool kBackward>
__global__ void ropeKernel(float* __restrict__ x, int64_t T, int nHeads, int headDim, const int32_t* __restrict__ pos,
                           const float* __restrict__ cosT, const float* __restrict__ sinT) {
  const int half = headDim / 2;
  const int64_t total = T * nHeads * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(e % half);
    const int64_t th = e / half, t = th / nHeads;
    const int h = static_cast<int>(th % nHeads);
    const float c = cosT[static_cast<int64_t>(pos[t]) * half + j], s = sinT[static_cast<int64_t>(pos[t]) * half + j];
    ropePair<kBackward>(x + t * static_cast<int64_t>(nHeads) * headDim + static_cast<int64_t>(h) * headDim, j, half, c, s);
  }
}

// ---- activations (act, act') as csrc/cpu/backward.cpp actAndGrad ------------------------------
__device__ __forceinline__ void actAndGrad(int a, float x, float* f, float* d) {
  if (a == static_cast<int>(Activation::Silu)) {
    const float sg = 1.f / (1.f + expf(-x));
    *f = x * sg;
    *d = sg * (1.f + x * (1.f - sg));
  } else if (a == static_cast<int>(Activation::Relu)) {
    *f = x > 0.f ? x : 0.f;
    *d = x > 0.f ? 1.f : 0.f;
  } else {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    *f = x * cdf;
    *d = cdf + x * pdf;
  }
}

#define QK_GRID_STRIDE(i, n)                                                              \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// no __restrict__: the engine runs it in place (y == x, model_cuda.cu's OPT fc1)
__global__ void activationKernel(int act, const float* x, float* y, int64_t n) {
  QK_GRID_STRIDE(i, n) y[i] = actForward(act, x[i]);
}
__global__ void gatedActivationKernel(int act, const float* gate, const float* up, float* y, int64_t n) {
  QK_GRID_STRIDE(i, n) y[i] = actForward(act, gate[i]) * up[i];  // y may alias gate or up: read first
}
__global__ void activationBackwardKernel(int act, const float* x, const float* dy, float* dx, int64_t n) {
  QK_GRID_STRIDE(i, n) {
    float f, d;
    actAndGrad(act, x[i], &f, &d);
    dx[i] = dy[i] * d;
  }
}
__global__ void gatedActivationBackwardKernel(int act, const float* gate, const float* up, const float* dy,
                                              float* dgate, float* dup, int64_t n) {
  QK_GRID_STRIDE(i, n) {
    float f, d;
    actAndGrad(act, gate[i], &f, &d);
    const float gy = dy[i], u = up[i];
    dup[i] = gy * f;
    dgate[i] = gy * u * d;
  }
}

// ---- dropout: the counter-based mask of cpu/backward.cpp (murmur3 fmix32 of the element index) --
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}
__global__ void dropoutKernel(const float* x, float* y, int64_t n, uint32_t thr, float inv, uint64_t key,
                              bool accumulate) {
  QK_GRID_STRIDE(i, n) {
    const uint64_t e = static_cast<uint64_t>(i);
    const uint32_t bits = fmix32(fmix32(static_cast<uint32_t>(e) ^ static_cast<uint32_t>(key)) +
                                 (static_cast<uint32_t>(e >> 32) ^ static_cast<uint32_t>(key >> 32)));
    // explicit _rn: nvcc would contract y + x·mask into one FMA, the CPU rounds the product first
    const float v = __fmul_rn(x[i], bits >= thr ? inv : 0.f);
    y[i] = accumulate ? __fadd_rn(y[i], v) : v;
  }
}

// ---- AdamW: torch's operation order, every operation rounded on its own (no FMA), IEEE sqrt/div --
__global__ void adamwKernel(float* __restrict__ p, float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                            int64_t n, AdamWScalars s) {
  QK_GRID_STRIDE(i, n) {
    const float gi = __fmul_rn(g[i], s.clip);
    float pi = __fmul_rn(p[i], s.decay);
    const float m0 = m[i];
    const float mi = __fadd_rn(m0, __fmul_rn(s.oneMinusB1, __fsub_rn(gi, m0)));
    const float vi = __fadd_rn(__fmul_rn(v[i], s.b2), __fmul_rn(s.oneMinusB2, __fmul_rn(gi, gi)));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2Sqrt), s.eps);
    pi = __fsub_rn(pi, __fmul_rn(s.stepSize, __fdiv_rn(mi, denom)));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    g[i] = 0.f;
  }
}

// Σ g² of each 4096-element block in float64 (one block of 256 threads per 4096 elements).
__global__ void __launch_bounds__(256) sumSquaresKernel(const float* __restrict__ g, int64_t n, double* out) {
  __shared__ double red[8];
  const int64_t b = static_cast<int64_t>(blockIdx.x) * 4096;
  double s = 0.0;
  for (int64_t i = b + threadIdx.x; i < b + 4096 && i < n; i += 256) s += static_cast<double>(g[i]) * g[i];
  s = warpSumD(s);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < 8; ++w) t += red[w];
    out[blockIdx.x] = t;
  }
}

unsigned elemGrid(int64_t n) {
  const int64_t g = (n + 255) / 256;
  return static_cast<unsigned>(g < 65536 ? (g > 0 ? g : 1) : 65536);
}
void checkRows(int64_t rows, int64_t dim) {
  checkArg(rows >= 0 && dim > 0, "rows / dim");
  checkArg(rows <= 0x7fffffffLL, "too many rows for one launch");
}

}  // namespace

void rmsNormForward(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps, Stream stream) {
  checkRows(rows, dim);
  if (!rows) return;
  rmsNormKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, cs(stream)>>>(x, w, y, dim, eps);
  QK_CUDA_LAUNCHED();
}
void layerNormForward(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim, float eps,
                      Stream stream) {
  checkRows(rows, dim);
  if (!rows) return;
  layerNormKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, cs(stream)>>>(x, w, b, y, dim, eps);
  QK_CUDA_LAUNCHED();
}
void rmsNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim, float eps,
                     bool accumulate, Stream stream) {
  checkRows(rows, dim);
  if (!rows) return;
  rmsNormBackwardKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, cs(stream)>>>(dy, x, w, dx, dim, eps,
                                                                                      accumulate);
  QK_CUDA_LAUNCHED();
}
void layerNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim,
                       float eps, bool accumulate, Stream stream) {
  checkRows(rows, dim);
  if (!rows) return;
  layerNormBackwardKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, cs(stream)>>>(dy, x, w, dx, dim, eps,
                                                                                        accumulate);
  QK_CUDA_LAUNCHED();
}

void ropeForward(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                 const float* sinT, Stream stream) {
  checkArg(headDim > 0 && headDim % 2 == 0 && nHeads > 0 && T >= 0, "rope shape");
  if (!T) return;
  ropeKernel<false><<<elemGrid(T * nHeads * (headDim / 2)), 256, 0, cs(stream)>>>(x, T, nHeads, headDim, pos, cosT,
                                                                                  sinT);
  QK_CUDA_LAUNCHED();
}
void ropeBackward(float* dx, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                  const float* sinT, Stream stream) {
  checkArg(headDim > 0 && headDim % 2 == 0 && nHeads > 0 && T >= 0, "rope shape");
  if (!T) return;
  ropeKernel<true><<<elemGrid(T * nHeads * (headDim / 2)), 256, 0, cs(stream)>>>(dx, T, nHeads, headDim, pos, cosT,
                                                                                 sinT);
  QK_CUDA_LAUNCHED();
}

void activationForward(Activation act, const float* x, float* y, int64_t n, Stream stream) {
  if (n <= 0) return;
  activationKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(static_cast<int>(act), x, y, n);
  QK_CUDA_LAUNCHED();
}
void gatedActivationForward(Activation act, const float* gate, const float* up, float* y, int64_t n, Stream stream) {
  if (n <= 0) return;
  gatedActivationKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(static_cast<int>(act), gate, up, y, n);
  QK_CUDA_LAUNCHED();
}
void activationBackward(Activation act, const float* x, const float* dy, float* dx, int64_t n, Stream stream) {
  if (n <= 0) return;
  activationBackwardKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(static_cast<int>(act), x, dy, dx, n);
  QK_CUDA_LAUNCHED();
}
void gatedActivationBackward(Activation act, const float* gate, const float* up, const float* dy, float* dgate,
                             float* dup, int64_t n, Stream stream) {
  if (n <= 0) return;
  gatedActivationBackwardKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(static_cast<int>(act), gate, up, dy, dgate, dup,
                                                                      n);
  QK_CUDA_LAUNCHED();
}

void dropoutApply(const float* x, float* y, int64_t rows, int64_t cols, float p, uint64_t key, bool accumulate,
                  Stream stream) {
  checkArg(p >= 0.f && p < 1.f, "dropout p must be in [0, 1)");
  const int64_t n = rows * cols;
  if (n <= 0) return;
  // the CPU's threshold and scale: keep iff bits >= floor(p·2³²), kept values × 1/(1−p) (fp32)
  const uint64_t thr64 = static_cast<uint64_t>(std::floor(static_cast<double>(p) * 4294967296.0));
  const uint32_t thr = static_cast<uint32_t>(thr64 < 0xFFFFFFFFull ? thr64 : 0xFFFFFFFFull);
  const float inv = 1.f / (1.f - p);
  dropoutKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(x, y, n, thr, inv, key, accumulate);
  QK_CUDA_LAUNCHED();
}

// The LoRA branch: the CPU's sequence of products (cpu/backward.cpp loraLinearForward/Backward) with
// gemmF32 on the device; the frozen linear runs on the bf16 path (linearForward / linearBackwardInput).
void loraLinearForward(const float* x, int64_t N, const WeightView& w, const float* bias, const LoraBranch* lora,
                       float* y, bool accumulate, float* u, Workspace& ws, Stream stream) {
  linearForward(x, N, w, bias, y, accumulate, stream);  // y (+)= x·Wᵀ + b
  if (!lora || N <= 0) return;
  const int64_t in = w.cols, out = w.rows, r = lora->rank;
  checkArg(r >= 1, "lora rank");
  const float* xin = x;
  if (lora->dropout > 0.f) {
    float* xd = ws.get<float>(0, static_cast<size_t>(N * in));
    dropoutApply(x, xd, N, in, lora->dropout, lora->key, false, stream);  // drop(x)
    xin = xd;
  }
  float* uu = u ? u : ws.get<float>(1, static_cast<size_t>(N * r));
  gemmF32(false, true, N, r, in, 1.f, xin, in, lora->a, in, 0.f, uu, r, stream);             // u = drop(x)·Aᵀ
  gemmF32(false, true, N, out, r, lora->scaling, uu, r, lora->b, r, 1.f, y, out, stream);    // y += s·u·Bᵀ
}

void loraLinearBackward(const float* x, const float* u, const float* dy, int64_t N, const WeightView& w,
                        const LoraBranch* lora, float* dx, bool accumulate, bool needDx, Workspace& ws,
                        Stream stream) {
  if (needDx) linearBackwardInput(dy, N, w, dx, accumulate, stream);  // dx (+)= dy·W
  if (!lora || N <= 0) return;
  const int64_t in = w.cols, out = w.rows, r = lora->rank;
  checkArg(r >= 1, "lora rank");
  const float s = lora->scaling;
  float* du = ws.get<float>(2, static_cast<size_t>(N * r));
  gemmF32(false, false, N, r, out, s, dy, out, lora->b, r, 0.f, du, r, stream);   // du = s·dy·B         [N, r]
  gemmF32(true, false, out, r, N, s, dy, out, u, r, 1.f, lora->gb, r, stream);    // dB += s·dyᵀ·u       [out, r]
  const float* xin = x;
  float* xd = nullptr;
  if (lora->dropout > 0.f) {
    xd = ws.get<float>(0, static_cast<size_t>(N * in));
    dropoutApply(x, xd, N, in, lora->dropout, lora->key, false, stream);  // the forward's drop(x)
    xin = xd;
  }
  gemmF32(true, false, r, in, N, 1.f, du, r, xin, in, 1.f, lora->ga, in, stream);  // dA += duᵀ·drop(x)   [r, in]
  if (!needDx) return;
  if (lora->dropout > 0.f) {
    gemmF32(false, false, N, in, r, 1.f, du, r, lora->a, in, 0.f, xd, in, stream);  // du·A
    dropoutApply(xd, dx, N, in, lora->dropout, lora->key, true, stream);             // dx += drop'(du·A)
  } else {
    gemmF32(false, false, N, in, r, 1.f, du, r, lora->a, in, 1.f, dx, in, stream);  // dx += du·A
  }
}

void adamwUpdate(float* p, float* g, float* m, float* v, int64_t n, const AdamWParams& o, float clip, Stream stream) {
  if (n <= 0) return;
  const AdamWScalars s = adamwScalars(o, clip);  // the same fp32 scalars as the CPU update
  adamwKernel<<<elemGrid(n), 256, 0, cs(stream)>>>(p, g, m, v, n, s);
  QK_CUDA_LAUNCHED();
}

void sumSquaresMany(const float* const* g, const int64_t* n, int count, double* out, Workspace& ws, Stream stream) {
  // every tensor's 4096-element block sums into one array (tensor t's at first[t]), one download
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  for (int t = 0; t < count; ++t) {
    checkArg(n[t] >= 0, "sumSquares size");
    first[t + 1] = first[t] + (n[t] + 4095) / 4096;
  }
  const int64_t blocks = first[count];
  for (int t = 0; t < count; ++t) out[t] = 0.0;
  if (blocks == 0) return;
  double* part = ws.get<double>(0, static_cast<size_t>(blocks));
  for (int t = 0; t < count; ++t) {
    const int64_t b = first[t + 1] - first[t];
    if (b == 0) continue;
    checkArg(b <= 0x7fffffffLL, "sumSquares size");
    sumSquaresKernel<<<static_cast<unsigned>(b), 256, 0, cs(stream)>>>(g[t], n[t], part + first[t]);
    QK_CUDA_LAUNCHED();
  }
  std::vector<double> host(static_cast<size_t>(blocks));
  QK_CUDA_CHECK(cudaMemcpyAsync(host.data(), part, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, cs(stream)));
  QK_CUDA_CHECK(cudaStreamSynchronize(cs(stream)));
  for (int t = 0; t < count; ++t)
    for (int64_t b = first[t]; b < first[t + 1]; ++b) out[t] += host[b];  // block sums in order, as the CPU
}

double sumSquares(const float* g, int64_t n, Workspace& ws, Stream stream) {
  double total = 0.0;
  sumSquaresMany(&g, &n, 1, &total, ws, stream);
  return total;
}

}  // namespace qk::cuda
