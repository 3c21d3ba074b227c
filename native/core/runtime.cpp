#include "runtime.h"

#include <cstdlib>
#include <string>

#include "error.h"
#include "thread_pool.h"
#ifdef TUNEKIT_WITH_CUDA
#include "../cuda/device.h"
#endif

namespace tk {

namespace {
constexpr int kMaxCudaDevices = 16;
}

Runtime& Runtime::get() {
  // Leaked on purpose: the addon may be unloaded while queued frees still run, and static
  // destruction order across translation units is not ours to control.
  static Runtime* rt = new Runtime();
  return *rt;
}

Runtime::Runtime()
    : cpu_(new CpuQueue(ThreadPool::default_threads())), cuda_live_(new LiveStats[kMaxCudaDevices]) {}

bool Runtime::cuda_compiled() const {
#ifdef TUNEKIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int Runtime::cuda_device_count() {
#ifdef TUNEKIT_WITH_CUDA
  std::lock_guard<std::mutex> lk(cuda_mu_);
  if (cuda_count_ < 0) {
    cuda_count_ = cuda::device_count();
    if (cuda_count_ > kMaxCudaDevices) cuda_count_ = kMaxCudaDevices;
    cuda_queues_.resize(size_t(cuda_count_));
  }
  return cuda_count_;
#else
  return 0;
#endif
}

void Runtime::check_device(Device dev) {
  if (dev.type == DeviceType::CPU) {
    if (dev.is_cuda_standin()) {
      TK_CHECK(cuda_compiled(), "device 'cuda-standin' needs a build of tunekit with the CUDA backend (it checks "
               "that every op has a CUDA kernel); rebuild with the CUDA toolkit installed");
      const char* env = std::getenv("TUNEKIT_CUDA_STANDIN");
      TK_CHECK(env && std::string(env) == "1", "device 'cuda-standin' is a testing device; set TUNEKIT_CUDA_STANDIN=1 "
               "to use it (it runs CPU kernels, so use 'cuda' for real work)");
      return;
    }
    TK_CHECK(dev.index == 0, "device 'cpu:", dev.index, "' does not exist: there is one CPU device, 'cpu'");
    return;
  }
  TK_CHECK(cuda_compiled(),
           "device '", dev.name(), "' is not available: this build of tunekit has no CUDA backend. "
           "Install the CUDA toolkit and rebuild with `npx cmake-js compile` (or set TUNEKIT_CUDA=ON)");
  int n = cuda_device_count();
#ifdef TUNEKIT_WITH_CUDA
  TK_CHECK(n > 0, "device '", dev.name(), "' is not available: ", cuda::driver_status());
#endif
  TK_CHECK(dev.index >= 0 && dev.index < n, "device '", dev.name(), "' does not exist: this machine has ", n,
           " CUDA device", n == 1 ? "" : "s", " (cuda:0", n > 1 ? " .. cuda:" + std::to_string(n - 1) : std::string(),
           ")");
}

Queue& Runtime::queue(Device dev) {
  if (dev.type == DeviceType::CPU) return *cpu_;
  check_device(dev);
#ifdef TUNEKIT_WITH_CUDA
  std::lock_guard<std::mutex> lk(cuda_mu_);
  auto& q = cuda_queues_[size_t(dev.index)];
  if (!q) q = cuda::make_queue(dev.index);
  return *q;
#else
  fail("unreachable: CUDA device without a CUDA build");
#endif
}

LiveStats& Runtime::live(Device dev) {
  if (dev.type == DeviceType::CPU) return dev.is_cuda_standin() ? standin_live_ : cpu_live_;
  return cuda_live_[dev.index];
}

void* Runtime::allocate(Device dev, size_t bytes, bool host_writes_now) {
  void* p = nullptr;
  if (dev.type == DeviceType::CPU) {
    p = host_writes_now ? CpuAllocator::instance().allocate(bytes) : CpuAllocator::instance().allocate_queued(bytes);
  } else {
    check_device(dev);
#ifdef TUNEKIT_WITH_CUDA
    p = cuda::allocate(dev.index, bytes);
#endif
  }
  live(dev).bytes.fetch_add(int64_t(bytes));
  return p;
}

void Runtime::release(Device dev, void* ptr, size_t bytes) {
  live(dev).bytes.fetch_sub(int64_t(bytes));
  queue(dev).release(ptr);
}

AllocatorStats Runtime::allocator_stats(Device dev) {
  if (dev.type == DeviceType::CPU) return CpuAllocator::instance().stats();
#ifdef TUNEKIT_WITH_CUDA
  check_device(dev);
  return cuda::allocator_stats(dev.index);
#else
  return AllocatorStats{};
#endif
}

void Runtime::reset_peak(Device dev) {
  queue(dev).synchronize();
  if (dev.type == DeviceType::CPU) return CpuAllocator::instance().reset_peak();
#ifdef TUNEKIT_WITH_CUDA
  cuda::reset_peak(dev.index);
#endif
}

void Runtime::synchronize_all() {
  cpu_->synchronize();
#ifdef TUNEKIT_WITH_CUDA
  std::vector<Queue*> qs;
  {
    std::lock_guard<std::mutex> lk(cuda_mu_);
    for (auto& q : cuda_queues_)
      if (q) qs.push_back(q.get());
  }
  for (Queue* q : qs) q->synchronize();
#endif
}

}  // namespace tk
