// Training kernels: backward of every forward op (see backward.h for the math of each).
#include "cpu/backward.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QK_X86 1
#else
#define QK_X86 0
#endif

#define QK_AVX2 __attribute__((target("avx2,fma")))

namespace qk {

namespace {

float* threadScratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

// =============================================================================================
// RMSNorm backward      y = x·r·w,  r = (mean(x²) + eps)^-½
// =============================================================================================
void rmsNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim, float eps,
                     bool accumulate) {
  parallelRows(rows, dim, [&](int64_t row) {
    const float* xr = x + row * dim;
    const float* gr = dy + row * dim;
    float* out = dx + row * dim;
    // the forward's r (ops.cpp rmsNormRow: var = Σx²/dim in fp32)
    const float var = dot(xr, xr, dim) / static_cast<float>(dim);
    const float r = 1.f / std::sqrt(var + eps);
    // c = Σ (dy⊙w)⊙x
    float c = 0.f;
    for (int64_t i = 0; i < dim; ++i) c += gr[i] * w[i] * xr[i];
    const float k = c * r * r * r / static_cast<float>(dim);
    if (accumulate)
      for (int64_t i = 0; i < dim; ++i) out[i] += r * gr[i] * w[i] - xr[i] * k;
    else
      for (int64_t i = 0; i < dim; ++i) out[i] = r * gr[i] * w[i] - xr[i] * k;
  });
}

// =============================================================================================
// LayerNorm backward    x̂ = (x − μ)·r,  y = x̂⊙w + b
// =============================================================================================
void layerNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim,
                       float eps, bool accumulate) {
  parallelRows(rows, dim, [&](int64_t row) {
    const float* xr = x + row * dim;
    const float* gr = dy + row * dim;
    float* out = dx + row * dim;
    // μ, r as in ops.cpp layerNormRow (two passes, biased variance)
    float s = 0.f;
    for (int64_t i = 0; i < dim; ++i) s += xr[i];
    const float mean = s / static_cast<float>(dim);
    float v = 0.f;
    for (int64_t i = 0; i < dim; ++i) v += (xr[i] - mean) * (xr[i] - mean);
    const float r = 1.f / std::sqrt(v / static_cast<float>(dim) + eps);
    // mean(g), mean(g⊙x̂) with g = dy⊙w
    float sg = 0.f, sgx = 0.f;
    for (int64_t i = 0; i < dim; ++i) {
      const float g = w ? gr[i] * w[i] : gr[i];
      sg += g;
      sgx += g * (xr[i] - mean) * r;
    }
    const float mg = sg / static_cast<float>(dim), mgx = sgx / static_cast<float>(dim);
    for (int64_t i = 0; i < dim; ++i) {
      const float g = w ? gr[i] * w[i] : gr[i];
      const float d = r * (g - mg - (xr[i] - mean) * r * mgx);
      out[i] = accumulate ? out[i] + d : d;
    }
  });
}

// =============================================================================================
// RoPE backward: rotation by −θ (the transpose of the forward's rotation)
// =============================================================================================
void ropeBackward(float* dx, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                  const float* sinT) {
  ropeRotate(dx, T, nHeads, headDim, pos, cosT, sinT, true);
}

