// Tests of cpu/loss (cross entropy, sequence log-probabilities, DPO; forward and backward) against
// ref/loss_ref.
//
// Shapes are odd (N in {1, 7, 97}, V in {1, 97, 1025, 32011}) so that no size is a multiple of a
// SIMD width or of the 4-vector online-softmax block; about 20% of the targets are ignore_index.
// Every case runs on every ISA level the machine has (set_active_isa over CpuIsa up to
// detected_isa(), restored afterwards), writes into guarded buffers, and covers F32 and BF16
// logits. The reference gets the very values the kernel read (bf16 logits are rounded first and
// widened), so only the kernel's arithmetic and its output rounding are measured.
//
// Tolerances (NMSE), from the error budget of the fp32 kernels:
// - The SIMD exp has a relative error below 2.5e-7 (loss_exp_accuracy measures 1.17e-7, ~1 ulp);
//   std::exp on the portable path is within 1 ulp. The row sum S = sum exp(x - m) is accumulated
//   in 64 (AVX-512) / 32 (AVX2) / 8 (portable) fp32 lanes of at most ~4000 terms, each term off by
//   <= 2.5e-7 relative, the sum by ~sqrt(terms) * 6e-8 typically, so log S (hence lse and the loss)
//   is off by ~1e-6 absolute at V = 32011. Losses are ~3..12 here: NMSE ~1e-13. Gradients
//   p = exp(x - lse) carry the exp error plus the lse error as a relative error (~1e-6 at worst):
//   NMSE ~1e-12. F32 losses, lse and gradients are held to 1e-10 (100x margin on the worst case,
//   still far below bf16's 1e-6, so a wrong formula or a dropped term cannot pass).
// - BF16 gradients: one rounding to nearest bf16 moves each element by at most 2^-8 of its value,
//   so NMSE <= 2^-16 = 1.53e-5 whatever the distribution (typical 1e-6, but a row whose target
//   element dominates the norm reaches ~6e-6 here); held to 2e-5 = that bound plus the fp32
//   error. Losses and lse from BF16 logits are F32 outputs and keep the F32 bound.
// - Extreme logits (+-1e4, -inf entries, rows sorted so the running max moves in every block):
//   the same bounds; an error in the online rescaling shows as an O(1) relative error.
// - DPO is computed in double and stored as F32: NMSE ~1e-15, held to 1e-12.
// Modes: default runs correctness, --grad checks the backward rules against central differences
// of the double reference, --perf prints cross entropy throughput at N = 4096, V = 32000.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/isa.h"
#include "../cpu/loss.h"
#include "../ref/loss_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

const DType kTypes[] = {DType::F32, DType::BF16};
const LossReduction kReductions[] = {LossReduction::None, LossReduction::Sum, LossReduction::Mean};
constexpr int32_t kIgnore = kDefaultIgnoreIndex;
constexpr double kTolF32 = 1e-10;
constexpr double kTolBf16 = 2e-5;  // 2^-16 (bf16 rounding) + fp32 error

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
  void fill(unsigned char byte) { mem->fill(byte); }
  int32_t* ids() const { return static_cast<int32_t*>(mem->data()); }
  std::vector<int32_t> ids_vec() const { return std::vector<int32_t>(ids(), ids() + n()); }
};

void randomize(Buf& b, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  std::vector<double> v = randn(size_t(b.n()), seed);
  for (double& x : v) x = x * scale + shift;
  b.set(v);
}

// Targets uniform in [0, V), each ignore_index with probability `ignored`.
void random_targets(Buf& b, uint64_t seed, int64_t V, double ignored) {
  std::vector<double> u = uniform(size_t(b.n()), seed, 0, double(V)), w = uniform(size_t(b.n()), seed + 1, 0, 1);
  for (size_t i = 0; i < u.size(); ++i)
    b.ids()[i] = w[i] < ignored ? kIgnore : int32_t(std::min<double>(std::floor(u[i]), double(V - 1)));
}

