// The CUDA emulator (docs/cuda.md §8): runs the project's CUDA kernels on the CPU, so their logic —
// index math, masks, barriers, warp shuffles, WMMA tile layouts, shared-memory carve-ups, launch
// configurations — is exercised by the GPU tests on a machine without a GPU. It is not a GPU model:
// no timing, no memory model beyond "a block's threads run cooperatively", GCC's FMA contraction
// (where the CPU has FMA) in place of nvcc's.
//
// This header is force-included (g++ -include) into every csrc/cuda/*.cu, compiled as C++ after
// scripts/build-emu.mjs rewrote each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::qk_emu::launch(kernel, ::qk_emu::LaunchConfig(grid, block, smem, stream), args)`.
//
// Execution: a launch runs its blocks one after another; a block's threads are fibers scheduled
// cooperatively. A fiber runs until it reaches a barrier: __syncthreads (every live thread of the
// block), __syncwarp or a shuffle (every live lane of the warp). A barrier that can never complete
// (lanes of one warp waiting at different kinds of barrier: divergence) aborts with a message.
// `__shared__` variables are function statics (one block runs at a time); dynamic shared memory is
// one buffer per launch. Scheduling order: QLORA_CUDA_EMU_ORDER=reverse runs the fibers in reverse
// order at every step — a result that changes with it is a race.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace qk_emu {

struct ThreadState {
  uint3 threadIdx, blockIdx;
  dim3 blockDim, gridDim;
  int tid, lane, warp;
};
ThreadState& self();  // the running fiber's coordinates

void syncthreads();
void syncwarp();
// Exchanges 8 bytes among the lanes of the running warp: every live lane deposits `v`, then reads
// lane `src` (src out of range or a dead lane: its own value).
uint64_t warpExchange(uint64_t v, int src);
// A warp-collective operation (WMMA): waits for every live lane of the warp, then returns a per-warp
// scratch area (kCollectiveBytes) and whether the caller is the first lane past the barrier (the
// leader performs the operation; the others check that they hold the same operands).
constexpr size_t kCollectiveBytes = 8192;
bool warpCollective(void** scratch);
void* dynamicShared();
[[noreturn]] void fail(const char* what);

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// A kernel with its arguments (evaluated at launch, as CUDA does).
struct Task {
  virtual ~Task() = default;
  virtual void run() = 0;  // the kernel body for the running fiber's coordinates
};
template <class K, class Tuple>
struct KernelTask final : Task {
  K kernel;
  Tuple args;
  KernelTask(K k, Tuple a) : kernel(k), args(std::move(a)) {}
  void run() override { std::apply(kernel, args); }
};

// Runs (or, during a stream capture, records) the task over every block and thread of the
// configuration; takes ownership. `fn` identifies the kernel (cudaFuncSetAttribute's limits).
void runLaunch(const void* fn, const LaunchConfig& c, Task* task);

template <class... P, class... A>
void launch(void (*kernel)(P...), const LaunchConfig& c, A&&... args) {
  using Tuple = std::tuple<std::decay_t<P>...>;
  runLaunch(reinterpret_cast<const void*>(kernel), c,
            new KernelTask<void (*)(P...), Tuple>(kernel, Tuple(std::forward<A>(args)...)));
}

}  // namespace qk_emu

// ---- the CUDA C++ dialect on the host (not in the emulator's own runtime) ---------------------------
#ifndef QK_EMU_RUNTIME
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
#define threadIdx (::qk_emu::self().threadIdx)
#define blockIdx (::qk_emu::self().blockIdx)
#define blockDim (::qk_emu::self().blockDim)
#define gridDim (::qk_emu::self().gridDim)

inline void __syncthreads() { ::qk_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::qk_emu::syncwarp(); }

template <class T>
inline T qk_emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::qk_emu::warpExchange(bits, src);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int laneMask, int = 32) {
  return qk_emu_shfl(v, ::qk_emu::self().lane ^ laneMask);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  const int src = ::qk_emu::self().lane - static_cast<int>(delta);
  const T r = qk_emu_shfl(v, src < 0 ? ::qk_emu::self().lane : src);
  return r;
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  const int src = ::qk_emu::self().lane + static_cast<int>(delta);
  return qk_emu_shfl(v, src > 31 ? ::qk_emu::self().lane : src);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
  return qk_emu_shfl(v, src & 31);
}

template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T atomicAdd(T* p, T v) {  // fibers are cooperative: a plain read-modify-write is atomic
  const T old = *p;
  *p = old + v;
  return old;
}

// IEEE-rounded arithmetic that is never fused into an FMA, as on the device — even when the emulator is
// built with contraction on (QLORA_EMU_CXXFLAGS="-mfma -ffp-contract=fast" imitates nvcc's default
// --fmad=true for plain a·b + c): the empty asm makes the rounded result opaque to the optimizer.
inline float qk_emu_opaque(float r) {
  asm("" : "+x"(r));
  return r;
}
inline float __fmul_rn(float a, float b) { return qk_emu_opaque(a * b); }
inline float __fadd_rn(float a, float b) { return qk_emu_opaque(a + b); }
inline float __fsub_rn(float a, float b) { return qk_emu_opaque(a - b); }
inline float __fdiv_rn(float a, float b) { return qk_emu_opaque(a / b); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
template <class To, class From>
inline To qk_emu_bits(From f) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}
inline unsigned __float_as_uint(float f) { return qk_emu_bits<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return qk_emu_bits<float>(u); }
inline int __float_as_int(float f) { return qk_emu_bits<int>(f); }
inline float __int_as_float(int u) { return qk_emu_bits<float>(u); }
inline unsigned long long __double2ull_rd(double d) { return static_cast<unsigned long long>(std::floor(d)); }

// the typed overload nvcc's cuda_runtime.h provides for kernels (the emulator keys limits by the
// kernel's address, as launch() does)
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#endif  // QK_EMU_RUNTIME
