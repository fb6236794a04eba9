// Runtime of the CUDA layer: device probing, errors, device buffers, workspace, timing.
#include <cstring>
#include <mutex>

#include "cuda/common.cuh"

namespace qk::cuda {

void throwCuda(cudaError_t e, const char* what, const char* file, int line) {
  // A failed runtime call also sets the thread's last error: clear it, or a caught, non-sticky failure
  // (an out-of-memory cudaMalloc reported as RESOURCE_EXHAUSTED) would be thrown again by the next
  // launch's cudaGetLastError (QK_CUDA_LAUNCHED). Sticky errors are reported again anyway.
  cudaGetLastError();
  const char* base = std::strrchr(file, '/');
  throw Error(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " + what +
              " at " + (base ? base + 1 : file) + ":" + std::to_string(line));
}

int blocksizeShift(int blocksize) {
  for (int s = 5; s <= 12; ++s)
    if (blocksize == (1 << s)) return s;
  throw std::invalid_argument("qk::cuda: NF4 blocksize must be a power of two in 32..4096, got " +
                              std::to_string(blocksize));
}

void checkWeight(const WeightView& w) {
  checkArg(w.data != nullptr && w.rows >= 0 && w.cols >= 0, "weight data/shape");
  const uintptr_t a = reinterpret_cast<uintptr_t>(w.data);
  switch (w.type) {
    case WType::F32: checkArg(a % 4 == 0, "f32 weight data must be 4-byte aligned"); break;
    case WType::F16:
    case WType::BF16: checkArg(a % 2 == 0, "f16/bf16 weight data must be 2-byte aligned"); break;
    case WType::NF4:
      checkArg(w.absmax != nullptr, "an NF4 weight needs absmax");
      blocksizeShift(w.blocksize);
      break;
  }
}

Info info() {
  static std::once_flag once;
  static Info cached;
  std::call_once(once, [] {
    Info r;
    cudaRuntimeGetVersion(&r.runtimeVersion);
    cudaDriverGetVersion(&r.driverVersion);  // 0 (and success) when no driver is installed
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      r.reason = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
      cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    } else if (n == 0) {
      r.reason = "no CUDA device found";
    } else {
      bool usable = false;
      for (int d = 0; d < n; ++d) {
        cudaDeviceProp p{};
        if (cudaGetDeviceProperties(&p, d) != cudaSuccess) continue;
        r.devices.push_back({p.name, p.totalGlobalMem, p.major, p.minor, p.multiProcessorCount});
        usable = usable || p.major >= 8;
      }
      // The kernels are built for sm_80 / sm_90 (+ PTX): bf16 tensor cores need compute capability 8.0.
      if (!usable) r.reason = "no device with compute capability >= 8.0";
      r.available = usable;
    }
    cached = r;
  });
  return cached;
}

void requireDevice() {
  const Info i = info();
  if (!i.available) throw Error("no CUDA device: " + i.reason);
}

void synchronize(Stream stream) { QK_CUDA_CHECK(cudaStreamSynchronize(cs(stream))); }

Buffer::Buffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  requireDevice();
  QK_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}
Buffer::~Buffer() {
  if (ptr_) cudaFree(ptr_);  // errors ignored: a destructor must not throw
}
Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_, bytes_ = o.bytes_;
    o.ptr_ = nullptr, o.bytes_ = 0;
  }
  return *this;
}
void Buffer::upload(const void* host, size_t bytes, size_t offset) {
  checkArg(offset <= bytes_ && bytes <= bytes_ - offset, "upload past the end of the buffer");
  if (bytes) QK_CUDA_CHECK(cudaMemcpy(static_cast<char*>(ptr_) + offset, host, bytes, cudaMemcpyHostToDevice));
}
void Buffer::download(void* host, size_t bytes, size_t offset) const {
  checkArg(offset <= bytes_ && bytes <= bytes_ - offset, "download past the end of the buffer");
  if (bytes) QK_CUDA_CHECK(cudaMemcpy(host, static_cast<const char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost));
}
void Buffer::zero() {
  if (bytes_) QK_CUDA_CHECK(cudaMemset(ptr_, 0, bytes_));
}

Buffer uploaded(const void* host, size_t bytes) {
  Buffer b(bytes);
  b.upload(host, bytes);
  return b;
}

PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  requireDevice();
  QK_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
}
PinnedBuffer::~PinnedBuffer() {
  if (ptr_) cudaFreeHost(ptr_);
}
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = o.ptr_, bytes_ = o.bytes_;
    o.ptr_ = nullptr, o.bytes_ = 0;
  }
  return *this;
}

void copyHostToDevice(void* dst, const void* src, size_t bytes, Stream stream) {
  if (bytes) QK_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cs(stream)));
}
void copyDeviceToHost(void* dst, const void* src, size_t bytes, Stream stream) {
  if (bytes) QK_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cs(stream)));
}

void* Workspace::get(int slot, size_t bytes) {
  checkArg(slot >= 0, "workspace slot");
  if (static_cast<size_t>(slot) >= slots_.size()) slots_.resize(static_cast<size_t>(slot) + 1);
  Buffer& b = slots_[static_cast<size_t>(slot)];
  if (b.bytes() < bytes) {
    b = Buffer();  // free first: the old contents are not kept
    b = Buffer(bytes + bytes / 4);  // grow with headroom (chunked callers vary the size slightly)
  }
  return b.data();
}

void copyDeviceToDevice(void* dst, const void* src, size_t bytes, Stream stream) {
  if (bytes) QK_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cs(stream)));
}

double timeMs(const std::function<void()>& fn, int iters, Stream stream) {
  checkArg(iters >= 1, "timeMs iterations");
  fn();
  QK_CUDA_CHECK(cudaStreamSynchronize(cs(stream)));
  cudaEvent_t a, b;
  QK_CUDA_CHECK(cudaEventCreate(&a));
  QK_CUDA_CHECK(cudaEventCreate(&b));
  float ms = 0.f;
  try {
    QK_CUDA_CHECK(cudaEventRecord(a, cs(stream)));
    for (int i = 0; i < iters; ++i) fn();
    QK_CUDA_CHECK(cudaEventRecord(b, cs(stream)));
    QK_CUDA_CHECK(cudaEventSynchronize(b));
    QK_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  } catch (...) {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    throw;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return static_cast<double>(ms) / iters;
}

}  // namespace qk::cuda
