// Tests of cpu/nf4 against ref/nf4_ref.
//
// - Tables: kNf4Code equals the 16 values of QLoRA / bitsandbytes typed here independently (and
//   the quantile construction in double within 2e-7); kNf4Thresholds are the fp32-rounded
//   midpoints; kDynamicMap8 has the structure of create_dynamic_map and matches its formula in
//   double within fp32 rounding.
// - Quantize: bit for bit against the brute-force reference (packed bytes and fp32 absmax) on
//   random and adversarial data (codes, exact and fp32-rounded midpoints and their neighbours,
//   zeros, a zero block, negative-only blocks, ragged blocks), numel 1, 97, 1025, 64*257, f32
//   and bf16 weights, several block sizes, with and without double quantization.
// - Dequantize, on every ISA level present: without double quant each output is one fp32 product,
//   so it equals the double reference rounded to the output dtype exactly; with it, NMSE <= 1e-12
//   against the double decode. All ISA paths must also agree bit for bit. Outputs are guarded.
// - Round trip of 1M N(0,1) values at block 64: mean absolute error measured 0.07270 (0.07278 with double
//   quant) -- asserted in [0.065, 0.080]: the bound fails on a wrong table, wrong nibble order or a
//   wrong scale, and allows the spread of other seeds (the figure moves by < 1e-4 between seeds).
// - Double quantization: absmax relative error < 1e-2, 8-bit codes equal the brute-force nearest
//   map entry, byte counts equal the bitsandbytes formula.
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/isa.h"
#include "../cpu/nf4.h"
#include "../ref/nf4_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

// The NF4 values as printed in bitsandbytes (functional.py get_4bit_type / the QLoRA release).
const double kPaperNf4[16] = {
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};

std::vector<CpuIsa> isa_levels() {
  std::vector<CpuIsa> r;
  for (CpuIsa i : {CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512, CpuIsa::Avx512Bf16})
    if (i <= detected_isa()) r.push_back(i);
  return r;
}

