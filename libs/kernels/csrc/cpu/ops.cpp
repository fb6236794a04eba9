// Elementwise / per-row transformer kernels: scalar reference + AVX2 + AVX-512 variants.
// See ops.h for the math of each kernel.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/nf4.h"
#include "cpu/thread_pool.h"

#if defined(__x86_64__)
// GCC 12 flags the self-initialised _mm512_undefined_* inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define QK_X86 1
#else
#define QK_X86 0
#endif

#define QK_AVX2 __attribute__((target("avx2,fma")))
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

namespace qk {

float halfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16ToFloat(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

inline bool useAvx512() { return simdLevel() == SimdLevel::Avx512; }
inline bool useAvx2() { return simdLevel() >= SimdLevel::Avx2; }

// =========================================================================================
// Scalar reference
// =========================================================================================
float dotScalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
void axpyScalar(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
void scaleScalar(float* x, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}
void addScalar(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}
float maxScalar(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
float expShiftSumScalar(float* x, float shift, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}
float sumSqScalar(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}
void rmsApplyScalar(const float* x, const float* w, float* y, float r, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}
float sumScalar(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}
float sumSqDevScalar(const float* x, float mean, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] - mean) * (x[i] - mean);
  return s;
}
inline float siluScalar(float x) { return x / (1.f + std::exp(-x)); }
inline float geluScalar(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }
inline float actScalar(Activation a, float x) {
  switch (a) {
    case Activation::Silu: return siluScalar(x);
    case Activation::Relu: return x > 0.f ? x : 0.f;
    default: return geluScalar(x);
  }
}

#if QK_X86
// =========================================================================================
// AVX2 + FMA
// =========================================================================================
QK_AVX2 inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
QK_AVX2 inline float hmax256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
// exp(x) for fp32 lanes: Cephes-style range reduction x = n·ln2 + r (ln2 split in a high part exact
// in few bits and a low correction), degree-6 polynomial in r, 2^n built in the exponent bits. ~2 ulp;
// exp(x < -88.37) = 0. One set of constants for the AVX2 and AVX-512 forms.
namespace expc {
constexpr float kClamp = 88.3762626647949f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500E-4f, kP1 = 1.3981999507E-3f, kP2 = 8.3334519073E-3f, kP3 = 4.1665795894E-2f,
                kP4 = 1.6666665459E-1f, kP5 = 5.0000001201E-1f;
}  // namespace expc

QK_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(expc::kClamp)), _mm256_set1_ps(-expc::kClamp));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(expc::kLog2e), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(expc::kLn2Hi), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(expc::kLn2Lo), r);
  __m256 y = _mm256_set1_ps(expc::kP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}
QK_AVX2 inline __m256 silu256(__m256 x) {
  __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

QK_AVX2 float dotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
QK_AVX2 void axpyAvx2(float alpha, const float* x, float* y, int64_t n) {
  __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
QK_AVX2 void scaleAvx2(float* x, float alpha, int64_t n) {
  __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(a, _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] *= alpha;
}
QK_AVX2 void addAvx2(float* y, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}
QK_AVX2 float maxAvx2(const float* x, int64_t n) {
  float m = x[0];
  int64_t i = 0;
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
    m = hmax256(v);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
QK_AVX2 float expShiftSumAvx2(float* x, float shift, int64_t n) {
  __m256 sh = _mm256_set1_ps(shift), acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum256(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}
QK_AVX2 float sumSqAvx2(const float* x, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}
QK_AVX2 void rmsApplyAvx2(const float* x, const float* w, float* y, float r, int64_t n) {
  __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = (x[i] * r) * w[i];
}
QK_AVX2 float sumAvx2(const float* x, int64_t n) {
  __m256 s0 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
  float s = hsum256(s0);
  for (; i < n; ++i) s += x[i];
  return s;
}
QK_AVX2 float sumSqDevAvx2(const float* x, float mean, int64_t n) {
  __m256 m = _mm256_set1_ps(mean), s0 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
    s0 = _mm256_fmadd_ps(d, d, s0);
  }
  float s = hsum256(s0);
  for (; i < n; ++i) s += (x[i] - mean) * (x[i] - mean);
  return s;
}
QK_AVX2 void siluAvx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, silu256(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = siluScalar(x[i]);
}
QK_AVX2 void reluAvx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_max_ps(_mm256_loadu_ps(x + i), _mm256_setzero_ps()));
  for (; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
}
QK_AVX2 void swigluAvx2(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(silu256(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  for (; i < n; ++i) y[i] = siluScalar(g[i]) * u[i];
}
QK_AVX2 void reluMulAvx2(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_max_ps(_mm256_loadu_ps(g + i), _mm256_setzero_ps()),
                                          _mm256_loadu_ps(u + i)));
  for (; i < n; ++i) y[i] = (g[i] > 0.f ? g[i] : 0.f) * u[i];
}

// =========================================================================================
// AVX-512 (only the kernels where the wider vectors are cheap to write)
// =========================================================================================
// exp256's algorithm and constants (expc) on 16 lanes.
QK_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(expc::kClamp)), _mm512_set1_ps(-expc::kClamp));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(expc::kLog2e), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(expc::kLn2Hi), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(expc::kLn2Lo), r);
  __m512 y = _mm512_set1_ps(expc::kP0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}
