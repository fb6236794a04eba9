// NF4 dequantization, linear layers over frozen weights (GEMV for M <= 8, bf16 tensor-core GEMM for
// M > 8 and for the input gradient) and the fp32 GEMM of the LoRA branch. CPU counterparts:
// cpu/nf4.cpp (nf4Dequantize*), cpu/matmul.cpp (linearForward, linearBackwardInput, gemmF32).
#include <mma.h>

#include <type_traits>

#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

// =============================================================================================
// NF4 dequantization: one thread per packed byte (two elements), grid-stride.
// out = NF4[code]·absmax is one fp32 multiply, exactly as the CPU path: bit-identical.
// =============================================================================================
template <bool kBf16>
__global__ void nf4DequantizeKernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int64_t n,
                                    int bsShift, void* __restrict__ out) {
  const int64_t bytes = (n + 1) / 2;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t b = __ldg(packed + j);
    const int64_t i = 2 * j;
    const float v0 = kNf4Table[b >> 4] * __ldg(absmax + (i >> bsShift));
    const float v1 = kNf4Table[b & 15] * __ldg(absmax + ((i + 1) >> bsShift));
    if (kBf16) {
      auto* o = static_cast<__nv_bfloat16*>(out);
      o[i] = __float2bfloat16_rn(v0);
      if (i + 1 < n) o[i + 1] = __float2bfloat16_rn(v1);
    } else {
      auto* o = static_cast<float*>(out);
      o[i] = v0;
      if (i + 1 < n) o[i + 1] = v1;
    }
  }
}

unsigned streamingGrid(int64_t work, int threads) {
  // enough blocks to fill any current GPU several times over; the kernels grid-stride beyond that
  const int64_t g = (work + threads - 1) / threads;
  return static_cast<unsigned>(g < 65536 ? (g > 0 ? g : 1) : 65536);
}

// =============================================================================================
// GEMV, M <= 8, NF4 rows with K % 32 == 0 (the decode path; weights stay packed in device memory).
// A block of 8 warps owns ROWS consecutive rows of W and splits K between its warps: each lane
// loads 16 bytes (32 weights, one NF4 block since blocksize >= 32 and the chunk is 32-aligned) per
// row with one 128-bit load, decodes them through a 16-entry table in shared memory (16 distinct
// words in 16 banks: no conflicts), multiplies the raw code values with x and scales the chunk's
// partial sum by its absmax once. x (fp32, read through L1) is loaded once per chunk for all ROWS
// rows. The 8 warps' partial sums are added in a fixed order: deterministic.
// One launch can serve up to kMaxGemvParts weights that share x and K (q/k/v, gate/up: fewer,
// fuller launches in a decode step): the grid is the parts' blocks back to back, and a block reads
// which part (weight, absmax, bias, output) it belongs to from firstBlock.
// =============================================================================================
constexpr int kGemvWarps = 8;
constexpr int kGemvChunk = 32;  // weights per lane per step
constexpr int kMaxGemvParts = 3;

struct GemvNf4Part {
  const uint8_t* w;     // packed NF4 [N, K]
  const float* absmax;  // fp32 per block
  const float* bias;    // [N] or null
  float* y;             // [M, N]
  int64_t N;
  int bsShift;
  unsigned firstBlock;  // the part's blocks are [firstBlock, next part's firstBlock)
};
struct GemvNf4Parts {
  GemvNf4Part p[kMaxGemvParts];
  int n;
};

