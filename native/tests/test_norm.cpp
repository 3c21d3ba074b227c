// Tests of cpu/norm (RMSNorm, SwiGLU, embedding; forward and backward) against ref/norm_ref.
//
// Shapes are odd (N in {1, 7, 97, 257}, D in {1, 97, 257, 1025}) so that no size is a multiple of
// a SIMD width or a staging block; every case runs on every ISA level the machine has, writes
// into guarded buffers, and covers F32 and BF16 storage. The reference gets the very values the
// kernel read (bf16 inputs are rounded first and widened), so only the kernel's arithmetic and its
// output rounding are measured. Tolerances (NMSE):
// - F32 outputs: a few fp32 roundings per element plus a log(D)-deep fp32 reduction give NMSE
//   around 1e-14; forward outputs are held to 1e-11, gradients to 1e-10.
// - BF16 outputs: one rounding to bf16 (relative error uniform in +-2^-9) gives NMSE ~1.3e-6;
//   held to 1e-5. dweight and dtable are F32 even for bf16 inputs and keep the F32 bounds.
// - RMSNorm dx = rstd * dy * w - rstd^3 * x * mean(dy * w * x) is a difference of two terms that
//   cancel almost exactly when D = 1; its fp32 error scales with the terms, so dx's error is
//   normalized by max(sum dx^2, sum (rstd * dy * w)^2).
// - Embedding forward is a copy: exact. dtable rows are sequential fp32 sums of up to N = 257
//   rows with cancellation (a sum of n normals is ~sqrt(n) while its fp32 error grows like
//   sqrt(n) * eps * the partial sums): measured NMSE ~1e-10 at V = 1, held to 1e-9.
// Modes: default runs correctness, --grad checks every backward against central differences of
// L = sum(out * R) evaluated on the double reference, --perf prints GB/s.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/isa.h"
#include "../cpu/norm.h"
#include "../ref/norm_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

const int64_t kRows[] = {1, 7, 97, 257};
const int64_t kCols[] = {1, 97, 257, 1025};
const DType kTypes[] = {DType::F32, DType::BF16};
constexpr double kEps = 1e-6;

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
  std::vector<int32_t> ids() const {
    const int32_t* p = static_cast<const int32_t*>(mem->data());
    return std::vector<int32_t>(p, p + n());
  }
};

// normal(0, 1) * scale + shift, stored in b's dtype.
void randomize(Buf& b, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  std::vector<double> v = randn(size_t(b.n()), seed);
  for (double& x : v) x = x * scale + shift;
  b.set(v);
}

// ids uniform in [0, V), with repeats whenever N > V (and by chance otherwise).
void random_ids(Buf& b, uint64_t seed, int64_t V) {
  std::vector<double> u = uniform(size_t(b.n()), seed, 0, double(V));
  int32_t* p = static_cast<int32_t*>(b.mem->data());
  for (size_t i = 0; i < u.size(); ++i) p[i] = int32_t(std::min<double>(std::floor(u[i]), double(V - 1)));
}

