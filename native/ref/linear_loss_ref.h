// Naive references for the fused linear losses (cpu/linear_loss.h): the oracle of the native
// tests, never used for speed. Everything is double and materialized: the whole [N, V] logits
// matrix hidden W^T, element at a time; the losses and their logit gradients from the defining
// formulas through the logits-level references (ref::cross_entropy_* in loss_ref.h, ref::distill_*
// in distill_ref.h); then the chain rule through the linear head, straight from its definition:
//   dhidden[n, :] = sum_v G[n, v] W[v, :],   dweight[v, :] = sum_{n counted} G[n, v] hidden[n, :]
// Ignored rows (targets[n] == ignore_index) have G = 0 and are left out of the dweight sum, as the
// kernels never multiply them (a NaN in an ignored row's hidden state stays out of dweight).
// Tests widen kernel inputs (after any bf16 rounding) to double, so both sides see the same values.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/distill.h"
#include "../cpu/loss.h"

namespace tk::ref {

// logits [N, V] = hidden [N, D] weight [V, D]^T.
std::vector<double> linear_logits(const std::vector<double>& hidden, const std::vector<double>& weight, int64_t N,
                                  int64_t D, int64_t V);

struct LinearLoss {
  std::vector<double> losses;   // [N], 0 on ignored rows
  double loss = 0;
  std::vector<double> dhidden;  // [N, D], gradient of dloss * loss
  std::vector<double> dweight;  // [V, D]
};

// hidden [N, D], weight [V, D], targets [N] (each ignore_index or in [0, V); throws tk::Error
// otherwise); reduction Sum or Mean (over non-ignored rows, 0 if none).
LinearLoss linear_cross_entropy(const std::vector<double>& hidden, const std::vector<double>& weight,
                                const std::vector<int32_t>& targets, int64_t N, int64_t D, int64_t V,
                                int32_t ignore_index, LossReduction reduction, double dloss);

// loss = alpha * CE_mean(student logits, targets) + (1 - alpha) * distill loss (ref::distill_forward
// of student and teacher logits); the term with weight 0 is not evaluated (alpha == 1: no teacher,
// alpha == 0: no cross entropy). student_hidden [N, Ds], student_weight [V, Ds], teacher_hidden
// [N, Dt], teacher_weight [V, Dt]; targets empty (every row counts; alpha must be 0) or [N].
// Gradients with respect to the student's hidden states and weight.
LinearLoss linear_distill(const std::vector<double>& student_hidden, const std::vector<double>& student_weight,
                          const std::vector<double>& teacher_hidden, const std::vector<double>& teacher_weight,
                          const std::vector<int32_t>& targets, int64_t N, int64_t Ds, int64_t Dt, int64_t V,
                          DistillKind kind, double temperature, double beta, int32_t ignore_index, double alpha,
                          double dloss);

}  // namespace tk::ref
