// NF4 quantize / dequantize and double quantization (formats in nf4.h and docs/kernels.md).
// Every kernel has a scalar reference and AVX2 / AVX-512 variants that must match it bit for bit
// (quantization is a pure function of float32 arithmetic that SIMD reproduces exactly: a max, one
// multiply by the same reciprocal, 15 ordered compares).
#include "cpu/nf4.h"


#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/nf4_common.h"
#include "cpu/nf4_simd.h"
#include "cpu/thread_pool.h"


namespace qk {

using namespace nf4detail;

const float kNf4Code[16] = {kCode[0], kCode[1], kCode[2],  kCode[3],  kCode[4],  kCode[5],  kCode[6],  kCode[7],
                            kCode[8], kCode[9], kCode[10], kCode[11], kCode[12], kCode[13], kCode[14], kCode[15]};

bool nf4ValidBlocksize(int64_t bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }

namespace {

void checkBlocksize(int64_t bs) {
  if (!nf4ValidBlocksize(bs))
    throw std::invalid_argument("NF4 blocksize must be a power of two in 32..4096, got " + std::to_string(bs));
}

constexpr int64_t elemBytes(FloatType t) { return t == FloatType::F32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// Quantize one block: elements [i0, i0+len) with i0 a multiple of the (even) blocksize, so the block
// owns bytes [i0/2, (i0+len+1)/2) alone. `simdLen` leading elements (a multiple of 32) may be done by
// SIMD code; the scalar tail below finishes the block with the same reciprocal.

template <FloatType T>
void quantTailScalar(const uint8_t* src, int64_t i0, int64_t from, int64_t len, float inv, uint8_t* packed) {
  int64_t k = from;
  for (; k + 1 < len; k += 2) {
    int hi = nearestCode(elemAt<T>(src, i0 + k) * inv);
    int lo = nearestCode(elemAt<T>(src, i0 + k + 1) * inv);
    packed[(i0 + k) >> 1] = static_cast<uint8_t>((hi << 4) | lo);
  }
  // odd n: the last element's partner is padding, quantized as 0.0 -> code 7 (bnb pads with 0)
  if (k < len) packed[(i0 + k) >> 1] = static_cast<uint8_t>((nearestCode(elemAt<T>(src, i0 + k) * inv) << 4) | 7);
}

template <FloatType T>
float absmaxScalar(const uint8_t* src, int64_t i0, int64_t from, int64_t len, float m) {
  // `a > m ? a : m` ignores NaN (like CUDA's fmaxf and SIMD max(a, m)), so NaN never poisons the block.
  for (int64_t k = from; k < len; ++k) {
    float a = std::fabs(elemAt<T>(src, i0 + k));
    m = a > m ? a : m;
  }
  return m;
}

template <FloatType T>
void quantBlockScalar(const uint8_t* src, int64_t i0, int64_t len, uint8_t* packed, float* absmax) {
  float m = absmaxScalar<T>(src, i0, 0, len, 0.0f);
  *absmax = m;
  quantTailScalar<T>(src, i0, 0, len, blockScale(m), packed);
}

// The SIMD levels' driver over blocks [b0, b1): chunks of ~8K elements, all absmax of a chunk first,
// then all codes (the chunk is still in L1/L2). Separating the passes takes the per-block max-reduce
// -> divide -> scale chain off the critical path (worth ~1.5x at blocksize 64). The block kernels
// are template arguments (direct calls). The driver itself has no target attribute, so GCC will not
// inline a level's block kernels into it; the level wrappers (quantRangeAvx2 / quantRangeAvx512) are
// `flatten`, which inlines the driver and everything it calls into the target-attributed body.
template <float (*BlockAbsmax)(const uint8_t*, int64_t, int64_t),
          void (*BlockCodes)(const uint8_t*, int64_t, int64_t, float, uint8_t*)>
inline void quantRangeTwoPass(const uint8_t* src, int64_t n, int bs, int64_t b0, int64_t b1, uint8_t* packed,
                              float* absmax) {
  const int64_t per = std::max<int64_t>(1, 8192 / bs);
  for (int64_t c0 = b0; c0 < b1; c0 += per) {
    const int64_t c1 = std::min(b1, c0 + per);
    for (int64_t b = c0; b < c1; ++b) absmax[b] = BlockAbsmax(src, b * bs, std::min<int64_t>(bs, n - b * bs));
    for (int64_t b = c0; b < c1; ++b) BlockCodes(src, b * bs, std::min<int64_t>(bs, n - b * bs), blockScale(absmax[b]), packed);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2

// code = #{i : s > mid[i]} by a 4-level binary search on the sorted midpoints, using exactly the
// scalar path's ordered compares (so it is bit-exact, NaN included: every compare false -> 0):
//   code >= 8      <=> s > mid[7]             c  = 8·[s > mid[7]]
//   code >= c + 4  <=> s > mid[c + 3]         c += 4·[...]
//   code >= c + 2  <=> s > mid[c + 1]         c += 2·[...]
//   code >= c + 1  <=> s > mid[c]             c += 1·[...]
// AVX2 keeps h = c/2 (0..7) so the per-level thresholds are 8-entry vpermps tables indexed by h.
struct Nf4SearchTables {
  alignas(32) float l2[8], l3[8], l4[8];
  constexpr Nf4SearchTables() : l2(), l3(), l4() {
    for (int h = 0; h < 8; ++h) {
      l2[h] = kMid[(2 * h + 3) < 15 ? 2 * h + 3 : 14];  // used at h in {0, 4}: mid[3], mid[11]
      l3[h] = kMid[(2 * h + 1) < 15 ? 2 * h + 1 : 14];  // used at h in {0, 2, 4, 6}
      l4[h] = kMid[2 * h];                              // any h
    }
  }
};
constexpr Nf4SearchTables kSearch{};

QK_AVX2 inline __m256i codes8(__m256 s) {
  const __m256i four = _mm256_set1_epi32(4), two = _mm256_set1_epi32(2), one = _mm256_set1_epi32(1);
  __m256 m = _mm256_cmp_ps(s, _mm256_set1_ps(kMid[7]), _CMP_GT_OQ);
  __m256i h = _mm256_and_si256(_mm256_castps_si256(m), four);
  m = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(_mm256_load_ps(kSearch.l2), h), _CMP_GT_OQ);
  h = _mm256_add_epi32(h, _mm256_and_si256(_mm256_castps_si256(m), two));
  m = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(_mm256_load_ps(kSearch.l3), h), _CMP_GT_OQ);
  h = _mm256_add_epi32(h, _mm256_and_si256(_mm256_castps_si256(m), one));
  m = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(_mm256_load_ps(kSearch.l4), h), _CMP_GT_OQ);
  // code = 2h + [s > mid[2h]]  (the mask is -1 where true)
  return _mm256_sub_epi32(_mm256_add_epi32(h, h), _mm256_castps_si256(m));
}

// 4 x 8 int32 codes (elements 0..31 in order) -> 16 packed bytes, even element in the high nibble.
//   packs/packus leave bytes lane-interleaved: lane0 = V0[0..3] V1[0..3] V2[0..3] V3[0..3],
//   lane1 = V0[4..7] ...; maddubs with (16, 1) fuses adjacent (even, odd) pairs into one byte;
//   the final 16-bit unpack of lane0/lane1 restores element order.
QK_AVX2 inline __m128i pack32(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  __m256i m = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0110));
  __m256i w = _mm256_packus_epi16(m, m);
  return _mm_unpacklo_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

QK_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <FloatType T>
QK_AVX2 inline float absmaxBlockAvx2(const uint8_t* src, int64_t i0, int64_t len) {
  const int64_t simdLen = len & ~int64_t(31);
  const __m256 signMask = _mm256_set1_ps(-0.0f);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  for (int64_t k = 0; k < simdLen; k += 16) {
    // max(|x|, m): vmaxps returns the second operand when the first is NaN -> NaN ignored
    m0 = _mm256_max_ps(_mm256_andnot_ps(signMask, load8<T>(src, i0 + k)), m0);
    m1 = _mm256_max_ps(_mm256_andnot_ps(signMask, load8<T>(src, i0 + k + 8)), m1);
  }
  return absmaxScalar<T>(src, i0, simdLen, len, hmax8(_mm256_max_ps(m0, m1)));
}

template <FloatType T>
QK_AVX2 inline void codesBlockAvx2(const uint8_t* src, int64_t i0, int64_t len, float inv, uint8_t* packed) {
  const int64_t simdLen = len & ~int64_t(31);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < simdLen; k += 32) {
    __m256i c0 = codes8(_mm256_mul_ps(load8<T>(src, i0 + k), vinv));
    __m256i c1 = codes8(_mm256_mul_ps(load8<T>(src, i0 + k + 8), vinv));
    __m256i c2 = codes8(_mm256_mul_ps(load8<T>(src, i0 + k + 16), vinv));
    __m256i c3 = codes8(_mm256_mul_ps(load8<T>(src, i0 + k + 24), vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + ((i0 + k) >> 1)), pack32(c0, c1, c2, c3));
  }
  quantTailScalar<T>(src, i0, simdLen, len, inv, packed);
}

