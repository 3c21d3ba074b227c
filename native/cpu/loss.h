// CPU loss kernels, forward and backward (llm.c style: one function per pass, shapes on every
// signature; Liger-Kernel style numerics: one online max/sum pass per row, gradients written in
// the pass that has the row hot):
//   cross entropy (mean | sum | none, ignore_index), sequence log-probabilities (the DPO input),
//   and the DPO loss (TRL's DPOTrainer: sigmoid | ipo | hinge, label smoothing).
//
// Conventions shared by every kernel here:
// - Tensors are TensorViews on the CPU, contiguous. Logits are F32 or BF16; BF16 is a storage
//   format only: a row is widened to fp32, computed in fp32, and gradients are rounded to nearest
//   even once, on the store. Losses, log-sum-exps and log-probabilities are F32.
// - Targets are I32: each is either ignore_index or in [0, V). All checks (targets included)
//   happen before any output is written, so a rejected call leaves its outputs untouched; errors
//   are tk::Error naming the kernel, the operand and its shape/dtype (or the offending target).
// - Ignored rows get loss 0, lse 0 and zero gradient rows. Mean reduction divides by the number
//   of non-ignored rows; with none it is 0 (loss 0, zero gradients), never NaN.
// - Non-finite logits: -inf entries are allowed (masked vocabulary) and get probability 0; a row
//   holding NaN or +inf gets lse = NaN (and so a NaN loss and NaN gradients), as in PyTorch.
// - Results do not depend on the thread count (rows are independent and reductions over rows
//   are summed in row order, in double). The SIMD paths use a polynomial exp (see vexp_nonpos_cpu)
//   and FMA; the portable path std::exp: paths agree to fp32 rounding, not bitwise.
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

enum class LossReduction : uint8_t { None = 0, Sum = 1, Mean = 2 };
enum class DpoKind : uint8_t { Sigmoid = 0, Ipo = 1, Hinge = 2 };

constexpr int32_t kDefaultIgnoreIndex = -100;

const char* reduction_name(LossReduction r);  // "none" | "sum" | "mean"
const char* dpo_kind_name(DpoKind k);         // "sigmoid" | "ipo" | "hinge"

// ---- cross entropy ---------------------------------------------------------------------------------
// For each row n with t = targets[n] != ignore_index:
//   lse[n]    = log(sum_v exp(logits[n, v]))           (one online max/sum pass over the row)
//   losses[n] = lse[n] - logits[n, t]
// and loss = sum_n losses[n] (Sum) or that sum / #non-ignored rows (Mean; 0 if there are none).
// logits:  [..., V]  F32 | BF16; all leading dims together are the N rows; V >= 1
// targets: N elements I32 (any shape), each ignore_index or in [0, V)
// losses:  N elements F32, per-row losses (0 on ignored rows)
// lse:     N elements F32, per-row log-sum-exp saved for the backward pass (0 on ignored rows)
// loss:    1 element F32 for Sum and Mean (summed in double in row order); not touched for None
//          (may be an empty view)
void cross_entropy_forward_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                               LossReduction reduction, const TensorView& losses, const TensorView& lse,
                               const TensorView& loss, ThreadPool& pool);

// Cross entropy backward, one read and one write pass per row:
//   dlogits[n, :] = (softmax(logits[n, :]) - onehot(t)) * g[n],  softmax = exp(logits - lse[n])
// with g[n] = dloss[n] (None), dloss[0] (Sum) or dloss[0] / #non-ignored rows (Mean), and
// dlogits[n, :] = 0 on ignored rows.
// logits:  [..., V]  F32 | BF16 (the forward input)
// targets: N elements I32
// lse:     N elements F32 (from cross_entropy_forward_cpu)
// dloss:   N elements F32 for None, 1 element F32 for Sum and Mean
// dlogits: logits' shape and dtype (may alias logits: the gradient is written over the logits)
void cross_entropy_backward_cpu(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                const TensorView& dloss, int32_t ignore_index, LossReduction reduction,
                                const TensorView& dlogits, ThreadPool& pool);

// Forward and backward fused (Liger's training path): the upstream gradient is known before the
// forward runs (dloss = 1 for a loss that is the objective), so each row is read once for its
// lse and its gradient is written while the row is still in cache. Writes exactly what
// cross_entropy_forward_cpu writes, and the dlogits that cross_entropy_backward_cpu would write
// for dloss (a scalar: for None every row gets upstream gradient dloss).
// Shapes as in the two functions above; dlogits may alias logits.
void cross_entropy_fused_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                             LossReduction reduction, float dloss, const TensorView& losses, const TensorView& lse,
                             const TensorView& loss, const TensorView& dlogits, ThreadPool& pool);