// =============================================================================================
// Activations backward
// =============================================================================================
namespace {

inline float sigmoidScalar(float x) { return 1.f / (1.f + std::exp(-x)); }
// act(x) and act'(x)
inline void actAndGrad(Activation a, float x, float* f, float* d) {
  switch (a) {
    case Activation::Silu: {
      const float sg = sigmoidScalar(x);
      *f = x * sg;
      *d = sg * (1.f + x * (1.f - sg));
      return;
    }
    case Activation::Relu:
      *f = x > 0.f ? x : 0.f;
      *d = x > 0.f ? 1.f : 0.f;
      return;
    default: {
      const float cdf = 0.5f * (1.f + std::erf(x * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * std::exp(-0.5f * x * x);
      *f = x * cdf;
      *d = cdf + x * pdf;
      return;
    }
  }
}

#if QK_X86
// exp(x) for 8 fp32 lanes: x = n·ln2 + r (|r| <= ln2/2, ln2 split in two for the reduction),
// e^r by a degree-6 Taylor/minimax polynomial, 2^n through the exponent bits. Inputs are clamped to
// ±87 so 2^n stays a normal number (e^-87 ≈ 1.6e-38: the sigmoid below is exact to fp32 there).
QK_AVX2 inline __m256 expAvx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 high part (exact in fp32)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);    // ln2 low part
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// σ(x) and silu'(x) = σ·(1 + x·(1 − σ))
QK_AVX2 inline void siluGradAvx2(__m256 x, __m256* f, __m256* d) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, expAvx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
  *f = _mm256_mul_ps(x, sg);
  *d = _mm256_mul_ps(sg, _mm256_fmadd_ps(x, _mm256_sub_ps(one, sg), one));
}
QK_AVX2 void siluBackwardAvx2(const float* x, const float* dy, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 f, d;
    siluGradAvx2(_mm256_loadu_ps(x + i), &f, &d);
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), d));
  }
  for (; i < n; ++i) {
    float f, d;
    actAndGrad(Activation::Silu, x[i], &f, &d);
    dx[i] = dy[i] * d;
  }
}
QK_AVX2 void swigluBackwardAvx2(const float* g, const float* u, const float* dy, float* dg, float* du, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 f, d;
    siluGradAvx2(_mm256_loadu_ps(g + i), &f, &d);
    const __m256 gy = _mm256_loadu_ps(dy + i);
    _mm256_storeu_ps(du + i, _mm256_mul_ps(gy, f));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(gy, _mm256_loadu_ps(u + i)), d));
  }
  for (; i < n; ++i) {
    float f, d;
    actAndGrad(Activation::Silu, g[i], &f, &d);
    const float gy = dy[i];
    du[i] = gy * f;
    dg[i] = gy * u[i] * d;
  }
}
QK_AVX2 void reluBackwardAvx2(const float* x, const float* dy, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 pos = _mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_setzero_ps(), _CMP_GT_OQ);
    _mm256_storeu_ps(dx + i, _mm256_and_ps(pos, _mm256_loadu_ps(dy + i)));
  }
  for (; i < n; ++i) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
}
#endif

}  // namespace

void activationBackward(Activation act, const float* x, const float* dy, float* dx, int64_t n) {
  parallelChunks(n, [&](int64_t b, int64_t e) {
#if QK_X86
    if (act == Activation::Silu && simdLevel() >= SimdLevel::Avx2) return siluBackwardAvx2(x + b, dy + b, dx + b, e - b);
    if (act == Activation::Relu && simdLevel() >= SimdLevel::Avx2) return reluBackwardAvx2(x + b, dy + b, dx + b, e - b);
#endif
    if (act == Activation::Relu) {
      for (int64_t i = b; i < e; ++i) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
      return;
    }
    for (int64_t i = b; i < e; ++i) {
      float f, d;
      actAndGrad(act, x[i], &f, &d);
      dx[i] = dy[i] * d;
    }
  });
}

void gatedActivationBackward(Activation act, const float* gate, const float* up, const float* dy, float* dgate,
                             float* dup, int64_t n) {
  parallelChunks(n, [&](int64_t b, int64_t e) {
#if QK_X86
    if (act == Activation::Silu && simdLevel() >= SimdLevel::Avx2)
      return swigluBackwardAvx2(gate + b, up + b, dy + b, dgate + b, dup + b, e - b);
#endif
    for (int64_t i = b; i < e; ++i) {
      float f, d;
      actAndGrad(act, gate[i], &f, &d);
      const float gy = dy[i];
      dup[i] = gy * f;
      dgate[i] = gy * up[i] * d;
    }
  });
}

