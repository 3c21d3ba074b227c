// Peak probes: what this machine can do at most, so that benchmarks report each kernel figure
// as a fraction of a measured limit rather than a vendor number.
#pragma once
#include <cstddef>

#include "../core/thread_pool.h"
#include "isa.h"

namespace tk {

struct PeakFlops {
  double gflops = 0;       // fp32 FMA throughput, all threads of the pool
  double bf16_gflops = 0;  // bf16 dot-product (AVX512-BF16) throughput; 0 without the instructions
  CpuIsa isa = CpuIsa::Portable;  // the vector width it was measured with
};

// Runs independent FMA (and bf16 dot-product) chains on every pool thread for about `seconds`
// each; counts 2 flops per fp32 lane, 4 per bf16-pair lane.
PeakFlops probe_peak_flops(ThreadPool& pool, double seconds);
// Streams `bytes` of memory through all pool threads; returns read GB/s (1e9 bytes/s).
double probe_read_bandwidth(ThreadPool& pool, size_t bytes);
// Copies `bytes` to another buffer through all pool threads; counts bytes read + bytes written.
double probe_copy_bandwidth(ThreadPool& pool, size_t bytes);

}  // namespace tk