QK_AVX512 inline __m512 silu512(__m512 x) {
  __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
QK_AVX512 float dotAvx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
QK_AVX512 void axpyAvx512(float alpha, const float* x, float* y, int64_t n) {
  __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}
QK_AVX512 float expShiftSumAvx512(float* x, float shift, int64_t n) {
  __m512 sh = _mm512_set1_ps(shift), acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh)));
    _mm512_mask_storeu_ps(x + i, m, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}
QK_AVX512 void swigluAvx512(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(silu512(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
  for (; i < n; ++i) y[i] = siluScalar(g[i]) * u[i];
}
QK_AVX512 void siluAvx512(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, silu512(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = siluScalar(x[i]);
}
#endif  // QK_X86


}  // namespace

// =========================================================================================
// Dispatch
// =========================================================================================
#if QK_X86
#define QK_DISPATCH(name, ...)                             \
  do {                                                     \
    if (useAvx512()) return name##Avx512(__VA_ARGS__);     \
    if (useAvx2()) return name##Avx2(__VA_ARGS__);         \
    return name##Scalar(__VA_ARGS__);                      \
  } while (0)
#define QK_DISPATCH2(name, ...)                            \
  do {                                                     \
    if (useAvx2()) return name##Avx2(__VA_ARGS__);         \
    return name##Scalar(__VA_ARGS__);                      \
  } while (0)
#else
#define QK_DISPATCH(name, ...) return name##Scalar(__VA_ARGS__)
#define QK_DISPATCH2(name, ...) return name##Scalar(__VA_ARGS__)
#endif

float dot(const float* a, const float* b, int64_t n) { QK_DISPATCH(dot, a, b, n); }
void axpy(float alpha, const float* x, float* y, int64_t n) { QK_DISPATCH(axpy, alpha, x, y, n); }
void scale(float* x, float alpha, int64_t n) { QK_DISPATCH2(scale, x, alpha, n); }
void addInto(float* y, const float* x, int64_t n) { QK_DISPATCH2(add, y, x, n); }
float maxOf(const float* x, int64_t n) { QK_DISPATCH2(max, x, n); }
float expShiftSum(float* x, float shift, int64_t n) { QK_DISPATCH(expShiftSum, x, shift, n); }

namespace {
float sumSq(const float* x, int64_t n) { QK_DISPATCH2(sumSq, x, n); }
void rmsApply(const float* x, const float* w, float* y, float r, int64_t n) { QK_DISPATCH2(rmsApply, x, w, y, r, n); }
float sumOf(const float* x, int64_t n) { QK_DISPATCH2(sum, x, n); }
float sumSqDev(const float* x, float mean, int64_t n) { QK_DISPATCH2(sumSqDev, x, mean, n); }
}  // namespace

// ---- norms ------------------------------------------------------------------------------
void rmsNormRow(const float* x, const float* w, float* y, int64_t dim, float eps) {
  // var = mean(x²); y = x · rsqrt(var + eps) · w     (HF LlamaRMSNorm in fp32)
  float var = sumSq(x, dim) / static_cast<float>(dim);
  float r = 1.f / std::sqrt(var + eps);
  rmsApply(x, w, y, r, dim);
}

void rmsNormForward(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  parallelRows(rows, dim, [&](int64_t r) { rmsNormRow(x + r * dim, w, y + r * dim, dim, eps); });
}

void layerNormRow(const float* x, const float* w, const float* b, float* y, int64_t dim, float eps) {
  // mean = Σx/dim; var = Σ(x-mean)²/dim; y = (x-mean)·rstd·w + b
  float mean = sumOf(x, dim) / static_cast<float>(dim);
  float var = sumSqDev(x, mean, dim) / static_cast<float>(dim);
  float rstd = 1.f / std::sqrt(var + eps);
  for (int64_t i = 0; i < dim; ++i) {
    float v = (x[i] - mean) * rstd;
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = v;
  }
}

void layerNormForward(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                      float eps) {
  parallelRows(rows, dim, [&](int64_t r) { layerNormRow(x + r * dim, w, b, y + r * dim, dim, eps); });
}

// ---- RoPE ---------------------------------------------------------------------------------
void ropeInvFreq(const RopeParams& p, float* invFreq) {
  const int half = p.headDim / 2;
  for (int j = 0; j < half; ++j) {
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all fp32
    float e = static_cast<float>(2 * j) / static_cast<float>(p.headDim);
    invFreq[j] = 1.f / std::pow(p.theta, e);
  }
  if (!p.llama3) return;
  // llama3: long wavelengths are divided by `factor`, short ones kept, the band between is
  // interpolated smoothly (transformers _compute_llama3_parameters).
  const double PI = 3.14159265358979323846;
  const float L = p.originalMaxPositions;
  const float lowWavelen = L / p.lowFreqFactor, highWavelen = L / p.highFreqFactor;
  for (int j = 0; j < half; ++j) {
    float f = invFreq[j];
    float wavelen = static_cast<float>(2.0 * PI) / f;
    float out;
    if (wavelen < highWavelen) {
      out = f;
    } else if (wavelen > lowWavelen) {
      out = f / p.factor;
    } else {
      float smooth = (L / wavelen - p.lowFreqFactor) / (p.highFreqFactor - p.lowFreqFactor);
      out = (1.f - smooth) * f / p.factor + smooth * f;
    }
    invFreq[j] = out;
  }
}

void ropeTables(const float* invFreq, int half, int64_t positions, float* cosT, float* sinT) {
  for (int64_t p = 0; p < positions; ++p)
    for (int j = 0; j < half; ++j) {
      float f = static_cast<float>(p) * invFreq[j];  // fp32 product, as HF's matmul
      cosT[p * half + j] = static_cast<float>(std::cos(static_cast<double>(f)));
      sinT[p * half + j] = static_cast<float>(std::sin(static_cast<double>(f)));
    }
}

namespace {
// Rotates each pair (x[j], x[j+hd/2]) of every head by +θ, or by −θ when Inverse (the sine's sign
// flipped: exactly the products and sums of d1·c + d2·s, d2·c − d1·s, so both directions stay
// bit-identical to the CUDA kernels, elementwise.cu).
template <bool Inverse>
void ropeRotatePairs(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                     const float* sinT) {
  const int half = headDim / 2;
  const int64_t width = static_cast<int64_t>(nHeads) * headDim;
  parallelRows(T, width, [&](int64_t t) {
    const float* c = cosT + static_cast<int64_t>(pos[t]) * half;
    const float* s = sinT + static_cast<int64_t>(pos[t]) * half;
    for (int h = 0; h < nHeads; ++h) {
      float* v = x + t * width + static_cast<int64_t>(h) * headDim;
      for (int j = 0; j < half; ++j) {
        const float x1 = v[j], x2 = v[j + half];
        const float sj = Inverse ? -s[j] : s[j];
        v[j] = x1 * c[j] - x2 * sj;
        v[j + half] = x2 * c[j] + x1 * sj;
      }
    }
  });
}
}  // namespace

void ropeRotate(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT, const float* sinT,
                bool inverse) {
  if (inverse)
    ropeRotatePairs<true>(x, T, nHeads, headDim, pos, cosT, sinT);
  else
    ropeRotatePairs<false>(x, T, nHeads, headDim, pos, cosT, sinT);
}

void ropeForward(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                 const float* sinT) {
  ropeRotate(x, T, nHeads, headDim, pos, cosT, sinT, false);
}

// ---- activations ------------------------------------------------------------------------------
void activationForward(Activation act, const float* x, float* y, int64_t n) {
  parallelChunks(n, [&](int64_t b, int64_t e) {
#if QK_X86
    if (act == Activation::Silu && useAvx512()) return siluAvx512(x + b, y + b, e - b);
    if (act == Activation::Silu && useAvx2()) return siluAvx2(x + b, y + b, e - b);
    if (act == Activation::Relu && useAvx2()) return reluAvx2(x + b, y + b, e - b);
#endif
    for (int64_t i = b; i < e; ++i) y[i] = actScalar(act, x[i]);
  });
}

void gatedActivationForward(Activation act, const float* gate, const float* up, float* y, int64_t n) {
  parallelChunks(n, [&](int64_t b, int64_t e) {
#if QK_X86
    if (act == Activation::Silu && useAvx512()) return swigluAvx512(gate + b, up + b, y + b, e - b);
    if (act == Activation::Silu && useAvx2()) return swigluAvx2(gate + b, up + b, y + b, e - b);
    if (act == Activation::Relu && useAvx2()) return reluMulAvx2(gate + b, up + b, y + b, e - b);
#endif
    for (int64_t i = b; i < e; ++i) y[i] = actScalar(act, gate[i]) * up[i];
  });
}

// ---- softmax --------------------------------------------------------------------------------
void softmaxRow(float* x, int64_t n) {
  float m = maxOf(x, n);
  float s = expShiftSum(x, m, n);
  scale(x, 1.f / s, n);
}

void softmaxForward(float* x, int64_t rows, int64_t n) {
  parallelRows(rows, n, [&](int64_t r) { softmaxRow(x + r * n, n); });
}

// ---- embedding ------------------------------------------------------------------------------
void tableRow(const TableView& t, int64_t row, float* out, bool accumulate) {
  const int64_t cols = t.cols;
  switch (t.type) {
    case TableType::F32: {
      const unsigned char* src = static_cast<const unsigned char*>(t.data) + row * cols * 4;
      if (!accumulate) {
        std::memcpy(out, src, static_cast<size_t>(cols) * 4);
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          float v;
          std::memcpy(&v, src + c * 4, 4);
          out[c] += v;
        }
      }
      return;
    }
    case TableType::F16:
    case TableType::BF16: {
      const unsigned char* src = static_cast<const unsigned char*>(t.data) + row * cols * 2;
      const bool half = t.type == TableType::F16;
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t h;
        std::memcpy(&h, src + c * 2, 2);
        float v = half ? halfToFloat(h) : bf16ToFloat(h);
        out[c] = accumulate ? out[c] + v : v;
      }
      return;
    }
    case TableType::NF4: {
      const uint8_t* q = static_cast<const uint8_t*>(t.data);
      if (!accumulate) {
        nf4DequantizeRangeScaled(q, t.absmax, t.absmaxDq, t.blocksize, row * cols, cols, out);
        return;
      }
      thread_local std::vector<float> tmp;
      if (static_cast<int64_t>(tmp.size()) < cols) tmp.resize(cols);
      nf4DequantizeRangeScaled(q, t.absmax, t.absmaxDq, t.blocksize, row * cols, cols, tmp.data());
      for (int64_t c = 0; c < cols; ++c) out[c] += tmp[c];
      return;
    }
  }
}

void embeddingForward(const TableView& t, const int32_t* ids, int64_t T, float* out, bool accumulate) {
  parallelRows(T, t.cols, [&](int64_t i) { tableRow(t, ids[i], out + i * t.cols, accumulate); });
}

}  // namespace qk
