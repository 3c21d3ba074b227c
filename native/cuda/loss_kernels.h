// CUDA loss kernels, forward and backward: cross entropy (none | sum | mean, ignore_index),
// sequence log-probabilities, the DPO loss (sigmoid | ipo | hinge, label smoothing) and the
// knowledge-distillation losses (forward_kl | reverse_kl | jsd at a temperature, T^2 scaling, an
// ignore mask). Every function has the contract of its CPU twin in cpu/loss.h and cpu/distill.h
// (the same formulas, operands, shapes, dtypes, zero rows for ignored rows, 0 rather than NaN for
// a mean over no row, Liger's jsd with beta 0 / 1 standing for the two KLs), on TensorViews of
// device memory, issued on `stream` (a cudaStream_t as void*: a plain C++ header, like device.h).
// The differences from the CPU, all forced by the device, are listed under "Asynchrony" below.
//
// Design:
// - One row engine (loss_kernels.cu) serves every row-wise loss: a row is read by one thread group
//   -- a warp for V <= 2048 (8 rows per block), a block of 512 threads above -- in up to three
//   passes over global memory (a 32K-vocab fp32 row is 128 KB, so later passes mostly hit L2):
//     1. online max/sum (Milakov & Gimelshein) per thread over 4-element vector loads (16 B of
//        fp32, 8 B of bf16; a row's unaligned head and its tail are read element by element),
//        then merged across the group: the log-sum-exp of the logits (cross entropy) and of
//        student / T and teacher / T (distillation). exp never sees a positive argument.
//     2. distillation only: the divergence D and the gradient's row constant K (reverse_kl: D;
//        jsd: sum of (1 - beta) q (log q - log m); log m in log space, logaddexp of
//        log beta + log p and log(1 - beta) + log q, so it stays finite where p and q underflow).
//     3. the gradient, written while the row is hot: (softmax - onehot) * g for cross entropy,
//        c (A - B K) for distillation (cpu/distill.h), rounded to nearest even once for bf16.
//   Everything is computed in fp32 from bf16 or fp32 storage (expf / logf / log1pf: ~1-2 ulp).
// - Determinism: each group reduces with a fixed butterfly / fixed-order tree, so every thread of
//   a row sees the same lse bit for bit and results repeat bit for bit run to run. Reductions over
//   rows (the sum / mean loss, the sequence sums, the distillation mean) are per-row values first,
//   then one block per output summing them in double in a fixed order: no floating-point atomics.
// - Fused == forward + backward bitwise: the fused kernels run the same code as the split ones,
//   and the split backward reads the lse (cross entropy) the forward stored, so the fused call
//   writes exactly the bytes the two calls write (tests assert this).
// - dlogits / dstudent may alias the logits / student (each element is read and written by the
//   same thread in the same pass, after the passes that needed the whole row).
//
// Asynchrony (what differs from the CPU twins):
// - Nothing here waits for the device. Shapes, dtypes, devices and parameters are checked on the
//   host before anything is issued and throw tk::Error naming the kernel and the operand, as on
//   the CPU. Target values live on the device, so they cannot be checked without a host wait: a
//   cross entropy / sequence target that is neither ignore_index nor in [0, V) gives its row a NaN
//   loss, lse and gradient (never an out-of-bounds read). Distillation uses targets only as an
//   ignore mask (as on the CPU), so any value other than ignore_index counts the row.
// - The number of rows that count (the mean's divisor, the gradient scale) is counted on the
//   device into a few bytes of scratch. Scratch (that count, the per-row values of the sequence
//   sums) comes from cudaMallocAsync on `stream` and goes back with cudaFreeAsync on `stream`:
//   stream-ordered, so it is reusable by later work on the stream at once and never released
//   while a kernel of this call still reads it (the device's default memory pool; see
//   linear_loss_kernels.h on its release threshold). The caller has the views' device current
//   (the CUDA queue does).
// - Mean over rows: sum in double, divided by the count, rounded once to fp32 (as the CPU).
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../cpu/distill.h"
#include "../cpu/loss.h"

namespace tk {

// ---- cross entropy ---------------------------------------------------------------------------------
// logits:  [..., V]  F32 | BF16 (device); all leading dims together are the N rows; V >= 1
// targets: N elements I32 (device), each ignore_index or in [0, V)
// losses:  N elements F32, per-row losses (0 on ignored rows)
// lse:     N elements F32, per-row log-sum-exp (0 on ignored rows)
// loss:    1 element F32 for Sum and Mean; not touched for None (may be an empty view)
void cross_entropy_forward_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                LossReduction reduction, const TensorView& losses, const TensorView& lse,
                                const TensorView& loss, void* stream);

// dlogits[n, :] = (softmax(logits[n, :]) - onehot(t)) * g[n], g as in cross_entropy_backward_cpu.
// logits [..., V] F32 | BF16; targets N I32; lse N F32 (from the forward); dloss N F32 (None) or
// 1 F32 (Sum, Mean), on the device; dlogits: logits' shape and dtype (may alias logits).
void cross_entropy_backward_cuda(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                 const TensorView& dloss, int32_t ignore_index, LossReduction reduction,
                                 const TensorView& dlogits, void* stream);

// Forward and backward in one pass per row for a host-side upstream gradient dloss (for None every
// row gets dloss). Writes exactly the bytes cross_entropy_forward_cuda and
// cross_entropy_backward_cuda write. Shapes as above; dlogits may alias logits.
void cross_entropy_fused_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                              LossReduction reduction, float dloss, const TensorView& losses, const TensorView& lse,
                              const TensorView& loss, const TensorView& dlogits, void* stream);