// kGated (gate/up of a gated MLP: parts.n == 2, the same N): a block owns the same ROWS rows of
// both weights (slots 0..ROWS-1 gate, ROWS..2·ROWS-1 up) and writes y = act(gate + b)·(up + b) into
// part 0's output — the pair's GEMVs and the gated activation in one launch, per output the same
// arithmetic as the two GEMVs followed by gatedActivationForward.
template <int M, int ROWS, bool kGated = false>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemvNf4Kernel(const float* __restrict__ x, int64_t K, GemvNf4Parts parts, bool accumulate, int act) {
  constexpr int SLOTS = kGated ? 2 * ROWS : ROWS;  // weight rows per block
  __shared__ float lut[16];
  __shared__ float red[kGemvWarps][M * SLOTS];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Table[threadIdx.x];
  // this block's part (static indices: the parameter struct stays in the constant bank)
  GemvNf4Part P = parts.p[0];
#pragma unroll
  for (int i = 1; i < kMaxGemvParts; ++i)
    if (!kGated && i < parts.n && blockIdx.x >= parts.p[i].firstBlock) P = parts.p[i];
  const GemvNf4Part U = kGated ? parts.p[1] : P;  // the up weight of a gated pair
  const int64_t N = P.N;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x - P.firstBlock) * ROWS;
  float acc[M][SLOTS];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) acc[m][r] = 0.f;

  const int64_t step = static_cast<int64_t>(kGemvWarps) * 32 * kGemvChunk;
  for (int64_t k = (static_cast<int64_t>(warp) * 32 + lane) * kGemvChunk; k < K; k += step) {
    uint4 q[SLOTS];
    float sc[SLOTS];
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) {
      const GemvNf4Part& W = r < ROWS ? P : U;
      const int64_t n = n0 + r % ROWS;
      if (n < N) {
        const int64_t f = n * K + k;  // flat element index, a multiple of 32
        q[r] = __ldg(reinterpret_cast<const uint4*>(W.w + (f >> 1)));
        sc[r] = __ldg(W.absmax + (f >> W.bsShift));
      } else {
        q[r] = make_uint4(0, 0, 0, 0);
        sc[r] = 0.f;
      }
    }
    float part[M][SLOTS];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < SLOTS; ++r) part[m][r] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // 4 words of 8 weights: byte b holds elements 2b (high nibble), 2b+1
      float wv[SLOTS][8];
#pragma unroll
      for (int r = 0; r < SLOTS; ++r) {
        const uint32_t word = i == 0 ? q[r].x : i == 1 ? q[r].y : i == 2 ? q[r].z : q[r].w;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (word >> (8 * b)) & 0xffu;
          wv[r][2 * b] = lut[byte >> 4];
          wv[r][2 * b + 1] = lut[byte & 15u];
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 xa = __ldg(reinterpret_cast<const float4*>(x + m * K + k + 8 * i));
        const float4 xb = __ldg(reinterpret_cast<const float4*>(x + m * K + k + 8 * i + 4));
#pragma unroll
        for (int r = 0; r < SLOTS; ++r)
          part[m][r] += wv[r][0] * xa.x + wv[r][1] * xa.y + wv[r][2] * xa.z + wv[r][3] * xa.w +
                        wv[r][4] * xb.x + wv[r][5] * xb.y + wv[r][6] * xb.z + wv[r][7] * xb.w;
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < SLOTS; ++r) acc[m][r] += sc[r] * part[m][r];
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) {
      const float s = warpSum(acc[m][r]);
      if (lane == 0) red[warp][m * SLOTS + r] = s;
    }
  __syncthreads();
  if (threadIdx.x < M * ROWS) {
    const int m = threadIdx.x / ROWS, r = threadIdx.x % ROWS;
    const int64_t n = n0 + r;
    if (n < N) {
      // the warps' partial sums in a fixed order (deterministic), then the bias
      auto rowSum = [&](int slot, const float* bias) {
        float s = 0.f;
        for (int wi = 0; wi < kGemvWarps; ++wi) s += red[wi][m * SLOTS + slot];
        return bias ? s + bias[n] : s;
      };
      const float s = rowSum(r, P.bias);
      float* o = P.y + m * N + n;
      if (kGated) *o = actForward(act, s) * rowSum(ROWS + r, U.bias);
      else *o = accumulate ? *o + s : s;
    }
  }
}

