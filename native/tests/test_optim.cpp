// Tests of cpu/optim (AdamW step, gradient norm, clipping) against ref/optim_ref.
//
// Sizes are odd (1, 97, 1025, 100003) so no size is a multiple of a SIMD width; every case runs on
// every ISA level the machine has and writes into guarded buffers. Expected values:
// - F32 parameters (the fp32 master copy, with f32 or bf16 gradients): the kernel computes in fp32
//   with constants folded in double, a few ulp from the double reference per step: NMSE < 1e-12 on
//   p, m and v, after one step and after 5 consecutive steps.
// - BF16 parameters: m and v as above. p is the fp32 result rounded once to bf16, the reference
//   the double result rounded once to bf16; they differ only where the fp32 result falls on the
//   other side of a rounding boundary, by one bf16 ulp (relative <= 2^-7). So every element is
//   checked to be within one bf16 ulp of the reference, and the NMSE to be below 1e-6 (every
//   element one ulp off would give about 2^-16 = 1.5e-5). Flips are not rare here: at step 1 the
//   update is exactly -lr * sign(g) for every element, so all p of one binade land at the same
//   offset from the bf16 grid and a near-tie flips many at once; 5 steps measure about 5e-8,
//   single steps from a random state about 1e-10.
// - Multi-tensor steps are bitwise equal to per-tensor steps and do not depend on the thread
//   count; the AVX2 and AVX-512 paths are bitwise equal to each other.
// - Gradient norm (fp64): relative error vs the double reference < 1e-12, bitwise identical for
//   pools of 1, 2 and 3 threads. Clip coefficient: exact values; scaling: exact.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/isa.h"
#include "../cpu/optim.h"
#include "../ref/optim_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

const int64_t kSizes[] = {1, 97, 1025, 100003};
const DType kParamTypes[] = {DType::F32, DType::BF16};
const DType kGradTypes[] = {DType::F32, DType::BF16};

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

AdamWParams base_params() {
  AdamWParams hp;
  hp.lr = 1e-2f;  // large enough that the update, not p itself, dominates the error figures
  hp.beta1 = 0.9f;
  hp.beta2 = 0.999f;
  hp.eps = 1e-8f;
  hp.weight_decay = 0.0f;
  hp.grad_scale = 1.0f;
  hp.step = 1;
  return hp;
}

std::string hp_str(const AdamWParams& hp) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "wd %g gs %g step %lld", double(hp.weight_decay), double(hp.grad_scale),
                (long long)hp.step);
  return buf;
}

// One tensor's optimizer state in guarded buffers.
struct Slot {
  Slot(int64_t n, DType pt, DType gt)
      : n(n), pt(pt), gt(gt),
        p(new Guarded(size_t(n) * dtype_size(pt))), g(new Guarded(size_t(n) * dtype_size(gt))),
        m(new Guarded(size_t(n) * 4)), v(new Guarded(size_t(n) * 4)) {}
  int64_t n;
  DType pt, gt;
  std::unique_ptr<Guarded> p, g, m, v;

  AdamWTensor tensor() const {
    return {p->data(), g->data(), static_cast<float*>(m->data()), static_cast<float*>(v->data()), n, pt, gt};
  }
  bool intact() const { return p->intact() && g->intact() && m->intact() && v->intact(); }
  void set(const std::vector<double>& p0, const std::vector<double>& m0, const std::vector<double>& v0) {
    from_double(p0, p->data(), pt);
    from_double(m0, m->data(), DType::F32);
    from_double(v0, v->data(), DType::F32);
  }
  void set_grad(const std::vector<double>& g0) { from_double(g0, g->data(), gt); }
  std::vector<double> P() const { return to_double(p->data(), pt, size_t(n)); }
  std::vector<double> G() const { return to_double(g->data(), gt, size_t(n)); }
  std::vector<double> M() const { return to_double(m->data(), DType::F32, size_t(n)); }
  std::vector<double> V() const { return to_double(v->data(), DType::F32, size_t(n)); }
  bool same_bits(const Slot& o) const {
    return std::memcmp(p->data(), o.p->data(), p->bytes()) == 0 && std::memcmp(m->data(), o.m->data(), m->bytes()) == 0 &&
           std::memcmp(v->data(), o.v->data(), v->bytes()) == 0;
  }
};

std::vector<double> scaled(std::vector<double> x, double s) {
  for (double& e : x) e *= s;
  return x;
}

