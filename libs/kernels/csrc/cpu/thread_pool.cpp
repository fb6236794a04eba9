#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define QK_PAUSE() _mm_pause()
#else
#define QK_PAUSE() std::this_thread::yield()
#endif

namespace qk {

namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> region(regionMutex_);
    stop();
    nthreads_ = std::max(1, n);
    quit_ = false;
    // Each worker starts from the generation current now: reading it inside the new thread
    // could miss a region started before the thread first runs (and hang the caller).
    const uint64_t start = generation_.load(std::memory_order_acquire);
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i, start] { workerLoop(i, start); });
  }

  void run(int64_t n, int64_t grain, const RangeFn& fn) {
    if (n <= 0) return;
    int64_t maxChunks = std::max<int64_t>(1, (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
    int parts = static_cast<int>(std::min<int64_t>(nthreads_, maxChunks));
    if (parts <= 1) {
      fn(0, n, 0);
      return;
    }
    // One region at a time: JS worker threads may share the pool.
    std::lock_guard<std::mutex> region(regionMutex_);
    fn_ = &fn;
    n_ = n;
    parts_.store(parts, std::memory_order_relaxed);
    error_ = nullptr;
    pending_.store(parts - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleepMutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    sleepCv_.notify_all();
    runPart(0);
    // Spin briefly (the other parts usually finish together), then yield so a worker that the
    // OS has not scheduled yet (a loaded machine) gets the core instead of a spinning caller.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4000) QK_PAUSE();
      else std::this_thread::yield();
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void runPart(int part) {
    const int parts = parts_.load(std::memory_order_relaxed);
    if (part >= parts) return;
    int64_t begin = n_ * part / parts, end = n_ * (part + 1) / parts;
    try {
      (*fn_)(begin, end, part);
    } catch (...) {
      std::lock_guard<std::mutex> lk(errorMutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void workerLoop(int index, uint64_t seen) {
    for (;;) {
      // Spin a little (cheap wake-up for back-to-back regions), yield a little, then sleep.
      uint64_t g;
      int spins = 0;
      while ((g = generation_.load(std::memory_order_acquire)) == seen && spins < 6000) {
        if (spins < 4000) QK_PAUSE();
        else std::this_thread::yield();
        ++spins;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(sleepMutex_);
        sleepCv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen || quit_; });
        g = generation_.load(std::memory_order_acquire);
      }
      if (quit_) return;
      // Read the region's size, then make sure it still belongs to generation g: a worker
      // that woke late for a region it had no part in could otherwise pair g with the
      // next region's size and run (and count) a part twice.
      const int parts = parts_.load(std::memory_order_acquire);
      if (generation_.load(std::memory_order_acquire) != g) continue;
      seen = g;
      if (index < parts) {
        runPart(index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(sleepMutex_);
      quit_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    sleepCv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex regionMutex_, sleepMutex_, errorMutex_;
  std::condition_variable sleepCv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool quit_ = false;
  const RangeFn* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int> parts_{0};
  std::exception_ptr error_;
};

int defaultThreads() {
  if (const char* env = std::getenv("QLORA_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

ThreadPool& pool() {
  static ThreadPool p(defaultThreads());
  return p;
}

}  // namespace

int numThreads() { return pool().size(); }

void setNumThreads(int n) {
  int want = n > 0 ? n : defaultThreads();
  if (want != pool().size()) pool().resize(want);
}

void parallelFor(int64_t n, int64_t grain, const RangeFn& fn) { pool().run(n, grain, fn); }

}  // namespace qk
