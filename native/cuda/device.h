// The CUDA backend as the rest of tunekit sees it. A plain C++ header on purpose: the addon, the op
// table and the runtime are compiled by the host compiler and include it under TUNEKIT_WITH_CUDA,
// so no CUDA type appears here (streams travel as void*).
//
// Execution model (DESIGN.md): one in-order queue per device, and for CUDA the queue is one
// non-blocking stream per device, shared by every CudaQueue of that device. Work is issued from
// the caller's thread straight onto the stream, so JavaScript never waits for the GPU unless it
// asks to (synchronize(), toArraySync()). Device memory comes from a stream-ordered caching
// allocator: a block released through the queue is reusable at once by later work on the same
// stream, because the stream itself orders the old readers before the new writers.
//
// Errors: calls that can fail synchronously throw tk::Error. Failures of asynchronous work (a
// kernel that faults) are deferred on the queue and surface at the next synchronization point,
// as on the CPU queue. A faulting kernel leaves the CUDA context unusable ("sticky" errors); every
// later synchronization point reports it, and reads still complete (with that error) rather than
// hang.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "../core/allocator.h"
#include "../core/queue.h"

namespace tk {
namespace cuda {

// Visible CUDA devices. 0 when there is no driver, no device, or the runtime cannot initialize;
// never throws (tk.info() must work on any machine).
int device_count();

struct DeviceProps {
  std::string name;
  int major = 0, minor = 0, sm_count = 0;
  size_t total_bytes = 0;
};
// Throws tk::Error naming the index and the device count when `index` is out of range.
DeviceProps device_props(int index);

// True when this build contains the cuBLASLt GEMM path.
bool has_cublaslt();

// "" when at least one device is usable, otherwise why not, in words a user can act on
// (for tk.info() and for the error of a tensor created on 'cuda').
std::string driver_status();

// The in-order queue of device `index`. Throws when the index is out of range or when this build
// has no kernel code for the device's architecture (so the failure names the fix at first use
// instead of surfacing as "no kernel image" inside the first op).
std::unique_ptr<Queue> make_queue(int index);

// The cudaStream_t of a CUDA queue, as void*. Kernels launch on this stream and nowhere else: the
// stream is non-blocking, so work on the legacy default stream is not ordered with it.
void* stream_of(Queue& q);

// Device memory from the caching allocator, for work on the device's queue. Requests are rounded
// (512 B below 2 MiB, whole 2 MiB pages above) and served from cached blocks of up to twice the
// rounded size. On exhaustion the cache is returned to the driver and the request retried once;
// then a tk::Error says "out of CUDA memory on cuda:N: asked for X MiB, Y MiB free of Z MiB
// (A MiB allocated by tunekit, W MiB cached by tunekit)". Release through the queue
// (Queue::release), never directly: that is what makes reuse stream-ordered.
void* allocate(int device, size_t bytes);
AllocatorStats allocator_stats(int device);
// Restarts the device's peak-allocation figure at its current allocation.
void reset_peak(int device);
// Returns every cached block of `device` to the driver. Waits for the device's streams first, so
// it blocks the caller until queued work has finished.
void empty_cache(int device);
// Upper bound on cached bytes per device (default: no bound, or TUNEKIT_CUDA_CACHE_MB). A block
// released beyond it is freed, which costs a wait for the stream: a bound trades speed for memory
// returned to other processes.
void set_cache_limit(int device, size_t bytes);

// Host -> device copy of `bytes` into device memory `dst`, in queue order. `host_src` is copied
// into pinned staging memory before this returns, so the caller may reuse or free it at once.
// Small copies share staging buffers; large copies are chunked through a bounded pool of pinned
// buffers and may wait for earlier chunks to reach the device before returning.
void upload(Queue& q, void* dst, const void* host_src, size_t bytes);

// Device -> host copy of `bytes` from `src` into `host_dst`, in queue order, without blocking the
// caller (except, for copies larger than the staging pool, for earlier chunks of the same copy).
// Once the bytes are in `host_dst`, `done` runs on a host thread of the queue that is neither the
// caller's thread nor the JavaScript thread. Throws only for bad arguments, before anything is
// issued; any later failure (issuing the copy, or the device failing first) is deferred on the
// queue (take_error() returns it) and `done` still runs, exactly once, so `host_dst` must stay
// valid until `done` runs. `done` must not call CUDA, enqueue work, upload, download or
// synchronize.
void download(Queue& q, const void* src, void* host_dst, size_t bytes, std::function<void()> done);

}  // namespace cuda
}  // namespace tk
