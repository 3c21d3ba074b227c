// Tests of cpu/linear_loss (fused, chunked linear cross entropy and linear distillation) against
// ref/linear_loss_ref (double, with the [N, V] logits materialized).
//
// Shapes are odd (N in {1, 7, 97, 257}, D in {1, 33, 65}, V in {1, 17, 1025, 5000}) so no size is a
// multiple of a SIMD width or a GEMM tile; about 20% of the targets are ignore_index in most cases
// (the gathered-row path) and none in others (chunks read and write hidden in place). Chunk heights
// are forced small in most cases so a call runs several chunks, including a short last one, and
// left automatic in the rest. Every case runs on every ISA level the machine has (set_active_isa
// over CpuIsa up to detected_isa(), restored afterwards), with F32 and BF16 operands, into guarded
// buffers. The reference gets the very values the kernel read (bf16 inputs are rounded first and
// widened), so only the kernel's arithmetic and its output rounding are measured.
//
// Tolerances (NMSE):
// - F32 losses and gradients: 1e-10. Logits are fp32 dot products of length D (relative error
//   ~1e-7 of |h| |w|), the row kernels' lse / softmax are ~1e-6 relative at worst (cpu/loss.h,
//   cpu/distill.h), and the gradient GEMMs sum up to V = 5000 or N = 257 fp32 products. Measured
//   worst cases: cross entropy 9e-15 (losses) and 9.5e-13 (gradients), distillation 4.4e-12
//   (losses) and 2.5e-11 (gradients, reverse_kl at V = 5000). 1e-10 is far below bf16's 1e-6, so a
//   dropped term, a wrong scale or a chunk counted twice cannot pass.
// - BF16 gradients: fp32 arithmetic, then one rounding to nearest bf16 (2^-8 relative at most):
//   NMSE <= 2^-16 = 1.53e-5 (measured up to 3.9e-6); held to 2e-5. Losses from BF16 operands are
//   F32 outputs: 1e-10.
// - Where the reference is zero (V = 1: softmax is 1 and the gradient 0; all rows ignored) the
//   largest absolute value must be <= 1e-6.
// Modes: default runs correctness; --grad (names with "grad") checks the reference backward and the
// kernels' gradients against central differences of the reference forward loss; --perf prints time,
// GFLOP/s and scratch bytes at N = 2048, D = 1024, V = 32000.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/gemm.h"
#include "../cpu/isa.h"
#include "../cpu/linear_loss.h"
#include "../ref/linear_loss_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

constexpr int32_t kIgnore = kDefaultIgnoreIndex;
constexpr double kTolF32 = 1e-10;
constexpr double kTolBf16 = 2e-5;  // 2^-16 (bf16 rounding) + fp32 error
// The portable distillation row kernel (cpu/distill.cpp, W = 1) sums a row's V terms in a single
// fp32 accumulator: on the peaked V = 5000 rows of linear_distill_variants its gradient alone is
// 1.1e-9 from the reference (distill_fused_cpu on the very same fp32 logits; AVX2 1.6e-11, AVX-512
// 4.5e-12). Portable F32 distillation gradients of rows longer than 1025 are held to 1e-8.
constexpr double kTolF32PortableLongRows = 1e-8;

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
  void fill(unsigned char byte) { mem->fill(byte); }
  int32_t* ids() const { return static_cast<int32_t*>(mem->data()); }
  std::vector<int32_t> ids_vec() const { return std::vector<int32_t>(ids(), ids() + n()); }
  float* f() const { return static_cast<float*>(mem->data()); }
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

double grad_tol(DType t) { return t == DType::F32 ? kTolF32 : kTolBf16; }

// NMSE, or the largest absolute value where the reference is zero.
bool check_close(Context& ctx, const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& ref, double tol) {
  bool zero = true;
  for (double r : ref) zero = zero && std::fabs(r) <= 1e-12;
  if (!zero) return ctx.check_nmse(what, got, ref, tol);
  double mx = 0;
  for (double g : got) mx = std::isnan(g) ? INFINITY : std::max(mx, std::fabs(g));
  char buf[80];
  std::snprintf(buf, sizeof buf, ": zero reference, max |got| %.3e (tol 1e-6)", mx);
  return ctx.check(got.size() == ref.size() && mx <= 1e-6, what + buf);
}

// hidden ~ N(0, 1), weight ~ N(0, (2.5 / sqrt(D))^2): logits ~ N(0, 2.5^2).
std::vector<double> hidden_values(int64_t N, int64_t D, uint64_t seed) { return randn(size_t(N * D), seed); }
std::vector<double> weight_values(int64_t V, int64_t D, uint64_t seed) {
  std::vector<double> w = randn(size_t(V * D), seed);
  for (double& x : w) x *= 2.5 / std::sqrt(double(D));
  return w;
}

// Targets uniform in [0, V), each ignore_index with probability `ignored`.
std::vector<int32_t> target_values(int64_t N, int64_t V, uint64_t seed, double ignored) {
  std::vector<double> u = uniform(size_t(N), seed, 0, double(V)), w = uniform(size_t(N), seed + 1, 0, 1);
  std::vector<int32_t> y(static_cast<size_t>(N));
  for (size_t i = 0; i < y.size(); ++i)
    y[i] = w[i] < ignored ? kIgnore : int32_t(std::min<double>(std::floor(u[i]), double(V - 1)));
  return y;
}

void set_ids(Buf& b, const std::vector<int32_t>& v) { std::memcpy(b.ids(), v.data(), v.size() * 4); }

