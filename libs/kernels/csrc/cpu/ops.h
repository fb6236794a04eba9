// Elementwise and per-row kernels of the transformer forward pass: norms, RoPE, activations,
// softmax, embedding lookup, small vector helpers. All activations are fp32.
//
// Every kernel has a scalar reference and AVX2 (+ AVX-512 where it is cheap) variants chosen at
// run time by qk::simdLevel(). Two layers of API:
//  - the *Row / vector helpers (dot, axpy, ...) are single-threaded and safe inside a
//    qk::parallelFor region (the pool is not re-entrant);
//  - the multi-row entry points (rmsNormForward, ...) split their rows over qk::parallelFor
//    with a grain that keeps small calls (decode: one row) on the caller's thread.
//    Never call them from inside a parallel region.
#pragma once
#include <cstdint>

#include "cpu/nf4.h"

namespace qk {

// ---- small vector helpers (single thread) -------------------------------------------------
float dot(const float* a, const float* b, int64_t n);          // Σ a[i]·b[i]
void axpy(float alpha, const float* x, float* y, int64_t n);   // y += alpha·x
void scale(float* x, float alpha, int64_t n);                  // x *= alpha
void addInto(float* y, const float* x, int64_t n);             // y += x
float maxOf(const float* x, int64_t n);                        // max x[i] (n >= 1)
// x[i] = exp(x[i] - shift); returns Σ x[i] (accumulated in fp32, lane-wise in SIMD variants)
float expShiftSum(float* x, float shift, int64_t n);

// ---- norms ----------------------------------------------------------------------------
// RMSNorm (Llama, computed in fp32): y[r,:] = x[r,:] · rsqrt(mean(x[r,:]²) + eps) · w
// x, y: [rows, dim]; w: [dim]; y may alias x.
void rmsNormRow(const float* x, const float* w, float* y, int64_t dim, float eps);
void rmsNormForward(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps);

// LayerNorm (OPT): y = (x - mean)/sqrt(var + eps) · w + b, biased variance, two passes.
// w and b may be null (no affine). y may alias x.
void layerNormRow(const float* x, const float* w, const float* b, float* y, int64_t dim, float eps);
void layerNormForward(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                      float eps);

// ---- rotary position embedding (Hugging Face "rotate_half" convention) ----------------------
struct RopeParams {
  int headDim = 0;
  float theta = 10000.f;
  bool llama3 = false;  // llama3 rope_scaling (transformers _compute_llama3_parameters)
  float factor = 1.f, lowFreqFactor = 1.f, highFreqFactor = 4.f, originalMaxPositions = 8192.f;
};
// invFreq[j] = 1 / theta^(2j/hd), j < hd/2, then the llama3 frequency remap when enabled.
void ropeInvFreq(const RopeParams& p, float* invFreq);
// cosT/sinT[p, j] = cos/sin(p · invFreq[j]) for p < positions, j < half (fp32 product, as HF).
void ropeTables(const float* invFreq, int half, int64_t positions, float* cosT, float* sinT);
// In place on x: [T, nHeads·hd]; token t uses table row pos[t]:
//   x1 = x[j], x2 = x[j+hd/2]:  x[j] = x1·c - x2·s;  x[j+hd/2] = x2·c + x1·s
void ropeForward(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                 const float* sinT);
// The rotation both directions use: by +θ (ropeForward), or by −θ when `inverse` (backward.h
// ropeBackward, the transpose).
void ropeRotate(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT, const float* sinT,
                bool inverse);

// ---- activations ----------------------------------------------------------------------
enum class Activation { Silu = 0, Relu = 1, Gelu = 2 };  // gelu: exact erf form (HF "gelu")
// y = act(x), n elements (y may alias x)
void activationForward(Activation act, const float* x, float* y, int64_t n);
// y = act(gate) · up (SwiGLU when act = silu); y may alias gate or up
void gatedActivationForward(Activation act, const float* gate, const float* up, float* y, int64_t n);

// ---- softmax --------------------------------------------------------------------------
// In place, per row: x[r,:] = exp(x - max) / Σ exp(x - max)
void softmaxRow(float* x, int64_t n);
void softmaxForward(float* x, int64_t rows, int64_t n);

// ---- embedding lookup -------------------------------------------------------------------
// Row-major table [rows, cols] in any weight dtype. NF4: packed codes (even element in the high
// nibble), one fp32 absmax per `blocksize` consecutive elements of the flattened table.
enum class TableType { F32 = 0, F16 = 1, BF16 = 2, NF4 = 3 };
struct TableView {
  TableType type = TableType::F32;
  const void* data = nullptr;
  const float* absmax = nullptr;  // NF4 only: fp32 scales, or null when absmaxDq holds them
  int64_t rows = 0, cols = 0;
  int blocksize = 64;             // NF4 only
  Nf4DoubleQuantAbsmax absmaxDq{};  // NF4 only: double-quantized scales (nf4.h), used when absmax is null
};
// out[cols] (=|+=) table[row, :] dequantized to fp32.
void tableRow(const TableView& t, int64_t row, float* out, bool accumulate);
// out[T, cols] (=|+=) table[ids[t], :]; ids must be in range (checked by the caller).
void embeddingForward(const TableView& t, const int32_t* ids, int64_t T, float* out, bool accumulate);

// fp16 / bf16 → fp32 (scalar, exact)
float halfToFloat(uint16_t h);
float bf16ToFloat(uint16_t h);

}  // namespace qk
