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

// Fails at queue creation, with the fix, when the binary has no kernel code the device can run: a
// cubin for sm_80 runs on 8.x, one for sm_90a only on 9.0, and newer architectures run only what
// the driver can JIT from embedded PTX (CMake embeds compute_80 PTX for the arch "80"; the arch-
// specific compute_90a PTX runs on 9.0 alone). Without this check the first op would fail with
// "no kernel image" deep inside some kernel.
void check_arch(int index) {
  make_current(index);
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
    make_current(device);
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
  // Errors are ignored: a destructor cannot report them, and a failed context frees its events.
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  cudaGetLastError();
}

void CudaQueue::enqueue(std::function<void()> task) {
  std::lock_guard<std::recursive_mutex> lk(task_mu_);
  try {
    make_current(index_);
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

cudaError_t CudaQueue::take_event_locked(cudaEvent_t* ev) {
  if (!free_events_.empty()) {
    *ev = free_events_.back();
    free_events_.pop_back();
    return cudaSuccess;
  }
  return cudaEventCreateWithFlags(ev, cudaEventDisableTiming | cudaEventBlockingSync);
}

void CudaQueue::when_reached(std::function<void(bool ok)> fn) {
  // Not make_current(): it throws, and this must not (see the declaration). A failure to select the
  // device shows up as a failure to create or record the event, handled below.
  int current = -1;
  if ((cudaGetDevice(&current) != cudaSuccess || current != index_) && cudaSetDevice(index_) != cudaSuccess)
    cudaGetLastError();
  {
    // Record and append under one lock, so that the job list is in stream order even when several
    // threads issue at once: the host thread waits on the jobs front to back.
    std::lock_guard<std::mutex> lk(host_mu_);
    cudaEvent_t ev = nullptr;
    cudaError_t e = take_event_locked(&ev);
    if (e == cudaSuccess) {
      e = cudaEventRecord(ev, stream_);
      if (e != cudaSuccess) {
        free_events_.push_back(ev);
        ev = nullptr;
      }
    }
    if (e != cudaSuccess) {
      // The context has failed (or the device is gone). Report it like an asynchronous failure
      // and still run fn, in order, so that whoever waits on it is told instead of left waiting.
      cudaGetLastError();
      record_error(detail::async_error(index_, e));
    }
    jobs_.push_back(HostJob{ev, std::move(fn)});
  }
  host_cv_.notify_one();
}

void CudaQueue::host_callback(std::function<void()> fn) {
  when_reached([fn = std::move(fn)](bool) { fn(); });
}

void CudaQueue::host_loop() {
  // Bind the thread to this queue's device before its first CUDA call: otherwise the runtime
  // would make device 0 current and create a context there (hundreds of MiB of device memory) on
  // a machine where only another device is used. The context exists already (make_queue), so this
  // cannot fail in a way the event waits below would not report.
  if (cudaSetDevice(index_) != cudaSuccess) cudaGetLastError();
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
    // No event: when_reached could not record one and has deferred the error already.
    bool ok = job.event != nullptr;
    if (ok) {
      cudaError_t e = cudaEventSynchronize(job.event);
      if (e != cudaSuccess) {
        cudaGetLastError();
        record_error(detail::async_error(index_, e));
        ok = false;
      }
    }
    try {
      job.fn(ok);
    } catch (const std::exception& x) {
      record_error(x.what());
    } catch (...) {
      record_error("unknown error in a host callback of cuda:" + std::to_string(index_));
    }
    // Destroy the callback's captures (tensor storage whose release reaches the allocator) here,
    // outside host_mu_.
    job.fn = nullptr;
    if (job.event) {
      std::lock_guard<std::mutex> lk(host_mu_);
      free_events_.push_back(job.event);
    }
  }
}

void CudaQueue::synchronize() {
  make_current(index_);
  cudaError_t e = cudaStreamSynchronize(stream_);
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
