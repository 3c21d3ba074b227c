// Tests of cpu/attention against ref/attention_ref.
//
// Shapes are odd (T, S in {1, 7, 97}, plus 130 x 260 for several blocks with a causal offset), so
// no size is a multiple of the 64-row tiles or of a SIMD width; S > T and S < T appear with and
// without the causal mask (S < T causal leaves the first queries with no visible key); head
// layouts H/Hkv = 4/2, 3/1 and 2/2 (grouped-query) and D in {8, 64, 72}. Segment cases pack three
// documents of uneven length, with one set of ids (S == T), separate query/key ids (S > T), and
// non-causal query rows whose segment has no key at all (zeros out, lse = -inf, zero gradients).
// Every case runs on every ISA level present, in F32 and BF16 storage, into guarded buffers.
//
// Tolerances (NMSE = sum (got - ref)^2 / sum ref^2, ref in double from the same stored inputs):
// - F32: 1e-10. The kernels round each input to fp32 once (q also times scale), accumulate dot
//   products of length D <= 72 and p v sums of length <= 97 in fp32 (relative error ~ 1e-7 per
//   element, NMSE ~ 1e-14), and the online softmax adds only a few roundings per row: its rescaling
//   exp(m_old - m_new) is exact in exact arithmetic and costs ~1 ulp per new maximum, the
//   polynomial exp ~1 ulp. Backward adds the cancellation in dp - delta (delta from the fp32 o),
//   which can lose a few bits where dp ~ delta. Observed worst cases: o 1.2e-12, dq/dk 6.7e-12,
//   lse 7e-14; 1e-10 leaves room without hiding a real bug (a wrong mask or a dropped tile is O(1)).
//   lse: 1e-12 on finite entries, and -inf exactly where the reference has -inf.
// - BF16: outputs are rounded once to bf16 (relative error <= 2^-9, NMSE ~ 1.3e-6 for random
//   data), so o is checked at 1e-5 (observed 2.9e-6) and dv = p^T do at 2e-5 (observed 5e-6). The
//   backward pass reads o back in bf16 (as every caller must), which perturbs delta = rowsum(do * o)
//   by up to 2^-9 relative; ds = p (dp - delta) amplifies that where dp ~ delta, so dq and dk are
//   checked at 4e-4 (observed 6e-5).
// - Where the reference gradient is identically 0 (one visible key per query) the mean square of
//   the result must stay under the same tolerance.
// - Finite differences (--grad): the double reference's backward vs central differences of
//   sum(o * R) at 1e-14 (observed 1e-19), the f32 kernel's at 1e-10 (observed 1.4e-13).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/attention.h"
#include "../cpu/isa.h"
#include "../ref/attention_ref.h"
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

template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (CpuIsa isa : isa_levels()) {
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

// Segment layouts.
enum class Seg { None, Shared, Separate, Missing };

struct Case {
  int64_t B, T, S, H, Hkv, D;
  bool causal;
  Seg seg = Seg::None;
  float scale = 0.0f;  // 0: default 1/sqrt(D)
};

std::string describe_case(const Case& c, DType dt) {
  char buf[200], scale[32] = "";
  if (c.scale != 0.0f) std::snprintf(scale, sizeof scale, ", scale %g", double(c.scale));
  static const char* seg_names[] = {"", ", segments [B,T]", ", segments q/k", ", segments with keyless rows"};
  std::snprintf(buf, sizeof buf, "B=%lld T=%lld S=%lld H=%lld Hkv=%lld D=%lld %s%s%s %s",
                (long long)c.B, (long long)c.T, (long long)c.S, (long long)c.H, (long long)c.Hkv, (long long)c.D,
                c.causal ? "causal" : "non-causal", seg_names[int(c.seg)],
                scale, dtype_name(dt));
  return buf;
}

// ids of n positions cut into documents of the given lengths (the last one runs to the end).
std::vector<int32_t> documents(int64_t n, const std::vector<int64_t>& lengths, int32_t first_id = 0) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  int64_t pos = 0;
  int32_t id = first_id;
  for (size_t d = 0; d < lengths.size() && pos < n; ++d, ++id)
    for (int64_t i = 0; i < lengths[d] && pos < n; ++i) ids[size_t(pos++)] = id;
  for (; pos < n; ++pos) ids[size_t(pos)] = id - 1;
  return ids;
}

