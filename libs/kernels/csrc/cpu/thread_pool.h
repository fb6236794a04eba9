// The addon's own thread pool: persistent workers, one parallel region at a time.
// parallelFor splits [0, n) into contiguous parts, one per thread; the caller runs part 0
// and every part whose worker has not woken yet (T threads = T-1 workers). Workers spin before
// sleeping, because decode runs hundreds of short regions per token.
#pragma once
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

}  // namespace qk
