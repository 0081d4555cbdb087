#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace annloader {
namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int n_workers) {
    for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this] { work(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(submit_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0);
      error_ = nullptr;
      busy_workers_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_workers_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() {
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_);
      if (begin >= n_) return;
      try {
        (*fn_)(begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_workers_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex submit_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  bool stopping_ = false;
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;  // leaked on purpose: joining at interpreter exit can deadlock
int g_num_threads = 0;         // 0: not chosen yet

// Asked once: glibc answers hardware_concurrency() by reading sysfs, ~10 us a call, which the
// inline path of every small gather would otherwise pay.
int default_num_threads() {
  static const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

void forget_pool_in_child() {
  // Only the forking thread survives a fork: the old workers are gone and the mutex may be held
  // by one of them. Re-create the lock and build a fresh pool on first use.
  new (&g_pool_mutex) std::mutex();
  g_pool = nullptr;
}

const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  return true;
}();

ThreadPool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_num_threads == 0) g_num_threads = default_num_threads();
  if (g_pool == nullptr || g_pool->size() != g_num_threads) {
    delete g_pool;
    g_pool = new ThreadPool(g_num_threads - 1);
  }
  return *g_pool;
}

}  // namespace

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return g_num_threads == 0 ? default_num_threads() : g_num_threads;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_num_threads = n;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = get_num_threads();
  if (threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // About four chunks per thread balances uneven rows without much scheduling traffic.
  const int64_t chunk = std::max(grain, (n + 4 * threads - 1) / (4 * threads));
  pool().run(n, chunk, fn);
}

}  // namespace annloader
