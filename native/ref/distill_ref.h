// Naive references for the distillation losses (cpu/distill.h): the oracle of the native tests,
// never used for speed. Everything is double, element at a time, straight from the defining
// formulas: two-pass log-softmax (max first, then log sum exp(z - max)) of z = logits / T, then
//   forward_kl: D = sum p (log p - log q)          reverse_kl: D = sum q (log q - log p)
//   jsd:        D = beta sum p (log p - log m) + (1 - beta) sum q (log q - log m),
//               m = beta p + (1 - beta) q   (terms with a zero weight p or q count 0; log m is
//               taken as logaddexp(log beta + log p, log(1 - beta) + log q), so it stays finite
//               where p and q underflow)
// with q the student's and p the teacher's distribution; jsd with beta 0 / 1 is forward_kl /
// reverse_kl (Liger's convention). losses[n] = T^2 D[n] (0 on ignored rows), loss = their mean
// over counted rows (0 if none). The backward is the closed form of d(dloss * loss)/d student
// (see distill.h); tests check it against central differences of distill_forward.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/distill.h"

namespace tk::ref {

struct DistillForward {
  std::vector<double> losses;  // [N]
  double loss = 0;
};

// student, teacher [N, V]; targets empty (every row counts) or [N] (each ignore_index or in [0, V);
// throws tk::Error otherwise).
DistillForward distill_forward(const std::vector<double>& student, const std::vector<double>& teacher,
                               const std::vector<int32_t>& targets, int64_t N, int64_t V, DistillKind kind,
                               double temperature, double beta, int32_t ignore_index);

// d student [N, V] of dloss * loss.
std::vector<double> distill_backward(const std::vector<double>& student, const std::vector<double>& teacher,
                                     const std::vector<int32_t>& targets, int64_t N, int64_t V, DistillKind kind,
                                     double temperature, double beta, int32_t ignore_index, double dloss);

}  // namespace tk::ref
