// A persistent pool of worker threads for the CPU gathers.
//
// Starting threads per batch costs tens of microseconds, a visible share of a small batch, so the
// workers live for the process. A fork (DataLoader workers, multiprocessing) leaves the child
// with none of them: an atfork handler forgets the pool in the child, which builds a new one on
// first use instead of waiting forever on threads that do not exist.
#pragma once

#include <cstdint>
#include <functional>

namespace annloader {

// Calls fn(begin, end) over [0, n) in chunks of at least `grain` items, on up to num_threads()
// threads including the caller. Runs inline when one chunk covers everything. The first
// exception thrown by any chunk is rethrown in the caller after all chunks have finished.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Threads used by parallel_for (caller included). Default: the hardware concurrency.
int get_num_threads();
void set_num_threads(int n);

}  // namespace annloader