// Every ISA level up to what this CPU has (Avx512Bf16 included: it runs the AVX-512 code),
// restoring the active level afterwards.
template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (int i = 0; i <= int(detected_isa()); ++i) {
    CpuIsa isa = set_active_isa(CpuIsa(i));
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

double grad_tol(DType t) { return t == DType::F32 ? kTolF32 : kTolBf16; }

std::vector<double> scaled(const std::vector<double>& v, double s) {
  std::vector<double> r(v);
  for (double& x : r) x *= s;
  return r;
}

bool same_bits(const Buf& a, const Buf& b) {
  return a.mem->bytes() == b.mem->bytes() && std::memcmp(a.mem->data(), b.mem->data(), a.mem->bytes()) == 0;
}

template <class F>
bool throws_with(F&& fn, std::initializer_list<const char*> parts, std::string* msg) {
  try {
    fn();
  } catch (const Error& e) {
    *msg = e.what();
    for (const char* p : parts)
      if (msg->find(p) == std::string::npos) return false;
    return true;
  }
  *msg = "(no exception)";
  return false;
}

// One cross-entropy case: logits and targets given; every ISA, every reduction, forward, backward
// and fused, against the reference.
void run_ce_case(Context& ctx, const std::string& name, const Buf& logits, const Buf& targets, int64_t N, int64_t V) {
  const DType t = logits.dtype;
  const std::vector<double> xv = logits.values();
  const std::vector<int32_t> tv = targets.ids_vec();
  const ref::CrossEntropyForward rf = ref::cross_entropy_forward(xv, tv, N, V, kIgnore, LossReduction::Sum);
  int64_t valid = 0;
  for (int32_t y : tv) valid += y != kIgnore;
  // softmax - onehot (zero rows for ignored rows) once; each reduction scales it.
  const std::vector<double> unit = ref::cross_entropy_backward(xv, tv, N, V, kIgnore, LossReduction::Sum, {1.0});
  Buf dl_rows({N}, DType::F32);
  randomize(dl_rows, 77 + uint64_t(N));
  const std::vector<double> dlr = dl_rows.values();
  const std::vector<double> ref_none = ref::cross_entropy_backward(xv, tv, N, V, kIgnore, LossReduction::None, dlr);
  const double dscalar = 0.7;
  const std::vector<double> ref_sum = scaled(unit, dscalar), ref_mean = scaled(unit, valid ? dscalar / double(valid) : 0.0);

  for_each_isa([&](const std::string& isa) {
    for (LossReduction r : kReductions) {
      const std::string what = name + " " + dtype_name(t) + " " + reduction_name(r) + " " + isa;
      Buf losses({N}, DType::F32), lse({N}, DType::F32), loss({1}, DType::F32);
      Buf d1(logits.shape, t), d2(logits.shape, t), l2({N}, DType::F32), s2({N}, DType::F32), o2({1}, DType::F32);
      Buf dl1({1}, DType::F32);
      dl1.set({dscalar});
      d1.fill(0x7f);
      d2.fill(0x7f);
      cross_entropy_forward_cpu(logits.view(), targets.view(), kIgnore, r, losses.view(), lse.view(), loss.view(),
                                ctx.pool);
      ctx.check_nmse(what + " fwd losses", losses.values(), rf.losses, kTolF32);
      ctx.check_nmse(what + " fwd lse", lse.values(), rf.lse, kTolF32);
      double want = r == LossReduction::Mean ? (valid ? rf.loss / double(valid) : 0.0) : rf.loss;
      if (r != LossReduction::None) ctx.check_nmse(what + " fwd loss", loss.values(), {want}, kTolF32);

      // backward from the saved lse
      const Buf& dl = r == LossReduction::None ? dl_rows : dl1;
      cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), dl.view(), kIgnore, r, d1.view(), ctx.pool);
      const std::vector<double>& scalar_ref = r == LossReduction::Mean ? ref_mean : ref_sum;
      ctx.check_nmse(what + " bwd dlogits", d1.values(), r == LossReduction::None ? ref_none : scalar_ref, grad_tol(t));

      // fused forward + backward, scalar upstream gradient
      cross_entropy_fused_cpu(logits.view(), targets.view(), kIgnore, r, float(dscalar), l2.view(), s2.view(),
                              o2.view(), d2.view(), ctx.pool);
      ctx.check(same_bits(l2, losses) && same_bits(s2, lse) && (r == LossReduction::None || same_bits(o2, loss)),
                what + " fused: forward outputs equal the forward kernel's bitwise");
      // Sum/Mean: the same rows, lse and scale as the split backward, so the same bits; None: the
      // scalar dloss goes to every row.
      if (r == LossReduction::None)
        ctx.check_nmse(what + " fused dlogits", d2.values(), ref_sum, grad_tol(t));
      else
        ctx.check(same_bits(d2, d1), what + " fused dlogits equal the backward kernel's bitwise");
      ctx.check(losses.intact() && lse.intact() && loss.intact() && d1.intact() && d2.intact() && l2.intact() &&
                    s2.intact() && o2.intact(),
                what + ": guard bytes");
    }
  });
}

}  // namespace

// ==== correctness =====================================================================================

