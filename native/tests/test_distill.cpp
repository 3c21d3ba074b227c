// Tests of cpu/distill (forward_kl, reverse_kl, jsd; forward, backward, fused) against
// ref/distill_ref.
//
// Shapes are odd (N in {1, 7, 97}, V in {1, 97, 1025}) so that no V is a multiple of a SIMD width;
// about 20% of the rows are ignored. Every case runs at temperature 1 and 2, with F32 and BF16
// logits, on every ISA level the machine has (set_active_isa over CpuIsa up to detected_isa(),
// restored afterwards), into guarded buffers. The reference gets the very values the kernel read
// (bf16 logits are rounded first and widened), so only the kernel's arithmetic and its output
// rounding are measured.
//
// Tolerances (NMSE):
// - F32 losses and gradients: 1e-10. The SIMD exp/log are ~1 ulp (relative 1.2e-7); each row's
//   log-sum-exp is off by ~1e-7 absolute, so log q and log p are, and the divergence terms carry
//   that error: relative errors ~1e-6 at worst (D is a sum of signed terms of size ~|D|), NMSE
//   ~1e-12. 1e-10 is 100x that and far below bf16's 1e-6, so a wrong formula cannot pass.
// - BF16 gradients: one rounding to nearest bf16 moves each element by at most 2^-8 relative, so
//   NMSE <= 2^-16 = 1.53e-5; held to 2e-5. Losses from BF16 logits are F32 and keep 1e-10.
// - Where the reference is zero (V = 1: both distributions are 1, D = 0, gradient 0), NMSE is
//   undefined (jsd's log m = logaddexp(log beta, log(1 - beta)) is zero only to rounding, in
//   double and in fp32); there the largest absolute value must be <= 1e-6.
// Modes: default runs correctness; --grad (distill_grad) checks the reference backward against
// central differences of the reference forward; --perf prints throughput at N = 2048, V = 32000.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/distill.h"
#include "../cpu/isa.h"
#include "../ref/distill_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

constexpr int32_t kIgnore = -100;
constexpr double kTolF32 = 1e-10;
constexpr double kTolBf16 = 2e-5;

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

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
  void fill(unsigned char byte) { mem->fill(byte); }
  int32_t* ids() const { return static_cast<int32_t*>(mem->data()); }
  std::vector<int32_t> ids_vec() const { return std::vector<int32_t>(ids(), ids() + n()); }
};

bool same_bits(const Buf& a, const Buf& b) {
  return a.mem->bytes() == b.mem->bytes() && std::memcmp(a.mem->data(), b.mem->data(), a.mem->bytes()) == 0;
}

