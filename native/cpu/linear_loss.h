// CPU fused linear losses (Liger-Kernel's FusedLinearCrossEntropy / fused linear distillation):
// the language-model head and the loss in one call, forward and gradients in the same pass,
// without ever forming the [N, V] logits.
//
// Why chunking: at N = 8192 tokens and a 128K vocabulary the fp32 logits alone are 4 GiB (and
// their gradient as much again), more than the model they belong to. The rows are cut into chunks
// of R rows (only rows that count: ignored rows are dropped before any arithmetic) and each chunk
// goes through
//   1. logits  S = h_chunk W^T                  [R, V] fp32   gemm_cpu (threaded on the pool)
//   2. per row: log-sum-exp, the loss, and the logit gradient G written over S in place
//      (cross_entropy_fused_cpu / distill_fused_cpu on the chunk, threaded over rows)
//   3. dweight += G^T h_chunk                   [V, D]        gemm_cpu, beta = 1 after the first chunk
//   4. dhidden_chunk = G W                      [R, D]        gemm_cpu
// so one chunk's logits are live at a time. GEMMs are called from the caller's thread, one after
// the other (the pool cannot be entered from inside a pool task); row work uses the pool between
// them. The gradients are those of dloss * loss, so a training step calls this once, with dloss
// known up front (1 for the objective; autograd can scale the results by the real upstream value).
//
// Where the memory goes (the `scratch` figure LinearLossStats reports):
// - R x V fp32 per logits buffer: 1 for cross entropy, 2 for distillation (student, teacher), 3
//   when distillation mixes in cross entropy (0 < alpha < 1) with gradients (the CE gradient is
//   kept apart while the KD gradient overwrites the student logits). R is chosen so that these
//   buffers stay within kLinearLossChunkBytes (at least kLinearLossMinChunkRows rows, at most the
//   counted rows), then evened out over the chunks; LinearCrossEntropyParams::chunk_rows overrides.
// - BF16 only: the fp32 dweight accumulator [V, D] (rounded to bf16 once, at the end: rounding per
//   chunk would lose the small updates), a fp32 copy of a block of W rows (<= 8 MiB; the GEMM
//   takes one dtype for A and B, and G stays fp32), and R x D fp32 rows of h.
// - R x D: gathered hidden rows (per head) when some rows are ignored; fp32 dhidden rows when they
//   are rounded (BF16) or scattered (gathered rows). O(N) row indices and per-row values.
// At N = 2048, V = 32000 (f32) that is ~33 MB instead of the 262 MB of materialized logits.
//
// Conventions (as cpu/loss.h and cpu/distill.h, whose row kernels these calls run):
// - CPU TensorViews, contiguous. hidden and weight are F32 or BF16 (the same dtype for one
//   projection; distillation's teacher may differ from its student). BF16 is storage only: logits,
//   losses and gradients are computed in fp32, and BF16 gradients are rounded to nearest even once,
//   on the store.
// - Targets are I32, each ignore_index or in [0, V). All checks (targets included) happen before
//   any output is written; errors are tk::Error naming the kernel and the operand (or the
//   offending row and target).
// - Ignored rows get loss 0 and zero dhidden rows, and are never multiplied: a NaN in an ignored
//   row's hidden state does not reach the loss or dweight. A NaN in a counted row makes the loss
//   NaN (and its gradients NaN).
// - Results do not depend on the thread count (GEMM tiles and rows are computed by one thread
//   each in a fixed order; per-row values are reduced afterwards, in row order, in double). They do
//   depend, to fp32 rounding, on the chunk height (dweight sums chunk partial products in fp32).
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"
#include "distill.h"
#include "loss.h"

