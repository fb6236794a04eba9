// Internal helpers of the CUDA kernels (not part of the API in qk_cuda.h): error checks, launch
// geometry, the NF4 table, weight element decoding and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/nf4_common.h"
#include "cuda/qk_cuda.h"

namespace qk::cuda {

[[noreturn]] void throwCuda(cudaError_t e, const char* what, const char* file, int line);

#define QK_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    cudaError_t qk_e_ = (call);                                                          \
    if (qk_e_ != cudaSuccess) ::qk::cuda::throwCuda(qk_e_, #call, __FILE__, __LINE__);  \
  } while (0)
// After a <<<...>>> launch: configuration errors surface here, execution errors at the next sync.
#define QK_CUDA_LAUNCHED() QK_CUDA_CHECK(cudaGetLastError())

inline cudaStream_t cs(Stream s) { return static_cast<cudaStream_t>(s); }
inline unsigned gridFor(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  if (g > 0x7fffffffLL) throw std::invalid_argument("qk::cuda: problem too large for one grid");
  return static_cast<unsigned>(g > 0 ? g : 1);
}
inline void checkArg(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("qk::cuda: ") + what);
}
// log2 of a valid NF4 blocksize (a power of two in 32..4096), else invalid_argument.
int blocksizeShift(int blocksize);
// Validates a device WeightView (dtype, alignment of the element data, blocksize).
void checkWeight(const WeightView& w);

// NF4 code -> value, the CPU table (nf4detail::kCode) in constant memory (one copy per TU).
static __constant__ float kNf4Table[16] = {
    nf4detail::kCode[0],  nf4detail::kCode[1],  nf4detail::kCode[2],  nf4detail::kCode[3],
    nf4detail::kCode[4],  nf4detail::kCode[5],  nf4detail::kCode[6],  nf4detail::kCode[7],
    nf4detail::kCode[8],  nf4detail::kCode[9],  nf4detail::kCode[10], nf4detail::kCode[11],
    nf4detail::kCode[12], nf4detail::kCode[13], nf4detail::kCode[14], nf4detail::kCode[15]};

// A WeightView reduced to what the device code needs (passed by value to kernels).
struct DevWeight {
  int type;  // WType as int
  const void* data;
  const float* absmax;
  int64_t rows, cols;
  int bsShift;
};
inline DevWeight devWeight(const WeightView& w) {
  checkWeight(w);
  return {static_cast<int>(w.type), w.data, w.absmax, w.rows, w.cols,
          w.type == WType::NF4 ? blocksizeShift(w.blocksize) : 0};
}

// Flat element i of a weight as fp32: exactly qk::weightDecode's value.
__device__ __forceinline__ float weightAt(const DevWeight& w, int64_t i) {
  switch (w.type) {
    case static_cast<int>(WType::F32):
      return __ldg(static_cast<const float*>(w.data) + i);
    case static_cast<int>(WType::F16):
      return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(w.data) + i)));
    case static_cast<int>(WType::BF16):
      return __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(w.data) + i)) << 16);
    default: {
      const uint8_t byte = __ldg(static_cast<const uint8_t*>(w.data) + (i >> 1));
      const int code = (i & 1) ? (byte & 15) : (byte >> 4);
      return kNf4Table[code] * __ldg(w.absmax + (i >> w.bsShift));
    }
  }
}

// Activation forward values exactly as cpu/ops.cpp's scalar reference (silu = x / (1 + e^-x)).
__device__ __forceinline__ float actForward(int a, float x) {
  if (a == static_cast<int>(Activation::Silu)) return x / (1.f + expf(-x));
  if (a == static_cast<int>(Activation::Relu)) return x > 0.f ? x : 0.f;
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

// RoPE of one (x1, x2) = (v[j], v[j + hd/2]) pair by (c, s) = (cos, sin)[pos, j]. Each product
// and sum rounded separately (no FMA contraction), as the CPU loop: bit-identical to qk::ropeRotate.
// kInverse: the transposed rotation (the backward pass).
template <bool kInverse>
__device__ __forceinline__ void ropePair(float* v, int j, int half, float c, float s) {
  const float x1 = v[j], x2 = v[j + half];
  if (!kInverse) {
    v[j] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    v[j + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
  } else {
    v[j] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    v[j + half] = __fsub_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
  }
}

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warpSumD(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `red` needs 32 floats of shared memory. Fixed order: deterministic.
__device__ __forceinline__ float blockSum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warpSum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warpSum(t);
}

}  // namespace qk::cuda
