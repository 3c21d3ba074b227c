#include "allocator.h"

#include <cstdlib>
#include <string>

#include "error.h"

namespace tk {

namespace {
constexpr size_t kAlign = 64;
}

CpuAllocator& CpuAllocator::instance() {
  static CpuAllocator* a = new CpuAllocator();  // never destroyed: frees may arrive during exit
  return *a;
}

CpuAllocator::CpuAllocator() {
  cache_limit_ = size_t(4) << 30;
  if (const char* env = std::getenv("TUNEKIT_CPU_CACHE_MB")) cache_limit_ = size_t(std::strtoull(env, nullptr, 10)) << 20;
}

size_t CpuAllocator::round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  // 64-byte granularity below 1 MiB, 64 KiB above: keeps sizes that differ by a few rows in one bin.
  size_t g = bytes < (size_t(1) << 20) ? kAlign : size_t(64) << 10;
  return (bytes + g - 1) / g * g;
}

void* CpuAllocator::take(std::multimap<size_t, void*>& from, size_t size) {
  auto it = from.lower_bound(size);
  if (it == from.end() || it->first > 2 * size) return nullptr;
  void* p = it->second;
  size_t got = it->first;
  from.erase(it);
  stats_.cached_bytes -= int64_t(got);
  stats_.allocated_bytes += int64_t(got);
  if (stats_.allocated_bytes > stats_.peak_allocated_bytes) stats_.peak_allocated_bytes = stats_.allocated_bytes;
  sizes_[p] = got;
  return p;
}

void* CpuAllocator::allocate(size_t bytes) {
  size_t size = round_size(bytes);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (void* p = take(cache_, size)) return p;
  }
  void* p = std::aligned_alloc(kAlign, size);
  if (!p) {
    empty_cache();
    p = std::aligned_alloc(kAlign, size);
  }
  TK_CHECK(p, "out of host memory: could not allocate ", bytes, " bytes");
  std::lock_guard<std::mutex> lk(mu_);
  stats_.allocated_bytes += int64_t(size);
  if (stats_.allocated_bytes > stats_.peak_allocated_bytes) stats_.peak_allocated_bytes = stats_.allocated_bytes;
  sizes_[p] = size;
  return p;
}

void CpuAllocator::release(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = sizes_.find(ptr);
  if (it == sizes_.end()) return;  // not ours: ignore rather than corrupt the heap
  size_t size = it->second;
  sizes_.erase(it);
  stats_.allocated_bytes -= int64_t(size);
  cache_or_free(ptr, size);
}

void CpuAllocator::cache_or_free(void* ptr, size_t size) {
  if (size_t(stats_.cached_bytes) + size <= cache_limit_) {
    cache_.emplace(size, ptr);
    stats_.cached_bytes += int64_t(size);
  } else {
    std::free(ptr);
  }
}

void* CpuAllocator::allocate_queued(size_t bytes) {
  size_t size = round_size(bytes);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (void* p = take(pending_, size)) {
      pending_info_.erase(p);
      return p;
    }
  }
  return allocate(bytes);
}

uint64_t CpuAllocator::release_queued(void* ptr) {
  if (!ptr) return 0;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = sizes_.find(ptr);
  if (it == sizes_.end()) return 0;  // not ours: retire() will ignore it too
  size_t size = it->second;
  sizes_.erase(it);
  stats_.allocated_bytes -= int64_t(size);
  // Pending blocks count as cached: they hold memory that no tensor owns.
  stats_.cached_bytes += int64_t(size);
  uint64_t ticket = next_ticket_++;
  pending_.emplace(size, ptr);
  pending_info_[ptr] = Pending{size, ticket};
  return ticket;
}

void CpuAllocator::retire(void* ptr, uint64_t ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  auto info = pending_info_.find(ptr);
  if (info == pending_info_.end() || info->second.ticket != ticket) return;  // reused since
  size_t size = info->second.size;
  pending_info_.erase(info);
  auto range = pending_.equal_range(size);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second == ptr) {
      pending_.erase(it);
      break;
    }
  stats_.cached_bytes -= int64_t(size);
  cache_or_free(ptr, size);
}

void CpuAllocator::empty_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : cache_) std::free(kv.second);
  cache_.clear();
  stats_.cached_bytes = 0;
}

AllocatorStats CpuAllocator::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void CpuAllocator::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
}

void CpuAllocator::set_cache_limit(size_t bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  cache_limit_ = bytes;
}

}  // namespace tk