TK_TEST(loss_exp_accuracy) {
  // Every 127th fp32 bit pattern in [-87.3365, -0] (~8.8M values, both ends included), against
  // exp in double. Max relative error held to 2.5e-7; below ln(FLT_MIN) the result is 0; NaN -> 0.
  const uint32_t lo_bits = f32_to_bits(-87.3365f);
  std::vector<float> x;
  for (uint32_t u = 0x80000000u; u <= lo_bits; u += 127) x.push_back(bits_to_f32(u));
  x.push_back(-87.3365f);
  x.push_back(0.0f);
  std::vector<float> y(x.size());
  for_each_isa([&](const std::string& isa) {
    vexp_nonpos_cpu(x.data(), y.data(), int64_t(x.size()));
    double worst = 0, at = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      double e = std::exp(double(x[i]));
      double rel = std::fabs(double(y[i]) - e) / e;
      if (rel > worst) worst = rel, at = x[i];
    }
    char buf[128];
    std::snprintf(buf, sizeof buf, "exp %s: max relative error %.3e at x = %.9g over %zu values", isa.c_str(), worst, at,
                  x.size());
    std::printf("  %s\n", buf);
    ctx.check(worst <= 2.5e-7, buf);
    float edge[] = {-87.5f, -100.0f, -1e4f, -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f};
    float out[7];
    vexp_nonpos_cpu(edge, out, 7);
    bool ok = out[5] == 1.0f && out[6] == 1.0f;
    for (int i = 0; i < 4; ++i) ok = ok && out[i] >= 0 && out[i] < 1.2e-38f;
    if (isa != "portable") ok = ok && out[4] == 0.0f;
    ctx.check(ok, "exp " + isa + ": flushes below ln(FLT_MIN), -inf -> 0, exp(+-0) = 1");
  });
}

TK_TEST(loss_cross_entropy_forward_backward) {
  const int64_t rows[] = {1, 7, 97};
  const int64_t cols[] = {1, 97, 1025, 32011};
  for (DType t : kTypes)
    for (int64_t N : rows)
      for (int64_t V : cols) {
        Buf logits({N, V}, t), targets({N}, DType::I32);
        randomize(logits, 100 + uint64_t(N * 131 + V), 3.0);
        random_targets(targets, 200 + uint64_t(N + V), V, 0.2);
        run_ce_case(ctx, "cross_entropy " + shape_str({N, V}), logits, targets, N, V);
      }
}

TK_TEST(loss_cross_entropy_all_ignored) {
  // No non-ignored row: mean is 0 (not NaN), sum 0, every gradient row zero; a custom
  // ignore_index (0, inside [0, V)) is honoured.
  for (int32_t ignore : {kIgnore, 0}) {
    for (DType t : kTypes) {
      const int64_t N = 7, V = 97;
      Buf logits({N, V}, t), targets({N}, DType::I32);
      randomize(logits, 5);
      for (int64_t n = 0; n < N; ++n) targets.ids()[n] = ignore;
      for_each_isa([&](const std::string& isa) {
        for (LossReduction r : kReductions) {
          std::string what = std::string("all ignored (ignore_index ") + std::to_string(ignore) + ") " +
                             dtype_name(t) + " " + reduction_name(r) + " " + isa;
          Buf losses({N}, DType::F32), lse({N}, DType::F32), loss({1}, DType::F32), d({N, V}, t);
          Buf dl(r == LossReduction::None ? Shape{N} : Shape{1}, DType::F32);
          randomize(dl, 6);
          d.fill(0x7f);
          loss.fill(0x7f);
          cross_entropy_fused_cpu(logits.view(), targets.view(), ignore, r, 1.0f, losses.view(), lse.view(),
                                  loss.view(), d.view(), ctx.pool);
          std::vector<double> zN(size_t(N), 0.0), zNV(size_t(N * V), 0.0);
          bool ok = losses.values() == zN && lse.values() == zN && d.values() == zNV;
          if (r != LossReduction::None) ok = ok && loss.values()[0] == 0.0;
          ctx.check(ok, what + ": fused writes zeros");
          d.fill(0x7f);
          cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), dl.view(), ignore, r, d.view(),
                                     ctx.pool);
          ctx.check(d.values() == zNV, what + ": backward writes zero rows");
          ctx.check(losses.intact() && lse.intact() && loss.intact() && d.intact(), what + ": guard bytes");
        }
      });
    }
  }
}

