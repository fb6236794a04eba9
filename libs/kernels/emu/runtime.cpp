// The CUDA emulator's runtime (qk_emu.h): the CUDA runtime API calls the project makes, on host
// memory, and the fiber scheduler that runs kernel blocks. Linked instead of libcudart_static by
// scripts/build-emu.mjs; one emulated device ("qlora CUDA emulator", sm_90-like limits).
//
// Streams are synchronous (every operation completes in the call); a stream capture records the
// launches, copies and memsets issued on the capturing stream, and cudaGraphLaunch replays them.
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#define QK_EMU_RUNTIME
#include "qk_emu.h"

// ---- fibers: a minimal x86-64 System V context switch (callee-saved registers + stack pointer) ----
extern "C" void qk_emu_switch(void** saveSp, void* loadSp);
asm(R"(
.text
.globl qk_emu_switch
.type qk_emu_switch, @function
qk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size qk_emu_switch, .-qk_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

struct CUstream_st {
  int id;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point t;
};
struct CUgraph_st {
  std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> ops;
};

namespace qk_emu {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "qlora CUDA emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

namespace {

constexpr size_t kStackBytes = 256 * 1024;
enum State { kReady, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  uint64_t exchanges = 0;  // shuffles this thread has made (a lane's slot is valid for the same count)
  char* stack = nullptr;
  ThreadState ts{};
  State state = kReady;
};

struct Warp {
  int live = 0, arrived = 0;
  int passed = 0;  // lanes past the last released barrier (the first is a collective's leader)
  uint64_t slot[32] = {};
  uint64_t slotSeq[32] = {};  // the depositing lane's exchange count
  alignas(64) char scratch[kCollectiveBytes];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, arrived = 0;
  void* schedulerSp = nullptr;
  Fiber* current = nullptr;
  Task* task = nullptr;
  void* dynamicShared = nullptr;
};

thread_local Block* tBlock = nullptr;
thread_local std::vector<char*> tStacks;  // reused between launches

bool reverseOrder() {
  static const bool r = [] {
    const char* e = std::getenv("QLORA_CUDA_EMU_ORDER");
    return e && std::strcmp(e, "reverse") == 0;
  }();
  return r;
}

char* stackFor(size_t i) {
  while (tStacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    tStacks.push_back(static_cast<char*>(p));
  }
  return tStacks[i];
}

void yieldToScheduler() {
  Block* b = tBlock;
  qk_emu_switch(&b->current->sp, b->schedulerSp);
}

void releaseWarp(Block* b, int w) {
  Warp& W = b->warps[static_cast<size_t>(w)];
  W.arrived = 0;
  W.passed = 0;
  for (int l = 0; l < 32; ++l) {
    const size_t i = static_cast<size_t>(w) * 32 + static_cast<size_t>(l);
    if (i < b->fibers.size() && b->fibers[i].state == kWaitWarp) b->fibers[i].state = kReady;
  }
}
void releaseBlock(Block* b) {
  b->arrived = 0;
  for (Fiber& f : b->fibers)
    if (f.state == kWaitBlock) f.state = kReady;
}

[[noreturn]] void fiberMain() {
  Block* b = tBlock;
  b->task->run();
  Fiber* f = b->current;
  f->state = kDone;
  --b->live;
  Warp& W = b->warps[static_cast<size_t>(f->ts.warp)];
  --W.live;
  // threads that exited no longer hold barriers back (as on the hardware)
  if (W.live > 0 && W.arrived == W.live) releaseWarp(b, f->ts.warp);
  if (b->live > 0 && b->arrived == b->live) releaseBlock(b);
  void* dead = nullptr;
  qk_emu_switch(&dead, b->schedulerSp);
  fail("a finished fiber was resumed");
}

void runBlock(Block& b, const dim3& grid, const dim3& block, const uint3& bid) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  b.fibers.assign(static_cast<size_t>(n), Fiber{});
  b.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  b.live = n;
  b.arrived = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[static_cast<size_t>(i)];
    f.ts.threadIdx = make_uint3(static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                                static_cast<unsigned>(i) / (block.x * block.y));
    f.ts.blockIdx = bid;
    f.ts.blockDim = block;
    f.ts.gridDim = grid;
    f.ts.tid = i;
    f.ts.lane = i & 31;
    f.ts.warp = i >> 5;
    b.warps[static_cast<size_t>(i >> 5)].live++;
    f.stack = stackFor(static_cast<size_t>(i));
    // initial frame: 6 callee-saved registers, then fiberMain as the return address (entered with
    // rsp ≡ 8 mod 16, as after a call)
    auto* top = reinterpret_cast<void**>(f.stack + kStackBytes);
    *--top = nullptr;
    *--top = reinterpret_cast<void*>(&fiberMain);
    for (int r = 0; r < 6; ++r) *--top = nullptr;
    f.sp = top;
  }
  const bool rev = reverseOrder();
  while (b.live > 0) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = b.fibers[static_cast<size_t>(rev ? n - 1 - k : k)];
      if (f.state != kReady) continue;
      b.current = &f;
      qk_emu_switch(&b.schedulerSp, f.sp);
      ran = true;
    }
    if (!ran && b.live > 0)
      fail("deadlock: the threads of a block wait at barriers that cannot complete (divergent __syncthreads / "
           "__syncwarp / shuffle)");
  }
}

// dynamic shared memory limits set by cudaFuncSetAttribute, per kernel
std::mutex gAttrMutex;
std::map<const void*, int> gMaxDynamicShared;
constexpr int kDefaultShared = 48 * 1024, kOptinShared = 227 * 1024;

// stream capture (one at a time per thread, as the project uses it)
thread_local cudaStream_t tCapturing = nullptr;
thread_local CUgraph_st* tGraph = nullptr;
thread_local cudaError_t tLastError = cudaSuccess;