// Initial state: p ~ N(0, 1), m ~ N(0, 0.1^2), v = (0.1 * N)^2 (v >= 0, as a real second moment).
struct Init {
  std::vector<double> p, m, v;
  Init(int64_t n, uint64_t seed, bool zero_moments) {
    p = randn(size_t(n), seed);
    if (zero_moments) {
      m.assign(size_t(n), 0.0);
      v.assign(size_t(n), 0.0);
    } else {
      m = scaled(randn(size_t(n), seed + 1), 0.1);
      v = randn(size_t(n), seed + 2);
      for (double& x : v) x = 0.01 * x * x;
    }
  }
};

// Compares a slot with the reference state. Parameters in bf16 are checked per element to within
// one bf16 ulp (relative 2^-7) and by NMSE < 1e-6; everything else by NMSE < 1e-12.
void check_state(Context& ctx, const std::string& what, const Slot& s, const std::vector<double>& rp,
                 const std::vector<double>& rm, const std::vector<double>& rv) {
  const std::vector<double> gp = s.P();
  if (s.pt == DType::BF16) {
    ctx.check_nmse(what + " p", gp, rp, 1e-6);
    size_t bad = 0;
    for (size_t i = 0; i < gp.size(); ++i)
      if (std::fabs(gp[i] - rp[i]) > std::ldexp(std::fabs(rp[i]), -7)) ++bad;
    ctx.check(bad == 0, what + " p within one bf16 ulp (" + std::to_string(bad) + " elements off)");
  } else {
    ctx.check_nmse(what + " p", gp, rp, 1e-12);
  }
  ctx.check_nmse(what + " m", s.M(), rm, 1e-12);
  ctx.check_nmse(what + " v", s.V(), rv, 1e-12);
  ctx.check(s.intact(), what + " guards intact");
}

std::string case_str(const std::string& isa, int64_t n, DType pt, DType gt, const AdamWParams& hp) {
  return "adamw " + isa + " n " + std::to_string(n) + " p " + dtype_name(pt) + " g " + dtype_name(gt) + " " +
         hp_str(hp);
}

// Sizes of a 50-tensor list: a mix of tiny, odd, SIMD-width-adjacent and large tensors (one empty).
std::vector<int64_t> mixed_sizes() {
  const int64_t base[] = {1, 3, 15, 16, 17, 31, 32, 33, 97, 0, 255, 1025, 4099, 20000, 65537, 130001, 7, 2048, 333, 50};
  std::vector<int64_t> r;
  for (int i = 0; i < 50; ++i) r.push_back(base[i % 20] + (i >= 20 ? i : 0));
  return r;
}

}  // namespace

// ==== AdamW ===========================================================================================

// One step from a random state (step 3, so both bias corrections are active), every size, dtype
// pair, weight decay 0 / 0.1 and grad scale 1 / 0.37.
TK_TEST(optim_adamw_one_step) {
  for (int64_t n : kSizes) {
    const Init init(n, 100 + uint64_t(n), false);
    const std::vector<double> g0 = randn(size_t(n), 7 + uint64_t(n));
    for (float wd : {0.0f, 0.1f})
      for (float gs : {1.0f, 0.37f}) {
        AdamWParams hp = base_params();
        hp.weight_decay = wd;
        hp.grad_scale = gs;
        hp.step = 3;
        for_each_isa([&](const std::string& isa) {
          for (DType pt : kParamTypes)
            for (DType gt : kGradTypes) {
              Slot s(n, pt, gt);
              s.set(init.p, init.m, init.v);
              s.set_grad(g0);
              std::vector<double> rp = s.P(), rm = s.M(), rv = s.V();
              const std::vector<double> rg = s.G();
              adamw_step_cpu(s.p->data(), s.g->data(), static_cast<float*>(s.m->data()),
                             static_cast<float*>(s.v->data()), n, pt, gt, hp, ctx.pool);
              ref::adamw_step_ref(rp, rm, rv, rg, pt, hp);
              check_state(ctx, case_str(isa, n, pt, gt, hp), s, rp, rm, rv);
            }
        });
      }
  }
}