// Any dtype / layout (odd K, unaligned rows): one warp per row of W, lanes stride over K.
template <int M>
__global__ void __launch_bounds__(256)
    gemvGenericKernel(const float* __restrict__ x, DevWeight w, const float* __restrict__ bias, float* __restrict__ y,
                      bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (n >= w.rows) return;
  const int64_t K = w.cols, N = w.rows;
  float a[M];
#pragma unroll
  for (int m = 0; m < M; ++m) a[m] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float wv = weightAt(w, n * K + k);
#pragma unroll
    for (int m = 0; m < M; ++m) a[m] += wv * __ldg(x + m * K + k);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float s = warpSum(a[m]);
    if (lane == 0) {
      if (bias) s += bias[n];
      float* o = y + m * N + n;
      *o = accumulate ? *o + s : s;
    }
  }
}

// f(std::integral_constant<int, M>) for the GEMV kernels' compile-time row count M = 1..8.
template <class F>
void gemvRows(int64_t M, F&& f) {
  switch (M) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// The fast NF4 GEMV applies: NF4, K a multiple of 32, x and the packed rows 16-byte aligned.
bool gemvNf4Fits(const float* x, const WeightView& wv) {
  return wv.type == WType::NF4 && wv.cols % 32 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(wv.data) % 16 == 0;
}

// y_i (=|+=) x·W_iᵀ + b_i for every part, in one launch (every W_i fits gemvNf4Fits, same K).
template <int M>
void launchGemvNf4(const float* x, const LinearOut* outs, int n, bool accumulate, cudaStream_t st) {
  constexpr int ROWS = M <= 2 ? 4 : 2;
  GemvNf4Parts parts{};
  parts.n = n;
  unsigned blocks = 0;
  for (int i = 0; i < n; ++i) {
    const WeightView& wv = *outs[i].w;
    parts.p[i] = {static_cast<const uint8_t*>(wv.data), wv.absmax, outs[i].bias, outs[i].y, wv.rows,
                  devWeight(wv).bsShift, blocks};
    const unsigned b = gridFor(wv.rows, ROWS);
    checkArg(blocks + static_cast<uint64_t>(b) <= 0x7fffffffu, "fused GEMV grid too large");
    blocks += b;
  }
  gemvNf4Kernel<M, ROWS><<<blocks, kGemvWarps * 32, 0, st>>>(x, outs[0].w->cols, parts, accumulate, 0);
  QK_CUDA_LAUNCHED();
}

// gate.y = act(x·Gᵀ + b_g)·(x·Uᵀ + b_u) in one launch (both fit gemvNf4Fits, same shape). Half the
// rows per block of the plain GEMV: the same weight bytes in flight and registers per block.
template <int M>
void launchGatedGemvNf4(const float* x, const LinearOut& gate, const LinearOut& up, int act, cudaStream_t st) {
  constexpr int ROWS = M <= 2 ? 2 : 1;
  GemvNf4Parts parts{};
  parts.n = 2;
  for (int i = 0; i < 2; ++i) {
    const LinearOut& o = i == 0 ? gate : up;
    parts.p[i] = {static_cast<const uint8_t*>(o.w->data), o.w->absmax, o.bias, o.y, o.w->rows, devWeight(*o.w).bsShift, 0};
  }
  gemvNf4Kernel<M, ROWS, true><<<gridFor(gate.w->rows, ROWS), kGemvWarps * 32, 0, st>>>(x, gate.w->cols, parts, false, act);
  QK_CUDA_LAUNCHED();
}

template <int M>
void launchGemv(const float* x, const WeightView& wv, const float* bias, float* y, bool accumulate, cudaStream_t st) {
  if (gemvNf4Fits(x, wv)) {
    const LinearOut one{&wv, bias, y};
    return launchGemvNf4<M>(x, &one, 1, accumulate, st);
  }
  gemvGenericKernel<M><<<gridFor(wv.rows, 8), 256, 0, st>>>(x, devWeight(wv), bias, y, accumulate);
  QK_CUDA_LAUNCHED();
}

// =============================================================================================
// bf16 tensor-core GEMM (WMMA 16×16×16, fp32 accumulation):  C[M, Nout] (=|+=) A[M, R]·B[R, Nout] (+ bias)
//   forward  (kBackward = false): B(r, n) = W[n, r]   (y = x·Wᵀ,  R = K = w.cols, Nout = w.rows)
//   backward (kBackward = true):  B(r, n) = W[r, n]   (dx = dy·W, R = N = w.rows, Nout = w.cols)
// Block tile 128×128×32, 8 warps of 64×32. A (fp32 activations) is rounded to bf16 and W decoded
// (NF4: code·absmax in fp32, then rounded to bf16) into shared memory; the next k-tile is fetched
// into registers while the tensor cores work on the current one.
// =============================================================================================
using namespace nvcuda;
constexpr int kBM = 128, kBN = 128, kBK = 32, kLds = kBK + 8;  // +8: staggers rows across banks

__device__ __forceinline__ uint32_t packBf16(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

template <bool kBackward>
__global__ void __launch_bounds__(256)
    gemmBf16Kernel(const float* __restrict__ A, int64_t M, int64_t Nout, int64_t R, DevWeight w,
                   const float* __restrict__ bias, float* __restrict__ C, bool accumulate, bool aVec, bool nf4Vec) {
  __shared__ __align__(128) unsigned char smem[2 * kBM * kLds * 2];
  __shared__ float lut[16];
  auto* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [m][k]
  auto* Bs = As + kBM * kLds;                          // [n][k]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (tid < 16) lut[tid] = kNf4Table[tid];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int wm = warp >> 2, wn = warp & 3;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // register stage of one k-tile: A 16 floats, B 16 values (raw NF4 bytes + scale, or decoded floats)
  float ra[16];
  float rb[16];
  uint2 rq = make_uint2(0, 0);
  float rs = 0.f;
  const int aRow = tid >> 3, aCol = (tid & 7) * 4;  // A: rows aRow + 32·i, 4 consecutive k
  // B forward: n = tid/2, 16 consecutive k at (tid%2)·16;  backward: r = tid/8, 16 consecutive n at (tid%8)·16
  const int bA = kBackward ? (tid >> 3) : (tid >> 1), bB = kBackward ? (tid & 7) * 16 : (tid & 1) * 16;

  auto loadTile = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + aRow + 32 * i, k = k0 + aCol;
      if (aVec && m < M && k + 3 < R) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(A + m * R + k));
        ra[4 * i] = v.x, ra[4 * i + 1] = v.y, ra[4 * i + 2] = v.z, ra[4 * i + 3] = v.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) ra[4 * i + e] = (m < M && k + e < R) ? __ldg(A + m * R + k + e) : 0.f;
      }
    }
    // element (r, n) of B and its flat index in W
    const int64_t r0 = kBackward ? k0 + bA : k0 + bB, nn0 = kBackward ? n0 + bB : n0 + bA;
    if (nf4Vec) {
      // 16 consecutive elements of one W row: 8 bytes, one NF4 block (aligned, see the launcher)
      const bool in = kBackward ? (r0 < R && nn0 < Nout) : (nn0 < Nout && r0 < R);
      if (in) {
        const int64_t f = kBackward ? r0 * Nout + nn0 : nn0 * R + r0;
        rq = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(w.data) + (f >> 1)));
        rs = __ldg(w.absmax + (f >> w.bsShift));
      } else {
        rq = make_uint2(0x77777777u, 0x77777777u);  // code 7 = 0.0
        rs = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int64_t r = kBackward ? r0 : r0 + e, n = kBackward ? nn0 + e : nn0;
        rb[e] = (r < R && n < Nout) ? weightAt(w, kBackward ? r * Nout + n : n * R + r) : 0.f;
      }
    }
  };
  auto storeTile = [&]() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint2 p;
      p.x = packBf16(ra[4 * i], ra[4 * i + 1]);
      p.y = packBf16(ra[4 * i + 2], ra[4 * i + 3]);
      *reinterpret_cast<uint2*>(As + (aRow + 32 * i) * kLds + aCol) = p;
    }
    float v[16];
    if (nf4Vec) {
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const uint32_t byte = ((b < 4 ? rq.x : rq.y) >> (8 * (b & 3))) & 0xffu;
        v[2 * b] = lut[byte >> 4] * rs;
        v[2 * b + 1] = lut[byte & 15u] * rs;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) v[e] = rb[e];
    }
    if (!kBackward) {
      uint4 p0, p1;
      p0.x = packBf16(v[0], v[1]), p0.y = packBf16(v[2], v[3]), p0.z = packBf16(v[4], v[5]), p0.w = packBf16(v[6], v[7]);
      p1.x = packBf16(v[8], v[9]), p1.y = packBf16(v[10], v[11]), p1.z = packBf16(v[12], v[13]),
      p1.w = packBf16(v[14], v[15]);
      *reinterpret_cast<uint4*>(Bs + bA * kLds + bB) = p0;
      *reinterpret_cast<uint4*>(Bs + bA * kLds + bB + 8) = p1;
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) Bs[(bB + e) * kLds + bA] = __float2bfloat16_rn(v[e]);
    }
  };

  const int64_t tiles = (R + kBK - 1) / kBK;
  if (tiles > 0) loadTile(0);
  __syncthreads();  // lut
  for (int64_t t = 0; t < tiles; ++t) {
    storeTile();
    __syncthreads();
    if (t + 1 < tiles) loadTile((t + 1) * kBK);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * kLds + kk, kLds);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  // epilogue through a per-warp 16×16 fp32 scratch (reuses the tile memory): bounds, bias, accumulate
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int idx = lane * 8 + e;
        const int64_t m = m0 + wm * 64 + i * 16 + (idx >> 4), n = n0 + wn * 32 + j * 16 + (idx & 15);
        if (m < M && n < Nout) {
          float v = scratch[idx];
          if (bias) v += bias[n];
          float* o = C + m * Nout + n;
          *o = accumulate ? *o + v : v;
        }
      }
      __syncwarp();
    }
}