// Segment ids of a case: seg_q [B, T] and seg_k [B, S] (empty when unused; seg_k empty when shared).
void make_segments(const Case& c, std::vector<int32_t>* sq, std::vector<int32_t>* sk) {
  sq->clear();
  sk->clear();
  for (int64_t b = 0; b < c.B; ++b) {
    // Three documents of uneven length, a different cut per batch row.
    std::vector<int64_t> cut = b % 2 == 0 ? std::vector<int64_t>{c.S * 3 / 7 + 1, c.S / 9 + 1, c.S}
                                          : std::vector<int64_t>{c.S / 11 + 2, c.S * 5 / 8, c.S};
    std::vector<int32_t> keys = documents(c.S, cut, int32_t(10 * b));
    switch (c.seg) {
      case Seg::None: break;
      case Seg::Shared: sq->insert(sq->end(), keys.begin(), keys.end()); break;
      case Seg::Separate:  // queries are the last T positions (KV-cache style, like the causal alignment)
        sk->insert(sk->end(), keys.begin(), keys.end());
        sq->insert(sq->end(), keys.end() - c.T, keys.end());
        break;
      case Seg::Missing: {
        // Queries cycle through the key documents and one id (99) no key has.
        sk->insert(sk->end(), keys.begin(), keys.end());
        for (int64_t t = 0; t < c.T; ++t) {
          int r = int(t % 4);
          sq->push_back(r == 3 ? 99 : int32_t(10 * b + r));
        }
        break;
      }
    }
  }
}

struct Problem {
  Case c;
  DType dt;
  Buf q, k, v, dout;
  std::vector<int32_t> sq, sk;
  std::unique_ptr<Buf> segq, segk;
  ref::AttentionShape shape;
  float scale;

  Problem(const Case& cs, DType t, uint64_t seed, double logit_scale = 1.0)
      : c(cs), dt(t), q({cs.B, cs.T, cs.H, cs.D}, t), k({cs.B, cs.S, cs.Hkv, cs.D}, t), v({cs.B, cs.S, cs.Hkv, cs.D}, t),
        dout({cs.B, cs.T, cs.H, cs.D}, t) {
    std::vector<double> x = randn(size_t(q.n()), seed);
    for (double& e : x) e *= logit_scale;
    q.set(x);
    k.set(randn(size_t(k.n()), seed + 1));
    v.set(randn(size_t(v.n()), seed + 2));
    dout.set(randn(size_t(dout.n()), seed + 3));
    make_segments(c, &sq, &sk);
    if (!sq.empty()) {
      segq.reset(new Buf({c.B, c.T}, DType::I32));
      std::copy(sq.begin(), sq.end(), static_cast<int32_t*>(segq->mem->data()));
    }
    if (!sk.empty()) {
      segk.reset(new Buf({c.B, c.S}, DType::I32));
      std::copy(sk.begin(), sk.end(), static_cast<int32_t*>(segk->mem->data()));
    }
    scale = c.scale != 0.0f ? c.scale : float(1.0 / std::sqrt(double(c.D)));
    shape.B = c.B, shape.T = c.T, shape.S = c.S, shape.H = c.H, shape.Hkv = c.Hkv, shape.D = c.D;
    shape.scale = double(scale);
    shape.causal = c.causal;
    shape.seg_q = sq.empty() ? nullptr : sq.data();
    shape.seg_k = sk.empty() ? shape.seg_q : sk.data();
  }
  AttentionOptions options() const {
    AttentionOptions o;
    o.causal = c.causal;
    o.scale = c.scale;
    return o;
  }
  TensorView segq_view() const { return segq ? segq->view() : TensorView{}; }
  TensorView segk_view() const { return segk ? segk->view() : TensorView{}; }