int64_t count_valid(const std::vector<int32_t>& y) {
  int64_t c = 0;
  for (int32_t t : y) c += t != kIgnore;
  return c;
}

TensorView none() { return TensorView{}; }

template <class F>
bool throws_with(F&& fn, const char* part, std::string* msg) {
  try {
    fn();
  } catch (const Error& e) {
    *msg = e.what();
    return msg->find(part) != std::string::npos;
  }
  *msg = "(no exception)";
  return false;
}

// ---- linear cross entropy cases ------------------------------------------------------------------------

struct CeCase {
  int64_t N, D, V;
  int64_t chunk;  // 0: automatic
  LossReduction reduction;
  double ignored;  // fraction of ignore_index targets
};

// One case, both dtypes, every ISA: the full call against the reference; then, on the best ISA,
// the forward-only and single-gradient calls against the full call (bitwise: the same arithmetic).
void run_ce_case(Context& ctx, const CeCase& c, uint64_t seed) {
  const int64_t N = c.N, D = c.D, V = c.V;
  const std::vector<double> hv = hidden_values(N, D, seed), wv = weight_values(V, D, seed + 1);
  const std::vector<int32_t> yv = target_values(N, V, seed + 2, c.ignored);
  const int64_t valid = count_valid(yv);
  const double dloss = 0.7;
  for (DType dt : {DType::F32, DType::BF16}) {
    Buf h({N, D}, dt), w({V, D}, dt), y({N}, DType::I32);
    h.set(hv);
    w.set(wv);
    set_ids(y, yv);
    const ref::LinearLoss rf =
        ref::linear_cross_entropy(h.values(), w.values(), yv, N, D, V, kIgnore, c.reduction, dloss);
    char name[160];
    std::snprintf(name, sizeof name, "linear_ce [N %lld, D %lld, V %lld] chunk %lld %s %s ignored %.0f%%",
                  (long long)N, (long long)D, (long long)V, (long long)c.chunk, reduction_name(c.reduction),
                  dtype_name(dt), 100 * c.ignored);
    for_each_isa([&](const std::string& isa) {
      const std::string what = std::string(name) + " " + isa;
      Buf loss({1}, DType::F32), losses({N}, DType::F32), dh({N, D}, dt), dw({V, D}, dt);
      losses.fill(0x7f);
      dh.fill(0x7f);
      dw.fill(0x7f);
      LinearLossStats st;
      LinearCrossEntropyParams p;
      p.ignore_index = kIgnore;
      p.reduction = c.reduction;
      p.dloss = float(dloss);
      p.chunk_rows = c.chunk;
      p.stats = &st;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                               ctx.pool);
      check_close(ctx, what + " losses", losses.values(), rf.losses, kTolF32);
      check_close(ctx, what + " loss", loss.values(), {rf.loss}, kTolF32);
      check_close(ctx, what + " dhidden", dh.values(), rf.dhidden, grad_tol(dt));
      check_close(ctx, what + " dweight", dw.values(), rf.dweight, grad_tol(dt));
      const int64_t want_rows = c.chunk > 0 ? std::min(c.chunk, valid) : st.chunk_rows;
      ctx.check(st.counted_rows == valid && st.chunk_rows == want_rows &&
                    st.chunks == (valid ? (valid + want_rows - 1) / want_rows : 0) && st.scratch_bytes > 0,
                what + " stats: " + std::to_string(st.chunks) + " chunks of " + std::to_string(st.chunk_rows));

      ctx.check(loss.intact() && losses.intact() && dh.intact() && dw.intact(), what + ": guard bytes");
      if (isa != isa_name(detected_isa())) return;
      // forward only, dhidden only, dweight only (on the best path: which outputs are wanted is
      // decided above the ISA-specific code)
      Buf loss2({1}, DType::F32), losses2({N}, DType::F32), dh2({N, D}, dt), dw2({V, D}, dt);
      p.stats = nullptr;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), none(), none(),
                               ctx.pool);
      ctx.check(same_bits(loss2, loss) && same_bits(losses2, losses), what + " forward-only equals the full call");
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), dh2.view(), none(),
                               ctx.pool);
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), none(), dw2.view(),
                               ctx.pool);
      ctx.check(same_bits(dh2, dh) && same_bits(dw2, dw), what + " single-gradient calls equal the full call");
      ctx.check(loss2.intact() && losses2.intact() && dh2.intact() && dw2.intact(), what + ": guard bytes (variants)");
    });
  }
}

// ---- linear distillation cases --------------------------------------------------------------------------

struct KindCase {
  DistillKind kind;
  float beta;
  const char* name;
};
const KindCase kKinds[] = {{DistillKind::ForwardKl, 0.5f, "forward_kl"},
                           {DistillKind::ReverseKl, 0.5f, "reverse_kl"},
                           {DistillKind::Jsd, 0.5f, "jsd(0.5)"}};

// Distillation operands: the teacher's hidden states are a different projection of related data
// (so the two distributions are correlated but not equal).
struct DistillInputs {
  int64_t N, Ds, Dt, V;
  std::vector<double> sh, sw, th, tw;
  std::vector<int32_t> y;  // empty: no targets
};

DistillInputs make_distill(int64_t N, int64_t Ds, int64_t Dt, int64_t V, uint64_t seed, double ignored,
                           bool targets) {
  DistillInputs in{N, Ds, Dt, V, hidden_values(N, Ds, seed), weight_values(V, Ds, seed + 1),
                   hidden_values(N, Dt, seed + 2), weight_values(V, Dt, seed + 3), {}};
  if (targets) in.y = target_values(N, V, seed + 4, ignored);
  return in;
}

