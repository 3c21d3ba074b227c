// Caching host allocator. Training allocates the same activation and gradient sizes every step;
// returning blocks to a size-keyed cache instead of the OS makes a step's allocations cost a map
// lookup. Blocks are 64-byte aligned (one cache line, one AVX-512 vector). A cached block is
// reused for requests up to twice smaller, so the cache wastes at most half a block. Frees reach
// the allocator through the device queue, so a block is cached only once no queued work reads it.
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
  std::multimap<size_t, void*> cache_;
  std::unordered_map<void*, size_t> sizes_;  // live block -> its rounded size
  AllocatorStats stats_;
  size_t cache_limit_;
};

}  // namespace tk