template <bool kBackward>
void launchGemmBf16(const float* A, int64_t M, const WeightView& wv, const float* bias, float* C, bool accumulate,
                    cudaStream_t st) {
  const DevWeight w = devWeight(wv);
  const int64_t R = kBackward ? wv.rows : wv.cols, Nout = kBackward ? wv.cols : wv.rows;
  if (M == 0 || Nout == 0) return;
  const bool aVec = R % 4 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0;
  // 16 consecutive weights = 8 aligned bytes inside one block: the row length must keep 16-alignment
  const bool nf4Vec =
      wv.type == WType::NF4 && wv.cols % 16 == 0 && reinterpret_cast<uintptr_t>(wv.data) % 8 == 0;
  const dim3 grid(gridFor(Nout, kBN), gridFor(M, kBM));
  checkArg(grid.y <= 65535, "M too large for one GEMM launch");
  gemmBf16Kernel<kBackward><<<grid, 256, 0, st>>>(A, M, Nout, R, w, bias, C, accumulate, aVec, nf4Vec);
  QK_CUDA_LAUNCHED();
}

// =============================================================================================
// fp32 GEMM on CUDA cores: 64×64 tile per block, k-slices of 16 through shared memory, 4×4 outputs
// per thread. Each output is reduced over K in order by one thread: deterministic.
// =============================================================================================
__global__ void __launch_bounds__(256)
    gemmF32Kernel(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* __restrict__ A,
                  int64_t lda, const float* __restrict__ B, int64_t ldb, float beta, float* __restrict__ C,
                  int64_t ldc) {
  __shared__ float As[16][64 + 4];  // [k][m]
  __shared__ float Bs[16][64 + 4];  // [k][n]
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 64, n0 = static_cast<int64_t>(blockIdx.x) * 64;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = tid + 256 * e;
      // index order chosen so consecutive threads read consecutive addresses
      int mm, kk;
      if (transA) kk = idx >> 6, mm = idx & 63;
      else mm = idx >> 4, kk = idx & 15;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? (transA ? A[k * lda + m] : A[m * lda + k]) : 0.f;
      int nn, kb;
      if (transB) nn = idx >> 4, kb = idx & 15;
      else kb = idx >> 6, nn = idx & 63;
      const int64_t n = n0 + nn, kq = k0 + kb;
      Bs[kb][nn] = (n < N && kq < K) ? (transB ? B[n * ldb + kq] : B[kq * ldb + n]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i], b[i] = Bs[kk][tx * 4 + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < M && n < N) {
        float* c = C + m * ldc + n;
        *c = beta == 0.f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *c;
      }
    }
}