template <FloatType T>
QK_AVX2 QK_FLATTEN void quantRangeAvx2(const uint8_t* src, int64_t n, int bs, int64_t b0, int64_t b1,
                                       uint8_t* packed, float* absmax) {
  quantRangeTwoPass<absmaxBlockAvx2<T>, codesBlockAvx2<T>>(src, n, bs, b0, b1, packed, absmax);
}

// ---------------------------------------------------------------------------------------------
// AVX-512

// Same search with the whole 16-entry midpoint table in one zmm (vpermps uses index bits 0..3):
// tables pre-shifted by the level's offset, so the running code c indexes them directly.
struct Nf4SearchTables16 {
  alignas(64) float l2[16], l3[16], l4[16];
  constexpr Nf4SearchTables16() : l2(), l3(), l4() {
    for (int c = 0; c < 16; ++c) {
      l2[c] = kMid[c + 3 < 15 ? c + 3 : 14];
      l3[c] = kMid[c + 1 < 15 ? c + 1 : 14];
      l4[c] = kMid[c < 15 ? c : 14];  // c = 15 is unreachable before the last step
    }
  }
};
constexpr Nf4SearchTables16 kSearch16{};

QK_AVX512 inline __m512i codes16(__m512 s) {
  __m512i c = _mm512_setzero_si512();
  __mmask16 k = _mm512_cmp_ps_mask(s, _mm512_set1_ps(kMid[7]), _CMP_GT_OQ);
  c = _mm512_mask_mov_epi32(c, k, _mm512_set1_epi32(8));
  k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, _mm512_load_ps(kSearch16.l2)), _CMP_GT_OQ);
  c = _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(4));
  k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, _mm512_load_ps(kSearch16.l3)), _CMP_GT_OQ);
  c = _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(2));
  k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, _mm512_load_ps(kSearch16.l4)), _CMP_GT_OQ);
  return _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(1));
}

