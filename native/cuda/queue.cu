// CudaQueue: the in-order queue of one CUDA device (core/queue.h, DESIGN.md "Execution model").
//
// The queue is the device's stream. enqueue() runs the task at once on the caller's thread: the
// task only issues asynchronous work on the stream, which returns in microseconds, so a worker
// thread would add a hop without adding parallelism. The stream gives program order; the task
// lock gives the CPU queue's one-task-at-a-time semantics.
//
// The stream is non-blocking (cudaStreamNonBlocking): work that other code puts on the legacy
// default stream neither waits for tunekit's work nor makes it wait. The flip side is that
// tunekit's kernels must never use the default stream.
//
// Host-side completion (host_callback, and download's copy-out in runtime.cu) goes through one
// host thread per queue that waits on events, not through cudaLaunchHostFunc. Two reasons:
//   - cudaLaunchHostFunc does not call its function once the context has faulted (documented);
//     a read waiting on it would never resolve. Waiting on an event returns the error instead,
//     which is deferred on the queue, and the function still runs.
//   - A host function blocks its stream while it runs; copying a large download out of pinned
//     memory there would stall the device. The host thread copies while the stream moves on.
// The events use blocking synchronization, so a host thread waiting behind a long training step
// sleeps instead of spinning a core the CPU kernels could use.
//
// Asynchronous failures are deferred like task exceptions: the first is kept and thrown by the
// next synchronize(). A kernel fault poisons the context, so every later synchronize() reports it
// again; the message says the process has to restart.
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "device.h"
#include "internal.cuh"

namespace tk {
namespace cuda {

namespace {

// Exists only to ask the driver whether this build carries code for a device (see check_arch).
__global__ void arch_probe_kernel() {}

// Fails at queue creation, with the fix, when the binary has no kernel code for the device's
// architecture (a cubin for sm_80 runs on 8.x, one for sm_90a only on 9.0; nothing here runs on
// 10.x or on 7.x). Without this check the first op would fail with "no kernel image".
void check_arch(int index) {
  DeviceGuard guard(index);
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, arch_probe_kernel);
  if (e == cudaSuccess) return;
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
      e == cudaErrorInvalidKernelImage) {
    cudaGetLastError();
    DeviceProps p = device_props(index);
    fail("cuda:", index, " (", p.name, ", compute capability ", p.major, ".", p.minor,
         ") is not supported by this build of tunekit: it has no kernel code for that architecture (",
         error_text(e), "). Rebuild for it: npx cmake-js compile --CDTUNEKIT_CUDA_ARCHS=", p.major, p.minor,
         p.major == 9 ? "a" : "", ", or use device 'cpu'");
  }
  throw_error(e, "cudaFuncGetAttributes", __FILE__, __LINE__);
}

}  // namespace

namespace detail {

cudaStream_t device_stream(int device) {
  check_index(device, "device_stream");
  // Leaked with the process: queues and cached blocks refer to these streams until exit, and
  // destroying a stream during static destruction races the driver's own teardown.
  static std::mutex* mu = new std::mutex();
  static std::vector<cudaStream_t>* streams = new std::vector<cudaStream_t>(size_t(visible_devices()), nullptr);
  std::lock_guard<std::mutex> lk(*mu);
  cudaStream_t& s = (*streams)[size_t(device)];
  if (!s) {
    DeviceGuard guard(device);
    cudaStream_t created = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking));
    s = created;
  }
  return s;
}

std::string async_error(int device, cudaError_t e) {
  return "cuda:" + std::to_string(device) + ": " + error_text(e) + sticky_hint(e);
}

}  // namespace detail

CudaQueue::CudaQueue(int index) : index_(index), stream_(detail::device_stream(index)) {
  host_thread_ = std::thread([this] { host_loop(); });
}

CudaQueue::~CudaQueue() {
  {
    std::lock_guard<std::mutex> lk(host_mu_);
    quit_ = true;
  }
  host_cv_.notify_all();
  host_thread_.join();  // runs what is left first: a pending read still completes
  int prev = 0;
  bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != index_ && cudaSetDevice(index_) == cudaSuccess;
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  if (switched) cudaSetDevice(prev);
  cudaGetLastError();
}

