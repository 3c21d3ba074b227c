// The process-wide runtime: one in-order queue per device, allocation and queue-ordered release
// of device memory, and live-tensor accounting for tk.memory(). The CPU queue always exists; CUDA
// queues exist only in a CUDA build, one per visible device, created on first use.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "allocator.h"
#include "queue.h"

namespace tk {

struct LiveStats {
  std::atomic<int64_t> tensors{0};
  std::atomic<int64_t> bytes{0};
};

class Runtime {
 public:
  static Runtime& get();

  CpuQueue& cpu() { return *cpu_; }
  // The queue of `dev`; throws a tk::Error naming the device when it does not exist in this build
  // or on this machine.
  Queue& queue(Device dev);
  // Throws unless `dev` is usable (see queue()).
  void check_device(Device dev);

  // Device memory of `bytes`, counted in live(dev).bytes until release(). Only work queued on the
  // device after this call may touch it, unless `host_writes_now` (see CpuAllocator).
  void* allocate(Device dev, size_t bytes, bool host_writes_now = false);
  // Enqueues the release of memory from allocate() on the device's queue.
  void release(Device dev, void* ptr, size_t bytes);

  LiveStats& live(Device dev);
  AllocatorStats allocator_stats(Device dev);
  // Waits for the device queue, then restarts its peak-allocation figure at the current value.
  void reset_peak(Device dev);
  int cuda_device_count();
  bool cuda_compiled() const;
  void synchronize_all();

 private:
  Runtime();
  std::unique_ptr<CpuQueue> cpu_;
  std::mutex cuda_mu_;
  std::vector<std::unique_ptr<Queue>> cuda_queues_;
  LiveStats cpu_live_;
  LiveStats standin_live_;
  std::unique_ptr<LiveStats[]> cuda_live_;
  int cuda_count_ = -1;
};

}  // namespace tk