// Every ISA level up to what this CPU has, restoring the active level afterwards. Avx512Bf16 is
// left out: these kernels round to bf16 with integer code (as elementwise does, to keep
// subnormals), so that level runs exactly the AVX-512 path.
template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (CpuIsa isa : {CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (isa > detected_isa()) continue;
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

std::string label(const char* op, const Shape& s, DType t, const std::string& isa) {
  return std::string(op) + " " + shape_str(s) + " " + dtype_name(t) + " " + isa;
}

double fwd_tol(DType t) { return t == DType::F32 ? 1e-11 : 1e-5; }
double bwd_tol(DType t) { return t == DType::F32 ? 1e-10 : 1e-5; }

bool check_exact(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return ctx.check(false, what + ": size mismatch");
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      char buf[128];
      std::snprintf(buf, sizeof buf, ": element %zu is %.9g, expected %.9g", i, got[i], want[i]);
      return ctx.check(false, what + buf);
    }
  return ctx.check(true, what);
}

// Bitwise equality of two buffers' contents.
bool same_bits(const Buf& a, const Buf& b) {
  return a.mem->bytes() == b.mem->bytes() && std::memcmp(a.mem->data(), b.mem->data(), a.mem->bytes()) == 0;
}

// Runs fn and reports whether it threw a tk::Error whose message contains every one of `parts`.
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

// ---- RMSNorm runner: forward and backward of one shape/dtype on the active ISA ----------------------

void run_rms(Context& ctx, int64_t N, int64_t D, DType t, const std::string& isa) {
  const Shape xs = {N, D};
  Buf x(xs, t), w({D}, t), dy(xs, t), y(xs, t), rstd({N}, DType::F32), dx(xs, t), dw({D}, DType::F32);
  randomize(x, 1000 + uint64_t(N * 7 + D), 2.0);
  randomize(w, 2000 + uint64_t(D), 0.1, 1.0);
  randomize(dy, 3000 + uint64_t(N + D));
  rms_norm_forward_cpu(x.view(), w.view(), float(kEps), y.view(), rstd.view(), ctx.pool);
  rms_norm_backward_cpu(dy.view(), x.view(), w.view(), rstd.view(), dx.view(), dw.view(), ctx.pool);

  const std::vector<double> xv = x.values(), wv = w.values(), dyv = dy.values();
  ref::RmsNormForward f = ref::rms_norm_forward(xv, wv, N, D, kEps);
  ref::RmsNormBackward b = ref::rms_norm_backward(dyv, xv, wv, N, D, kEps);

  std::string fw = label("rms_norm fwd", xs, t, isa), bw = label("rms_norm bwd", xs, t, isa);
  ctx.check_nmse(fw + " y", y.values(), f.y, fwd_tol(t));
  ctx.check_nmse(fw + " rstd", rstd.values(), f.rstd, 1e-12);
  ctx.check_nmse(bw + " dweight", dw.values(), b.dweight, 1e-10);

  // dx, normalized by the larger of its own size and the size of its first term (see the header).
  std::vector<double> got = dx.values();
  double num = 0, den_ref = 0, den_term = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      size_t i = size_t(n * D + d);
      double term = f.rstd[size_t(n)] * dyv[i] * wv[size_t(d)];
      num += (got[i] - b.dx[i]) * (got[i] - b.dx[i]);
      den_ref += b.dx[i] * b.dx[i];
      den_term += term * term;
    }
  double e = num / std::max(den_ref, den_term);
  char buf[96];
  std::snprintf(buf, sizeof buf, " dx: scaled nmse %.3e (tol %.1e)", e, bwd_tol(t));
  ctx.check(e <= bwd_tol(t), bw + buf);

  ctx.check(y.intact() && rstd.intact() && dx.intact() && dw.intact(), fw + " / bwd: guard bytes");
}

void run_swiglu(Context& ctx, int64_t n, DType t, const std::string& isa, double gate_scale) {
  const Shape s = {n};
  Buf g(s, t), u(s, t), d(s, t), out(s, t), dg(s, t), du(s, t);
  randomize(g, 4000 + uint64_t(n), gate_scale);
  randomize(u, 5000 + uint64_t(n));
  randomize(d, 6000 + uint64_t(n));
  swiglu_forward_cpu(g.view(), u.view(), out.view(), ctx.pool);
  swiglu_backward_cpu(d.view(), g.view(), u.view(), dg.view(), du.view(), ctx.pool);
  std::vector<double> gv = g.values(), uv = u.values(), dv = d.values();
  ref::SwigluBackward b = ref::swiglu_backward(dv, gv, uv);
  std::string fw = label("swiglu fwd", s, t, isa), bw = label("swiglu bwd", s, t, isa);
  ctx.check_nmse(fw + " out", out.values(), ref::swiglu_forward(gv, uv), fwd_tol(t));
  ctx.check_nmse(bw + " dgate", dg.values(), b.dgate, bwd_tol(t));
  ctx.check_nmse(bw + " dup", du.values(), b.dup, bwd_tol(t));
  ctx.check(out.intact() && dg.intact() && du.intact(), fw + " / bwd: guard bytes");
}

