// nvcuda::wmma for the CUDA emulator (qk_emu.h): a fragment holds its whole tile in every lane (the
// hardware spreads it over the warp in an unspecified layout, which correct code never depends on
// except through x[i] elementwise), so load / mma / store are each lane computing the full tile.
// The hardware's requirements are checked and abort with a message: 256-bit aligned pointers and
// ldm a multiple of 16 bytes. TF32 operands are truncated to TF32 in mma_sync as the tensor cores do
// (kernels round them first with __float_to_tf32); bf16 / half products are exact in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qk_emu {
[[noreturn]] void fail(const char* what);
bool warpCollective(void** scratch);
}

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace detail {
template <class Use, int M, int N, int K>
struct Shape {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
};
inline float toFloat(float v) { return v; }
inline float toFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float toFloat(__half v) { return __half2float(v); }
inline float tf32Trunc(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}
template <class T>
void checkPointer(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) qk_emu::fail("wmma: pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) qk_emu::fail("wmma: ldm not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows, cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  using element_type = std::conditional_t<std::is_same<T, precision::tf32>::value, float, T>;
  float x[rows * cols];  // element (r, c) at x[r·cols + c], as a float value
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

namespace detail {
// The leader records its operands in the warp's scratch; every other lane must hold the same bits.
inline void agree(bool leader, char* scratch, size_t at, const void* mine, size_t bytes, const char* what) {
  if (leader) std::memcpy(scratch + at, mine, bytes);
  else if (std::memcmp(scratch + at, mine, bytes) != 0) qk_emu::fail(what);
}
struct Call {
  const void* p;
  unsigned ldm;
  int layout;
};
}  // namespace detail

// matrix_a / matrix_b: the layout is the fragment's. Collective: after every lane's earlier stores.
template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  void* sc;
  const bool leader = qk_emu::warpCollective(&sc);
  const detail::Call call{p, ldm, 0};
  detail::agree(leader, static_cast<char*>(sc), 0, &call, sizeof call, "wmma::load_matrix_sync: lanes disagree on the pointer");
  detail::checkPointer(p, ldm);
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = detail::toFloat(std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned ldm, layout_t l) {
  void* sc;
  const bool leader = qk_emu::warpCollective(&sc);
  const detail::Call call{p, ldm, static_cast<int>(l)};
  detail::agree(leader, static_cast<char*>(sc), 0, &call, sizeof call, "wmma::load_matrix_sync: lanes disagree on the pointer");
  detail::checkPointer(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
// Collective: the leader writes, every lane must hold the same tile.
template <int M, int N, int K, class T>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  void* sc;
  const bool leader = qk_emu::warpCollective(&sc);
  const detail::Call call{p, ldm, static_cast<int>(l)};
  char* s = static_cast<char*>(sc);
  detail::agree(leader, s, 0, &call, sizeof call, "wmma::store_matrix_sync: lanes disagree on the pointer");
  detail::agree(leader, s, 64, f.x, sizeof f.x, "wmma::store_matrix_sync: lanes hold different tiles");
  if (!leader) return;
  detail::checkPointer(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

// Collective: the leader multiplies, the others check their operands and take its result.
template <int M, int N, int K, class TA, class LA, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  static_assert(sizeof a.x + sizeof b.x + 2 * sizeof c.x <= 8192, "scratch");
  void* sc;
  const bool leader = qk_emu::warpCollective(&sc);
  char* s = static_cast<char*>(sc);
  const size_t oa = 0, ob = oa + sizeof a.x, oc = ob + sizeof b.x, od = oc + sizeof c.x;
  detail::agree(leader, s, oa, a.x, sizeof a.x, "wmma::mma_sync: lanes hold different A fragments");
  detail::agree(leader, s, ob, b.x, sizeof b.x, "wmma::mma_sync: lanes hold different B fragments");
  detail::agree(leader, s, oc, c.x, sizeof c.x, "wmma::mma_sync: lanes hold different C fragments");
  if (leader) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = c.x[i * N + j];
        for (int k = 0; k < K; ++k) {
          const float av = tf32 ? detail::tf32Trunc(a.x[i * K + k]) : a.x[i * K + k];
          const float bv = tf32 ? detail::tf32Trunc(b.x[k * N + j]) : b.x[k * N + j];
          acc += av * bv;
        }
        out[i * N + j] = acc;
      }
    std::memcpy(s + od, out, sizeof out);
  }
  std::memcpy(d.x, s + od, sizeof d.x);
}

}  // namespace wmma
}  // namespace nvcuda
