// Reference RMSNorm, SwiGLU and embedding: double precision, straight from the formulas (see
// norm_ref.h).
#include "norm_ref.h"

#include <cmath>

#include "../core/error.h"

namespace tk::ref {

RmsNormForward rms_norm_forward(const std::vector<double>& x, const std::vector<double>& w, int64_t N, int64_t D,
                                double eps) {
  RmsNormForward r{std::vector<double>(size_t(N * D)), std::vector<double>(size_t(N))};
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += x[size_t(n * D + d)] * x[size_t(n * D + d)];
    double rstd = 1.0 / std::sqrt(ss / double(D) + eps);
    r.rstd[size_t(n)] = rstd;
    for (int64_t d = 0; d < D; ++d) r.y[size_t(n * D + d)] = x[size_t(n * D + d)] * rstd * w[size_t(d)];
  }
  return r;
}

// With r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D, and y_i = x_i r w_i:
//   dL/dx_j = sum_i dy_i w_i (delta_ij r + x_i dr/dx_j) = dy_j w_j r - r^3 x_j / D * sum_i dy_i w_i x_i
//   dL/dw_i = sum_n dy_i x_i r
RmsNormBackward rms_norm_backward(const std::vector<double>& dy, const std::vector<double>& x,
                                  const std::vector<double>& w, int64_t N, int64_t D, double eps) {
  RmsNormBackward g{std::vector<double>(size_t(N * D)), std::vector<double>(size_t(D), 0.0)};
  for (int64_t n = 0; n < N; ++n) {
    const double* xr = x.data() + n * D;
    const double* dyr = dy.data() + n * D;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    double r = 1.0 / std::sqrt(ss / double(D) + eps);
    double dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += dyr[d] * w[size_t(d)] * xr[d];
    for (int64_t d = 0; d < D; ++d) {
      g.dx[size_t(n * D + d)] = dyr[d] * w[size_t(d)] * r - r * r * r * xr[d] * dot / double(D);
      g.dweight[size_t(d)] += dyr[d] * xr[d] * r;
    }
  }
  return g;
}

double sigmoid(double g) {
  double e = std::exp(-std::fabs(g));  // in (0, 1]: cannot overflow
  return g >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

std::vector<double> swiglu_forward(const std::vector<double>& gate, const std::vector<double>& up) {
  std::vector<double> out(gate.size());
  for (size_t i = 0; i < gate.size(); ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
  return out;
}

// d silu(g)/dg = s + g s (1 - s) with s = sigmoid(g).
SwigluBackward swiglu_backward(const std::vector<double>& dout, const std::vector<double>& gate,
                               const std::vector<double>& up) {
  SwigluBackward r{std::vector<double>(gate.size()), std::vector<double>(gate.size())};
  for (size_t i = 0; i < gate.size(); ++i) {
    double s = sigmoid(gate[i]);
    r.dup[i] = dout[i] * gate[i] * s;
    r.dgate[i] = dout[i] * up[i] * (s + gate[i] * s * (1.0 - s));
  }
  return r;
}

std::vector<double> embedding_forward(const std::vector<int32_t>& ids, const std::vector<double>& table, int64_t V,
                                      int64_t D) {
  std::vector<double> out(ids.size() * size_t(D));
  for (size_t n = 0; n < ids.size(); ++n) {
    TK_CHECK(ids[n] >= 0 && ids[n] < V, "ref::embedding_forward: ids[", n, "] = ", ids[n], " not in [0, ", V, ")");
    for (int64_t d = 0; d < D; ++d) out[n * size_t(D) + size_t(d)] = table[size_t(ids[n] * D + d)];
  }
  return out;
}

std::vector<double> embedding_backward(const std::vector<double>& dout, const std::vector<int32_t>& ids, int64_t V,
                                       int64_t D) {
  std::vector<double> dtable(size_t(V * D), 0.0);
  for (size_t n = 0; n < ids.size(); ++n) {
    TK_CHECK(ids[n] >= 0 && ids[n] < V, "ref::embedding_backward: ids[", n, "] = ", ids[n], " not in [0, ", V, ")");
    for (int64_t d = 0; d < D; ++d) dtable[size_t(ids[n] * D + d)] += dout[n * size_t(D) + size_t(d)];
  }
  return dtable;
}

}  // namespace tk::ref
