// Reference elementwise ops: double precision, one element at a time (see elementwise_ref.h).
#include "elementwise_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../core/rng.h"

namespace tk::ref {

namespace {

// Row-major multi-index of `flat` over shape, and the element offset through strides.
int64_t offset_of(const TensorView& v, int64_t flat) {
  int64_t off = 0;
  for (int d = v.ndim - 1; d >= 0; --d) {
    int64_t i = flat % v.shape[d];
    flat /= v.shape[d];
    off += i * v.strides[d];
  }
  return off;
}

// Round v to a binary floating format with `digits` significant bits, smallest normal exponent
// emin and largest finite value max_finite, to nearest even; beyond the range rounds to infinity.
double round_format(double v, int digits, int emin, double max_finite) {
  if (std::isnan(v) || std::isinf(v) || v == 0) return v;
  int e;
  std::frexp(v, &e);                     // |v| in [2^(e-1), 2^e)
  int lead = std::max(e - 1, emin);      // below the normal range the quantum stops shrinking
  double quantum = std::ldexp(1.0, lead - (digits - 1));
  double r = std::nearbyint(v / quantum) * quantum;  // exact scaling; default mode is to-nearest-even
  if (std::fabs(r) > max_finite) return std::copysign(std::numeric_limits<double>::infinity(), v);
  return r;
}

double round_f32(double v) { return round_format(v, 24, -126, 3.4028234663852886e38); }

double to_int(double v, double lo, double hi) {
  if (std::isnan(v)) return 0;
  double t = std::trunc(v);
  return t < lo ? lo : t > hi ? hi : t;
}

double wrap_i32(int64_t v) {
  uint32_t u = uint32_t(uint64_t(v));
  return double(int32_t(u));
}

}  // namespace

double load(const TensorView& v, int64_t flat) {
  int64_t off = offset_of(v, flat);
  switch (v.dtype) {
    case DType::F32: return v.ptr<const float>()[off];
    case DType::BF16: {
      uint32_t bits = uint32_t(v.ptr<const uint16_t>()[off]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case DType::F16: {
      uint16_t h = v.ptr<const uint16_t>()[off];
      int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
      double sign = (h & 0x8000) ? -1.0 : 1.0;
      if (exp == 31) return man ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
      if (exp == 0) return sign * std::ldexp(double(man), -24);
      return sign * std::ldexp(double(man + 1024), exp - 25);
    }
    case DType::I32: return v.ptr<const int32_t>()[off];
    case DType::U8: return v.ptr<const uint8_t>()[off];
  }
  return 0;
}

std::vector<double> read(const TensorView& v) {
  std::vector<double> out(size_t(v.numel()));
  for (int64_t i = 0; i < v.numel(); ++i) out[size_t(i)] = load(v, i);
  return out;
}

double store_as(DType t, double v) {
  switch (t) {
    case DType::F32: return round_f32(v);
    case DType::BF16: return round_format(round_f32(v), 8, -126, 3.3895313892515355e38);
    case DType::F16: return round_format(round_f32(v), 11, -14, 65504.0);
    case DType::I32: return to_int(v, -2147483648.0, 2147483647.0);
    case DType::U8: return to_int(v, 0.0, 255.0);
  }
  return v;
}

std::vector<double> store_as(DType t, const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = store_as(t, v[i]);
  return out;
}

std::vector<double> binary(BinaryOp op, const TensorView& a, const TensorView& b) {
  std::vector<double> out(size_t(a.numel()));
  for (int64_t i = 0; i < a.numel(); ++i) {
    double x = load(a, i), y = load(b, i);
    if (a.dtype == DType::I32) {
      int64_t p = int64_t(x), q = int64_t(y);
      int64_t r = op == BinaryOp::Add ? p + q : op == BinaryOp::Sub ? p - q : p * q;
      out[size_t(i)] = wrap_i32(r);
    } else {
      out[size_t(i)] = op == BinaryOp::Add ? x + y : op == BinaryOp::Sub ? x - y : x * y;
    }
  }
  return out;
}

std::vector<double> scale(const TensorView& x, double alpha) {
  std::vector<double> out(size_t(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i) out[size_t(i)] = alpha * load(x, i);
  return out;
}

std::vector<double> sum(const TensorView& x, uint32_t axes_mask) {
  int64_t out_shape[kMaxDims], out_strides[kMaxDims];
  for (int d = 0; d < x.ndim; ++d) out_shape[d] = ((axes_mask >> d) & 1u) ? 1 : x.shape[d];
  contiguous_strides(x.ndim, out_shape, out_strides);
  int64_t out_n = 1;
  for (int d = 0; d < x.ndim; ++d) out_n *= out_shape[d];
  std::vector<double> acc(size_t(out_n), 0.0);
  for (int64_t i = 0; i < x.numel(); ++i) {
    // Output index: x's multi-index with the reduced coordinates set to 0.
    int64_t rest = i, o = 0;
    for (int d = x.ndim - 1; d >= 0; --d) {
      int64_t c = rest % x.shape[d];
      rest /= x.shape[d];
      if (!((axes_mask >> d) & 1u)) o += c * out_strides[d];
    }
    acc[size_t(o)] += load(x, i);
  }
  if (x.dtype == DType::I32)
    for (double& v : acc) v = wrap_i32(int64_t(v));  // |sum| < 2^53 for any test-sized input
  return acc;
}

std::vector<double> cast(const TensorView& src, DType dst) {
  std::vector<double> out(size_t(src.numel()));
  for (int64_t i = 0; i < src.numel(); ++i) out[size_t(i)] = store_as(dst, load(src, i));
  return out;
}

std::vector<double> randn(int64_t n, uint64_t seed, double mean, double stddev) {
  const double two_pi = 6.283185307179586476925;
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint64_t block = uint64_t(i) / 4;
    int lane = int(i % 4), pair = lane / 2;
    Philox4x32 r = philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0, 0, uint32_t(seed), uint32_t(seed >> 32));
    double u1 = double((r.v[2 * pair] >> 8) + 1) / 16777216.0;
    double u2 = double((r.v[2 * pair + 1] >> 8) + 1) / 16777216.0;
    double radius = std::sqrt(-2.0 * std::log(u1));
    double z = radius * (lane % 2 == 0 ? std::cos(two_pi * u2) : std::sin(two_pi * u2));
    out[size_t(i)] = mean + stddev * z;
  }
  return out;
}

std::vector<double> dropout(const std::vector<double>& x, double p, uint64_t seed) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint64_t block = uint64_t(i) / 4;
    Philox4x32 r = philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0, 0, uint32_t(seed), uint32_t(seed >> 32));
    double u = double((r.v[i % 4] >> 8) + 1) / 16777216.0;
    out[i] = u > p ? x[i] / (1.0 - p) : 0.0;
  }
  return out;
}

}  // namespace tk::ref