// ---- sequence log-probabilities --------------------------------------------------------------------
// out[b] = sum over t with targets[b, t] != ignore_index of log softmax(logits[b, t, :])[targets[b, t]]
// (each term in fp32, the sum over t in double, in order).
// logits:  [B, T, V]  F32 | BF16, V >= 1
// targets: [B, T]     I32, each ignore_index or in [0, V)
// out:     B elements F32
// lse:     B*T elements F32, saved for the backward pass (0 on ignored positions)
void sequence_logprobs_forward_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                   const TensorView& out, const TensorView& lse, ThreadPool& pool);

// dlogits[b, t, :] = dout[b] * (onehot(targets[b, t]) - softmax(logits[b, t, :])) on non-ignored
// positions, 0 on ignored ones.
// logits:  [B, T, V]  F32 | BF16;  targets: [B, T] I32;  lse: B*T elements F32 (from the forward)
// dout:    B elements F32
// dlogits: logits' shape and dtype (may alias logits)
void sequence_logprobs_backward_cpu(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                    const TensorView& dout, int32_t ignore_index, const TensorView& dlogits,
                                    ThreadPool& pool);

// ---- DPO ---------------------------------------------------------------------------------------------
// As TRL's DPOTrainer.dpo_loss, per pair (computed in double, stored as F32):
//   z = (pc - pr) - (rc - rr)
//   sigmoid: loss = -logsigmoid(beta z) (1 - ls) - logsigmoid(-beta z) ls
//   ipo:     loss = (z - 1 / (2 beta))^2
//   hinge:   loss = relu(1 - beta z)
//   chosen_rewards = beta (pc - rc),  rejected_rewards = beta (pr - rr)
// logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)): no overflow for any finite x. label_smoothing
// (ls, in [0, 0.5]) applies to the sigmoid kind only, as in TRL; beta must be finite and > 0.
struct DpoParams {
  float beta = 0.1f;
  DpoKind kind = DpoKind::Sigmoid;
  float label_smoothing = 0.0f;
};

// policy_chosen (pc), policy_rejected (pr), ref_chosen (rc), ref_rejected (rr): B elements F32
// (sequence log-probabilities); losses, chosen_rewards, rejected_rewards: B elements F32.
// O(B) scalar work: not threaded.
void dpo_loss_forward_cpu(const TensorView& policy_chosen, const TensorView& policy_rejected,
                          const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                          const TensorView& losses, const TensorView& chosen_rewards,
                          const TensorView& rejected_rewards);

// With L = sum_b dout[b] * losses[b] and dloss/dz as follows
//   sigmoid: beta (sigmoid(beta z) ls - sigmoid(-beta z) (1 - ls))
//   ipo:     2 (z - 1 / (2 beta))
//   hinge:   -beta where 1 - beta z > 0, else 0
// d_policy_chosen = dout * dloss/dz, d_policy_rejected = -dout * dloss/dz. The reference
// log-probabilities get no gradient (TRL computes them without grad).
// inputs as in the forward; dout, d_policy_chosen, d_policy_rejected: B elements F32.
void dpo_loss_backward_cpu(const TensorView& policy_chosen, const TensorView& policy_rejected,
                           const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                           const TensorView& dout, const TensorView& d_policy_chosen,
                           const TensorView& d_policy_rejected);

// ---- the exp these kernels use -----------------------------------------------------------------------
// y[i] = exp(x[i]) for x[i] <= 0 on the active ISA path (exposed so tests can measure it).
// SIMD paths: Cephes' expf (Cody-Waite reduction by ln 2 in two parts, 1 + r + r^2 P(r) with P
// of degree 5, FMA); measured max relative error 1.17e-7 (~1 ulp, at x = -0.6887) over every
// 127th fp32 in [-87.3365, 0] (loss_exp_accuracy sweeps them and holds it to 2.5e-7). Results
// below FLT_MIN (x < -87.3365) are flushed to 0 (absolute error < 1.2e-38); NaN gives 0.
// Portable path: std::exp.
void vexp_nonpos_cpu(const float* x, float* y, int64_t n);

}  // namespace tk