void run_embedding(Context& ctx, int64_t N, int64_t V, int64_t D, DType t, const std::string& isa) {
  Buf ids({N}, DType::I32), table({V, D}, t), out({N, D}, t), dout({N, D}, t), dtable({V, D}, DType::F32);
  random_ids(ids, 7000 + uint64_t(N * 3 + V), V);
  randomize(table, 8000 + uint64_t(V + D));
  randomize(dout, 9000 + uint64_t(N + D));
  dtable.fill(0x7f);  // garbage: the kernel must zero it
  embedding_forward_cpu(ids.view(), table.view(), out.view(), ctx.pool);
  embedding_backward_cpu(dout.view(), ids.view(), dtable.view(), ctx.pool);
  std::string what = "embedding N " + std::to_string(N) + " table " + shape_str({V, D}) + " " + dtype_name(t) + " " + isa;
  check_exact(ctx, what + " fwd", out.values(), ref::embedding_forward(ids.ids(), table.values(), V, D));
  ctx.check_nmse(what + " bwd dtable", dtable.values(), ref::embedding_backward(dout.values(), ids.ids(), V, D), 1e-9);
  ctx.check(out.intact() && dtable.intact(), what + ": guard bytes");
}

}  // namespace

// ==== correctness =====================================================================================

TK_TEST(norm_rms_forward_backward) {
  for_each_isa([&](const std::string& isa) {
    for (DType t : kTypes)
      for (int64_t N : kRows)
        for (int64_t D : kCols) run_rms(ctx, N, D, t, isa);
  });
}

TK_TEST(norm_rms_rank3_and_alias) {
  // x [3, 5, 97] is 15 rows; y written over x (y may alias x), dx over dy.
  for_each_isa([&](const std::string& isa) {
    for (DType t : kTypes) {
      const Shape xs = {3, 5, 97};
      Buf x(xs, t), w({97}, t), y(xs, t), rstd({3, 5}, DType::F32), dy(xs, t), dx(xs, t), dw({97}, DType::F32);
      randomize(x, 11);
      randomize(w, 12, 0.1, 1.0);
      randomize(dy, 13);
      rms_norm_forward_cpu(x.view(), w.view(), float(kEps), y.view(), rstd.view(), ctx.pool);
      rms_norm_backward_cpu(dy.view(), x.view(), w.view(), rstd.view(), dx.view(), dw.view(), ctx.pool);
      Buf dy2(xs, t), dw2({97}, DType::F32);
      dy2.set(dy.values());
      rms_norm_backward_cpu(dy2.view(), x.view(), w.view(), rstd.view(), dy2.view(), dw2.view(), ctx.pool);
      std::string what = label("rms_norm", xs, t, isa);
      ctx.check(same_bits(dy2, dx) && same_bits(dw2, dw), what + ": dx written over dy matches");
      rms_norm_forward_cpu(x.view(), w.view(), float(kEps), x.view(), rstd.view(), ctx.pool);
      ctx.check(same_bits(x, y), what + ": y written over x matches");
    }
  });
}

TK_TEST(norm_swiglu_forward_backward) {
  const int64_t sizes[] = {1, 7, 15, 16, 17, 97, 257, 1025, 97 * 257, 257 * 1025};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kTypes)
      for (int64_t n : sizes) run_swiglu(ctx, n, t, isa, 4.0);  // |gate| up to ~16: both saturated tails
  });
}

