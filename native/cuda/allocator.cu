// The stream-ordered caching device allocator. The policy mirrors the CPU allocator
// (core/allocator.h): training asks for the same activation and gradient sizes every step, so
// released blocks go to a size-keyed cache instead of back to the driver, and a step's allocations
// cost a map lookup instead of a cudaMalloc (which can take milliseconds and serializes the device)
// and a cudaFree (which waits for the whole device).
//
// Stream order is what makes the cache safe without events. A block is released through its
// queue once every task that reads it has issued its work; that work is on the block's stream.
// The block is handed out again only to a request for the same stream, and whatever uses it next
// is issued on that stream later, so the device runs it after the old readers. A block that work
// on several streams uses would need an event per extra stream before it could be cached; today
// every device has exactly one stream (queue.cu), so the cache is keyed by stream for
// correctness, not for sharing.
//
// Sizes: below 2 MiB, requests round up to 512 bytes; from 2 MiB, to whole 2 MiB pages, the
// granularity the driver maps large allocations with, so the rounding costs no device memory and
// sizes that differ by a few rows land in one bin. A cached block serves requests down to half
// its size, which bounds the waste at half a block. Blocks are never split or merged: that keeps
// release O(log n) and the allocator simple enough to trust, at the price of fragmentation that
// the out-of-memory path resolves by returning the whole cache to the driver and retrying.
//
// Giving memory back (empty_cache, releases beyond the cache limit, the out-of-memory path) first
// waits for the block's stream explicitly rather than leaning on cudaFree's implicit
// synchronization: a block freed while a queued kernel still reads it could be handed to another
// allocation under that kernel.
//
// Per-device state is leaked with the process, like the CPU allocator: frees can arrive from
// host threads while the process exits.
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "device.h"
#include "internal.cuh"

namespace tk {
namespace cuda {

namespace {

constexpr size_t kSmallGranule = 512;
constexpr size_t kLargeFrom = size_t(2) << 20;
constexpr size_t kLargeGranule = size_t(2) << 20;

struct DeviceHeap {
  std::mutex mu;
  // stream -> (rounded size -> block); see the header comment for why the stream is part of the key.
  std::map<cudaStream_t, std::multimap<size_t, void*>> cache;
  std::unordered_map<void*, size_t> live;  // handed-out block -> its rounded size
  AllocatorStats stats;
  size_t cache_limit = std::numeric_limits<size_t>::max();
};

size_t cache_limit_from_env() {
  const char* env = std::getenv("TUNEKIT_CUDA_CACHE_MB");
  if (!env || !*env) return std::numeric_limits<size_t>::max();
  unsigned long long mb = std::strtoull(env, nullptr, 10);
  if (mb >= (std::numeric_limits<size_t>::max() >> 20)) return std::numeric_limits<size_t>::max();
  return size_t(mb) << 20;
}

DeviceHeap& heap(int device, const char* what) {
  detail::check_index(device, what);
  static std::vector<std::unique_ptr<DeviceHeap>>* heaps = [] {
    auto* v = new std::vector<std::unique_ptr<DeviceHeap>>();
    size_t limit = cache_limit_from_env();
    for (int i = 0; i < detail::visible_devices(); ++i) {
      v->emplace_back(new DeviceHeap());
      v->back()->cache_limit = limit;
    }
    return v;
  }();
  return *(*heaps)[size_t(device)];
}

size_t round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  size_t g = bytes < kLargeFrom ? kSmallGranule : kLargeGranule;
  TK_CHECK(bytes <= std::numeric_limits<size_t>::max() - g, "CUDA allocation of ", bytes, " bytes is too large");
  return (bytes + g - 1) / g * g;
}

std::string mib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", bytes / 1048576.0);
  return buf;
}

void note_allocated(DeviceHeap& h, void* p, size_t size) {
  h.live.emplace(p, size);
  h.stats.allocated_bytes += int64_t(size);
  if (h.stats.allocated_bytes > h.stats.peak_allocated_bytes) h.stats.peak_allocated_bytes = h.stats.allocated_bytes;
}

// Waits for each stream that last used a block, then frees the blocks. Returns the first CUDA
// error of those calls instead of throwing, so that every block is attempted.
cudaError_t free_blocks(int device, const std::map<cudaStream_t, std::multimap<size_t, void*>>& blocks) {
  cudaError_t first = cudaSuccess;
  make_current(device);
  for (const auto& per_stream : blocks) {
    if (per_stream.second.empty()) continue;
    cudaError_t e = cudaStreamSynchronize(per_stream.first);
    if (e != cudaSuccess && first == cudaSuccess) first = e;
    for (const auto& block : per_stream.second) {
      e = cudaFree(block.second);
      if (e != cudaSuccess && first == cudaSuccess) first = e;
    }
  }
  if (first != cudaSuccess) cudaGetLastError();
  return first;
}

}  // namespace