template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (int i = 0; i <= int(detected_isa()); ++i) {
    CpuIsa isa = set_active_isa(CpuIsa(i));
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

// NMSE, or the largest absolute value where the reference is zero (to double rounding: every
// |ref| <= 1e-12).
bool check_close(Context& ctx, const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& ref, double tol) {
  bool zero = true;
  for (double r : ref) zero = zero && std::fabs(r) <= 1e-12;
  if (!zero) return ctx.check_nmse(what, got, ref, tol);
  double mx = 0;
  for (double g : got) mx = std::max(mx, std::fabs(g));
  char buf[80];
  std::snprintf(buf, sizeof buf, ": zero reference, max |got| %.3e (tol 1e-6)", mx);
  return ctx.check(got.size() == ref.size() && mx <= 1e-6, what + buf);
}

struct KindCase {
  DistillKind kind;
  float beta;
  const char* name;
};
const KindCase kKinds[] = {{DistillKind::ForwardKl, 0.5f, "forward_kl"},
                           {DistillKind::ReverseKl, 0.5f, "reverse_kl"},
                           {DistillKind::Jsd, 0.5f, "jsd(0.5)"},
                           {DistillKind::Jsd, 0.2f, "jsd(0.2)"}};

// Student randn * 2; teacher correlated with it (0.6 s + randn * 1.5); ~20% of the targets ignored.
void make_inputs(int64_t N, int64_t V, uint64_t seed, std::vector<double>* s, std::vector<double>* t,
                 std::vector<int32_t>* y) {
  std::vector<double> a = randn(size_t(N * V), seed), b = randn(size_t(N * V), seed + 1);
  s->resize(a.size());
  t->resize(a.size());
  for (size_t i = 0; i < a.size(); ++i) (*s)[i] = 2 * a[i], (*t)[i] = 1.2 * a[i] + 1.5 * b[i];
  std::vector<double> u = uniform(size_t(N), seed + 2, 0, 1), w = uniform(size_t(N), seed + 3, 0, double(V));
  y->resize(size_t(N));
  for (int64_t n = 0; n < N; ++n)
    (*y)[size_t(n)] = u[size_t(n)] < 0.2 ? kIgnore : int32_t(std::min<double>(std::floor(w[size_t(n)]), double(V - 1)));
}

// One case, every ISA: forward, backward, fused against the reference.
void run_case(Context& ctx, const std::string& name, const Buf& s, const Buf& t, const Buf* targets, int64_t N,
              int64_t V, const DistillParams& p) {
  const std::vector<double> sv = s.values(), tv = t.values();
  const std::vector<int32_t> yv = targets ? targets->ids_vec() : std::vector<int32_t>();
  const double dloss = 0.7;
  const ref::DistillForward rf =
      ref::distill_forward(sv, tv, yv, N, V, p.kind, p.temperature, p.beta, p.ignore_index);
  const std::vector<double> rb =
      ref::distill_backward(sv, tv, yv, N, V, p.kind, p.temperature, p.beta, p.ignore_index, dloss);
  const TensorView yview = targets ? targets->view() : TensorView{};
  const double gtol = s.dtype == DType::F32 ? kTolF32 : kTolBf16;
  for_each_isa([&](const std::string& isa) {
    const std::string what = name + " " + isa;
    Buf losses({N}, DType::F32), loss({1}, DType::F32), d1(s.shape, s.dtype), l2({N}, DType::F32),
        o2({1}, DType::F32), d2(s.shape, s.dtype), dl({1}, DType::F32);
    dl.set({dloss});
    d1.fill(0x7f);
    d2.fill(0x7f);
    distill_forward_cpu(s.view(), t.view(), yview, p, losses.view(), loss.view(), ctx.pool);
    check_close(ctx, what + " fwd losses", losses.values(), rf.losses, kTolF32);
    check_close(ctx, what + " fwd loss", loss.values(), {rf.loss}, kTolF32);
    distill_backward_cpu(s.view(), t.view(), yview, p, dl.view(), d1.view(), ctx.pool);
    check_close(ctx, what + " bwd dstudent", d1.values(), rb, gtol);
    distill_fused_cpu(s.view(), t.view(), yview, p, float(dloss), l2.view(), o2.view(), d2.view(), ctx.pool);
    ctx.check(same_bits(l2, losses) && same_bits(o2, loss) && same_bits(d2, d1),
              what + " fused: outputs equal forward's and backward's bitwise");
    ctx.check(losses.intact() && loss.intact() && d1.intact() && l2.intact() && o2.intact() && d2.intact(),
              what + ": guard bytes");
  });
}

}  // namespace

// ==== correctness =====================================================================================