// One distillation setting on every ISA: loss, per-row losses and both gradients against the
// reference; guard bytes; the forward-only call equal to the full one.
void run_distill_case(Context& ctx, const std::string& name, const DistillInputs& in, DType sdt, DType tdt,
                      const DistillParams& dp, float alpha, int64_t chunk, const Shape& hshape = {}) {
  const int64_t N = in.N, Ds = in.Ds, Dt = in.Dt, V = in.V;
  Buf sh(hshape.empty() ? Shape{N, Ds} : hshape, sdt), sw({V, Ds}, sdt), th({N, Dt}, tdt), tw({V, Dt}, tdt);
  Buf y({N}, DType::I32);
  sh.set(in.sh);
  sw.set(in.sw);
  th.set(in.th);
  tw.set(in.tw);
  if (!in.y.empty()) set_ids(y, in.y);
  const TensorView yview = in.y.empty() ? TensorView{} : y.view();
  const double dloss = 0.7;
  const ref::LinearLoss rf = ref::linear_distill(sh.values(), sw.values(), th.values(), tw.values(), in.y, N, Ds, Dt,
                                                 V, dp.kind, dp.temperature, dp.beta, kIgnore, alpha, dloss);
  for_each_isa([&](const std::string& isa) {
    const std::string what = name + " " + isa;
    Buf loss({1}, DType::F32), losses({N}, DType::F32), dh(sh.shape, sdt), dw({V, Ds}, sdt);
    losses.fill(0x7f);
    dh.fill(0x7f);
    dw.fill(0x7f);
    LinearDistillParams p;
    p.distill = dp;
    p.distill.ignore_index = kIgnore;
    p.alpha = alpha;
    p.dloss = float(dloss);
    p.chunk_rows = chunk;
    linear_distill_cpu(sh.view(), sw.view(), th.view(), tw.view(), yview, p, loss.view(), losses.view(), dh.view(),
                       dw.view(), ctx.pool);
    check_close(ctx, what + " losses", losses.values(), rf.losses, kTolF32);
    check_close(ctx, what + " loss", loss.values(), {rf.loss}, kTolF32);
    const double gtol = sdt == DType::F32 && isa == "portable" && V > 1025 ? kTolF32PortableLongRows : grad_tol(sdt);
    check_close(ctx, what + " dstudent_hidden", dh.values(), rf.dhidden, gtol);
    check_close(ctx, what + " dstudent_weight", dw.values(), rf.dweight, gtol);
    Buf loss2({1}, DType::F32);
    linear_distill_cpu(sh.view(), sw.view(), th.view(), tw.view(), yview, p, loss2.view(), none(), none(), none(),
                       ctx.pool);
    ctx.check(same_bits(loss2, loss), what + " forward-only loss equals the full call's");
    ctx.check(loss.intact() && losses.intact() && dh.intact() && dw.intact() && loss2.intact(),
              what + ": guard bytes");
  });
}

}  // namespace

// ==== correctness: linear cross entropy ==================================================================

TK_TEST(linear_ce_vs_ref) {
  const LossReduction kMean = LossReduction::Mean, kSum = LossReduction::Sum;
  const CeCase cases[] = {
      {1, 33, 17, 0, kMean, 0.0},      {7, 1, 1025, 0, kSum, 0.2},     {7, 65, 1, 3, kMean, 0.2},
      {97, 33, 5000, 16, kMean, 0.0},  {97, 65, 17, 10, kSum, 0.2},    {257, 1, 17, 0, kMean, 0.2},
      {257, 65, 1025, 64, kMean, 0.2}, {1, 65, 5000, 0, kSum, 0.0},    {257, 33, 5000, 0, kMean, 0.2},
      {97, 1, 5000, 40, kSum, 0.0},    {257, 33, 1025, 37, kSum, 0.0},
  };
  uint64_t seed = 1000;
  for (const CeCase& c : cases) run_ce_case(ctx, c, seed += 10);
}