// Steps 1..5 from zero moments with a fresh gradient each step; kernel and reference each carry
// their own state forward.
TK_TEST(optim_adamw_five_steps) {
  for (int64_t n : kSizes) {
    const Init init(n, 200 + uint64_t(n), true);
    std::vector<std::vector<double>> grads;
    for (int k = 0; k < 5; ++k) grads.push_back(randn(size_t(n), 300 + uint64_t(n) * 7 + uint64_t(k)));
    for (int variant = 0; variant < 2; ++variant) {
      AdamWParams hp = base_params();
      hp.weight_decay = variant ? 0.1f : 0.0f;
      hp.grad_scale = variant ? 0.37f : 1.0f;
      for_each_isa([&](const std::string& isa) {
        for (DType pt : kParamTypes)
          for (DType gt : kGradTypes) {
            Slot s(n, pt, gt);
            s.set(init.p, init.m, init.v);
            std::vector<double> rp = s.P(), rm = s.M(), rv = s.V();
            for (int k = 0; k < 5; ++k) {
              hp.step = k + 1;
              s.set_grad(grads[size_t(k)]);
              const AdamWTensor t = s.tensor();
              adamw_step_multi_cpu(&t, 1, hp, ctx.pool);
              ref::adamw_step_ref(rp, rm, rv, s.G(), pt, hp);
            }
            check_state(ctx, case_str(isa, n, pt, gt, hp) + " after 5 steps", s, rp, rm, rv);
          }
      });
    }
  }
}

// 50 tensors of mixed sizes and dtype pairs: one multi-tensor call equals 50 single calls bit for
// bit, for pools of 1, 2 and 3 threads, over two consecutive steps; and matches the reference.
TK_TEST(optim_adamw_multi) {
  const std::vector<int64_t> sizes = mixed_sizes();
  const size_t T = sizes.size();
  ThreadPool one(1), two(2), three(3);
  ThreadPool* pools[] = {&one, &two, &three};
  AdamWParams hp = base_params();
  hp.weight_decay = 0.1f;
  hp.grad_scale = 0.8f;
  for_each_isa([&](const std::string& isa) {
    // slots[0]: per-tensor calls on ctx.pool; slots[1..3]: multi on pools of 1, 2, 3 threads.
    std::vector<std::vector<std::unique_ptr<Slot>>> slots(4);
    std::vector<std::vector<double>> rp(T), rm(T), rv(T);
    for (size_t i = 0; i < T; ++i) {
      const DType pt = i % 2 ? DType::BF16 : DType::F32, gt = (i / 2) % 2 ? DType::BF16 : DType::F32;
      const Init init(sizes[i], 1000 + i, false);
      for (auto& set : slots) {
        set.emplace_back(new Slot(sizes[i], pt, gt));
        set.back()->set(init.p, init.m, init.v);
      }
      rp[i] = slots[0][i]->P();
      rm[i] = slots[0][i]->M();
      rv[i] = slots[0][i]->V();
    }
    for (int k = 0; k < 2; ++k) {
      hp.step = 10 + k;
      for (size_t i = 0; i < T; ++i) {
        const std::vector<double> g = randn(size_t(sizes[i]), 5000 + i * 3 + uint64_t(k));
        for (auto& set : slots) set[i]->set_grad(g);
        ref::adamw_step_ref(rp[i], rm[i], rv[i], slots[0][i]->G(), slots[0][i]->pt, hp);
      }
      for (size_t i = 0; i < T; ++i) {
        const Slot& s = *slots[0][i];
        adamw_step_cpu(s.p->data(), s.g->data(), static_cast<float*>(s.m->data()), static_cast<float*>(s.v->data()),
                       s.n, s.pt, s.gt, hp, ctx.pool);
      }
      for (int q = 0; q < 3; ++q) {
        std::vector<AdamWTensor> list;
        for (auto& s : slots[size_t(q) + 1]) list.push_back(s->tensor());
        adamw_step_multi_cpu(list.data(), int64_t(list.size()), hp, *pools[q]);
      }
    }
    for (int q = 0; q < 3; ++q) {
      size_t diff = 0;
      for (size_t i = 0; i < T; ++i) diff += !slots[size_t(q) + 1][i]->same_bits(*slots[0][i]);
      ctx.check(diff == 0, "adamw multi " + isa + " " + std::to_string(pools[q]->size()) +
                               " threads bitwise equal to per-tensor calls (" + std::to_string(diff) + " tensors differ)");
    }
    bool intact = true;
    for (auto& set : slots)
      for (auto& s : set) intact = intact && s->intact();
    ctx.check(intact, "adamw multi " + isa + " guards intact");
    for (size_t i = 0; i < T; ++i) {
      const Slot& s = *slots[2][i];
      if (s.n >= 97)
        check_state(ctx, "adamw multi " + isa + " tensor " + std::to_string(i) + " n " + std::to_string(s.n), s, rp[i],
                    rm[i], rv[i]);
    }
  });
}