namespace detail {

void* allocate_on(int device, size_t bytes, cudaStream_t stream) {
  DeviceHeap& h = heap(device, "allocate");
  const size_t size = round_size(bytes);
  {
    std::lock_guard<std::mutex> lk(h.mu);
    auto per_stream = h.cache.find(stream);
    if (per_stream != h.cache.end()) {
      auto& bins = per_stream->second;
      auto it = bins.lower_bound(size);
      if (it != bins.end() && it->first / 2 <= size) {
        void* p = it->second;
        size_t got = it->first;
        bins.erase(it);
        h.stats.cached_bytes -= int64_t(got);
        note_allocated(h, p, got);
        return p;
      }
    }
  }
  make_current(device);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, size);
  if (e == cudaErrorMemoryAllocation) {
    // Cached blocks of the wrong sizes (or of another stream) may be all that stands in the way.
    cudaGetLastError();
    empty_cache(device);
    p = nullptr;
    e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
      AllocatorStats s = allocator_stats(device);
      fail("out of CUDA memory on cuda:", device, ": asked for ", mib(double(bytes)), " MiB, ", mib(double(free_b)),
           " MiB free of ", mib(double(total_b)), " MiB (", mib(double(s.allocated_bytes)),
           " MiB allocated by tunekit, ", mib(double(s.cached_bytes)),
           " MiB cached by tunekit). Dispose of tensors that are no longer needed (t.dispose(), tk.scope()), "
           "or lower the batch size or sequence length");
    }
  }
  if (e != cudaSuccess) throw_error(e, "cudaMalloc", __FILE__, __LINE__);
  std::lock_guard<std::mutex> lk(h.mu);
  note_allocated(h, p, size);
  return p;
}

void release_on(int device, void* ptr, cudaStream_t stream) noexcept {
  if (!ptr) return;
  try {
    DeviceHeap& h = heap(device, "release");
    {
      std::lock_guard<std::mutex> lk(h.mu);
      auto it = h.live.find(ptr);
      if (it == h.live.end()) return;  // not ours: ignore rather than corrupt the cache
      size_t size = it->second;
      h.live.erase(it);
      h.stats.allocated_bytes -= int64_t(size);
      if (size_t(h.stats.cached_bytes) + size <= h.cache_limit) {
        h.cache[stream].emplace(size, ptr);
        h.stats.cached_bytes += int64_t(size);
        return;
      }
    }
    std::map<cudaStream_t, std::multimap<size_t, void*>> one;
    one[stream].emplace(size_t(0), ptr);
    free_blocks(device, one);
  } catch (...) {
    // Only reachable when the device cannot be made current, i.e. the context is gone; the block
    // goes with it. Releases run in destructors and must not throw.
    cudaGetLastError();
  }
}

}  // namespace detail

void* allocate(int device, size_t bytes) {
  detail::check_index(device, "allocate");
  return detail::allocate_on(device, bytes, detail::device_stream(device));
}

AllocatorStats allocator_stats(int device) {
  DeviceHeap& h = heap(device, "allocator_stats");
  std::lock_guard<std::mutex> lk(h.mu);
  return h.stats;
}

void reset_peak(int device) {
  DeviceHeap& h = heap(device, "reset_peak");
  std::lock_guard<std::mutex> lk(h.mu);
  h.stats.peak_allocated_bytes = h.stats.allocated_bytes;
}

void empty_cache(int device) {
  DeviceHeap& h = heap(device, "empty_cache");
  std::map<cudaStream_t, std::multimap<size_t, void*>> blocks;
  {
    std::lock_guard<std::mutex> lk(h.mu);
    blocks.swap(h.cache);
    h.stats.cached_bytes = 0;
  }
  if (blocks.empty()) return;
  cudaError_t e = free_blocks(device, blocks);
  if (e != cudaSuccess) fail("empty_cache on cuda:", device, ": ", error_text(e), sticky_hint(e));
}

void set_cache_limit(int device, size_t bytes) {
  DeviceHeap& h = heap(device, "set_cache_limit");
  std::lock_guard<std::mutex> lk(h.mu);
  h.cache_limit = bytes;
}

}  // namespace cuda
}  // namespace tk