// 2 x 16 int32 codes -> 16 packed bytes: vpmovdb narrows to bytes in order, maddubs (16, 1) pairs them.
QK_AVX512 inline __m128i pack32x512(__m512i c0, __m512i c1) {
  const __m128i w = _mm_set1_epi16(0x0110);
  __m128i m0 = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(c0), w);
  __m128i m1 = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(c1), w);
  return _mm_packus_epi16(m0, m1);
}

template <FloatType T>
QK_AVX512 inline float absmaxBlockAvx512(const uint8_t* src, int64_t i0, int64_t len) {
  const int64_t simdLen = len & ~int64_t(31);
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  for (int64_t k = 0; k < simdLen; k += 32) {
    m0 = _mm512_max_ps(_mm512_abs_ps(load16<T>(src, i0 + k)), m0);
    m1 = _mm512_max_ps(_mm512_abs_ps(load16<T>(src, i0 + k + 16)), m1);
  }
  return absmaxScalar<T>(src, i0, simdLen, len, _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
}

template <FloatType T>
QK_AVX512 inline void codesBlockAvx512(const uint8_t* src, int64_t i0, int64_t len, float inv, uint8_t* packed) {
  const int64_t simdLen = len & ~int64_t(31);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < simdLen; k += 32) {
    __m512i c0 = codes16(_mm512_mul_ps(load16<T>(src, i0 + k), vinv));
    __m512i c1 = codes16(_mm512_mul_ps(load16<T>(src, i0 + k + 16), vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + ((i0 + k) >> 1)), pack32x512(c0, c1));
  }
  quantTailScalar<T>(src, i0, simdLen, len, inv, packed);
}

