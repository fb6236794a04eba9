// Tensor-core flash attention for training: the forward (out, lse) and the backward (dq, dk, dv) of
// causal GQA attention over packed rows, on TF32 tensor cores with fp32 accumulation. Same contract as
// the SIMT kernels in attention.cu (which attention.cu falls back to); CPU reference: cpu/backward.cpp.
//
// Why: the SIMT kernels spread one head vector over a warp, so every score costs a 5-step shuffle
// reduction; at the Llama-3.2-1B training shape (8 × 512, 32 heads of 64) their attention alone
// would take most of the step's time budget. Here a block owns a 64 × 64 tile of (query, key)
// pairs at a time and the four products of attention (S = QKᵀ, O += PV, dP = dO·Vᵀ, dQ += dS·K,
// dK += dSᵀ·Q, dV += Pᵀ·dO) are 16×16×8 WMMA products.
//
// Precision: the operands of every product (q, k, v, dout, p, ds) are rounded to TF32 (10-bit
// mantissa, relative 2⁻¹¹) with fp32 accumulation; the softmax (max, exp, sum, lse) is fp32 as on
// the CPU. Deterministic: every output element is reduced by one warp in a fixed order, no atomics.
//
// Work layout (4 warps = 128 threads; warp w owns rows 16w..16w+15 of the block's tile):
//   forward   block (query tile, head, row b): Q tile stays in shared memory; for each 64-key tile
//             K, V are loaded, S_w = Q_w Kᵀ → shared, online softmax per row (2 lanes per row, 32
//             columns each), O_w rescaled in shared and O_w += P_w V.
//   dQ        block (query tile, head, row b): S_w = Q_w Kᵀ and dP_w = dO_w Vᵀ → shared,
//             dS = P ∘ (dP − D)·scale with P = exp(scale·S − lse), dQ_w += dS_w K in registers.
//   dK, dV    block (key tile, kv head, row b): for every query head of the group and every query
//             tile that can see the key tile: Sᵀ_w = K_w Qᵀ, dPᵀ_w = V_w dOᵀ, then dV_w += Pᵀ_w dO,
//             dK_w += dSᵀ_w Q in registers (the group's heads summed in the same block: no atomics).
// Causality and packing: token t of row b sees keys start[t]..t of the same row; start never
// decreases along a row (planBatch's segments), so a tile of queries t0.. needs keys start[t0]..
// and a key tile j0.. is seen by no query tile whose first start is past the tile's last key.
#include <mma.h>

#include <climits>
#include <mutex>
#include <type_traits>

#include "cuda/attention_flash.cuh"
#include "cuda/common.cuh"

