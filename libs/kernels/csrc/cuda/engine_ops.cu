// The small kernels the device decoder (model/model_cuda.cu) needs around the big ones: embedding
// rows, the KV-cache append, a row gather (the rows whose logits are wanted) and a scale; for the
// trainer (cuda/train_cuda.cu) the inverse scatter and an add.
// CPU counterparts: qk::embeddingForward / tableRow (cpu/ops.cpp), the memcpy loop of
// engine::Model::runDecoder, the sel_ gather of engine::Model::forward, qk::scale, qk::addInto.
// All are grid-stride loops over the output: memory bound, one pass.
#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

constexpr int kThreads = 256;

unsigned gridOf(int64_t n) {
  const int64_t g = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(g < 65536 ? (g > 0 ? g : 1) : 65536);
}

#define QK_GRID_STRIDE(i, n)                                                              \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// out[t, c] (=|+=) table[ids[t] + idOffset, c]; weightAt decodes exactly as qk::tableRow.
__global__ void embeddingKernel(DevWeight w, const int32_t* __restrict__ ids, int32_t idOffset, int64_t T,
                                float* __restrict__ out, bool accumulate) {
  const int64_t cols = w.cols;
  QK_GRID_STRIDE(i, T * cols) {
    const int64_t t = i / cols, c = i - t * cols;
    const int64_t row = static_cast<int64_t>(ids[t]) + idOffset;
    const float v = weightAt(w, row * cols + c);
    out[i] = accumulate ? out[i] + v : v;
  }
}

__global__ void kvCacheWriteKernel(const float* __restrict__ k, const float* __restrict__ v,
                                   const int64_t* __restrict__ kvOffset, const int32_t* __restrict__ pos, int64_t T,
                                   int64_t kvDim, float* __restrict__ kc, float* __restrict__ vc) {
  QK_GRID_STRIDE(i, T * kvDim) {
    const int64_t t = i / kvDim, e = i - t * kvDim;
    const int64_t dst = kvOffset[t] + static_cast<int64_t>(pos[t]) * kvDim + e;
    kc[dst] = k[i];
    vc[dst] = v[i];
  }
}

// Llama attention prologue of a decode/prefill step, one thread per (token, head, pair) over the q
// heads then the kv heads: q rotated in place; k rotated, in place and into its cache row; the v
// pair copied to its cache row (the addressing of kvCacheWriteKernel).
__global__ void ropeAppendKvKernel(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v, int64_t T,
                                   int nHeads, int nKvHeads, int headDim, const int32_t* __restrict__ pos,
                                   const float* __restrict__ cosT, const float* __restrict__ sinT,
                                   const int64_t* __restrict__ kvOffset, float* __restrict__ kc, float* __restrict__ vc) {
  const int half = headDim / 2, heads = nHeads + nKvHeads;
  const int64_t kvDim = static_cast<int64_t>(nKvHeads) * headDim;
  QK_GRID_STRIDE(e, T * heads * half) {
    const int j = static_cast<int>(e % half);
    const int64_t th = e / half, t = th / heads;
    const int h = static_cast<int>(th % heads);
    const int64_t p = pos[t];
    const float c = cosT[p * half + j], s = sinT[p * half + j];
    if (h < nHeads) {
      ropePair<false>(q + (t * nHeads + h) * headDim, j, half, c, s);
      continue;
    }
    const int64_t off = static_cast<int64_t>(h - nHeads) * headDim;  // this kv head within a row
    float* kr = k + t * kvDim + off;
    ropePair<false>(kr, j, half, c, s);
    const int64_t dst = kvOffset[t] + p * kvDim + off;
    kc[dst + j] = kr[j];
    kc[dst + j + half] = kr[j + half];
    vc[dst + j] = v[t * kvDim + off + j];
    vc[dst + j + half] = v[t * kvDim + off + j + half];
  }
}

__global__ void gatherRowsKernel(const float* __restrict__ src, const int32_t* __restrict__ idx, int64_t R,
                                 int64_t cols, float* __restrict__ dst) {
  QK_GRID_STRIDE(i, R * cols) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[i] = src[static_cast<int64_t>(idx[r]) * cols + c];
  }
}

