// NF4 4-bit blockwise quantization, bitsandbytes-exact (docs/formats.md §1-2, docs/kernels.md).
//
// Layout of a tensor of n elements (flat row-major index i, blocks ignore rows):
//   absmax[b]     float32, b = 0 .. ceil(n/bs)-1, max |x| over elements [b*bs, min(n,(b+1)*bs))
//   packed[j]     uint8,   j = 0 .. ceil(n/2)-1, (code(x[2j]) << 4) | code(x[2j+1])
//                 (even element in the HIGH nibble; odd n: the last low nibble is code 7)
//   code(x)       nearest NF4 value to x * (1/absmax) by strict `>` against float32 midpoints
//   x'[i]         = NF4[code_i] * absmax[i / bs]          (float32 multiply)
// Double quantization of absmax (B values, nested block 256):
//   offset        = mean(absmax) (float32; computed in double and rounded once)
//   nested[c]     = max |absmax[i] - offset| over i in [c*256, (c+1)*256)
//   qabsmax[i]    = nearest index into the signed 8-bit dynamic map of (absmax[i]-offset)*(1/nested[c])
//   absmax'[i]    = map[qabsmax[i]] * nested[i/256] + offset   (float32 mul, then float32 add)
#pragma once
#include <cstddef>
#include <cstdint>

namespace qk {

// Element types of raw little-endian input buffers (safetensors dtypes F32, F16, BF16).
enum class FloatType { F32, F16, BF16 };

extern const float kNf4Code[16];

// Blocksizes bitsandbytes accepts for 4-bit: powers of two 32..4096.
bool nf4ValidBlocksize(int64_t blocksize);

// src: n elements of `type` (any alignment); packed: (n+1)/2 bytes; absmax: ceil(n/blocksize) floats.
// Threaded (qk::parallelFor over blocks). NaN elements are ignored by absmax and get code 0;
// an all-zero block gets absmax 0 and bytes 0x77. Throws std::invalid_argument on a bad blocksize.
void nf4Quantize(const void* src, FloatType type, int64_t n, int blocksize, uint8_t* packed, float* absmax);

// out[i] = NF4[code_i] * absmax[i / blocksize] for i < n. Threaded.
void nf4Dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out);
// Same values rounded to bfloat16 (nearest even). Threaded.
void nf4DequantizeBf16(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, uint16_t* out);

// Single-threaded decode of the flat elements [start, start+len) (any start, odd or not) into out:
// the building block of the matmul tile loaders (call it from inside a parallelFor body).
void nf4DequantizeRange(const uint8_t* packed, const float* absmax, int blocksize, int64_t start, int64_t len,
                        float* out);

// bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), float32, 256 sorted
// values, with torch's scalar CPU linspace (start + step*i below the halfway point, end - step*(steps-1-i) above).
void dynamicMap8bit(float out[256]);

// Double quantization. absmax: nb values; quantMap: 256 sorted codes (normally dynamicMap8bit);
// q: nb bytes; nestedAbsmax: ceil(nb/nestedBlocksize) floats. Returns the offset (float32 mean).
// Nearest code = bucketize on float32 midpoints of quantMap (ties to the lower index) of
// clamp((absmax-offset) * (1/max(nested, 1e-38)), -1, 1). Threaded.
float nf4DoubleQuantize(const float* absmax, int64_t nb, int nestedBlocksize, const float* quantMap, uint8_t* q,
                        float* nestedAbsmax);
// out[i] = quantMap[q[i]] * nestedAbsmax[i / nestedBlocksize] + offset (float32, no FMA). Threaded.
void nf4DequantizeAbsmax(const uint8_t* q, const float* nestedAbsmax, float offset, const float* quantMap,
                         int64_t nb, int nestedBlocksize, float* out);

// Threaded memcpy: the machine's copy bandwidth reference for the benchmarks.
void streamCopy(const void* src, void* dst, size_t bytes);

}  // namespace qk
