// Naive double reference for attention (see attention_ref.h).
#include "attention_ref.h"

#include <cmath>
#include <limits>

namespace tk::ref {
namespace {

bool sees(const AttentionShape& a, int64_t b, int64_t t, int64_t s) {
  if (a.causal && s > t + (a.S - a.T)) return false;
  return !a.seg_q || a.seg_q[b * a.T + t] == a.seg_k[b * a.S + s];
}

// Probabilities p [T, S] of (b, h) (rows with no visible key are all zero) and, optionally, lse [T].
void probabilities(const AttentionShape& a, int64_t b, int64_t h, const std::vector<double>& q,
                   const std::vector<double>& k, std::vector<double>& p, std::vector<double>* lse) {
  const int64_t g = h / (a.H / a.Hkv);
  p.assign(size_t(a.T * a.S), 0.0);
  for (int64_t t = 0; t < a.T; ++t) {
    double* row = &p[size_t(t * a.S)];
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t s = 0; s < a.S; ++s) {
      if (!sees(a, b, t, s)) continue;
      double dot = 0.0;
      for (int64_t d = 0; d < a.D; ++d)
        dot += q[size_t(((b * a.T + t) * a.H + h) * a.D + d)] * k[size_t(((b * a.S + s) * a.Hkv + g) * a.D + d)];
      row[s] = a.scale * dot;
      mx = std::max(mx, row[s]);
    }
    if (mx == -std::numeric_limits<double>::infinity()) {  // no visible key
      if (lse) (*lse)[size_t(t)] = mx;
      continue;
    }
    double sum = 0.0;
    for (int64_t s = 0; s < a.S; ++s)
      if (sees(a, b, t, s)) sum += std::exp(row[s] - mx);
    for (int64_t s = 0; s < a.S; ++s) row[s] = sees(a, b, t, s) ? std::exp(row[s] - mx) / sum : 0.0;
    if (lse) (*lse)[size_t(t)] = mx + std::log(sum);
  }
}

}  // namespace

void attention_forward(const AttentionShape& a, const std::vector<double>& q, const std::vector<double>& k,
                       const std::vector<double>& v, std::vector<double>* o, std::vector<double>* lse) {
  o->assign(size_t(a.B * a.T * a.H * a.D), 0.0);
  lse->assign(size_t(a.B * a.H * a.T), 0.0);
  std::vector<double> p, l(size_t(a.T));
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t g = h / (a.H / a.Hkv);
      probabilities(a, b, h, q, k, p, &l);
      for (int64_t t = 0; t < a.T; ++t) {
        (*lse)[size_t((b * a.H + h) * a.T + t)] = l[size_t(t)];
        for (int64_t d = 0; d < a.D; ++d) {
          double acc = 0.0;
          for (int64_t s = 0; s < a.S; ++s)
            acc += p[size_t(t * a.S + s)] * v[size_t(((b * a.S + s) * a.Hkv + g) * a.D + d)];
          (*o)[size_t(((b * a.T + t) * a.H + h) * a.D + d)] = acc;
        }
      }
    }
}

void attention_backward(const AttentionShape& a, const std::vector<double>& dout, const std::vector<double>& q,
                        const std::vector<double>& k, const std::vector<double>& v, std::vector<double>* dq,
                        std::vector<double>* dk, std::vector<double>* dv) {
  dq->assign(size_t(a.B * a.T * a.H * a.D), 0.0);
  dk->assign(size_t(a.B * a.S * a.Hkv * a.D), 0.0);
  dv->assign(size_t(a.B * a.S * a.Hkv * a.D), 0.0);
  std::vector<double> p, dp(size_t(a.T * a.S));
  auto qi = [&](int64_t b, int64_t t, int64_t h, int64_t d) { return size_t(((b * a.T + t) * a.H + h) * a.D + d); };
  auto ki = [&](int64_t b, int64_t s, int64_t g, int64_t d) { return size_t(((b * a.S + s) * a.Hkv + g) * a.D + d); };
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t g = h / (a.H / a.Hkv);
      probabilities(a, b, h, q, k, p, nullptr);
      // dp = do v^T; ds = p * (dp - rowsum(p * dp)).
      for (int64_t t = 0; t < a.T; ++t) {
        double rs = 0.0;
        for (int64_t s = 0; s < a.S; ++s) {
          double acc = 0.0;
          for (int64_t d = 0; d < a.D; ++d) acc += dout[qi(b, t, h, d)] * v[ki(b, s, g, d)];
          dp[size_t(t * a.S + s)] = acc;
          rs += p[size_t(t * a.S + s)] * acc;
        }
        for (int64_t s = 0; s < a.S; ++s) {
          const double pv = p[size_t(t * a.S + s)];
          const double ds = pv * (dp[size_t(t * a.S + s)] - rs);
          for (int64_t d = 0; d < a.D; ++d) {
            (*dv)[ki(b, s, g, d)] += pv * dout[qi(b, t, h, d)];
            (*dq)[qi(b, t, h, d)] += a.scale * ds * k[ki(b, s, g, d)];
            (*dk)[ki(b, s, g, d)] += a.scale * ds * q[qi(b, t, h, d)];
          }
        }
      }
    }
}

}  // namespace tk::ref