// The AVX2 and AVX-512 paths do the same fp32 operations (explicit FMA) and agree bit for bit.
TK_TEST(optim_adamw_simd_paths_agree) {
  if (detected_isa() < CpuIsa::Avx512) {
    ctx.check(true, "adamw simd agreement: AVX-512 not present, skipped");
    return;
  }
  const int64_t n = 100003;
  const Init init(n, 77, false);
  const std::vector<double> g0 = randn(size_t(n), 78);
  AdamWParams hp = base_params();
  hp.weight_decay = 0.1f;
  hp.grad_scale = 0.37f;
  hp.step = 4;
  const CpuIsa saved = active_isa();
  for (DType pt : kParamTypes)
    for (DType gt : kGradTypes) {
      Slot a(n, pt, gt), b(n, pt, gt);
      for (Slot* s : {&a, &b}) {
        s->set(init.p, init.m, init.v);
        s->set_grad(g0);
      }
      set_active_isa(CpuIsa::Avx2);
      adamw_step_cpu(a.p->data(), a.g->data(), static_cast<float*>(a.m->data()), static_cast<float*>(a.v->data()), n,
                     pt, gt, hp, ctx.pool);
      set_active_isa(CpuIsa::Avx512);
      adamw_step_cpu(b.p->data(), b.g->data(), static_cast<float*>(b.m->data()), static_cast<float*>(b.v->data()), n,
                     pt, gt, hp, ctx.pool);
      ctx.check(a.same_bits(b), std::string("adamw avx2 == avx512 bitwise p ") + dtype_name(pt) + " g " + dtype_name(gt));
    }
  set_active_isa(saved);
}

// Bad arguments are rejected with tk::Error, and empty inputs are no-ops.
TK_TEST(optim_adamw_errors) {
  float p = 1, g = 1, m = 0, v = 0;
  auto throws = [&](const AdamWParams& hp, DType pt, DType gt) {
    try {
      adamw_step_cpu(&p, &g, &m, &v, 1, pt, gt, hp, ctx.pool);
    } catch (const Error&) {
      return true;
    }
    return false;
  };
  AdamWParams hp = base_params();
  ctx.check(throws(hp, DType::F16, DType::F32), "adamw rejects f16 params");
  ctx.check(throws(hp, DType::F32, DType::I32), "adamw rejects i32 grads");
  AdamWParams bad = hp;
  bad.step = 0;
  ctx.check(throws(bad, DType::F32, DType::F32), "adamw rejects step 0");
  bad = hp;
  bad.beta2 = 1.0f;
  ctx.check(throws(bad, DType::F32, DType::F32), "adamw rejects beta2 1");
  bad = hp;
  bad.lr = -1.0f;
  ctx.check(throws(bad, DType::F32, DType::F32), "adamw rejects negative lr");
  ctx.check(p == 1 && m == 0 && v == 0, "adamw leaves state untouched when it throws");
  adamw_step_multi_cpu(nullptr, 0, hp, ctx.pool);
  adamw_step_cpu(nullptr, nullptr, nullptr, nullptr, 0, DType::F32, DType::F32, hp, ctx.pool);
  ctx.check(true, "adamw accepts empty inputs");
  GradTensor bad_grad{&g, 1, DType::F16};
  bool threw = false;
  try {
    grad_norm_sq_cpu(&bad_grad, 1, ctx.pool);
  } catch (const Error&) {
    threw = true;
  }
  ctx.check(threw, "grad_norm_sq rejects f16 gradients");
  ctx.check(grad_norm_sq_cpu(nullptr, 0, ctx.pool) == 0.0, "grad_norm_sq of an empty list is 0");
}

// ==== gradient norm and clipping =======================================================================

