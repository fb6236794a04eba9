// The engine's view of the linear-layer kernels (csrc/cpu/matmul.h, owned by the matmul kernels).
// Until that header exists this file supplies a private, naive implementation of the same API so
// the engine builds and its tests run; once matmul.h lands the real kernels are used unchanged.
#pragma once
#include <cstdint>

#if __has_include("cpu/matmul.h")
#include "cpu/matmul.h"
#else
#include <cstring>
#include <vector>

#include "cpu/nf4.h"
#include "cpu/ops.h"
#include "cpu/thread_pool.h"

namespace qk {
enum class WType { F32, F16, BF16, NF4 };
struct WeightView {
  WType type;
  const void* data;
  const float* absmax;
  int64_t rows /*N out*/, cols /*K in*/;
  int blocksize;
};

namespace enginefallback {
// One weight row dequantized to fp32 (scratch `buf` of cols floats).
inline const float* weightRow(const WeightView& w, int64_t n, float* buf) {
  TableView t{static_cast<TableType>(w.type), w.data, w.absmax, w.rows, w.cols, w.blocksize};
  tableRow(t, n, buf, false);
  return buf;
}
}  // namespace enginefallback

// y[M,N] (+)= x[M,K]·Wᵀ (+b)
inline void linearForward(const float* x, int64_t M, const WeightView& w, const float* bias, float* y,
                          bool accumulate) {
  const int64_t N = w.rows, K = w.cols;
  parallelFor(N, 16, [&](int64_t b, int64_t e, int) {
    std::vector<float> buf(K);
    for (int64_t n = b; n < e; ++n) {
      const float* wr = enginefallback::weightRow(w, n, buf.data());
      for (int64_t m = 0; m < M; ++m) {
        float s = dot(x + m * K, wr, K) + (bias ? bias[n] : 0.f);
        y[m * N + n] = accumulate ? y[m * N + n] + s : s;
      }
    }
  });
}

// C[M,N] = alpha·op(A)·op(B) + beta·C
inline void gemmF32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k)
        s += (transA ? A[k * lda + m] : A[m * lda + k]) * (transB ? B[n * ldb + k] : B[k * ldb + n]);
      C[m * ldc + n] = alpha * s + (beta == 0.f ? 0.f : beta * C[m * ldc + n]);
    }
}
}  // namespace qk
#endif
