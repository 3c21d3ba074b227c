// CUDA fused linear losses: the language-model head and its loss in one call, forward and
// gradients together, without ever forming the [N, V] logits. The contracts are those of
// cpu/linear_loss.h (linear_cross_entropy_cpu, linear_distill_cpu): the same operands, formulas,
// reductions, ignore_index handling, optional gradients and LinearLossStats, on TensorViews of
// device memory, issued on `stream` (a cudaStream_t as void*; a plain C++ header).
//
// Design (per chunk of R rows that count, one chunk's logits live at a time):
//   1. S = h_chunk W^T                     [R, V] fp32   gemm_cuda (cuBLASLt), into a bounded
//                                                        fp32 scratch with a padded row pitch P
//      (distillation: also the teacher's Tl = t_chunk Wt^T [R, V] fp32)
//   2. the fused row kernel (loss_kernels.cu's row engine): per row its log-sum-exp(s), the loss,
//      and the logit gradient G written over S in place -- fp32 for an F32 head; for a BF16 head
//      rounded to bf16 in place (row r's bf16 G fills the first half of row r's fp32 bytes, pitch
//      2P bf16), which is the operand dtype the gradient GEMMs take (GemmParams has one dtype for
//      A and B). Mixed distillation (0 < alpha < 1) computes both terms in the same pass, so it
//      needs no third buffer.
//   3. dweight (+)= G^T h_chunk            [V, D]        gemm_cuda, beta = 0 on the first chunk,
//                                                        1 after
//   4. dhidden_chunk = G W                 [R, D]        gemm_cuda
// Rows that count (targets != ignore_index) are listed on the device first (a single-block
// ordered compaction) and only they are chunked: when every row counts, the GEMMs read hidden and
// write dhidden in place; otherwise the chunk's hidden rows are gathered into an R x D buffer and
// its dhidden rows scattered back (ignored rows get zero dhidden rows and are never multiplied, so
// a NaN in an ignored row's hidden state reaches neither the loss nor dweight).
//
// The one host wait: with targets, the call reads back three integers -- how many rows count, and
// the first target that is neither ignore_index nor in [0, V) -- before planning (cudaMemcpyAsync
// into host memory, then cudaStreamSynchronize on `stream`, which waits for the work queued
// before the call). The chunk plan (how many GEMMs of which height) is host-side and depends on
// that count, and a bad target is then rejected with the CPU's tk::Error before any output is
// written. linear_distill_cuda without targets does not wait.
//
// Scratch: every buffer comes from cudaMallocAsync on `stream` (one block for the row list and
// the read-back, one for the plan) and goes back with cudaFreeAsync on `stream` when the call
// returns or throws: stream-ordered, so it is never released while this call's kernels still use
// it, and reusable at once by later work on the stream. What LinearLossStats::scratch_bytes counts:
// - R x P fp32 per logits buffer (P = V rounded up to 8: 32-byte aligned rows for cuBLASLt):
//   1 for cross entropy, 2 for distillation (student, teacher). R is chosen so that they fit in
//   kLinearLossChunkBytesCuda (at least kLinearLossMinChunkRowsCuda rows, at most the counted
//   rows), then evened out over the chunks; the params' chunk_rows overrides. The GPU budget is
//   larger than the CPU's (the GEMMs want hundreds of rows to fill the tensor cores): at
//   V = 128256 it is ~520 rows per chunk.
// - BF16 dweight over more than one chunk: a fp32 [V, D] accumulator, rounded to bf16 once at the
//   end (rounding per chunk would lose small updates; as on the CPU). One chunk writes bf16 at once.
// - When some rows are ignored: R x D gathered hidden rows (per head) and R x D dhidden rows; N row
//   indices; per counted row one or two fp32 values; a few bytes for the read-back.
// cuBLASLt's own workspace is gemm_cuda's (tunekit's caching allocator) and is not counted.
// cudaMallocAsync serves from the device's default memory pool, which keeps freed memory for reuse
// by later calls until a synchronization point and then returns what exceeds its release threshold
// (cudaMemPoolAttrReleaseThreshold, 0 by default) to the driver; a process that calls these losses
// every step and synchronizes in between may raise that threshold so the scratch stays mapped.
//
// Numerics: logits, losses and the gradient G are fp32 (bf16 storage, fp32 accumulation); with a
// BF16 head G is rounded to bf16 once before the gradient GEMMs, which accumulate in fp32 and
// round their bf16 outputs once. Per-row values are reduced after the last chunk in double, in a
// fixed order: results repeat bit for bit run to run (given cuBLASLt's deterministic algorithms for
// a fixed problem); they depend, to fp32 rounding, on the chunk height.
//
// Builds without cuBLASLt: both calls throw tk::Error ("... no cuBLASLt ...") before anything is
// issued (cuda::has_cublaslt() tells beforehand).
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../cpu/linear_loss.h"

namespace tk {

// Budget of the per-chunk fp32 logits buffers on the GPU, and the smallest automatic chunk height.
constexpr int64_t kLinearLossChunkBytesCuda = int64_t(256) << 20;
constexpr int64_t kLinearLossMinChunkRowsCuda = 64;

// hidden [..., D] F32 | BF16 (device), N rows; weight [V, D] hidden's dtype; targets N I32;
// loss 1 F32; losses N F32 (0 on ignored rows); dhidden: hidden's shape and dtype or data ==
// nullptr; dweight: weight's shape and dtype or data == nullptr. Outputs must not overlap inputs.
// params: ignore_index, reduction (Sum | Mean), dloss, chunk_rows, stats (see cpu/linear_loss.h).
void linear_cross_entropy_cuda(const TensorView& hidden, const TensorView& weight, const TensorView& targets,
                               const LinearCrossEntropyParams& params, const TensorView& loss,
                               const TensorView& losses, const TensorView& dhidden, const TensorView& dweight,
                               void* stream);

// loss = alpha CE(s, targets) + (1 - alpha) KD(s, t), as linear_distill_cpu.
// student_hidden [..., Ds] F32 | BF16, N rows; student_weight [V, Ds] its dtype;
// teacher_hidden [..., Dt] F32 | BF16 with N rows; teacher_weight [V, Dt] its dtype;
// targets data == nullptr (every row counts; alpha must be 0) or N I32; loss 1 F32;
// losses N F32 or data == nullptr; dstudent_hidden / dstudent_weight like their inputs or
// data == nullptr.
void linear_distill_cuda(const TensorView& student_hidden, const TensorView& student_weight,
                         const TensorView& teacher_hidden, const TensorView& teacher_weight,
                         const TensorView& targets, const LinearDistillParams& params, const TensorView& loss,
                         const TensorView& losses, const TensorView& dstudent_hidden,
                         const TensorView& dstudent_weight, void* stream);

}  // namespace tk