TK_TEST(linear_ce_all_ignored_rank_threads) {
  // All rows ignored: loss 0, zero per-row losses and gradients (for both reductions), no chunk.
  const int64_t N = 7, D = 33, V = 17;
  for (DType dt : {DType::F32, DType::BF16})
    for (LossReduction r : {LossReduction::Sum, LossReduction::Mean}) {
      Buf h({N, D}, dt), w({V, D}, dt), y({N}, DType::I32), loss({1}, DType::F32), losses({N}, DType::F32),
          dh({N, D}, dt), dw({V, D}, dt);
      h.set(hidden_values(N, D, 5));
      w.set(weight_values(V, D, 6));
      for (int64_t n = 0; n < N; ++n) y.ids()[n] = kIgnore;
      loss.fill(0x7f);
      losses.fill(0x7f);
      dh.fill(0x7f);
      dw.fill(0x7f);
      LinearLossStats st;
      LinearCrossEntropyParams p;
      p.reduction = r;
      p.stats = &st;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                               ctx.pool);
      bool zero = loss.values()[0] == 0.0;
      for (const Buf* b : {&losses, &dh, &dw})
        for (double v : b->values()) zero = zero && v == 0.0;
      ctx.check(zero && st.chunks == 0 && loss.intact() && losses.intact() && dh.intact() && dw.intact(),
                std::string("linear_ce all ignored ") + dtype_name(dt) + " " + reduction_name(r) +
                    ": zero loss, losses and gradients");
    }

  // Leading dims fold into rows: hidden [3, 5, D], targets [3, 5].
  {
    const int64_t B = 3, T = 5, Dr = 33, Vr = 1025;
    const std::vector<double> hv = hidden_values(B * T, Dr, 7), wv = weight_values(Vr, Dr, 8);
    const std::vector<int32_t> yv = target_values(B * T, Vr, 9, 0.2);
    Buf h({B, T, Dr}, DType::F32), w({Vr, Dr}, DType::F32), y({B, T}, DType::I32), loss({1}, DType::F32),
        losses({B, T}, DType::F32), dh({B, T, Dr}, DType::F32), dw({Vr, Dr}, DType::F32);
    h.set(hv);
    w.set(wv);
    set_ids(y, yv);
    const ref::LinearLoss rf =
        ref::linear_cross_entropy(h.values(), w.values(), yv, B * T, Dr, Vr, kIgnore, LossReduction::Mean, 1.0);
    LinearCrossEntropyParams p;
    p.chunk_rows = 4;
    linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                             ctx.pool);
    ctx.check_nmse("linear_ce [3, 5, 33] loss", loss.values(), {rf.loss}, kTolF32);
    ctx.check_nmse("linear_ce [3, 5, 33] dhidden", dh.values(), rf.dhidden, kTolF32);
    ctx.check_nmse("linear_ce [3, 5, 33] dweight", dw.values(), rf.dweight, kTolF32);
  }

  // The automatic plan: at V = 300000 one fp32 row is 1.2 MB, so 32 MiB holds 27 rows; 40 rows take
  // two chunks, evened out to 20 each. The losses match a single 40-row chunk's.
  {
    const int64_t Np = 40, Dp = 1, Vp = 300000;
    Buf h({Np, Dp}, DType::F32), w({Vp, Dp}, DType::F32), y({Np}, DType::I32), loss({1}, DType::F32),
        losses({Np}, DType::F32), loss1({1}, DType::F32), losses1({Np}, DType::F32);
    h.set(hidden_values(Np, Dp, 14));
    w.set(weight_values(Vp, Dp, 15));
    set_ids(y, target_values(Np, Vp, 16, 0.0));
    LinearLossStats st;
    LinearCrossEntropyParams p;
    p.stats = &st;
    linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), none(), none(), ctx.pool);
    ctx.check(st.chunks == 2 && st.chunk_rows == 20 && st.chunk_rows * Vp * 4 <= kLinearLossChunkBytes,
              "linear_ce automatic plan at V = 300000: " + std::to_string(st.chunks) + " chunks of " +
                  std::to_string(st.chunk_rows) + " rows");
    p.chunk_rows = Np;
    linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss1.view(), losses1.view(), none(), none(), ctx.pool);
    ctx.check(st.chunks == 1, "linear_ce chunk_rows = N runs one chunk");
    ctx.check_nmse("linear_ce V = 300000: two chunks vs one, losses", losses.values(), losses1.values(), 1e-12);
  }

  // Results do not depend on the thread count: 1, 2 and 3 threads give the same bits (multi-chunk,
  // gathered rows, both dtypes, the active ISA).
  const int64_t Nt = 97, Dt = 65, Vt = 1025;
  const std::vector<double> hv = hidden_values(Nt, Dt, 11), wv = weight_values(Vt, Dt, 12);
  const std::vector<int32_t> yv = target_values(Nt, Vt, 13, 0.2);
  ThreadPool one(1), three(3);
  for (DType dt : {DType::F32, DType::BF16}) {
    Buf h({Nt, Dt}, dt), w({Vt, Dt}, dt), y({Nt}, DType::I32);
    h.set(hv);
    w.set(wv);
    set_ids(y, yv);
    std::vector<std::unique_ptr<Buf>> outs;
    bool same = true;
    for (ThreadPool* pool : {&ctx.pool, &one, &three}) {
      auto loss = std::make_unique<Buf>(Shape{1}, DType::F32);
      auto losses = std::make_unique<Buf>(Shape{Nt}, DType::F32);
      auto dh = std::make_unique<Buf>(Shape{Nt, Dt}, dt);
      auto dw = std::make_unique<Buf>(Shape{Vt, Dt}, dt);
      LinearCrossEntropyParams p;
      p.chunk_rows = 20;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss->view(), losses->view(), dh->view(), dw->view(),
                               *pool);
      if (!outs.empty())
        same = same && same_bits(*loss, *outs[0]) && same_bits(*losses, *outs[1]) && same_bits(*dh, *outs[2]) &&
               same_bits(*dw, *outs[3]);
      if (outs.empty()) {
        outs.push_back(std::move(loss));
        outs.push_back(std::move(losses));
        outs.push_back(std::move(dh));
        outs.push_back(std::move(dw));
      }
    }
    ctx.check(same, std::string("linear_ce ") + dtype_name(dt) + ": 1, 2 and 3 threads give the same bits");
  }
}