// =============================================================================================
// Attention (training): forward with log-sum-exp, backward with p recomputed
// =============================================================================================
namespace {

// The two vector shapes attention needs, over head vectors of hd floats; rows b_j = b + j·ld:
//   dots:        out[j] = scale · a·b_j                 (j < n)
//   weightedSum: y += Σ_j w[j] · b_j                    (y loaded and stored once per 8 lanes)
struct AttnVec {
  void (*dots)(const float* a, const float* b, int64_t ld, int64_t n, int hd, float scale, float* out);
  void (*weightedSum)(const float* w, const float* b, int64_t ld, int64_t n, int hd, float* y);
};

void dotsGeneric(const float* a, const float* b, int64_t ld, int64_t n, int hd, float scale, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = scale * dot(a, b + j * ld, hd);
}
void weightedSumGeneric(const float* w, const float* b, int64_t ld, int64_t n, int hd, float* y) {
  for (int64_t j = 0; j < n; ++j) axpy(w[j], b + j * ld, y, hd);
}

#if QK_X86
QK_AVX2 inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
// hd % 8 == 0 for all three
QK_AVX2 void dotsAvx2(const float* a, const float* b, int64_t ld, int64_t n, int hd, float scale, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // 4 rows share each load of a
    const float* b0 = b + j * ld;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (int e = 0; e < hd; e += 8) {
      const __m256 av = _mm256_loadu_ps(a + e);
      s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + e), s0);
      s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + ld + e), s1);
      s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + 2 * ld + e), s2);
      s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + 3 * ld + e), s3);
    }
    out[j] = scale * hsum8(s0);
    out[j + 1] = scale * hsum8(s1);
    out[j + 2] = scale * hsum8(s2);
    out[j + 3] = scale * hsum8(s3);
  }
  for (; j < n; ++j) {
    __m256 s0 = _mm256_setzero_ps();
    for (int e = 0; e < hd; e += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + j * ld + e), s0);
    out[j] = scale * hsum8(s0);
  }
}
QK_AVX2 void weightedSumAvx2(const float* w, const float* b, int64_t ld, int64_t n, int hd, float* y) {
  for (int e = 0; e < hd; e += 8) {
    __m256 acc0 = _mm256_loadu_ps(y + e), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      acc0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(b + j * ld + e), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_set1_ps(w[j + 1]), _mm256_loadu_ps(b + (j + 1) * ld + e), acc1);
    }
    if (j < n) acc0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(b + j * ld + e), acc0);
    _mm256_storeu_ps(y + e, _mm256_add_ps(acc0, acc1));
  }
}
#endif

AttnVec attnVec(int hd) {
#if QK_X86
  if (simdLevel() >= SimdLevel::Avx2 && hd % 8 == 0) return {dotsAvx2, weightedSumAvx2};
#endif
  return {dotsGeneric, weightedSumGeneric};
}

}  // namespace

void attentionTrainForward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                           const float* k, const float* v, float* out, float* lse) {
  const int hd = s.headDim, nh = s.nHeads, group = s.nHeads / s.nKvHeads;
  const int64_t qw = static_cast<int64_t>(nh) * hd, kw = static_cast<int64_t>(s.nKvHeads) * hd;
  const AttnVec vec = attnVec(hd);
  // one task per (row, head): every (row, head) costs the same, so contiguous blocks balance
  parallelFor(B * nh, 1, [&](int64_t i0, int64_t i1, int) {
    static thread_local std::vector<float> scoresTl;
    float* sc = threadScratch(scoresTl, static_cast<size_t>(T));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / nh;
      const int h = static_cast<int>(item % nh), g = h / group;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t, j0 = b * T + start[i], n = i - j0 + 1;
        const float* qi = q + i * qw + static_cast<int64_t>(h) * hd;
        const float* kb = k + j0 * kw + static_cast<int64_t>(g) * hd;
        const float* vb = v + j0 * kw + static_cast<int64_t>(g) * hd;
        vec.dots(qi, kb, kw, n, hd, s.scale, sc);  // s_j = scale·q·k_j
        const float m = maxOf(sc, n);
        const float sum = expShiftSum(sc, m, n);  // sc_j = e^{s_j − m}
        float* o = out + i * qw + static_cast<int64_t>(h) * hd;
        std::memset(o, 0, sizeof(float) * hd);
        vec.weightedSum(sc, vb, kw, n, hd, o);
        scale(o, 1.f / sum, hd);  // out = Σ p_j v_j
        lse[i * nh + h] = m + std::log(sum);
      }
    }
  });
}

