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

// The block scales of an NF4 tensor kept double-quantized in memory (bitsandbytes
// compress_statistics; 1 byte per block + 4 bytes per nestedBlocksize blocks instead of 4 bytes per
// block). Block b of the tensor (or of a sub-view starting on a block) has the scale
//   absmax[b] = quantMap[codes[firstBlock + b]] * nestedAbsmax[(firstBlock + b) / nestedBlocksize] + offset
// exactly as nf4DequantizeAbsmax resolves it. `codes == nullptr` means "not double-quantized".
struct Nf4DoubleQuantAbsmax {
  const uint8_t* codes = nullptr;        // one 8-bit code per NF4 block (bnb's U8 `absmax`)
  const float* nestedAbsmax = nullptr;   // one fp32 scale per nestedBlocksize blocks (`nested_absmax`)
  const float* quantMap = nullptr;       // 256 sorted fp32 codes (`nested_quant_map`, dynamicMap8bit)
  float offset = 0.0f;                   // quant state `nested_offset` (the fp32 mean of the absmax)
  int nestedBlocksize = 256;             // quant state `nested_blocksize` (bitsandbytes: 256)
  int64_t firstBlock = 0;                // sub-views (e.g. a row range of lm_head): blocks skipped
  bool present() const { return codes != nullptr; }
};

// out[j] = the scale of block b0 + j, j < count (single-threaded; usable inside a parallelFor body).
// The one decode loop of the double-quantized form: nf4DequantizeAbsmax runs it per thread chunk.
void nf4DoubleQuantAbsmaxRange(const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t count, float* out);

// The scales of blocks [b0, b0 + count) in whichever form the tensor has them: `absmax + b0` when
// the fp32 absmax is given, else the double-quantized form resolved into buf (>= count floats).
// Kernels resolve only the blocks of the row / panel segment they are about to decode, so their
// results are bit-identical to being handed the resolved fp32 absmax.
inline const float* nf4BlockScales(const float* absmax, const Nf4DoubleQuantAbsmax& dq, int64_t b0, int64_t count,
                                   float* buf) {
  if (absmax != nullptr) return absmax + b0;
  nf4DoubleQuantAbsmaxRange(dq, b0, count, buf);
  return buf;
}

// nf4DequantizeRange for a tensor whose scales are in either form (absmax non-null: fp32, else dq):
// the scales of the blocks the range touches are resolved into a per-thread buffer first.
// Single-threaded; bit-identical to nf4DequantizeRange with the resolved absmax.
void nf4DequantizeRangeScaled(const uint8_t* packed, const float* absmax, const Nf4DoubleQuantAbsmax& dq,
                              int blocksize, int64_t start, int64_t len, float* out);

// Threaded memcpy: the machine's copy bandwidth reference for the benchmarks.
void streamCopy(const void* src, void* dst, size_t bytes);

}  // namespace qk
