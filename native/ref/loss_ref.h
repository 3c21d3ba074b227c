// Naive references for the loss kernels (cpu/loss.h): the oracle of the native tests, never used
// for speed. Inputs and outputs are row-major vectors of double; every value comes from its
// defining formula in double with the textbook two-pass log-sum-exp (max first, then the sum of
// exp(x - max)), one element at a time, with no blocking and no SIMD. Tests widen kernel inputs
// (after any bf16 rounding) to double, so both sides see exactly the same input values.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/loss.h"

namespace tk::ref {

// log(sum_v exp(x[v])) over one row of V values, two-pass.
double logsumexp(const double* x, int64_t V);

struct CrossEntropyForward {
  std::vector<double> losses;  // [N], 0 on ignored rows
  std::vector<double> lse;     // [N], 0 on ignored rows
  double loss = 0;             // the reduction (Sum or Mean; for None the sum, unused)
};
// logits [N, V], targets [N] (each ignore_index or in [0, V); throws tk::Error otherwise).
CrossEntropyForward cross_entropy_forward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                          int64_t N, int64_t V, int32_t ignore_index, LossReduction reduction);

// dlogits [N, V] = (softmax - onehot) * g[n], g as in cross_entropy_backward_cpu; dloss has N
// values for None and 1 for Sum and Mean. lse is recomputed from the logits.
std::vector<double> cross_entropy_backward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                           int64_t N, int64_t V, int32_t ignore_index, LossReduction reduction,
                                           const std::vector<double>& dloss);

// [B] sums of log softmax(logits[b, t, :])[targets[b, t]] over non-ignored t. logits [B, T, V].
std::vector<double> sequence_logprobs(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                      int64_t B, int64_t T, int64_t V, int32_t ignore_index);

// dlogits [B, T, V] = dout[b] * (onehot - softmax) on non-ignored positions. dout [B].
std::vector<double> sequence_logprobs_backward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                               int64_t B, int64_t T, int64_t V, int32_t ignore_index,
                                               const std::vector<double>& dout);

// log(sigmoid(x)), without overflow for any finite x.
double log_sigmoid(double x);

struct DpoForward {
  std::vector<double> losses, chosen_rewards, rejected_rewards;  // [B] each
};
// TRL's dpo_loss, per pair. pc, pr, rc, rr [B].
DpoForward dpo_loss(const std::vector<double>& pc, const std::vector<double>& pr, const std::vector<double>& rc,
                    const std::vector<double>& rr, double beta, DpoKind kind, double label_smoothing);

struct DpoBackward {
  std::vector<double> d_policy_chosen, d_policy_rejected;  // [B] each
};
// Gradients of L = sum_b dout[b] * losses[b] with respect to pc and pr.
DpoBackward dpo_loss_backward(const std::vector<double>& pc, const std::vector<double>& pr,
                              const std::vector<double>& rc, const std::vector<double>& rr, double beta, DpoKind kind,
                              double label_smoothing, const std::vector<double>& dout);

}  // namespace tk::ref
