// CPU RoPE (see rope.h for the contract).
//
// Design:
// - The work is one 2-D rotation per (row, head, i < D/2) pair (x[i], x[i + D/2]), with the same
//   cos/sin for every head of a (b, t) row. cos and sin (already multiplied by the attention
//   factor, and with sin negated for the backward pass) are evaluated once per (position, i) into a
//   small per-thread row: with shared positions, threads split t and each row serves all B batch
//   rows at that t (the [T, D/2] table, built just in time instead of in a separate pass, which
//   measured faster and allocates nothing); with per-batch positions, each (b, t) row gets its own.
//   Either way the transcendental cost is amortized over H heads (and B) and the hot loop is pure
//   multiply-add.
// - Angles and cos/sin are computed in double and rounded once to fp32: an fp32 angle
//   pos * inv_freq already has an absolute error of ~ulp(pos) (0.004 rad at pos 65536), which
//   would dominate the kernel's error at long context.
// - The hot loop walks i in SIMD lanes over the two halves at once (AVX-512: 16 lanes with masked
//   tails; AVX2: 8 lanes with a scalar tail; portable scalar), and threads split the B*T rows.
//   Every lane loads both halves before storing either, so out may alias x.
// - BF16 is widened in registers and rounded back to nearest even with integer arithmetic (the
//   rule of core/dtype.h, NaN kept quiet), not with VCVTNEPS2BF16, which flushes subnormals.
// - The binary is built for baseline x86-64, so the AVX paths carry function-level target
//   attributes and the level comes from active_isa() at each call.
#include "rope.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {

constexpr double kPi = 3.141592653589793238462643383279502884;

// ================================ inverse frequencies ============================================

RopeFrequencies rope_inv_freq(int64_t D, double theta, const RopeScaling& sc, int64_t seq_len) {
  TK_CHECK(D >= 2 && D % 2 == 0, "rope: head dim D must be even and >= 2, got ", D);
  // theta <= 1 makes every frequency >= 1 (and YaRN divides by ln(theta)): never a real config.
  TK_CHECK(std::isfinite(theta) && theta > 1.0, "rope: theta (rope_theta) must be > 1, got ", theta);
  const int64_t n = D / 2;
  const double d = double(D);
  const double factor = double(sc.factor);
  if (sc.type != RopeScaling::None)
    TK_CHECK(std::isfinite(factor) && factor > 0.0, "rope: rope_scaling factor must be > 0, got ", factor);

  // HF: 1 / base ** (arange(0, D, 2) / D), i.e. base^(-2i/D).
  auto base_freq = [&](double base, int64_t i) { return 1.0 / std::pow(base, double(2 * i) / d); };
  auto original_context = [&](const char* type) {
    int64_t orig = sc.original_max_position_embeddings > 0 ? sc.original_max_position_embeddings
                                                           : sc.max_position_embeddings;
    TK_CHECK(orig > 0, "rope: ", type,
             " scaling needs original_max_position_embeddings (or max_position_embeddings) > 0");
    return double(orig);
  };

  std::vector<double> f(static_cast<size_t>(n), 0.0);
  double attention = 1.0;
  switch (sc.type) {
    case RopeScaling::None:
      for (int64_t i = 0; i < n; ++i) f[size_t(i)] = base_freq(theta, i);
      break;
    case RopeScaling::Linear:
      // Dividing positions by factor is the same as dividing the frequencies by it.
      for (int64_t i = 0; i < n; ++i) f[size_t(i)] = base_freq(theta, i) / factor;
      break;
    case RopeScaling::Dynamic: {
      TK_CHECK(sc.max_position_embeddings > 0, "rope: dynamic scaling needs max_position_embeddings > 0");
      const double max_pos = double(sc.max_position_embeddings);
      const double len = std::max(double(seq_len), max_pos);
      double base = theta;
      // The NTK exponent D / (D - 2) is undefined at D = 2, where the only frequency is
      // base^0 = 1 whatever the base; at len == max_pos the bracket is exactly 1.
      if (D > 2) base = theta * std::pow(factor * len / max_pos - (factor - 1.0), d / (d - 2.0));
      for (int64_t i = 0; i < n; ++i) f[size_t(i)] = base_freq(base, i);
      break;
    }
    case RopeScaling::Yarn: {
      const double orig = original_context("yarn");
      auto get_mscale = [](double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
      if (sc.attention_factor > 0.0f)
        attention = double(sc.attention_factor);
      else if (sc.mscale != 0.0f && sc.mscale_all_dim != 0.0f)
        attention = get_mscale(factor, double(sc.mscale)) / get_mscale(factor, double(sc.mscale_all_dim));
      else
        attention = get_mscale(factor, 1.0);
      const double beta_fast = sc.beta_fast > 0.0f ? double(sc.beta_fast) : 32.0;
      const double beta_slow = sc.beta_slow > 0.0f ? double(sc.beta_slow) : 1.0;
      // The (fractional) dimension whose wavelength makes `rotations` turns over the original
      // context: D * ln(orig / (rotations * 2 pi)) / (2 ln theta).
      auto correction_dim = [&](double rotations) {
        return d * std::log(orig / (rotations * 2.0 * kPi)) / (2.0 * std::log(theta));
      };
      double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
      if (sc.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, d - 1.0);  // HF clamps to dim - 1, not to D/2 - 1
      if (low == high) high += 0.001;  // HF's guard against a zero-width ramp
      for (int64_t i = 0; i < n; ++i) {
        // ramp 0: extrapolate (keep the frequency), ramp 1: interpolate (divide by factor).
        double ramp = std::min(1.0, std::max(0.0, (double(i) - low) / (high - low)));
        double extrapolated = base_freq(theta, i);
        double interpolated = extrapolated / factor;
        f[size_t(i)] = interpolated * ramp + extrapolated * (1.0 - ramp);
      }
      break;
    }
    case RopeScaling::Llama3: {
      const double old_context = original_context("llama3");
      const double lo = double(sc.low_freq_factor), hi = double(sc.high_freq_factor);
      TK_CHECK(lo > 0.0 && hi > lo, "rope: llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got ", lo,
               " and ", hi);
      const double low_freq_wavelen = old_context / lo, high_freq_wavelen = old_context / hi;
      for (int64_t i = 0; i < n; ++i) {
        double inv = base_freq(theta, i);
        double wavelen = 2.0 * kPi / inv;
        if (wavelen < high_freq_wavelen) {
          f[size_t(i)] = inv;
        } else if (wavelen > low_freq_wavelen) {
          f[size_t(i)] = inv / factor;
        } else {
          double smooth = (old_context / wavelen - lo) / (hi - lo);
          f[size_t(i)] = (1.0 - smooth) * inv / factor + smooth * inv;
        }
      }
      break;
    }
    default:
      fail("rope: unknown rope_scaling type ", int(sc.type));
  }
  RopeFrequencies r;
  r.inv_freq.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) r.inv_freq[size_t(i)] = float(f[size_t(i)]);
  r.attention_factor = float(attention);
  return r;
}