// =============================================================================================
// Segmented LoRA (loraSegmentsForward). The segment table travels by value in the kernel
// parameters (≤ 4 KB), so a captured decode graph holds it like any other launch argument;
// __grid_constant__ lets threads index it at run time where it is (no per-thread local copy).
//   shrink:  tmp[t, j] = Σ_k x[t, k]·A_s[j, k]          one warp per (t, j), lanes stride k
//   expand:  y[t, o] += scaling_s · Σ_j tmp[t, j]·B_s[o, j]   one thread per (t, o)
// =============================================================================================
struct LoraSegTable {
  LoraSegment s[kMaxLoraSegments];
  int64_t firstWarp[kMaxLoraSegments];  // shrink: the segment's warps start here ((t1 - t0)·rank each)
  int n;
};

__global__ void __launch_bounds__(256)
    loraShrinkKernel(const float* __restrict__ x, int64_t in, const __grid_constant__ LoraSegTable tab, float* __restrict__ tmp, int64_t ldTmp,
                     int64_t warps) {
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= warps) return;  // whole warps leave together
  int si = 0;
  for (int i = 1; i < tab.n; ++i)
    if (gw >= tab.firstWarp[i]) si = i;
  const LoraSegment& seg = tab.s[si];
  const int64_t local = gw - tab.firstWarp[si];
  const int64_t t = seg.t0 + local / seg.rank, j = local % seg.rank;
  const float* xr = x + t * in;
  const float* ar = seg.a + j * in;
  float acc = 0.f;
  for (int64_t k = lane; k < in; k += 32) acc += __ldg(xr + k) * __ldg(ar + k);
  acc = warpSum(acc);
  if (lane == 0) tmp[t * ldTmp + j] = acc;
}

