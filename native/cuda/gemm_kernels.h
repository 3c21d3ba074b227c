// Dense GEMM on CUDA through cuBLASLt: the GPU column of cpu/gemm.h's gemm_cpu, with the same
// GemmParams contract.
//
//   C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]      for b in [0, batch)
//   op(A[b]) is M x K, op(B[b]) is K x N, C[b] is M x N; all pointers are device memory.
//
// Row-major matrices with leading dimensions and batch strides in elements (0 broadcasts one
// matrix to the whole batch), trans_a / trans_b as in gemm.h. A and B share one dtype: F32, BF16
// or F16; C is F32 or BF16. beta == 0 ignores C's old contents (NaNs included). GemmParams's
// b_source (a packing callback, a CPU-only notion) is rejected.
//
// Design.
// - Row-major to column-major. cuBLASLt is column-major; a row-major M x N matrix with leading
//   dimension ld is, as stored, the column-major N x M matrix C^T with the same ld. So the call
//   computes C^T = op(B)^T op(A)^T: cuBLASLt's "A" is our B (stored N x K column-major when B is
//   K x N row-major, i.e. op N, or K x N column-major with op T when trans_b), its "B" is our A,
//   m = N, n = M, k = K. Nothing is copied or transposed in memory.
// - One cuBLASLt handle per device, created on first use and kept for the life of the process.
//   Heuristic algorithm selection (cublasLtMatmulAlgoGetHeuristic, the first, i.e. fastest
//   estimated, result) runs once per distinct problem: the descriptors and the chosen algorithm are
//   cached under a key of device, dtypes, transposes, M/N/K, leading dimensions, batch count and
//   strides, the pointers' alignments and the TF32 setting. The cache is bounded (it is cleared
//   when it reaches 4096 entries; a plan in use by another thread stays alive until it finishes).
// - Workspace: up to 32 MiB (what NVIDIA recommends for Hopper), taken per call from tunekit's
//   stream-ordered caching allocator for the call's stream and released right after the call is
//   issued, so it costs a map lookup and is reused at once by the next GEMM on that stream.
// - Numerics: fp32 compute and scale type (CUBLAS_COMPUTE_32F) for every dtype: bf16 and f16
//   operands multiply on tensor cores with fp32 accumulation. F32 operands are computed in true
//   fp32 by default, not TF32 (which keeps 10 mantissa bits of each input): DESIGN.md's CPU and
//   CUDA numerics match and the tests hold fp32 to fp32 tolerances. Opt in with
//   gemm_cuda_allow_tf32(true) or the environment variable TUNEKIT_CUDA_TF32=1 (read once, at the
//   first GEMM) for roughly 8x the fp32 throughput on A100/H100 at ~1e-3 relative error per product.
//   Split-K reductions are limited to schemes that stage fp32 partial sums in the workspace and
//   reduce them in a fixed order (never in-place through C, never in bf16), so a bf16 C is rounded
//   once, like the CPU kernel's, and a problem gives the same bits on every run (for a given
//   device, cuBLASLt version and operand alignment).
// - Combinations cuBLASLt has no kernel for (F32 or F16 operands with a BF16 C) run with an fp32
//   C in a temporary [batch, M, N] buffer (C's old contents widened into it first when beta != 0),
//   then rounded to bf16 (nearest even) into C: same numerics, one extra pass over C.
// - K == 0 gives C = beta * C (zeros for beta == 0) without calling cuBLASLt. A broadcast C
//   (batch_stride_c == 0, batch > 1) is computed as the CPU computes it: one matrix after the
//   other, each reading the previous result when beta != 0.
// - Device: the calling thread's current device (the queue makes it current); work is issued on
//   `stream` (a cudaStream_t as void*) and nothing waits for it.
//
// Without cuBLASLt. CMake defines TUNEKIT_WITH_CUBLASLT only where cublasLt.h and the library
// exist; a build without it still has gemm_cuda, which throws a tk::Error saying how to get a
// build with cuBLASLt (has_cublaslt() in device.h tells beforehand).
#pragma once

#include "../cpu/gemm.h"

namespace tk {

// Parameters as in cpu/gemm.h; shapes: A [batch][M x K] (stored K x M with trans_a), B [batch][K x N]
// (stored N x K with trans_b), C [batch][M x N], all device memory of the current device.
// Throws tk::Error on invalid parameters (before anything is issued), when the build has no
// cuBLASLt, or when cuBLASLt has no algorithm for the problem. Asynchronous on `stream`.
void gemm_cuda(const GemmParams& p, void* stream);

// TF32 for F32 operands (see above). Default: off, or on when TUNEKIT_CUDA_TF32=1.
void gemm_cuda_allow_tf32(bool allow);
bool gemm_cuda_tf32_allowed();

}  // namespace tk
