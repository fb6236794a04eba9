// Self-test of the CUDA emulator (run by scripts/build-emu.mjs after building it): the semantics the
// project's kernels rely on, and the misuse it must catch. Compiled like a .cu file (qk_emu.h
// force-included, launches written as qk_emu::launch). Prints one line per check; exit 1 on failure.
#include <mma.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>

using namespace nvcuda;

static int failures = 0;
static void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}
// Runs fn in a child process; true when it aborted with `message` in its stderr.
static bool aborts(const std::function<void()>& fn, const char* message) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return false;
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 2);
    fn();
    std::_Exit(0);
  }
  close(pipefd[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<size_t>(n));
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) && err.find(message) != std::string::npos;
}

// butterfly sum + a shuffle from lanes that already exited: they deposited nothing, the reader keeps its value
__global__ void shuffles(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
  const float up = __shfl_up_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
  out[32 + threadIdx.x] = up;
}
// block barrier: every thread sees every other thread's write
__global__ void barrier(int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
  __syncthreads();
  out[threadIdx.x] = s[255 - threadIdx.x];
}
// a barrier only some threads of a warp reach: the emulator must report it, not hang
__global__ void divergent(int* out) {
  if (threadIdx.x < 16) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1;
}
// one 16×16×16 bf16 WMMA product of A (row-major) and B (col-major), stored row-major
__global__ void wmmaProduct(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
__global__ void wmmaMisaligned(const float* p) {
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> f;
  wmma::load_matrix_sync(f, p + 1, 16, wmma::mem_row_major);  // 4-byte aligned only
}
__global__ void dynamicSmem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  __syncthreads();
  out[0] = dyn[0];
}
__global__ void addOne(float* x) { x[threadIdx.x] += 1.f; }

int main() {
  float* f;
  int* n;
  cudaMalloc(reinterpret_cast<void**>(&f), 4096 * sizeof(float));
  cudaMalloc(reinterpret_cast<void**>(&n), 4096 * sizeof(int));

  shuffles<<<1, 32>>>(f);
  bool ok = true;
  for (int l = 0; l < 32; ++l) ok = ok && f[l] == 496.f && f[32 + l] == (l == 0 ? 0.f : static_cast<float>(l - 1));
  check(ok, "shuffles: xor butterfly and shfl_up give every lane the hardware's values");

  barrier<<<2, 256>>>(n);
  ok = true;
  for (int t = 0; t < 256; ++t) ok = ok && n[t] == (255 - t) * 3;
  check(ok, "__syncthreads: writes before the barrier are visible after it");

  check(aborts([&] { divergent<<<1, 32>>>(n); }, "deadlock"), "divergent barriers abort with 'deadlock'");

  __nv_bfloat16 *a, *b;
  cudaMalloc(reinterpret_cast<void**>(&a), 256 * sizeof(__nv_bfloat16));
  cudaMalloc(reinterpret_cast<void**>(&b), 256 * sizeof(__nv_bfloat16));
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2bfloat16_rn(static_cast<float>(i % 7) - 3.f);
    b[i] = __float2bfloat16_rn(static_cast<float>(i % 5) - 2.f);
  }
  wmmaProduct<<<1, 32>>>(a, b, f);
  ok = true;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += __bfloat162float(a[r * 16 + k]) * __bfloat162float(b[c * 16 + k]);
      ok = ok && f[r * 16 + c] == s;
    }
  check(ok, "WMMA: bf16 16x16x16 product (col-major B) = the direct sum");
  check(aborts([&] { wmmaMisaligned<<<1, 32>>>(f); }, "not 256-bit aligned"), "WMMA: a misaligned pointer aborts");

  dynamicSmem<<<1, 64, 64 * 1024>>>(f);
  check(cudaGetLastError() == cudaErrorInvalidValue, "64 KB of dynamic shared memory without cudaFuncSetAttribute fails the launch");
  cudaFuncSetAttribute(dynamicSmem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  f[0] = 0.f;
  dynamicSmem<<<1, 64, 64 * 1024>>>(f);
  check(cudaGetLastError() == cudaSuccess && f[0] == 1.f, "... and runs once the attribute allows it");
  dynamicSmem<<<1, 2048, 1024>>>(f);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "more than 1024 threads per block fails the launch");

  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  for (int i = 0; i < 32; ++i) f[i] = 0.f;
  cudaGraph_t g;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  addOne<<<1, 32, 0, s>>>(f);
  cudaStreamEndCapture(s, &g);
  const bool deferred = f[0] == 0.f;
  cudaGraphExec_t e;
  cudaGraphInstantiate(&e, g, 0);
  cudaGraphDestroy(g);
  cudaGraphLaunch(e, s);
  cudaGraphLaunch(e, s);
  check(deferred && f[0] == 2.f && f[31] == 2.f, "stream capture records a launch; each graph launch replays it");
  cudaGraphExecDestroy(e);
  cudaStreamDestroy(s);

  std::printf("%s\n", failures ? "CUDA emulator self-test: FAILED" : "CUDA emulator self-test: passed");
  return failures ? 1 : 0;
}