void attentionTrainBackward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                            const float* k, const float* v, const float* out, const float* lse, const float* dout,
                            float* dq, float* dk, float* dv) {
  const int hd = s.headDim, nh = s.nHeads, nkv = s.nKvHeads, group = s.nHeads / s.nKvHeads;
  const int64_t qw = static_cast<int64_t>(nh) * hd, kw = static_cast<int64_t>(nkv) * hd;
  const AttnVec vec = attnVec(hd);
  constexpr int64_t QB = 16;  // queries per block
  // one task per (row, kv head): it owns dk/dv of those rows and dq of the group's heads
  parallelFor(B * nkv, 1, [&](int64_t i0, int64_t i1, int) {
    // per block: P and dS transposed, [key][query of the block] (zero outside a query's window)
    static thread_local std::vector<float> scratchTl;
    float* pT = threadScratch(scratchTl, static_cast<size_t>(2 * T * QB + 2 * T));
    float* dsT = pT + T * QB;
    float* p = dsT + T * QB;
    float* ds = p + T;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / nkv;
      const int g = static_cast<int>(item % nkv);
      const int64_t go = static_cast<int64_t>(g) * hd;
      for (int64_t t = 0; t < T; ++t) {
        std::memset(dk + (b * T + t) * kw + go, 0, sizeof(float) * hd);
        std::memset(dv + (b * T + t) * kw + go, 0, sizeof(float) * hd);
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const int64_t ho = static_cast<int64_t>(h) * hd;
        for (int64_t t0 = 0; t0 < T; t0 += QB) {
          const int64_t nq = std::min(QB, T - t0);
          // keys of the block: from the first query's segment start (starts never decrease along a
          // row) to the last query
          const int64_t jlo = b * T + start[b * T + t0], nk = b * T + t0 + nq - jlo;
          std::memset(pT, 0, sizeof(float) * nk * QB);
          std::memset(dsT, 0, sizeof(float) * nk * QB);
          for (int64_t qi = 0; qi < nq; ++qi) {
            const int64_t i = b * T + t0 + qi, j0 = b * T + start[i], n = i - j0 + 1;
            const float* qv = q + i * qw + ho;
            const float* dov = dout + i * qw + ho;
            const float* kb = k + j0 * kw + go;
            const float D = dot(dov, out + i * qw + ho, hd);  // D = dout·out = Σ_j p_j dp_j
            vec.dots(qv, kb, kw, n, hd, s.scale, p);
            expShiftSum(p, lse[i * nh + h], n);                   // p_j = e^{s_j − lse}
            vec.dots(dov, v + j0 * kw + go, kw, n, hd, 1.f, ds);  // dp_j = dout·v_j
            for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - D) * s.scale;  // scale·ds_j
            float* dqv = dq + i * qw + ho;
            std::memset(dqv, 0, sizeof(float) * hd);
            vec.weightedSum(ds, kb, kw, n, hd, dqv);  // dq_i = Σ_j scale·ds_j k_j
            for (int64_t j = 0; j < n; ++j) {
              pT[(j0 - jlo + j) * QB + qi] = p[j];
              dsT[(j0 - jlo + j) * QB + qi] = ds[j];
            }
          }
          // per key, over the block's queries in order: dk_j += Σ scale·ds_ij q_i, dv_j += Σ p_ij dout_i
          const float* qb = q + (b * T + t0) * qw + ho;
          const float* dob = dout + (b * T + t0) * qw + ho;
          for (int64_t j = 0; j < nk; ++j) {
            vec.weightedSum(dsT + j * QB, qb, qw, nq, hd, dk + (jlo + j) * kw + go);
            vec.weightedSum(pT + j * QB, dob, qw, nq, hd, dv + (jlo + j) * kw + go);
          }
        }
      }
    }
  });
}