TK_TEST(norm_swiglu_extreme_gates) {
  // Finite gates of any size: no overflow in sigmoid, silu -> 0 on the left and -> g on the right.
  const std::vector<double> g = {-3e38, -1e30, -1e4, -1000, -104, -100, -89, -88, -87, -80, -20, -1.5, -1e-30,
                                 0,     1e-30, 1e-3, 1,     20,   80,   87,  88,  89,  100, 1e4, 1e30, 3e38};
  const int64_t n = int64_t(g.size());
  std::vector<double> up(g.size(), 1.0), d(g.size(), 1.0);
  for_each_isa([&](const std::string& isa) {
    for (DType t : kTypes) {
      Buf bg({n}, t), bu({n}, t), bd({n}, t), out({n}, t), dg({n}, t), du({n}, t);
      bg.set(g);
      bu.set(up);
      bd.set(d);
      swiglu_forward_cpu(bg.view(), bu.view(), out.view(), ctx.pool);
      swiglu_backward_cpu(bd.view(), bg.view(), bu.view(), dg.view(), du.view(), ctx.pool);
      std::vector<double> gv = bg.values();
      std::vector<double> o = out.values(), want = ref::swiglu_forward(gv, bu.values());
      ref::SwigluBackward b = ref::swiglu_backward(bd.values(), gv, bu.values());
      std::vector<double> dgv = dg.values(), duv = du.values();
      bool ok = true;
      std::string bad;
      for (size_t i = 0; i < g.size(); ++i) {
        // Relative error 2^-8 (bf16) / 1e-5 (f32), or an absolute error below 1e-30: values of
        // order e^-87 are flushed to 0 by the SIMD exp. (Gates near -1.2785, the root of
        // d silu/dg, are left out: there dgate cancels and only an absolute bound holds.)
        double rel = t == DType::F32 ? 1e-5 : 1.0 / 128;
        auto close = [&](double a, double w) {
          return std::isfinite(a) && (std::fabs(a - w) <= rel * std::fabs(w) || std::fabs(a - w) < 1e-30);
        };
        if (!close(o[i], want[i]) || !close(duv[i], b.dup[i]) || !close(dgv[i], b.dgate[i])) {
          ok = false;
          char buf[160];
          std::snprintf(buf, sizeof buf, " g=%.9g: out %.6g (want %.6g) dgate %.6g (%.6g) dup %.6g (%.6g);", gv[i],
                        o[i], want[i], dgv[i], b.dgate[i], duv[i], b.dup[i]);
          bad += buf;
        }
      }
      ctx.check(ok, label("swiglu extreme gates", {n}, t, isa) + bad);
      ctx.check(out.intact() && dg.intact() && du.intact(), label("swiglu extreme gates", {n}, t, isa) + ": guards");
    }
  });
}

TK_TEST(norm_embedding_forward_backward) {
  // (N, V): single lookups, every id repeated (V = 1), some repeats, more ids than rows.
  const int64_t cases[][2] = {{1, 257}, {7, 1}, {97, 97}, {257, 1}, {257, 97}};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kTypes)
      for (auto& c : cases)
        for (int64_t D : kCols) run_embedding(ctx, c[0], c[1], D, t, isa);
  });
}

TK_TEST(norm_embedding_rejects_bad_ids) {
  const int64_t V = 97, D = 33;
  Buf table({V, D}, DType::F32), out({5, D}, DType::F32), dtable({V, D}, DType::F32), dout({5, D}, DType::F32);
  randomize(table, 21);
  randomize(dout, 22);
  for (int32_t bad : {97, -1, 1 << 30}) {
    Buf ids({5}, DType::I32);
    int32_t* p = static_cast<int32_t*>(ids.mem->data());
    for (int i = 0; i < 5; ++i) p[i] = i * 10;
    p[3] = bad;
    out.fill(0x5a);
    dtable.fill(0x5a);
    Buf out_before({5, D}, DType::F32), dtable_before({V, D}, DType::F32);
    out_before.fill(0x5a);
    dtable_before.fill(0x5a);
    std::string id = "ids[3] = " + std::to_string(bad), msg;
    bool ok = throws_with([&] { embedding_forward_cpu(ids.view(), table.view(), out.view(), ctx.pool); },
                          {"embedding_forward_cpu", id.c_str(), "V = 97"}, &msg);
    ctx.check(ok, "embedding fwd rejects id " + std::to_string(bad) + ": " + msg);
    ctx.check(same_bits(out, out_before) && out.intact(), "embedding fwd with a bad id writes nothing");
    ok = throws_with([&] { embedding_backward_cpu(dout.view(), ids.view(), dtable.view(), ctx.pool); },
                     {"embedding_backward_cpu", id.c_str(), "V = 97"}, &msg);
    ctx.check(ok, "embedding bwd rejects id " + std::to_string(bad) + ": " + msg);
    ctx.check(same_bits(dtable, dtable_before) && dtable.intact(), "embedding bwd with a bad id writes nothing");
  }
}

