#include "optim_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace tk::ref {

namespace {

// x rounded to `bits` significant bits, nearest even (finite, normal range of the target assumed;
// the exponent range of fp32/bf16 is handled by the caller's overflow check).
double round_bits(double x, int bits) {
  if (x == 0 || !std::isfinite(x)) return x;
  int e;
  std::frexp(x, &e);                              // |x| = f * 2^e, f in [0.5, 1)
  e = std::max(e, -125);                          // below fp32/bf16's normal range: fixed quantum
  const double q = std::ldexp(1.0, e - bits);     // the quantum at this exponent
  return std::nearbyint(x / q) * q;               // default rounding mode: ties to even
}

}  // namespace

double store_param(DType t, double v) {
  if (std::isnan(v)) return v;
  const double r = round_bits(v, t == DType::BF16 ? 8 : 24);
  const double max = t == DType::BF16 ? 0x1.fep127 : double(std::numeric_limits<float>::max());
  if (std::fabs(r) > max) return std::copysign(std::numeric_limits<double>::infinity(), v);
  return r;
}

void adamw_step_ref(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v,
                    const std::vector<double>& g, DType param_dtype, const AdamWParams& hp) {
  const double lr = hp.lr, b1 = hp.beta1, b2 = hp.beta2, eps = hp.eps, wd = hp.weight_decay;
  const double t = double(hp.step);
  const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
  for (size_t i = 0; i < p.size(); ++i) {
    const double gi = g[i] * double(hp.grad_scale);
    double pi = p[i] - lr * wd * p[i];
    const double mi = b1 * m[i] + (1 - b1) * gi;
    const double vi = b2 * v[i] + (1 - b2) * gi * gi;
    const double m_hat = mi / bc1;
    const double v_hat = vi / bc2;
    pi = pi - lr * m_hat / (std::sqrt(v_hat) + eps);
    p[i] = store_param(param_dtype, pi);
    m[i] = store_param(DType::F32, mi);
    v[i] = store_param(DType::F32, vi);
  }
}

double grad_norm_sq_ref(const std::vector<std::vector<double>>& grads) {
  double s = 0;
  for (const auto& g : grads)
    for (double x : g) s += x * x;
  return s;
}

double clip_coefficient_ref(double total_norm, double max_norm) {
  const double c = max_norm / (total_norm + 1e-6);
  return c > 1 ? 1 : c;
}

std::vector<double> scale_ref(const std::vector<double>& g, double coef, DType dtype) {
  std::vector<double> r(g.size());
  for (size_t i = 0; i < g.size(); ++i) r[i] = store_param(dtype, store_param(DType::F32, g[i] * coef));
  return r;
}

}  // namespace tk::ref