TK_TEST(linear_ce_nan) {
  // A NaN in a counted row's hidden state reaches that row's loss and the reduced loss; the other
  // rows' losses stay finite. A NaN in an ignored row's hidden state reaches nothing: that row is
  // never multiplied, so the results equal those of the same call without the NaN, bit for bit.
  const int64_t N = 9, D = 33, V = 1025;
  std::vector<double> hv = hidden_values(N, D, 21);
  const std::vector<double> wv = weight_values(V, D, 22);
  std::vector<int32_t> yv = target_values(N, V, 23, 0.0);
  yv[6] = kIgnore;
  for (DType dt : {DType::F32, DType::BF16}) {
    Buf w({V, D}, dt), y({N}, DType::I32);
    w.set(wv);
    set_ids(y, yv);
    auto run = [&](const std::vector<double>& hvals, Buf& loss, Buf& losses, Buf& dw) {
      Buf h({N, D}, dt), dh({N, D}, dt);
      h.set(hvals);
      LinearCrossEntropyParams p;
      p.chunk_rows = 4;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                               ctx.pool);
    };
    Buf l0({1}, DType::F32), r0({N}, DType::F32), w0({V, D}, dt);
    run(hv, l0, r0, w0);
    std::vector<double> bad = hv;
    bad[size_t(2 * D + 5)] = std::numeric_limits<double>::quiet_NaN();  // row 2 counts
    Buf l1({1}, DType::F32), r1({N}, DType::F32), w1({V, D}, dt);
    run(bad, l1, r1, w1);
    const std::vector<double> rl = r1.values();
    bool others = true;
    for (int64_t n = 0; n < N; ++n)
      if (n != 2) others = others && std::isfinite(rl[size_t(n)]);
    ctx.check(std::isnan(l1.values()[0]) && std::isnan(rl[2]) && others,
              std::string("linear_ce ") + dtype_name(dt) + ": NaN in a counted hidden row makes its loss and the loss NaN");
    std::vector<double> quiet = hv;
    quiet[size_t(6 * D + 1)] = std::numeric_limits<double>::quiet_NaN();  // row 6 is ignored
    Buf l2({1}, DType::F32), r2({N}, DType::F32), w2({V, D}, dt);
    run(quiet, l2, r2, w2);
    ctx.check(same_bits(l2, l0) && same_bits(r2, r0) && same_bits(w2, w0),
              std::string("linear_ce ") + dtype_name(dt) + ": NaN in an ignored hidden row changes nothing");
  }
}

TK_TEST(linear_loss_errors) {
  // Bad arguments throw tk::Error naming the kernel and operand, and leave every output untouched.
  const int64_t N = 5, D = 7, V = 11;
  Buf h({N, D}, DType::F32), w({V, D}, DType::F32), wd({V, D + 1}, DType::F32), wb({V, D}, DType::BF16),
      th({N + 1, D}, DType::F32), tw({V + 1, D}, DType::F32), y({N}, DType::I32), ybad({N}, DType::I32),
      y4({N - 1}, DType::I32), loss({1}, DType::F32), losses({N}, DType::F32), losses4({N - 1}, DType::F32),
      dh({N, D}, DType::F32), dhb({N, D}, DType::BF16), dw({V, D}, DType::F32), dw2({V + 1, D}, DType::F32);
  h.set(hidden_values(N, D, 1));
  w.set(weight_values(V, D, 2));
  for (int64_t n = 0; n < N; ++n) y.ids()[n] = int32_t(n), ybad.ids()[n] = int32_t(n);
  ybad.ids()[3] = int32_t(V);
  for (Buf* b : {&loss, &losses, &dh, &dw}) b->fill(0x11);
  LinearCrossEntropyParams p;
  auto ce = [&](const char* what, const char* part, const TensorView& hh, const TensorView& ww, const TensorView& yy,
                const LinearCrossEntropyParams& pp, const TensorView& ls, const TensorView& dhh,
                const TensorView& dww) {
    std::string msg;
    bool ok = throws_with([&] { linear_cross_entropy_cpu(hh, ww, yy, pp, loss.view(), ls, dhh, dww, ctx.pool); },
                          part, &msg);
    ctx.check(ok && msg.find("linear_cross_entropy_cpu") != std::string::npos,
              std::string("linear_ce error ") + what + ": " + msg);
  };
  ce("target out of range", "targets[3] = 11", h.view(), w.view(), ybad.view(), p, losses.view(), dh.view(), dw.view());
  ce("weight D", "weight", h.view(), wd.view(), y.view(), p, losses.view(), dh.view(), dw.view());
  ce("weight dtype", "weight", h.view(), wb.view(), y.view(), p, losses.view(), dh.view(), dw.view());
  ce("targets count", "targets", h.view(), w.view(), y4.view(), p, losses.view(), dh.view(), dw.view());
  ce("losses count", "losses", h.view(), w.view(), y.view(), p, losses4.view(), dh.view(), dw.view());
  ce("dhidden dtype", "dhidden", h.view(), w.view(), y.view(), p, losses.view(), dhb.view(), dw.view());
  ce("dweight shape", "dweight", h.view(), w.view(), y.view(), p, losses.view(), dh.view(), dw2.view());
  LinearCrossEntropyParams pn = p;
  pn.reduction = LossReduction::None;
  ce("reduction none", "reduction", h.view(), w.view(), y.view(), pn, losses.view(), dh.view(), dw.view());
  LinearCrossEntropyParams pc = p;
  pc.chunk_rows = -1;
  ce("chunk_rows", "chunk_rows", h.view(), w.view(), y.view(), pc, losses.view(), dh.view(), dw.view());

  auto kd = [&](const char* what, const char* part, const TensorView& thh, const TensorView& tww,
                const TensorView& yy, const LinearDistillParams& pp) {
    std::string msg;
    bool ok = throws_with(
        [&] {
          linear_distill_cpu(h.view(), w.view(), thh, tww, yy, pp, loss.view(), losses.view(), dh.view(), dw.view(),
                             ctx.pool);
        },
        part, &msg);
    ctx.check(ok && msg.find("linear_distill_cpu") != std::string::npos,
              std::string("linear_distill error ") + what + ": " + msg);
  };
  LinearDistillParams q;
  kd("teacher rows", "teacher_hidden", th.view(), w.view(), y.view(), q);
  kd("teacher V", "teacher_weight", h.view(), tw.view(), y.view(), q);
  kd("target out of range", "targets[3] = 11", h.view(), w.view(), ybad.view(), q);
  kd("alpha without targets", "needs targets", h.view(), w.view(), none(), q);
  LinearDistillParams qa = q;
  qa.alpha = 1.5f;
  kd("alpha range", "alpha", h.view(), w.view(), y.view(), qa);
  LinearDistillParams qt = q;
  qt.distill.temperature = 0.0f;
  kd("temperature", "temperature", h.view(), w.view(), y.view(), qt);
  LinearDistillParams qb = q;
  qb.distill.kind = DistillKind::Jsd;
  qb.distill.beta = -0.5f;
  kd("jsd beta", "beta", h.view(), w.view(), y.view(), qb);

  bool untouched = true;
  for (Buf* b : {&loss, &losses, &dh, &dw}) {
    const unsigned char* c = static_cast<const unsigned char*>(b->mem->data());
    for (size_t i = 0; i < b->mem->bytes(); ++i) untouched = untouched && c[i] == 0x11;
  }
  ctx.check(untouched, "linear_loss_errors: outputs untouched by rejected calls");
}