template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (CpuIsa isa : isa_levels()) {
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

// The quantized buffers of one tensor, each guarded.
struct Quant {
  Quant(int64_t numel, int64_t block, bool dq) : layout(nf4_layout(numel, block, dq)) {
    packed.reset(new Guarded(size_t(std::max<int64_t>(1, layout.packed_bytes))));
    absmax.reset(new Guarded(size_t(std::max<int64_t>(1, layout.absmax_bytes))));
    scale2.reset(new Guarded(size_t(std::max<int64_t>(4, layout.scale2_bytes))));
    offset.reset(new Guarded(4));
  }
  Nf4Layout layout;
  std::unique_ptr<Guarded> packed, absmax, scale2, offset;
  Nf4Out out() const {
    Nf4Out o;
    o.packed = static_cast<uint8_t*>(packed->data());
    if (layout.double_quant) {
      o.qabsmax = static_cast<uint8_t*>(absmax->data());
      o.scale2 = static_cast<float*>(scale2->data());
      o.offset = static_cast<float*>(offset->data());
    } else {
      o.absmax = static_cast<float*>(absmax->data());
    }
    return o;
  }
  Nf4In in() const {
    Nf4Out o = out();
    Nf4In i;
    i.packed = o.packed;
    i.absmax = o.absmax;
    i.qabsmax = o.qabsmax;
    i.scale2 = o.scale2;
    i.offset = o.offset;
    return i;
  }
  bool intact() const { return packed->intact() && absmax->intact() && scale2->intact() && offset->intact(); }
  std::vector<uint8_t> bytes() const {
    const uint8_t* p = static_cast<const uint8_t*>(packed->data());
    return std::vector<uint8_t>(p, p + layout.packed_bytes);
  }
  std::vector<float> absmax_f32() const {
    const float* p = static_cast<const float*>(absmax->data());
    return std::vector<float>(p, p + layout.nblocks);
  }
};

// A weight in a buffer of dtype t; values() are what the kernel reads.
struct Weight {
  Weight(const std::vector<double>& v, DType t) : dtype(t), n(v.size()), mem(new Guarded(std::max<size_t>(1, v.size()) * dtype_size(t))) {
    from_double(v, mem->data(), t);
  }
  DType dtype;
  size_t n;
  std::unique_ptr<Guarded> mem;
  std::vector<double> values() const { return to_double(mem->data(), dtype, n); }
};

float next_up(float x) { return std::nextafter(x, 2.0f); }
float next_down(float x) { return std::nextafter(x, -2.0f); }

// Adversarial values (as multiples of absmax = 1): every code, every exact midpoint, every fp32
// threshold and its neighbours, signed zeros, values just inside +-1.
std::vector<double> adversarial_unit_values() {
  std::vector<double> v;
  for (int k = 0; k < 16; ++k) v.push_back(kPaperNf4[k]);
  for (int k = 0; k < 15; ++k) {
    const double mid = 0.5 * (kPaperNf4[k] + kPaperNf4[k + 1]);
    const float m = float(mid);
    for (float x : {m, next_up(m), next_down(m), next_up(next_up(m)), next_down(next_down(m))}) v.push_back(x);
    v.push_back(mid);  // rounded to the weight dtype by the buffer
  }
  for (int k = 0; k < 15; ++k) {
    const float t = kNf4Thresholds[k];
    for (float x : {t, next_up(t), next_down(t)}) v.push_back(x);
  }
  v.push_back(0.0);
  v.push_back(-0.0);
  v.push_back(next_down(1.0f));
  v.push_back(-double(next_down(1.0f)));
  return v;
}

// Builds the adversarial tensor: blocks of 64 with a +-1 anchor (absmax exactly 1, so the
// normalized value equals the stored value), a zero block, negative-only blocks, a ragged end.
std::vector<double> adversarial_tensor() {
  std::vector<double> unit = adversarial_unit_values(), w;
  size_t u = 0;
  for (int b = 0; b < 6; ++b) {
    w.push_back(b % 2 ? -1.0 : 1.0);
    for (int i = 1; i < 64; ++i) w.push_back(unit[u++ % unit.size()]);
  }
  for (int i = 0; i < 64; ++i) w.push_back(0.0);                              // zero block
  for (int i = 0; i < 64; ++i) w.push_back(-0.01 * double(1 + (i * 37) % 64)); // negative only
  for (int i = 0; i < 64; ++i) w.push_back(i == 5 ? -3.0 : -1e-3 * i);        // negative, absmax from a negative
  for (int i = 0; i < 64; ++i) w.push_back(i == 9 ? 1e-30 : 0.0);             // tiny but normal absmax
  for (int i = 0; i < 37; ++i) w.push_back(unit[size_t(i) * 3 % unit.size()] * 0.5);  // ragged block of 37
  return w;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  return a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// Quantizes w (as dtype t) and compares with the reference bit for bit; with double quant also
// the packed codes (identical to the plain ones) and the 8-bit absmax codes.
void check_quantize(Context& ctx, const std::string& name, const std::vector<double>& wv, DType t, int64_t block) {
  Weight w(wv, t);
  std::vector<double> vals = w.values();
  ref::Nf4RefQuant r = ref::nf4_quantize_ref(vals, block);
  const int64_t numel = int64_t(wv.size());
  char what[160];
  std::snprintf(what, sizeof what, "nf4 quantize %s %s numel %lld block %lld", name.c_str(), dtype_name(t),
                (long long)numel, (long long)block);
  Quant q(numel, block, false);
  nf4_quantize_cpu(w.mem->data(), t, numel, block, false, q.out(), ctx.pool);
  ctx.check(q.intact() && w.mem->intact(), std::string(what) + ": guards intact");
  std::vector<uint8_t> got = q.bytes();
  size_t bad = 0;
  for (size_t j = 0; j < got.size(); ++j) bad += got[j] != r.packed[j];
  if (!ctx.check(bad == 0, std::string(what) + ": packed bytes equal the reference")) {
    for (size_t j = 0; j < got.size(); ++j)
      if (got[j] != r.packed[j]) {
        std::printf("    first mismatch byte %zu: got 0x%02x want 0x%02x (values %.9g %.9g)\n", j, got[j], r.packed[j],
                    vals[2 * j], 2 * j + 1 < vals.size() ? vals[2 * j + 1] : 0.0);
        break;
      }
  }
  ctx.check(same_bits(q.absmax_f32(), r.absmax), std::string(what) + ": absmax equal the reference");

  Quant d(numel, block, true);
  nf4_quantize_cpu(w.mem->data(), t, numel, block, true, d.out(), ctx.pool);
  ctx.check(d.intact(), std::string(what) + " dq: guards intact");
  ctx.check(d.bytes() == r.packed, std::string(what) + " dq: packed bytes equal the reference");
}

TK_TEST(nf4_code_table) {
  for (int k = 0; k < 16; ++k) {
    ctx.check(double(kNf4Code[k]) == kPaperNf4[k], "nf4 code " + std::to_string(k) + " equals the paper's value");
  }
  std::vector<double> q = ref::nf4_code_from_quantiles();
  double worst = 0;
  for (int k = 0; k < 16; ++k) worst = std::max(worst, std::fabs(q[size_t(k)] - double(kNf4Code[k])));
  ctx.check(worst < 2e-7, "nf4 codes match the N(0,1) quantile construction within 2e-7");
  // Each threshold is one of the (at most two) fp32 values nearest the exact midpoint: bitsandbytes
  // wrote the double midpoint in decimal and compiled it as an fp32 literal.
  std::string up;
  for (int k = 0; k < 15; ++k) {
    const double mid = 0.5 * (double(kNf4Code[k]) + double(kNf4Code[k + 1]));  // exact in double
    const float t = kNf4Thresholds[k];
    const double half_ulp = 0.5 * (double(next_up(std::fabs(t))) - std::fabs(double(t)));
    ctx.check(std::fabs(double(t) - mid) <= half_ulp, "nf4 threshold " + std::to_string(k) + " is an fp32 rounding of the midpoint");
    if (double(t) > mid) up += " " + std::to_string(k);
  }
  std::printf("  nf4 thresholds above the exact midpoint (n equal to them takes the lower, farther code):%s\n", up.c_str());
  ctx.check(ref::nf4_nearest_ref(0.0f) == 7 && ref::nf4_nearest_ref(1.0f) == 15 && ref::nf4_nearest_ref(-1.0f) == 0,
            "nf4 reference codes of 0, 1, -1");
}

TK_TEST(nf4_dynamic_map) {
  bool sorted = true, sym = true;
  for (int k = 1; k < 256; ++k) sorted = sorted && kDynamicMap8[k - 1] < kDynamicMap8[k];
  for (int k = 1; k < 128; ++k) sym = sym && kDynamicMap8[127 - k] == -kDynamicMap8[127 + k];
  ctx.check(sorted, "dynamic map strictly increasing");
  ctx.check(sym, "dynamic map symmetric about index 127");
  ctx.check(kDynamicMap8[127] == 0.0f && kDynamicMap8[255] == 1.0f, "dynamic map [127] = 0, [255] = 1");
  // The formula in double: for i in 0..6, 2^i means of linspace(0.1, 1, 2^i + 1) times 10^(i-6).
  std::vector<double> pos;
  for (int i = 0; i < 7; ++i) {
    const int n = (1 << i) + 1;
    for (int j = 0; j + 1 < n; ++j) {
      const double a = 0.1 + 0.9 * j / (n - 1), b = 0.1 + 0.9 * (j + 1) / (n - 1);
      pos.push_back(std::pow(10.0, i - 6) * 0.5 * (a + b));
    }
  }
  std::sort(pos.begin(), pos.end());
  double worst = 0;
  for (int k = 0; k < 127; ++k) worst = std::max(worst, std::fabs(double(kDynamicMap8[128 + k]) / pos[size_t(k)] - 1.0));
  ctx.check(pos.size() == 127 && worst < 5e-7, "dynamic map matches create_dynamic_map's formula within fp32 rounding");
}

TK_TEST(nf4_layout_bytes) {
  const int64_t n = 4096 * 4096;
  Nf4Layout l = nf4_layout(n, 64, true);
  ctx.check(l.nblocks == n / 64 && l.nblocks2 == n / (64 * 256), "nf4 layout block counts [4096, 4096]");
  ctx.check(l.total_bytes() == n / 2 + n / 64 + 4 * (n / (256 * 64)) + 4,
            "nf4 layout bytes = 0.5/param + 1 per 64 + 4 per 16384 + 4 (offset)");
  Nf4Layout p = nf4_layout(n, 64, false);
  ctx.check(p.total_bytes() == n / 2 + 4 * (n / 64), "nf4 layout bytes without double quant = 0.5/param + 4 per 64");
  Nf4Layout r = nf4_layout(97, 64, true);
  ctx.check(r.nblocks == 2 && r.packed_bytes == 49 && r.absmax_bytes == 2 && r.nblocks2 == 1 && r.total_bytes() == 49 + 2 + 4 + 4,
            "nf4 layout ragged numel 97");
  Nf4Layout z = nf4_layout(0, 64, true);
  ctx.check(z.nblocks == 0 && z.packed_bytes == 0 && z.total_bytes() == 4, "nf4 layout numel 0");
}

TK_TEST(nf4_quantize_matches_ref) {
  const DType types[] = {DType::F32, DType::BF16};
  for (DType t : types) {
    for (int64_t n : {int64_t(1), int64_t(97), int64_t(1025), int64_t(64 * 257)}) {
      std::vector<double> v = randn(size_t(n), 1000 + uint64_t(n));
      check_quantize(ctx, "randn", v, t, 64);
    }
    check_quantize(ctx, "randn x1e-3", [] { auto v = randn(4096, 7); for (double& x : v) x *= 1e-3; return v; }(), t, 64);
    check_quantize(ctx, "uniform", uniform(5000, 8, -2.0, 2.0), t, 64);
    for (int64_t block : {int64_t(2), int64_t(32), int64_t(128), int64_t(4096)})
      check_quantize(ctx, "randn", randn(9001, 9 + uint64_t(block)), t, block);
    check_quantize(ctx, "adversarial", adversarial_tensor(), t, 64);
    check_quantize(ctx, "zeros", std::vector<double>(200, 0.0), t, 64);
    check_quantize(ctx, "negative only", [] { auto v = uniform(333, 10, -5.0, -0.5); return v; }(), t, 64);
  }
  // Hand-checked bytes: [1, -1, 0, 0.5] at block 4 -> codes 15, 0, 7, 12 (0.5 lies between
  // 0.4407 and 0.5626, nearer the first) -> 0xF0 0x7C.
  Weight w({1.0, -1.0, 0.0, 0.5}, DType::F32);
  Quant q(4, 4, false);
  nf4_quantize_cpu(w.mem->data(), DType::F32, 4, 4, false, q.out(), ctx.pool);
  ctx.check(q.bytes() == std::vector<uint8_t>({0xF0, 0x7C}), "nf4 nibble order: element 2j in the high nibble");
  // Odd numel pads the low nibble with 7.
  Weight o({-1.0}, DType::F32);
  Quant qo(1, 64, false);
  nf4_quantize_cpu(o.mem->data(), DType::F32, 1, 64, false, qo.out(), ctx.pool);
  ctx.check(qo.bytes() == std::vector<uint8_t>({0x07}), "nf4 numel 1 pads with the code of 0");
}

TK_TEST(nf4_dequantize_matches_ref) {
  struct Case { std::string name; std::vector<double> w; int64_t block; };
  std::vector<Case> cases = {
      {"randn 1", randn(1, 21), 64},       {"randn 97", randn(97, 22), 64},
      {"randn 1025", randn(1025, 23), 64}, {"randn 64*257", randn(64 * 257, 24), 64},
      {"adversarial", adversarial_tensor(), 64}, {"randn 9001 block 2", randn(9001, 25), 2},
      {"randn 9001 block 46", randn(9001, 26), 46}, {"randn 70000 block 4096", randn(70000, 27), 4096},
  };
  for (const Case& c : cases) {
    const int64_t n = int64_t(c.w.size());
    for (bool dq : {false, true}) {
      Weight w(c.w, DType::F32);
      Quant q(n, c.block, dq);
      nf4_quantize_cpu(w.mem->data(), DType::F32, n, c.block, dq, q.out(), ctx.pool);
      std::vector<double> amax;
      if (dq) {
        const uint8_t* qa = static_cast<const uint8_t*>(q.absmax->data());
        const float* s2 = static_cast<const float*>(q.scale2->data());
        amax = ref::nf4_absmax_dq_ref(std::vector<uint8_t>(qa, qa + q.layout.nblocks),
                                      std::vector<float>(s2, s2 + q.layout.nblocks2), *static_cast<const float*>(q.offset->data()));
      } else {
        for (float a : q.absmax_f32()) amax.push_back(a);
      }
      std::vector<double> want = ref::nf4_dequantize_ref(q.bytes(), amax, n, c.block);
      for (DType t : {DType::F32, DType::BF16}) {
        std::vector<double> want_t = want, first;
        if (!dq) {  // one fp32 product: the reference rounded to fp32, then to the output dtype
          for (double& x : want_t) x = double(float(x));
          std::vector<uint16_t> tmp(want_t.size());
          if (t == DType::BF16) { from_double(want_t, tmp.data(), t); want_t = to_double(tmp.data(), t, tmp.size()); }
        }
        for_each_isa([&](const std::string& isa) {
          Guarded out(size_t(n) * dtype_size(t));
          out.fill(0xEE);
          nf4_dequantize_cpu(q.in(), n, c.block, dq, out.data(), t, ctx.pool);
          std::vector<double> got = to_double(out.data(), t, size_t(n));
          const std::string what = "nf4 dequantize " + c.name + (dq ? " dq " : " ") + dtype_name(t) + " " + isa;
          ctx.check(out.intact(), what + ": guards intact");
          if (!dq) {
            size_t bad = 0;
            for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want_t[i];
            ctx.check(bad == 0, what + ": equals the reference exactly");
          } else {
            ctx.check_nmse(what, got, want_t, t == DType::F32 ? 1e-12 : 1e-4);
          }
          if (first.empty()) first = got;
          else ctx.check(got == first, what + ": same bits as the portable path");
        });
      }
    }
  }
}

TK_TEST(nf4_zero_block_dequantizes_to_zero) {
  std::vector<double> w = randn(64 * 600, 31);
  for (int i = 64 * 7; i < 64 * 8; ++i) w[size_t(i)] = 0.0;  // block 7 is zero
  for (bool dq : {false, true}) {
    Weight wt(w, DType::F32);
    Quant q(int64_t(w.size()), 64, dq);
    nf4_quantize_cpu(wt.mem->data(), DType::F32, int64_t(w.size()), 64, dq, q.out(), ctx.pool);
    for_each_isa([&](const std::string& isa) {
      std::vector<float> out(w.size());
      nf4_dequantize_cpu(q.in(), int64_t(w.size()), 64, dq, out.data(), DType::F32, ctx.pool);
      bool zero = true;
      for (int i = 64 * 7; i < 64 * 8; ++i) zero = zero && out[size_t(i)] == 0.0f;
      ctx.check(zero, std::string("nf4 zero block -> zeros") + (dq ? " dq " : " ") + isa);
    });
  }
}

TK_TEST(nf4_round_trip_error) {
  const int64_t n = int64_t(1) << 20;
  std::vector<double> v = randn(size_t(n), 4242);
  Weight w(v, DType::F32);
  for (bool dq : {false, true}) {
    Quant q(n, 64, dq);
    nf4_quantize_cpu(w.mem->data(), DType::F32, n, 64, dq, q.out(), ctx.pool);
    std::vector<float> out(static_cast<size_t>(n));
    nf4_dequantize_cpu(q.in(), n, 64, dq, out.data(), DType::F32, ctx.pool);
    double mae = 0, mse = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = double(out[size_t(i)]) - v[size_t(i)];
      mae += std::fabs(e);
      mse += e * e;
    }
    mae /= double(n);
    mse /= double(n);
    std::printf("  nf4 round trip N(0,1) 1M block 64%s: mean abs error %.5f, rmse %.5f\n", dq ? " dq" : "", mae, std::sqrt(mse));
    ctx.check(mae > 0.065 && mae < 0.080, std::string("nf4 round-trip MAE of N(0,1) in [0.065, 0.080]") + (dq ? " dq" : ""));
  }
}

TK_TEST(nf4_double_quant) {
  for (int64_t n : {int64_t(64), int64_t(97), int64_t(64 * 257), int64_t(64 * 256 * 3 + 100), int64_t(1) << 20}) {
    std::vector<double> v = randn(size_t(n), 77 + uint64_t(n));
    for (size_t i = 0; i < v.size(); ++i) v[i] *= 0.02 * (1.0 + double(i % 1000) / 250.0);  // uneven scales
    Weight w(v, DType::F32);
    Quant plain(n, 64, false), dq(n, 64, true);
    nf4_quantize_cpu(w.mem->data(), DType::F32, n, 64, false, plain.out(), ctx.pool);
    nf4_quantize_cpu(w.mem->data(), DType::F32, n, 64, true, dq.out(), ctx.pool);
    ctx.check(dq.intact(), "nf4 dq guards intact numel " + std::to_string(n));
    std::vector<float> exact = plain.absmax_f32(), got(size_t(dq.layout.nblocks));
    nf4_absmax_cpu(dq.in(), dq.layout.nblocks, true, got.data());
    // The format's bound: half the widest gap of the map (0.0140625 / 2, in the top decade) times
    // the 256-block's scale, plus fp32 rounding.
    double max_gap = 0;
    for (int k = 1; k < 256; ++k) max_gap = std::max(max_gap, double(kDynamicMap8[k]) - double(kDynamicMap8[k - 1]));
    const float* sc = static_cast<const float*>(dq.scale2->data());
    double worst = 0, mean = 0;
    bool within = true;
    for (size_t b = 0; b < exact.size(); ++b) {
      const double err = std::fabs(double(got[b]) - exact[b]);
      worst = std::max(worst, err / exact[b]);
      within = within && err <= 0.5 * max_gap * sc[b / 256] * (1 + 1e-5) + 1e-6 * exact[b];
      mean += exact[b];
    }
    mean /= double(exact.size());
    ctx.check(within, "nf4 dq absmax error <= half a map gap x scale2, numel " + std::to_string(n));
    // Weights of one scale (unit-variance rows): the absmaxes are close to their mean and the
    // relative error is small.
    Weight u(randn(size_t(n), 5 + uint64_t(n)), DType::F32);
    Quant up(n, 64, false), uq(n, 64, true);
    nf4_quantize_cpu(u.mem->data(), DType::F32, n, 64, false, up.out(), ctx.pool);
    nf4_quantize_cpu(u.mem->data(), DType::F32, n, 64, true, uq.out(), ctx.pool);
    std::vector<float> ue = up.absmax_f32(), ug(ue.size());
    nf4_absmax_cpu(uq.in(), uq.layout.nblocks, true, ug.data());
    double uworst = 0;
    for (size_t b = 0; b < ue.size(); ++b) uworst = std::max(uworst, std::fabs(double(ug[b]) - ue[b]) / ue[b]);
    std::printf("  nf4 dq absmax max relative error, numel %lld: N(0,1) %.5f, rows scaled 1..5x %.5f\n", (long long)n, uworst, worst);
    ctx.check(uworst < 1e-2, "nf4 dq absmax relative error < 1e-2 for N(0,1), numel " + std::to_string(n));
    ctx.check(std::fabs(*static_cast<const float*>(dq.offset->data()) - mean) <= 1e-6 * mean, "nf4 dq offset = mean absmax");
    // 8-bit codes: the brute-force nearest map entry of (absmax - offset) / scale2.
    const float off = *static_cast<const float*>(dq.offset->data());
    const float* s2 = static_cast<const float*>(dq.scale2->data());
    const uint8_t* qa = static_cast<const uint8_t*>(dq.absmax->data());
    size_t bad = 0;
    for (size_t b = 0; b < exact.size(); ++b) {
      const float c = exact[b] - off;
      if (!(s2[b / 256] >= FLT_MIN)) {  // all absmaxes of the 256-block equal the mean: code of 0.0
        bad += qa[b] != 127;
        continue;
      }
      const float norm = c * (1.0f / s2[b / 256]);
      bad += qa[b] != ref::dyn8_nearest_ref(norm);
    }
    ctx.check(bad == 0, "nf4 dq 8-bit codes are the nearest dynamic-map entries, numel " + std::to_string(n));
  }
}

TK_TEST(nf4_thread_count_invariant) {
  std::vector<double> v = randn(64 * 1000 + 7, 55);
  Weight w(v, DType::BF16);
  const int64_t n = int64_t(v.size());
  ThreadPool one(1);
  Quant a(n, 64, true), b(n, 64, true);
  nf4_quantize_cpu(w.mem->data(), DType::BF16, n, 64, true, a.out(), one);
  nf4_quantize_cpu(w.mem->data(), DType::BF16, n, 64, true, b.out(), ctx.pool);
  ctx.check(a.bytes() == b.bytes() && std::memcmp(a.absmax->data(), b.absmax->data(), size_t(a.layout.nblocks)) == 0 &&
                std::memcmp(a.scale2->data(), b.scale2->data(), size_t(a.layout.scale2_bytes)) == 0 &&
                std::memcmp(a.offset->data(), b.offset->data(), 4) == 0,
            "nf4 quantize independent of the thread count");
}

TK_TEST(nf4_rejects_bad_arguments) {
  auto throws = [](auto&& fn) {
    try { fn(); } catch (const Error&) { return true; }
    return false;
  };
  float w[4] = {1, 2, 3, 4};
  uint8_t packed[2];
  float absmax[1];
  Nf4Out o;
  o.packed = packed;
  o.absmax = absmax;
  ctx.check(throws([&] { nf4_quantize_cpu(w, DType::F32, 4, 3, false, o, ctx.pool); }), "nf4 rejects an odd block size");
  ctx.check(throws([&] { nf4_quantize_cpu(w, DType::F32, 4, 0, false, o, ctx.pool); }), "nf4 rejects block size 0");
  ctx.check(throws([&] { nf4_quantize_cpu(w, DType::I32, 4, 64, false, o, ctx.pool); }), "nf4 rejects an i32 weight");
  ctx.check(throws([&] { nf4_quantize_cpu(w, DType::F32, 4, 64, true, o, ctx.pool); }), "nf4 dq needs its outputs");
  ctx.check(throws([&] { nf4_quantize_cpu(w, DType::F32, -1, 64, false, o, ctx.pool); }), "nf4 rejects numel < 0");
  Nf4In in;
  in.packed = packed;
  in.absmax = absmax;
  ctx.check(throws([&] { nf4_dequantize_cpu(in, 4, 64, false, w, DType::F16, ctx.pool); }), "nf4 rejects an f16 output");
  ctx.check(throws([&] { nf4_dequantize_cpu(in, 4, 64, true, w, DType::F32, ctx.pool); }), "nf4 dq dequantize needs its inputs");
  ctx.check(!throws([&] { nf4_dequantize_cpu(in, 0, 64, false, nullptr, DType::F32, ctx.pool); }), "nf4 numel 0 is a no-op");
}

// ==== --perf ==========================================================================================

TK_TEST(nf4_perf) {
  if (!ctx.opt.perf) return;
  const int64_t n = int64_t(4096) * 4096;
  std::vector<double> v = randn(size_t(n), 99);
  Weight w(v, DType::BF16);
  Quant q(n, 64, true);
  std::printf("  perf threads %d\n", ctx.pool.size());
  double tq = time_median([&] { nf4_quantize_cpu(w.mem->data(), DType::BF16, n, 64, true, q.out(), ctx.pool); }, 3);
  std::printf("  perf nf4 quantize bf16 [4096, 4096] dq       %8.2f ms %8.1f GB/s (input bytes)\n", tq * 1e3, double(n) * 2 / tq / 1e9);
  std::vector<float> of(static_cast<size_t>(n));
  std::vector<uint16_t> ob(static_cast<size_t>(n));
  for_each_isa([&](const std::string& isa) {
    double t = time_median([&] { nf4_dequantize_cpu(q.in(), n, 64, true, of.data(), DType::F32, ctx.pool); });
    std::printf("  perf nf4 dequantize [4096, 4096] dq -> f32  %-11s %8.2f ms %8.1f GB/s (output bytes)\n", isa.c_str(), t * 1e3,
                double(n) * 4 / t / 1e9);
    t = time_median([&] { nf4_dequantize_cpu(q.in(), n, 64, true, ob.data(), DType::BF16, ctx.pool); });
    std::printf("  perf nf4 dequantize [4096, 4096] dq -> bf16 %-11s %8.2f ms %8.1f GB/s (output bytes)\n", isa.c_str(), t * 1e3,
                double(n) * 2 / t / 1e9);
  });
}

}  // namespace
