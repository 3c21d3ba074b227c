// The FMA probe keeps 12 independent accumulator chains per thread: with an FMA latency of 4
// cycles and 2 FMA ports, 8 chains saturate the ports, and 12 leave headroom for skew. The
// operands stay in registers, so the loop measures the execution units and nothing else.
// Bandwidth probes touch buffers far larger than the last-level cache, after a warm-up pass that
// also faults the pages in.
#include "probe.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "../core/allocator.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace tk {

namespace {

using Clock = std::chrono::steady_clock;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) double fma_loop_avx512(int64_t iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  float lanes[16];
  _mm512_storeu_ps(lanes, s);
  double r = 0;
  for (float f : lanes) r += f;
  return r;
}

// vdpbf16ps: each instruction does 16 lanes x 2 bf16 products, accumulated in fp32 (4 flops a lane).
__attribute__((target("avx512f,avx512bf16"))) double dpbf16_loop(int64_t iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  float lanes[16];
  _mm512_storeu_ps(lanes, s);
  double r = 0;
  for (float f : lanes) r += f;
  return r;
}

__attribute__((target("avx2,fma"))) double fma_loop_avx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  double r = 0;
  for (float f : lanes) r += f;
  return r;
}
#endif

double fma_loop_portable(int64_t iters) {
  float acc[12][4];
  for (int i = 0; i < 12; ++i)
    for (int l = 0; l < 4; ++l) acc[i][l] = float(i) * 1e-3f;
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i)
      for (int l = 0; l < 4; ++l) acc[i][l] = acc[i][l] * 0.999999f + 1e-7f;
  double r = 0;
  for (auto& row : acc)
    for (float f : row) r += f;
  return r;
}

// Lanes of one FMA instruction at `isa`.
int lanes(CpuIsa isa) { return isa >= CpuIsa::Avx512 ? 16 : isa == CpuIsa::Avx2 ? 8 : 4; }

double run_fma(CpuIsa isa, int64_t iters) {
#if defined(__x86_64__)
  if (isa >= CpuIsa::Avx512) return fma_loop_avx512(iters);
  if (isa == CpuIsa::Avx2) return fma_loop_avx2(iters);
#endif
  return fma_loop_portable(iters);
}

volatile double g_sink;  // keeps results observable so the loops are not removed

}  // namespace

namespace {

// Runs `loop` (12 independent chains of `flops_per_iter` flops per iteration) on every pool
// thread for about `seconds`, and returns the best of three GFLOP/s figures: on a shared machine
// a run can lose its core for a while, and the peak is what the hardware can do.
double peak_of(ThreadPool& pool, double seconds, double flops_per_iter, const std::function<double(int64_t)>& loop) {
  // Calibrate on one thread, then run all threads for the same iteration count.
  int64_t iters = 1 << 16;
  for (;;) {
    auto t0 = Clock::now();
    g_sink = loop(iters);
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (dt > seconds / 10 || iters > (int64_t(1) << 40)) {
      iters = int64_t(double(iters) * seconds / std::max(dt, 1e-9) / 3) + 1;
      break;
    }
    iters *= 4;
  }
  int nt = pool.size();
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = Clock::now();
    pool.parallel([&](int, int) { g_sink = loop(iters); });
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, double(iters) * flops_per_iter * nt / dt / 1e9);
  }
  return best;
}

}  // namespace

PeakFlops probe_peak_flops(ThreadPool& pool, double seconds) {
  CpuIsa isa = active_isa();
  PeakFlops out{};
  out.isa = isa;
  out.gflops = peak_of(pool, seconds, 12.0 * lanes(isa) * 2, [isa](int64_t n) { return run_fma(isa, n); });
#if defined(__x86_64__)
  if (isa == CpuIsa::Avx512Bf16) out.bf16_gflops = peak_of(pool, seconds, 12.0 * 16 * 4, dpbf16_loop);
#endif
  return out;
}

double probe_read_bandwidth(ThreadPool& pool, size_t bytes) {
  size_t n = bytes / sizeof(float);
  float* buf = static_cast<float*>(CpuAllocator::instance().allocate(n * sizeof(float)));
  pool.parallel_for(int64_t(n), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) buf[i] = 1.0f;
  });
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<double> partial(size_t(pool.size()), 0.0);
    auto t0 = Clock::now();
    pool.parallel([&](int tid, int nt) {
      int64_t b = int64_t(n) * tid / nt, e = int64_t(n) * (tid + 1) / nt;
      float s[16] = {};
      int64_t i = b;
      for (; i + 16 <= e; i += 16)
        for (int l = 0; l < 16; ++l) s[l] += buf[i + l];
      for (; i < e; ++i) s[0] += buf[i];
      double t = 0;
      for (float f : s) t += f;
      partial[size_t(tid)] = t;
    });
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    double sum = 0;
    for (double p : partial) sum += p;
    g_sink = sum;
    best = std::max(best, double(n * sizeof(float)) / dt / 1e9);
  }
  CpuAllocator::instance().release(buf);
  return best;
}

double probe_copy_bandwidth(ThreadPool& pool, size_t bytes) {
  auto& alloc = CpuAllocator::instance();
  char* src = static_cast<char*>(alloc.allocate(bytes));
  char* dst = static_cast<char*>(alloc.allocate(bytes));
  auto copy = [&] {
    pool.parallel_for(int64_t(bytes), 1 << 20, [&](int64_t b, int64_t e) {
      std::memcpy(dst + b, src + b, size_t(e - b));
    });
  };
  pool.parallel_for(int64_t(bytes), 1 << 20, [&](int64_t b, int64_t e) { std::memset(src + b, 1, size_t(e - b)); });
  copy();  // warm-up: faults dst in
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = Clock::now();
    copy();
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * double(bytes) / dt / 1e9);
  }
  g_sink = dst[bytes / 2];
  alloc.release(src);
  alloc.release(dst);
  return best;
}

}  // namespace tk
