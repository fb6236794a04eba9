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
    claimed_ = std::vector<std::atomic<uint64_t>>(nthreads_);
    for (auto& c : claimed_) c.store(0, std::memory_order_relaxed);
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
    done_.store(0, std::memory_order_relaxed);
    // Only this thread bumps the generation (under regionMutex_), so g is known in advance.
    // Parts this region does not have are marked claimed before anyone can see g: a worker
    // then claims only a real part of the region it woke for, never one of a later region.
    const uint64_t g = generation_.load(std::memory_order_relaxed) + 1;
    for (int p = parts; p < nthreads_; ++p) claimed_[p].store(g, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleepMutex_);
      generation_.store(g, std::memory_order_release);
    }
    sleepCv_.notify_all();
    // Part p belongs to worker p, but whoever claims it first runs it: the caller takes part 0,
    // then every part whose worker has not woken up yet. A worker the OS has descheduled (a
    // loaded machine) therefore delays nothing; on an idle machine the spinning workers win
    // their own parts and the region runs in parallel.
    for (int p = 0; p < parts; ++p) {
      if (claim(p, g)) {
        runPart(p);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
    for (int spins = 0; done_.load(std::memory_order_acquire) != parts; ++spins) {
      if (spins < 4000) QK_PAUSE();
      else std::this_thread::yield();
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Claims part p of region g: claimed_[p] holds the last region in which p was claimed, so one
  // compare-and-swap decides between the part's worker and the caller. Every flag is >= g once
  // region g has ended (its parts were claimed, the others pre-marked), so a worker that woke
  // for an older region (a stale g) can never claim anything.
  bool claim(int p, uint64_t g) {
    uint64_t old = claimed_[p].load(std::memory_order_acquire);
    while (old < g) {
      if (claimed_[p].compare_exchange_weak(old, g, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
    return false;
  }

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
      seen = g;
      // A successful claim proves region g is still running (it cannot finish without this
      // part), so fn_, n_ and parts_ published before generation g are the ones to use.
      if (index < static_cast<int>(claimed_.size()) && claim(index, g)) {
        runPart(index);
        done_.fetch_add(1, std::memory_order_acq_rel);
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
  std::atomic<int> done_{0};
  std::vector<std::atomic<uint64_t>> claimed_;
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