  struct Out {
    Buf o, lse, dq, dk, dv;
  };
  std::unique_ptr<Out> run(ThreadPool& pool) const {
    std::unique_ptr<Out> r(new Out{Buf(q.shape, dt), Buf({c.B, c.H, c.T}, DType::F32), Buf(q.shape, dt), Buf(k.shape, dt),
                                   Buf(k.shape, dt)});
    for (Buf* b : {&r->o, &r->lse, &r->dq, &r->dk, &r->dv}) b->mem->fill(0x7f);  // garbage in every output
    TensorView sqv = segq_view(), skv = segk_view();
    const TensorView* psq = segq ? &sqv : nullptr;
    const TensorView* psk = segk ? &skv : nullptr;
    attention_forward_cpu(q.view(), k.view(), v.view(), psq, psk, options(), r->o.view(), r->lse.view(), pool);
    attention_backward_cpu(dout.view(), q.view(), k.view(), v.view(), r->o.view(), r->lse.view(), psq, psk, options(),
                           r->dq.view(), r->dk.view(), r->dv.view(), pool);
    return r;
  }
};

// NMSE, except where the reference is identically zero (dq and dk when every query sees a single
// key: the softmax is constant, while fp32 computes dp - delta as a rounding-level residue); there
// the mean square of `got` (inputs have unit variance) must stay under the same tolerance.
void check_close(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                 double tol) {
  double den = 0.0, ms = 0.0;
  for (double w : want) den += w * w;
  if (den != 0.0 || got.size() != want.size()) {
    ctx.check_nmse(what, got, want, tol);
    return;
  }
  for (double g : got) ms += g * g;
  ms /= double(std::max<size_t>(1, got.size()));
  char buf[96];
  std::snprintf(buf, sizeof buf, ": reference is 0, mean square %.3e (tol %.1e)", ms, tol);
  ctx.check(ms <= tol, what + buf);
}

// Finite entries compared by NMSE, -inf entries must match exactly.
void check_lse(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want) {
  std::vector<double> g, w;
  bool inf_match = true;
  for (size_t i = 0; i < want.size(); ++i) {
    bool wi = std::isinf(want[i]), gi = std::isinf(got[i]) && got[i] < 0;
    if (wi != gi) inf_match = false;
    if (!wi) {
      g.push_back(got[i]);
      w.push_back(want[i]);
    }
  }
  ctx.check(inf_match, what + " lse: -inf exactly on rows with no visible key");
  ctx.check_nmse(what + " lse", g, w, 1e-12);
}

std::vector<Case> cases() {
  struct Heads { int64_t H, Hkv; };
  const Heads heads[] = {{4, 2}, {3, 1}, {2, 2}};
  const int64_t dims[] = {8, 64, 72};
  std::vector<Case> r;
  int i = 0;
  for (int64_t T : {1, 7, 97})
    for (int64_t S : {1, 7, 97})
      for (bool causal : {false, true}) {
        Heads hd = heads[i % 3];
        r.push_back({i % 4 == 0 ? 2 : 1, T, S, hd.H, hd.Hkv, dims[(i / 3) % 3], causal});
        ++i;
      }
  r.push_back({1, 130, 260, 4, 2, 64, true});
  r.push_back({2, 97, 97, 4, 2, 64, true, Seg::Shared});
  r.push_back({2, 97, 97, 3, 1, 72, false, Seg::Shared});
  r.push_back({2, 40, 97, 2, 2, 8, true, Seg::Separate});
  r.push_back({2, 97, 70, 4, 2, 64, false, Seg::Missing});
  r.push_back({1, 97, 97, 4, 2, 72, true, Seg::None, 0.3f});
  r.push_back({1, 97, 130, 3, 1, 64, false, Seg::None, 1.5f});
  return r;
}

}  // namespace