namespace qk::cuda::flash {

namespace {

using namespace nvcuda;

constexpr int kThreads = 128;  // 4 warps
constexpr int kTile = 64;      // queries per block (16 per warp) = keys per step
constexpr int kLdS = kTile + 4;  // row stride of a [64][64] score tile (floats; +4 against bank conflicts)

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;  // Bᵀ of a row-major B
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <int HD>
struct Dims {
  static constexpr int LD = HD + 4;  // row stride of a [64][HD] tile in shared memory (floats)
  static constexpr int NO = HD / 16;  // 16-column blocks of a head vector
  static constexpr size_t tile = static_cast<size_t>(kTile) * LD;
  static constexpr size_t scores = static_cast<size_t>(kTile) * kLdS;
  // forward: Q K V O tiles + S + (corr, l, start) per row
  static constexpr size_t forwardBytes = (4 * tile + scores + 3 * kTile) * 4;
  // backward: four tiles + two score tiles + (start, lse, D) per row
  static constexpr size_t backwardBytes = (4 * tile + 2 * scores + 3 * kTile) * 4;
};

template <class F>
__device__ __forceinline__ void toTf32(F& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}
template <int NB>
__device__ __forceinline__ void zero(FragC (&c)[NB]) {
#pragma unroll
  for (int n = 0; n < NB; ++n) wmma::fill_fragment(c[n], 0.f);
}

// acc[n] += A[16, K] · op(B)[0..K, 16n..16n+16) — A row-major in shared memory (lda floats); kTransB:
// B row-major [16·NB][K] used as Bᵀ (a col_major fragment, element (k', n') = B[16n + n'][k + k']),
// else B row-major [K][16·NB] (element (k', n') = B[k + k'][16n + n']).
template <int K, int NB, bool kTransB>
__device__ __forceinline__ void mmaTf32(FragC (&acc)[NB], const float* A, int lda, const float* B, int ldb) {
#pragma unroll
  for (int k = 0; k < K; k += 8) {
    FragA a;
    wmma::load_matrix_sync(a, A + k, lda);
    toTf32(a);
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      std::conditional_t<kTransB, FragBt, FragB> b;
      wmma::load_matrix_sync(b, kTransB ? B + n * 16 * ldb + k : B + k * ldb + n * 16, ldb);
      toTf32(b);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
}
template <int K, int NB>
__device__ __forceinline__ void mmaABt(FragC (&acc)[NB], const float* A, int lda, const float* B, int ldb) {
  mmaTf32<K, NB, true>(acc, A, lda, B, ldb);  // A · Bᵀ (S = Q Kᵀ and the like)
}
template <int K, int NB>
__device__ __forceinline__ void mmaAB(FragC (&acc)[NB], const float* A, int lda, const float* B, int ldb) {
  mmaTf32<K, NB, false>(acc, A, lda, B, ldb);  // A · B (O += P V and the like)
}

template <int NB>
__device__ __forceinline__ void storeRows(float* dst, int ld, FragC (&c)[NB]) {
#pragma unroll
  for (int n = 0; n < NB; ++n) wmma::store_matrix_sync(dst + n * 16, c[n], ld, wmma::mem_row_major);
}

// dst[r][0..HD) = src[r·stride .. +HD) for r < nValid, zeros for nValid <= r < 64 (whole block).
// src and stride are 16-byte aligned (checked by supported()).
template <int HD>
__device__ __forceinline__ void loadTile(float* dst, const float* src, int64_t stride, int nValid) {
  constexpr int LD = Dims<HD>::LD, C4 = HD / 4;
  for (int idx = threadIdx.x; idx < kTile * C4; idx += kThreads) {
    const int r = idx / C4, c = (idx % C4) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < nValid) v = __ldg(reinterpret_cast<const float4*>(src + r * stride + c));
    *reinterpret_cast<float4*>(dst + r * LD + c) = v;
  }
}

// The warp's 16 rows of a [64][LD] shared tile → global rows dst + rr·stride for t0 + 16w + rr < T.
template <int HD>
__device__ __forceinline__ void writeRows(float* dst, int64_t stride, const float* tile, int warp, int nValid,
                                          const float* rowScale) {
  constexpr int LD = Dims<HD>::LD;
  const int lane = threadIdx.x & 31;
  for (int idx = lane; idx < 16 * HD; idx += 32) {
    const int r = warp * 16 + idx / HD, c = idx % HD;
    if (r < nValid) dst[r * stride + c] = tile[r * LD + c] * (rowScale ? rowScale[r] : 1.f);
  }
}

// The backward's per-query row data of a tile of nq queries from token q0 of head h: segment start
// (INT_MAX for padding rows: they see no key), lse and D (0 for padding).
__device__ __forceinline__ void loadQueryRows(const Args& a, int64_t q0, int nq, int h, int* start, float* lse,
                                              float* D) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const bool in = r < nq;
    const int64_t i = q0 + r;
    start[r] = in ? a.start[i] : INT_MAX;
    lse[r] = in ? a.lse[i * a.nh + h] : 0.f;
    D[r] = in ? a.D[i * a.nh + h] : 0.f;
  }
}

// ---- forward ---------------------------------------------------------------------------------------
// One block's tile: nq <= 64 consecutive queries of one head (query r at position p0 + r) over keys at
// positions jBegin..jEnd of one kv head; query r sees keys start[r]..p0 + r (start: nullptr = 0).
struct ForwardTile {
  const float* q;  // query 0, head h; rows qStride apart (out the same)
  float* out;
  int64_t qStride;
  const float* k;  // key position 0, kv head g; rows kStride apart (v the same)
  const float* v;
  int64_t kStride;
  int64_t jBegin, jEnd, p0;
  const int32_t* start;  // [nq] or nullptr
  float* lse;            // [nq] lseStride apart, or nullptr
  int64_t lseStride;
  int nq;
};