// ==== correctness: linear distillation ===================================================================

TK_TEST(linear_distill_vs_ref) {
  // Every kind at T = 1 and 2.5, alpha 0 / 0.5 / 1, bf16 student with f32 teacher and the reverse,
  // several chunks with gathered rows.
  const DistillInputs in = make_distill(97, 33, 17, 257, 300, 0.2, true);
  const std::pair<DType, DType> types[] = {{DType::F32, DType::BF16}, {DType::BF16, DType::F32}};
  for (const auto& tp : types)
    for (const KindCase& k : kKinds)
      for (float T : {1.0f, 2.5f})
        for (float alpha : {0.0f, 0.5f, 1.0f}) {
          DistillParams dp;
          dp.kind = k.kind;
          dp.beta = k.beta;
          dp.temperature = T;
          char name[160];
          std::snprintf(name, sizeof name, "linear_distill %s T=%g alpha=%g [97, 33|17, 257] %s student %s teacher",
                        k.name, double(T), double(alpha), dtype_name(tp.first), dtype_name(tp.second));
          run_distill_case(ctx, name, in, tp.first, tp.second, dp, alpha, 16);
        }
}

TK_TEST(linear_distill_variants) {
  DistillParams fkl, rkl, jsd;
  rkl.kind = DistillKind::ReverseKl;
  jsd.kind = DistillKind::Jsd;
  jsd.beta = 0.3f;
  jsd.temperature = 2.5f;
  // No targets: every row counts (alpha 0), whole rows in place, D = 1 teacher.
  const DistillInputs nt = make_distill(7, 65, 1, 1025, 400, 0.0, false);
  run_distill_case(ctx, "linear_distill forward_kl no targets [7, 65|1, 1025]", nt, DType::F32, DType::F32, fkl, 0.0f, 3);
  run_distill_case(ctx, "linear_distill jsd(0.3) no targets [7, 65|1, 1025] bf16", nt, DType::BF16, DType::BF16, jsd,
                   0.0f, 0);
  // Every row ignored: loss 0 and zero gradients.
  DistillInputs all = make_distill(7, 33, 17, 17, 410, 0.0, true);
  for (int32_t& t : all.y) t = kIgnore;
  run_distill_case(ctx, "linear_distill reverse_kl all ignored", all, DType::F32, DType::F32, rkl, 0.5f, 2);
  // N = 1, V = 1 (zero divergence and gradient), V = 5000 with the automatic chunk, rank 3.
  run_distill_case(ctx, "linear_distill jsd(0.3) [1, 33|65, 5000]", make_distill(1, 33, 65, 5000, 420, 0.0, true),
                   DType::F32, DType::F32, jsd, 0.5f, 0);
  run_distill_case(ctx, "linear_distill forward_kl [7, 33|33, 1]", make_distill(7, 33, 33, 1, 430, 0.2, true),
                   DType::F32, DType::F32, fkl, 0.5f, 2);
  run_distill_case(ctx, "linear_distill reverse_kl [257, 1|33, 5000] auto chunk",
                   make_distill(257, 1, 33, 5000, 440, 0.2, true), DType::F32, DType::BF16, rkl, 0.5f, 0);
  run_distill_case(ctx, "linear_distill forward_kl [3, 5, 33] rows", make_distill(15, 33, 17, 1025, 450, 0.2, true),
                   DType::F32, DType::F32, fkl, 0.5f, 4, {3, 5, 33});
  // alpha == 1 never reads the teacher: NaN teacher logits do not reach the loss.
  {
    DistillInputs nan_t = make_distill(7, 33, 17, 17, 460, 0.0, true);
    nan_t.th[3] = std::numeric_limits<double>::quiet_NaN();
    run_distill_case(ctx, "linear_distill alpha=1 NaN teacher", nan_t, DType::F32, DType::F32, fkl, 1.0f, 0);
  }
}