TK_TEST(distill_vs_ref) {
  const int64_t Ns[] = {1, 7, 97}, Vs[] = {1, 97, 1025};
  const float temps[] = {1.0f, 2.0f};
  const DType types[] = {DType::F32, DType::BF16};
  uint64_t seed = 100;
  for (int64_t N : Ns)
    for (int64_t V : Vs) {
      std::vector<double> sv, tv;
      std::vector<int32_t> yv;
      make_inputs(N, V, seed += 10, &sv, &tv, &yv);
      Buf y({N}, DType::I32);
      std::memcpy(y.ids(), yv.data(), yv.size() * 4);
      for (DType dt : types) {
        Buf s({N, V}, dt), t({N, V}, dt);
        s.set(sv);
        t.set(tv);
        for (const KindCase& k : kKinds)
          for (float T : temps) {
            DistillParams p;
            p.kind = k.kind;
            p.beta = k.beta;
            p.temperature = T;
            p.ignore_index = kIgnore;
            char name[128];
            std::snprintf(name, sizeof name, "distill %s [%lld, %lld] %s T=%g", k.name, (long long)N, (long long)V,
                          dtype_name(dt), double(T));
            run_case(ctx, name, s, t, &y, N, V, p);
          }
      }
    }
}

TK_TEST(distill_variants) {
  // [3, 5, 131]: leading dims fold into rows; no targets (every row counts); mixed dtypes; all
  // rows ignored (loss 0, zero gradients); jsd's beta = 0 / 1 are forward / reverse KL.
  const int64_t N = 15, V = 131;
  std::vector<double> sv, tv;
  std::vector<int32_t> yv;
  make_inputs(N, V, 7, &sv, &tv, &yv);
  Buf s({3, 5, V}, DType::F32), t({3, 5, V}, DType::F32), sb({3, 5, V}, DType::BF16), tb({3, 5, V}, DType::BF16);
  s.set(sv);
  t.set(tv);
  sb.set(sv);
  tb.set(tv);
  Buf y({3, 5}, DType::I32), yall({15}, DType::I32);
  std::memcpy(y.ids(), yv.data(), yv.size() * 4);
  for (int i = 0; i < 15; ++i) yall.ids()[i] = kIgnore;
  for (const KindCase& k : kKinds) {
    DistillParams p;
    p.kind = k.kind;
    p.beta = k.beta;
    p.temperature = 1.5f;
    const std::string kn = k.name;
    run_case(ctx, "distill " + kn + " [3, 5, 131] no targets", s, t, nullptr, N, V, p);
    run_case(ctx, "distill " + kn + " [3, 5, 131] bf16 student f32 teacher", sb, t, &y, N, V, p);
    run_case(ctx, "distill " + kn + " [3, 5, 131] f32 student bf16 teacher", s, tb, &y, N, V, p);
    run_case(ctx, "distill " + kn + " [3, 5, 131] all ignored", s, t, &yall, N, V, p);
  }
  // jsd edges against the KLs, through the kernels.
  for (float beta : {0.0f, 1.0f}) {
    DistillParams pj, pk;
    pj.kind = DistillKind::Jsd;
    pj.beta = beta;
    pk.kind = beta == 0.0f ? DistillKind::ForwardKl : DistillKind::ReverseKl;
    Buf l1({N}, DType::F32), o1({1}, DType::F32), l2({N}, DType::F32), o2({1}, DType::F32), d1(s.shape, DType::F32),
        d2(s.shape, DType::F32);
    distill_fused_cpu(s.view(), t.view(), y.view(), pj, 1.0f, l1.view(), o1.view(), d1.view(), ctx.pool);
    distill_fused_cpu(s.view(), t.view(), y.view(), pk, 1.0f, l2.view(), o2.view(), d2.view(), ctx.pool);
    ctx.check(same_bits(l1, l2) && same_bits(o1, o2) && same_bits(d1, d2),
              std::string("distill jsd beta=") + (beta == 0 ? "0 is forward_kl" : "1 is reverse_kl"));
    run_case(ctx, std::string("distill jsd(") + (beta == 0 ? "0" : "1") + ") [3, 5, 131]", s, t, &y, N, V, pj);
  }
}

