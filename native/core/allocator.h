// Caching host allocator. Training allocates the same activation and gradient sizes every step;
// returning blocks to a size-keyed cache instead of the OS makes a step's allocations cost a map
// lookup. Blocks are 64-byte aligned (one cache line, one AVX-512 vector). A cached block is
// reused for requests up to twice smaller, so the cache wastes at most half a block.
//
// Queue order, as the CUDA allocator's stream order. A tensor is released when JavaScript drops it,
// which is usually long before the queue has run the kernels that read it: JavaScript runs ahead.
// Such a block is pending: it goes to the cache only when the queue reaches its release (retire()).
// But a pending block can be handed at once to a new tensor whose every use is queued after the
// release (allocate_queued(): the tensors ops create, which only queued kernels touch), because the
// queue runs in order. Without this, a host that runs ahead of the queue would keep every
// intermediate of a forward pass allocated, and memory would follow the queue's lag instead of
// the program's live set (activation checkpointing would save nothing). Callers that write the
// memory at once (tensors made from host data) use allocate(), which never sees pending blocks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <unordered_map>
#include <mutex>

namespace tk {

struct AllocatorStats {
  int64_t allocated_bytes = 0;  // handed out and not yet released
  int64_t cached_bytes = 0;     // held in the cache for reuse
  int64_t peak_allocated_bytes = 0;
};

class CpuAllocator {
 public:
  static CpuAllocator& instance();
  void* allocate(size_t bytes);    // throws tk::Error when the system is out of memory
  void release(void* ptr);
  // A block for memory that only work queued on the CPU queue after this call touches; it may be
  // a pending block.
  void* allocate_queued(size_t bytes);
  // Marks a block pending at the moment its release is enqueued; returns the ticket that the
  // queued retire() must present (a block reused and released again gets a new one).
  uint64_t release_queued(void* ptr);
  // Runs in queue order: every reader queued before the release has finished, so the block, if
  // still pending under `ticket`, goes to the cache.
  void retire(void* ptr, uint64_t ticket);
  void empty_cache();
  AllocatorStats stats();
  // Starts a new peak measurement at the current allocation (benchmarks measure one phase).
  void reset_peak();
  // Upper bound on cached bytes; blocks released beyond it go back to the system.
  void set_cache_limit(size_t bytes);

 private:
  CpuAllocator();
  static size_t round_size(size_t bytes);
  std::mutex mu_;
  // Both with mu_ held: a block of `from` that fits `size` (up to twice larger), now allocated, or
  // nullptr; and a released block into the cache, or back to the system beyond the cache limit.
  void* take(std::multimap<size_t, void*>& from, size_t size);
  void cache_or_free(void* ptr, size_t size);
  std::multimap<size_t, void*> cache_;
  std::multimap<size_t, void*> pending_;
  struct Pending {
    size_t size;
    uint64_t ticket;
  };
  std::unordered_map<void*, Pending> pending_info_;
  uint64_t next_ticket_ = 1;
  std::unordered_map<void*, size_t> sizes_;  // live block -> its rounded size
  AllocatorStats stats_;
  size_t cache_limit_;
};

}  // namespace tk