TK_TEST(norm_rejects_bad_arguments) {
  std::string msg;
  Buf x({4, 8}, DType::F32), w({8}, DType::F32), wb({8}, DType::BF16), w7({7}, DType::F32), y({4, 8}, DType::F32);
  Buf r({4}, DType::F32), r3({3}, DType::F32), xh({4, 8}, DType::F16), yh({4, 8}, DType::F16);
  Buf dw({8}, DType::F32);
  randomize(x, 1);
  randomize(w, 2);
  auto fwd = [&](const Buf& xx, const Buf& ww, const Buf& yy, const Buf& rr) {
    return [&] { rms_norm_forward_cpu(xx.view(), ww.view(), 1e-6f, yy.view(), rr.view(), ctx.pool); };
  };
  ctx.check(throws_with(fwd(x, wb, y, r), {"rms_norm_forward_cpu", "weight", "[8] bf16"}, &msg), "rms: weight dtype: " + msg);
  ctx.check(throws_with(fwd(x, w7, y, r), {"weight", "[7] f32"}, &msg), "rms: weight size: " + msg);
  ctx.check(throws_with(fwd(x, w, y, r3), {"rstd", "[3] f32"}, &msg), "rms: rstd size: " + msg);
  ctx.check(throws_with(fwd(xh, w, yh, r), {"x", "f16", "f32 or bf16"}, &msg), "rms: f16 x: " + msg);
  ctx.check(throws_with([&] { rms_norm_forward_cpu(x.view(), w.view(), -1.0f, y.view(), r.view(), ctx.pool); },
                        {"eps"}, &msg),
            "rms: negative eps: " + msg);
  ctx.check(throws_with([&] { rms_norm_backward_cpu(x.view(), x.view(), w.view(), r.view(), y.view(), w7.view(), ctx.pool); },
                        {"rms_norm_backward_cpu", "dweight", "[7] f32"}, &msg),
            "rms bwd: dweight size: " + msg);
  Buf g({10}, DType::F32), ub({10}, DType::BF16), o({10}, DType::F32), o9({9}, DType::F32);
  ctx.check(throws_with([&] { swiglu_forward_cpu(g.view(), ub.view(), o.view(), ctx.pool); },
                        {"swiglu_forward_cpu", "up", "bf16", "f32"}, &msg),
            "swiglu: mixed dtypes: " + msg);
  ctx.check(throws_with([&] { swiglu_forward_cpu(g.view(), g.view(), o9.view(), ctx.pool); },
                        {"out", "[9] f32", "same shape"}, &msg),
            "swiglu: shape: " + msg);
  ctx.check(throws_with([&] { swiglu_backward_cpu(g.view(), g.view(), g.view(), o.view(), o.view(), ctx.pool); },
                        {"dgate and dup"}, &msg),
            "swiglu bwd: aliased outputs: " + msg);
  Buf idsf({4}, DType::F32), ids({4}, DType::I32), table({5, 8}, DType::F32), out({4, 8}, DType::F32);
  Buf outb({4, 8}, DType::BF16), dtb({5, 8}, DType::BF16);
  ids.fill(0);
  ctx.check(throws_with([&] { embedding_forward_cpu(idsf.view(), table.view(), out.view(), ctx.pool); },
                        {"ids", "i32"}, &msg),
            "embedding: ids dtype: " + msg);
  ctx.check(throws_with([&] { embedding_forward_cpu(ids.view(), table.view(), outb.view(), ctx.pool); },
                        {"out", "bf16"}, &msg),
            "embedding: out dtype: " + msg);
  ctx.check(throws_with([&] { embedding_backward_cpu(out.view(), ids.view(), dtb.view(), ctx.pool); },
                        {"dtable", "f32"}, &msg),
            "embedding bwd: dtable dtype: " + msg);
}

TK_TEST(norm_zero_rows) {
  // N = 0: nothing to do, dweight and dtable are still defined (zeros).
  Buf x({0, 16}, DType::F32), w({16}, DType::F32), y({0, 16}, DType::F32), r({0}, DType::F32), dw({16}, DType::F32);
  dw.fill(0x7f);
  rms_norm_forward_cpu(x.view(), w.view(), 1e-6f, y.view(), r.view(), ctx.pool);
  rms_norm_backward_cpu(x.view(), x.view(), w.view(), r.view(), y.view(), dw.view(), ctx.pool);
  ctx.check_nmse("rms bwd N = 0: dweight is zero", dw.values(), std::vector<double>(16, 0.0), 0.0);
  Buf ids({0}, DType::I32), dout({0, 16}, DType::F32), dt({3, 16}, DType::F32);
  dt.fill(0x7f);
  embedding_backward_cpu(dout.view(), ids.view(), dt.view(), ctx.pool);
  ctx.check_nmse("embedding bwd N = 0: dtable is zero", dt.values(), std::vector<double>(48, 0.0), 0.0);
  ctx.check(dw.intact() && dt.intact(), "zero rows: guard bytes");
}