TK_TEST(distill_large_logits) {
  // Logits of size ~1e4 (rows offset by +-5000..1e4) and peaky (x 6): only the max shift keeps exp
  // in range; the result equals the reference to the usual bound. (Scales much beyond this make
  // both distributions one-hot, where reverse_kl's gradient q (log q - log p - D) is a difference
  // of two values ~D that cancel to ~0: fp32 cannot resolve it, in any formulation.)
  const int64_t N = 5, V = 257;
  std::vector<double> sv, tv;
  std::vector<int32_t> yv;
  make_inputs(N, V, 31, &sv, &tv, &yv);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      sv[size_t(n * V + v)] = 6 * sv[size_t(n * V + v)] + (n % 2 ? 5000.0 : -8000.0) + 1000.0 * double(n);
      tv[size_t(n * V + v)] = 6 * tv[size_t(n * V + v)] - 7000.0 + 3000.0 * double(n);
    }
  Buf s({N, V}, DType::F32), t({N, V}, DType::F32), y({N}, DType::I32);
  s.set(sv);
  t.set(tv);
  std::memcpy(y.ids(), yv.data(), yv.size() * 4);
  for (const KindCase& k : kKinds) {
    DistillParams p;
    p.kind = k.kind;
    p.beta = k.beta;
    p.temperature = 2.0f;
    run_case(ctx, std::string("distill ") + k.name + " large logits", s, t, &y, N, V, p);
  }
}

TK_TEST(distill_errors) {
  // Bad arguments throw tk::Error naming the kernel and operand, and leave outputs untouched.
  const int64_t N = 4, V = 9;
  Buf s({N, V}, DType::F32), t({N, V}, DType::F32), t2({N, V + 1}, DType::F32), y({N}, DType::I32),
      ybad({N}, DType::I32), losses({N}, DType::F32), loss({1}, DType::F32), d({N, V}, DType::F32),
      dl({1}, DType::F32), dbf({N, V}, DType::BF16);
  s.set(randn(size_t(N * V), 1));
  t.set(randn(size_t(N * V), 2));
  for (int i = 0; i < N; ++i) y.ids()[i] = i, ybad.ids()[i] = i;
  ybad.ids()[2] = int32_t(V);
  dl.set({1.0});
  losses.fill(0x11);
  loss.fill(0x11);
  d.fill(0x11);
  DistillParams p;
  auto expect = [&](const char* what, const char* part, auto fn) {
    std::string msg = "(no exception)";
    bool ok = false;
    try {
      fn();
    } catch (const Error& e) {
      msg = e.what();
      ok = msg.find(part) != std::string::npos;
    }
    ctx.check(ok, std::string("distill_errors ") + what + ": " + msg);
  };
  expect("teacher shape", "teacher", [&] {
    distill_forward_cpu(s.view(), t2.view(), y.view(), p, losses.view(), loss.view(), ctx.pool);
  });
  expect("target range", "targets[2]", [&] {
    distill_forward_cpu(s.view(), t.view(), ybad.view(), p, losses.view(), loss.view(), ctx.pool);
  });
  DistillParams pt = p;
  pt.temperature = 0.0f;
  expect("temperature", "temperature", [&] {
    distill_fused_cpu(s.view(), t.view(), y.view(), pt, 1.0f, losses.view(), loss.view(), d.view(), ctx.pool);
  });
  DistillParams pb = p;
  pb.kind = DistillKind::Jsd;
  pb.beta = 1.5f;
  expect("beta", "beta", [&] {
    distill_forward_cpu(s.view(), t.view(), y.view(), pb, losses.view(), loss.view(), ctx.pool);
  });
  expect("dstudent dtype", "dstudent", [&] {
    distill_backward_cpu(s.view(), t.view(), y.view(), p, dl.view(), dbf.view(), ctx.pool);
  });
  bool untouched = true;
  for (Buf* b : {&losses, &loss, &d}) {
    const unsigned char* c = static_cast<const unsigned char*>(b->mem->data());
    for (size_t i = 0; i < b->mem->bytes(); ++i) untouched = untouched && c[i] == 0x11;
  }
  ctx.check(untouched, "distill_errors: outputs untouched by rejected calls");
}