TK_TEST(attention_vs_reference) {
  if (!correctness_mode(ctx)) return;
  uint64_t seed = 100;
  for (const Case& c : cases()) {
    for (DType dt : {DType::F32, DType::BF16}) {
      seed += 10;
      Problem pr(c, dt, seed);
      std::vector<double> o_ref, lse_ref, dq_ref, dk_ref, dv_ref;
      ref::attention_forward(pr.shape, pr.q.values(), pr.k.values(), pr.v.values(), &o_ref, &lse_ref);
      ref::attention_backward(pr.shape, pr.dout.values(), pr.q.values(), pr.k.values(), pr.v.values(), &dq_ref,
                              &dk_ref, &dv_ref);
      const double tol_o = dt == DType::F32 ? 1e-10 : 1e-5;
      const double tol_g = dt == DType::F32 ? 1e-10 : 4e-4;
      const double tol_dv = dt == DType::F32 ? 1e-10 : 2e-5;
      for_each_isa([&](const std::string& isa) {
        std::string what = "attention " + describe_case(c, dt) + " (" + isa + ")";
        auto out = pr.run(ctx.pool);
        ctx.check_nmse(what + " o", out->o.values(), o_ref, tol_o);
        check_lse(ctx, what, out->lse.values(), lse_ref);
        check_close(ctx, what + " dq", out->dq.values(), dq_ref, tol_g);
        check_close(ctx, what + " dk", out->dk.values(), dk_ref, tol_g);
        check_close(ctx, what + " dv", out->dv.values(), dv_ref, tol_dv);
        ctx.check(out->o.intact() && out->lse.intact() && out->dq.intact() && out->dk.intact() && out->dv.intact(),
                  what + ": guard bytes intact");
        // Rows that see no key: exact zeros in o and dq (no NaN anywhere).
        bool zero_rows = true;
        std::vector<double> o = out->o.values(), dq = out->dq.values();
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t t = 0; t < c.T; ++t)
              if (std::isinf(lse_ref[size_t((b * c.H + h) * c.T + t)]))
                for (int64_t d = 0; d < c.D; ++d) {
                  size_t i = size_t(((b * c.T + t) * c.H + h) * c.D + d);
                  zero_rows &= o[i] == 0.0 && dq[i] == 0.0;
                }
        ctx.check(zero_rows, what + ": rows with no visible key give o = 0 and dq = 0");
      });
    }
  }
}

// Peaked softmax (large logits, so the running max changes often and exp underflows) in f32.
TK_TEST(attention_large_logits) {
  if (!correctness_mode(ctx)) return;
  const Case c{1, 97, 97, 4, 2, 64, true, Seg::Shared};
  Problem pr(c, DType::F32, 7, 12.0);
  std::vector<double> o_ref, lse_ref, dq_ref, dk_ref, dv_ref;
  ref::attention_forward(pr.shape, pr.q.values(), pr.k.values(), pr.v.values(), &o_ref, &lse_ref);
  ref::attention_backward(pr.shape, pr.dout.values(), pr.q.values(), pr.k.values(), pr.v.values(), &dq_ref, &dk_ref,
                          &dv_ref);
  for_each_isa([&](const std::string& isa) {
    std::string what = "attention large logits " + describe_case(c, DType::F32) + " (" + isa + ")";
    auto out = pr.run(ctx.pool);
    ctx.check_nmse(what + " o", out->o.values(), o_ref, 1e-10);
    check_lse(ctx, what, out->lse.values(), lse_ref);
    ctx.check_nmse(what + " dq", out->dq.values(), dq_ref, 1e-9);
    ctx.check_nmse(what + " dk", out->dk.values(), dk_ref, 1e-9);
    ctx.check_nmse(what + " dv", out->dv.values(), dv_ref, 1e-10);
  });
}