// =============================================================================================
// Softmax + cross-entropy, and the fused chunked lm_head version
// =============================================================================================
void softmaxCrossEntropy(float* logits, int64_t rows, int64_t V, const int32_t* labels, double* loss, float gradScale,
                         bool grad) {
  parallelRows(rows, V, [&](int64_t r) {
    float* z = logits + r * V;
    const int32_t y = labels[r];
    const float zy = z[y];
    const float m = maxOf(z, V);
    const float sum = expShiftSum(z, m, V);  // z_j ← e^{z_j − m}
    loss[r] = static_cast<double>(m) + std::log(static_cast<double>(sum)) - static_cast<double>(zy);
    if (grad) {
      scale(z, gradScale / sum, V);  // softmax·gradScale
      z[y] -= gradScale;             // − onehot·gradScale
    }
  });
}

int64_t lmHeadChunkRows(int64_t M, int64_t V) {
  if (M <= 0) return 1;
  const int64_t cap = std::max<int64_t>(1, (int64_t(1) << 25) / std::max<int64_t>(V, 1));
  const int64_t chunks = (M + cap - 1) / cap;
  return (M + chunks - 1) / chunks;
}

double lmHeadCrossEntropy(const float* h, int64_t M, const WeightView& w, const int32_t* labels, int64_t chunkRows,
                          float gradScale, float* dh, std::vector<float>& logits) {
  const int64_t V = w.rows, H = w.cols;
  if (M <= 0) return 0.0;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunkRows, M));
  if (static_cast<int64_t>(logits.size()) < chunk * V) logits.resize(static_cast<size_t>(chunk * V));
  std::vector<double> loss(static_cast<size_t>(M));
  for (int64_t r0 = 0; r0 < M; r0 += chunk) {
    const int64_t c = std::min(chunk, M - r0);
    linearForward(h + r0 * H, c, w, nullptr, logits.data(), false);                       // z [c, V]
    softmaxCrossEntropy(logits.data(), c, V, labels + r0, loss.data() + r0, gradScale, dh != nullptr);
    if (dh) linearBackwardInput(logits.data(), c, w, dh + r0 * H, false);                // dh = dz·W [c, H]
  }
  double total = 0.0;
  for (int64_t r = 0; r < M; ++r) total += loss[r];
  return total;
}

// =============================================================================================
// Dropout (counter-based mask)
// =============================================================================================
namespace {
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
inline uint64_t mix64(uint64_t z) {  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
// 32-bit finalizer (murmur3 fmix32): a bijection with full avalanche, 2 multiplies.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}
// bits(e) = fmix32(fmix32(e_lo ^ k0) + (e_hi ^ k1)), k0/k1 = the low/high halves of the key.
inline uint32_t maskBits(uint64_t key, uint64_t e) {
  return fmix32(fmix32(static_cast<uint32_t>(e) ^ static_cast<uint32_t>(key)) +
                (static_cast<uint32_t>(e >> 32) ^ static_cast<uint32_t>(key >> 32)));
}

#if QK_X86
QK_AVX2 inline __m256i fmix32Avx2(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}
// Elements [e0, e0 + n) of one row (no 2³² boundary inside: the caller splits), same bits as maskBits.
QK_AVX2 void dropoutRowAvx2(const float* x, float* y, int64_t n, uint64_t e0, uint64_t key, uint32_t thr, float inv,
                            bool accumulate) {
  const __m256i k0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0 >> 32) ^ static_cast<uint32_t>(key >> 32)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i thrS = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(thr)), sign);
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0))),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, idx = _mm256_add_epi32(idx, eight)) {
    const __m256i h = fmix32Avx2(_mm256_add_epi32(fmix32Avx2(_mm256_xor_si256(idx, k0)), hi));
    // dropped iff h < thr (unsigned): compare with the sign bit flipped
    const __m256 drop = _mm256_castsi256_ps(_mm256_cmpgt_epi32(thrS, _mm256_xor_si256(h, sign)));
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_andnot_ps(drop, vinv));
    _mm256_storeu_ps(y + i, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + i), v) : v);
  }
  for (; i < n; ++i) {
    const float v = x[i] * (maskBits(key, e0 + static_cast<uint64_t>(i)) >= thr ? inv : 0.f);
    y[i] = accumulate ? y[i] + v : v;
  }
}
#endif
}  // namespace