namespace {

struct GradList {
  std::vector<std::unique_ptr<Guarded>> bufs;
  std::vector<GradTensor> list;
  std::vector<std::vector<double>> values;  // what the buffers hold
  void add(int64_t n, DType t, uint64_t seed, double scale) {
    bufs.emplace_back(new Guarded(size_t(n) * dtype_size(t)));
    from_double(scaled(randn(size_t(n), seed), scale), bufs.back()->data(), t);
    list.push_back({bufs.back()->data(), n, t});
    values.push_back(to_double(bufs.back()->data(), t, size_t(n)));
  }
  bool intact() const {
    for (auto& b : bufs)
      if (!b->intact()) return false;
    return true;
  }
};

std::vector<GradList> norm_cases() {
  std::vector<GradList> cases;
  for (int64_t n : kSizes)
    for (DType t : kGradTypes) {
      cases.emplace_back();
      cases.back().add(n, t, 40 + uint64_t(n), 1.0);
    }
  cases.emplace_back();  // 50 mixed tensors with magnitudes from 1e-3 to 1e2, one spanning several parts
  const std::vector<int64_t> sizes = mixed_sizes();
  for (size_t i = 0; i < sizes.size(); ++i)
    cases.back().add(i == 13 ? 300001 : sizes[i], i % 3 ? DType::F32 : DType::BF16, 900 + i, std::pow(10.0, double(i % 6) - 3));
  return cases;
}

std::string list_str(const GradList& c) {
  int64_t total = 0;
  for (auto& t : c.list) total += t.n;
  return std::to_string(c.list.size()) + " tensors, " + std::to_string(total) + " elements, first " +
         dtype_name(c.list[0].dtype);
}

}  // namespace

TK_TEST(optim_global_norm) {
  ThreadPool one(1), two(2), three(3);
  for (const GradList& c : norm_cases()) {
    const double want = ref::grad_norm_sq_ref(c.values);
    for_each_isa([&](const std::string& isa) {
      const std::string what = "grad_norm_sq " + isa + " " + list_str(c);
      const double got = grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), ctx.pool);
      const double rel = std::fabs(got - want) / want;
      char buf[64];
      std::snprintf(buf, sizeof buf, ": rel err %.2e", rel);
      ctx.check(rel < 1e-12, what + buf);
      const double g1 = grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), one);
      const double g2 = grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), two);
      const double g3 = grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), three);
      ctx.check(std::memcmp(&g1, &g2, 8) == 0 && std::memcmp(&g1, &g3, 8) == 0 && std::memcmp(&g1, &got, 8) == 0,
                what + " bitwise equal for 1, 2, 3 threads");
      ctx.check(c.intact(), what + " guards intact");
    });
  }
  // NaN and inf propagate.
  float bad[3] = {1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f};
  GradTensor t{bad, 3, DType::F32};
  for_each_isa([&](const std::string& isa) {
    ctx.check(std::isnan(grad_norm_sq_cpu(&t, 1, ctx.pool)), "grad_norm_sq " + isa + " NaN propagates");
  });
  bad[1] = std::numeric_limits<float>::infinity();
  for_each_isa([&](const std::string& isa) {
    ctx.check(std::isinf(grad_norm_sq_cpu(&t, 1, ctx.pool)), "grad_norm_sq " + isa + " inf propagates");
  });
}

TK_TEST(optim_clip) {
  // The coefficient, as torch.nn.utils.clip_grad_norm_ computes it (fp32).
  ctx.check(clip_coefficient(0.5, 1.0) == 1.0f, "clip coef: norm below max -> 1");
  ctx.check(clip_coefficient(0.0, 1.0) == 1.0f, "clip coef: zero norm -> 1");
  ctx.check(clip_coefficient(1.0, 1.0) == 1.0f / (1.0f + 1e-6f) && clip_coefficient(1.0, 1.0) < 1.0f,
            "clip coef: norm == max -> max / (norm + 1e-6) < 1");
  for (double norm : {2.0, 10.0, 12345.678, 1e10}) {
    const float c = clip_coefficient(norm, 1.5);
    const bool exact = c == 1.5f / (float(norm) + 1e-6f);
    const bool close = std::fabs(double(c) - ref::clip_coefficient_ref(norm, 1.5)) <= 1e-6 * ref::clip_coefficient_ref(norm, 1.5);
    ctx.check(exact && close, "clip coef: norm " + std::to_string(norm) + " above max 1.5 -> max / (norm + 1e-6)");
  }
  ctx.check(std::isnan(clip_coefficient(std::nan(""), 1.0)), "clip coef: NaN norm -> NaN (torch.clamp keeps NaN)");
  ctx.check(clip_coefficient(INFINITY, 1.0) == 0.0f, "clip coef: inf norm -> 0");

  // Scaling in place: exact (one fp32 multiply, bf16 rounded once), every ISA, guarded buffers.
  for_each_isa([&](const std::string& isa) {
    std::vector<GradList> cases = norm_cases();
    for (GradList& c : cases) {
      const double norm = std::sqrt(grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), ctx.pool));
      const float coef = clip_coefficient(norm, 0.25 * norm);  // clips to a quarter
      scale_grads_cpu(c.list.data(), int64_t(c.list.size()), coef, ctx.pool);
      size_t bad = 0;
      for (size_t i = 0; i < c.list.size(); ++i) {
        const std::vector<double> want = ref::scale_ref(c.values[i], coef, c.list[i].dtype);
        const std::vector<double> got = to_double(c.list[i].data, c.list[i].dtype, size_t(c.list[i].n));
        for (size_t k = 0; k < got.size(); ++k) bad += got[k] != want[k];
      }
      const std::string what = "scale_grads " + isa + " " + list_str(c);
      ctx.check(bad == 0, what + " exact (" + std::to_string(bad) + " elements differ)");
      ctx.check(c.intact(), what + " guards intact");
      // After clipping the global norm is max_norm (up to fp32/bf16 rounding of the scaled values).
      const double after = std::sqrt(grad_norm_sq_cpu(c.list.data(), int64_t(c.list.size()), ctx.pool));
      ctx.check(std::fabs(after / (0.25 * norm) - 1) < 1e-2, what + " norm after clipping is max_norm");
    }
  });
}

