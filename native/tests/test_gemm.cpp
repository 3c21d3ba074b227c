// GEMM tests: every ISA path present on this CPU against the double reference (native/ref).
//
// Shapes are built mostly from {1, 7, 97, 257, 1025} so no dimension is a multiple of any register
// tile or cache block; the larger ones cross the K block (multi-block accumulation and the
// bf16-output fp32 buffer; K = 4103 for the 2048-deep bf16 blocks), the mc row block and the thread
// split, and N = 61 / 125 reach the upper half of the masked edge stores. Strides exceed the
// minimum so a kernel that assumes dense rows reads the wrong elements, outputs sit in guarded
// buffers, and the padding columns of C are checked to be untouched. Each case's reference is
// computed once and every path is compared against it.
//
// Tolerances (normalized MSE against the double reference on the same, already-rounded inputs):
//   fp32 accumulation, fp32 output: 1e-10 (fp32 dot products of length ~1000 sit near 1e-12)
//   bf16 output: 1e-5 (one rounding to 8 mantissa bits: ~2^-18 / 3 ~ 1.3e-6 averaged over the
//                output; outputs of fewer than 256 elements compare with the rounded reference)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../cpu/gemm.h"
#include "../cpu/isa.h"
#include "../cpu/probe.h"
#include "../ref/gemm_ref.h"
#include "harness.h"

namespace {

using tk::CpuIsa;
using tk::DType;
using tk::GemmParams;
using tk::test::Guarded;

struct Case {
  int64_t batch = 1, M = 1, N = 1, K = 1;
  DType ab = DType::F32, c = DType::F32;
  bool ta = false, tb = false;
  int64_t pad_a = 0, pad_b = 0, pad_c = 0;     // extra elements per row beyond the minimum
  bool bcast_a = false, bcast_b = false;       // batch stride 0
  float alpha = 1.0f, beta = 0.0f;
  bool nan_c = false;                          // C starts as NaN (only meaningful with beta == 0)
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "gemm b%lld %lldx%lldx%lld ab=%s c=%s %s%s lda+%lld ldb+%lld ldc+%lld%s%s a=%g b=%g%s",
                (long long)c.batch, (long long)c.M, (long long)c.N, (long long)c.K, tk::dtype_name(c.ab),
                tk::dtype_name(c.c), c.ta ? "T" : "N", c.tb ? "T" : "N", (long long)c.pad_a, (long long)c.pad_b,
                (long long)c.pad_c, c.bcast_a ? " bcastA" : "", c.bcast_b ? " bcastB" : "", c.alpha, c.beta,
                c.nan_c ? " nanC" : "");
  return buf;
}

// Operand storage for one case: A, B and the initial C live in plain vectors; each path's output
// gets a fresh guarded copy of the initial C.
struct Problem {
  Case cs;
  GemmParams p;  // A, B point into a, b; C points at c0 (for the reference)
  std::vector<unsigned char> a, b, c0;
  int64_t c_rows = 0;  // rows of C storage over the whole batch

