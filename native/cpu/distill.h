// CPU knowledge-distillation losses, forward and backward (Liger-Kernel style: one fp32 pass per
// row over max-shifted log-softmaxes, the gradient written while the row is still in cache).
//
// For each row n of student logits s[n, :] and teacher logits t[n, :] (V values each), with the
// temperature T > 0 applied to both:
//   log q = log_softmax(s / T)   (student),   log p = log_softmax(t / T)   (teacher)
//   forward_kl: D = KL(p || q) = sum_v p (log p - log q)
//   reverse_kl: D = KL(q || p) = sum_v q (log q - log p)
//   jsd:        D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
// The jsd is Liger-Kernel's generalized JSD (LigerJSD, beta weighting the teacher p). As in
// Liger, beta = 0 and beta = 1 are not the (identically zero) limits of that formula but stand
// for the two KLs: jsd with beta = 0 computes forward_kl, with beta = 1 reverse_kl.
// log m is taken in log space, log m = logaddexp(log beta + log p, log(1 - beta) + log q), so it
// stays finite where both probabilities underflow.
//
// Rows and reduction (Hinton's T^2 scaling, so gradient magnitudes do not shrink with T):
//   losses[n] = T^2 * D[n] on rows that count, 0 on ignored rows
//   loss      = sum_n losses[n] / #counted rows   (summed in double in row order; 0 if none count)
// A row is ignored when targets is given and targets[n] == ignore_index.
// The backward gives the gradient of dloss * loss with respect to the student logits only (the
// teacher is a constant, as under torch.no_grad):
//   d s[n, :] = dloss * T / #counted * dD[n]/d(s[n, :] / T),  0 on ignored rows, where
//   forward_kl: dD/dz = q - p
//   reverse_kl: dD/dz = q (log q - log p - D)
//   jsd:        dD/dz = g - q sum_v g,  g = (1 - beta) q (log q - log m)
//
// Conventions (as cpu/loss.h):
// - Tensors are CPU TensorViews, contiguous. Logits are F32 or BF16 (student and teacher each,
//   independently); BF16 is storage only: rows are widened to fp32 and computed in fp32, and
//   BF16 gradients are rounded to nearest even once, on the store. Losses are F32.
// - Logits are expected finite (a non-finite logit gives an unspecified, typically NaN, row).
// - All checks happen before any output is written; errors are tk::Error naming the kernel and the
//   offending operand.
// - Threads split rows; per-row results land in per-row slots and the reduction is taken after,
//   in order, so results do not depend on the thread count. The AVX2 / AVX-512 paths (picked by
//   active_isa()) use a polynomial exp and log (Cephes expf / logf, ~1 ulp) and FMA; the portable
//   path std::exp / std::log1p: paths agree to fp32 rounding, not bitwise.
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

enum class DistillKind : uint8_t { ForwardKl = 0, ReverseKl = 1, Jsd = 2 };

const char* distill_kind_name(DistillKind k);  // "forward_kl" | "reverse_kl" | "jsd"

struct DistillParams {
  DistillKind kind = DistillKind::ForwardKl;
  float temperature = 1.0f;   // finite, > 0
  float beta = 0.5f;          // jsd only: in [0, 1] (0: forward_kl, 1: reverse_kl)
  int32_t ignore_index = -100;
};

// Operands shared by the entry points:
// student:  [..., V] F32 | BF16; all leading dims together are the N rows; V >= 1
// teacher:  student's shape, F32 | BF16
// targets:  optional. A view with data == nullptr (e.g. TensorView{}) means every row counts;
//           otherwise N elements I32, each ignore_index or in [0, V) (only the ignore mask is used)
// losses:   N elements F32 (T^2 * D per row, 0 on ignored rows)
// loss:     1 element F32 (the mean over counted rows)
// dstudent: student's shape and dtype; may alias student (each row is read before it is written)

void distill_forward_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                         const DistillParams& params, const TensorView& losses, const TensorView& loss,
                         ThreadPool& pool);

// dloss: 1 element F32, the upstream gradient of loss.
void distill_backward_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                          const DistillParams& params, const TensorView& dloss, const TensorView& dstudent,
                          ThreadPool& pool);

// Forward and backward in one pass per row (the training path: dloss is known up front, 1 for a
// loss that is the objective). Writes what distill_forward_cpu writes and the dstudent that
// distill_backward_cpu writes for that dloss (bitwise the same).
void distill_fused_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                       const DistillParams& params, float dloss, const TensorView& losses, const TensorView& loss,
                       const TensorView& dstudent, ThreadPool& pool);

}  // namespace tk