// The forward of one tile by the whole block.
template <int HD>
__device__ __forceinline__ void forwardTile(const ForwardTile& f, float scale) {
  using D = Dims<HD>;
  constexpr int LD = D::LD;
  extern __shared__ __align__(128) float smem[];
  float* Qs = smem;                // [64][LD] queries of the tile
  float* Ks = Qs + D::tile;        // [64][LD] keys of the step
  float* Vs = Ks + D::tile;        // [64][LD] values of the step
  float* Os = Vs + D::tile;        // [64][LD] unnormalised output (running)
  float* Ss = Os + D::tile;        // [64][kLdS] scores → probabilities
  float* rowC = Ss + D::scores;    // [64] this step's rescale factor
  float* rowInvL = rowC + kTile;   // [64] 1 / l at the end
  int* rowStart = reinterpret_cast<int*>(rowInvL + kTile);  // [64] first key of each query (INT_MAX: padding)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nq = f.nq;
  loadTile<HD>(Qs, f.q, f.qStride, nq);
  for (int i = threadIdx.x; i < kTile * LD; i += kThreads) Os[i] = 0.f;
  for (int r = threadIdx.x; r < kTile; r += kThreads) rowStart[r] = r < nq ? (f.start ? f.start[r] : 0) : INT_MAX;
  __syncthreads();

  // this lane's softmax row (local r) and half of the 64 columns (2c + half); m, l kept by both lanes
  const int r = warp * 16 + (lane >> 1), half = lane & 1;
  const int64_t tq = f.p0 + r;  // the query's position: its last visible key
  const int st = rowStart[r];
  float m = -INFINITY, l = 0.f;
  float* Sw = Ss + warp * 16 * kLdS;  // the warp's [16][64] scores
  float* Ow = Os + warp * 16 * LD;    // the warp's [16][HD] output rows
  float* sr = Ss + r * kLdS + half;  // columns 2c + half: the row's two lanes interleave (2-way bank conflicts)

  for (int64_t j0 = f.jBegin; j0 <= f.jEnd; j0 += kTile) {
    const int nk = static_cast<int>(f.jEnd - j0 + 1 < kTile ? f.jEnd - j0 + 1 : kTile);
    __syncthreads();  // every warp is done with the previous K, V
    loadTile<HD>(Ks, f.k + j0 * f.kStride, f.kStride, nk);
    loadTile<HD>(Vs, f.v + j0 * f.kStride, f.kStride, nk);
    __syncthreads();
    {  // S_w [16, 64] = Q_w [16, HD] · Kᵀ
      FragC s[kTile / 16];
      zero(s);
      mmaABt<HD, kTile / 16>(s, Qs + warp * 16 * LD, LD, Ks, LD);
      storeRows(Sw, kLdS, s);
    }
    __syncwarp();
    // online softmax: key j = j0 + 2c + half is visible to the query iff st <= j <= tq
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + 2 * c + half;
      const float x = (j >= st && j <= tq) ? sr[2 * c] * scale : -INFINITY;
      sr[2 * c] = x;
      mx = fmaxf(mx, x);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mNew = fmaxf(m, mx);
    float sum = 0.f, corr = 1.f;
    if (mNew != -INFINITY) {  // else no key seen yet: p = 0, nothing to rescale
      corr = expf(m - mNew);  // m = -inf → 0
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const float p = expf(sr[2 * c] - mNew);  // masked: exp(-inf) = 0
        sr[2 * c] = p;
        sum += p;
      }
    } else {
      for (int c = 0; c < 32; ++c) sr[2 * c] = 0.f;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * corr + sum;
    m = mNew;
    if (half == 0) rowC[r] = corr;
    __syncwarp();
    for (int idx = lane; idx < 16 * HD; idx += 32) Ow[(idx / HD) * LD + idx % HD] *= rowC[warp * 16 + idx / HD];
    __syncwarp();
    {  // O_w [16, HD] += P_w [16, 64] · V [64, HD]
      FragC o[D::NO];
#pragma unroll
      for (int n = 0; n < D::NO; ++n) wmma::load_matrix_sync(o[n], Ow + n * 16, LD, wmma::mem_row_major);
      mmaAB<kTile, D::NO>(o, Sw, kLdS, Vs, LD);
      storeRows(Ow, LD, o);
    }
  }
  // every real query saw itself, so l > 0; padding rows (l = 0) are never written
  if (half == 0) {
    rowInvL[r] = l > 0.f ? 1.f / l : 0.f;
    if (f.lse && r < nq) f.lse[r * f.lseStride] = m + logf(l);
  }
  __syncwarp();
  writeRows<HD>(f.out, f.qStride, Os, warp, nq, rowInvL);
}

