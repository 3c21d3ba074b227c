// Naive NF4 references (see nf4_ref.h).
#include "nf4_ref.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>

#include "../cpu/nf4.h"

namespace tk::ref {
namespace {

// Inverse of the standard normal CDF by Newton's method on 0.5 * erfc(-x / sqrt(2)).
double norm_ppf(double p) {
  double x = 0.0;
  for (int it = 0; it < 100; ++it) {
    const double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
    const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * 3.14159265358979323846);
    const double step = (cdf - p) / pdf;
    x -= step;
    if (std::fabs(step) < 1e-17) break;
  }
  return x;
}

std::vector<double> linspace(double a, double b, int n) {
  std::vector<double> r(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) r[size_t(i)] = a + (b - a) * double(i) / double(n - 1);
  return r;
}

}  // namespace

std::vector<double> nf4_code_from_quantiles() {
  const double offset = 0.9677083;
  std::vector<double> v;
  std::vector<double> p1 = linspace(offset, 0.5, 9), p3 = linspace(offset, 0.5, 8);
  for (int i = 0; i < 8; ++i) v.push_back(norm_ppf(p1[size_t(i)]));
  for (int i = 0; i < 7; ++i) v.push_back(-norm_ppf(p3[size_t(i)]));
  v.push_back(0.0);
  std::sort(v.begin(), v.end());
  const double mx = v.back();
  for (double& x : v) x /= mx;
  return v;
}

uint8_t nf4_nearest_ref(float n) {
  int best = 0;
  double best_d = std::fabs(double(n) - double(kNf4Code[0]));
  for (int k = 1; k < 16; ++k) {
    const double d = std::fabs(double(n) - double(kNf4Code[k]));
    if (d < best_d) { best_d = d; best = k; }
  }
  // bitsandbytes' boundaries are its decimal midpoints compiled as fp32 literals; where that
  // literal lies above the exact midpoint, n equal to it goes down although the upper code is
  // nearer. Typed here from bitsandbytes' dQuantizeNF4 and parsed with strtof (as nvcc would).
  static const char* const kBnbMidpoints[15] = {
      "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
      "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
      "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
      "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"};
  if (best > 0 && n == std::strtof(kBnbMidpoints[best - 1], nullptr)) best -= 1;
  return uint8_t(best);
}

Nf4RefQuant nf4_quantize_ref(const std::vector<double>& w, int64_t block_size) {
  const int64_t numel = int64_t(w.size());
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  Nf4RefQuant r;
  r.packed.assign(size_t((numel + 1) / 2), 0);
  r.absmax.assign(size_t(nblocks), 0.0f);
  std::vector<uint8_t> codes(size_t(numel + 1), 7);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t s = b * block_size, e = std::min(numel, s + block_size);
    double m = 0.0;
    for (int64_t i = s; i < e; ++i) m = std::max(m, std::fabs(w[size_t(i)]));
    r.absmax[size_t(b)] = float(m);
    if (m < double(FLT_MIN)) continue;  // codes stay 7
    const float inv = 1.0f / float(m);
    for (int64_t i = s; i < e; ++i) {
      const float n = float(w[size_t(i)] * double(inv));  // the exact product, rounded once to fp32
      codes[size_t(i)] = nf4_nearest_ref(n);
    }
  }
  for (int64_t j = 0; j < (numel + 1) / 2; ++j)
    r.packed[size_t(j)] = uint8_t(codes[size_t(2 * j)] * 16 + codes[size_t(2 * j + 1)]);
  return r;
}

std::vector<double> nf4_dequantize_ref(const std::vector<uint8_t>& packed, const std::vector<double>& absmax,
                                       int64_t numel, int64_t block_size) {
  std::vector<double> out(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) {
    const uint8_t byte = packed[size_t(i / 2)];
    const int code = i % 2 == 0 ? byte / 16 : byte % 16;
    out[size_t(i)] = double(kNf4Code[code]) * absmax[size_t(i / block_size)];
  }
  return out;
}

std::vector<double> nf4_absmax_dq_ref(const std::vector<uint8_t>& qabsmax, const std::vector<float>& scale2,
                                      float offset) {
  std::vector<double> r(qabsmax.size());
  for (size_t b = 0; b < qabsmax.size(); ++b)
    r[b] = double(kDynamicMap8[qabsmax[b]]) * double(scale2[b / 256]) + double(offset);
  return r;
}

uint8_t dyn8_nearest_ref(double x) {
  int best = 0;
  double best_d = std::fabs(x - double(kDynamicMap8[0]));
  for (int k = 1; k < 256; ++k) {
    const double d = std::fabs(x - double(kDynamicMap8[k]));
    if (d < best_d) { best_d = d; best = k; }
  }
  return uint8_t(best);
}

}  // namespace tk::ref