TK_TEST(loss_cross_entropy_extreme_logits) {
  // Rows mixing +-1e4 with ordinary values, rows sorted ascending (the running max grows in every
  // block, so the rescaling runs on every block), the max in the masked tail, -inf entries
  // (masked vocabulary), targets on -1e4 (loss ~2e4) and on the max (loss ~0).
  const int64_t N = 6, V = 1025;
  std::vector<double> x(size_t(N * V));
  std::vector<double> r = randn(x.size(), 9);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      double& e = x[size_t(n * V + v)];
      double z = r[size_t(n * V + v)];
      switch (n) {
        case 0: e = (v % 3 == 0) ? 1e4 : (v % 3 == 1 ? -1e4 : z); break;      // three clusters
        case 1: e = -1e4 + 20.0 * double(v); break;                             // ascending, -1e4 .. 1e4
        case 2: e = v == V - 1 ? 1e4 : -1e4 + z; break;                         // max in the tail
        case 3: e = v % 5 == 0 ? -std::numeric_limits<double>::infinity() : 3 * z; break;  // masked vocab
        case 4: e = 1e4 + z; break;                                             // all large, close
        case 5: e = v == 0 ? 1e4 : -1e4; break;                                 // max first
      }
    }
  const int32_t tg[] = {1, 0, int32_t(V - 1), 7, 500, 3};  // -1e4, min of the ramp, the max, ..., -1e4
  for (DType t : kTypes) {
    Buf logits({N, V}, t), targets({N}, DType::I32);
    logits.set(x);
    std::memcpy(targets.ids(), tg, sizeof tg);
    run_ce_case(ctx, "cross_entropy extreme " + shape_str({N, V}), logits, targets, N, V);
  }
}

TK_TEST(loss_cross_entropy_nan_rows) {
  // A NaN or +inf logit makes its row's lse, loss and gradient NaN; other rows are unaffected.
  const int64_t N = 3, V = 97;
  for (DType t : kTypes) {
    Buf logits({N, V}, t), targets({N}, DType::I32);
    randomize(logits, 11);
    std::vector<double> x = logits.values();
    x[size_t(0 * V + 50)] = std::numeric_limits<double>::quiet_NaN();
    x[size_t(1 * V + 96)] = std::numeric_limits<double>::infinity();
    logits.set(x);
    for (int64_t n = 0; n < N; ++n) targets.ids()[n] = 3;
    for_each_isa([&](const std::string& isa) {
      Buf losses({N}, DType::F32), lse({N}, DType::F32), loss({1}, DType::F32), d({N, V}, t);
      cross_entropy_fused_cpu(logits.view(), targets.view(), kIgnore, LossReduction::None, 1.0f, losses.view(),
                              lse.view(), loss.view(), d.view(), ctx.pool);
      std::vector<double> l = losses.values(), dv = d.values();
      bool ok = std::isnan(l[0]) && std::isnan(l[1]) && std::isfinite(l[2]) && std::isnan(dv[0]) &&
                std::isnan(dv[size_t(V + 5)]) && std::isfinite(dv[size_t(2 * V + 5)]);
      ctx.check(ok, std::string("cross_entropy NaN / +inf rows ") + dtype_name(t) + " " + isa);
    });
  }
}

TK_TEST(loss_cross_entropy_alias_threads_rank) {
  // dlogits written over logits equals a separate output; results are bitwise identical for any
  // thread count; logits of rank 3 ([2, 5, 257]) are 10 rows.
  const Shape s = {2, 5, 257};
  const int64_t N = 10, V = 257;
  for (DType t : kTypes) {
    Buf logits(s, t), targets({2, 5}, DType::I32);
    randomize(logits, 31, 2.0);
    random_targets(targets, 32, V, 0.2);
    for_each_isa([&](const std::string& isa) {
      std::string what = std::string("cross_entropy ") + shape_str(s) + " " + dtype_name(t) + " " + isa;
      std::unique_ptr<Buf> d0, l0;
      for (int threads : {1, 2, 3}) {
        ThreadPool pool(threads);
        auto d = std::make_unique<Buf>(s, t);
        auto l = std::make_unique<Buf>(Shape{N}, DType::F32);
        Buf lse({N}, DType::F32), loss({1}, DType::F32);
        cross_entropy_fused_cpu(logits.view(), targets.view(), kIgnore, LossReduction::Mean, 1.0f, l->view(),
                                lse.view(), loss.view(), d->view(), pool);
        if (!d0) {
          d0 = std::move(d);
          l0 = std::move(l);
          continue;
        }
        ctx.check(same_bits(*d, *d0) && same_bits(*l, *l0), what + ": " + std::to_string(threads) + " threads = 1");
      }
      Buf in_place(s, t), lse({N}, DType::F32), l({N}, DType::F32), loss({1}, DType::F32);
      in_place.set(logits.values());
      cross_entropy_fused_cpu(in_place.view(), targets.view(), kIgnore, LossReduction::Mean, 1.0f, l.view(),
                              lse.view(), loss.view(), in_place.view(), ctx.pool);
      ctx.check(same_bits(in_place, *d0) && in_place.intact(), what + ": fused dlogits over logits");
      in_place.set(logits.values());
      cross_entropy_backward_cpu(in_place.view(), targets.view(), lse.view(), loss.view() /* any 1-element f32 */,
                                 kIgnore, LossReduction::Sum, in_place.view(), ctx.pool);
      Buf sep(s, t);
      cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), loss.view(), kIgnore, LossReduction::Sum,
                                 sep.view(), ctx.pool);
      ctx.check(same_bits(in_place, sep), what + ": backward dlogits over logits");
    });
  }
}

