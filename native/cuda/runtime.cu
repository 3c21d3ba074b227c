// Device discovery (for tk.info() and device errors) and host <-> device transfers.
//
// Discovery never throws and never leaves an error latched: tk.info() has to work on a machine
// with no driver, and a failed cudaGetDeviceCount must not resurface as the "last error" of some
// unrelated later call.
//
// Transfers go through pinned staging memory, because a copy between the device and pageable
// memory is synchronous (it would block the JavaScript thread until the stream reaches it) and
// because the caller owns its memory: an upload must be done with host_src when it returns, a
// download must not write host_dst before the device has produced the bytes.
//
//   upload:   host_src -> (memcpy, caller's thread) -> pinned -> (cudaMemcpyAsync H2D, stream)
//   download: src -> (cudaMemcpyAsync D2H, stream) -> pinned -> (memcpy, queue's host thread)
//             -> host_dst, then done()
//
// The staging pool of a device is a bounded set of pinned buffers of kChunk bytes, allocated as
// needed (cudaHostAlloc is slow and pins physical memory, so the pool is small and reused).
// Copies are carved out of the current buffer back to back, so many small transfers (a batch
// of token ids, a loss scalar) share one buffer and never wait. A full buffer is sealed and is
// reused once the device has passed its last copy (an event re-recorded after each copy: the
// stream is in order, so the last copy completing means all did) and the host thread has copied
// out every download still in it (a reader count). Copies larger than a buffer are chunked; when
// all buffers are in flight the issuing thread waits for the oldest, which pipelines the host
// memcpy of one chunk with the DMA of the previous ones. That wait is the one place a transfer
// can block its caller, and only for transfers larger than the free part of the pool.
//
// A device has one pool and one stream, shared by its queues; an issue lock serializes the
// issuing threads (the stream is in order anyway, so this loses no parallelism).
#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.h"
#include "internal.cuh"

namespace tk {
namespace cuda {

// ---- discovery ---------------------------------------------------------------------------------

int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n > 0 ? n : 0;
}

namespace detail {

int visible_devices() {
  static const int n = device_count();
  return n;
}

void check_index(int device, const char* what) {
  int n = visible_devices();
  if (device >= 0 && device < n) return;
  if (n == 0) fail(what, ": cuda:", device, " is not available: ", driver_status());
  fail(what, ": cuda:", device, " does not exist: this machine has ", n, " CUDA device", n == 1 ? "" : "s",
       " (cuda:0", n > 1 ? " .. cuda:" + std::to_string(n - 1) : std::string(), ")");
}

}  // namespace detail

DeviceProps device_props(int index) {
  detail::check_index(index, "device_props");
  cudaDeviceProp p;
  CUDA_CHECK(cudaGetDeviceProperties(&p, index));
  DeviceProps out;
  out.name = p.name;
  out.major = p.major;
  out.minor = p.minor;
  out.sm_count = p.multiProcessorCount;
  out.total_bytes = p.totalGlobalMem;
  return out;
}

bool has_cublaslt() {
#ifdef TUNEKIT_WITH_CUBLASLT
  return true;
#else
  return false;
#endif
}

namespace {
// 12040 -> "12.4"
std::string cuda_version(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }
}  // namespace

std::string driver_status() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess && n > 0) return "";
  if (e != cudaSuccess) cudaGetLastError();
  if (e == cudaSuccess || e == cudaErrorNoDevice)
    return "no CUDA device found (cudaErrorNoDevice): check `nvidia-smi`, and that CUDA_VISIBLE_DEVICES does not "
           "hide the devices";
  if (e == cudaErrorInsufficientDriver) {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) cudaGetLastError();
    if (driver == 0) return "no CUDA driver found (cudaErrorInsufficientDriver): install the NVIDIA driver";
    return "the NVIDIA driver supports CUDA " + cuda_version(driver) + " but this build of tunekit needs CUDA " +
           cuda_version(CUDART_VERSION) + " (cudaErrorInsufficientDriver): update the driver";
  }
  return "CUDA could not be initialized: " + error_text(e);
}

// ---- staging pool ------------------------------------------------------------------------------

