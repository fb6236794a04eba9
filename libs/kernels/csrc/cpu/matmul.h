// Linear layers over frozen weights (f32 / f16 / bf16 / NF4) and a dense f32 GEMM.
// The native model engine calls these directly; the N-API bindings (napi/matmul_napi.cpp) too.
//
//   linearForward        y[M,N]  (=|+=)  x[M,K] · W[N,K]ᵀ (+ bias[N])
//   linearBackwardInput  dx[M,K] (=|+=)  dy[M,N] · W[N,K]
//   gemmF32              C[M,N]  = alpha · op(A)[M,K] · op(B)[K,N] + beta · C
//
// NF4 weights are decoded tile by tile inside the kernels (never a full-precision copy of W):
// M <= 8 streams W once with in-register decoding; larger M decodes a panel of W into a per-thread
// L2-sized buffer and runs a register-blocked micro-kernel (docs/kernels.md). Each call is one
// qk::parallelFor region: do not call these from inside a parallelFor body (the pool is not
// re-entrant). Results depend on the SIMD level only through summation order.
#pragma once
#include <cstdint>

namespace qk {

enum class WType { F32, F16, BF16, NF4 };

struct WeightView {             // a frozen weight W[rows=N (out), cols=K (in)], row-major
  WType type;
  const void* data;             // f32/f16/bf16 elements (any alignment), or NF4 packed bytes
                                // (flat index, high nibble = even element)
  const float* absmax;          // NF4: one scale per `blocksize` elements of the flat index (double quant resolved)
  int64_t rows, cols;
  int blocksize;                // NF4: a power of two in 32..4096
};

// y[M,N] = x[M,K]·Wᵀ (+ bias[N]); accumulate → y += x·Wᵀ (+ bias). bias may be null.
void linearForward(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate);

// Decode-time NF4 linear with int8 activations (docs/kernels.md §3, "int8 decode path"), same
// contract as linearForward but approximate: per call, every row of x is quantized per weight block
// along K to int8 (q = round(x·127/max|x|), |q| <= 127), the 16 NF4 code values are replaced by
// int8 round(code·127), each block's dot product is an exact int32 and is scaled once:
//   y[m,n] (=|+=) Σ_b float(dot[m,n,b]) · xf[m,b] · absmax[n,b] (+ bias[n]),  xf = max|x| / 127²
// Applies when int8DecodeApplies(M, w) (NF4, K % blocksize == 0, 1 <= M <= 8); any other call
// runs linearForward unchanged. A block of x with a NaN/inf makes its outputs NaN; a block with
// max|x| < 1e-30 is treated as zeros.
void linearForwardInt8(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate);
bool int8DecodeApplies(int64_t M, const WeightView& w);

// dx[M,K] (=|+=) dy[M,N]·W — input gradient through a frozen weight (training backward).
void linearBackwardInput(const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate);

// Dense f32 GEMM, row-major, C = alpha·op(A)·op(B) + beta·C; op(A) is [M,K], op(B) is [K,N].
// transA: A is stored [K,M] (lda >= M); transB: B is stored [N,K] (ldb >= K). beta == 0: C is not read.
void gemmF32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Decodes the flat elements [start, start+len) of a weight into floats (single-threaded; usable
// inside a parallelFor body): embedding lookups, tests, tile loaders.
void weightDecode(const WeightView& w, int64_t start, int64_t len, float* out);

}  // namespace qk