TK_TEST(loss_rejects_bad_arguments) {
  std::string msg;
  const int64_t N = 4, V = 9;
  Buf logits({N, V}, DType::F32), targets({N}, DType::I32), losses({N}, DType::F32), lse({N}, DType::F32);
  Buf loss({1}, DType::F32), d({N, V}, DType::F32), dh({N, V}, DType::F16), db({N, V}, DType::BF16);
  randomize(logits, 1);
  for (int64_t n = 0; n < N; ++n) targets.ids()[n] = int32_t(n);
  for (int32_t bad : {9, -1, -101}) {
    targets.ids()[2] = bad;
    losses.fill(0x5a);
    Buf before({N}, DType::F32);
    before.fill(0x5a);
    std::string id = "targets[2] = " + std::to_string(bad);
    bool ok = throws_with([&] {
      cross_entropy_forward_cpu(logits.view(), targets.view(), kIgnore, LossReduction::Mean, losses.view(),
                                lse.view(), loss.view(), ctx.pool);
    }, {"cross_entropy_forward_cpu", id.c_str(), "V = 9"}, &msg);
    ctx.check(ok && same_bits(losses, before), "ce rejects target " + std::to_string(bad) + ", writes nothing: " + msg);
  }
  targets.ids()[2] = 2;
  Buf l3({3}, DType::F32), hl({N, V}, DType::F16);
  ctx.check(throws_with([&] {
    cross_entropy_forward_cpu(logits.view(), targets.view(), kIgnore, LossReduction::None, l3.view(), lse.view(),
                              loss.view(), ctx.pool);
  }, {"losses", "[3] f32", "4 elements"}, &msg), "ce: losses size: " + msg);
  ctx.check(throws_with([&] {
    cross_entropy_forward_cpu(hl.view(), targets.view(), kIgnore, LossReduction::None, losses.view(), lse.view(),
                              loss.view(), ctx.pool);
  }, {"logits", "f16", "f32 or bf16"}, &msg), "ce: f16 logits: " + msg);
  ctx.check(throws_with([&] {
    cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), loss.view(), kIgnore, LossReduction::Mean,
                               db.view(), ctx.pool);
  }, {"dlogits", "bf16", "must match logits"}, &msg), "ce bwd: dlogits dtype: " + msg);
  ctx.check(throws_with([&] {
    cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), loss.view(), kIgnore, LossReduction::None,
                               d.view(), ctx.pool);
  }, {"dloss", "[1] f32", "4 elements"}, &msg), "ce bwd: dloss for none: " + msg);
  Buf s3({2, 3, V}, DType::F32), t3({2, 2}, DType::I32), out({2}, DType::F32), lse6({6}, DType::F32);
  ctx.check(throws_with([&] {
    sequence_logprobs_forward_cpu(s3.view(), t3.view(), kIgnore, out.view(), lse6.view(), ctx.pool);
  }, {"sequence_logprobs_forward_cpu", "targets", "[2, 3]"}, &msg), "seq: targets shape: " + msg);
  Buf a({3}, DType::F32), b({3}, DType::F32), b2({2}, DType::F32);
  DpoParams p;
  p.beta = 0;
  ctx.check(throws_with([&] { dpo_loss_forward_cpu(a.view(), a.view(), a.view(), a.view(), p, a.view(), a.view(), b.view()); },
                        {"dpo_loss_forward_cpu", "beta"}, &msg), "dpo: beta 0: " + msg);
  p.beta = 0.1f;
  p.label_smoothing = 0.7f;
  ctx.check(throws_with([&] { dpo_loss_forward_cpu(a.view(), a.view(), a.view(), a.view(), p, a.view(), a.view(), b.view()); },
                        {"label_smoothing"}, &msg), "dpo: label smoothing: " + msg);
  p.label_smoothing = 0;
  ctx.check(throws_with([&] { dpo_loss_forward_cpu(a.view(), b2.view(), a.view(), a.view(), p, a.view(), a.view(), b.view()); },
                        {"policy_rejected", "[2] f32", "3 elements"}, &msg), "dpo: sizes: " + msg);
}