namespace tk {

// Budget of the per-chunk fp32 logits buffers, and the smallest automatic chunk height.
constexpr int64_t kLinearLossChunkBytes = int64_t(32) << 20;
constexpr int64_t kLinearLossMinChunkRows = 16;

// What one call did, for benchmarks and tests.
struct LinearLossStats {
  int64_t counted_rows = 0;   // rows that count (not ignore_index)
  int64_t chunk_rows = 0;     // rows per chunk (the last chunk may be shorter; 0 if no row counts)
  int64_t chunks = 0;
  int64_t scratch_bytes = 0;  // every buffer the call allocated (see the header comment)
};

// ---- linear cross entropy ----------------------------------------------------------------------------
// logits[n, :] = hidden[n, :] W^T;  losses[n] = lse(logits[n, :]) - logits[n, targets[n]] for
// counted rows, 0 on ignored rows;  loss = sum_n losses[n] (Sum) or that sum / #counted (Mean; 0 if
// none count). Gradients of dloss * loss:
//   G[n, :] = (softmax(logits[n, :]) - onehot(targets[n])) * g,  g = dloss (Sum) or dloss / #counted (Mean)
//   dhidden = G W,  dweight = G^T hidden   (G = 0 on ignored rows)
struct LinearCrossEntropyParams {
  int32_t ignore_index = kDefaultIgnoreIndex;
  LossReduction reduction = LossReduction::Mean;  // Sum | Mean (None is rejected: losses is always written)
  float dloss = 1.0f;                 // upstream gradient of loss, folded into dhidden / dweight
  int64_t chunk_rows = 0;             // rows per chunk, >= 0; 0 picks it from kLinearLossChunkBytes
  LinearLossStats* stats = nullptr;   // optional: filled with the plan the call ran
};

// hidden:  [..., D] F32 | BF16; all leading dims together are the N rows; D >= 1
// weight:  [V, D]   hidden's dtype; V >= 1
// targets: N elements I32 (any shape), each ignore_index or in [0, V)
// loss:    1 element F32 (the reduction, summed in double in row order)
// losses:  N elements F32, per-row losses (0 on ignored rows)
// dhidden: hidden's shape and dtype, or a view with data == nullptr (not wanted)
// dweight: weight's shape and dtype, or a view with data == nullptr (not wanted)
// With both gradients absent the call is forward only (no gradient arithmetic at all). Outputs must
// not overlap the inputs.
void linear_cross_entropy_cpu(const TensorView& hidden, const TensorView& weight, const TensorView& targets,
                              const LinearCrossEntropyParams& params, const TensorView& loss,
                              const TensorView& losses, const TensorView& dhidden, const TensorView& dweight,
                              ThreadPool& pool);

// ---- fused linear distillation -------------------------------------------------------------------------
// Student logits s[n, :] = student_hidden[n, :] Ws^T, teacher logits t[n, :] = teacher_hidden[n, :] Wt^T;
//   loss = alpha * CE(s, targets) + (1 - alpha) * KD(s, t)
// where CE is the mean over counted rows of the cross entropy at temperature 1 and KD is exactly
// distill_forward_cpu's loss (T^2 D per row, mean over counted rows, D per params.distill.kind at
// params.distill.temperature). A row counts when targets is absent or targets[n] != ignore_index;
// both terms average over the same rows (0 if none count). alpha == 1 skips the teacher (its
// GEMM too) and alpha == 0 the cross entropy, so a non-finite value in the skipped term does not
// reach the loss. Gradients of dloss * loss reach the student only (the teacher is a constant):
//   G = alpha * dloss / #counted * (softmax(s) - onehot) + (1 - alpha) * dKD/ds   (0 on ignored rows)
//   dstudent_hidden = G Ws,  dstudent_weight = G^T student_hidden
struct LinearDistillParams {
  DistillParams distill;              // kind, temperature (finite, > 0), jsd beta in [0, 1], ignore_index
  float alpha = 0.5f;                 // weight of the hard-label cross entropy, in [0, 1]; > 0 needs targets
  float dloss = 1.0f;                 // upstream gradient of loss, folded into the gradients
  int64_t chunk_rows = 0;             // rows per chunk, >= 0; 0 picks it from kLinearLossChunkBytes
  LinearLossStats* stats = nullptr;   // optional: filled with the plan the call ran
};

// student_hidden:  [..., Ds] F32 | BF16; all leading dims together are the N rows; Ds >= 1
// student_weight:  [V, Ds]   student_hidden's dtype; V >= 1
// teacher_hidden:  [..., Dt] F32 | BF16 with N rows (numel / Dt == N); Dt >= 1
// teacher_weight:  [V, Dt]   teacher_hidden's dtype
// targets:         optional: data == nullptr (every row counts; alpha must be 0) or N elements I32,
//                  each ignore_index or in [0, V)
// loss:            1 element F32
// losses:          optional (data == nullptr: not wanted) N elements F32, per-row
//                  alpha * ce[n] + (1 - alpha) * T^2 D[n] (0 on ignored rows); loss = their mean
// dstudent_hidden: student_hidden's shape and dtype, or data == nullptr (not wanted)
// dstudent_weight: student_weight's shape and dtype, or data == nullptr (not wanted)
void linear_distill_cpu(const TensorView& student_hidden, const TensorView& student_weight,
                        const TensorView& teacher_hidden, const TensorView& teacher_weight,
                        const TensorView& targets, const LinearDistillParams& params, const TensorView& loss,
                        const TensorView& losses, const TensorView& dstudent_hidden,
                        const TensorView& dstudent_weight, ThreadPool& pool);

}  // namespace tk