  explicit Problem(const Case& c, uint64_t seed) : cs(c) {
    const size_t esz = tk::dtype_size(c.ab), csz = tk::dtype_size(c.c);
    p.batch = c.batch;
    p.M = c.M;
    p.N = c.N;
    p.K = c.K;
    p.ab_dtype = c.ab;
    p.c_dtype = c.c;
    p.trans_a = c.ta;
    p.trans_b = c.tb;
    const int64_t ar = c.ta ? c.K : c.M, acol = c.ta ? c.M : c.K;
    const int64_t br = c.tb ? c.N : c.K, bcol = c.tb ? c.K : c.N;
    p.lda = acol + c.pad_a;
    p.ldb = bcol + c.pad_b;
    p.ldc = c.N + c.pad_c;
    p.batch_stride_a = c.bcast_a ? 0 : ar * p.lda;
    p.batch_stride_b = c.bcast_b ? 0 : br * p.ldb;
    p.batch_stride_c = c.M * p.ldc;
    const int64_t na = (c.bcast_a ? 1 : c.batch) * ar * p.lda, nb = (c.bcast_b ? 1 : c.batch) * br * p.ldb;
    c_rows = c.batch * c.M;
    const int64_t nc = c_rows * p.ldc;
    a.resize(size_t(na) * esz);
    b.resize(size_t(nb) * esz);
    c0.resize(size_t(nc) * csz);
    tk::test::from_double(tk::test::randn(size_t(na), seed), a.data(), c.ab);
    tk::test::from_double(tk::test::randn(size_t(nb), seed + 1), b.data(), c.ab);
    if (c.nan_c)
      std::memset(c0.data(), 0xff, c0.size());  // all-ones bits: NaN in both f32 and bf16
    else
      tk::test::from_double(tk::test::randn(size_t(nc), seed + 2), c0.data(), c.c);
    p.A = a.data();
    p.B = b.data();
    p.C = c0.data();
    p.alpha = c.alpha;
    p.beta = c.beta;
  }
};

// Runs one path and compares it with the reference; also checks guards and C's padding columns.
void run_path(tk::test::Context& ctx, const Problem& pr, const std::vector<double>& ref, CpuIsa isa) {
  const Case& c = pr.cs;
  Guarded out(pr.c0.size());
  std::memcpy(out.data(), pr.c0.data(), pr.c0.size());
  GemmParams p = pr.p;
  p.C = out.data();
  tk::gemm_cpu_isa(p, ctx.pool, isa);

  const std::string what = describe(c) + " [" + tk::isa_name(isa) + "]";
  ctx.check(out.intact(), what + ": guard bytes overwritten");
  const size_t csz = tk::dtype_size(c.c);
  std::vector<double> got(size_t(c.batch * c.M * c.N));
  bool pad_ok = true;
  for (int64_t r = 0; r < pr.c_rows; ++r) {
    const unsigned char* row = static_cast<const unsigned char*>(out.data()) + size_t(r * p.ldc) * csz;
    std::vector<double> v = tk::test::to_double(row, c.c, size_t(c.N));
    std::copy(v.begin(), v.end(), got.begin() + r * c.N);
    if (c.pad_c && std::memcmp(row + c.N * csz, pr.c0.data() + size_t(r * p.ldc + c.N) * csz, size_t(c.pad_c) * csz))
      pad_ok = false;
  }
  ctx.check(pad_ok, what + ": C padding columns written");
  if (c.c == DType::F32) {
    ctx.check_nmse(what, got, ref, 1e-10);
  } else if (ref.size() >= 256) {
    ctx.check_nmse(what, got, ref, 1e-5);
  } else {
    // A handful of bf16 outputs does not average the rounding error: one element alone can reach
    // (2^-8)^2 ~ 1.5e-5. Those are held to the reference rounded the same way instead.
    std::vector<unsigned char> r16(ref.size() * 2);
    tk::test::from_double(ref, r16.data(), DType::BF16);
    ctx.check_nmse(what, got, tk::test::to_double(r16.data(), DType::BF16, ref.size()), 1e-5);
  }
}

std::vector<CpuIsa> present_isas() {
  std::vector<CpuIsa> v;
  for (int i = 0; i <= int(tk::detected_isa()); ++i) v.push_back(CpuIsa(i));
  return v;
}

void run_case(tk::test::Context& ctx, const Case& c, uint64_t seed) {
  Problem pr(c, seed);
  const std::vector<double> ref = tk::ref::gemm(pr.p);
  for (CpuIsa isa : present_isas()) run_path(ctx, pr, ref, isa);
}

}  // namespace

