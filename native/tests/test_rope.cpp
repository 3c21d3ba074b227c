// Tests of cpu/rope against ref/rope_ref.
//
// - Inverse frequencies: every rope_scaling type (and its optional fields) against the reference's
//   independent double computation, elementwise relative error < 1e-6 (both round to fp32, so
//   they agree to an ulp, 6e-8), plus values worked out by hand from the HF formulas.
// - Forward and backward on odd shapes (B = 2, T in {1, 97}, H in {1, 3}, D in {2, 64, 130}: D/2 = 65
//   is no multiple of any SIMD width, D = 2 is a single pair), shared and per-batch positions, on
//   every ISA level present, into guarded buffers. Expected error:
//   * f32: the kernel rounds cos/sin (computed in double) to fp32 and does two fp32 multiply-adds,
//     a relative error of a few 2^-24 per element, so NMSE ~ 1e-14; the bound is 1e-11.
//   * bf16: input values are exact; the one rounding to bf16 on store has relative error at most
//     u = 2^-8, so NMSE(got, ref) <= 2^-16 (1.5e-5) is a hard bound. Tighter: against the
//     reference itself rounded to bf16, only the rare elements whose fp32 result lies on the
//     other side of a rounding boundary than the exact value differ, by one bf16 ulp; with fp32
//     errors ~2^-23 relative that is a fraction ~2^-23 / 2^-8 of elements each contributing
//     ~2^-16 relative squared, i.e. NMSE ~ 1e-9; the bound is 1e-7.
// - Algebra: backward(forward(x)) = attention_factor^2 x; in-place equals out-of-place.
// Modes: default runs the above, --grad checks rope_backward against central differences of
// rope_forward, --perf prints GB/s for B = 1, T = 4096, H = 32, D = 128.
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/isa.h"
#include "../cpu/rope.h"
#include "../ref/rope_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

bool correctness_mode(const Context& ctx) { return !ctx.opt.perf && !ctx.opt.grad; }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// A contiguous tensor in a guarded buffer.
struct Buf {
  Buf(Shape s, DType t) : shape(std::move(s)), dtype(t), mem(new Guarded(size_t(numel(shape)) * dtype_size(t))) {}
  Shape shape;
  DType dtype;
  std::unique_ptr<Guarded> mem;
  int64_t n() const { return numel(shape); }
  TensorView view() const { return make_view(mem->data(), dtype, Device{}, shape); }
  std::vector<double> values() const { return to_double(mem->data(), dtype, size_t(n())); }
  bool intact() const { return mem->intact(); }
  void set(const std::vector<double>& v) { from_double(v, mem->data(), dtype); }
};

std::vector<CpuIsa> isa_levels() {
  std::vector<CpuIsa> r;
  for (CpuIsa i : {CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512})
    if (i <= detected_isa()) r.push_back(i);
  return r;
}