// ==== --grad ===============================================================================================

namespace {

// Central differences of f with respect to each of x's values (h = 1e-5 on values of size ~1:
// truncation ~h^2, rounding ~1e-16 / h; NMSE ~1e-20 against the analytic gradient).
template <class F>
std::vector<double> central_diff(std::vector<double> x, double dloss, F&& f) {
  const double h = 1e-5;
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double lp = f(x);
    x[i] = x0 - h;
    const double lm = f(x);
    x[i] = x0;
    g[i] = dloss * (lp - lm) / (2 * h);
  }
  return g;
}

}  // namespace

TK_TEST(linear_ce_grad) {
  // The reference gradients (1e-12) and the kernels' F32 gradients on every ISA, several chunks
  // (1e-10), against central differences of the reference forward loss.
  const int64_t N = 6, D = 5, V = 9;
  const double dloss = 0.7;
  Buf h({N, D}, DType::F32), w({V, D}, DType::F32), y({N}, DType::I32);
  h.set(hidden_values(N, D, 51));
  w.set(weight_values(V, D, 52));
  const std::vector<int32_t> yv = {2, kIgnore, 0, 8, 4, kIgnore};
  set_ids(y, yv);
  const std::vector<double> hv = h.values(), wv = w.values();
  for (LossReduction r : {LossReduction::Sum, LossReduction::Mean}) {
    const std::string name = std::string("linear_ce_grad ") + reduction_name(r);
    const ref::LinearLoss rf = ref::linear_cross_entropy(hv, wv, yv, N, D, V, kIgnore, r, dloss);
    const std::vector<double> fh = central_diff(hv, dloss, [&](const std::vector<double>& x) {
      return ref::linear_cross_entropy(x, wv, yv, N, D, V, kIgnore, r, 1.0).loss;
    });
    const std::vector<double> fw = central_diff(wv, dloss, [&](const std::vector<double>& x) {
      return ref::linear_cross_entropy(hv, x, yv, N, D, V, kIgnore, r, 1.0).loss;
    });
    ctx.check_nmse(name + ": ref dhidden vs central differences", rf.dhidden, fh, 1e-12);
    ctx.check_nmse(name + ": ref dweight vs central differences", rf.dweight, fw, 1e-12);
    for_each_isa([&](const std::string& isa) {
      Buf loss({1}, DType::F32), losses({N}, DType::F32), dh({N, D}, DType::F32), dw({V, D}, DType::F32);
      LinearCrossEntropyParams p;
      p.reduction = r;
      p.dloss = float(dloss);
      p.chunk_rows = 2;
      linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                               ctx.pool);
      ctx.check_nmse(name + " " + isa + ": kernel dhidden vs central differences", dh.values(), fh, kTolF32);
      ctx.check_nmse(name + " " + isa + ": kernel dweight vs central differences", dw.values(), fw, kTolF32);
    });
  }
}

TK_TEST(linear_distill_grad) {
  // As linear_ce_grad, for every kind at T = 1 and 2.5 and alpha 0 / 0.5 / 1.
  const int64_t N = 5, Ds = 4, Dt = 3, V = 7;
  const double dloss = 0.7;
  DistillInputs in = make_distill(N, Ds, Dt, V, 61, 0.0, true);
  in.y = {3, kIgnore, 0, 6, 2};
  Buf sh({N, Ds}, DType::F32), sw({V, Ds}, DType::F32), th({N, Dt}, DType::F32), tw({V, Dt}, DType::F32),
      y({N}, DType::I32);
  sh.set(in.sh);
  sw.set(in.sw);
  th.set(in.th);
  tw.set(in.tw);
  set_ids(y, in.y);
  const std::vector<double> shv = sh.values(), swv = sw.values(), thv = th.values(), twv = tw.values();
  for (const KindCase& k : kKinds)
    for (double T : {1.0, 2.5})
      for (double alpha : {0.0, 0.5, 1.0}) {
        char name[96];
        std::snprintf(name, sizeof name, "linear_distill_grad %s T=%g alpha=%g", k.name, T, alpha);
        auto fwd = [&](const std::vector<double>& a, const std::vector<double>& b) {
          return ref::linear_distill(a, b, thv, twv, in.y, N, Ds, Dt, V, k.kind, T, k.beta, kIgnore, alpha, 1.0).loss;
        };
        const ref::LinearLoss rf =
            ref::linear_distill(shv, swv, thv, twv, in.y, N, Ds, Dt, V, k.kind, T, k.beta, kIgnore, alpha, dloss);
        const std::vector<double> fh =
            central_diff(shv, dloss, [&](const std::vector<double>& x) { return fwd(x, swv); });
        const std::vector<double> fw =
            central_diff(swv, dloss, [&](const std::vector<double>& x) { return fwd(shv, x); });
        ctx.check_nmse(std::string(name) + ": ref dstudent_hidden vs central differences", rf.dhidden, fh, 1e-12);
        ctx.check_nmse(std::string(name) + ": ref dstudent_weight vs central differences", rf.dweight, fw, 1e-12);
        for_each_isa([&](const std::string& isa) {
          Buf loss({1}, DType::F32), dh({N, Ds}, DType::F32), dw({V, Ds}, DType::F32);
          LinearDistillParams p;
          p.distill.kind = k.kind;
          p.distill.beta = k.beta;
          p.distill.temperature = float(T);
          p.distill.ignore_index = kIgnore;
          p.alpha = float(alpha);
          p.dloss = float(dloss);
          p.chunk_rows = 2;
          linear_distill_cpu(sh.view(), sw.view(), th.view(), tw.view(), y.view(), p, loss.view(), none(), dh.view(),
                             dw.view(), ctx.pool);
          ctx.check_nmse(std::string(name) + " " + isa + ": kernel dstudent_hidden vs central differences",
                         dh.values(), fh, kTolF32);
          ctx.check_nmse(std::string(name) + " " + isa + ": kernel dstudent_weight vs central differences",
                         dw.values(), fw, kTolF32);
        });
      }
}