// Shapes x transposes x dtypes, with strides, alpha and beta varied across the cases.
TK_TEST(gemm_shapes) {
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {
      {1, 1, 1},       {7, 7, 7},      {1, 257, 97},   {97, 1, 257},    {7, 1025, 97},  {97, 97, 97},
      {257, 257, 257}, {1025, 97, 257}, {257, 1025, 97}, {97, 257, 1025}, {1025, 7, 1025}, {7, 97, 1025},
      {33, 97, 4103},  // several K blocks for every kernel family (bf16 blocks are 2048 deep)
      // N = 125 and 61 leave 29 columns of a 32-wide tile (13 of a 16-wide one): the upper half of
      // the masked store; M = 125 leaves 13 rows of a 14-row tile.
      {125, 125, 125}, {257, 61, 1025},
  };
  const DType dts[] = {DType::F32, DType::BF16};
  uint64_t seed = 1000;
  int variant = 0;
  for (const Shape& s : shapes)
    for (int t = 0; t < 4; ++t)
      for (DType ab : dts)
        for (DType cd : dts) {
          Case c;
          c.M = s.M;
          c.N = s.N;
          c.K = s.K;
          c.ab = ab;
          c.c = cd;
          c.ta = t & 1;
          c.tb = t & 2;
          // Cycle through stride paddings and epilogues so each shape meets several of them.
          const int v = variant++ % 4;
          c.pad_a = v == 1 ? 3 : v == 3 ? 16 : 0;
          c.pad_b = v == 2 ? 5 : v == 3 ? 1 : 0;
          c.pad_c = v == 0 ? 0 : 2 * v + 1;
          if (v == 0) {
            c.beta = 0.0f;
            c.nan_c = true;
          } else if (v == 1) {
            c.alpha = 0.75f;
            c.beta = -0.5f;
          } else if (v == 2) {
            c.beta = 1.0f;
          } else {
            c.alpha = -1.25f;
            c.beta = 0.0f;
          }
          run_case(ctx, c, seed++);
        }
}

// Batches: per-matrix strides, broadcast A or B (batch stride 0), small matrices (one per thread)
// and large ones (threads cooperating on each matrix).
TK_TEST(gemm_batched) {
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {{7, 97, 7}, {97, 97, 97}, {257, 257, 257}, {97, 257, 1025}};
  const DType dts[] = {DType::F32, DType::BF16};
  uint64_t seed = 5000;
  int variant = 0;
  for (const Shape& s : shapes)
    for (int bc = 0; bc < 3; ++bc)
      for (DType ab : dts)
        for (DType cd : dts) {
          Case c;
          c.batch = 3;
          c.M = s.M;
          c.N = s.N;
          c.K = s.K;
          c.ab = ab;
          c.c = cd;
          c.bcast_a = bc == 1;
          c.bcast_b = bc == 2;
          const int v = variant++;
          c.ta = v & 1;
          c.tb = v & 2;
          c.pad_a = v % 3;
          c.pad_c = v % 5;
          c.alpha = 0.5f;
          c.beta = v % 2 ? 0.25f : 0.0f;
          c.nan_c = c.beta == 0.0f;
          run_case(ctx, c, seed++);
        }
}