// Runs fn once per ISA level and restores the active level afterwards.
template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (CpuIsa isa : isa_levels()) {
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

std::vector<double> round_to(DType t, const std::vector<double>& v) {
  std::vector<uint16_t> tmp(v.size() * 2);
  from_double(v, tmp.data(), t);
  return to_double(tmp.data(), t, v.size());
}

struct NamedScaling {
  const char* name;
  double theta;
  RopeScaling s;
  int64_t seq_len;
};

RopeScaling make(RopeScaling::Type type, float factor) {
  RopeScaling s;
  s.type = type;
  s.factor = factor;
  return s;
}

// Every type and the optional fields each one reads.
std::vector<NamedScaling> scaling_cases() {
  std::vector<NamedScaling> r;
  r.push_back({"default theta 1e4", 10000.0, RopeScaling{}, 0});
  r.push_back({"default theta 1e6 (ABF)", 1e6, RopeScaling{}, 0});
  r.push_back({"linear x4", 10000.0, make(RopeScaling::Linear, 4.0f), 0});
  r.push_back({"linear x0.5", 10000.0, make(RopeScaling::Linear, 0.5f), 0});
  for (int64_t len : {100, 2048, 2049, 5000, 16384}) {
    RopeScaling s = make(RopeScaling::Dynamic, 2.0f);
    s.max_position_embeddings = 2048;
    r.push_back({"dynamic x2 max 2048", 10000.0, s, len});
  }
  {
    RopeScaling s = make(RopeScaling::Yarn, 4.0f);  // Qwen2.5 style
    s.original_max_position_embeddings = 32768;
    r.push_back({"yarn x4 orig 32768 theta 1e6", 1e6, s, 0});
  }
  {
    RopeScaling s = make(RopeScaling::Yarn, 40.0f);  // DeepSeek-V3 style
    s.original_max_position_embeddings = 4096;
    s.mscale = 1.0f;
    s.mscale_all_dim = 1.0f;
    s.beta_fast = 32;
    s.beta_slow = 1;
    r.push_back({"yarn x40 mscale 1/1 orig 4096", 10000.0, s, 0});
    s.mscale_all_dim = 0.707f;
    r.push_back({"yarn x40 mscale 1/0.707", 10000.0, s, 0});
    s.mscale_all_dim = 0.0f;  // a lone mscale is ignored
    r.push_back({"yarn x40 mscale only", 10000.0, s, 0});
  }
  {
    RopeScaling s = make(RopeScaling::Yarn, 8.0f);
    s.max_position_embeddings = 4096;  // original_max_position_embeddings falls back to it
    s.beta_fast = 16;
    s.beta_slow = 2;
    r.push_back({"yarn x8 beta 16/2 via max_pos", 10000.0, s, 0});
    s.truncate = false;
    r.push_back({"yarn x8 beta 16/2 no truncate", 10000.0, s, 0});
    s.attention_factor = 1.5f;
    r.push_back({"yarn x8 attention_factor 1.5", 10000.0, s, 0});
  }
  {
    RopeScaling s = make(RopeScaling::Yarn, 0.5f);  // factor <= 1: mscale 1
    s.original_max_position_embeddings = 2048;
    r.push_back({"yarn x0.5", 10000.0, s, 0});
  }
  {
    RopeScaling s = make(RopeScaling::Llama3, 8.0f);  // Llama 3.1
    s.low_freq_factor = 1.0f;
    s.high_freq_factor = 4.0f;
    s.original_max_position_embeddings = 8192;
    r.push_back({"llama3 x8 1/4 orig 8192", 500000.0, s, 0});
    s.factor = 32.0f;  // Llama 3.2
    r.push_back({"llama3 x32 1/4 orig 8192", 500000.0, s, 0});
    s.low_freq_factor = 2.0f;
    s.high_freq_factor = 3.0f;
    s.original_max_position_embeddings = 1024;
    r.push_back({"llama3 x32 2/3 orig 1024 theta 1e4", 10000.0, s, 0});
  }
  return r;
}

}  // namespace

TK_TEST(rope_inv_freq_vs_reference) {
  if (!correctness_mode(ctx)) return;
  for (const NamedScaling& c : scaling_cases())
    for (int64_t D : {2, 4, 64, 128, 130}) {
      RopeFrequencies got = rope_inv_freq(D, c.theta, c.s, c.seq_len);
      ref::RopeFrequencies want = ref::rope_inv_freq(D, c.theta, c.s, c.seq_len);
      double worst = 0;
      bool sized = int64_t(got.inv_freq.size()) == D / 2 && want.inv_freq.size() == got.inv_freq.size();
      for (size_t i = 0; sized && i < got.inv_freq.size(); ++i)
        worst = std::max(worst, std::fabs(double(got.inv_freq[i]) - want.inv_freq[i]) / want.inv_freq[i]);
      double af_err = std::fabs(double(got.attention_factor) - want.attention_factor) / want.attention_factor;
      char what[200];
      std::snprintf(what, sizeof what, "inv_freq %s D=%lld seq_len %lld: max rel err %.3g, attention %.3g", c.name,
                    (long long)D, (long long)c.seq_len, worst, af_err);
      ctx.check(sized && worst < 1e-6 && af_err < 1e-6, what);
    }
}