// Training: grid (query tiles, nh, B), heaviest (last) tiles first. out [N, nh·HD], lse [N, nh].
template <int HD>
__global__ void __launch_bounds__(kThreads) flashForwardKernel(Args a) {
  const int64_t T = a.T, t0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kTile;
  const int h = blockIdx.y, g = h / (a.nh / a.nkv);
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * T;  // token index of position 0 of this row
  const int64_t qw = static_cast<int64_t>(a.nh) * HD, kw = static_cast<int64_t>(a.nkv) * HD;
  ForwardTile f;
  f.nq = static_cast<int>(T - t0 < kTile ? T - t0 : kTile);
  f.q = a.q + (row0 + t0) * qw + h * HD;
  f.out = a.out + (row0 + t0) * qw + h * HD;
  f.qStride = qw;
  f.k = a.k + row0 * kw + g * HD;
  f.v = a.v + row0 * kw + g * HD;
  f.kStride = kw;
  f.start = a.start + row0 + t0;
  f.jBegin = f.start[0];  // starts never decrease along a row: the tile's first query reaches furthest back
  f.jEnd = t0 + f.nq - 1;
  f.p0 = t0;
  f.lse = a.lse + (row0 + t0) * a.nh + h;
  f.lseStride = a.nh;
  forwardTile<HD>(f, a.scale);
}

// Prefill over KV caches: grid (tiles, nh); tile i = packed tokens tok0[i].. (nq[i] of them) at
// positions pos0[i].. of the sequence whose cache starts at element kvOff[i]; keys 0..position.
template <int HD>
__global__ void __launch_bounds__(kThreads) flashPrefillKernel(CacheArgs a) {
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, g = h / (a.nh / a.nkv);
  const int64_t qw = static_cast<int64_t>(a.nh) * HD, kw = static_cast<int64_t>(a.nkv) * HD;
  const int64_t tok0 = a.tiles.tok0[i], pos0 = a.tiles.pos0[i], kv = a.tiles.kvOff[i];
  ForwardTile f;
  f.nq = a.tiles.nq[i];
  f.q = a.q + tok0 * qw + h * HD;
  f.out = a.out + tok0 * qw + h * HD;
  f.qStride = qw;
  f.k = a.kCache + kv + g * HD;
  f.v = a.vCache + kv + g * HD;
  f.kStride = kw;
  f.start = nullptr;
  f.jBegin = 0;
  f.jEnd = pos0 + f.nq - 1;
  f.p0 = pos0;
  f.lse = nullptr;
  f.lseStride = 0;
  forwardTile<HD>(f, a.scale);
}