TK_TEST(loss_sequence_logprobs) {
  const int64_t shapes[][3] = {{1, 1, 97}, {3, 7, 97}, {3, 7, 1025}, {2, 5, 32011}};
  for (DType t : kTypes)
    for (auto& sh : shapes) {
      const int64_t B = sh[0], T = sh[1], V = sh[2];
      Buf logits({B, T, V}, t), targets({B, T}, DType::I32), dout({B}, DType::F32);
      randomize(logits, 300 + uint64_t(B * T + V), 2.0);
      random_targets(targets, 400 + uint64_t(V), V, 0.2);
      if (B > 1)
        for (int64_t i = 0; i < T; ++i) targets.ids()[i] = kIgnore;  // sequence 0 fully masked: sum 0
      randomize(dout, 500);
      const std::vector<double> xv = logits.values();
      const std::vector<int32_t> tv = targets.ids_vec();
      const std::vector<double> want = ref::sequence_logprobs(xv, tv, B, T, V, kIgnore);
      const std::vector<double> dwant = ref::sequence_logprobs_backward(xv, tv, B, T, V, kIgnore, dout.values());
      for_each_isa([&](const std::string& isa) {
        std::string what = "sequence_logprobs " + shape_str({B, T, V}) + " " + dtype_name(t) + " " + isa;
        Buf out({B}, DType::F32), lse({B, T}, DType::F32), d({B, T, V}, t);
        d.fill(0x7f);
        sequence_logprobs_forward_cpu(logits.view(), targets.view(), kIgnore, out.view(), lse.view(), ctx.pool);
        sequence_logprobs_backward_cpu(logits.view(), targets.view(), lse.view(), dout.view(), kIgnore, d.view(),
                                       ctx.pool);
        ctx.check_nmse(what + " fwd", out.values(), want, kTolF32);
        ctx.check_nmse(what + " bwd dlogits", d.values(), dwant, grad_tol(t));
        ctx.check(out.intact() && lse.intact() && d.intact(), what + ": guard bytes");
      });
    }
}

TK_TEST(loss_dpo) {
  const int64_t B = 97;
  std::vector<double> pc = randn(B, 601), pr = randn(B, 602), rc = randn(B, 603), rr = randn(B, 604);
  for (int64_t b = 0; b < B; ++b) {  // sequence log-probs: negative, tens of nats, policy near reference
    pc[size_t(b)] = -40 + 10 * pc[size_t(b)];
    pr[size_t(b)] = -45 + 10 * pr[size_t(b)];
    rc[size_t(b)] = pc[size_t(b)] + 2 * rc[size_t(b)];
    rr[size_t(b)] = pr[size_t(b)] + 2 * rr[size_t(b)];
  }
  pc[0] = -1e4, pr[0] = -10, rc[0] = -10, rr[0] = -1e4;  // |beta z| ~ 1e3..1e4: logsigmoid must not overflow
  Buf bpc({B}, DType::F32), bpr({B}, DType::F32), brc({B}, DType::F32), brr({B}, DType::F32), dout({B}, DType::F32);
  bpc.set(pc), bpr.set(pr), brc.set(rc), brr.set(rr);
  randomize(dout, 605);
  pc = bpc.values(), pr = bpr.values(), rc = brc.values(), rr = brr.values();  // the fp32 values the kernel reads
  for_each_isa([&](const std::string& isa) {
    for (DpoKind kind : {DpoKind::Sigmoid, DpoKind::Ipo, DpoKind::Hinge})
      for (double ls : {0.0, 0.1})
        for (double beta : {0.1, 0.5}) {
          DpoParams p;
          p.beta = float(beta);
          p.kind = kind;
          p.label_smoothing = float(ls);
          const double fb = p.beta, fls = p.label_smoothing;
          char w[96];
          std::snprintf(w, sizeof w, "dpo %s beta %.1f ls %.1f %s", dpo_kind_name(kind), beta, ls, isa.c_str());
          const std::string what = w;
          Buf l({B}, DType::F32), cr({B}, DType::F32), rj({B}, DType::F32), gc({B}, DType::F32), gr({B}, DType::F32);
          dpo_loss_forward_cpu(bpc.view(), bpr.view(), brc.view(), brr.view(), p, l.view(), cr.view(), rj.view());
          dpo_loss_backward_cpu(bpc.view(), bpr.view(), brc.view(), brr.view(), p, dout.view(), gc.view(), gr.view());
          // label smoothing applies to the sigmoid kind only (as in TRL)
          ref::DpoForward f = ref::dpo_loss(pc, pr, rc, rr, fb, kind, kind == DpoKind::Sigmoid ? fls : 0.0);
          ref::DpoBackward g =
              ref::dpo_loss_backward(pc, pr, rc, rr, fb, kind, kind == DpoKind::Sigmoid ? fls : 0.0, dout.values());
          ctx.check_nmse(what + " losses", l.values(), f.losses, 1e-12);
          ctx.check_nmse(what + " chosen_rewards", cr.values(), f.chosen_rewards, 1e-12);
          ctx.check_nmse(what + " rejected_rewards", rj.values(), f.rejected_rewards, 1e-12);
          ctx.check_nmse(what + " d_policy_chosen", gc.values(), g.d_policy_chosen, 1e-12);
          ctx.check_nmse(what + " d_policy_rejected", gr.values(), g.d_policy_rejected, 1e-12);
          std::vector<double> lv = l.values();
          bool finite = true;
          for (double v : lv) finite = finite && std::isfinite(v);
          ctx.check(finite, what + ": finite losses at |beta z| ~ 1e3");
          ctx.check(l.intact() && cr.intact() && rj.intact() && gc.intact() && gr.intact(), what + ": guard bytes");
        }
  });
}

