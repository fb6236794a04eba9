// linearForward / linearBackwardInput / gemmF32 (API and semantics in matmul.h; tiling in docs/kernels.md).
//
// Three implementations, picked by qk::simdLevel():
//   scalar   the reference: decode a row/segment of W, plain loops (no FMA) — what tests trust.
//   AVX2     M <= 8: one pass over W per call, NF4 decoded in registers (vpermps on the two table
//            halves), M accumulators; M > 8: packed GEMM, micro-kernel 6x16 (12 ymm accumulators).
//   AVX-512  same structure, 16-wide decode (one vpermps on the whole table), micro-kernel 8x32.
#include "cpu/matmul.h"

#include <algorithm>
#include <cstring>
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

// Per-thread scratch (pool workers and the caller each get their own).
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> buf[4];
  if (buf[slot].size() < floats) buf[slot].resize(floats + 64);
  return buf[slot].data();
}

size_t elemSize(WType t) { return t == WType::F32 ? 4 : 2; }

void checkWeight(const WeightView& w) {
  if (w.rows < 0 || w.cols < 0) throw std::invalid_argument("weight shape must be non-negative");
  if (w.type == WType::NF4 && !nf4ValidBlocksize(w.blocksize))
    throw std::invalid_argument("NF4 weight blocksize must be a power of two in 32..4096");
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
    case WType::NF4: nf4DequantizeRange(d, w.absmax, w.blocksize, start, len, out); break;
  }
}

template <FloatType T>
QK_AVX2 void convertAvx2(const uint8_t* d, int64_t start, int64_t len, float* out) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) _mm256_storeu_ps(out + k, load8<T>(d, start + k));
  for (; k < len; ++k)
    out[k] = T == FloatType::F16 ? halfToFloat(loadU16(d + 2 * (start + k))) : bf16ToFloat(loadU16(d + 2 * (start + k)));
}

void decodeSimd(const WeightView& w, int64_t start, int64_t len, float* out) {
  const auto* d = static_cast<const uint8_t*>(w.data);
  if (w.type == WType::F16) return convertAvx2<FloatType::F16>(d, start, len, out);
  if (w.type == WType::BF16) return convertAvx2<FloatType::BF16>(d, start, len, out);
  decodeScalar(w, start, len, out);  // f32: memcpy; NF4: nf4DequantizeRange dispatches by level itself
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
template <int M>
QK_AVX2 void rowDotNf4PlanesAvx2(const uint8_t* p, const float* am, int64_t K, int bs, const float* xp, int64_t ldx,
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
  for (; k + 8 * A <= K; k += 8 * A) {
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
      float wk = T == FloatType::F32   ? loadF32(d + 4 * (start + kk))
                 : T == FloatType::F16 ? halfToFloat(loadU16(d + 2 * (start + kk)))
                                       : bf16ToFloat(loadU16(d + 2 * (start + kk)));
      t += wk * x[m * ldx + kk];
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
      float wk = T == FloatType::F32   ? loadF32(d + 4 * (start + kk))
                 : T == FloatType::F16 ? halfToFloat(loadU16(d + 2 * (start + kk)))
                                       : bf16ToFloat(loadU16(d + 2 * (start + kk)));
      t += wk * x[m * ldx + kk];
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
            const float* am = w.absmax + (n * K) / w.blocksize;
            if (avx512) rowDotNf4Avx512<M>(p, am, K, w.blocksize, x, K, res);
            else rowDotNf4PlanesAvx2<M>(p, am, K, w.blocksize, xp, K, res);
          } else {
            // odd K / K not a multiple of the blocksize: decode the row (any alignment), then a dense dot
            nf4DequantizeRange(d, w.absmax, w.blocksize, n * K, K, row);
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