// ==== --grad ===========================================================================================

TK_TEST(distill_grad) {
  // The reference backward (the closed forms the kernels implement) against central differences
  // of the reference forward, h = 1e-5 on logits of size ~2: truncation ~h^2, rounding ~1e-16 / h,
  // so NMSE ~1e-20; held to 1e-12.
  const int64_t N = 4, V = 11;
  std::vector<double> sv, tv;
  std::vector<int32_t> yv;
  make_inputs(N, V, 5, &sv, &tv, &yv);
  yv = {3, kIgnore, 0, 10};
  const double dloss = 0.7, h = 1e-5;
  for (const KindCase& k : kKinds)
    for (double T : {1.0, 2.0}) {
      const std::vector<double> an =
          ref::distill_backward(sv, tv, yv, N, V, k.kind, T, k.beta, kIgnore, dloss);
      std::vector<double> fd(sv.size());
      for (size_t i = 0; i < sv.size(); ++i) {
        std::vector<double> sp = sv, sm = sv;
        sp[i] += h;
        sm[i] -= h;
        const double lp = ref::distill_forward(sp, tv, yv, N, V, k.kind, T, k.beta, kIgnore).loss;
        const double lm = ref::distill_forward(sm, tv, yv, N, V, k.kind, T, k.beta, kIgnore).loss;
        fd[i] = dloss * (lp - lm) / (2 * h);
      }
      char name[96];
      std::snprintf(name, sizeof name, "distill_grad %s T=%g: ref backward vs central differences", k.name, T);
      ctx.check_nmse(name, an, fd, 1e-12);
      // log_softmax is invariant to adding a constant to a row, so each gradient row sums to 0.
      double worst = 0;
      for (int64_t n = 0; n < N; ++n) {
        double sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += an[size_t(n * V + v)];
        worst = std::max(worst, std::fabs(sum));
      }
      ctx.check(worst < 1e-12, std::string(name) + ": gradient rows sum to 0");
    }
}

// ==== --perf ===========================================================================================

TK_TEST(distill_perf) {
  const int64_t N = 2048, V = 32000;
  std::printf("  perf threads %d, isa %s\n", ctx.pool.size(), isa_name(active_isa()));
  std::vector<double> a = randn(size_t(N * V), 3);
  for (DType dt : {DType::F32, DType::BF16}) {
    Buf s({N, V}, dt), t({N, V}, dt), y({N}, DType::I32), losses({N}, DType::F32), loss({1}, DType::F32),
        d({N, V}, dt);
    s.set(a);
    std::vector<double> b(a.rbegin(), a.rend());
    t.set(b);
    for (int64_t n = 0; n < N; ++n) y.ids()[n] = n % 10 == 0 ? kIgnore : int32_t(n % V);
    const double bytes_in = 2.0 * double(N * V) * double(dtype_size(dt));
    for (const KindCase& k : kKinds) {
      DistillParams p;
      p.kind = k.kind;
      p.beta = k.beta;
      p.temperature = 2.0f;
      double f = time_median([&] {
        distill_forward_cpu(s.view(), t.view(), y.view(), p, losses.view(), loss.view(), ctx.pool);
      }, 3);
      double fu = time_median([&] {
        distill_fused_cpu(s.view(), t.view(), y.view(), p, 1.0f, losses.view(), loss.view(), d.view(), ctx.pool);
      }, 3);
      std::printf("  perf distill %-10s [2048, 32000] %-4s forward %8.2f ms (%5.1f GB/s of logits)  fused %8.2f ms"
                  " (%5.1f GB/s moved)\n",
                  k.name, dtype_name(dt), f * 1e3, bytes_in / f / 1e9, fu * 1e3,
                  (bytes_in * 1.5) / fu / 1e9);
    }
  }
  ctx.check(true, "distill_perf ran");
}