namespace {

// 8 MiB: large enough that the per-copy cost (a few microseconds of API call and DMA setup) is
// lost against the copy itself at PCIe 4/5 speeds, small enough that a pool of 16 pins 128 MiB.
constexpr size_t kChunk = size_t(8) << 20;
// Each copy starts on its own 256-byte boundary: DMA from aligned host addresses is fastest.
constexpr size_t kAlign = 256;

struct StagingBuffer {
  char* host = nullptr;
  size_t used = 0;                 // bytes carved out since the buffer was last recycled
  cudaEvent_t last_copy = nullptr;  // re-recorded after every copy that touches the buffer
  bool recorded = false;
  int readers = 0;                  // downloads still to be copied out (guarded by StagingPool::mu)
};

class StagingPool {
 public:
  StagingPool(int device, size_t max_buffers) : device_(device), max_buffers_(max_buffers) {}

  // Serializes issuing threads; held across reserve() and the copy it stages.
  std::mutex issue_mu;

  // `n` (<= kChunk) bytes of pinned memory that no pending copy touches. Caller holds issue_mu
  // and has made the device current.
  char* reserve(size_t n, StagingBuffer*& buf) {
    if (open_) {
      size_t off = (open_->used + kAlign - 1) / kAlign * kAlign;
      if (off + n <= kChunk) {
        open_->used = off + n;
        buf = open_;
        return open_->host + off;
      }
      sealed_.push_back(open_);
      open_ = nullptr;
    }
    StagingBuffer* b = nullptr;
    if (!sealed_.empty() && reusable_now(sealed_.front())) {
      b = sealed_.front();
      sealed_.pop_front();
    } else if (all_.size() < max_buffers_) {
      b = create();
    } else {
      // Popped only once it is reusable: if the wait throws, the buffer stays in the pool.
      wait_reusable(sealed_.front());
      b = sealed_.front();
      sealed_.pop_front();
    }
    b->used = n;
    open_ = b;
    buf = b;
    return b->host;
  }

  // After the copy into or out of `buf` has been issued on `stream`.
  void copied(StagingBuffer* buf, cudaStream_t stream) {
    CUDA_CHECK(cudaEventRecord(buf->last_copy, stream));
    buf->recorded = true;
  }

  void add_reader(StagingBuffer* buf) {
    std::lock_guard<std::mutex> lk(mu_);
    ++buf->readers;
  }

  // Called by a queue's host thread once a download's bytes have left `buf`.
  void drop_reader(StagingBuffer* buf) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      --buf->readers;
    }
    cv_.notify_all();
  }

 private:
  StagingBuffer* create() {
    auto b = std::make_unique<StagingBuffer>();
    void* host = nullptr;
    CUDA_CHECK(cudaHostAlloc(&host, kChunk, cudaHostAllocDefault));
    b->host = static_cast<char*>(host);
    cudaError_t e = cudaEventCreateWithFlags(&b->last_copy, cudaEventDisableTiming | cudaEventBlockingSync);
    if (e != cudaSuccess) {
      cudaFreeHost(host);
      throw_error(e, "cudaEventCreateWithFlags", __FILE__, __LINE__);
    }
    all_.push_back(std::move(b));
    return all_.back().get();
  }

  bool reusable_now(StagingBuffer* b) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (b->readers > 0) return false;
    }
    if (!b->recorded) return true;
    cudaError_t e = cudaEventQuery(b->last_copy);
    if (e == cudaSuccess) return true;
    // Not ready yet, or the device failed; either way wait_reusable() decides (and reports).
    cudaGetLastError();
    return false;
  }

  void wait_reusable(StagingBuffer* b) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return b->readers == 0; });
    }
    if (b->recorded) {
      cudaError_t e = cudaEventSynchronize(b->last_copy);
      if (e != cudaSuccess) {
        cudaGetLastError();
        fail("waiting for a staging buffer: ", detail::async_error(device_, e));
      }
    }
  }

  int device_;
  size_t max_buffers_;
  std::vector<std::unique_ptr<StagingBuffer>> all_;  // owned for the life of the process
  StagingBuffer* open_ = nullptr;                     // the buffer copies are carved from
  std::deque<StagingBuffer*> sealed_;                 // full buffers, oldest first
  std::mutex mu_;                                     // readers, shared with the host threads
  std::condition_variable cv_;
};

size_t staging_buffers_from_env() {
  size_t mb = 128;
  if (const char* env = std::getenv("TUNEKIT_CUDA_STAGING_MB"))
    if (*env) mb = size_t(std::strtoull(env, nullptr, 10));
  // Two buffers at least, so that filling one overlaps the copy of the other.
  return std::max<size_t>(2, std::min<size_t>(mb, size_t(1) << 20) / (kChunk >> 20));
}