TK_TEST(norm_thread_count_invariant) {
  // dweight and dtable are reductions over rows: bitwise identical for any pool size.
  const int64_t N = 1031, D = 257, V = 50;
  Buf x({N, D}, DType::F32), w({D}, DType::F32), dy({N, D}, DType::F32), y({N, D}, DType::F32), r({N}, DType::F32);
  Buf ids({N}, DType::I32);
  randomize(x, 31);
  randomize(w, 32, 0.1, 1.0);
  randomize(dy, 33);
  random_ids(ids, 34, V);
  rms_norm_forward_cpu(x.view(), w.view(), 1e-6f, y.view(), r.view(), ctx.pool);
  std::unique_ptr<Buf> dw0, dx0, dt0;
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    auto dw = std::make_unique<Buf>(Shape{D}, DType::F32);
    auto dx = std::make_unique<Buf>(Shape{N, D}, DType::F32);
    auto dt = std::make_unique<Buf>(Shape{V, D}, DType::F32);
    rms_norm_backward_cpu(dy.view(), x.view(), w.view(), r.view(), dx->view(), dw->view(), pool);
    embedding_backward_cpu(dy.view(), ids.view(), dt->view(), pool);
    if (!dw0) {
      dw0 = std::move(dw);
      dx0 = std::move(dx);
      dt0 = std::move(dt);
      continue;
    }
    std::string th = " with " + std::to_string(threads) + " threads equals 1 thread";
    ctx.check(same_bits(*dw, *dw0) && same_bits(*dx, *dx0), "rms_norm bwd [1031, 257]" + th);
    ctx.check(same_bits(*dt, *dt0), "embedding bwd [1031] x [50, 257]" + th);
  }
}

// ==== --grad: backward rules against central differences on the double reference =====================