TK_TEST(rope_inv_freq_known_values) {
  if (!correctness_mode(ctx)) return;
  auto near = [&](const char* what, double got, double want) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: %.9g, expected %.9g", what, got, want);
    ctx.check(std::fabs(got - want) <= 1e-6 * std::fabs(want), buf);
  };
  // Default, theta 10000, D 128: inv_freq[i] = 10000^(-2i/128), so inv_freq[1] = 10^(-4/64)
  // = 10^-0.0625 = exp(-0.0625 ln 10) = exp(-0.14391156831) = 0.86596432336; inv_freq[0] = 1.
  RopeFrequencies d = rope_inv_freq(128, 10000.0, RopeScaling{}, 0);
  near("default inv_freq[0]", d.inv_freq[0], 1.0);
  near("default inv_freq[1]", d.inv_freq[1], 0.8659643233600653);
  near("default inv_freq[63]", d.inv_freq[63], std::pow(10000.0, -126.0 / 128.0));
  near("default attention factor", d.attention_factor, 1.0);

  // Linear x4 divides: inv_freq[1] = 0.86596432336 / 4 = 0.21649108084.
  near("linear x4 inv_freq[1]", rope_inv_freq(128, 10000.0, make(RopeScaling::Linear, 4.0f), 0).inv_freq[1],
       0.2164910808400163);

  // Llama 3.1: theta 500000, D 128, factor 8, low 1, high 4, orig 8192.
  // f_i = 500000^(-i/64); wavelen_i = 2 pi / f_i; low_freq_wavelen = 8192 / 1 = 8192,
  // high_freq_wavelen = 8192 / 4 = 2048.
  // - i = 28: f = 500000^(-0.4375) = 0.0032114460, wavelen = 1956.497 < 2048: unchanged.
  // - i = 29: f = 0.0026160993, wavelen = 2401.738 (between): smooth = (8192/2401.738 - 1)/3
  //   = 0.8036; f' = (1 - smooth) f / 8 + smooth f = 0.0021665708.
  // - i = 31: f = 0.0017360467, wavelen = 3619.249: smooth = (2.26345 - 1)/3 = 0.42115;
  //   f' = 0.57885 * f / 8 + 0.42115 * f = 0.00085675141.
  // - i = 34: f = 0.00093847387, wavelen = 6695.109: smooth = 0.07455; f' = 0.00017850781.
  // - i = 35: f = 0.00076449699, wavelen = 8218.718 > 8192: f / 8 = 0.000095562124.
  // - i = 63: f = 2.4551408e-6, wavelen 2.56e6: f / 8 = 3.0689260e-7.
  RopeScaling l3 = make(RopeScaling::Llama3, 8.0f);
  l3.low_freq_factor = 1.0f;
  l3.high_freq_factor = 4.0f;
  l3.original_max_position_embeddings = 8192;
  RopeFrequencies l = rope_inv_freq(128, 500000.0, l3, 0);
  near("llama3 inv_freq[0]", l.inv_freq[0], 1.0);
  near("llama3 inv_freq[28]", l.inv_freq[28], 0.003211445994752591);
  near("llama3 inv_freq[29]", l.inv_freq[29], 0.002166570763503359);
  near("llama3 inv_freq[31]", l.inv_freq[31], 0.0008567514129196321);
  near("llama3 inv_freq[34]", l.inv_freq[34], 0.0001785078127679964);
  near("llama3 inv_freq[35]", l.inv_freq[35], 9.556212353964683e-05);
  near("llama3 inv_freq[63]", l.inv_freq[63], 3.068925988914511e-07);
  near("llama3 attention factor", l.attention_factor, 1.0);

  // YaRN, theta 10000, D 128, factor 4, orig 4096, beta 32/1: correction dims
  // 128 ln(4096 / (32 * 2 pi)) / (2 ln 10000) = 20.944 -> floor 20, and
  // 128 ln(4096 / (1 * 2 pi)) / (2 ln 10000) = 45.027 -> ceil 46. ramp(i) = (i - 20) / 26:
  // i <= 20 keep f_i, i >= 46 use f_i / 4; i = 33: ramp 0.5, f' = f (0.5 + 0.5 / 4) = 0.625 f.
  // attention factor = 0.1 ln 4 + 1 = 1.13862943611.
  RopeScaling y = make(RopeScaling::Yarn, 4.0f);
  y.original_max_position_embeddings = 4096;
  RopeFrequencies yf = rope_inv_freq(128, 10000.0, y, 0);
  auto f = [](int i) { return std::pow(10000.0, -2.0 * i / 128.0); };
  near("yarn inv_freq[20]", yf.inv_freq[20], f(20));
  near("yarn inv_freq[33]", yf.inv_freq[33], 0.625 * f(33));
  near("yarn inv_freq[46]", yf.inv_freq[46], f(46) / 4);
  near("yarn attention factor", yf.attention_factor, 1.138629436111989);
  // DeepSeek style: mscale 1, mscale_all_dim 0.707, factor 40:
  // (1 + 0.1 ln 40) / (1 + 0.0707 ln 40) = 1.36888 / 1.26081 = 1.08571.
  y.factor = 40.0f;
  y.mscale = 1.0f;
  y.mscale_all_dim = 0.707f;
  near("yarn mscale attention factor", rope_inv_freq(128, 10000.0, y, 0).attention_factor,
       (1 + 0.1 * std::log(40.0)) / (1 + 0.1 * double(0.707f) * std::log(40.0)));

  // Dynamic NTK x2, max 2048, D 128, at seq_len 4096: base = 10000 (2 * 4096 / 2048 - 1)^(128/126)
  // = 10000 * 3^1.015873 = 30526.0; below or at 2048 the default frequencies, exactly.
  RopeScaling dy = make(RopeScaling::Dynamic, 2.0f);
  dy.max_position_embeddings = 2048;
  double base = 10000.0 * std::pow(3.0, 128.0 / 126.0);
  near("dynamic seq 4096 inv_freq[1]", rope_inv_freq(128, 10000.0, dy, 4096).inv_freq[1], std::pow(base, -2.0 / 128));
  ctx.check(rope_inv_freq(128, 10000.0, dy, 2048).inv_freq == d.inv_freq, "dynamic at seq_len <= max equals default");
}