// ---- backward: dQ ------------------------------------------------------------------------------------
// grid (query tiles, nh, B), heaviest first. dq [N, nh·HD] overwritten.
template <int HD>
__global__ void __launch_bounds__(kThreads) flashDqKernel(Args a) {
  using D = Dims<HD>;
  constexpr int LD = D::LD;
  extern __shared__ __align__(128) float smem[];
  float* Qs = smem;                 // [64][LD] queries; at the end the staging of dQ
  float* Gs = Qs + D::tile;         // [64][LD] dout of the queries
  float* Ks = Gs + D::tile;         // [64][LD]
  float* Vs = Ks + D::tile;         // [64][LD]
  float* Ss = Vs + D::tile;         // [64][kLdS] S → dS
  float* Ps = Ss + D::scores;       // [64][kLdS] dP
  float* rowLse = Ps + D::scores;   // [64]
  float* rowD = rowLse + kTile;     // [64] D = dout·out
  int* rowStart = reinterpret_cast<int*>(rowD + kTile);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t T = a.T, t0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kTile;
  const int h = blockIdx.y, g = h / (a.nh / a.nkv);
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * T;
  const int nq = static_cast<int>(T - t0 < kTile ? T - t0 : kTile);
  const int64_t qw = static_cast<int64_t>(a.nh) * HD, kw = static_cast<int64_t>(a.nkv) * HD;

  loadTile<HD>(Qs, a.q + (row0 + t0) * qw + h * HD, qw, nq);
  loadTile<HD>(Gs, a.dout + (row0 + t0) * qw + h * HD, qw, nq);
  loadQueryRows(a, row0 + t0, nq, h, rowStart, rowLse, rowD);
  __syncthreads();

  const int r = warp * 16 + (lane >> 1), half = lane & 1;
  const int64_t tq = t0 + r;
  const int st = rowStart[r];
  const float lseR = rowLse[r], dR = rowD[r];
  float* Sw = Ss + warp * 16 * kLdS;
  float* Pw = Ps + warp * 16 * kLdS;
  float* sr = Ss + r * kLdS + half;  // columns 2c + half
  const float* pr = Ps + r * kLdS + half;
  FragC dq[D::NO];
  zero(dq);

  const int64_t jBegin = rowStart[0], jEnd = t0 + nq - 1;
  for (int64_t j0 = jBegin; j0 <= jEnd; j0 += kTile) {
    const int nk = static_cast<int>(jEnd - j0 + 1 < kTile ? jEnd - j0 + 1 : kTile);
    __syncthreads();
    loadTile<HD>(Ks, a.k + (row0 + j0) * kw + g * HD, kw, nk);
    loadTile<HD>(Vs, a.v + (row0 + j0) * kw + g * HD, kw, nk);
    __syncthreads();
    {
      FragC s[kTile / 16];
      zero(s);
      mmaABt<HD, kTile / 16>(s, Qs + warp * 16 * LD, LD, Ks, LD);  // S_w = Q_w Kᵀ
      storeRows(Sw, kLdS, s);
      zero(s);
      mmaABt<HD, kTile / 16>(s, Gs + warp * 16 * LD, LD, Vs, LD);  // dP_w = dO_w Vᵀ
      storeRows(Pw, kLdS, s);
    }
    __syncwarp();
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + 2 * c + half;
      const float p = (j >= st && j <= tq) ? expf(a.scale * sr[2 * c] - lseR) : 0.f;
      sr[2 * c] = p * (pr[2 * c] - dR) * a.scale;  // dS
    }
    __syncwarp();
    mmaAB<kTile, D::NO>(dq, Sw, kLdS, Ks, LD);  // dQ_w += dS_w K
  }
  // the warp's own Q rows are free now: stage dQ there
  __syncwarp();
  storeRows(Qs + warp * 16 * LD, LD, dq);
  __syncwarp();
  writeRows<HD>(a.dq + (row0 + t0) * qw + h * HD, qw, Qs, warp, nq, nullptr);
}

