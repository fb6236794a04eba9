// Internal helpers shared by the NF4 and matmul kernels: the NF4 table and its midpoints,
// exact scalar f16/bf16 conversions and unaligned loads. Not part of the public C++ API.
#pragma once
#include <cstdint>
#include <cstring>

namespace qk {
namespace nf4detail {

// NF4 code -> value (bitsandbytes get_4bit_type("nf4"), float32, sorted ascending; code 7 is 0).
alignas(64) inline constexpr float kCode[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Decision thresholds: float32 midpoints (code[i] + code[i+1]) / 2, evaluated in float32 exactly as
// torch does for the default-path bounds (and equal to the CUDA dQuantizeNF4 literals).
// code(x) = #{ i : x > mid[i] } — strict `>`, so an exact midpoint goes to the LOWER code and
// NaN (every comparison false) gives code 0.
constexpr float mid(int i) { return (kCode[i] + kCode[i + 1]) / 2.0f; }
alignas(64) inline constexpr float kMid[16] = {
    mid(0), mid(1), mid(2),  mid(3),  mid(4),  mid(5),  mid(6), mid(7),
    mid(8), mid(9), mid(10), mid(11), mid(12), mid(13), mid(14),
    3.0e38f,  // padding (never exceeded by a finite scaled value; lets SIMD tables be 16 wide)
};

// Scalar nearest-code rule (the reference every SIMD path must reproduce bit for bit).
inline int nearestCode(float s) {
  int c = 0;
  for (int i = 0; i < 15; ++i) c += s > kMid[i] ? 1 : 0;
  return c;
}

// The reciprocal used to scale a block: bnb's default path clamps absmax to >= 1e-38 before
// taking 1/absmax, so an all-zero block scales to 0 -> code 7 (byte 0x77) and dequantizes to +0.
inline float blockScale(float absmax) { return 1.0f / (absmax > 1e-38f ? absmax : 1e-38f); }

// One double-quantized block scale, map[code] · nested + offset, with the multiply and the add
// rounded separately (torch's order) even when inlined into FMA-targeted code: the empty asm makes
// the product opaque, so the compiler cannot contract the two into an FMA. The one formula every
// double-quant decode uses (nf4DoubleQuantAbsmaxRange, the GEMV kernels' per-block scales).
inline float dqBlockScale(float mapValue, float nested, float offset) {
  float prod = mapValue * nested;
  __asm__("" : "+x"(prod));
  return prod + offset;
}

inline float loadF32(const void* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
inline uint16_t loadU16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline float bitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t floatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> float32, exact for every input (subnormals, inf; NaN keeps its payload and is
// made quiet, as F16C's vcvtph2ps does).
inline float halfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    // zero / subnormal: man * 2^-24 is exact in float32
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    return bitsToFloat(floatToBits(f) | sign);
  }
  if (exp == 31) return bitsToFloat(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u));
  return bitsToFloat(sign | ((exp + 112u) << 23) | (man << 13));
}

inline float bf16ToFloat(uint16_t b) { return bitsToFloat(static_cast<uint32_t>(b) << 16); }

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN with its sign.
inline uint16_t floatToBf16(float f) {
  uint32_t u = floatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace nf4detail
}  // namespace qk