namespace {

// Positions for the forward/backward cases: shared ones start at 5 with stride 3; per-batch
// row 0 restarts at t = 40 (two packed documents), row 1 starts beyond 2^16 (long context).
Buf make_positions(int64_t B, int64_t T, bool per_batch) {
  Buf p(per_batch ? Shape{B, T} : Shape{T}, DType::I32);
  std::vector<double> v(size_t(p.n()));
  if (!per_batch) {
    for (int64_t t = 0; t < T; ++t) v[size_t(t)] = double(5 + 3 * t);
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        v[size_t(b * T + t)] = b == 0 ? double(t < 40 ? t : t - 40) : double(70000 + 2 * t);
  }
  p.set(v);
  return p;
}

}  // namespace

TK_TEST(rope_forward_backward_vs_reference) {
  if (!correctness_mode(ctx)) return;
  std::vector<NamedScaling> cases = scaling_cases();
  int k = 0;
  for_each_isa([&](const std::string& isa) {
    for (DType dt : {DType::F32, DType::BF16})
      for (bool per_batch : {false, true})
        for (int64_t T : {1, 97})
          for (int64_t H : {1, 3})
            for (int64_t D : {2, 64, 130}) {
              const NamedScaling& sc = cases[size_t(k++) % cases.size()];
              RopeFrequencies fr = rope_inv_freq(D, sc.theta, sc.s, sc.seq_len);
              const Shape shape = {2, T, H, D};
              Buf x(shape, dt), out(shape, dt), dx(shape, dt);
              x.set(randn(size_t(x.n()), uint64_t(1000 + k)));
              Buf pos = make_positions(2, T, per_batch);
              for (bool backward : {false, true}) {
                Buf& o = backward ? dx : out;
                if (backward)
                  rope_backward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, o.view(),
                                    ctx.pool);
                else
                  rope_forward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, o.view(),
                                   ctx.pool);
                std::vector<double> want =
                    backward ? ref::rope_backward(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor)
                             : ref::rope_forward(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor);
                std::string what = std::string(backward ? "rope_backward " : "rope_forward ") + dtype_name(dt) + " " +
                                   shape_str(shape) + (per_batch ? " per-batch" : " shared") + " positions, " +
                                   sc.name + " (" + isa + ")";
                std::vector<double> got = o.values();
                if (dt == DType::F32) {
                  ctx.check_nmse(what, got, want, 1e-11);
                } else {
                  ctx.check_nmse(what + " vs exact", got, want, 1.0 / 65536);
                  ctx.check_nmse(what + " vs exact rounded to bf16", got, round_to(DType::BF16, want), 1e-7);
                }
                ctx.check(o.intact(), what + ": guard bytes intact");
              }
            }
  });
}