namespace {

constexpr int64_t kGrain = 32768;       // elements below which a second thread costs more than it saves

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

// c[i] = af * cos(pos * inv_freq[i]), s[i] = sign * af * sin(pos * inv_freq[i]), in double.
void cos_sin(int32_t pos, const float* inv_freq, int64_t n, double af, double sign, float* c, float* s) {
  for (int64_t i = 0; i < n; ++i) {
    double angle = double(pos) * double(inv_freq[i]);
    c[i] = float(af * std::cos(angle));
    s[i] = float(sign * af * std::sin(angle));
  }
}

// ---- one head: o[i] = x[i] c[i] - x[i+n] s[i], o[i+n] = x[i+n] c[i] + x[i] s[i] for i < n ----

void rotate_f32_scalar(const float* x, float* o, const float* c, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float a = x[i], b = x[i + n];
    o[i] = a * c[i] - b * s[i];
    o[i + n] = b * c[i] + a * s[i];
  }
}

void rotate_bf16_scalar(const uint16_t* x, uint16_t* o, const float* c, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float a = bf16_to_f32(x[i]), b = bf16_to_f32(x[i + n]);
    o[i] = f32_to_bf16(a * c[i] - b * s[i]);
    o[i + n] = f32_to_bf16(b * c[i] + a * s[i]);
  }
}

#if TK_SIMD_X86
// ---- AVX2 ------------------------------------------------------------------------------------

TK_AVX2 inline __m256 load_bf16x8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

TK_AVX2 inline void store_bf16x8(uint16_t* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet, nan);
  // packus works within 128-bit lanes: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather qwords 0 and 2.
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

TK_AVX2 void rotate_f32_avx2(const float* x, float* o, const float* c, const float* s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + n + i);
    __m256 vc = _mm256_loadu_ps(c + i), vs = _mm256_loadu_ps(s + i);
    __m256 lo = _mm256_fmsub_ps(a, vc, _mm256_mul_ps(b, vs));
    __m256 hi = _mm256_fmadd_ps(b, vc, _mm256_mul_ps(a, vs));
    _mm256_storeu_ps(o + i, lo);
    _mm256_storeu_ps(o + n + i, hi);
  }
  for (; i < n; ++i) {
    float a = x[i], b = x[i + n];
    o[i] = a * c[i] - b * s[i];
    o[i + n] = b * c[i] + a * s[i];
  }
}

