// Naive double references for the loss kernels (see loss_ref.h).
#include "loss_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/error.h"

namespace tk::ref {

namespace {

void check_target(int32_t t, int32_t ignore_index, int64_t V, int64_t i) {
  TK_CHECK(t == ignore_index || (t >= 0 && t < V), "ref: targets[", i, "] = ", t, " is out of range for V = ", V);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

double logsumexp(const double* x, int64_t V) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) m = std::max(m, x[v]);
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

CrossEntropyForward cross_entropy_forward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                          int64_t N, int64_t V, int32_t ignore_index, LossReduction reduction) {
  CrossEntropyForward f;
  f.losses.assign(size_t(N), 0.0);
  f.lse.assign(size_t(N), 0.0);
  double sum = 0;
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[size_t(n)];
    check_target(t, ignore_index, V, n);
    if (t == ignore_index) continue;
    const double* x = logits.data() + n * V;
    f.lse[size_t(n)] = logsumexp(x, V);
    f.losses[size_t(n)] = f.lse[size_t(n)] - x[t];
    sum += f.losses[size_t(n)];
    ++valid;
  }
  f.loss = reduction == LossReduction::Mean ? (valid > 0 ? sum / double(valid) : 0.0) : sum;
  return f;
}

std::vector<double> cross_entropy_backward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                           int64_t N, int64_t V, int32_t ignore_index, LossReduction reduction,
                                           const std::vector<double>& dloss) {
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    check_target(targets[size_t(n)], ignore_index, V, n);
    if (targets[size_t(n)] != ignore_index) ++valid;
  }
  std::vector<double> d(size_t(N * V), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[size_t(n)];
    if (t == ignore_index) continue;
    double g = reduction == LossReduction::None ? dloss[size_t(n)] : dloss[0];
    if (reduction == LossReduction::Mean) g /= double(valid);
    const double* x = logits.data() + n * V;
    const double lse = logsumexp(x, V);
    for (int64_t v = 0; v < V; ++v) d[size_t(n * V + v)] = (std::exp(x[v] - lse) - (v == t ? 1.0 : 0.0)) * g;
  }
  return d;
}

std::vector<double> sequence_logprobs(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                      int64_t B, int64_t T, int64_t V, int32_t ignore_index) {
  std::vector<double> out(size_t(B), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = b * T + t;
      const int32_t y = targets[size_t(r)];
      check_target(y, ignore_index, V, r);
      if (y == ignore_index) continue;
      const double* x = logits.data() + r * V;
      out[size_t(b)] += x[y] - logsumexp(x, V);
    }
  return out;
}

std::vector<double> sequence_logprobs_backward(const std::vector<double>& logits, const std::vector<int32_t>& targets,
                                               int64_t B, int64_t T, int64_t V, int32_t ignore_index,
                                               const std::vector<double>& dout) {
  std::vector<double> d(size_t(B * T * V), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = b * T + t;
      const int32_t y = targets[size_t(r)];
      check_target(y, ignore_index, V, r);
      if (y == ignore_index) continue;
      const double* x = logits.data() + r * V;
      const double lse = logsumexp(x, V);
      for (int64_t v = 0; v < V; ++v)
        d[size_t(r * V + v)] = dout[size_t(b)] * ((v == y ? 1.0 : 0.0) - std::exp(x[v] - lse));
    }
  return d;
}

double log_sigmoid(double x) {
  // log(1 / (1 + e^-x)) = -log1p(e^-x) for x >= 0, and x - log1p(e^x) for x < 0.
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

DpoForward dpo_loss(const std::vector<double>& pc, const std::vector<double>& pr, const std::vector<double>& rc,
                    const std::vector<double>& rr, double beta, DpoKind kind, double ls) {
  DpoForward f;
  for (size_t b = 0; b < pc.size(); ++b) {
    const double pi_logratios = pc[b] - pr[b];
    const double ref_logratios = rc[b] - rr[b];
    const double z = pi_logratios - ref_logratios;
    double l = 0;
    if (kind == DpoKind::Sigmoid) l = -log_sigmoid(beta * z) * (1 - ls) - log_sigmoid(-beta * z) * ls;
    if (kind == DpoKind::Ipo) l = std::pow(z - 1 / (2 * beta), 2);
    if (kind == DpoKind::Hinge) l = std::max(0.0, 1 - beta * z);
    f.losses.push_back(l);
    f.chosen_rewards.push_back(beta * (pc[b] - rc[b]));
    f.rejected_rewards.push_back(beta * (pr[b] - rr[b]));
  }
  return f;
}

DpoBackward dpo_loss_backward(const std::vector<double>& pc, const std::vector<double>& pr,
                              const std::vector<double>& rc, const std::vector<double>& rr, double beta, DpoKind kind,
                              double ls, const std::vector<double>& dout) {
  DpoBackward g;
  for (size_t b = 0; b < pc.size(); ++b) {
    const double z = (pc[b] - pr[b]) - (rc[b] - rr[b]);
    // d/dz of each loss; z depends on pc with +1 and on pr with -1.
    double dz = 0;
    if (kind == DpoKind::Sigmoid) dz = -beta * (1 - sigmoid(beta * z)) * (1 - ls) + beta * sigmoid(beta * z) * ls;
    if (kind == DpoKind::Ipo) dz = 2 * (z - 1 / (2 * beta));
    if (kind == DpoKind::Hinge) dz = (1 - beta * z > 0) ? -beta : 0.0;
    g.d_policy_chosen.push_back(dout[b] * dz);
    g.d_policy_rejected.push_back(-dout[b] * dz);
  }
  return g;
}

}  // namespace tk::ref
