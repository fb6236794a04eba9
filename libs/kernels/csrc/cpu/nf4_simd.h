// Internal SIMD building blocks shared by the NF4 and matmul kernels (AVX2 / AVX-512 variants are
// compiled with function target attributes and only called after qk::simdLevel() dispatch).
#pragma once
// GCC 12's AVX-512 headers seed masked intrinsics with _mm512_undefined_*(), which -Wuninitialized
// flags in every caller (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/nf4.h"
#include "cpu/nf4_common.h"

#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// On a level's entry point that calls a generic (untargeted) template driver: inlines the driver and
// its callees, the level's kernels included, into the target-attributed body.
#define QK_FLATTEN __attribute__((flatten))

namespace qk {
namespace nf4detail {

// Element i of a raw f32 / f16 / bf16 buffer (any alignment) as a float: plain scalar code, used by
// the scalar references and by the SIMD kernels' tails alike.
template <FloatType T>
inline float elemAt(const uint8_t* src, int64_t i) {
  if constexpr (T == FloatType::F32) return loadF32(src + 4 * i);
  else if constexpr (T == FloatType::F16) return halfToFloat(loadU16(src + 2 * i));
  else return bf16ToFloat(loadU16(src + 2 * i));
}

// 8 / 16 consecutive elements of a raw f32 / f16 / bf16 buffer (element index i, any alignment) as floats.
template <FloatType T>
QK_AVX2 inline __m256 load8(const uint8_t* src, int64_t i) {
  if constexpr (T == FloatType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(src + 4 * i));
  } else if constexpr (T == FloatType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
  } else {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}

template <FloatType T>
QK_AVX512 inline __m512 load16(const uint8_t* src, int64_t i) {
  if constexpr (T == FloatType::F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(src + 4 * i));
  } else if constexpr (T == FloatType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i)));
  } else {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

// 4 packed bytes -> 8 floats (elements 2j, 2j+1 = high, low nibble of byte j). The bytes are
// broadcast, pshufb puts byte j in int32 lanes 2j and 2j+1, a variable shift brings the high nibble
// down in the even lanes. vpermps looks at index bits 0..2 only, so the two 8-entry halves of the
// (pre-scaled) table are looked up and bit 3 (moved to the sign by << 28) selects between them.
QK_AVX2 inline __m256 decode8(const uint8_t* p, __m256 tlo, __m256 thi) {
  uint32_t raw;
  std::memcpy(&raw, p, 4);
  const __m256i dup = _mm256_setr_epi8(0, -128, -128, -128, 0, -128, -128, -128, 1, -128, -128, -128, 1, -128, -128,
                                       -128, 2, -128, -128, -128, 2, -128, -128, -128, 3, -128, -128, -128, 3, -128,
                                       -128, -128);
  __m256i idx = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(raw)), dup);
  idx = _mm256_srlv_epi32(idx, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0));
  __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 packed bytes -> 16 floats: bytes duplicated (unpacklo with itself), widened to int32, the even
// lanes shifted right by 4; vpermps (zmm) uses index bits 0..3 = the nibble.
QK_AVX512 inline __m512 decode16(const uint8_t* p, __m512 t) {
  __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(x, x));
  idx = _mm512_srlv_epi32(idx, _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
  return _mm512_permutexvar_ps(idx, t);
}

}  // namespace nf4detail
}  // namespace qk
