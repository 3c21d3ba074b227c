// Tests of core/allocator's queue-ordered reuse (the CPU counterpart of a stream-ordered
// allocator), against the rules it must keep:
// - a pending block (release enqueued, not yet run) goes to allocate_queued() callers at once,
//   and never to allocate() callers, who write memory before anything is queued;
// - retire() moves a block to the cache only under the ticket of its latest release: a block that
//   was handed out again and released again stays pending until its second release is retired;
// - the statistics count a pending block as cached, not allocated;
// - through a real CpuQueue: a kernel queued before a release still reads its data intact, while
//   a tensor allocated after the release reuses the block and is written after that read.
#include <atomic>
#include <cstring>
#include <vector>

#include "../core/allocator.h"
#include "../core/queue.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

TK_TEST(allocator_queued_reuse_rules) {
  CpuAllocator& a = CpuAllocator::instance();
  const size_t n = 3 << 20;  // a size no other test holds, so the cache serves it predictably
  a.empty_cache();
  void* p = a.allocate_queued(n);
  const AllocatorStats live = a.stats();
  uint64_t t1 = a.release_queued(p);
  AllocatorStats s = a.stats();
  ctx.check(t1 != 0, "release_queued returns a ticket");
  ctx.check(s.allocated_bytes == live.allocated_bytes - int64_t(n) && s.cached_bytes == live.cached_bytes + int64_t(n),
            "a pending block counts as cached, not allocated");
  void* q = a.allocate(n);
  ctx.check(q != p, "allocate() never hands out a pending block");
  void* r = a.allocate_queued(n);
  ctx.check(r == p, "allocate_queued() reuses the pending block at once");
  uint64_t t2 = a.release_queued(r);
  ctx.check(t2 != t1, "a second release gets a new ticket");
  a.retire(p, t1);  // the first release reaches the queue: the block is pending again since
  void* u = a.allocate(n);
  ctx.check(u != p, "a stale retire() leaves the block pending");
  a.retire(p, t2);
  a.release(u);
  a.release(q);
  // Both u and q are cached now too; the freshest fit is any of the three blocks of this size.
  std::vector<void*> got = {a.allocate(n), a.allocate(n), a.allocate(n)};
  bool has_p = false;
  for (void* g : got) has_p |= g == p;
  ctx.check(has_p, "after its latest release is retired, the block is in the cache for everyone");
  for (void* g : got) a.release(g);
  a.retire(p, t2);  // a duplicate retire is harmless
  ctx.check(a.stats().allocated_bytes == live.allocated_bytes - int64_t(n), "allocated bytes return to the baseline");
}

TK_TEST(allocator_queued_reuse_through_the_queue) {
  // JavaScript's pattern: queue a slow reader of buffer A, drop A (release enqueued behind the
  // reader), allocate B at once (it gets A's block) and queue a writer of B. The queue's order
  // makes the writer run after the reader, so the reader must see A's values.
  CpuQueue queue(2);
  CpuAllocator& a = CpuAllocator::instance();
  const size_t n = 5 << 20;
  const size_t count = n / sizeof(float);
  for (int round = 0; round < 20; ++round) {
    float* buf = static_cast<float*>(a.allocate(n));
    for (size_t i = 0; i < count; ++i) buf[i] = float(i % 1000);
    std::atomic<double> sum{0};
    queue.enqueue([buf, count, &sum] {
      double s = 0;
      for (int rep = 0; rep < 4; ++rep)
        for (size_t i = 0; i < count; ++i) s += buf[i];
      sum = s;
    });
    queue.release(buf);
    float* next = static_cast<float*>(a.allocate_queued(n));
    ctx.check(next == buf, "the tensor allocated after the release reuses the pending block");
    queue.enqueue([next, count] { std::memset(next, 0xFF, count * sizeof(float)); });
    queue.release(next);
    queue.synchronize();
    double want = 0;
    for (size_t i = 0; i < count; ++i) want += double(i % 1000);
    ctx.check(sum.load() == 4 * want, "the reader queued before the release saw its data");
  }
}