// --grad (the harness runs tests named *grad* only in that mode): the GEMM backward rule, computed
// with gemm_cpu itself, against central differences of L = sum(C * W) evaluated with the double
// reference. L is linear in every element of A and B, so the difference quotient is exact up to
// double rounding and the tolerance only has to absorb the fp32 accumulation of the gradient GEMMs.
//   d op(A) = alpha * W op(B)^T          d op(B) = alpha * op(A)^T W
// Stored gradients follow the transposes: dA = (d op(A))^T = alpha * op(B) W^T when trans_a, and
// dB = (d op(B))^T = alpha * W^T op(A) when trans_b.
TK_TEST(gemm_grad) {
  const int64_t M = 37, N = 29, K = 53;
  const CpuIsa saved = tk::active_isa();
  for (DType ab : {DType::F32, DType::BF16})
    for (int t = 0; t < 4; ++t)
      for (CpuIsa isa : present_isas()) {
        tk::set_active_isa(isa);
        Case c;
        c.M = M;
        c.N = N;
        c.K = K;
        c.ab = ab;
        c.ta = t & 1;
        c.tb = t & 2;
        c.pad_a = 3;
        c.pad_b = 2;
        c.alpha = 0.7f;
        c.beta = 0.3f;
        Problem pr(c, 9000 + t);
        const size_t esz = tk::dtype_size(ab);
        // W in the operand dtype: the gradient GEMMs read it as an A or B operand.
        std::vector<unsigned char> w(size_t(M * N) * esz);
        tk::test::from_double(tk::test::randn(size_t(M * N), 777), w.data(), ab);
        const std::vector<double> wd = tk::test::to_double(w.data(), ab, size_t(M * N));
        auto loss = [&](const GemmParams& p) {
          std::vector<double> cref = tk::ref::gemm(p);
          double l = 0;
          for (size_t i = 0; i < cref.size(); ++i) l += cref[i] * wd[i];
          return l;
        };

        const GemmParams& p = pr.p;
        const int64_t ar = c.ta ? K : M, ac = c.ta ? M : K;  // stored A is ar x ac
        const int64_t br = c.tb ? N : K, bc = c.tb ? K : N;  // stored B is br x bc
        // dA (stored layout, dense ar x ac, fp32).
        Guarded da(size_t(ar * ac) * 4), db(size_t(br * bc) * 4);
        {
          GemmParams g;
          g.ab_dtype = ab;
          g.c_dtype = DType::F32;
          g.alpha = c.alpha;
          g.C = da.data();
          g.ldc = ac;
          if (!c.ta) {  // dA [M x K] = W [M x N] op(B)^T [N x K]
            g.M = M, g.N = K, g.K = N;
            g.A = w.data(), g.lda = N, g.trans_a = false;
            g.B = p.B, g.ldb = p.ldb, g.trans_b = !c.tb;  // op(B)^T of the stored B
          } else {      // dA [K x M] = op(B) [K x N] W^T [N x M]
            g.M = K, g.N = M, g.K = N;
            g.A = p.B, g.lda = p.ldb, g.trans_a = c.tb;
            g.B = w.data(), g.ldb = N, g.trans_b = true;
          }
          tk::gemm_cpu(g, ctx.pool);
        }
        {
          GemmParams g;
          g.ab_dtype = ab;
          g.c_dtype = DType::F32;
          g.alpha = c.alpha;
          g.C = db.data();
          g.ldc = bc;
          if (!c.tb) {  // dB [K x N] = op(A)^T [K x M] W [M x N]
            g.M = K, g.N = N, g.K = M;
            g.A = p.A, g.lda = p.lda, g.trans_a = !c.ta;
            g.B = w.data(), g.ldb = N, g.trans_b = false;
          } else {      // dB [N x K] = W^T [N x M] op(A) [M x K]
            g.M = N, g.N = K, g.K = M;
            g.A = w.data(), g.lda = N, g.trans_a = true;
            g.B = p.A, g.ldb = p.lda, g.trans_b = c.ta;
          }
          tk::gemm_cpu(g, ctx.pool);
        }
        const std::string what = describe(c) + " grad [" + tk::isa_name(isa) + "]";
        ctx.check(da.intact() && db.intact(), what + ": guard bytes overwritten");

        // Central differences at sampled elements. The step is what the dtype stores (x + h rounds),
        // so the quotient divides by the stored difference.
        std::vector<double> got, fd;
        auto probe = [&](std::vector<unsigned char>& store, int64_t rows, int64_t cols, int64_t ld, const float* grad,
                         uint64_t sseed) {
          const std::vector<double> pick = tk::test::uniform(48, sseed, 0.0, 1.0);
          for (size_t s = 0; s + 1 < pick.size(); s += 2) {
            const int64_t r = int64_t(pick[s] * rows), q = int64_t(pick[s + 1] * cols);
            unsigned char* e = store.data() + size_t(r * ld + q) * esz;
            std::vector<unsigned char> orig(e, e + esz);
            const double x = tk::test::to_double(e, ab, 1)[0];
            const double h = 0.05 * (std::fabs(x) + 1.0);
            tk::test::from_double({x + h}, e, ab);
            const double xp = tk::test::to_double(e, ab, 1)[0];
            const double lp = loss(p);
            tk::test::from_double({x - h}, e, ab);
            const double xm = tk::test::to_double(e, ab, 1)[0];
            const double lm = loss(p);
            std::memcpy(e, orig.data(), esz);
            fd.push_back((lp - lm) / (xp - xm));
            got.push_back(grad[r * cols + q]);
          }
        };
        probe(pr.a, ar, ac, p.lda, static_cast<const float*>(da.data()), 31 + t);
        probe(pr.b, br, bc, p.ldb, static_cast<const float*>(db.data()), 63 + t);
        ctx.check_nmse(what, got, fd, 1e-10);
      }
  tk::set_active_isa(saved);
}

