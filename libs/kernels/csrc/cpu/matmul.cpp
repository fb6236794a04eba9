// linearForward / linearBackwardInput / gemmF32 (API and semantics in matmul.h; tiling in docs/kernels.md).
//
// Three implementations, picked by qk::simdLevel():
//   scalar   the reference: decode a row/segment of W, plain loops (no FMA) — what tests trust.
//   AVX2     M <= 8: one pass over W per call, NF4 decoded in registers (vpermps on the two table
//            halves), M accumulators; M > 8: packed GEMM, micro-kernel 6x16 (12 ymm accumulators).
//   AVX-512  same structure, 16-wide decode (one vpermps on the whole table), micro-kernel 8x32.
// linearForwardInt8 (M <= 8, NF4): int8 activations and an int8 codebook, exact int32 block dots
// (scalar reference + AVX2 vpshufb / vpmaddubsw / vpmaddwd; AVX-512 CPUs run the AVX2 kernel).
#include "cpu/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/nf4.h"
#include "cpu/nf4_common.h"
#include "cpu/nf4_simd.h"
#include "cpu/thread_pool.h"

namespace qk {

using namespace nf4detail;

namespace {

// Per-thread scratch (pool workers and the caller each get their own). Slots: 0 row / panel decode,
// 1 packed A, 2 decode staging, 3 the caller's permuted x, 4 resolved NF4 block scales.
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> buf[5];
  if (buf[slot].size() < floats) buf[slot].resize(floats + 64);
  return buf[slot].data();
}

size_t elemSize(WType t) { return t == WType::F32 ? 4 : 2; }

void checkWeight(const WeightView& w) {
  if (w.rows < 0 || w.cols < 0) throw std::invalid_argument("weight shape must be non-negative");
  if (w.type == WType::NF4 && !nf4ValidBlocksize(w.blocksize))
    throw std::invalid_argument("NF4 weight blocksize must be a power of two in 32..4096");
  if (w.type == WType::NF4 && w.absmax == nullptr &&
      (!w.absmaxDq.present() || w.absmaxDq.nestedAbsmax == nullptr || w.absmaxDq.quantMap == nullptr ||
       w.absmaxDq.nestedBlocksize <= 0))
    throw std::invalid_argument("NF4 weight needs absmax or a complete double-quantized absmax");
}

// ---------------------------------------------------------------------------------------------
// Decoding a span of the flat index into floats

void decodeScalar(const WeightView& w, int64_t start, int64_t len, float* out) {
  const auto* d = static_cast<const uint8_t*>(w.data);
  switch (w.type) {
    case WType::F32: std::memcpy(out, d + 4 * start, 4 * len); break;
    case WType::F16:
      for (int64_t k = 0; k < len; ++k) out[k] = halfToFloat(loadU16(d + 2 * (start + k)));
      break;
    case WType::BF16:
      for (int64_t k = 0; k < len; ++k) out[k] = bf16ToFloat(loadU16(d + 2 * (start + k)));
      break;
    case WType::NF4: nf4DequantizeRangeScaled(d, w.absmax, w.absmaxDq, w.blocksize, start, len, out); break;
  }
}

template <FloatType T>
QK_AVX2 void convertAvx2(const uint8_t* d, int64_t start, int64_t len, float* out) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) _mm256_storeu_ps(out + k, load8<T>(d, start + k));
  for (; k < len; ++k) out[k] = elemAt<T>(d, start + k);
}

void decodeSimd(const WeightView& w, int64_t start, int64_t len, float* out) {
  const auto* d = static_cast<const uint8_t*>(w.data);
  if (w.type == WType::F16) return convertAvx2<FloatType::F16>(d, start, len, out);
  if (w.type == WType::BF16) return convertAvx2<FloatType::BF16>(d, start, len, out);
  decodeScalar(w, start, len, out);  // f32: memcpy; NF4: nf4DequantizeRange(Scaled) dispatches by level itself
}

inline void decode(SimdLevel lvl, const WeightView& w, int64_t start, int64_t len, float* out) {
  if (lvl == SimdLevel::Scalar) decodeScalar(w, start, len, out);
  else decodeSimd(w, start, len, out);
}

// Output epilogue shared by every path: y = (accumulate ? y : 0) + dot (+ bias).
inline float finish(float prev, bool accumulate, float dot, const float* bias, int64_t n) {
  float v = accumulate ? prev + dot : dot;
  return bias ? v + bias[n] : v;
}

// ---------------------------------------------------------------------------------------------
// Scalar reference

void forwardScalar(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate) {
  const int64_t N = w.rows, K = w.cols;
  parallelFor(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1, int) {
    float* row = scratch(0, K);
    for (int64_t n = n0; n < n1; ++n) {
      decodeScalar(w, n * K, K, row);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += xm[k] * row[k];
        y[m * N + n] = finish(y[m * N + n], accumulate, s, bias, n);
      }
    }
  });
}

void backwardScalar(const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate) {
  const int64_t N = w.rows, K = w.cols, CH = 256;
  parallelFor((K + CH - 1) / CH, 1, [&](int64_t c0, int64_t c1, int) {
    float* seg = scratch(0, CH);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * CH, kl = std::min(CH, K - k0);
      if (!accumulate)
        for (int64_t m = 0; m < M; ++m) std::fill(dx + m * K + k0, dx + m * K + k0 + kl, 0.0f);
      for (int64_t n = 0; n < N; ++n) {
        decodeScalar(w, n * K + k0, kl, seg);
        for (int64_t m = 0; m < M; ++m) {
          const float g = dy[m * N + n];
          float* d = dx + m * K + k0;
          for (int64_t k = 0; k < kl; ++k) d[k] += g * seg[k];
        }
      }
    }
  });
}

void gemmScalar(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  parallelFor(M, std::max<int64_t>(1, 8192 / std::max<int64_t>(N * K, 1)), [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < N; ++j) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += (tA ? A[k * lda + i] : A[i * lda + k]) * (tB ? B[j * ldb + k] : B[k * ldb + j]);
        float& c = C[i * ldc + j];
        c = beta == 0.0f ? alpha * s : alpha * s + beta * c;
      }
  });
}

// ---------------------------------------------------------------------------------------------
// M <= 8 forward: each thread streams its rows of W once; every decoded weight vector is used by all
// M rows of x (held in L1/L2). ACC independent accumulators per row of x hide the FMA latency.