// ---- sequence log-probabilities --------------------------------------------------------------------
// out[b] = sum over non-ignored t of log softmax(logits[b, t, :])[targets[b, t]] (per-position
// values in fp32, the sum over t in double in a fixed order).
// logits [B, T, V] F32 | BF16; targets [B, T] I32; out B F32; lse B*T F32 (0 on ignored positions).
// Scratch: B*T floats of per-position values (cudaMallocAsync on stream).
void sequence_logprobs_forward_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                    const TensorView& out, const TensorView& lse, void* stream);

// dlogits[b, t, :] = dout[b] * (onehot - softmax) on non-ignored positions, 0 elsewhere.
// logits [B, T, V] F32 | BF16; targets [B, T] I32; lse B*T F32; dout B F32; dlogits like logits
// (may alias logits).
void sequence_logprobs_backward_cuda(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                     const TensorView& dout, int32_t ignore_index, const TensorView& dlogits,
                                     void* stream);

// ---- DPO ---------------------------------------------------------------------------------------------
// TRL's dpo_loss per pair, in double on the device, stored as F32 (see cpu/loss.h). beta finite
// and > 0, label_smoothing in [0, 0.5] (sigmoid only), checked on the host.
// policy_chosen, policy_rejected, ref_chosen, ref_rejected, losses, chosen_rewards,
// rejected_rewards: B elements F32 each (device).
void dpo_loss_forward_cuda(const TensorView& policy_chosen, const TensorView& policy_rejected,
                           const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                           const TensorView& losses, const TensorView& chosen_rewards,
                           const TensorView& rejected_rewards, void* stream);

// d_policy_chosen = dout * dloss/dz, d_policy_rejected = -dout * dloss/dz (no gradient for the
// reference). dout, d_policy_chosen, d_policy_rejected: B elements F32 (device).
void dpo_loss_backward_cuda(const TensorView& policy_chosen, const TensorView& policy_rejected,
                            const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                            const TensorView& dout, const TensorView& d_policy_chosen,
                            const TensorView& d_policy_rejected, void* stream);

// ---- distillation ------------------------------------------------------------------------------------
// student:  [..., V] F32 | BF16 (device), N rows; teacher: student's shape, F32 | BF16
// targets:  data == nullptr (every row counts) or N elements I32: the ignore mask
// losses:   N elements F32 (T^2 D per row, 0 on ignored rows); loss: 1 element F32 (the mean over
//           counted rows, 0 if none)
// dstudent: student's shape and dtype; may alias student
void distill_forward_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                          const DistillParams& params, const TensorView& losses, const TensorView& loss,
                          void* stream);

// dloss: 1 element F32 on the device, the upstream gradient of loss.
void distill_backward_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                           const DistillParams& params, const TensorView& dloss, const TensorView& dstudent,
                           void* stream);

// Forward and backward in one call for a host-side dloss; the same bytes as the two calls above.
void distill_fused_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                        const DistillParams& params, float dloss, const TensorView& losses, const TensorView& loss,
                        const TensorView& dstudent, void* stream);

// ---- for linear_loss_kernels.cu (not an op: no checks) -------------------------------------------------
// The row engine over the fp32 logits chunks of the fused linear losses. Rows [0, rows) of S (and
// of Tl for distillation) hold fp32 logits with row pitches ldS / ldT (floats); every row counts.
// The gradient is written over S in place: F32 with pitch ldS, or BF16 narrowed in place with pitch
// 2 ldS (bf16 elements: row r's bf16 gradient fills the first half of row r's fp32 bytes). The
// narrowing pass reads a tile of the row into registers, synchronizes the block, then stores it,
// so no thread overwrites fp32 logits another thread has yet to read; it needs S 16-byte aligned
// and ldS a multiple of 4 (the caller's scratch has both).
namespace cuda_detail {

struct LinearRowsArgs {
  float* S = nullptr;                 // [rows, V] student logits, pitch ldS
  int64_t ldS = 0;
  const float* Tl = nullptr;          // [rows, V] teacher logits, pitch ldT (distillation)
  int64_t ldT = 0;
  int64_t rows = 0, V = 0;
  // cross entropy term (ce): row i's target is targets[idx ? idx[i] : i], in [0, V)
  bool ce = false;
  const int32_t* targets = nullptr;
  const int32_t* idx = nullptr;
  float ce_scale = 0.0f;              // gradient scale of the term: (softmax - onehot) * ce_scale
  float* ce_loss = nullptr;           // [rows] lse - logit[target]
  // distillation term (kd): params as DistillParams (jsd beta 0 / 1 already mapped to the KLs)
  bool kd = false;
  DistillKind kind = DistillKind::ForwardKl;
  float temperature = 1.0f, beta = 0.5f;
  float kd_scale = 0.0f;              // c of c (A - B K): dloss (1 - alpha) T / #counted
  float* kd_loss = nullptr;           // [rows] T^2 D
  // gradient: DType::F32 or DType::BF16 (narrowed in place), or none (forward only)
  bool grad = false;
  DType gdt = DType::F32;
};
// Issues the row kernel on stream (throws tk::Error on a launch failure).
void linear_rows_cuda(const LinearRowsArgs& a, void* stream);

}  // namespace cuda_detail
}  // namespace tk