TK_TEST(rope_inverse_and_in_place) {
  if (!correctness_mode(ctx)) return;
  RopeScaling y = make(RopeScaling::Yarn, 16.0f);
  y.original_max_position_embeddings = 4096;
  RopeFrequencies fr = rope_inv_freq(130, 10000.0, y, 0);
  const Shape shape = {2, 97, 3, 130};
  for_each_isa([&](const std::string& isa) {
    for (bool per_batch : {false, true}) {
      Buf x(shape, DType::F32), y1(shape, DType::F32), back(shape, DType::F32), inplace(shape, DType::F32);
      std::vector<double> xv = randn(size_t(x.n()), 77);
      x.set(xv);
      inplace.set(xv);
      Buf pos = make_positions(2, 97, per_batch);
      rope_forward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, y1.view(), ctx.pool);
      rope_backward_cpu(y1.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, back.view(), ctx.pool);
      // R^T R = af^2 I: the backward pass undoes the rotation.
      double af2 = double(fr.attention_factor) * double(fr.attention_factor);
      std::vector<double> want(xv.size());
      for (size_t i = 0; i < xv.size(); ++i) want[i] = af2 * xv[i];
      std::string tag = std::string(per_batch ? " per-batch" : " shared") + " (" + isa + ")";
      ctx.check_nmse("rope_backward(rope_forward(x)) = af^2 x" + tag, back.values(), want, 1e-11);
      rope_forward_cpu(inplace.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, inplace.view(),
                       ctx.pool);
      ctx.check(inplace.values() == y1.values(), "rope_forward in place equals out of place" + tag);
      ctx.check(y1.intact() && back.intact() && inplace.intact(), "guard bytes intact" + tag);
    }
  });
}

TK_TEST(rope_rejects_bad_arguments) {
  if (!correctness_mode(ctx)) return;
  auto throws = [&](const char* what, const std::function<void()>& fn) {
    bool threw = false;
    try {
      fn();
    } catch (const tk::Error&) {
      threw = true;
    }
    ctx.check(threw, what);
  };
  std::vector<float> f8 = rope_inv_freq(8, 10000.0, RopeScaling{}, 0).inv_freq;
  Buf x({2, 5, 3, 8}, DType::F32), o({2, 5, 3, 8}, DType::F32), ob({2, 5, 3, 8}, DType::BF16);
  Buf odd({2, 5, 3, 7}, DType::F32), p({5}, DType::I32), pb({2, 5}, DType::I32), pf({5}, DType::F32);
  Buf x16({2, 5, 3, 8}, DType::F16);
  x.set(std::vector<double>(size_t(x.n()), 1.0));
  p.set(std::vector<double>(5, 0.0));
  pb.set(std::vector<double>(10, 0.0));
  ThreadPool* pool = &ctx.pool;
  auto fwd = [pool](const Buf& in, const Buf& pos, bool pbatch, const std::vector<float>& f, const Buf& out) {
    // Views and the frequencies are copied: the returned call outlives this lambda's parameters.
    TensorView iv = in.view(), pv = pos.view(), ov = out.view();
    return [=] { rope_forward_cpu(iv, pv, pbatch, f, 1.0f, ov, *pool); };
  };
  throws("odd head dim", fwd(odd, p, false, f8, odd));
  throws("f16 storage", fwd(x16, p, false, f8, x16));
  throws("out dtype differs", fwd(x, p, false, f8, ob));
  throws("inv_freq of the wrong length", [&] {
    std::vector<float> f3(3, 1.0f);
    rope_forward_cpu(x.view(), p.view(), false, f3, 1.0f, o.view(), ctx.pool);
  });
  throws("shared flag with [B, T] positions", fwd(x, pb, false, f8, o));
  throws("per-batch flag with [T] positions", fwd(x, p, true, f8, o));
  throws("f32 positions", fwd(x, pf, false, f8, o));
  throws("partially overlapping out", [&] {
    TensorView shifted = o.view();
    shifted.data = x.view().ptr<float>() + 1;
    shifted.shape[0] = 1;  // stays inside x's buffer: the overlap, not the size, is what is wrong
    TensorView xv = x.view();
    xv.shape[0] = 1;
    rope_forward_cpu(xv, p.view(), false, f8, 1.0f, shifted, ctx.pool);
  });
  throws("backward with a wrong out shape", [&] {
    Buf small({2, 5, 3, 6}, DType::F32);
    rope_backward_cpu(x.view(), p.view(), false, f8, 1.0f, small.view(), ctx.pool);
  });
  throws("inv_freq with odd D", [] { rope_inv_freq(7, 10000.0, RopeScaling{}, 0); });
  throws("inv_freq with theta 1", [] { rope_inv_freq(8, 1.0, RopeScaling{}, 0); });
  throws("linear factor 0", [] { rope_inv_freq(8, 10000.0, make(RopeScaling::Linear, 0.0f), 0); });
  throws("dynamic without max_position_embeddings", [] { rope_inv_freq(8, 10000.0, make(RopeScaling::Dynamic, 2.0f), 4096); });
  throws("yarn without a context length", [] { rope_inv_freq(8, 10000.0, make(RopeScaling::Yarn, 2.0f), 0); });
  throws("llama3 with low_freq_factor >= high_freq_factor", [] {
    RopeScaling s = make(RopeScaling::Llama3, 8.0f);
    s.original_max_position_embeddings = 8192;
    s.low_freq_factor = 4.0f;
    s.high_freq_factor = 4.0f;
    rope_inv_freq(8, 10000.0, s, 0);
  });
  // Zero-size batch or sequence: nothing to do, no error.
  Buf e({0, 5, 3, 8}, DType::F32), pe({0}, DType::I32), e2({2, 0, 3, 8}, DType::F32);
  rope_forward_cpu(e.view(), p.view(), false, f8, 1.0f, e.view(), ctx.pool);
  rope_forward_cpu(e2.view(), pe.view(), false, f8, 1.0f, e2.view(), ctx.pool);
  ctx.check(e.intact() && e2.intact(), "zero-size tensors leave guards intact");
}

