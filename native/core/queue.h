// The per-device in-order queue: the execution model of DESIGN.md.
//
// JavaScript enqueues and returns. The CPU queue runs tasks one after another on its own native
// worker thread, which drives a ThreadPool for data parallelism inside a kernel. A CUDA queue is a
// stream: its tasks issue asynchronous stream work from the caller's thread. In both, order is
// program order, which is what makes an enqueued free safe: every task enqueued before the free
// (and so every kernel that reads the buffer) has finished before the memory is reused.
//
// A task that throws does not stop the queue; the first error is kept and surfaces at the next
// synchronization point (synchronize(), or a read of a tensor's values), then is cleared.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "tensor.h"
#include "thread_pool.h"

namespace tk {

class Queue {
 public:
  virtual ~Queue() = default;
  virtual Device device() const = 0;
  // Runs `task` after everything enqueued before it.
  virtual void enqueue(std::function<void()> task) = 0;
  // Runs `fn` on a host thread once all work enqueued before it has completed. `fn` must not
  // enqueue, synchronize, block on or transfer through this queue: it may run on the queue's own
  // thread (the CPU worker, or a CUDA queue's callback thread).
  virtual void host_callback(std::function<void()> fn) = 0;
  // Blocks until all enqueued work has completed; throws the first deferred error, if any.
  virtual void synchronize() = 0;
  // Returns a block of this device's memory to its allocator, in queue order.
  virtual void release(void* ptr) = 0;
  // Takes the deferred error (empty if none) and clears it.
  std::string take_error();

 protected:
  void record_error(const std::string& msg);
  std::mutex error_mu_;
  std::string error_;
};

class CpuQueue final : public Queue {
 public:
  explicit CpuQueue(int threads);
  ~CpuQueue() override;
  Device device() const override { return Device{DeviceType::CPU, 0}; }
  void enqueue(std::function<void()> task) override;
  void host_callback(std::function<void()> fn) override { enqueue(std::move(fn)); }
  void synchronize() override;
  void release(void* ptr) override;
  // The pool kernels use. Only tasks running on this queue may call into it.
  ThreadPool& pool() { return pool_; }
  // Resizes the pool in queue order (work already queued keeps the old size).
  void set_threads(int threads);
  int threads() const { return threads_; }

 private:
  void run();
  ThreadPool pool_;
  std::atomic<int> threads_;
  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::function<void()>> tasks_;
  bool busy_ = false;
  bool quit_ = false;
  std::thread worker_;
};

}  // namespace tk
