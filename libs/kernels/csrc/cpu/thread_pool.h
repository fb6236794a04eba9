// The addon's own thread pool: persistent workers, one parallel region at a time.
// parallelFor splits [0, n) into contiguous parts, one per thread; the caller runs part 0
// and every part whose worker has not woken yet (T threads = T-1 workers). Workers spin before
// sleeping, because decode runs hundreds of short regions per token.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

namespace qk {

// fn(begin, end, threadIndex) processes items [begin, end).
using RangeFn = std::function<void(int64_t begin, int64_t end, int thread)>;

int numThreads();
void setNumThreads(int n);  // n <= 0: QLORA_THREADS or the hardware concurrency

// Runs fn over [0, n) on up to numThreads() threads; chunks are at least `grain` items.
// Exceptions thrown by fn are rethrown on the caller's thread.
void parallelFor(int64_t n, int64_t grain, const RangeFn& fn);

// Row-wise ops (norms, softmax, RoPE ...): f(row) for rows [0, rows), in contiguous blocks of at
// least ~16K elements per task, so the small calls of decode stay on the caller's thread.
template <class F>
void parallelRows(int64_t rows, int64_t rowLen, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(rowLen, 1));
  if (rows <= grain) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  parallelFor(rows, grain, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// Element-wise ops: f(begin, end) over contiguous chunks of at least 32K elements.
template <class F>
void parallelChunks(int64_t n, F&& f) {
  const int64_t grain = 32768;
  if (n <= grain) {
    f(0, n);
    return;
  }
  parallelFor(n, grain, [&](int64_t b, int64_t e, int) { f(b, e); });
}

}  // namespace qk
