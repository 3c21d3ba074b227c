// Naive double references for the distillation losses (see distill_ref.h).
#include "distill_ref.h"

#include <algorithm>
#include <cmath>

#include "../core/error.h"

namespace tk::ref {

namespace {

// log_softmax(x / T) of one row.
std::vector<double> log_softmax(const double* x, int64_t V, double T) {
  std::vector<double> z(size_t(V), 0.0);
  double mx = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    z[size_t(v)] = x[v] / T;
    mx = std::max(mx, z[size_t(v)]);
  }
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(z[size_t(v)] - mx);
  const double lse = mx + std::log(s);
  for (double& e : z) e -= lse;
  return z;
}

DistillKind effective(DistillKind kind, double beta) {
  if (kind == DistillKind::Jsd && beta == 0.0) return DistillKind::ForwardKl;
  if (kind == DistillKind::Jsd && beta == 1.0) return DistillKind::ReverseKl;
  return kind;
}

// log(beta p + (1 - beta) q) from log p and log q, in log space (finite where p and q underflow).
double log_mix(double lp, double lq, double beta) {
  const double a = std::log(beta) + lp, b = std::log1p(-beta) + lq;
  const double hi = std::max(a, b), lo = std::min(a, b);
  return hi == -INFINITY ? -INFINITY : hi + std::log1p(std::exp(lo - hi));
}

// p * (a - b), 0 where p == 0.
double xlog(double p, double a, double b) { return p == 0 ? 0.0 : p * (a - b); }

int64_t count_rows(const std::vector<int32_t>& targets, int64_t N, int64_t V, int32_t ignore_index) {
  if (targets.empty()) return N;
  TK_CHECK(int64_t(targets.size()) == N, "ref::distill: targets has ", targets.size(), " elements, expected ", N);
  int64_t c = 0;
  for (int32_t y : targets) {
    if (y == ignore_index) continue;
    TK_CHECK(y >= 0 && y < V, "ref::distill: target ", y, " out of range for V = ", V);
    ++c;
  }
  return c;
}

bool ignored(const std::vector<int32_t>& targets, int64_t n, int32_t ignore_index) {
  return !targets.empty() && targets[size_t(n)] == ignore_index;
}

}  // namespace

DistillForward distill_forward(const std::vector<double>& student, const std::vector<double>& teacher,
                               const std::vector<int32_t>& targets, int64_t N, int64_t V, DistillKind kind,
                               double temperature, double beta, int32_t ignore_index) {
  const int64_t counted = count_rows(targets, N, V, ignore_index);
  const DistillKind k = effective(kind, beta);
  DistillForward out;
  out.losses.assign(size_t(N), 0.0);
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (ignored(targets, n, ignore_index)) continue;
    const std::vector<double> lq = log_softmax(student.data() + n * V, V, temperature);
    const std::vector<double> lp = log_softmax(teacher.data() + n * V, V, temperature);
    double D = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double q = std::exp(lq[size_t(v)]), p = std::exp(lp[size_t(v)]);
      switch (k) {
        case DistillKind::ForwardKl: D += xlog(p, lp[size_t(v)], lq[size_t(v)]); break;
        case DistillKind::ReverseKl: D += xlog(q, lq[size_t(v)], lp[size_t(v)]); break;
        case DistillKind::Jsd: {
          const double lm = log_mix(lp[size_t(v)], lq[size_t(v)], beta);
          D += beta * xlog(p, lp[size_t(v)], lm) + (1 - beta) * xlog(q, lq[size_t(v)], lm);
          break;
        }
      }
    }
    out.losses[size_t(n)] = temperature * temperature * D;
    sum += out.losses[size_t(n)];
  }
  out.loss = counted > 0 ? sum / double(counted) : 0.0;
  return out;
}

std::vector<double> distill_backward(const std::vector<double>& student, const std::vector<double>& teacher,
                                     const std::vector<int32_t>& targets, int64_t N, int64_t V, DistillKind kind,
                                     double temperature, double beta, int32_t ignore_index, double dloss) {
  const int64_t counted = count_rows(targets, N, V, ignore_index);
  const DistillKind k = effective(kind, beta);
  std::vector<double> d(size_t(N * V), 0.0);
  if (counted == 0) return d;
  // loss = T^2 / counted * sum_n D_n(s_n / T): d s = dloss * T / counted * dD/dz
  const double c = dloss * temperature / double(counted);
  for (int64_t n = 0; n < N; ++n) {
    if (ignored(targets, n, ignore_index)) continue;
    const std::vector<double> lq = log_softmax(student.data() + n * V, V, temperature);
    const std::vector<double> lp = log_softmax(teacher.data() + n * V, V, temperature);
    const size_t nv = size_t(V);
    std::vector<double> q(nv, 0.0), p(nv, 0.0), g(nv, 0.0);
    for (int64_t v = 0; v < V; ++v) q[size_t(v)] = std::exp(lq[size_t(v)]), p[size_t(v)] = std::exp(lp[size_t(v)]);
    // g = dD/d log q (with log q as free variables), then through log_softmax: dz = g - q sum g.
    for (int64_t v = 0; v < V; ++v) {
      const size_t i = size_t(v);
      switch (k) {
        case DistillKind::ForwardKl: g[i] = -p[i]; break;
        case DistillKind::ReverseKl: g[i] = q[i] * (lq[i] - lp[i] + 1.0); break;
        case DistillKind::Jsd: g[i] = (1 - beta) * xlog(q[i], lq[i], log_mix(lp[i], lq[i], beta)); break;
      }
    }
    double G = 0;
    for (double x : g) G += x;
    for (int64_t v = 0; v < V; ++v) d[size_t(n * V + v)] = c * (g[size_t(v)] - q[size_t(v)] * G);
  }
  return d;
}

}  // namespace tk::ref