// ==== --perf ==========================================================================================

// 100M parameters over 200 tensors of 500k: one AdamW step (f32 master params and grads; bf16
// params and grads), the gradient norm and the in-place scaling. GB/s counts the bytes a step must
// move: read p, g, m, v and write p, m, v.
TK_TEST(optim_perf) {
  if (!ctx.opt.perf) return;
  const int64_t kTensors = 200, kEach = 500000, kTotal = kTensors * kEach;
  std::printf("  perf threads %d, isa %s, %lld params in %lld tensors\n", ctx.pool.size(), isa_name(active_isa()),
              (long long)kTotal, (long long)kTensors);
  auto report = [&](const char* what, double seconds, double bytes) {
    std::printf("  perf %-40s %8.2f ms %8.1f GB/s\n", what, seconds * 1e3, bytes / seconds / 1e9);
  };
  for (DType t : {DType::F32, DType::BF16}) {
    const size_t es = dtype_size(t);
    std::vector<float> m(size_t(kTotal), 0.0f), v(size_t(kTotal), 0.0f);
    std::vector<unsigned char> p(size_t(kTotal) * es), g(size_t(kTotal) * es);
    {  // cheap deterministic contents: p ~ 0.5, g in [-1, 1]
      std::vector<double> pv(4096), gv(4096);
      for (size_t i = 0; i < 4096; ++i) {
        pv[i] = 0.5 + 1e-3 * double(i % 97);
        gv[i] = double(int(i % 201) - 100) / 100.0;
      }
      std::vector<unsigned char> pb(4096 * es), gb(4096 * es);
      from_double(pv, pb.data(), t);
      from_double(gv, gb.data(), t);
      for (size_t off = 0; off < p.size(); off += pb.size()) {
        std::memcpy(p.data() + off, pb.data(), std::min(pb.size(), p.size() - off));
        std::memcpy(g.data() + off, gb.data(), std::min(gb.size(), g.size() - off));
      }
    }
    std::vector<AdamWTensor> list;
    std::vector<GradTensor> grads;
    for (int64_t i = 0; i < kTensors; ++i) {
      list.push_back({p.data() + size_t(i * kEach) * es, g.data() + size_t(i * kEach) * es, m.data() + i * kEach,
                      v.data() + i * kEach, kEach, t, t});
      grads.push_back({g.data() + size_t(i * kEach) * es, kEach, t});
    }
    AdamWParams hp = base_params();
    hp.weight_decay = 0.1f;
    const double step_bytes = double(kTotal) * (2 * es + 8 + es + 8);
    const std::string tag = std::string(" (p, g ") + dtype_name(t) + ")";
    double s = time_median([&] { adamw_step_multi_cpu(list.data(), kTensors, hp, ctx.pool); ++hp.step; }, 3);
    report(("adamw_step_multi" + tag).c_str(), s, step_bytes);
    double sink = 0;
    s = time_median([&] { sink += grad_norm_sq_cpu(grads.data(), kTensors, ctx.pool); }, 3);
    report(("grad_norm_sq" + tag).c_str(), s, double(kTotal) * es);
    s = time_median([&] { scale_grads_cpu(grads.data(), kTensors, 1.0f, ctx.pool); }, 3);
    report(("scale_grads" + tag).c_str(), s, double(kTotal) * es * 2);
    if (std::isnan(sink)) std::printf("  (nan)\n");
  }
}
