#include "thread_pool.h"

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TK_PAUSE() _mm_pause()
#else
#define TK_PAUSE() std::this_thread::yield()
#endif

namespace tk {

ThreadPool::ThreadPool(int threads) { start(threads); }
ThreadPool::~ThreadPool() { stop(); }

int ThreadPool::default_threads() {
  if (const char* env = std::getenv("TUNEKIT_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw ? int(hw) : 1;
}

void ThreadPool::start(int threads) {
  threads_ = std::max(1, threads);
  quit_ = false;
  // New workers wait for the next region, not one that ran before they existed.
  uint64_t now = generation_.load();
  for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t, now] { worker_loop(t, now); });
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

void ThreadPool::resize(int threads) {
  std::lock_guard<std::mutex> call(call_mu_);
  if (std::max(1, threads) == threads_) return;
  stop();
  start(threads);
}

void ThreadPool::worker_loop(int tid, uint64_t seen) {
  for (;;) {
    // Spin a little for the next region before sleeping.
    for (int spin = 0; spin < 20000 && generation_.load(std::memory_order_acquire) == seen; ++spin) TK_PAUSE();
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_.load() != seen || quit_; });
      if (quit_) return;
      seen = generation_.load();
    }
    const auto* job = job_;
    int nt = job_threads_;
    if (tid < nt) (*job)(tid, nt);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel(const std::function<void(int, int)>& fn, int max_threads) {
  std::lock_guard<std::mutex> call(call_mu_);
  int nt = threads_;
  if (max_threads > 0) nt = std::min(nt, max_threads);
  if (nt == 1 || workers_.empty()) {
    fn(0, 1);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    job_threads_ = nt;
    pending_.store(int(workers_.size()), std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_all();
  fn(0, nt);
  while (pending_.load(std::memory_order_acquire) != 0) TK_PAUSE();
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t max_chunks = (n + grain - 1) / grain;
  int nt = int(std::min<int64_t>(threads_, max_chunks));
  if (nt <= 1) {
    fn(0, n);
    return;
  }
  parallel(
      [&](int tid, int nthreads) {
        int64_t begin = n * tid / nthreads, end = n * (tid + 1) / nthreads;
        if (begin < end) fn(begin, end);
      },
      nt);
}

}  // namespace tk
