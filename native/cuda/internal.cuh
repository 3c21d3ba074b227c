// What the CUDA backend's own translation units share: device selection, the per-device stream
// registry, the allocator's stream-aware entry points and the CudaQueue class (runtime.cu's
// transfers need its stream and host thread). Kernels need none of this: they use device.h
// (stream_of, allocate, Queue::release) and check.cuh (CUDA_CHECK).
//
// Threads and locks, so that no cycle can form:
//   - CudaQueue::task_mu_   held while a task issues its work; tasks never wait on host threads.
//   - CudaQueue::host_mu_   guards the host thread's job list; held only for list operations and
//                           the event record that keeps the list in stream order.
//   - StagingPool locks     (runtime.cu) held by an issuing thread, which may wait for the host
//                           thread to copy out a download; the host thread never takes them
//                           except to drop a reader, which never waits.
//   - allocator heap locks  (allocator.cu) leaf locks, never held while waiting.
// Callbacks run by the host thread (download's `done`, host_callback functions) must not call
// CUDA, enqueue, transfer or synchronize: the host thread is what those would wait for.
#pragma once
#include <cuda_runtime_api.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../core/queue.h"
#include "check.cuh"

namespace tk {
namespace cuda {

// Makes `device` current on the calling thread and leaves it current. Restoring the previous
// device afterwards would look tidier but does harm: on a thread that never chose a device the
// "previous" one is the default, device 0, and since CUDA 12 cudaSetDevice creates the primary
// context of the device it selects, so restoring would allocate a context (hundreds of MiB) on
// device 0 of a machine where only another device is in use. Other CUDA code sharing a thread with
// tunekit must select its device itself, as it must next to any CUDA library.
inline void make_current(int device) {
  int current = -1;
  CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) CUDA_CHECK(cudaSetDevice(device));
}

namespace detail {

// Devices visible to this process, counted once: CUDA reads CUDA_VISIBLE_DEVICES at
// initialization, so the count cannot change afterwards. (runtime.cu)
int visible_devices();
// Throws, naming `what`, the index and the device count, unless 0 <= device < visible_devices().
void check_index(int device, const char* what);

// The one stream of `device`, created on first use and kept for the life of the process: every
// CudaQueue of the device and the allocator's default tag use it, which is what makes the
// allocator's reuse rule (same stream => ordered) hold. (queue.cu)
cudaStream_t device_stream(int device);

// The allocator with an explicit stream tag: a block released on `stream` is handed out again
// only for work on `stream`. Releasing never throws: it runs from destructors. (allocator.cu)
void* allocate_on(int device, size_t bytes, cudaStream_t stream);
void release_on(int device, void* ptr, cudaStream_t stream) noexcept;

// "cuda:0: cudaErrorIllegalAddress (...)" plus the sticky-error hint, for errors that surface
// asynchronously (at an event or a stream synchronization) rather than from a named call.
std::string async_error(int device, cudaError_t e);

}  // namespace detail

class CudaQueue final : public Queue {
 public:
  explicit CudaQueue(int index);
  ~CudaQueue() override;
  Device device() const override { return Device{DeviceType::CUDA, index_}; }
  void enqueue(std::function<void()> task) override;
  void host_callback(std::function<void()> fn) override;
  void synchronize() override;
  void release(void* ptr) override;

  int index() const { return index_; }
  cudaStream_t stream() const { return stream_; }

  // Records an event on the stream now and, once the device has passed it, runs fn(ok) on this
  // queue's host thread. ok is false when the device reported an error instead; the error has
  // then been deferred on this queue, so fn can pass it on through take_error(). fn runs either
  // way, so nothing that waits on it can hang after a kernel fault. Never throws: when the event
  // cannot even be recorded (the context has failed), that error is deferred and fn runs with
  // ok = false after the jobs before it.
  void when_reached(std::function<void(bool ok)> fn);

  // Queue::record_error for the backend's own code.
  void defer_error(const std::string& msg) { record_error(msg); }

 private:
  struct HostJob {
    cudaEvent_t event = nullptr;
    std::function<void(bool)> fn;
  };
  void host_loop();
  cudaError_t take_event_locked(cudaEvent_t* ev);

  int index_;
  cudaStream_t stream_;
  // Tasks run one at a time, as on the CPU queue, so per-queue host state a task uses (a cuBLASLt
  // handle, a workspace) needs no lock of its own. Recursive: a task may call code that enqueues.
  std::recursive_mutex task_mu_;

  std::mutex host_mu_;
  std::condition_variable host_cv_, idle_cv_;
  std::deque<HostJob> jobs_;
  std::vector<cudaEvent_t> free_events_;
  bool host_busy_ = false;
  bool quit_ = false;
  std::thread host_thread_;
};

}  // namespace cuda
}  // namespace tk