// Runs op now, or records it when `stream` is being captured.
void streamOp(cudaStream_t stream, std::function<void()> op) {
  if (tCapturing && stream == tCapturing) tGraph->ops.push_back(std::move(op));
  else op();
}

void execute(const std::shared_ptr<Task>& task, const LaunchConfig& c) {
  Block b;
  b.task = task.get();
  std::unique_ptr<char[]> smem;
  if (c.smem > 0) {
    smem.reset(new char[c.smem + 128]);
    std::memset(smem.get(), 0xff, c.smem + 128);  // NaN pattern: reading unwritten shared memory shows
    b.dynamicShared = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(smem.get()) + 127) & ~uintptr_t(127));
  }
  Block* outer = tBlock;
  if (outer) fail("a kernel launched from inside a kernel");
  tBlock = &b;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) runBlock(b, c.grid, c.block, make_uint3(x, y, z));
  tBlock = nullptr;
}

}  // namespace

ThreadState& self() {
  if (!tBlock || !tBlock->current) fail("a device function ran outside a kernel");
  return tBlock->current->ts;
}

void syncthreads() {
  Block* b = tBlock;
  Fiber* f = b->current;
  f->state = kWaitBlock;
  if (++b->arrived == b->live) releaseBlock(b);  // the last to arrive goes on at once
  if (f->state != kReady) yieldToScheduler();
}

void syncwarp() {
  Block* b = tBlock;
  Fiber* f = b->current;
  Warp& W = b->warps[static_cast<size_t>(f->ts.warp)];
  f->state = kWaitWarp;
  if (++W.arrived == W.live) releaseWarp(b, f->ts.warp);
  if (f->state != kReady) yieldToScheduler();
}

bool warpCollective(void** scratch) {
  syncwarp();
  Block* b = tBlock;
  Warp& W = b->warps[static_cast<size_t>(b->current->ts.warp)];
  *scratch = W.scratch;
  return W.passed++ == 0;
}

uint64_t warpExchange(uint64_t v, int src) {
  Block* b = tBlock;
  Fiber* f = b->current;
  const ThreadState& ts = f->ts;
  Warp& W = b->warps[static_cast<size_t>(ts.warp)];
  const uint64_t seq = ++f->exchanges;
  syncwarp();  // every lane is done reading the previous exchange
  W.slot[ts.lane] = v;
  W.slotSeq[ts.lane] = seq;
  syncwarp();  // every live lane has deposited
  // a lane that exited before this exchange deposited nothing: the reader keeps its own value
  if (src < 0 || src > 31 || W.slotSeq[src] != seq) return v;
  return W.slot[src];
}

void* dynamicShared() {
  if (!tBlock->dynamicShared) fail("extern __shared__ memory used by a launch without dynamic shared memory");
  return tBlock->dynamicShared;
}

void runLaunch(const void* fn, const LaunchConfig& c, Task* raw) {
  std::shared_ptr<Task> task(raw);
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.y > 65535 || c.grid.z > 65535) {
    tLastError = cudaErrorInvalidConfiguration;
    return;
  }
  int limit = kDefaultShared;
  {
    std::lock_guard<std::mutex> lock(gAttrMutex);
    auto it = gMaxDynamicShared.find(fn);
    if (it != gMaxDynamicShared.end()) limit = std::max(limit, it->second);
  }
  if (c.smem > static_cast<size_t>(limit)) {  // as the hardware: too much dynamic shared memory fails the launch
    tLastError = cudaErrorInvalidValue;
    return;
  }
  const LaunchConfig cfg = c;
  streamOp(c.stream, [task, cfg] { execute(task, cfg); });
}

}  // namespace qk_emu

// ---- the runtime API ----------------------------------------------------------------------------------
using namespace qk_emu;

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = tLastError;
  tLastError = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return tLastError; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorMemoryAllocation: return "out of memory (emulator)";
    case cudaErrorInvalidConfiguration: return "invalid launch configuration (emulator)";
    case cudaErrorInvalidValue: return "invalid argument (emulator)";
    default: return "error (emulator)";
  }
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    default: return "cudaErrorUnknown";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "qlora CUDA emulator (CPU)");
  p->totalGlobalMem = size_t(16) << 30;
  p->sharedMemPerBlock = kDefaultShared;
  p->sharedMemPerBlockOptin = kOptinShared;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = p->maxGridSize[2] = 65535;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kOptinShared; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kDefaultShared; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 1; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: *value = 0; return cudaSuccess;
  }
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > kOptinShared) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(gAttrMutex);
    gMaxDynamicShared[func] = value;
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaMalloc(void** p, size_t size) {
  *p = std::aligned_alloc(256, std::max<size_t>(256, (size + 255) / 256 * 256));
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, size);  // NaN pattern: reading memory nothing wrote shows
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t size) { return cudaMalloc(p, size); }
cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s) {
  streamOp(s, [dst, src, n] {
    if (n) std::memmove(dst, src, n);
  });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
  streamOp(s, [p, v, n] { std::memset(p, v, n); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) {
  static int next = 1;
  *s = new CUstream_st{next++};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st{};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  streamOp(s, [e] { e->t = std::chrono::steady_clock::now(); });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  if (tCapturing) return cudaErrorIllegalState;
  tCapturing = s;
  tGraph = new CUgraph_st{};
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  if (!tCapturing || s != tCapturing) return cudaErrorIllegalState;
  *g = tGraph;
  tCapturing = nullptr;
  tGraph = nullptr;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long) {
  *exec = new CUgraphExec_st{g->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
  for (const auto& op : e->ops) streamOp(s, op);
  return cudaSuccess;
}

}  // extern "C"