TK_AVX2 void rotate_bf16_avx2(const uint16_t* x, uint16_t* o, const float* c, const float* s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a = load_bf16x8(x + i), b = load_bf16x8(x + n + i);
    __m256 vc = _mm256_loadu_ps(c + i), vs = _mm256_loadu_ps(s + i);
    __m256 lo = _mm256_fmsub_ps(a, vc, _mm256_mul_ps(b, vs));
    __m256 hi = _mm256_fmadd_ps(b, vc, _mm256_mul_ps(a, vs));
    store_bf16x8(o + i, lo);
    store_bf16x8(o + n + i, hi);
  }
  for (; i < n; ++i) {
    float a = bf16_to_f32(x[i]), b = bf16_to_f32(x[i + n]);
    o[i] = f32_to_bf16(a * c[i] - b * s[i]);
    o[i + n] = f32_to_bf16(b * c[i] + a * s[i]);
  }
}

// ---- AVX-512 (masked tails) ------------------------------------------------------------------

TK_AVX512 inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

TK_AVX512 inline void store_bf16x16(uint16_t* p, __m512 v, __mmask16 m) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                          _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

TK_AVX512 void rotate_f32_avx512(const float* x, float* o, const float* c, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, x + i), b = _mm512_maskz_loadu_ps(m, x + n + i);
    __m512 vc = _mm512_maskz_loadu_ps(m, c + i), vs = _mm512_maskz_loadu_ps(m, s + i);
    __m512 lo = _mm512_fmsub_ps(a, vc, _mm512_mul_ps(b, vs));
    __m512 hi = _mm512_fmadd_ps(b, vc, _mm512_mul_ps(a, vs));
    _mm512_mask_storeu_ps(o + i, m, lo);
    _mm512_mask_storeu_ps(o + n + i, m, hi);
  }
}

TK_AVX512 void rotate_bf16_avx512(const uint16_t* x, uint16_t* o, const float* c, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    __m512 a = load_bf16x16(x + i, m), b = load_bf16x16(x + n + i, m);
    __m512 vc = _mm512_maskz_loadu_ps(m, c + i), vs = _mm512_maskz_loadu_ps(m, s + i);
    __m512 lo = _mm512_fmsub_ps(a, vc, _mm512_mul_ps(b, vs));
    __m512 hi = _mm512_fmadd_ps(b, vc, _mm512_mul_ps(a, vs));
    store_bf16x16(o + i, lo, m);
    store_bf16x16(o + n + i, hi, m);
  }
}
#endif

using RotateF32 = void (*)(const float*, float*, const float*, const float*, int64_t);
using RotateBf16 = void (*)(const uint16_t*, uint16_t*, const float*, const float*, int64_t);

void check_args(const char* op, const char* xname, const char* outname, const TensorView& x,
                const TensorView& positions, bool per_batch, const std::vector<float>& inv_freq,
                float attention_factor, const TensorView& out) {
  TK_CHECK(x.device.type == DeviceType::CPU && out.device.type == DeviceType::CPU &&
               positions.device.type == DeviceType::CPU,
           op, ": all tensors must be on the cpu");
  TK_CHECK(x.ndim == 4, op, ": ", xname, " must be [B, T, H, D], got ", describe(x));
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": ", xname, " must be f32 or bf16, got ",
           describe(x));
  TK_CHECK(out.dtype == x.dtype && out.ndim == 4 && std::equal(x.shape, x.shape + 4, out.shape), op, ": ",
           outname, " ", describe(out), " must match ", xname, " ", describe(x));
  TK_CHECK(x.is_contiguous() && out.is_contiguous(), op, ": ", xname, " and ", outname, " must be contiguous");
  const int64_t B = x.shape[0], T = x.shape[1], D = x.shape[3];
  TK_CHECK(D >= 2 && D % 2 == 0, op, ": head dim D must be even and >= 2, got ", describe(x));
  TK_CHECK(int64_t(inv_freq.size()) == D / 2, op, ": inv_freq has ", inv_freq.size(), " entries, expected D/2 = ",
           D / 2);
  TK_CHECK(std::isfinite(attention_factor), op, ": attention_factor must be finite, got ", attention_factor);
  TK_CHECK(positions.dtype == DType::I32 && positions.is_contiguous(), op, ": positions must be contiguous i32, got ",
           describe(positions));
  if (per_batch)
    TK_CHECK(positions.ndim == 2 && positions.shape[0] == B && positions.shape[1] == T, op,
             ": per-batch positions must be [B, T] = [", B, ", ", T, "], got ", describe(positions));
  else
    TK_CHECK(positions.ndim == 1 && positions.shape[0] == T, op, ": shared positions must be [T] = [", T, "], got ",
             describe(positions));
  // In place is fine (each lane reads both halves before writing); a partial overlap is not.
  const char* xb = static_cast<const char*>(x.data);
  const char* ob = static_cast<const char*>(out.data);
  const size_t bytes = x.nbytes();
  TK_CHECK(bytes == 0 || xb == ob || xb + bytes <= ob || ob + bytes <= xb, op, ": ", outname,
           " partially overlaps ", xname);
}