QK_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int M>
constexpr int accPerRow() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

// Where the AVX2 NF4 row kernels get the scale of a row's block b (b counted from the row start).
// Fp32Scales: the fp32 absmax (or scales resolved into a buffer). DqRowScales: resolved in the
// kernel's per-block epilogue from the double-quantized form (dqBlockScale: the exact value
// nf4DoubleQuantAbsmaxRange gives). Measured on the 2048x8192 bs-64 GEMV, single thread, CPU time
// (bench/matmul.bench.mjs has the dq rows): resolving a whole row into a buffer first (AVX2 gather)
// cost +12 % (exact M = 1) / +30 % (int8 M = 1); resolving 8 blocks at a time inside the kernel
// (gather or scalar copies, then a vector mul + add, memory broadcasts) +27 % / +70 % (store
// forwarding and gather latency on the critical path); this scalar mul + add + broadcast per block
// +6 % / +15 %, less for M > 1 (three more ops per block on the vector pipes the decode saturates).
struct Fp32Scales {
  const float* am;
  float operator[](int64_t b) const { return am[b]; }
};
struct DqRowScales {
  const uint8_t* codes;   // the row's first block's code
  const float* map;
  const float* nested;
  float offset;
  int64_t first;          // stored block index of the row's first block
  int shift;              // log2(nestedBlocksize)
  float operator[](int64_t b) const { return dqBlockScale(map[codes[b]], nested[(first + b) >> shift], offset); }
};
// The in-kernel form needs a power-of-two nested blocksize (bitsandbytes: 256); others use a buffer.
inline int nestedShift(const Nf4DoubleQuantAbsmax& dq) {
  const int n = dq.nestedBlocksize;
  return n > 0 && (n & (n - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(n)) : -1;
}
inline DqRowScales dqRowScales(const Nf4DoubleQuantAbsmax& dq, int64_t rowBlock0, int shift) {
  const int64_t first = dq.firstBlock + rowBlock0;
  return {dq.codes + first, dq.quantMap, dq.nestedAbsmax, dq.offset, first, shift};
}

// The M <= 8 row kernels stream W once; a software prefetch this far ahead of the bytes being decoded
// (about half a row of a 8192-wide NF4 weight) keeps the stream ahead of the decode. Measured on the
// 2048x8192 NF4 GEMV, 1 thread, CPU time, 8 copies rotated (75 MB > L3): int8 path 19.5 → 24.5 G
// weights/s (1024 B: 22.4, 4096 B: 24.5); the hardware prefetcher alone leaves ~20% on the table.
constexpr int64_t kGemvPrefetchBytes = 2048;
inline void prefetchAhead(const void* at) {
  _mm_prefetch(static_cast<const char*>(at) + kGemvPrefetchBytes, _MM_HINT_T0);
}

// AVX2 NF4 GEMV (rows with K % blocksize == 0: each row starts on a block and a byte). 16 packed bytes (32 elements) are decoded without vpermps:
//   idx   = [low nibbles of bytes 0..15 | high nibbles of bytes 0..15]       (ymm, 32 x 4-bit)
//   P_b   = pshufb(byte plane b of the NF4 table, idx), b = 0..3             (byte b of each float)
//   F_v   = unpack{lo,hi}_epi16(unpack{lo,hi}_epi8(P0,P1), ..(P2,P3))       (4 x 8 floats)
// The unpacks leave the elements in a fixed shuffled order, so x is permuted once per call into the
// same order (permuteXNf4Avx2) instead of unshuffling every weight vector:
//   F_v lane 0 = elements 2(4v+j)+1, lane 1 = elements 2(4v+j), j = 0..3   (v = 0..3)
struct Nf4BytePlanes {
  alignas(32) uint8_t p[4][32];  // each plane twice (both 128-bit lanes)
  Nf4BytePlanes() {
    for (int c = 0; c < 16; ++c) {
      uint32_t u = floatToBits(kCode[c]);
      for (int b = 0; b < 4; ++b) p[b][c] = p[b][c + 16] = static_cast<uint8_t>(u >> (8 * b));
    }
  }
};
const Nf4BytePlanes& nf4Planes() {
  static const Nf4BytePlanes planes;
  return planes;
}

// xp[g*32 + 8v + j] = x[g*32 + 2(4v+j) + 1], xp[g*32 + 8v + 4 + j] = x[g*32 + 2(4v+j)]  (K % 32 == 0)
void permuteXNf4Avx2(const float* x, int64_t M, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K; g += 32)
      for (int v = 0; v < 4; ++v)
        for (int j = 0; j < 4; ++j) {
          xp[m * K + g + 8 * v + j] = x[m * K + g + 2 * (4 * v + j) + 1];
          xp[m * K + g + 8 * v + 4 + j] = x[m * K + g + 2 * (4 * v + j)];
        }
}

struct Nf4Group {
  __m256 f[4];
};
QK_AVX2 inline Nf4Group decode32Planes(const uint8_t* p, __m256i t0, __m256i t1, __m256i t2, __m256i t3) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0f));
  const __m256i p0 = _mm256_shuffle_epi8(t0, idx), p1 = _mm256_shuffle_epi8(t1, idx);
  const __m256i p2 = _mm256_shuffle_epi8(t2, idx), p3 = _mm256_shuffle_epi8(t3, idx);
  const __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
  const __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
  Nf4Group g;
  g.f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  g.f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  g.f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  g.f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  return g;
}