// --perf (tests named *perf*): GFLOP/s per ISA path and dtype on square and LLM-like shapes, with
// the fraction of the measured FMA peak (native/cpu/probe.h; the bf16 dot-product path is held
// to twice the fp32 peak, one vdpbf16ps doing two k per lane). No assertions.
TK_TEST(gemm_perf) {
  struct Shape { int64_t M, N, K; bool tb; const char* name; };
  const Shape shapes[] = {
      {512, 512, 512, false, "512^3"},
      {1024, 1024, 1024, false, "1024^3"},
      {2048, 2048, 2048, false, "2048^3"},
      {2048, 4096, 1024, false, "[2048x1024]x[1024x4096]"},
      {2048, 4096, 1024, true, "[2048x1024]x[4096x1024]^T"},
  };
  auto bench = [&](const Shape& s, DType ab, CpuIsa isa) {
    Case c;
    c.M = s.M, c.N = s.N, c.K = s.K, c.ab = ab, c.tb = s.tb;
    Problem pr(c, 42);
    std::vector<float> out(size_t(s.M * s.N));
    GemmParams p = pr.p;
    p.C = out.data();
    const double flops = 2.0 * double(s.M) * double(s.N) * double(s.K);
    const int reps = flops > 1e10 && isa < CpuIsa::Avx2 ? 2 : 5;
    const double t = tk::test::time_median([&] { tk::gemm_cpu_isa(p, ctx.pool, isa); }, reps);
    return flops / t * 1e-9;
  };
  auto report = [&](CpuIsa isa, int threads, double peak) {
    for (DType ab : {DType::F32, DType::BF16})
      for (const Shape& s : shapes) {
        const double g = bench(s, ab, isa);
        const double limit = ab == DType::BF16 && isa == CpuIsa::Avx512Bf16 ? 2 * peak : peak;
        std::printf("  perf gemm %-10s %-4s %-27s %d thr %7.1f GFLOP/s  %3.0f%% of peak\n", tk::isa_name(isa),
                    tk::dtype_name(ab), s.name, threads, g, 100.0 * g / limit);
      }
  };
  // Best of a few probes: one that shares the cores with something else reads low.
  auto probe = [&] {
    double best = 0;
    for (int i = 0; i < 3; ++i) best = std::max(best, tk::probe_peak_flops(ctx.pool, 0.2).gflops);
    return best;
  };
  const int threads = ctx.pool.size();
  const double peak = probe();
  std::printf("  perf gemm: measured fp32 FMA peak %.1f GFLOP/s on %d threads\n", peak, threads);
  for (CpuIsa isa : present_isas()) report(isa, threads, peak);
  if (threads > 1) {
    // Scaling: the best path on one thread.
    ctx.pool.resize(1);
    const double peak1 = probe();
    std::printf("  perf gemm: measured fp32 FMA peak %.1f GFLOP/s on 1 thread\n", peak1);
    report(tk::detected_isa(), 1, peak1);
    ctx.pool.resize(threads);
  }
}