void CudaQueue::enqueue(std::function<void()> task) {
  std::lock_guard<std::recursive_mutex> lk(task_mu_);
  try {
    DeviceGuard guard(index_);
    task();
  } catch (const std::exception& e) {
    record_error(e.what());
  } catch (...) {
    record_error("unknown error in a queued task on cuda:" + std::to_string(index_));
  }
  // A kernel launch that fails synchronously (bad configuration, too many resources) is visible
  // only as the thread's last error. Attribute it to the task that made it, here, rather than to
  // whichever later call happens to look. cudaErrorNotReady is a query answer, not a failure.
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess && e != cudaErrorNotReady)
    record_error("cuda:" + std::to_string(index_) + ": a kernel launch failed: " + error_text(e) + sticky_hint(e));
}

cudaEvent_t CudaQueue::take_event_locked() {
  if (!free_events_.empty()) {
    cudaEvent_t e = free_events_.back();
    free_events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync));
  return e;
}

void CudaQueue::when_reached(std::function<void(bool ok)> fn) {
  DeviceGuard guard(index_);
  {
    // Record and append under one lock, so that the job list is in stream order even when several
    // threads issue at once: the host thread waits on the jobs front to back.
    std::unique_lock<std::mutex> lk(host_mu_);
    cudaEvent_t ev = take_event_locked();
    cudaError_t e = cudaEventRecord(ev, stream_);
    if (e != cudaSuccess) {
      free_events_.push_back(ev);
      lk.unlock();
      throw_error(e, "cudaEventRecord", __FILE__, __LINE__);
    }
    jobs_.push_back(HostJob{ev, std::move(fn)});
  }
  host_cv_.notify_one();
}

void CudaQueue::host_callback(std::function<void()> fn) {
  when_reached([fn = std::move(fn)](bool) { fn(); });
}

void CudaQueue::host_loop() {
  for (;;) {
    HostJob job;
    {
      std::unique_lock<std::mutex> lk(host_mu_);
      if (jobs_.empty()) {
        host_busy_ = false;
        idle_cv_.notify_all();
      }
      host_cv_.wait(lk, [&] { return !jobs_.empty() || quit_; });
      if (jobs_.empty()) return;  // quit with nothing left to run
      job = std::move(jobs_.front());
      jobs_.pop_front();
      host_busy_ = true;
    }
    cudaError_t e = cudaEventSynchronize(job.event);
    if (e != cudaSuccess) {
      cudaGetLastError();
      record_error(detail::async_error(index_, e));
    }
    try {
      job.fn(e == cudaSuccess);
    } catch (const std::exception& x) {
      record_error(x.what());
    } catch (...) {
      record_error("unknown error in a host callback of cuda:" + std::to_string(index_));
    }
    // Destroy the callback's captures (tensor storage whose release reaches the allocator) here,
    // outside host_mu_.
    job.fn = nullptr;
    std::lock_guard<std::mutex> lk(host_mu_);
    free_events_.push_back(job.event);
  }
}

void CudaQueue::synchronize() {
  cudaError_t e;
  {
    DeviceGuard guard(index_);
    e = cudaStreamSynchronize(stream_);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    record_error(detail::async_error(index_, e));
  }
  // Reads and host callbacks issued before this call complete before it returns, as on the CPU
  // queue: after synchronize() every earlier download has landed and its `done` has run.
  {
    std::unique_lock<std::mutex> lk(host_mu_);
    idle_cv_.wait(lk, [&] { return jobs_.empty() && !host_busy_; });
  }
  std::string err = take_error();
  if (!err.empty()) throw Error(err);
}

void CudaQueue::release(void* ptr) {
  // No enqueue needed: every task that reads `ptr` has already issued its work on stream_, and the
  // allocator hands the block out again only for work on stream_, which runs after that work.
  detail::release_on(index_, ptr, stream_);
}

std::unique_ptr<Queue> make_queue(int index) {
  detail::check_index(index, "make_queue");
  check_arch(index);
  return std::unique_ptr<Queue>(new CudaQueue(index));
}

void* stream_of(Queue& q) {
  auto* cq = dynamic_cast<CudaQueue*>(&q);
  TK_CHECK(cq, "stream_of: the queue of ", q.device().name(), " is not a CUDA queue");
  return static_cast<void*>(cq->stream());
}

}  // namespace cuda
}  // namespace tk