// One NF4 row (K % blocksize == 0) against M rows of the permuted x.
// M == 1: code values are accumulated per block (4 chains) and scaled by absmax once per block;
// M > 1: each decoded vector is scaled (exactly the dequantized weights) and shared by the M rows.
template <int M, class Scales>
QK_AVX2 void rowDotNf4PlanesAvx2(const uint8_t* p, Scales am, int64_t K, int bs, const float* xp, int64_t ldx,
                                 float* res) {
  const Nf4BytePlanes& pl = nf4Planes();
  const __m256i t0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pl.p[0]));
  const __m256i t1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pl.p[1]));
  const __m256i t2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pl.p[2]));
  const __m256i t3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pl.p[3]));
  if constexpr (M == 1) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
      for (int64_t k = k0; k < k0 + bs; k += 32) {
        prefetchAhead(p + (k >> 1));
        const Nf4Group g = decode32Planes(p + (k >> 1), t0, t1, t2, t3);
        s0 = _mm256_fmadd_ps(g.f[0], _mm256_loadu_ps(xp + k), s0);
        s1 = _mm256_fmadd_ps(g.f[1], _mm256_loadu_ps(xp + k + 8), s1);
        s2 = _mm256_fmadd_ps(g.f[2], _mm256_loadu_ps(xp + k + 16), s2);
        s3 = _mm256_fmadd_ps(g.f[3], _mm256_loadu_ps(xp + k + 24), s3);
      }
      acc = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)), _mm256_set1_ps(am[b]), acc);
    }
    res[0] = hsum8(acc);
  } else {
    constexpr int A = M <= 4 ? 2 : 1;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < A; ++u) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
      const __m256 va = _mm256_set1_ps(am[b]);
      for (int64_t k = k0; k < k0 + bs; k += 32) {
        prefetchAhead(p + (k >> 1));
        const Nf4Group g = decode32Planes(p + (k >> 1), t0, t1, t2, t3);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256 wv = _mm256_mul_ps(g.f[v], va);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m)
            acc[m][v % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + m * ldx + k + 8 * v), acc[m][v % A]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = acc[m][0];
      for (int u = 1; u < A; ++u) s = _mm256_add_ps(s, acc[m][u]);
      res[m] = hsum8(s);
    }
  }
}

// Dense row (f32 / f16 / bf16 raw bytes, element offset `start`), any K.
template <int M, FloatType T>
QK_AVX2 void rowDotDenseAvx2(const uint8_t* d, int64_t start, int64_t K, const float* x, int64_t ldx, float* res) {
  constexpr int A = accPerRow<M>();
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < A; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  constexpr int64_t es = T == FloatType::F32 ? 4 : 2;  // bytes per element
  for (; k + 8 * A <= K; k += 8 * A) {
    prefetchAhead(d + es * (start + k));
#pragma GCC unroll 4
    for (int u = 0; u < A; ++u) {
      const __m256 wv = load8<T>(d, start + k + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8<T>(d, start + k);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m256 s = acc[m][0];
    for (int u = 1; u < A; ++u) s = _mm256_add_ps(s, acc[m][u]);
    float t = hsum8(s);
    for (int64_t kk = k; kk < K; ++kk) {
      t += elemAt<T>(d, start + kk) * x[m * ldx + kk];
    }
    res[m] = t;
  }
}

QK_AVX512 inline float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int M>
QK_AVX512 void rowDotNf4Avx512(const uint8_t* p, const float* am, int64_t K, int bs, const float* x, int64_t ldx,
                               float* res) {
  constexpr int A = accPerRow<M>() > 2 ? 2 : accPerRow<M>();  // 16-wide: 32 elements per step is enough
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < A; ++u) acc[m][u] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(kCode);
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(am[b]));
    for (int64_t k = k0; k < k0 + bs; k += 16 * A) {
#pragma GCC unroll 2
      for (int u = 0; u < A; ++u) {
        const __m512 wv = decode16(p + ((k + 16 * u) >> 1), t);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k + 16 * u), acc[m][u]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 s = acc[m][0];
    for (int u = 1; u < A; ++u) s = _mm512_add_ps(s, acc[m][u]);
    res[m] = hsum16(s);
  }
}

template <int M, FloatType T>
QK_AVX512 void rowDotDenseAvx512(const uint8_t* d, int64_t start, int64_t K, const float* x, int64_t ldx, float* res) {
  constexpr int A = accPerRow<M>() > 2 ? 2 : accPerRow<M>();
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < A; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * A <= K; k += 16 * A) {
#pragma GCC unroll 2
    for (int u = 0; u < A; ++u) {
      const __m512 wv = load16<T>(d, start + k + 16 * u);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k + 16 * u), acc[m][u]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = load16<T>(d, start + k);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 s = acc[m][0];
    for (int u = 1; u < A; ++u) s = _mm512_add_ps(s, acc[m][u]);
    float t = hsum16(s);
    for (int64_t kk = k; kk < K; ++kk) {
      t += elemAt<T>(d, start + kk) * x[m * ldx + kk];
    }
    res[m] = t;
  }
}