__global__ void __launch_bounds__(256)
    loraExpandKernel(const float* __restrict__ tmp, int64_t ldTmp, const __grid_constant__ LoraSegTable tab, float* __restrict__ y, int64_t out,
                     int64_t t0, int64_t t1) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t t = t0 + g / out, o = g % out;
  if (t >= t1) return;
  int si = -1;
  for (int i = 0; i < tab.n; ++i)
    if (t >= tab.s[i].t0 && t < tab.s[i].t1) si = i;
  if (si < 0) return;  // a row of the base model (or of an adapter without this module)
  const LoraSegment& seg = tab.s[si];
  const float* tr = tmp + t * ldTmp;
  const float* br = seg.b + o * seg.rank;
  float acc = 0.f;
  for (int j = 0; j < seg.rank; ++j) acc += tr[j] * __ldg(br + j);
  y[t * out + o] += seg.scaling * acc;
}

}  // namespace

void nf4Dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out, Stream stream) {
  const int s = blocksizeShift(blocksize);
  if (n <= 0) return;
  nf4DequantizeKernel<false><<<streamingGrid((n + 1) / 2, 256), 256, 0, cs(stream)>>>(packed, absmax, n, s, out);
  QK_CUDA_LAUNCHED();
}

void nf4DequantizeBf16(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, uint16_t* out,
                       Stream stream) {
  const int s = blocksizeShift(blocksize);
  if (n <= 0) return;
  nf4DequantizeKernel<true><<<streamingGrid((n + 1) / 2, 256), 256, 0, cs(stream)>>>(packed, absmax, n, s, out);
  QK_CUDA_LAUNCHED();
}

void linearForward(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate,
                   Stream stream) {
  checkArg(M >= 0, "M");
  if (M == 0 || w.rows == 0) return;
  checkArg(w.cols > 0, "linearForward with K = 0 is not supported on CUDA");
  cudaStream_t st = cs(stream);
  if (M > 8) return launchGemmBf16<false>(x, M, w, bias, y, accumulate, st);
  gemvRows(M, [&](auto m) { launchGemv<decltype(m)::value>(x, w, bias, y, accumulate, st); });
}