// ==== --grad: backward rules against central differences on the double reference =====================

namespace {

template <class F>
std::vector<double> central_diff(std::vector<double>& v, F&& loss) {
  std::vector<double> g(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    double keep = v[i], h = 1e-6 * std::max(1.0, std::fabs(keep));
    v[i] = keep + h;
    double lp = loss();
    v[i] = keep - h;
    double lm = loss();
    v[i] = keep;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

TK_TEST(loss_grad_cross_entropy) {
  // Mean over non-ignored rows (rows 1 and 4 ignored) and None weighted by R, on [6, 11].
  const int64_t N = 6, V = 11;
  Buf logits({N, V}, DType::F32), targets({N}, DType::I32), R({N}, DType::F32);
  randomize(logits, 51, 2.0);
  random_targets(targets, 52, V, 0.0);
  targets.ids()[1] = kIgnore;
  targets.ids()[4] = kIgnore;
  randomize(R, 53);
  std::vector<double> xv = logits.values(), Rv = R.values();
  const std::vector<int32_t> tv = targets.ids_vec();
  for (LossReduction r : {LossReduction::Mean, LossReduction::None, LossReduction::Sum}) {
    auto loss = [&] {
      ref::CrossEntropyForward f = ref::cross_entropy_forward(xv, tv, N, V, kIgnore, r);
      return r == LossReduction::None ? dot(f.losses, Rv) : f.loss;
    };
    std::vector<double> fd = central_diff(xv, loss);
    std::vector<double> dl = r == LossReduction::None ? Rv : std::vector<double>{1.0};
    Buf losses({N}, DType::F32), lse({N}, DType::F32), l({1}, DType::F32), d({N, V}, DType::F32);
    Buf dlb(r == LossReduction::None ? Shape{N} : Shape{1}, DType::F32);
    dlb.set(dl);
    cross_entropy_forward_cpu(logits.view(), targets.view(), kIgnore, r, losses.view(), lse.view(), l.view(), ctx.pool);
    cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), dlb.view(), kIgnore, r, d.view(), ctx.pool);
    std::string s = std::string(" ") + reduction_name(r) + " [6, 11] vs central differences";
    ctx.check_nmse("kernel cross_entropy dlogits" + s, d.values(), fd, 1e-9);
    ctx.check_nmse("ref cross_entropy dlogits" + s, ref::cross_entropy_backward(xv, tv, N, V, kIgnore, r, dl), fd,
                   1e-12);
  }
}

TK_TEST(loss_grad_sequence_logprobs) {
  const int64_t B = 2, T = 3, V = 13;
  Buf logits({B, T, V}, DType::F32), targets({B, T}, DType::I32), R({B}, DType::F32);
  randomize(logits, 54, 2.0);
  random_targets(targets, 55, V, 0.0);
  targets.ids()[4] = kIgnore;
  randomize(R, 56);
  std::vector<double> xv = logits.values(), Rv = R.values();
  const std::vector<int32_t> tv = targets.ids_vec();
  auto loss = [&] { return dot(ref::sequence_logprobs(xv, tv, B, T, V, kIgnore), Rv); };
  std::vector<double> fd = central_diff(xv, loss);
  Buf out({B}, DType::F32), lse({B, T}, DType::F32), d({B, T, V}, DType::F32);
  sequence_logprobs_forward_cpu(logits.view(), targets.view(), kIgnore, out.view(), lse.view(), ctx.pool);
  sequence_logprobs_backward_cpu(logits.view(), targets.view(), lse.view(), R.view(), kIgnore, d.view(), ctx.pool);
  ctx.check_nmse("kernel sequence_logprobs dlogits [2, 3, 13] vs central differences", d.values(), fd, 1e-9);
  ctx.check_nmse("ref sequence_logprobs dlogits [2, 3, 13] vs central differences",
                 ref::sequence_logprobs_backward(xv, tv, B, T, V, kIgnore, Rv), fd, 1e-12);
}

TK_TEST(loss_grad_dpo) {
  const int64_t B = 9;
  std::vector<double> pc = randn(B, 61), pr = randn(B, 62), rc = randn(B, 63), rr = randn(B, 64), R = randn(B, 65);
  for (int64_t b = 0; b < B; ++b) {
    pc[size_t(b)] = -20 + 3 * pc[size_t(b)];
    pr[size_t(b)] = -22 + 3 * pr[size_t(b)];
    rc[size_t(b)] = pc[size_t(b)] + rc[size_t(b)];
    rr[size_t(b)] = pr[size_t(b)] + rr[size_t(b)];
  }
  Buf bpc({B}, DType::F32), bpr({B}, DType::F32), brc({B}, DType::F32), brr({B}, DType::F32), bR({B}, DType::F32);
  bpc.set(pc), bpr.set(pr), brc.set(rc), brr.set(rr), bR.set(R);
  pc = bpc.values(), pr = bpr.values(), rc = brc.values(), rr = brr.values(), R = bR.values();
  for (DpoKind kind : {DpoKind::Sigmoid, DpoKind::Ipo, DpoKind::Hinge})
    for (double ls : {0.0, 0.1}) {
      if (kind != DpoKind::Sigmoid && ls != 0) continue;
      const double beta = 0.5;
      DpoParams p;
      p.beta = float(beta);
      p.kind = kind;
      p.label_smoothing = float(ls);
      const double fls = p.label_smoothing;
      auto loss = [&] { return dot(ref::dpo_loss(pc, pr, rc, rr, beta, kind, fls).losses, R); };
      std::vector<double> fdc = central_diff(pc, loss), fdr = central_diff(pr, loss);
      std::vector<double> fdrc = central_diff(rc, loss);
      Buf gc({B}, DType::F32), gr({B}, DType::F32);
      dpo_loss_backward_cpu(bpc.view(), bpr.view(), brc.view(), brr.view(), p, bR.view(), gc.view(), gr.view());
      ref::DpoBackward g = ref::dpo_loss_backward(pc, pr, rc, rr, beta, kind, fls, R);
      char w[80];
      std::snprintf(w, sizeof w, "dpo %s ls %.1f [9] vs central differences", dpo_kind_name(kind), ls);
      ctx.check_nmse(std::string("kernel d_policy_chosen ") + w, gc.values(), fdc, 1e-9);
      ctx.check_nmse(std::string("kernel d_policy_rejected ") + w, gr.values(), fdr, 1e-9);
      ctx.check_nmse(std::string("ref d_policy_chosen ") + w, g.d_policy_chosen, fdc, 1e-12);
      ctx.check_nmse(std::string("ref d_policy_rejected ") + w, g.d_policy_rejected, fdr, 1e-12);
      // The reference inputs do move the loss (by -d/dpc for rc): the kernel's "no gradient" is
      // a choice (TRL's reference model runs without grad), not a zero derivative.
      ctx.check_nmse(std::string("d/d ref_chosen = -d/d policy_chosen ") + w, scaled(g.d_policy_chosen, -1), fdrc,
                     1e-12);
    }
}

// ==== --perf ==========================================================================================

TK_TEST(loss_perf) {
  if (!ctx.opt.perf) return;
  const int64_t N = 4096, V = 32000;
  std::printf("  perf threads %d, isa %s\n", ctx.pool.size(), isa_name(active_isa()));
  for (DType t : kTypes) {
    const double bytes = double(N * V) * double(dtype_size(t));
    Buf logits({N, V}, t), targets({N}, DType::I32), losses({N}, DType::F32), lse({N}, DType::F32);
    Buf loss({1}, DType::F32), dl({1}, DType::F32), d({N, V}, t);
    randomize(logits, 81, 2.0);
    random_targets(targets, 82, V, 0.0);
    dl.set({1.0});
    auto report = [&](const char* what, double s, double traffic) {
      std::printf("  perf cross_entropy %-22s [4096, 32000] %-4s %8.2f ms  %6.1f GB/s of logits  (%.1f GB/s moved)\n",
                  what, dtype_name(t), s * 1e3, bytes / s / 1e9, traffic / s / 1e9);
    };
    double s = time_median([&] {
      cross_entropy_forward_cpu(logits.view(), targets.view(), kIgnore, LossReduction::Mean, losses.view(), lse.view(),
                                loss.view(), ctx.pool);
    });
    report("fwd", s, bytes);
    double sb = time_median([&] {
      cross_entropy_backward_cpu(logits.view(), targets.view(), lse.view(), dl.view(), kIgnore, LossReduction::Mean,
                                 d.view(), ctx.pool);
    });
    report("bwd", sb, 2 * bytes);
    report("fwd + bwd (separate)", s + sb, 3 * bytes);
    s = time_median([&] {
      cross_entropy_fused_cpu(logits.view(), targets.view(), kIgnore, LossReduction::Mean, 1.0f, losses.view(),
                              lse.view(), loss.view(), d.view(), ctx.pool);
    });
    report("fused fwd + bwd", s, 2 * bytes);
  }
}