// ---- backward: dK, dV --------------------------------------------------------------------------------
// grid (key tiles, nkv, B), tile 0 (the most queries) first. dk, dv [N, nkv·HD] overwritten.
template <int HD>
__global__ void __launch_bounds__(kThreads) flashDkDvKernel(Args a) {
  using D = Dims<HD>;
  constexpr int LD = D::LD;
  extern __shared__ __align__(128) float smem[];
  float* Ks = smem;                 // [64][LD] the block's keys; at the end the staging of dK
  float* Vs = Ks + D::tile;         // [64][LD] the block's values; at the end the staging of dV
  float* Qs = Vs + D::tile;         // [64][LD] queries of the step
  float* Gs = Qs + D::tile;         // [64][LD] their dout
  float* PTs = Gs + D::tile;        // [64 keys][kLdS] Sᵀ → Pᵀ
  float* DTs = PTs + D::scores;     // [64 keys][kLdS] dPᵀ → dSᵀ
  float* qLse = DTs + D::scores;    // [64]
  float* qD = qLse + kTile;         // [64]
  int* qStart = reinterpret_cast<int*>(qD + kTile);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t T = a.T, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int g = blockIdx.y, group = a.nh / a.nkv;
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * T;
  const int nk = static_cast<int>(T - j0 < kTile ? T - j0 : kTile);
  const int64_t qw = static_cast<int64_t>(a.nh) * HD, kw = static_cast<int64_t>(a.nkv) * HD;

  loadTile<HD>(Ks, a.k + (row0 + j0) * kw + g * HD, kw, nk);
  loadTile<HD>(Vs, a.v + (row0 + j0) * kw + g * HD, kw, nk);
  __syncthreads();  // (the loop's barrier would do when it runs; this one holds whatever start[] says)

  const int kr = warp * 16 + (lane >> 1), half = lane & 1;  // this lane's key row (local) and column half
  const int64_t j = j0 + kr;
  float* Pw = PTs + warp * 16 * kLdS;
  float* Dw = DTs + warp * 16 * kLdS;
  float* pr = PTs + kr * kLdS + half;  // columns 2c + half
  float* dr = DTs + kr * kLdS + half;
  FragC dk[D::NO], dv[D::NO];
  zero(dk);
  zero(dv);

  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t t0 = j0; t0 < T; t0 += kTile) {
      // queries from t0 on start at or after start[t0]: past this tile's last key, none sees it
      if (a.start[row0 + t0] > j0 + nk - 1) break;
      const int nq = static_cast<int>(T - t0 < kTile ? T - t0 : kTile);
      __syncthreads();  // every warp is done with the previous Q, dO (and, first time, Ks/Vs are loaded)
      loadTile<HD>(Qs, a.q + (row0 + t0) * qw + h * HD, qw, nq);
      loadTile<HD>(Gs, a.dout + (row0 + t0) * qw + h * HD, qw, nq);
      loadQueryRows(a, row0 + t0, nq, h, qStart, qLse, qD);
      __syncthreads();
      {
        FragC s[kTile / 16];
        zero(s);
        mmaABt<HD, kTile / 16>(s, Ks + warp * 16 * LD, LD, Qs, LD);  // Sᵀ_w = K_w Qᵀ
        storeRows(Pw, kLdS, s);
        zero(s);
        mmaABt<HD, kTile / 16>(s, Vs + warp * 16 * LD, LD, Gs, LD);  // dPᵀ_w = V_w dOᵀ
        storeRows(Dw, kLdS, s);
      }
      __syncwarp();
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const int col = 2 * c + half;  // query t0 + col sees key j iff qStart <= j <= t (padding: qStart = INT_MAX)
        const float p = (qStart[col] <= j && j <= t0 + col) ? expf(a.scale * pr[2 * c] - qLse[col]) : 0.f;
        pr[2 * c] = p;
        dr[2 * c] = p * (dr[2 * c] - qD[col]) * a.scale;
      }
      __syncwarp();
      mmaAB<kTile, D::NO>(dv, Pw, kLdS, Gs, LD);  // dV_w += Pᵀ_w dO
      mmaAB<kTile, D::NO>(dk, Dw, kLdS, Qs, LD);  // dK_w += dSᵀ_w Q
    }
  }
  // each warp's own K, V rows are read only by that warp: stage dK, dV there
  __syncwarp();
  storeRows(Ks + warp * 16 * LD, LD, dk);
  storeRows(Vs + warp * 16 * LD, LD, dv);
  __syncwarp();
  writeRows<HD>(a.dk + (row0 + j0) * kw + g * HD, kw, Ks, warp, nk, nullptr);
  writeRows<HD>(a.dv + (row0 + j0) * kw + g * HD, kw, Vs, warp, nk, nullptr);
}

// ---- dispatch ----------------------------------------------------------------------------------------
// Per process, not per device: the engine uses one device (a second would need its own opt-in).
int maxSharedOptin() {
  static std::once_flag once;
  static int bytes = 0;
  std::call_once(once, [] {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      bytes = 0;
    cudaGetLastError();
  });
  return bytes;
}

// Opts a kernel into its dynamic shared memory once (above the 48 KB default).
template <class K>
void allowShared(K kernel, size_t bytes, std::once_flag& once) {
  std::call_once(once, [&] {
    QK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  });
}

template <int HD>
void launchForward(const Args& a, int64_t B, cudaStream_t st) {
  static std::once_flag once;
  allowShared(flashForwardKernel<HD>, Dims<HD>::forwardBytes, once);
  const dim3 grid(static_cast<unsigned>((a.T + kTile - 1) / kTile), static_cast<unsigned>(a.nh), static_cast<unsigned>(B));
  flashForwardKernel<HD><<<grid, kThreads, Dims<HD>::forwardBytes, st>>>(a);
  QK_CUDA_LAUNCHED();
}