namespace {

// dL/dv for L = loss() by central differences, perturbing v in place (h relative to |v|).
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

TK_TEST(norm_grad_rms) {
  // L = sum(y * R), y = rms_norm(x, w): dL/dx and dL/dw from the kernel (fed dy = R) and from the
  // reference, both against central differences of the double reference forward.
  const int64_t N = 5, D = 37;
  for (double eps : {1e-6, 0.5}) {
    Buf x({N, D}, DType::F32), w({D}, DType::F32), R({N, D}, DType::F32), y({N, D}, DType::F32), r({N}, DType::F32);
    Buf dx({N, D}, DType::F32), dw({D}, DType::F32);
    randomize(x, 41, 1.5);
    randomize(w, 42, 0.2, 1.0);
    randomize(R, 43);
    rms_norm_forward_cpu(x.view(), w.view(), float(eps), y.view(), r.view(), ctx.pool);
    rms_norm_backward_cpu(R.view(), x.view(), w.view(), r.view(), dx.view(), dw.view(), ctx.pool);
    std::vector<double> xv = x.values(), wv = w.values(), Rv = R.values();
    auto loss = [&] { return dot(ref::rms_norm_forward(xv, wv, N, D, eps).y, Rv); };
    std::vector<double> fdx = central_diff(xv, loss), fdw = central_diff(wv, loss);
    ref::RmsNormBackward b = ref::rms_norm_backward(Rv, xv, wv, N, D, eps);
    std::string s = " [5, 37] eps " + std::to_string(eps) + " vs central differences";
    ctx.check_nmse("kernel rms dx" + s, dx.values(), fdx, 1e-9);
    ctx.check_nmse("kernel rms dweight" + s, dw.values(), fdw, 1e-9);
    ctx.check_nmse("ref rms dx" + s, b.dx, fdx, 1e-12);
    ctx.check_nmse("ref rms dweight" + s, b.dweight, fdw, 1e-12);
  }
}

TK_TEST(norm_grad_swiglu) {
  const int64_t n = 301;
  Buf g({n}, DType::F32), u({n}, DType::F32), R({n}, DType::F32), dg({n}, DType::F32), du({n}, DType::F32);
  randomize(g, 51, 3.0);
  randomize(u, 52);
  randomize(R, 53);
  swiglu_backward_cpu(R.view(), g.view(), u.view(), dg.view(), du.view(), ctx.pool);
  std::vector<double> gv = g.values(), uv = u.values(), Rv = R.values();
  auto loss = [&] { return dot(ref::swiglu_forward(gv, uv), Rv); };
  std::vector<double> fdg = central_diff(gv, loss), fdu = central_diff(uv, loss);
  ref::SwigluBackward b = ref::swiglu_backward(Rv, gv, uv);
  ctx.check_nmse("kernel swiglu dgate [301] vs central differences", dg.values(), fdg, 1e-9);
  ctx.check_nmse("kernel swiglu dup [301] vs central differences", du.values(), fdu, 1e-9);
  ctx.check_nmse("ref swiglu dgate [301] vs central differences", b.dgate, fdg, 1e-12);
  ctx.check_nmse("ref swiglu dup [301] vs central differences", b.dup, fdu, 1e-12);
}

TK_TEST(norm_grad_embedding) {
  const int64_t N = 29, V = 11, D = 13;
  Buf ids({N}, DType::I32), table({V, D}, DType::F32), R({N, D}, DType::F32), dt({V, D}, DType::F32);
  random_ids(ids, 61, V);
  randomize(table, 62);
  randomize(R, 63);
  embedding_backward_cpu(R.view(), ids.view(), dt.view(), ctx.pool);
  std::vector<int32_t> iv = ids.ids();
  std::vector<double> tv = table.values(), Rv = R.values();
  auto loss = [&] { return dot(ref::embedding_forward(iv, tv, V, D), Rv); };
  std::vector<double> fdt = central_diff(tv, loss);
  ctx.check_nmse("kernel embedding dtable [11, 13] vs central differences", dt.values(), fdt, 1e-9);
  ctx.check_nmse("ref embedding dtable [11, 13] vs central differences", ref::embedding_backward(Rv, iv, V, D), fdt,
                 1e-12);
}

// ==== --perf ==========================================================================================

TK_TEST(norm_perf) {
  if (!ctx.opt.perf) return;
  const int64_t N = 8192, D = 4096, V = 8192;
  auto report = [&](const std::string& what, double seconds, double bytes) {
    std::printf("  perf %-46s %8.2f ms %8.1f GB/s\n", what.c_str(), seconds * 1e3, bytes / seconds / 1e9);
  };
  std::printf("  perf threads %d, isa %s\n", ctx.pool.size(), isa_name(active_isa()));
  for (DType t : kTypes) {
    const double sz = double(dtype_size(t)), nd = double(N * D);
    const std::string sh = std::string(" [8192, 4096] ") + dtype_name(t);
    Buf x({N, D}, t), w({D}, t), y({N, D}, t), r({N}, DType::F32), dy({N, D}, t), dx({N, D}, t), dw({D}, DType::F32);
    randomize(x, 71);
    randomize(w, 72, 0.1, 1.0);
    randomize(dy, 73);
    double s = time_median([&] { rms_norm_forward_cpu(x.view(), w.view(), 1e-6f, y.view(), r.view(), ctx.pool); });
    report("rms_norm fwd" + sh, s, 2 * nd * sz);
    s = time_median([&] {
      rms_norm_backward_cpu(dy.view(), x.view(), w.view(), r.view(), dx.view(), dw.view(), ctx.pool);
    });
    report("rms_norm bwd" + sh, s, 3 * nd * sz);
    // SwiGLU on the same buffers viewed flat: gate = x, up = dy.
    s = time_median([&] { swiglu_forward_cpu(x.view(), dy.view(), y.view(), ctx.pool); });
    report("swiglu fwd" + sh, s, 3 * nd * sz);
    s = time_median([&] { swiglu_backward_cpu(y.view(), x.view(), dy.view(), dx.view(), y.view(), ctx.pool); });
    report("swiglu bwd (dup over dout)" + sh, s, 5 * nd * sz);
    Buf ids({N}, DType::I32), table({V, D}, t), dtable({V, D}, DType::F32);
    random_ids(ids, 74, V);
    randomize(table, 75);
    s = time_median([&] { embedding_forward_cpu(ids.view(), table.view(), y.view(), ctx.pool); });
    report("embedding fwd" + sh + ", V 8192", s, 2 * nd * sz);
    s = time_median([&] { embedding_backward_cpu(dy.view(), ids.view(), dtable.view(), ctx.pool); });
    report("embedding bwd" + sh + ", V 8192 (zero + scatter)", s, nd * sz + 2.0 * double(V * D) * 4);
  }
}
