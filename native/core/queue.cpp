#include "queue.h"

#include <exception>

#include "error.h"

#include "allocator.h"

namespace tk {

std::string Queue::take_error() {
  std::lock_guard<std::mutex> lk(error_mu_);
  std::string e;
  e.swap(error_);
  return e;
}

void Queue::record_error(const std::string& msg) {
  std::lock_guard<std::mutex> lk(error_mu_);
  if (error_.empty()) error_ = msg;
}

CpuQueue::CpuQueue(int threads) : pool_(threads), threads_(pool_.size()) {
  worker_ = std::thread([this] { run(); });
}

CpuQueue::~CpuQueue() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void CpuQueue::enqueue(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
}

void CpuQueue::run() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (tasks_.empty()) {
        busy_ = false;
        idle_cv_.notify_all();
      }
      cv_.wait(lk, [&] { return !tasks_.empty() || quit_; });
      if (tasks_.empty()) return;  // quit with nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
      busy_ = true;
    }
    try {
      task();
    } catch (const std::exception& e) {
      record_error(e.what());
    } catch (...) {
      record_error("unknown error in a queued CPU task");
    }
  }
}

void CpuQueue::synchronize() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [&] { return tasks_.empty() && !busy_; });
  }
  std::string err = take_error();
  if (!err.empty()) throw Error(err);
}

void CpuQueue::release(void* ptr) {
  uint64_t ticket = CpuAllocator::instance().release_queued(ptr);
  enqueue([ptr, ticket] { CpuAllocator::instance().retire(ptr, ticket); });
}

void CpuQueue::set_threads(int threads) {
  threads_ = threads < 1 ? 1 : threads;
  int n = threads_;
  enqueue([this, n] { pool_.resize(n); });
}

}  // namespace tk