template <FloatType T>
QK_AVX512 QK_FLATTEN void quantRangeAvx512(const uint8_t* src, int64_t n, int bs, int64_t b0, int64_t b1,
                                           uint8_t* packed, float* absmax) {
  quantRangeTwoPass<absmaxBlockAvx512<T>, codesBlockAvx512<T>>(src, n, bs, b0, b1, packed, absmax);
}

template <FloatType T>
void quantRangeScalar(const uint8_t* src, int64_t n, int bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
  for (int64_t b = b0; b < b1; ++b) quantBlockScalar<T>(src, b * bs, std::min<int64_t>(bs, n - b * bs), packed, absmax + b);
}

template <FloatType T>
void quantizeTyped(const uint8_t* src, int64_t n, int bs, uint8_t* packed, float* absmax) {
  const int64_t nb = (n + bs - 1) / bs;
  const SimdLevel lvl = simdLevel();
  auto rangeFn = lvl == SimdLevel::Avx512 ? &quantRangeAvx512<T>
                 : lvl == SimdLevel::Avx2 ? &quantRangeAvx2<T>
                                          : &quantRangeScalar<T>;
  // ~32K elements per chunk keeps the pool's fixed cost negligible
  parallelFor(nb, std::max<int64_t>(1, 32768 / bs),
              [&](int64_t b0, int64_t b1, int) { rangeFn(src, n, bs, b0, b1, packed, absmax); });
}

// ---------------------------------------------------------------------------------------------
// Dequantize: flat elements [start, start+len) -> out. Block by block; inside a block the SIMD code
// runs from an even element (byte-aligned) on groups of 8 (AVX2) / 16 (AVX-512) elements.

inline float decodeScalar(const uint8_t* packed, int64_t i, float a) {
  const uint8_t byte = packed[i >> 1];
  return kCode[(i & 1) ? (byte & 15) : (byte >> 4)] * a;
}

void dequantRangeScalar(const uint8_t* packed, const float* absmax, int bs, int64_t start, int64_t len, float* out) {
  for (int64_t k = 0; k < len; ++k) out[k] = decodeScalar(packed, start + k, absmax[(start + k) / bs]);
}

QK_AVX2 void dequantRangeAvx2(const uint8_t* packed, const float* absmax, int bs, int64_t start, int64_t len,
                              float* out) {
  const __m256 clo = _mm256_loadu_ps(kCode), chi = _mm256_loadu_ps(kCode + 8);
  int64_t i = start;
  const int64_t end = start + len;
  while (i < end) {
    const int64_t b = i / bs, blockEnd = std::min<int64_t>(end, (b + 1) * bs);
    const float a = absmax[b];
    if (i & 1) {
      out[i - start] = decodeScalar(packed, i, a);
      ++i;
    }
    // the table scaled once per block: exactly the products kCode[c] * a the scalar path forms
    const __m256 va = _mm256_set1_ps(a);
    const __m256 tlo = _mm256_mul_ps(clo, va), thi = _mm256_mul_ps(chi, va);
    for (; i + 8 <= blockEnd; i += 8) _mm256_storeu_ps(out + (i - start), decode8(packed + (i >> 1), tlo, thi));
    for (; i < blockEnd; ++i) out[i - start] = decodeScalar(packed, i, a);
  }
}

QK_AVX512 void dequantRangeAvx512(const uint8_t* packed, const float* absmax, int bs, int64_t start, int64_t len,
                                  float* out) {
  const __m512 code = _mm512_loadu_ps(kCode);
  int64_t i = start;
  const int64_t end = start + len;
  while (i < end) {
    const int64_t b = i / bs, blockEnd = std::min<int64_t>(end, (b + 1) * bs);
    const float a = absmax[b];
    if (i & 1) {
      out[i - start] = decodeScalar(packed, i, a);
      ++i;
    }
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(a));
    for (; i + 16 <= blockEnd; i += 16) _mm512_storeu_ps(out + (i - start), decode16(packed + (i >> 1), t));
    for (; i < blockEnd; ++i) out[i - start] = decodeScalar(packed, i, a);
  }
}