// ==== --grad ==========================================================================================

TK_TEST(rope_grad) {
  if (!ctx.opt.grad) return;
  // L(x) = sum(g * rope(x)); dL/dx = rope_backward(g). YaRN (attention factor 1.2079 != 1) and
  // per-batch positions, so the factor and the sign of the transpose are both exercised.
  RopeScaling y = make(RopeScaling::Yarn, 8.0f);
  y.original_max_position_embeddings = 256;
  for (bool per_batch : {false, true}) {
    RopeFrequencies fr = rope_inv_freq(10, 10000.0, y, 0);
    const Shape shape = {2, 7, 3, 10};
    Buf x(shape, DType::F32), g(shape, DType::F32), out(shape, DType::F32), dx(shape, DType::F32);
    x.set(randn(size_t(x.n()), 91));
    g.set(randn(size_t(g.n()), 92));
    Buf pos = make_positions(2, 7, per_batch);
    auto loss = [&] {
      rope_forward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, out.view(), ctx.pool);
      const float* po = out.view().ptr<float>();
      const float* pg = g.view().ptr<float>();
      double s = 0;
      for (int64_t i = 0; i < out.n(); ++i) s += double(pg[i]) * double(po[i]);
      return s;
    };
    rope_backward_cpu(g.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, dx.view(), ctx.pool);
    std::vector<double> numeric(size_t(x.n()));
    float* px = x.view().ptr<float>();
    const float h = 1e-2f;
    for (int64_t i = 0; i < x.n(); ++i) {
      float keep = px[i];
      px[i] = keep + h;
      double up = loss();
      px[i] = keep - h;
      double down = loss();
      px[i] = keep;
      numeric[size_t(i)] = (up - down) / (double(keep + h) - double(keep - h));
    }
    ctx.check_nmse(std::string("d rope(x)/dx [2, 7, 3, 10] yarn, ") + (per_batch ? "per-batch" : "shared") +
                       " positions, vs central differences",
                   dx.values(), numeric, 1e-6);
  }
}

// ==== --perf ==========================================================================================

TK_TEST(rope_perf) {
  if (!ctx.opt.perf) return;
  const Shape shape = {1, 4096, 32, 128};
  RopeScaling l3 = make(RopeScaling::Llama3, 8.0f);
  l3.original_max_position_embeddings = 8192;
  RopeFrequencies fr = rope_inv_freq(128, 500000.0, l3, 0);
  std::printf("  perf threads %d\n", ctx.pool.size());
  for_each_isa([&](const std::string& isa) {
    for (DType dt : {DType::F32, DType::BF16})
      for (bool per_batch : {false, true}) {
        Buf x(shape, dt), o(shape, dt);
        x.set(randn(size_t(x.n()), 5));
        Buf pos = make_positions(1, 4096, per_batch);
        for (bool backward : {false, true}) {
          double t = time_median([&] {
            if (backward)
              rope_backward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, o.view(), ctx.pool);
            else
              rope_forward_cpu(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, o.view(), ctx.pool);
          });
          double bytes = 2.0 * double(x.n()) * double(dtype_size(dt));  // read x, write out
          char what[120];
          std::snprintf(what, sizeof what, "rope %s %s [1, 4096, 32, 128] %s pos (%s)", backward ? "bwd" : "fwd",
                        dtype_name(dt), per_batch ? "per-batch" : "shared", isa.c_str());
          std::printf("  perf %-58s %8.2f ms %8.1f GB/s\n", what, t * 1e3, bytes / t / 1e9);
        }
      }
  });
}