template <int M>
void forwardSmallM(SimdLevel lvl, const float* x, const WeightView& w, const float* bias, float* y, bool accumulate) {
  const int64_t N = w.rows, K = w.cols;
  const auto* d = static_cast<const uint8_t*>(w.data);
  const bool avx512 = lvl == SimdLevel::Avx512;
  // NF4 in-register path needs every row to start on a block boundary (hence on a byte)
  const bool nf4Aligned = w.type == WType::NF4 && K % w.blocksize == 0;
  const int dqShift = w.type == WType::NF4 && w.absmax == nullptr ? nestedShift(w.absmaxDq) : -1;
  // AVX2: x permuted once into the order the byte-plane decoder produces (caller's scratch, read by all)
  const float* xp = nullptr;
  if (nf4Aligned && !avx512) {
    float* buf = scratch(3, static_cast<size_t>(M * K));
    permuteXNf4Avx2(x, M, K, buf);
    xp = buf;
  }
  parallelFor(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1, int) {
    float* row = (w.type == WType::NF4 && !nf4Aligned) ? scratch(0, K) : nullptr;
    float res[M];
    for (int64_t n = n0; n < n1; ++n) {
      switch (w.type) {
        case WType::NF4:
          if (nf4Aligned) {
            const uint8_t* p = d + (n * K) / 2;
            const int64_t nb = K / w.blocksize;
            if (!avx512 && w.absmax == nullptr && dqShift >= 0) {
              rowDotNf4PlanesAvx2<M>(p, dqRowScales(w.absmaxDq, n * nb, dqShift), K, w.blocksize, xp, K, res);
            } else {
              const float* am = nf4BlockScales(w.absmax, w.absmaxDq, n * nb, nb, scratch(4, static_cast<size_t>(nb)));
              if (avx512) rowDotNf4Avx512<M>(p, am, K, w.blocksize, x, K, res);
              else rowDotNf4PlanesAvx2<M>(p, Fp32Scales{am}, K, w.blocksize, xp, K, res);
            }
          } else {
            // odd K / K not a multiple of the blocksize: decode the row (any alignment), then a dense dot
            nf4DequantizeRangeScaled(d, w.absmax, w.absmaxDq, w.blocksize, n * K, K, row);
            const auto* rb = reinterpret_cast<const uint8_t*>(row);
            if (avx512) rowDotDenseAvx512<M, FloatType::F32>(rb, 0, K, x, K, res);
            else rowDotDenseAvx2<M, FloatType::F32>(rb, 0, K, x, K, res);
          }
          break;
        case WType::F32:
          if (avx512) rowDotDenseAvx512<M, FloatType::F32>(d, n * K, K, x, K, res);
          else rowDotDenseAvx2<M, FloatType::F32>(d, n * K, K, x, K, res);
          break;
        case WType::F16:
          if (avx512) rowDotDenseAvx512<M, FloatType::F16>(d, n * K, K, x, K, res);
          else rowDotDenseAvx2<M, FloatType::F16>(d, n * K, K, x, K, res);
          break;
        case WType::BF16:
          if (avx512) rowDotDenseAvx512<M, FloatType::BF16>(d, n * K, K, x, K, res);
          else rowDotDenseAvx2<M, FloatType::BF16>(d, n * K, K, x, K, res);
          break;
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = finish(y[m * N + n], accumulate, res[m], bias, n);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// M <= 8 forward with int8 activations (linearForwardInt8; docs/kernels.md §3). The exact path above
// is instruction bound on AVX2 (decoding NF4 to fp32 costs ~12 shuffles per 32 weights); here one
// pshufb turns 32 codes into int8 weights and two multiplies (vpmaddubsw, vpmaddwd) give int32
// partial dot products, so each 32 weights cost ~7 vector ops.
//
//   x (per call, per row m, per weight block b of `bs` elements along K):
//     amax = max |x|;  q[k] = round_even(x[k] · (127/amax)) in [-127, 127];  xf[m,b] = amax / 127²
//   W: code c -> kCodeInt8[c] = round(NF4[c]·127) (|error| <= 0.5/127 of absmax per weight)
//   y[m,n] = Σ_b float(Σ_{k in b} q[m,k]·kCodeInt8[code(n,k)]) · xf[m,b] · absmax[n,b]
// Every level computes the same int8 activations and the same exact int32 block dots; only the
// float summation of the per-block terms differs (AVX2 converts and scales 8 lane partials).

struct Int8Codebook {
  alignas(32) int8_t c[32];  // round(NF4[code]·127), twice (both 128-bit lanes, for vpshufb)
  Int8Codebook() {
    for (int i = 0; i < 16; ++i) c[i] = c[i + 16] = static_cast<int8_t>(std::nearbyint(kCode[i] * 127.0f));
  }
};
const Int8Codebook& int8Codebook() {
  static const Int8Codebook cb;
  return cb;
}

// A block whose largest |x| is below this is treated as zeros (127/amax would overflow for
// subnormal amax; such a block contributes < 1e-30·Σ|w| anyway).
constexpr float kInt8MinAmax = 1e-30f;

// x quantized once per call (in the caller's thread, before the parallel region), read by all threads.
struct Int8Activations {
  int64_t M = 0, K = 0, nb = 0;  // nb = blocks per row = K / bs
  int bs = 0;
  const int8_t* q = nullptr;     // scalar: [M][K] int8 values in element order
  // AVX2: [K/S][M][2·S bytes], S = kernel step (64 weights when bs >= 64, else 32): for each step,
  // each row's int8 values in the decoder's order then their magnitudes |q| (vpmaddubsw's unsigned
  // operand), see quantizeActivationsAvx2. Step-major so the M rows of a step are one contiguous
  // stream: row-major rows K bytes apart (K a multiple of 4 KiB) map to the same L1 sets and evict
  // each other (measured: M = 8 ran 7x slower).
  const int8_t* packed = nullptr;
  int step = 32;
  const float* xf = nullptr;     // [M][nb] amax / 127² (NaN when the block holds a NaN/inf), 0 for a zero block
};

// Per-block scale shared by both quantizers: sets *xf and returns the multiplier 127/amax (0: all q = 0).
inline float int8BlockScale(float amax, bool finite, float* xf) {
  if (!finite) {
    *xf = std::numeric_limits<float>::quiet_NaN();
    return 0.0f;
  }
  if (amax < kInt8MinAmax) {
    *xf = 0.0f;
    return 0.0f;
  }
  *xf = amax / 16129.0f;
  return 127.0f / amax;
}

// Reference quantizer (natural element order). nearbyint rounds half to even in the default
// rounding mode, as vcvtps2dq does.
void quantizeActivationsScalar(const float* x, int64_t M, int64_t K, int bs, int8_t* q, float* xf) {
  const int64_t nb = K / bs;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xs = x + m * K + b * bs;
      float amax = 0.0f;
      bool finite = true;
      for (int k = 0; k < bs; ++k) {
        const float v = std::fabs(xs[k]);
        if (!(v <= std::numeric_limits<float>::max())) finite = false;
        amax = std::max(amax, v);
      }
      const float mul = int8BlockScale(amax, finite, xf + m * nb + b);
      int8_t* qs = q + m * K + b * bs;
      for (int k = 0; k < bs; ++k) qs[k] = mul == 0.0f ? 0 : static_cast<int8_t>(std::nearbyint(xs[k] * mul));
    }
}

// AVX2 quantizer: the same values as the reference, stored in the order the AVX2 weight decoder
// produces (16 packed bytes hold 32 elements, byte j = elements 2j (high nibble), 2j+1 (low)):
//   step 32, per group g of 32:  [odd(g) | even(g)]              odd(g) = x[g+1], x[g+3], ..., x[g+31]
//   step 64, per groups g, g+32: [odd(g) | odd(g+32)], [even(g) | even(g+32)]   (low, high nibbles of 32 bytes)
// each 32-byte vector followed by its |q|, in the step-major layout of Int8Activations::packed.
QK_AVX2 void quantizeActivationsAvx2(const float* x, int64_t M, int64_t K, int bs, int step, int8_t* packed, float* xf) {
  const int64_t nb = K / bs;
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  // after packs_epi32 + packs_epi16 the dwords hold elements [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, ...]
  const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // per 128-bit lane: odd bytes to the low 8, even bytes to the high 8; then qwords (0, 2, 1, 3)
  const __m256i oddEven = _mm256_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14,  //
                                           1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xs = x + m * K + b * bs;
      __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int k = 0; k < bs; k += 8) {
        const __m256 v = _mm256_and_ps(_mm256_loadu_ps(xs + k), absMask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, fmax, _CMP_NLE_UQ));  // NaN or inf
        mx = _mm256_max_ps(mx, v);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float mul = int8BlockScale(_mm_cvtss_f32(m4), _mm256_movemask_ps(bad) == 0, xf + m * nb + b);
      const __m256 vm = _mm256_set1_ps(mul);
      __m256i prev = _mm256_setzero_si256();  // step 64: the first group of the pair
      for (int k = 0; k < bs; k += 32) {
        // mul == 0 (zero / non-finite block): every product is 0 or NaN; cvtps2dq turns NaN into
        // INT_MIN, so mask to 0 explicitly
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + k), vm));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + k + 8), vm));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + k + 16), vm));
        const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + k + 24), vm));
        __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        v = _mm256_permutevar8x32_epi32(v, natural);
        v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, oddEven), 0xd8);
        if (mul == 0.0f) v = _mm256_setzero_si256();
        if (step == 32) {
          int8_t* dst = packed + ((b * bs + k) / 32 * M + m) * 64;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_abs_epi8(v));
        } else if (k % 64 == 0) {
          prev = v;
        } else {
          int8_t* dst = packed + ((b * bs + k) / 64 * M + m) * 128;
          const __m256i lo = _mm256_permute2x128_si256(prev, v, 0x20), hi = _mm256_permute2x128_si256(prev, v, 0x31);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), lo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_abs_epi8(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64), hi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 96), _mm256_abs_epi8(hi));
        }
      }
    }
}