using DequantFn = void (*)(const uint8_t*, const float*, int, int64_t, int64_t, float*);
DequantFn dequantFn() {
  switch (simdLevel()) {
    case SimdLevel::Avx512: return dequantRangeAvx512;
    case SimdLevel::Avx2: return dequantRangeAvx2;
    default: return dequantRangeScalar;
  }
}

// float32 -> bf16 (round to nearest even, NaN kept quiet), 8 at a time.
QK_AVX2 void toBf16Avx2(const float* in, int64_t n, uint16_t* out) {
  int64_t k = 0;
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  for (; k + 16 <= n; k += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_loadu_ps(in + k + 8 * h);
      __m256i u = _mm256_castps_si256(v);
      __m256i top = _mm256_srli_epi32(u, 16);
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(top, one))), 16);
      __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      r[h] = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_or_si256(top, quiet)), nan));
    }
    // packus works per 128-bit lane: fix the order of the 64-bit quarters afterwards
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), p);
  }
  for (; k < n; ++k) out[k] = floatToBf16(in[k]);
}

void toBf16(const float* in, int64_t n, uint16_t* out) {
  if (simdLevel() != SimdLevel::Scalar) return toBf16Avx2(in, n, out);
  for (int64_t k = 0; k < n; ++k) out[k] = floatToBf16(in[k]);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points

void nf4Quantize(const void* src, FloatType type, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  checkBlocksize(blocksize);
  if (n <= 0) return;
  const auto* s = static_cast<const uint8_t*>(src);
  switch (type) {
    case FloatType::F32: return quantizeTyped<FloatType::F32>(s, n, blocksize, packed, absmax);
    case FloatType::F16: return quantizeTyped<FloatType::F16>(s, n, blocksize, packed, absmax);
    case FloatType::BF16: return quantizeTyped<FloatType::BF16>(s, n, blocksize, packed, absmax);
  }
}

void nf4DequantizeRange(const uint8_t* packed, const float* absmax, int blocksize, int64_t start, int64_t len,
                        float* out) {
  if (len > 0) dequantFn()(packed, absmax, blocksize, start, len, out);
}

namespace {
// Runs span(i0, i1) over [0, n) in parallel, every span starting on a multiple of 64 elements, so
// each starts on a whole byte of the packed codes.
template <typename Span>
void parallelDequantSpans(int64_t n, Span&& span) {
  const int64_t chunks = (n + 63) / 64;
  parallelFor(chunks, 512, [&](int64_t c0, int64_t c1, int) { span(c0 * 64, std::min(n, c1 * 64)); });
}
}  // namespace

void nf4Dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out) {
  checkBlocksize(blocksize);
  if (n <= 0) return;
  DequantFn fn = dequantFn();
  parallelDequantSpans(n, [&](int64_t i0, int64_t i1) { fn(packed, absmax, blocksize, i0, i1 - i0, out + i0); });
}

void nf4DequantizeBf16(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, uint16_t* out) {
  checkBlocksize(blocksize);
  if (n <= 0) return;
  DequantFn fn = dequantFn();
  parallelDequantSpans(n, [&](int64_t i0, int64_t i1) {
    // decode through a small L1-resident float buffer, then round to bf16
    alignas(64) float tmp[2048];
    for (int64_t i = i0; i < i1; i += 2048) {
      const int64_t len = std::min<int64_t>(2048, i1 - i);
      fn(packed, absmax, blocksize, i, len, tmp);
      toBf16(tmp, len, out + i);
    }
  });
}