uint64_t dropoutKey(uint64_t seed, uint64_t stream) { return mix64(seed ^ mix64((stream + 1) * kGolden)); }

void dropoutApply(const float* x, float* y, int64_t rows, int64_t cols, float p, uint64_t key, bool accumulate) {
  // keep iff bits >= thr, P(keep) = 1 − thr/2³² ≈ 1 − p
  const uint64_t thr64 = static_cast<uint64_t>(std::floor(static_cast<double>(p) * 4294967296.0));
  const uint32_t thr = static_cast<uint32_t>(std::min<uint64_t>(thr64, 0xFFFFFFFFull));
  const float inv = 1.f / (1.f - p);
#if QK_X86
  const bool simd = simdLevel() >= SimdLevel::Avx2;
#endif
  parallelRows(rows, cols, [&](int64_t r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    const uint64_t e0 = static_cast<uint64_t>(r * cols);
#if QK_X86
    // split at 2³² boundaries of the element index (the high half is a per-call constant)
    if (simd) {
      for (int64_t c = 0; c < cols;) {
        const uint64_t e = e0 + static_cast<uint64_t>(c);
        const int64_t n = std::min<int64_t>(cols - c, static_cast<int64_t>(0x100000000ull - (e & 0xFFFFFFFFull)));
        dropoutRowAvx2(xr + c, yr + c, n, e, key, thr, inv, accumulate);
        c += n;
      }
      return;
    }
#endif
    for (int64_t c = 0; c < cols; ++c) {
      const float v = xr[c] * (maskBits(key, e0 + static_cast<uint64_t>(c)) >= thr ? inv : 0.f);
      yr[c] = accumulate ? yr[c] + v : v;
    }
  });
}

// =============================================================================================
// Token reduction of the LoRA gradients:  g[r, C] += alpha · uᵀ·x    (u [N, r], x [N, C])
// =============================================================================================
// Streams x once (the matmul kernels would copy it into packed panels first). One task per chunk
// of 64 columns, tokens summed in order into a [r, 64] accumulator that stays in L1, then added to
// g (transOut: g is [C, r], i.e. g[c·r + j] — dB's layout). Deterministic for any thread count.
namespace {
constexpr int64_t kRedCols = 64;
#if QK_X86
QK_AVX2 void reduceChunkAvx2(const float* u, int64_t N, int r, const float* x, int64_t ldx, int64_t nc, float* acc) {
  for (int64_t t = 0; t < N; ++t) {
    const float* xt = x + t * ldx;
    const float* ut = u + t * r;
    if (nc == kRedCols) {
      __m256 xv[8];
      for (int q = 0; q < 8; ++q) xv[q] = _mm256_loadu_ps(xt + 8 * q);
      for (int j = 0; j < r; ++j) {
        const __m256 w = _mm256_set1_ps(ut[j]);
        float* aj = acc + j * kRedCols;
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(aj + 8 * q, _mm256_fmadd_ps(w, xv[q], _mm256_loadu_ps(aj + 8 * q)));
      }
    } else {
      for (int j = 0; j < r; ++j)
        for (int64_t c = 0; c < nc; ++c) acc[j * kRedCols + c] += ut[j] * xt[c];
    }
  }
}
#endif
void reduceChunkScalar(const float* u, int64_t N, int r, const float* x, int64_t ldx, int64_t nc, float* acc) {
  for (int64_t t = 0; t < N; ++t)
    for (int j = 0; j < r; ++j)
      for (int64_t c = 0; c < nc; ++c) acc[j * kRedCols + c] += u[t * r + j] * x[t * ldx + c];
}
void tokenReduce(const float* u, int64_t N, int r, const float* x, int64_t C, float alpha, float* g, bool transOut) {
  const int64_t chunks = (C + kRedCols - 1) / kRedCols;
#if QK_X86
  const bool simd = simdLevel() >= SimdLevel::Avx2;
#endif
  parallelFor(chunks, 1, [&](int64_t c0, int64_t c1, int) {
    static thread_local std::vector<float> accTl;
    float* acc = threadScratch(accTl, static_cast<size_t>(r * kRedCols));
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t col = ch * kRedCols, nc = std::min(kRedCols, C - col);
      std::memset(acc, 0, sizeof(float) * r * kRedCols);
#if QK_X86
      if (simd) reduceChunkAvx2(u, N, r, x + col, C, nc, acc);
      else
#endif
        reduceChunkScalar(u, N, r, x + col, C, nc, acc);
      for (int j = 0; j < r; ++j)
        for (int64_t c = 0; c < nc; ++c) {
          float& dst = transOut ? g[(col + c) * r + j] : g[j * C + col + c];
          dst += alpha * acc[j * kRedCols + c];
        }
    }
  });
}
}  // namespace