// Scalar reference: plain loops over the natural-order int8 activations.
void forwardInt8Scalar(const Int8Activations& xa, const WeightView& w, const float* bias, float* y, bool accumulate) {
  const int64_t N = w.rows, K = w.cols, M = xa.M, nb = xa.nb;
  const int bs = xa.bs;
  const auto* d = static_cast<const uint8_t*>(w.data);
  const int8_t* cb = int8Codebook().c;
  parallelFor(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1, int) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* p = d + (n * K) / 2;
      const float* am = nf4BlockScales(w.absmax, w.absmaxDq, n * nb, nb, scratch(4, static_cast<size_t>(nb)));
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* qm = xa.q + m * K;
        float s = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          int32_t dot = 0;
          for (int64_t k = b * bs; k < (b + 1) * bs; ++k) {
            const int code = k & 1 ? p[k >> 1] & 15 : p[k >> 1] >> 4;
            dot += static_cast<int32_t>(qm[k]) * cb[code];
          }
          s += static_cast<float>(dot) * xa.xf[m * nb + b] * am[b];
        }
        y[m * N + n] = finish(y[m * N + n], accumulate, s, bias, n);
      }
    }
  });
}

// AVX2 row kernel: one NF4 row (K % bs == 0) against M rows of quantized x. Per step of S weights:
//   S = 32: idx = [low nibbles | high nibbles] of 16 bytes (broadcast, vpsrlvd, and)
//   S = 64: idx = low nibbles of 32 bytes (and), high nibbles (vpsrlw, and): 3 ops for 64 weights
//   w8   = vpshufb(int8 codebook, idx)                     (one per 32 weights)
//   per row m, per 32: vpmaddubsw(|q|, sign(w8, q)) -> 16 x int16 (|.| <= 2·127² < 2^15, no
//              saturation), vpmaddwd(·, 1) -> 8 x int32 added to the block accumulator
// At the end of a block each lane partial is converted (exact: |partial| <= 4·(bs/32)·127² < 2^24)
// and scaled by xf[m,b]·absmax[b]. BS: the blocksize when known at compile time (64, bnb's default:
// one step per block, no inner loop, blocks unrolled by 2 — with a runtime blocksize the loop and
// epilogue bookkeeping is ~15 of ~32 instructions per block at M = 1; no speed-up was measurable
// on the shared dev machine), 0: xa.bs.
template <int M, int S, int BS, class Scales>
QK_AVX2 void rowDotNf4Int8Avx2(const uint8_t* p, Scales am, const Int8Activations& xa, float* res) {
  const int64_t nb = xa.nb;
  const int bs = BS ? BS : xa.bs;
  const __m256i cb = _mm256_load_si256(reinterpret_cast<const __m256i*>(int8Codebook().c));
  const __m256i shifts = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[M];
  for (int m = 0; m < M; ++m) facc[m] = _mm256_setzero_ps();
  __m256 fodd = _mm256_setzero_ps();  // M == 1: odd blocks accumulate here (two FMA chains)
  const int8_t* xg = xa.packed;       // the current step's M x 2S bytes
#pragma GCC unroll 2
  for (int64_t b = 0; b < nb; ++b) {
    __m256i iacc[M];
    for (int m = 0; m < M; ++m) iacc[m] = _mm256_setzero_si256();
    const int64_t k0 = b * bs;
    prefetchAhead(p + (k0 >> 1));
    for (int64_t k = k0; k < k0 + bs; k += S, xg += 2 * S * M) {
      __m256i w8[S / 32];
      if constexpr (S == 32) {
        const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (k >> 1))));
        w8[0] = _mm256_shuffle_epi8(cb, _mm256_and_si256(_mm256_srlv_epi32(raw, shifts), low4));
      } else {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (k >> 1)));
        w8[0] = _mm256_shuffle_epi8(cb, _mm256_and_si256(raw, low4));
        w8[1] = _mm256_shuffle_epi8(cb, _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4));
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
#pragma GCC unroll 2
        for (int h = 0; h < S / 32; ++h) {
          const int8_t* xm = xg + 2 * S * m + 64 * h;
          const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm));
          const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 32));
          const __m256i p16 = _mm256_maddubs_epi16(av, _mm256_sign_epi8(w8[h], qv));
          iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(p16, ones));
        }
      }
    }
    const __m256 vam = _mm256_set1_ps(am[b]);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_broadcast_ss(xa.xf + m * nb + b));
      facc[m] = _mm256_fmadd_ps(t, vam, facc[m]);
    }
    if constexpr (M == 1) std::swap(facc[0], fodd);
  }
  if constexpr (M == 1) facc[0] = _mm256_add_ps(facc[0], fodd);
  for (int m = 0; m < M; ++m) res[m] = hsum8(facc[m]);
}