StagingPool& staging(int device) {
  // Leaked with the process: a host thread may drop a reader while the process exits.
  static std::mutex* mu = new std::mutex();
  static std::vector<std::unique_ptr<StagingPool>>* pools =
      new std::vector<std::unique_ptr<StagingPool>>(size_t(detail::visible_devices()));
  std::lock_guard<std::mutex> lk(*mu);
  auto& p = (*pools)[size_t(device)];
  if (!p) p.reset(new StagingPool(device, staging_buffers_from_env()));
  return *p;
}

CudaQueue& as_cuda(Queue& q, const char* what) {
  auto* cq = dynamic_cast<CudaQueue*>(&q);
  TK_CHECK(cq, what, ": the queue of ", q.device().name(), " is not a CUDA queue");
  return *cq;
}

}  // namespace

// ---- transfers ---------------------------------------------------------------------------------

void upload(Queue& q, void* dst, const void* host_src, size_t bytes) {
  CudaQueue& cq = as_cuda(q, "upload");
  if (bytes == 0) return;
  TK_CHECK(dst && host_src, "upload: null pointer for a copy of ", bytes, " bytes to cuda:", cq.index());
  StagingPool& pool = staging(cq.index());
  make_current(cq.index());
  std::lock_guard<std::mutex> lk(pool.issue_mu);
  const char* src = static_cast<const char*>(host_src);
  char* out = static_cast<char*>(dst);
  for (size_t off = 0; off < bytes;) {
    size_t n = std::min(kChunk, bytes - off);
    StagingBuffer* buf = nullptr;
    char* region = pool.reserve(n, buf);
    std::memcpy(region, src + off, n);
    CUDA_CHECK(cudaMemcpyAsync(out + off, region, n, cudaMemcpyHostToDevice, cq.stream()));
    pool.copied(buf, cq.stream());
    off += n;
  }
}

void download(Queue& q, const void* src, void* host_dst, size_t bytes, std::function<void()> done) {
  CudaQueue& cq = as_cuda(q, "download");
  TK_CHECK(bytes == 0 || (src && host_dst), "download: null pointer for a copy of ", bytes, " bytes from cuda:",
           cq.index());
  auto finish = std::make_shared<std::function<void()>>(std::move(done));
  auto run_finish = [finish](bool) {
    if (*finish) (*finish)();
  };
  if (bytes == 0) {
    // Still in queue order: `done` reports the errors of the work before it, as a read would.
    cq.when_reached(run_finish);
    return;
  }
  // From here on the read is under way and `done` runs exactly once, failure or not: chunks
  // already issued still write into host_dst, which the caller keeps alive until `done`, so a
  // failure cannot be thrown back (the caller would free host_dst under those writes). It is
  // deferred on the queue instead, where `done` finds it through take_error().
  StagingPool& pool = staging(cq.index());
  bool done_queued = false;
  try {
    make_current(cq.index());
    std::lock_guard<std::mutex> lk(pool.issue_mu);
    const char* in = static_cast<const char*>(src);
    char* out = static_cast<char*>(host_dst);
    for (size_t off = 0; off < bytes;) {
      size_t n = std::min(kChunk, bytes - off);
      bool last = off + n == bytes;
      StagingBuffer* buf = nullptr;
      char* region = pool.reserve(n, buf);
      CUDA_CHECK(cudaMemcpyAsync(region, in + off, n, cudaMemcpyDeviceToHost, cq.stream()));
      pool.copied(buf, cq.stream());
      pool.add_reader(buf);
      try {
        // Chunks complete front to back on the queue's host thread, so when the last chunk's
        // callback runs every byte is in host_dst.
        cq.when_reached([&pool, buf, region, dst = out + off, n, fin = last ? finish : nullptr](bool ok) {
          if (ok) std::memcpy(dst, region, n);
          pool.drop_reader(buf);
          if (fin && *fin) (*fin)();
        });
      } catch (...) {
        pool.drop_reader(buf);
        throw;
      }
      done_queued = last;
      off += n;
    }
  } catch (const std::exception& e) {
    cq.defer_error(std::string("reading from cuda:") + std::to_string(cq.index()) + ": " + e.what());
    if (!done_queued) cq.when_reached(run_finish);
  }
}

}  // namespace cuda
}  // namespace tk
