// Reference RoPE: double precision, one element at a time (see rope_ref.h).
#include "rope_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../core/error.h"

namespace tk::ref {
namespace {

const double kTwoPi = 6.283185307179586476925286766559;

// Element `off` (in elements) of a float/int tensor, widened to double. bf16 is the top half of
// an fp32 bit pattern, decoded here without core/dtype.h.
double element(const TensorView& v, int64_t off) {
  switch (v.dtype) {
    case DType::F32: return double(v.ptr<float>()[off]);
    case DType::I32: return double(v.ptr<int32_t>()[off]);
    case DType::BF16: {
      uint32_t bits = uint32_t(v.ptr<uint16_t>()[off]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return double(f);
    }
    default: fail("ref::rope: unsupported dtype ", dtype_name(v.dtype));
  }
}

// base^(-2i/D) written as exp(-(2i/D) ln base).
double power_freq(double log_base, int64_t i, int64_t D) { return std::exp(-(2.0 * double(i) / double(D)) * log_base); }

std::vector<double> rotate(const TensorView& x, const TensorView& positions, bool per_batch,
                           const std::vector<float>& inv_freq, double attention_factor, double direction) {
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3], n = D / 2;
  std::vector<double> out(size_t(B * T * H * D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t poff = per_batch ? b * positions.strides[0] + t * positions.strides[1] : t * positions.strides[0];
      double pos = element(positions, poff);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < n; ++i) {
          double angle = direction * pos * double(inv_freq[size_t(i)]);
          double c = attention_factor * std::cos(angle), s = attention_factor * std::sin(angle);
          int64_t base = b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
          double a = element(x, base + i * x.strides[3]);
          double z = element(x, base + (i + n) * x.strides[3]);
          size_t o = size_t(((b * T + t) * H + h) * D);
          // [a', z'] = [[c, -s], [s, c]] [a, z]: the rotate_half form x * cos + rotate_half(x) * sin.
          out[o + size_t(i)] = a * c - z * s;
          out[o + size_t(i + n)] = z * c + a * s;
        }
    }
  return out;
}

}  // namespace

RopeFrequencies rope_inv_freq(int64_t D, double theta, const RopeScaling& sc, int64_t seq_len) {
  const int64_t n = D / 2;
  const double log_theta = std::log(theta);
  const double factor = double(sc.factor);
  RopeFrequencies r;
  r.inv_freq.assign(size_t(n), 0.0);
  const int64_t orig_ctx = sc.original_max_position_embeddings > 0 ? sc.original_max_position_embeddings
                                                                  : sc.max_position_embeddings;
  for (int64_t i = 0; i < n; ++i) {
    const double plain = power_freq(log_theta, i, D);
    double v = plain;
    switch (sc.type) {
      case RopeScaling::None:
        break;
      case RopeScaling::Linear:  // positions / factor
        v = plain / factor;
        break;
      case RopeScaling::Dynamic: {
        // NTK-aware: base' = theta * (factor * L / max_pos - (factor - 1)) ^ (D / (D - 2)) with
        // L = max(seq_len, max_pos); at D = 2 the single frequency is 1 whatever the base.
        const double max_pos = double(sc.max_position_embeddings);
        const double L = std::max(double(seq_len), max_pos);
        if (D > 2 && L > max_pos) {
          double log_base = log_theta + double(D) / double(D - 2) * std::log(factor * L / max_pos - (factor - 1.0));
          v = power_freq(log_base, i, D);
        }
        break;
      }
      case RopeScaling::Yarn: {
        // Dimension index at which a wavelength fits `rot` turns into the original context:
        // solve orig / (2 pi theta^(2d/D)) = rot for d.
        auto dim_for = [&](double rot) {
          return double(D) * std::log(double(orig_ctx) / (rot * kTwoPi)) / (2.0 * log_theta);
        };
        double fast = sc.beta_fast > 0 ? double(sc.beta_fast) : 32.0;
        double slow = sc.beta_slow > 0 ? double(sc.beta_slow) : 1.0;
        double lo = dim_for(fast), hi = dim_for(slow);
        if (sc.truncate) {
          lo = std::floor(lo);
          hi = std::ceil(hi);
        }
        if (lo < 0) lo = 0;
        if (hi > double(D - 1)) hi = double(D - 1);
        if (hi == lo) hi += 0.001;
        double t = (double(i) - lo) / (hi - lo);
        double interp_weight = t < 0 ? 0 : t > 1 ? 1 : t;  // 1 = fully interpolated (divided by factor)
        v = plain * (1.0 - interp_weight) + (plain / factor) * interp_weight;
        break;
      }
      case RopeScaling::Llama3: {
        const double wavelen = kTwoPi / plain;
        const double ctx = double(orig_ctx);
        const double lo = double(sc.low_freq_factor), hi = double(sc.high_freq_factor);
        if (wavelen > ctx / lo) {
          v = plain / factor;  // long wavelengths: fully interpolated
        } else if (wavelen >= ctx / hi) {
          double smooth = (ctx / wavelen - lo) / (hi - lo);  // 0 at ctx/lo, 1 at ctx/hi
          v = smooth * plain + (1.0 - smooth) * plain / factor;
        }
        break;
      }
    }
    r.inv_freq[size_t(i)] = v;
  }
  if (sc.type == RopeScaling::Yarn) {
    auto m = [&](double k) { return factor <= 1.0 ? 1.0 : 1.0 + 0.1 * k * std::log(factor); };
    if (sc.attention_factor > 0)
      r.attention_factor = double(sc.attention_factor);
    else if (sc.mscale != 0 && sc.mscale_all_dim != 0)
      r.attention_factor = m(double(sc.mscale)) / m(double(sc.mscale_all_dim));
    else
      r.attention_factor = m(1.0);
  }
  return r;
}

std::vector<double> rope_forward(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                                 const std::vector<float>& inv_freq, double attention_factor) {
  return rotate(x, positions, positions_per_batch, inv_freq, attention_factor, 1.0);
}

std::vector<double> rope_backward(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                                  const std::vector<float>& inv_freq, double attention_factor) {
  return rotate(dy, positions, positions_per_batch, inv_freq, attention_factor, -1.0);
}

}  // namespace tk::ref