void dynamicMap8bit(float out[256]) {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): non_sign_bits = 7,
  // additional_items = 2^(7-7) - 1 = 0; for i in 0..6: 2^i + 1 linspace(0.1, 1) boundaries (float32),
  // their float32 means scaled by float32(10^(i-6)), and the negatives; plus 0 and 1.0.
  float vals[256];
  int cnt = 0;
  for (int i = 0; i < 7; ++i) {
    const int64_t steps = (int64_t(1) << i) + 1;
    const float start = 0.1f, end = 1.0f;
    // torch's CPU linspace kernel (float32 step, the scalar two-sided formula)
    const float step = (end - start) / static_cast<float>(steps - 1);
    float bnd[65];
    for (int64_t k = 0; k < steps; ++k) {
      if (k < steps / 2) {
        const float t = step * static_cast<float>(k);
        bnd[k] = start + t;
      } else {
        const float t = step * static_cast<float>(steps - k - 1);
        bnd[k] = end - t;
      }
    }
    // 10 ** (i - 6): a Python float (int 1 for i = 6), cast to the tensor's float32 by torch
    static const double kPow10[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    const float scale = static_cast<float>(kPow10[i]);
    for (int64_t k = 0; k + 1 < steps; ++k) {
      const float sum = bnd[k] + bnd[k + 1];
      const float mean = sum / 2.0f;
      vals[cnt++] = scale * mean;
      vals[cnt++] = -scale * mean;
    }
  }
  vals[cnt++] = 0.0f;
  vals[cnt++] = 1.0f;
  std::sort(vals, vals + cnt);
  std::memcpy(out, vals, sizeof(float) * 256);
}

float nf4DoubleQuantize(const float* absmax, int64_t nb, int nestedBlocksize, const float* quantMap, uint8_t* q,
                        float* nestedAbsmax) {
  if (nestedBlocksize <= 0) throw std::invalid_argument("nested blocksize must be positive");
  if (nb <= 0) return 0.0f;
  // offset = float32 mean; summed in double (sequentially: the result does not depend on the thread count)
  double sum = 0.0;
  for (int64_t i = 0; i < nb; ++i) sum += absmax[i];
  const float offset = static_cast<float>(sum / static_cast<double>(nb));
  // bucketize bounds: float32 midpoints of the sorted map
  float bounds[255];
  for (int j = 0; j < 255; ++j) bounds[j] = (quantMap[j] + quantMap[j + 1]) / 2.0f;
  const int64_t nbs = nestedBlocksize, nn = (nb + nbs - 1) / nbs;
  parallelFor(nn, std::max<int64_t>(1, 16384 / nbs), [&](int64_t c0, int64_t c1, int) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * nbs, i1 = std::min(nb, i0 + nbs);
      float m = 0.0f;
      for (int64_t i = i0; i < i1; ++i) {
        float a = std::fabs(absmax[i] - offset);
        m = a > m ? a : m;
      }
      nestedAbsmax[c] = m;
      const float inv = blockScale(m);
      for (int64_t i = i0; i < i1; ++i) {
        float s = (absmax[i] - offset) * inv;
        s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
        // first bound >= s = number of bounds < s: ties go to the lower index (torch.bucketize, right=False)
        q[i] = static_cast<uint8_t>(std::lower_bound(bounds, bounds + 255, s) - bounds);
      }
    }
  });
  return offset;
}

