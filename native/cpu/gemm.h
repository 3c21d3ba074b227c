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
//
// B may instead come from a GemmBSource: a packer that produces op(B)'s panels itself, so a
// weight stored compressed (NF4, cpu/qlora.h) is expanded tile by tile while the GEMM packs it and
// never exists in full precision.
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "../core/thread_pool.h"
#include "isa.h"

namespace tk {

namespace gemm_detail {
enum class PackFmt : int;  // the packed-panel formats (gemm_internal.h)
}

// A B operand that packs itself. pack() has the contract of gemm_internal.h's PanelPacker for
// op(B) (K x N): it writes the columns [w0, w0 + width) x depth [k0, k0 + kc) of op(B) as
// ceil(width / W) consecutive panels of width W in format `fmt`, zero-padded, each holding values
// exactly representable in the GEMM's ab_dtype (a BF16 source rounds). The GEMM calls it from
// several pool threads at once (it must be reentrant) with the ISA level it runs at (the packer
// must not use a higher one), and for tiny products once with fmt F32 and W = width = N to get
// op(B) as a dense K x N fp32 array.
struct GemmBSource {
  void (*pack)(const void* ctx, gemm_detail::PackFmt fmt, CpuIsa isa, int64_t w0, int64_t width, int64_t k0,
               int64_t kc, int W, void* dst) = nullptr;
  const void* ctx = nullptr;
};

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
  // Optional: op(B) from a packer instead of B / ldb / trans_b / batch_stride_b (all unused when
  // set); the same op(B) serves every matrix of the batch.
  const GemmBSource* b_source = nullptr;
};

// Optimized GEMM, dispatched on active_isa(). Parameters are assumed valid (ops/ checks them).
void gemm_cpu(const GemmParams& p, ThreadPool& pool);
// The same at a given ISA level (must be <= detected_isa()); for tests and benchmarks.
void gemm_cpu_isa(const GemmParams& p, ThreadPool& pool, CpuIsa isa);

}  // namespace tk
