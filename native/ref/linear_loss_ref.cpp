// Naive double references for the fused linear losses (see linear_loss_ref.h).
#include "linear_loss_ref.h"

#include "../core/error.h"
#include "distill_ref.h"
#include "loss_ref.h"

namespace tk::ref {

namespace {

bool counts(const std::vector<int32_t>& targets, int64_t n, int32_t ignore_index) {
  return targets.empty() || targets[size_t(n)] != ignore_index;
}

// dhidden = G W over every row (G is 0 on ignored rows), dweight = G^T hidden over counted rows.
void chain(const std::vector<double>& G, const std::vector<double>& hidden, const std::vector<double>& weight,
           const std::vector<int32_t>& targets, int32_t ignore_index, int64_t N, int64_t D, int64_t V,
           LinearLoss* out) {
  out->dhidden.assign(size_t(N * D), 0.0);
  out->dweight.assign(size_t(V * D), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (!counts(targets, n, ignore_index)) continue;
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t v = 0; v < V; ++v) s += G[size_t(n * V + v)] * weight[size_t(v * D + d)];
      out->dhidden[size_t(n * D + d)] = s;
    }
  }
  for (int64_t n = 0; n < N; ++n) {  // row by row, so each dweight element sums over n in order
    if (!counts(targets, n, ignore_index)) continue;
    for (int64_t v = 0; v < V; ++v)
      for (int64_t d = 0; d < D; ++d)
        out->dweight[size_t(v * D + d)] += G[size_t(n * V + v)] * hidden[size_t(n * D + d)];
  }
}

}  // namespace

std::vector<double> linear_logits(const std::vector<double>& hidden, const std::vector<double>& weight, int64_t N,
                                  int64_t D, int64_t V) {
  TK_CHECK(int64_t(hidden.size()) == N * D && int64_t(weight.size()) == V * D, "ref::linear_logits: hidden has ",
           hidden.size(), " values and weight ", weight.size(), ", expected ", N * D, " and ", V * D);
  std::vector<double> z(size_t(N * V), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += hidden[size_t(n * D + d)] * weight[size_t(v * D + d)];
      z[size_t(n * V + v)] = s;
    }
  return z;
}

LinearLoss linear_cross_entropy(const std::vector<double>& hidden, const std::vector<double>& weight,
                                const std::vector<int32_t>& targets, int64_t N, int64_t D, int64_t V,
                                int32_t ignore_index, LossReduction reduction, double dloss) {
  TK_CHECK(reduction == LossReduction::Sum || reduction == LossReduction::Mean,
           "ref::linear_cross_entropy: reduction must be sum or mean");
  TK_CHECK(int64_t(targets.size()) == N, "ref::linear_cross_entropy: targets has ", targets.size(),
           " elements, expected ", N);
  const std::vector<double> z = linear_logits(hidden, weight, N, D, V);
  const CrossEntropyForward f = cross_entropy_forward(z, targets, N, V, ignore_index, reduction);
  const std::vector<double> G = cross_entropy_backward(z, targets, N, V, ignore_index, reduction, {dloss});
  LinearLoss out;
  out.losses = f.losses;
  out.loss = f.loss;
  chain(G, hidden, weight, targets, ignore_index, N, D, V, &out);
  return out;
}

LinearLoss linear_distill(const std::vector<double>& student_hidden, const std::vector<double>& student_weight,
                          const std::vector<double>& teacher_hidden, const std::vector<double>& teacher_weight,
                          const std::vector<int32_t>& targets, int64_t N, int64_t Ds, int64_t Dt, int64_t V,
                          DistillKind kind, double temperature, double beta, int32_t ignore_index, double alpha,
                          double dloss) {
  TK_CHECK(alpha >= 0 && alpha <= 1, "ref::linear_distill: alpha ", alpha, " must be in [0, 1]");
  TK_CHECK(alpha == 0 || !targets.empty(), "ref::linear_distill: alpha > 0 needs targets");
  const std::vector<double> s = linear_logits(student_hidden, student_weight, N, Ds, V);
  LinearLoss out;
  out.losses.assign(size_t(N), 0.0);
  std::vector<double> G(size_t(N * V), 0.0);
  if (alpha > 0) {
    const CrossEntropyForward f = cross_entropy_forward(s, targets, N, V, ignore_index, LossReduction::Mean);
    const std::vector<double> g = cross_entropy_backward(s, targets, N, V, ignore_index, LossReduction::Mean, {dloss});
    for (int64_t n = 0; n < N; ++n) out.losses[size_t(n)] += alpha * f.losses[size_t(n)];
    for (size_t i = 0; i < G.size(); ++i) G[i] += alpha * g[i];
    out.loss += alpha * f.loss;
  }
  if (alpha < 1) {
    const std::vector<double> t = linear_logits(teacher_hidden, teacher_weight, N, Dt, V);
    const DistillForward f = distill_forward(s, t, targets, N, V, kind, temperature, beta, ignore_index);
    const std::vector<double> g = distill_backward(s, t, targets, N, V, kind, temperature, beta, ignore_index, dloss);
    for (int64_t n = 0; n < N; ++n) out.losses[size_t(n)] += (1 - alpha) * f.losses[size_t(n)];
    for (size_t i = 0; i < G.size(); ++i) G[i] += (1 - alpha) * g[i];
    out.loss += (1 - alpha) * f.loss;
  }
  chain(G, student_hidden, student_weight, targets, ignore_index, N, Ds, V, &out);
  return out;
}

}  // namespace tk::ref
