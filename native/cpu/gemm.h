// CPU GEMM: the kernel everything else calls (linear layers, attention blocks, LoRA, losses).
//
//   C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]      for b in [0, batch)
//   op(A[b]) is M x K, op(B[b]) is K x N, C[b] is M x N.
//
// Matrices are row-major with a leading dimension (elements between rows) and a batch stride
// (elements between consecutive matrices; 0 broadcasts one matrix to the whole batch). With
// trans_a the stored A is K x M (lda >= M) and op(A) = A^T; likewise B is N x K with trans_b.
// A and B share one dtype: F32, or BF16 with fp32 accumulation. C is F32 or BF16 (rounded to
// nearest even at the store). beta == 0 ignores C's old contents (NaNs included).
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "../core/thread_pool.h"
#include "isa.h"

namespace tk {

struct GemmParams {
  int64_t batch = 1, M = 0, N = 0, K = 0;
  DType ab_dtype = DType::F32;  // F32 | BF16
  DType c_dtype = DType::F32;   // F32 | BF16
  const void* A = nullptr;
  int64_t lda = 0, batch_stride_a = 0;
  bool trans_a = false;
  const void* B = nullptr;
  int64_t ldb = 0, batch_stride_b = 0;
  bool trans_b = false;
  void* C = nullptr;
  int64_t ldc = 0, batch_stride_c = 0;
  float alpha = 1.0f, beta = 0.0f;
};

// Optimized GEMM, dispatched on active_isa(). Parameters are assumed valid (ops/ checks them).
void gemm_cpu(const GemmParams& p, ThreadPool& pool);
// The same at a given ISA level (must be <= detected_isa()); for tests and benchmarks.
void gemm_cpu_isa(const GemmParams& p, ThreadPool& pool, CpuIsa isa);

}  // namespace tk