// =============================================================================================
// Linear + LoRA branch
// =============================================================================================
namespace {
thread_local std::vector<float> tlXd, tlU, tlDu;
}

void loraLinearForward(const float* x, int64_t N, const WeightView& w, const float* bias, const LoraBranch* lora,
                       float* y, bool accumulate, float* u) {
  linearForward(x, N, w, bias, y, accumulate);  // y (+)= x·Wᵀ + b
  if (!lora || N <= 0) return;
  const int64_t in = w.cols, out = w.rows, r = lora->rank;
  const float* xin = x;
  if (lora->dropout > 0.f) {
    float* xd = threadScratch(tlXd, static_cast<size_t>(N * in));
    dropoutApply(x, xd, N, in, lora->dropout, lora->key, false);  // drop(x)
    xin = xd;
  }
  float* uu = u ? u : threadScratch(tlU, static_cast<size_t>(N * r));
  gemmF32(false, true, N, r, in, 1.f, xin, in, lora->a, in, 0.f, uu, r);                // u = drop(x)·Aᵀ  [N, r]
  gemmF32(false, true, N, out, r, lora->scaling, uu, r, lora->b, r, 1.f, y, out);       // y += s·u·Bᵀ     [N, out]
}

void loraLinearBackward(const float* x, const float* u, const float* dy, int64_t N, const WeightView& w,
                        const LoraBranch* lora, float* dx, bool accumulate, bool needDx) {
  if (needDx) linearBackwardInput(dy, N, w, dx, accumulate);  // dx (+)= dy·W
  if (!lora || N <= 0) return;
  const int64_t in = w.cols, out = w.rows, r = lora->rank;
  const float s = lora->scaling;
  float* du = threadScratch(tlDu, static_cast<size_t>(N * r));
  gemmF32(false, false, N, r, out, s, dy, out, lora->b, r, 0.f, du, r);   // du = s·dy·B        [N, r]
  tokenReduce(u, N, static_cast<int>(r), dy, out, s, lora->gb, true);     // dB += s·(uᵀ·dy)ᵀ   [out, r]
  const float* xin = x;
  float* xd = nullptr;
  if (lora->dropout > 0.f) {
    xd = threadScratch(tlXd, static_cast<size_t>(N * in));
    dropoutApply(x, xd, N, in, lora->dropout, lora->key, false);  // the forward's drop(x), regenerated
    xin = xd;
  }
  tokenReduce(du, N, static_cast<int>(r), xin, in, 1.f, lora->ga, false);  // dA += duᵀ·drop(x)   [r, in]
  if (!needDx) return;
  if (lora->dropout > 0.f) {
    gemmF32(false, false, N, in, r, 1.f, du, r, lora->a, in, 0.f, xd, in);  // du·A            [N, in]
    dropoutApply(xd, dx, N, in, lora->dropout, lora->key, true);             // dx += drop'(du·A)
  } else {
    gemmF32(false, false, N, in, r, 1.f, du, r, lora->a, in, 1.f, dx, in);  // dx += du·A
  }
}

}  // namespace qk