template <int HD>
void launchPrefill(const CacheArgs& a, cudaStream_t st) {
  static std::once_flag once;
  allowShared(flashPrefillKernel<HD>, Dims<HD>::forwardBytes, once);
  const dim3 grid(static_cast<unsigned>(a.tiles.count), static_cast<unsigned>(a.nh));
  flashPrefillKernel<HD><<<grid, kThreads, Dims<HD>::forwardBytes, st>>>(a);
  QK_CUDA_LAUNCHED();
}

template <int HD>
void launchBackward(const Args& a, int64_t B, cudaStream_t st) {
  static std::once_flag onceDq, onceDkDv;
  allowShared(flashDqKernel<HD>, Dims<HD>::backwardBytes, onceDq);
  allowShared(flashDkDvKernel<HD>, Dims<HD>::backwardBytes, onceDkDv);
  const unsigned tiles = static_cast<unsigned>((a.T + kTile - 1) / kTile);
  flashDqKernel<HD><<<dim3(tiles, static_cast<unsigned>(a.nh), static_cast<unsigned>(B)), kThreads,
                      Dims<HD>::backwardBytes, st>>>(a);
  QK_CUDA_LAUNCHED();
  flashDkDvKernel<HD><<<dim3(tiles, static_cast<unsigned>(a.nkv), static_cast<unsigned>(B)), kThreads,
                        Dims<HD>::backwardBytes, st>>>(a);
  QK_CUDA_LAUNCHED();
}

// Calls f(std::integral_constant<int, HD>) for the head dimensions the kernels are instantiated for;
// false for any other.
template <class F>
bool byHeadDim(int hd, F&& f) {
  switch (hd) {
    case 32: f(std::integral_constant<int, 32>{}); return true;
    case 64: f(std::integral_constant<int, 64>{}); return true;
    case 128: f(std::integral_constant<int, 128>{}); return true;
    default: return false;
  }
}

size_t sharedBytes(int hd, bool backward) {
  size_t bytes = 0;
  byHeadDim(hd, [&](auto d) { bytes = backward ? Dims<d.value>::backwardBytes : Dims<d.value>::forwardBytes; });
  return bytes;
}

}  // namespace

const char* unsupportedReason(const AttentionShape& s, int64_t B, int64_t T, bool backward,
                              std::initializer_list<const void*> ptrs) {
  const size_t bytes = sharedBytes(s.headDim, backward);
  if (bytes == 0) return "the flash attention kernels take headDim 32, 64 or 128";
  if (B > 65535) return "the flash attention kernels take at most 65535 rows per batch";
  if (s.nHeads > 65535) return "the flash attention kernels take at most 65535 heads";
  if ((T + kTile - 1) / kTile > 0x7fffffffLL) return "sequence too long for the flash attention grid";
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return "the flash attention kernels need 16-byte aligned buffers";
  if (static_cast<size_t>(maxSharedOptin()) < bytes)
    return "this GPU has too little shared memory per block for the flash attention kernels at this headDim";
  return nullptr;
}

void trainForward(const Args& a, int64_t B, Stream stream) {
  checkArg(byHeadDim(a.hd, [&](auto d) { launchForward<d.value>(a, B, cs(stream)); }),
           "flash attention: headDim must be 32, 64 or 128");
}

void prefill(const CacheArgs& a, Stream stream) {
  if (a.tiles.count <= 0) return;
  checkArg(a.tiles.count <= 0x7fffffffLL, "flash attention: too many prefill tiles");
  checkArg(byHeadDim(a.hd, [&](auto d) { launchPrefill<d.value>(a, cs(stream)); }),
           "flash attention: headDim must be 32, 64 or 128");
}

void trainBackward(const Args& a, int64_t B, Stream stream) {
  checkArg(byHeadDim(a.hd, [&](auto d) { launchBackward<d.value>(a, B, cs(stream)); }),
           "flash attention: headDim must be 32, 64 or 128");
}

}  // namespace qk::cuda::flash