// Results must not depend on the number of threads (every output has one owner, fixed order).
TK_TEST(attention_thread_count_invariance) {
  if (!correctness_mode(ctx)) return;
  const Case c{2, 130, 200, 4, 2, 72, true, Seg::Separate};
  Problem pr(c, DType::F32, 3);
  ThreadPool one(1), three(3);
  auto a = pr.run(one), b = pr.run(three), d = pr.run(ctx.pool);
  for (Problem::Out* x : {b.get(), d.get()}) {
    bool same = true;
    for (auto pair : {std::make_pair(&a->o, &x->o), std::make_pair(&a->lse, &x->lse), std::make_pair(&a->dq, &x->dq),
                      std::make_pair(&a->dk, &x->dk), std::make_pair(&a->dv, &x->dv)})
      same &= std::memcmp(pair.first->mem->data(), pair.second->mem->data(), pair.first->mem->bytes()) == 0;
    ctx.check(same, "attention " + describe_case(c, DType::F32) + ": bitwise identical for 1, 3 and " +
                        std::to_string(ctx.pool.size()) + " threads");
  }
}

TK_TEST(attention_rejects_bad_arguments) {
  if (!correctness_mode(ctx)) return;
  auto throws = [&](const std::string& what, const std::function<void()>& fn) {
    bool threw = false;
    try {
      fn();
    } catch (const tk::Error&) {
      threw = true;
    }
    ctx.check(threw, "attention rejects " + what);
  };
  Buf q({1, 5, 3, 8}, DType::F32), k({1, 6, 2, 8}, DType::F32), v({1, 6, 2, 8}, DType::F32);
  Buf o({1, 5, 3, 8}, DType::F32), lse({1, 3, 5}, DType::F32);
  AttentionOptions opt;
  throws("H % Hkv != 0", [&] {
    attention_forward_cpu(q.view(), k.view(), v.view(), nullptr, nullptr, opt, o.view(), lse.view(), ctx.pool);
  });
  Buf k2({1, 6, 1, 8}, DType::F32), v16({1, 6, 1, 8}, DType::BF16), segq({1, 5}, DType::I32), segk({1, 5}, DType::I32);
  throws("k and v of different dtypes", [&] {
    attention_forward_cpu(q.view(), k2.view(), v16.view(), nullptr, nullptr, opt, o.view(), lse.view(), ctx.pool);
  });
  TensorView sq = segq.view(), sk = segk.view();
  throws("key segment ids of the wrong length", [&] {
    attention_forward_cpu(q.view(), k2.view(), k2.view(), &sq, &sk, opt, o.view(), lse.view(), ctx.pool);
  });
  throws("one set of segment ids with S != T", [&] {
    attention_forward_cpu(q.view(), k2.view(), k2.view(), &sq, nullptr, opt, o.view(), lse.view(), ctx.pool);
  });
  Buf lse_bad({1, 5, 3}, DType::F32);
  throws("lse of shape [B, T, H]", [&] {
    attention_forward_cpu(q.view(), k2.view(), k2.view(), nullptr, nullptr, opt, o.view(), lse_bad.view(), ctx.pool);
  });
}