namespace {

// Resolving double-quantized scales: out[j] = map[codes[b]] * nested[b / nbs] + offset for the
// blocks b = firstBlock + b0 + j. Walked nested block by nested block (one scale per segment, no
// division per element: a 64-bit divide per block cost ~1400 cycles per 8192-wide row, more than the
// int8 GEMV of the row itself). The multiply and the add round separately, as in torch
// (dqBlockScale; the AVX2 variant has target("avx2") only — never "fma" — so its vector mul and
// add cannot be contracted either).
// The end (exclusive, relative to b0) of the nested block that block b0 + j lies in, capped at count.
inline int64_t nestedSegmentEnd(const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t j, int64_t count) {
  const int64_t b = dq.firstBlock + b0 + j, nbs = dq.nestedBlocksize;
  return std::min(count, j + (b / nbs + 1) * nbs - b);
}

void dqAbsmaxScalar(const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t count, float* out) {
  const uint8_t* codes = dq.codes + dq.firstBlock + b0;
  for (int64_t j = 0; j < count;) {
    const int64_t end = nestedSegmentEnd(dq, b0, j, count);
    const float scale = dq.nestedAbsmax[(dq.firstBlock + b0 + j) / dq.nestedBlocksize];
    for (; j < end; ++j) out[j] = dqBlockScale(dq.quantMap[codes[j]], scale, dq.offset);
  }
}

// 8 codes at a time: widen to int32, gather from the 256-entry map, multiply, add. (No lambdas
// here: a lambda body would not inherit the target attribute.)
__attribute__((target("avx2"))) void dqAbsmaxAvx2(const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t count,
                                                   float* out) {
  const uint8_t* codes = dq.codes + dq.firstBlock + b0;
  const __m256 voff = _mm256_set1_ps(dq.offset);
  for (int64_t j = 0; j < count;) {
    const int64_t end = nestedSegmentEnd(dq, b0, j, count);
    const float scale = dq.nestedAbsmax[(dq.firstBlock + b0 + j) / dq.nestedBlocksize];
    const __m256 vs = _mm256_set1_ps(scale);
    for (; j + 8 <= end; j += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
      const __m256 prod = _mm256_mul_ps(_mm256_i32gather_ps(dq.quantMap, idx, 4), vs);
      _mm256_storeu_ps(out + j, _mm256_add_ps(prod, voff));
    }
    for (; j < end; ++j) out[j] = dqBlockScale(dq.quantMap[codes[j]], scale, dq.offset);
  }
}

}  // namespace

void nf4DoubleQuantAbsmaxRange(const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t count, float* out) {
  if (count <= 0) return;
  if (simdLevel() == SimdLevel::Scalar) dqAbsmaxScalar(dq, b0, count, out);
  else dqAbsmaxAvx2(dq, b0, count, out);  // AVX-512 CPUs: the AVX2 gather (8 scales per row of 64+ weights is plenty)
}

void nf4DequantizeAbsmax(const uint8_t* q, const float* nestedAbsmax, float offset, const float* quantMap, int64_t nb,
                         int nestedBlocksize, float* out) {
  if (nestedBlocksize <= 0) throw std::invalid_argument("nested blocksize must be positive");
  Nf4DoubleQuantAbsmax dq;
  dq.codes = q;
  dq.nestedAbsmax = nestedAbsmax;
  dq.quantMap = quantMap;
  dq.offset = offset;
  dq.nestedBlocksize = nestedBlocksize;
  parallelFor(nb, 65536, [&](int64_t i0, int64_t i1, int) { nf4DoubleQuantAbsmaxRange(dq, i0, i1 - i0, out + i0); });
}

void nf4DequantizeRangeScaled(const uint8_t* packed, const float* absmax, const Nf4DoubleQuantAbsmax& dq,
                              int blocksize, int64_t start, int64_t len, float* out) {
  if (len <= 0) return;
  if (absmax != nullptr) return nf4DequantizeRange(packed, absmax, blocksize, start, len, out);
  // Rebase on the first block the range touches (b0·blocksize is even: the packed bytes rebase too)
  // so the resolved scales can live in a small buffer indexed from 0.
  const int64_t b0 = start / blocksize, b1 = (start + len - 1) / blocksize + 1;
  thread_local std::vector<float> scales;
  if (static_cast<int64_t>(scales.size()) < b1 - b0) scales.resize(static_cast<size_t>(b1 - b0));
  nf4DoubleQuantAbsmaxRange(dq, b0, b1 - b0, scales.data());
  dequantFn()(packed + b0 * blocksize / 2, scales.data(), blocksize, start - b0 * blocksize, len, out);
}

void streamCopy(const void* src, void* dst, size_t bytes) {
  const int64_t pages = static_cast<int64_t>((bytes + 4095) / 4096);
  parallelFor(pages, 256, [&](int64_t p0, int64_t p1, int) {
    const size_t b0 = static_cast<size_t>(p0) * 4096, b1 = std::min(bytes, static_cast<size_t>(p1) * 4096);
    std::memcpy(static_cast<uint8_t*>(dst) + b0, static_cast<const uint8_t*>(src) + b0, b1 - b0);
  });
}

}  // namespace qk