bool linearForwardMany(const float* x, int64_t M, const LinearOut* outs, int n, bool accumulate, Stream stream) {
  checkArg(M >= 0 && n >= 0 && n <= kMaxGemvParts, "linearForwardMany: M, or 0..3 outputs");
  bool fused = M >= 1 && M <= 8 && n > 1;
  for (int i = 0; i < n && fused; ++i)
    fused = gemvNf4Fits(x, *outs[i].w) && outs[i].w->cols == outs[0].w->cols && outs[i].w->rows > 0;
  if (!fused) {
    for (int i = 0; i < n; ++i) linearForward(x, M, *outs[i].w, outs[i].bias, outs[i].y, accumulate, stream);
    return false;
  }
  gemvRows(M, [&](auto m) { launchGemvNf4<decltype(m)::value>(x, outs, n, accumulate, cs(stream)); });
  return true;
}

bool gatedLinearForward(const float* x, int64_t M, const LinearOut& gate, const LinearOut& up, Activation act,
                        Stream stream) {
  const bool fused = M >= 1 && M <= 8 && gemvNf4Fits(x, *gate.w) && gemvNf4Fits(x, *up.w) &&
                     gate.w->rows == up.w->rows && gate.w->cols == up.w->cols && gate.w->rows > 0;
  if (!fused) {
    const LinearOut both[2] = {gate, up};
    linearForwardMany(x, M, both, 2, false, stream);
    gatedActivationForward(act, gate.y, up.y, gate.y, M * gate.w->rows, stream);
    return false;
  }
  gemvRows(M, [&](auto m) { launchGatedGemvNf4<decltype(m)::value>(x, gate, up, static_cast<int>(act), cs(stream)); });
  return true;
}

void linearBackwardInput(const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate, Stream stream) {
  checkArg(M >= 0, "M");
  if (M == 0 || w.cols == 0) return;
  checkArg(w.rows > 0, "linearBackwardInput with N = 0 is not supported on CUDA");
  launchGemmBf16<true>(dy, M, w, nullptr, dx, accumulate, cs(stream));
}

void gemmF32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc, Stream stream) {
  checkArg(M >= 0 && N >= 0 && K >= 0, "gemm sizes");
  if (M == 0 || N == 0) return;
  const dim3 grid(gridFor(N, 64), gridFor(M, 64));
  checkArg(grid.y <= 65535, "M too large for one GEMM launch");
  gemmF32Kernel<<<grid, 256, 0, cs(stream)>>>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  QK_CUDA_LAUNCHED();
}

void loraSegmentsForward(const float* x, int64_t in, float* y, int64_t out, const LoraSegment* segs, int n, float* tmp,
                         int64_t ldTmp, Stream stream) {
  checkArg(n >= 0 && n <= kMaxLoraSegments, "loraSegmentsForward: at most kMaxLoraSegments segments");
  if (n == 0 || in <= 0 || out <= 0) return;
  LoraSegTable tab{};
  tab.n = n;
  int64_t warps = 0, t0 = segs[0].t0, t1 = segs[0].t1;
  for (int i = 0; i < n; ++i) {
    const LoraSegment& s = segs[i];
    checkArg(s.t1 > s.t0 && s.rank >= 1 && s.rank <= ldTmp && s.a && s.b, "loraSegmentsForward: segment");
    checkArg(i == 0 || s.t0 >= segs[i - 1].t1, "loraSegmentsForward: segments must be ordered and disjoint");
    tab.s[i] = s;
    tab.firstWarp[i] = warps;
    warps += (s.t1 - s.t0) * s.rank;
    t1 = s.t1;
  }
  cudaStream_t st = cs(stream);
  loraShrinkKernel<<<gridFor(warps * 32, 256), 256, 0, st>>>(x, in, tab, tmp, ldTmp, warps);
  QK_CUDA_LAUNCHED();
  loraExpandKernel<<<gridFor((t1 - t0) * out, 256), 256, 0, st>>>(tmp, ldTmp, tab, y, out, t0, t1);
  QK_CUDA_LAUNCHED();
}

}  // namespace qk::cuda