// ==== --perf ===============================================================================================

TK_TEST(linear_loss_perf) {
  // The fused call at a typical LM-head size, forward only and with both gradients, against the
  // unfused path that materializes the logits (GEMM, cross_entropy_fused_cpu, two GEMMs).
  const int64_t N = 2048, D = 1024, V = 32000;
  std::printf("  perf threads %d, isa %s\n", ctx.pool.size(), isa_name(active_isa()));
  Buf h({N, D}, DType::F32), w({V, D}, DType::F32), y({N}, DType::I32), loss({1}, DType::F32),
      losses({N}, DType::F32), dh({N, D}, DType::F32), dw({V, D}, DType::F32);
  h.set(hidden_values(N, D, 71));
  w.set(weight_values(V, D, 72));
  set_ids(y, target_values(N, V, 73, 0.0));
  const double gf = 2.0 * double(N) * double(V) * double(D) / 1e9;  // one of the three GEMMs
  const double logits_bytes = double(N) * double(V) * 4;
  LinearLossStats st;
  LinearCrossEntropyParams p;
  p.stats = &st;
  const double tf = time_median([&] {
    linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), none(), none(), ctx.pool);
  }, 3);
  std::printf("  perf linear_ce f32 [N %lld, D %lld, V %lld] forward      %9.1f ms  %6.1f GFLOP/s  scratch %.1f MB"
              " (%lld chunks of %lld rows) vs %.1f MB of logits\n",
              (long long)N, (long long)D, (long long)V, tf * 1e3, gf / tf, double(st.scratch_bytes) / 1e6,
              (long long)st.chunks, (long long)st.chunk_rows, logits_bytes / 1e6);
  const double tb = time_median([&] {
    linear_cross_entropy_cpu(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                             ctx.pool);
  }, 3);
  std::printf("  perf linear_ce f32 [N %lld, D %lld, V %lld] fwd + grads  %9.1f ms  %6.1f GFLOP/s  scratch %.1f MB"
              " vs %.1f MB of logits\n",
              (long long)N, (long long)D, (long long)V, tb * 1e3, 3 * gf / tb, double(st.scratch_bytes) / 1e6,
              logits_bytes / 1e6);

  // Unfused: logits [N, V] materialized, then cross_entropy_fused_cpu in place, then G W and G^T h.
  {
    std::vector<float> logits(static_cast<size_t>(N * V)), lse(static_cast<size_t>(N)), rl(static_cast<size_t>(N));
    float tmp = 0;
    const double tu = time_median([&] {
      GemmParams g;
      g.M = N, g.N = V, g.K = D, g.A = h.f(), g.lda = D, g.B = w.f(), g.ldb = D, g.trans_b = true;
      g.C = logits.data(), g.ldc = V;
      gemm_cpu(g, ctx.pool);
      const TensorView lv = make_view(logits.data(), DType::F32, Device{}, {N, V});
      cross_entropy_fused_cpu(lv, y.view(), kIgnore, LossReduction::Mean, 1.0f,
                              make_view(rl.data(), DType::F32, Device{}, {N}),
                              make_view(lse.data(), DType::F32, Device{}, {N}),
                              make_view(&tmp, DType::F32, Device{}, {1}), lv, ctx.pool);
      GemmParams a;
      a.M = N, a.N = D, a.K = V, a.A = logits.data(), a.lda = V, a.B = w.f(), a.ldb = D, a.C = dh.f(), a.ldc = D;
      gemm_cpu(a, ctx.pool);
      GemmParams b;
      b.M = V, b.N = D, b.K = N, b.A = logits.data(), b.lda = V, b.trans_a = true, b.B = h.f(), b.ldb = D;
      b.C = dw.f(), b.ldc = D;
      gemm_cpu(b, ctx.pool);
    }, 1);
    std::printf("  perf unfused (materialized logits) fwd + grads        %9.1f ms  %6.1f GFLOP/s  logits %.1f MB\n",
                tu * 1e3, 3 * gf / tu, logits_bytes / 1e6);
  }

  // bf16 operands, one timed call (the W blocks are widened for G W).
  {
    Buf hb({N, D}, DType::BF16), wb({V, D}, DType::BF16), dhb({N, D}, DType::BF16), dwb({V, D}, DType::BF16);
    hb.set(h.values());
    wb.set(w.values());
    const double tbf = time_median([&] {
      linear_cross_entropy_cpu(hb.view(), wb.view(), y.view(), p, loss.view(), losses.view(), dhb.view(), dwb.view(),
                               ctx.pool);
    }, 1);
    std::printf("  perf linear_ce bf16 fwd + grads                       %9.1f ms  %6.1f GFLOP/s  scratch %.1f MB\n",
                tbf * 1e3, 3 * gf / tbf, double(st.scratch_bytes) / 1e6);
  }
  ctx.check(true, "linear_loss_perf ran");
}
