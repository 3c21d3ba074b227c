// A fork-join pool for CPU kernels. The thread that calls parallel() takes part as thread 0, so a
// pool of n threads owns n-1 workers. Workers spin briefly before sleeping: GEMM tiles and
// elementwise chunks are short, and a condition-variable wake-up per region would cost more than
// the work. One caller at a time (the CPU queue's worker, or a test's main thread); concurrent
// callers are serialized.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tk {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return threads_; }
  // Stops the workers and starts `threads` (>= 1) new ones. Not concurrent with parallel().
  void resize(int threads);

  // Runs fn(tid, nthreads) on every thread of the pool (tid 0 is the caller) and waits for all.
  // nthreads may be capped below size() by `max_threads` (0 = no cap).
  void parallel(const std::function<void(int tid, int nthreads)>& fn, int max_threads = 0);

  // Splits [0, n) into contiguous chunks of at least `grain` items and runs fn(begin, end) on them.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // Threads a default pool starts with: TUNEKIT_THREADS, else the hardware concurrency.
  static int default_threads();

 private:
  void start(int threads);
  void stop();
  void worker_loop(int tid, uint64_t seen_generation);

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serializes callers of parallel()

  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(int, int)>* job_ = nullptr;
  int job_threads_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool quit_ = false;
};

}  // namespace tk