void rope_apply(const char* op, const char* xname, const char* outname, const TensorView& x,
                const TensorView& positions, bool per_batch, const std::vector<float>& inv_freq,
                float attention_factor, double sign, const TensorView& out, ThreadPool& pool) {
  check_args(op, xname, outname, x, positions, per_batch, inv_freq, attention_factor, out);
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3], n = D / 2;
  const int64_t rows = B * T, row_elems = H * D;
  if (rows == 0 || H == 0) return;

  RotateF32 rot_f32 = rotate_f32_scalar;
  RotateBf16 rot_bf16 = rotate_bf16_scalar;
#if TK_SIMD_X86
  switch (level()) {
    case Level::Avx512: rot_f32 = rotate_f32_avx512; rot_bf16 = rotate_bf16_avx512; break;
    case Level::Avx2: rot_f32 = rotate_f32_avx2; rot_bf16 = rotate_bf16_avx2; break;
    case Level::Scalar: break;
  }
#endif
  const bool bf16 = x.dtype == DType::BF16;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* freq = inv_freq.data();
  const double af = double(attention_factor);

  // All heads of row r (a (b, t) pair) with cos c[0, n) and sin s[0, n).
  auto rotate_row = [&](int64_t r, const float* c, const float* s) {
    const int64_t base = r * row_elems;
    if (bf16) {
      const uint16_t* xp = x.ptr<uint16_t>() + base;
      uint16_t* op16 = out.ptr<uint16_t>() + base;
      for (int64_t h = 0; h < H; ++h) rot_bf16(xp + h * D, op16 + h * D, c, s, n);
    } else {
      const float* xp = x.ptr<float>() + base;
      float* op32 = out.ptr<float>() + base;
      for (int64_t h = 0; h < H; ++h) rot_f32(xp + h * D, op32 + h * D, c, s, n);
    }
  };

  if (!per_batch) {
    // Shared positions: threads split t; each position's cos/sin row is evaluated once and applied
    // to all B batch rows at that t. This is the [T, D/2] table built just in time, one row per
    // task step, so there is no separate pass over a T x D table and no allocation of it.
    const int64_t grain = std::max<int64_t>(1, kGrain / (B * row_elems));
    pool.parallel_for(T, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> cs(size_t(2 * n));
      for (int64_t t = t0; t < t1; ++t) {
        cos_sin(pos[t], freq, n, af, sign, cs.data(), cs.data() + n);
        for (int64_t b = 0; b < B; ++b) rotate_row(b * T + t, cs.data(), cs.data() + n);
      }
    });
  } else {
    // Each row has its own position; cos/sin are evaluated per row (shared by its H heads) and
    // reused when consecutive rows repeat a position (padding, or one decoding step per row).
    pool.parallel_for(rows, std::max<int64_t>(1, kGrain / row_elems), [&](int64_t r0, int64_t r1) {
      std::vector<float> cs(size_t(2 * n));
      int64_t have = std::numeric_limits<int64_t>::min();  // the position cs holds; no int32 equals the start
      for (int64_t r = r0; r < r1; ++r) {
        if (have != int64_t(pos[r])) {
          cos_sin(pos[r], freq, n, af, sign, cs.data(), cs.data() + n);
          have = pos[r];
        }
        rotate_row(r, cs.data(), cs.data() + n);
      }
    });
  }
}

}  // namespace

void rope_forward_cpu(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                      const std::vector<float>& inv_freq, float attention_factor, const TensorView& out,
                      ThreadPool& pool) {
  rope_apply("rope_forward", "x", "out", x, positions, positions_per_batch, inv_freq, attention_factor, 1.0, out,
             pool);
}

void rope_backward_cpu(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                       const std::vector<float>& inv_freq, float attention_factor, const TensorView& dx,
                       ThreadPool& pool) {
  // The rotation matrix [[c, -s], [s, c]] is transposed by negating s, i.e. rotating by -angle.
  rope_apply("rope_backward", "dy", "dx", dy, positions, positions_per_batch, inv_freq, attention_factor, -1.0, dx,
             pool);
}

}  // namespace tk