// Backward of the double reference (and of the f32 kernel) against central differences of
// L = sum(o * R) computed with the reference forward pass.
TK_TEST(attention_grad) {
  const Case grad_cases[] = {
      {1, 5, 7, 4, 2, 8, true},                         // S > T, causal, grouped heads
      {1, 6, 6, 3, 1, 8, false, Seg::Missing, 0.5f},    // keyless rows, custom scale
      {2, 6, 6, 2, 2, 8, true, Seg::Shared},            // packed documents
  };
  uint64_t seed = 900;
  for (const Case& c : grad_cases) {
    Problem pr(c, DType::F32, seed += 10);
    std::vector<double> q = pr.q.values(), k = pr.k.values(), v = pr.v.values(), R = pr.dout.values();
    auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk, const std::vector<double>& vv) {
      std::vector<double> o, lse;
      ref::attention_forward(pr.shape, qq, kk, vv, &o, &lse);
      double s = 0.0;
      for (size_t i = 0; i < o.size(); ++i) s += o[i] * R[i];
      return s;
    };
    const double eps = 1e-5;
    auto numeric = [&](int which) {
      std::vector<double> qq = q, kk = k, vv = v;
      std::vector<double>& x = which == 0 ? qq : which == 1 ? kk : vv;
      std::vector<double> g(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        x[i] = x0 + eps;
        double up = loss(qq, kk, vv);
        x[i] = x0 - eps;
        double dn = loss(qq, kk, vv);
        x[i] = x0;
        g[i] = (up - dn) / (2 * eps);
      }
      return g;
    };
    std::vector<double> dq, dk, dv;
    ref::attention_backward(pr.shape, R, q, k, v, &dq, &dk, &dv);
    auto out = pr.run(ctx.pool);
    const std::string what = "attention grad " + describe_case(c, DType::F32);
    const char* names[] = {"dq", "dk", "dv"};
    const std::vector<double>* refs[] = {&dq, &dk, &dv};
    const Buf* kern[] = {&out->dq, &out->dk, &out->dv};
    for (int w = 0; w < 3; ++w) {
      std::vector<double> num = numeric(w);
      ctx.check_nmse(what + " " + names[w] + " (reference) vs central differences", *refs[w], num, 1e-14);
      ctx.check_nmse(what + " " + names[w] + " (kernel, " + isa_name(active_isa()) + ") vs central differences",
                     kern[w]->values(), num, 1e-10);
    }
  }
}

TK_TEST(attention_perf) {
  const int64_t B = 1, T = 1024, S = 1024, H = 8, D = 64;
  const double fwd_flops = 4.0 * double(T) * double(S) * double(D) * double(H) / 2;  // causal: half the tiles
  // Backward: 5 products of 2 T S D H / 2 flops (q k^T, do v^T, p^T do, ds^T q, ds k).
  const double bwd_flops = 2.5 * fwd_flops;
  std::printf("  attention B=%lld T=S=%lld H=Hkv=%lld D=%lld causal, %d threads (fwd %.2f GFLOP, bwd %.2f GFLOP)\n",
              (long long)B, (long long)T, (long long)H, (long long)D, ctx.pool.size(), fwd_flops * 1e-9,
              bwd_flops * 1e-9);
  for (DType dt : {DType::F32, DType::BF16}) {
    const Case c{B, T, S, H, H, D, true};
    Problem pr(c, dt, 5);
    Buf o(pr.q.shape, dt), lse({B, H, T}, DType::F32), dq(pr.q.shape, dt), dk(pr.k.shape, dt), dv(pr.k.shape, dt);
    for_each_isa([&](const std::string& isa) {
      AttentionOptions opt;
      auto fwd = [&] {
        attention_forward_cpu(pr.q.view(), pr.k.view(), pr.v.view(), nullptr, nullptr, opt, o.view(), lse.view(),
                              ctx.pool);
      };
      auto bwd = [&] {
        attention_backward_cpu(pr.dout.view(), pr.q.view(), pr.k.view(), pr.v.view(), o.view(), lse.view(), nullptr,
                               nullptr, opt, dq.view(), dk.view(), dv.view(), ctx.pool);
      };
      double tf = time_median(fwd, 5);
      double tb = time_median(bwd, 5);
      std::printf("  attention %-4s %-10s fwd %8.2f ms %7.1f GFLOP/s | bwd %8.2f ms %7.1f GFLOP/s | fwd+bwd %7.1f GFLOP/s\n",
                  dtype_name(dt), isa.c_str(), tf * 1e3, fwd_flops / tf * 1e-9, tb * 1e3, bwd_flops / tb * 1e-9,
                  (fwd_flops + bwd_flops) / (tf + tb) * 1e-9);
    });
  }
}