template <int M, class Scales>
constexpr auto int8RowKernel(const Int8Activations& xa) {
  return xa.step == 32 ? rowDotNf4Int8Avx2<M, 32, 0, Scales>
         : xa.bs == 64 ? rowDotNf4Int8Avx2<M, 64, 64, Scales>
                       : rowDotNf4Int8Avx2<M, 64, 0, Scales>;
}

template <int M>
void forwardInt8SmallM(const Int8Activations& xa, const WeightView& w, const float* bias, float* y, bool accumulate) {
  auto rowDot = int8RowKernel<M, Fp32Scales>(xa);
  auto rowDotDq = int8RowKernel<M, DqRowScales>(xa);
  const int dqShift = w.absmax == nullptr ? nestedShift(w.absmaxDq) : -1;
  const int64_t N = w.rows, K = w.cols;
  const auto* d = static_cast<const uint8_t*>(w.data);
  parallelFor(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1, int) {
    float res[M];
    for (int64_t n = n0; n < n1; ++n) {
      if (dqShift >= 0) {
        rowDotDq(d + (n * K) / 2, dqRowScales(w.absmaxDq, n * xa.nb, dqShift), xa, res);
      } else {
        const float* am = nf4BlockScales(w.absmax, w.absmaxDq, n * xa.nb, xa.nb, scratch(4, static_cast<size_t>(xa.nb)));
        rowDot(d + (n * K) / 2, Fp32Scales{am}, xa, res);
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = finish(y[m * N + n], accumulate, res[m], bias, n);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// M <= 8 backward: dx[m, k0:k1] += dy[m,n] * W[n, k0:k1] for every n; each thread owns a column
// chunk of dx, so W is read once in total and dx stays in L1.

QK_AVX2 void axpyAvx2(float g, const float* s, float* d, int64_t len) {
  const __m256 vg = _mm256_set1_ps(g);
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) _mm256_storeu_ps(d + k, _mm256_fmadd_ps(vg, _mm256_loadu_ps(s + k), _mm256_loadu_ps(d + k)));
  for (; k < len; ++k) d[k] += g * s[k];
}

void backwardSmallM(SimdLevel lvl, const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate) {
  const int64_t N = w.rows, K = w.cols, CH = 512;
  parallelFor((K + CH - 1) / CH, 1, [&](int64_t c0, int64_t c1, int) {
    float* seg = scratch(0, CH);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * CH, kl = std::min(CH, K - k0);
      if (!accumulate)
        for (int64_t m = 0; m < M; ++m) std::fill(dx + m * K + k0, dx + m * K + k0 + kl, 0.0f);
      for (int64_t n = 0; n < N; ++n) {
        decode(lvl, w, n * K + k0, kl, seg);
        for (int64_t m = 0; m < M; ++m) axpyAvx2(dy[m * N + n], seg, dx + m * K + k0, kl);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Packed GEMM: C[M,Nc] += alpha · A[M,Kd] · B[Kd,Nc] where B is produced panel by panel by a
// provider (dequantizing W on the fly). Per task (a tile of C): for each KC slice of the depth,
//   pack B   [KC x NC]  -> Bp, strips of NR columns, [strip][k][NR]   (L2, per thread)
//   for each MR rows:   pack A [MR x KC] -> Ap [k][MR] (L1), then micro-kernel over the strips.

constexpr int64_t KC = 256, NC = 256;

// The accumulators are named variables, not an array: GCC keeps an array of vectors in registers
// but also stores it back to the stack every iteration (measured: 3x slower).
#define QK_ROW6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define QK_ROW8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

struct KernAvx2 {
  static constexpr int MR = 6, NR = 16;
  // C[mr, nr] += alpha * Ap[kc][MR] · Bp[kc][NR]
  QK_AVX2 static void micro(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, int mr,
                            int nr) {
#define QK_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
    QK_ROW6(QK_DECL)
#undef QK_DECL
    for (int64_t k = 0; k < kc; ++k, Ap += MR, Bp += NR) {
      const __m256 b0 = _mm256_loadu_ps(Bp), b1 = _mm256_loadu_ps(Bp + 8);
#define QK_FMA(r)                                    \
  {                                                  \
    const __m256 a = _mm256_broadcast_ss(Ap + r);    \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);       \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);       \
  }
      QK_ROW6(QK_FMA)
#undef QK_FMA
    }
    const __m256 va = _mm256_set1_ps(alpha);
    if (mr == MR && nr == NR) {
#define QK_STORE(r)                                                                        \
  _mm256_storeu_ps(C + r * ldc, _mm256_fmadd_ps(c##r##0, va, _mm256_loadu_ps(C + r * ldc))); \
  _mm256_storeu_ps(C + r * ldc + 8, _mm256_fmadd_ps(c##r##1, va, _mm256_loadu_ps(C + r * ldc + 8)));
      QK_ROW6(QK_STORE)
#undef QK_STORE
    } else {
      alignas(32) float t[MR][NR];
#define QK_SPILL(r)                   \
  _mm256_store_ps(t[r], c##r##0);     \
  _mm256_store_ps(t[r] + 8, c##r##1);
      QK_ROW6(QK_SPILL)
#undef QK_SPILL
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < nr; ++j) C[r * ldc + j] += alpha * t[r][j];
    }
  }
};

struct KernAvx512 {
  static constexpr int MR = 8, NR = 32;
  QK_AVX512 static void micro(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, int mr,
                              int nr) {
#define QK_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
    QK_ROW8(QK_DECL)
#undef QK_DECL
    for (int64_t k = 0; k < kc; ++k, Ap += MR, Bp += NR) {
      const __m512 b0 = _mm512_loadu_ps(Bp), b1 = _mm512_loadu_ps(Bp + 16);
#define QK_FMA(r)                                    \
  {                                                  \
    const __m512 a = _mm512_set1_ps(Ap[r]);          \
    c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);       \
    c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1);       \
  }
      QK_ROW8(QK_FMA)
#undef QK_FMA
    }
    const __m512 va = _mm512_set1_ps(alpha);
    if (mr == MR && nr == NR) {
#define QK_STORE(r)                                                                        \
  _mm512_storeu_ps(C + r * ldc, _mm512_fmadd_ps(c##r##0, va, _mm512_loadu_ps(C + r * ldc))); \
  _mm512_storeu_ps(C + r * ldc + 16, _mm512_fmadd_ps(c##r##1, va, _mm512_loadu_ps(C + r * ldc + 16)));
      QK_ROW8(QK_STORE)
#undef QK_STORE
    } else {
      alignas(64) float t[MR][NR];
#define QK_SPILL(r)                    \
  _mm512_store_ps(t[r], c##r##0);      \
  _mm512_store_ps(t[r] + 16, c##r##1);
      QK_ROW8(QK_SPILL)
#undef QK_SPILL
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < nr; ++j) C[r * ldc + j] += alpha * t[r][j];
    }
  }
};

// A provider: dense f32, optionally stored transposed.
struct DenseA {
  const float* a;
  int64_t lda;
  bool trans;
  template <int MR>
  void pack(int64_t m0, int mr, int64_t k0, int64_t kc, float* Ap) const {
    for (int r = 0; r < MR; ++r) {
      if (r >= mr) {
        for (int64_t k = 0; k < kc; ++k) Ap[k * MR + r] = 0.0f;
      } else if (!trans) {
        const float* src = a + (m0 + r) * lda + k0;
        for (int64_t k = 0; k < kc; ++k) Ap[k * MR + r] = src[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) Ap[k * MR + r] = a[(k0 + k) * lda + m0 + r];
      }
    }
  }
};

// Zero-fill strip columns [nc, NR*strips) of a packed panel.
template <int NR>
void padStrips(int64_t kc, int64_t nc, float* Bp) {
  const int64_t strips = (nc + NR - 1) / NR;
  for (int64_t j = nc; j < strips * NR; ++j) {
    float* dst = Bp + (j / NR) * kc * NR + (j % NR);
    for (int64_t k = 0; k < kc; ++k) dst[k * NR] = 0.0f;
  }
}

// B[k][j] = W[j][k] (forward: contraction over W's columns). Each W row segment is decoded once and
// scattered down its strip column.
struct WeightTransB {
  const WeightView* w;
  SimdLevel lvl;
  template <int NR>
  void pack(int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* Bp, float* tmp) const {
    for (int64_t j = 0; j < nc; ++j) {
      decode(lvl, *w, (j0 + j) * w->cols + k0, kc, tmp);
      float* dst = Bp + (j / NR) * kc * NR + (j % NR);
      for (int64_t k = 0; k < kc; ++k) dst[k * NR] = tmp[k];
    }
    padStrips<NR>(kc, nc, Bp);
  }
};

// B[k][j] = W[k][j] (backward input: contraction over W's rows). Row segments copy into strips.
struct WeightB {
  const WeightView* w;
  SimdLevel lvl;
  template <int NR>
  void pack(int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* Bp, float* tmp) const {
    for (int64_t k = 0; k < kc; ++k) {
      decode(lvl, *w, (k0 + k) * w->cols + j0, nc, tmp);
      for (int64_t j = 0; j < nc; j += NR)
        std::memcpy(Bp + (j / NR) * kc * NR + k * NR, tmp + j, sizeof(float) * std::min<int64_t>(NR, nc - j));
    }
    padStrips<NR>(kc, nc, Bp);
  }
};

// B as a dense f32 matrix: op(B)[k][j] = trans ? B[j*ldb + k] : B[k*ldb + j].
struct DenseB {
  const float* b;
  int64_t ldb;
  bool trans;
  template <int NR>
  void pack(int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* Bp, float*) const {
    if (!trans) {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < nc; j += NR)
          std::memcpy(Bp + (j / NR) * kc * NR + k * NR, b + (k0 + k) * ldb + j0 + j,
                      sizeof(float) * std::min<int64_t>(NR, nc - j));
    } else {
      for (int64_t j = 0; j < nc; ++j) {
        const float* src = b + (j0 + j) * ldb + k0;
        float* dst = Bp + (j / NR) * kc * NR + (j % NR);
        for (int64_t k = 0; k < kc; ++k) dst[k * NR] = src[k];
      }
    }
    padStrips<NR>(kc, nc, Bp);
  }
};

// init(m0, m1, n0, n1) prepares a C tile (zero / bias / beta scaling) before accumulation.
template <class Kern, class AP, class BP, class Init>
void gemmPacked(int64_t M, int64_t Nc, int64_t Kd, const AP& A, const BP& B, float alpha, float* C, int64_t ldc,
                const Init& init) {
  constexpr int MR = Kern::MR, NR = Kern::NR;
  if (M <= 0 || Nc <= 0) return;
  const int64_t nTiles = (Nc + NC - 1) / NC;
  const int64_t threads = numThreads();
  // split M too when there are too few column tiles to keep every thread busy (each M part then
  // decodes the same B panel: duplicated work, but only when N is small)
  int64_t mSplit = 1;
  if (nTiles < 2 * threads) mSplit = std::min((2 * threads + nTiles - 1) / nTiles, (M + MR - 1) / MR);
  const int64_t MC = ((M + mSplit - 1) / mSplit + MR - 1) / MR * MR;
  const int64_t mTiles = (M + MC - 1) / MC;
  parallelFor(nTiles * mTiles, 1, [&](int64_t t0, int64_t t1, int) {
    float* Bp = scratch(0, static_cast<size_t>(KC * NC));
    float* Ap = scratch(1, static_cast<size_t>(KC * MR));
    float* tmp = scratch(2, static_cast<size_t>(std::max(KC, NC)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nt = t / mTiles, mt = t % mTiles;
      const int64_t n0 = nt * NC, nc = std::min(NC, Nc - n0);
      const int64_t m0 = mt * MC, m1 = std::min(M, m0 + MC);
      init(m0, m1, n0, n0 + nc);
      for (int64_t k0 = 0; k0 < Kd; k0 += KC) {
        const int64_t kc = std::min(KC, Kd - k0);
        B.template pack<NR>(k0, kc, n0, nc, Bp, tmp);
        for (int64_t m = m0; m < m1; m += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, m1 - m));
          A.template pack<MR>(m, mr, k0, kc, Ap);
          for (int64_t j = 0; j < nc; j += NR)
            Kern::micro(kc, Ap, Bp + (j / NR) * kc * NR, C + m * ldc + n0 + j, ldc, alpha, mr,
                        static_cast<int>(std::min<int64_t>(NR, nc - j)));
        }
      }
    }
  });
}

template <class AP, class BP, class Init>
void gemmDispatch(SimdLevel lvl, int64_t M, int64_t Nc, int64_t Kd, const AP& A, const BP& B, float alpha, float* C,
                  int64_t ldc, const Init& init) {
  if (lvl == SimdLevel::Avx512) gemmPacked<KernAvx512>(M, Nc, Kd, A, B, alpha, C, ldc, init);
  else gemmPacked<KernAvx2>(M, Nc, Kd, A, B, alpha, C, ldc, init);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

void weightDecode(const WeightView& w, int64_t start, int64_t len, float* out) {
  checkWeight(w);
  if (len > 0) decode(simdLevel(), w, start, len, out);
}

void linearForward(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate) {
  checkWeight(w);
  const int64_t N = w.rows, K = w.cols;
  if (M <= 0 || N <= 0) return;
  const SimdLevel lvl = simdLevel();
  if (lvl == SimdLevel::Scalar) return forwardScalar(x, M, w, bias, y, accumulate);
  switch (M) {
    case 1: return forwardSmallM<1>(lvl, x, w, bias, y, accumulate);
    case 2: return forwardSmallM<2>(lvl, x, w, bias, y, accumulate);
    case 3: return forwardSmallM<3>(lvl, x, w, bias, y, accumulate);
    case 4: return forwardSmallM<4>(lvl, x, w, bias, y, accumulate);
    case 5: return forwardSmallM<5>(lvl, x, w, bias, y, accumulate);
    case 6: return forwardSmallM<6>(lvl, x, w, bias, y, accumulate);
    case 7: return forwardSmallM<7>(lvl, x, w, bias, y, accumulate);
    case 8: return forwardSmallM<8>(lvl, x, w, bias, y, accumulate);
    default: break;
  }
  auto init = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* ym = y + m * N;
      for (int64_t n = n0; n < n1; ++n) ym[n] = (accumulate ? ym[n] : 0.0f) + (bias ? bias[n] : 0.0f);
    }
  };
  gemmDispatch(lvl, M, N, K, DenseA{x, K, false}, WeightTransB{&w, lvl}, 1.0f, y, N, init);
}

bool int8DecodeApplies(int64_t M, const WeightView& w) {
  return w.type == WType::NF4 && M >= 1 && M <= 8 && w.cols > 0 && w.cols % w.blocksize == 0;
}

void linearForwardInt8(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate) {
  checkWeight(w);
  if (!int8DecodeApplies(M, w) || w.rows <= 0) return linearForward(x, M, w, bias, y, accumulate);
  const int64_t K = w.cols;
  const SimdLevel lvl = simdLevel();
  // the caller's thread quantizes x once; the buffers are read by every thread of the region
  thread_local std::vector<int8_t> qBuf;
  thread_local std::vector<float> xfBuf;
  Int8Activations xa;
  xa.M = M;
  xa.K = K;
  xa.bs = w.blocksize;
  xa.nb = K / w.blocksize;
  xfBuf.resize(static_cast<size_t>(M * xa.nb));
  xa.xf = xfBuf.data();
  if (lvl == SimdLevel::Scalar) {
    qBuf.resize(static_cast<size_t>(M * K));
    xa.q = qBuf.data();
    quantizeActivationsScalar(x, M, K, w.blocksize, qBuf.data(), xfBuf.data());
    return forwardInt8Scalar(xa, w, bias, y, accumulate);
  }
  // AVX-512 machines run the AVX2 kernel (AVX-512 has no wider byte shuffle that would change the
  // op count per weight; the 256-bit code is what runs at QLORA_SIMD=avx512)
  qBuf.resize(static_cast<size_t>(2 * M * K));
  xa.packed = qBuf.data();
  xa.step = w.blocksize >= 64 ? 64 : 32;
  quantizeActivationsAvx2(x, M, K, w.blocksize, xa.step, qBuf.data(), xfBuf.data());
  switch (M) {
    case 1: return forwardInt8SmallM<1>(xa, w, bias, y, accumulate);
    case 2: return forwardInt8SmallM<2>(xa, w, bias, y, accumulate);
    case 3: return forwardInt8SmallM<3>(xa, w, bias, y, accumulate);
    case 4: return forwardInt8SmallM<4>(xa, w, bias, y, accumulate);
    case 5: return forwardInt8SmallM<5>(xa, w, bias, y, accumulate);
    case 6: return forwardInt8SmallM<6>(xa, w, bias, y, accumulate);
    case 7: return forwardInt8SmallM<7>(xa, w, bias, y, accumulate);
    default: return forwardInt8SmallM<8>(xa, w, bias, y, accumulate);
  }
}

void linearBackwardInput(const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate) {
  checkWeight(w);
  const int64_t N = w.rows, K = w.cols;
  if (M <= 0 || K <= 0) return;
  const SimdLevel lvl = simdLevel();
  if (lvl == SimdLevel::Scalar) return backwardScalar(dy, M, w, dx, accumulate);
  if (M <= 8) return backwardSmallM(lvl, dy, M, w, dx, accumulate);
  auto init = [&](int64_t m0, int64_t m1, int64_t k0, int64_t k1) {
    if (accumulate) return;
    for (int64_t m = m0; m < m1; ++m) std::fill(dx + m * K + k0, dx + m * K + k1, 0.0f);
  };
  gemmDispatch(lvl, M, K, N, DenseA{dy, N, false}, WeightB{&w, lvl}, 1.0f, dx, K, init);
}

void gemmF32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const SimdLevel lvl = simdLevel();
  if (lvl == SimdLevel::Scalar) return gemmScalar(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  auto init = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (beta == 1.0f) return;
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = n0; n < n1; ++n) C[m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
  };
  gemmDispatch(lvl, M, N, K, DenseA{A, lda, transA}, DenseB{B, ldb, transB}, alpha, C, ldc, init);
}

}  // namespace qk