__global__ void scatterRowsKernel(const float* __restrict__ src, const int32_t* __restrict__ idx, int64_t R,
                                  int64_t cols, float* __restrict__ dst) {
  QK_GRID_STRIDE(i, R * cols) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[static_cast<int64_t>(idx[r]) * cols + c] = src[i];
  }
}

__global__ void addKernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  QK_GRID_STRIDE(i, n) y[i] = __fadd_rn(y[i], x[i]);
}

__global__ void scaleKernel(float* __restrict__ x, float s, int64_t n) {
  QK_GRID_STRIDE(i, n) x[i] = __fmul_rn(x[i], s);
}

}  // namespace

void embeddingForward(const WeightView& table, const int32_t* ids, int32_t idOffset, int64_t T, float* out,
                      bool accumulate, Stream stream) {
  checkArg(T >= 0, "embedding T");
  if (T == 0 || table.cols == 0) return;
  const DevWeight w = devWeight(table);
  embeddingKernel<<<gridOf(T * table.cols), kThreads, 0, cs(stream)>>>(w, ids, idOffset, T, out, accumulate);
  QK_CUDA_LAUNCHED();
}

void kvCacheWrite(const float* k, const float* v, const int64_t* kvOffset, const int32_t* pos, int64_t T,
                  int64_t kvDim, float* kCache, float* vCache, Stream stream) {
  checkArg(T >= 0 && kvDim > 0, "kvCacheWrite sizes");
  if (T == 0) return;
  kvCacheWriteKernel<<<gridOf(T * kvDim), kThreads, 0, cs(stream)>>>(k, v, kvOffset, pos, T, kvDim, kCache, vCache);
  QK_CUDA_LAUNCHED();
}

void ropeAppendKv(float* q, float* k, const float* v, int64_t T, int nHeads, int nKvHeads, int headDim,
                  const int32_t* pos, const float* cosT, const float* sinT, const int64_t* kvOffset, float* kCache,
                  float* vCache, Stream stream) {
  checkArg(headDim > 0 && headDim % 2 == 0 && nHeads > 0 && nKvHeads > 0 && T >= 0, "ropeAppendKv shape");
  if (T == 0) return;
  ropeAppendKvKernel<<<gridOf(T * (nHeads + nKvHeads) * (headDim / 2)), kThreads, 0, cs(stream)>>>(
      q, k, v, T, nHeads, nKvHeads, headDim, pos, cosT, sinT, kvOffset, kCache, vCache);
  QK_CUDA_LAUNCHED();
}

void gatherRows(const float* src, const int32_t* idx, int64_t R, int64_t cols, float* dst, Stream stream) {
  checkArg(R >= 0 && cols > 0, "gatherRows sizes");
  if (R == 0) return;
  gatherRowsKernel<<<gridOf(R * cols), kThreads, 0, cs(stream)>>>(src, idx, R, cols, dst);
  QK_CUDA_LAUNCHED();
}

void scatterRows(const float* src, const int32_t* idx, int64_t R, int64_t cols, float* dst, Stream stream) {
  checkArg(R >= 0 && cols > 0, "scatterRows sizes");
  if (R == 0) return;
  scatterRowsKernel<<<gridOf(R * cols), kThreads, 0, cs(stream)>>>(src, idx, R, cols, dst);
  QK_CUDA_LAUNCHED();
}

void addInPlace(float* y, const float* x, int64_t n, Stream stream) {
  checkArg(n >= 0, "add n");
  if (n == 0) return;
  addKernel<<<gridOf(n), kThreads, 0, cs(stream)>>>(y, x, n);
  QK_CUDA_LAUNCHED();
}

void scaleInPlace(float* x, float s, int64_t n, Stream stream) {
  checkArg(n >= 0, "scale n");
  if (n == 0) return;
  scaleKernel<<<gridOf(n), kThreads, 0, cs(stream)>>>(x, s, n);
  QK_CUDA_LAUNCHED();
}

}  // namespace qk::cuda
