// Softmax cross-entropy over rows of logits (forward + backward in place) and the fused, row-chunked
// lm_head + cross-entropy of training. CPU counterparts: cpu/backward.cpp softmaxCrossEntropy,
// lmHeadCrossEntropy.
#include <algorithm>

#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

// (max, Σ e^{x−max}) pairs merged exactly as an online softmax does; -inf max = empty.
__device__ __forceinline__ void mergeMaxSum(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2, s = s2;
    return;
  }
  const float M = fmaxf(m, m2);
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

// One block per row; the row's vocabulary is streamed once for (max, sum) with an online softmax,
// then once more for the gradient. Works for any V (the row never has to fit in shared memory).
__global__ void __launch_bounds__(256)
    softmaxCrossEntropyKernel(float* __restrict__ logits, int64_t V, const int32_t* __restrict__ labels,
                              double* __restrict__ loss, float gradScale, bool grad) {
  __shared__ float wm[32], ws[32];
  float* z = logits + blockIdx.x * V;
  const int32_t y = labels[blockIdx.x];
  const float zy = z[y];  // read before anything is overwritten
  float m = -INFINITY, s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = z[i];
    if (x > m) {
      s = (m == -INFINITY ? 0.f : s * expf(m - x)) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    mergeMaxSum(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) wm[warp] = m, ws[warp] = s;
  __syncthreads();
  m = wm[0], s = ws[0];
  for (int w = 1; w < nw; ++w) mergeMaxSum(m, s, wm[w], ws[w]);  // same order in every thread
  if (threadIdx.x == 0) loss[blockIdx.x] = static_cast<double>(m) + log(static_cast<double>(s)) - static_cast<double>(zy);
  if (!grad) return;
  const float f = gradScale / s;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) z[i] = expf(z[i] - m) * f;  // softmax·gradScale
  __syncthreads();
  if (threadIdx.x == 0) z[y] -= gradScale;  // − onehot·gradScale
}

}  // namespace

void softmaxCrossEntropy(float* logits, int64_t rows, int64_t V, const int32_t* labels, double* loss, float gradScale,
                         bool grad, Stream stream) {
  checkArg(rows >= 0 && V > 0 && rows <= 0x7fffffffLL, "cross-entropy rows / vocab");
  if (!rows) return;
  softmaxCrossEntropyKernel<<<static_cast<unsigned>(rows), 256, 0, cs(stream)>>>(logits, V, labels, loss, gradScale,
                                                                                 grad);
  QK_CUDA_LAUNCHED();
}

double lmHeadCrossEntropy(const float* h, int64_t M, const WeightView& w, const int32_t* labels, int64_t chunkRows,
                          float gradScale, float* dh, Workspace& ws, Stream stream) {
  const int64_t V = w.rows, H = w.cols;
  if (M <= 0) return 0.0;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunkRows, M));
  float* logits = ws.get<float>(0, static_cast<size_t>(chunk * V));  // never more than [chunk, V] logits
  double* loss = ws.get<double>(1, static_cast<size_t>(M));
  for (int64_t r0 = 0; r0 < M; r0 += chunk) {
    const int64_t c = std::min(chunk, M - r0);
    linearForward(h + r0 * H, c, w, nullptr, logits, false, stream);                       // z [c, V]
    softmaxCrossEntropy(logits, c, V, labels + r0, loss + r0, gradScale, dh != nullptr, stream);
    if (dh) linearBackwardInput(logits, c, w, dh + r0 * H, false, stream);                // dh = dz·W [c, H]
  }
  std::vector<double> host(static_cast<size_t>(M));
  QK_CUDA_CHECK(cudaMemcpyAsync(host.data(), loss, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, cs(stream)));
  QK_CUDA_CHECK(cudaStreamSynchronize(cs(stream)));
  double total = 0.0;
  for (double l : host) total += l;  // row order, as the CPU
  return total;
}

}  // namespace qk::cuda
