// Tests of cpu/qlora against ref/qlora_ref, on every ISA level present (set_active_isa).
//
// - The fused GEMM: gemm_cpu with the NF4 source equals gemm_cpu on the weight dequantized by
//   nf4_dequantize_cpu bit for bit (both orientations, f32 and bf16, block sizes 64, 32 and 6
//   (the scalar packer), plain and double-quantized absmax, tiny products (the direct path),
//   several K blocks, several column blocks, a broadcast batch). Outputs are guarded.
// - The layer, forward and backward, against the double reference on odd shapes: N in {1, 7, 97},
//   in in {33, 65, 130, 257} (never a multiple of the block, so blocks straddle rows, and odd in
//   starts every other row at an odd nibble), out in {1, 17, 97}, r in {1, 8}; every combination
//   of dtype (f32, bf16) x block (64, 32) x double quant x dropout (0, 0.3) x scale (0, 2), each
//   on four shapes. The reference uses the effective weight (the NF4 values, rounded to bf16 for
//   bf16 tensors). Tolerances (nmse):
//     f32: 1e-10 for everything (fp32 accumulation over <= 257 terms sits near 1e-13).
//     bf16: xa is fp32 (1e-10). Stored bf16 outputs are compared with the reference rounded the
//     way the kernel rounds (qlora.h): y = bf16(base + bf16(lora)), dx likewise, dA and dB once;
//     1e-5, as the GEMM tests (only fp32-vs-double differences that flip a rounding remain).
//   Every output buffer starts as NaN and sits between guard bytes; omitting xa (forward) or dx
//   (backward) must not change the other results.
// - Dropout: with A = I the saved xa is drop(x) itself, checked bit for bit against the reference
//   keep formula and against dropout_cpu (the dropout op, same seed), with the keep rate within
//   0.02 of 1 - p; another seed gives another mask.
// - Row chunks: N = 4100, in = 257 crosses the 4 MiB row chunks of the widened operands at
//   element offsets that are not multiples of 64.
// - Results independent of the thread count; N = 0 and 3-D x; argument errors (tk::Error, nothing
//   written).
// - --grad: central differences of L = sum(y * R) (the double reference forward, linear in each of
//   x, A and B, so the quotient is exact up to rounding) against the kernel's dx, dA, dB for dy = R.
// - --perf: the forward against a dense GEMM on the same shape (x W^T, W in the same dtype),
//   forward + backward against dense forward + dx, and for comparison the fused NF4 GEMM alone and
//   dequantize-then-GEMM; best of interleaved rounds (the machine is shared).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../cpu/elementwise.h"
#include "../cpu/gemm.h"
#include "../cpu/isa.h"
#include "../cpu/nf4.h"
#include "../cpu/qlora.h"
#include "../ref/qlora_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

std::vector<CpuIsa> isa_levels() {
  std::vector<CpuIsa> r;
  for (int i = 0; i <= int(detected_isa()); ++i) r.push_back(CpuIsa(i));
  return r;
}

template <class F>
void for_each_isa(F&& fn) {
  const CpuIsa saved = active_isa();
  for (CpuIsa isa : isa_levels()) {
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

std::vector<double> round_to(const std::vector<double>& v, DType t) {
  std::vector<unsigned char> tmp(v.size() * dtype_size(t));
  from_double(v, tmp.data(), t);
  return to_double(tmp.data(), t, v.size());
}

// A tensor in a guarded buffer.
struct Buf {
  Buf(const std::vector<int64_t>& shape, DType t) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    mem.reset(new Guarded(std::max<size_t>(1, size_t(n) * dtype_size(t))));
    view = make_view(mem->data(), t, Device{}, shape);
    nan();
  }
  TensorView view;
  std::unique_ptr<Guarded> mem;
  void set(const std::vector<double>& v) { from_double(v, view.data, view.dtype); }
  std::vector<double> get() const { return to_double(view.data, view.dtype, size_t(view.numel())); }
  void nan() { mem->fill(0xff); }  // all-ones bits: NaN in f32 and bf16
  bool intact() const { return mem->intact(); }
};

TensorView none() { return TensorView{}; }

// W [out, in] ~ N(0, 1) quantized to NF4 in guarded buffers.
struct QWeight {
  QWeight(int64_t out, int64_t in, int64_t block, bool dq, uint64_t seed) : layout(nf4_layout(out * in, block, dq)) {
    const int64_t n = out * in;
    std::vector<float> w(static_cast<size_t>(n));
    const std::vector<double> v = randn(size_t(n), seed);
    for (int64_t i = 0; i < n; ++i) w[size_t(i)] = float(v[size_t(i)]);
    packed.reset(new Guarded(size_t(std::max<int64_t>(1, layout.packed_bytes))));
    absmax.reset(new Guarded(size_t(std::max<int64_t>(4, layout.absmax_bytes))));
    scale2.reset(new Guarded(size_t(std::max<int64_t>(4, layout.scale2_bytes))));
    offset.reset(new Guarded(4));
    Nf4Out o;
    o.packed = static_cast<uint8_t*>(packed->data());
    if (dq) {
      o.qabsmax = static_cast<uint8_t*>(absmax->data());
      o.scale2 = static_cast<float*>(scale2->data());
      o.offset = static_cast<float*>(offset->data());
    } else {
      o.absmax = static_cast<float*>(absmax->data());
    }
    nf4_quantize_cpu(w.data(), DType::F32, n, block, dq, o, serial());
    qw.q.packed = o.packed;
    qw.q.absmax = o.absmax;
    qw.q.qabsmax = o.qabsmax;
    qw.q.scale2 = o.scale2;
    qw.q.offset = o.offset;
    qw.layout = layout;
    qw.out = out;
    qw.in = in;
    // The fp32 absmax the GEMM source reads.
    amax.resize(size_t(layout.nblocks));
    nf4_absmax_cpu(qw.q, layout.nblocks, dq, amax.data());
  }
  static ThreadPool& serial() {
    static ThreadPool one(1);
    return one;
  }
  // The effective weight of `dt` tensors, in double.
  std::vector<double> effective(DType dt) const { return round_to(ref::qlora_weight_ref(qw.q, layout), dt); }
  // The weight dequantized by nf4_dequantize_cpu into dt.
  std::vector<unsigned char> dense(DType dt, ThreadPool& pool) const {
    std::vector<unsigned char> d(size_t(layout.numel) * dtype_size(dt));
    nf4_dequantize_cpu(qw.q, layout.numel, layout.block_size, layout.double_quant, d.data(), dt, pool);
    return d;
  }
  QloraNf4Source source(DType dt, bool trans) const {
    QloraNf4Source s;
    s.packed = qw.q.packed;
    s.absmax = amax.data();
    s.rows = qw.out;
    s.cols = qw.in;
    s.block_size = layout.block_size;
    s.trans = trans;
    s.dtype = dt;
    return s;
  }
  bool intact() const { return packed->intact() && absmax->intact() && scale2->intact() && offset->intact(); }
  Nf4Layout layout;
  QloraWeight qw;
  std::unique_ptr<Guarded> packed, absmax, scale2, offset;
  std::vector<float> amax;
};

// ==== the fused GEMM ==================================================================================

TK_TEST(qlora_gemm_nf4_source_bitwise) {
  struct Shape { int64_t M, rows, cols; };  // W [rows, cols]
  const Shape shapes[] = {
      {1, 1, 33},    {3, 5, 7},     // tiny: the direct path
      {7, 33, 65},   {97, 97, 257}, {1, 257, 130}, {13, 31, 33},
      {20, 70, 1100},   // K = 1100 crosses the 1024-deep fp32 K block (trans)
      {9, 2100, 45},    // N = 2100 crosses the 2048-wide column block (trans); K = 2100 the bf16 K block (not)
  };
  uint64_t seed = 300;
  int variant = 0;
  for (const Shape& sh : shapes)
    for (int64_t block : {int64_t(64), int64_t(32), int64_t(6)}) {
      const bool dq = variant++ % 2 == 1;
      QWeight qw(sh.rows, sh.cols, block, dq, seed++);
      for (DType dt : {DType::F32, DType::BF16})
        for (bool trans : {true, false}) {
          // op(B) is K x N: deq(W)^T (K = cols, N = rows) or deq(W) (K = rows, N = cols).
          const int64_t K = trans ? sh.cols : sh.rows, N = trans ? sh.rows : sh.cols;
          const int64_t batch = sh.M < 10 ? 2 : 1;
          std::vector<unsigned char> a(size_t(batch * sh.M * K) * dtype_size(dt));
          from_double(randn(size_t(batch * sh.M * K), seed++), a.data(), dt);
          const QloraNf4Source src = qw.source(dt, trans);
          const GemmBSource gs = qlora_nf4_gemm_source(src);
          for_each_isa([&](const std::string& isa) {
            const std::vector<unsigned char> wd = qw.dense(dt, ctx.pool);
            GemmParams p;
            p.batch = batch;
            p.M = sh.M;
            p.N = N;
            p.K = K;
            p.ab_dtype = dt;
            p.c_dtype = dt;
            p.A = a.data();
            p.lda = K;
            p.batch_stride_a = sh.M * K;
            p.ldc = N;
            p.batch_stride_c = sh.M * N;
            p.alpha = 0.75f;
            Buf c_dense({batch * sh.M * N}, dt), c_fused({batch * sh.M * N}, dt);
            GemmParams pd = p;
            pd.B = wd.data();
            pd.trans_b = trans;
            pd.ldb = sh.cols;
            pd.batch_stride_b = 0;
            pd.C = c_dense.view.data;
            gemm_cpu(pd, ctx.pool);
            GemmParams pf = p;
            pf.b_source = &gs;
            pf.C = c_fused.view.data;
            gemm_cpu(pf, ctx.pool);
            char what[200];
            std::snprintf(what, sizeof what, "qlora nf4 gemm source b%lld M%lld W[%lld, %lld]%s block %lld%s %s [%s]",
                          (long long)batch, (long long)sh.M, (long long)sh.rows, (long long)sh.cols, trans ? "^T" : "",
                          (long long)block, dq ? " dq" : "", dtype_name(dt), isa.c_str());
            ctx.check(c_fused.intact() && qw.intact(), std::string(what) + ": guards intact");
            ctx.check(std::memcmp(c_fused.view.data, c_dense.view.data, c_dense.view.nbytes()) == 0,
                      std::string(what) + ": equals dequantize + gemm bit for bit");
          });
        }
    }
}

// ==== the layer against the reference =================================================================

struct LayerCase {
  int64_t N, in, out, r;
  DType dt;
  int64_t block;
  bool dq;
  float dropout, scale;
  uint64_t seed;
};

std::string describe(const LayerCase& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "qlora N%lld in%lld out%lld r%lld %s block %lld%s p %.1f s %.0f", (long long)c.N,
                (long long)c.in, (long long)c.out, (long long)c.r, dtype_name(c.dt), (long long)c.block,
                c.dq ? " dq" : "", c.dropout, c.scale);
  return buf;
}

// Inputs of one case as the kernel sees them, and the reference problem over the same values.
struct Layer {
  explicit Layer(const LayerCase& c)
      : cs(c),
        w(c.out, c.in, c.block, c.dq, c.seed),
        x({c.N, c.in}, c.dt),
        A({c.r, c.in}, c.dt),
        B({c.out, c.r}, c.dt),
        dy({c.N, c.out}, c.dt) {
    x.set(randn(size_t(c.N * c.in), c.seed + 1));
    A.set(randn(size_t(c.r * c.in), c.seed + 2));
    B.set(randn(size_t(c.out * c.r), c.seed + 3));
    dy.set(randn(size_t(c.N * c.out), c.seed + 4));
    opt.scale = c.scale;
    opt.dropout = c.dropout;
    opt.seed = c.seed * 7919 + 5;
    rp.N = c.N, rp.in = c.in, rp.out = c.out, rp.r = c.r;
    rp.x = x.get();
    rp.w = w.effective(c.dt);
    rp.A = A.get();
    rp.B = B.get();
    rp.scale = c.scale;
    rp.dropout = c.dropout;
    rp.seed = opt.seed;
  }
  LayerCase cs;
  QWeight w;
  Buf x, A, B, dy;
  QloraOptions opt;
  ref::QloraRefProblem rp;
};

// The bf16 rounding model of qlora.h for a stored output that is base + lora.
std::vector<double> rounded_sum(const std::vector<double>& base, const std::vector<double>& lora, bool with_lora,
                                DType dt) {
  if (!with_lora) return round_to(base, dt);
  const std::vector<double> l = round_to(lora, dt);
  std::vector<double> s(base.size());
  for (size_t i = 0; i < s.size(); ++i) s[i] = base[i] + l[i];
  return round_to(s, dt);
}

void check_layer(Context& ctx, const LayerCase& c) {
  Layer L(c);
  const ref::QloraRefForward rf = ref::qlora_forward_ref(L.rp);
  const ref::QloraRefGrads rg = ref::qlora_backward_ref(L.rp, L.dy.get());
  const bool f32 = c.dt == DType::F32, lora = c.scale != 0.0f;
  const double tol = f32 ? 1e-10 : 1e-5;
  const std::vector<double> want_y = f32 ? rf.y : rounded_sum(rf.base, rf.lora, lora, c.dt);
  const std::vector<double> want_dx = f32 ? rg.dx : rounded_sum(rg.dx_base, rg.dx_lora, lora, c.dt);
  const std::vector<double> want_dA = f32 ? rg.dA : round_to(rg.dA, c.dt);
  const std::vector<double> want_dB = f32 ? rg.dB : round_to(rg.dB, c.dt);
  for_each_isa([&](const std::string& isa) {
    const std::string what = describe(c) + " [" + isa + "]";
    Buf y({c.N, c.out}, c.dt), xa({c.N, c.r}, DType::F32), y2({c.N, c.out}, c.dt);
    qlora_forward_cpu(L.x.view, L.w.qw, L.A.view, L.B.view, L.opt, y.view, xa.view, ctx.pool);
    qlora_forward_cpu(L.x.view, L.w.qw, L.A.view, L.B.view, L.opt, y2.view, none(), ctx.pool);
    ctx.check(y.intact() && xa.intact() && y2.intact(), what + " forward: guards intact");
    ctx.check_nmse(what + " y", y.get(), want_y, tol);
    ctx.check_nmse(what + " xa", xa.get(), rf.xa, 1e-10);
    ctx.check(std::memcmp(y.view.data, y2.view.data, y.view.nbytes()) == 0, what + " y without saving xa: same bits");

    Buf dx({c.N, c.in}, c.dt), dA({c.r, c.in}, c.dt), dB({c.out, c.r}, c.dt);
    Buf dA2({c.r, c.in}, c.dt), dB2({c.out, c.r}, c.dt);
    qlora_backward_cpu(L.dy.view, L.x.view, L.w.qw, L.A.view, L.B.view, xa.view, L.opt, dx.view, dA.view, dB.view,
                       ctx.pool);
    qlora_backward_cpu(L.dy.view, L.x.view, L.w.qw, L.A.view, L.B.view, xa.view, L.opt, none(), dA2.view, dB2.view,
                       ctx.pool);
    ctx.check(dx.intact() && dA.intact() && dB.intact() && dA2.intact() && dB2.intact(),
              what + " backward: guards intact");
    ctx.check_nmse(what + " dx", dx.get(), want_dx, tol);
    ctx.check_nmse(what + " dA", dA.get(), want_dA, tol);
    ctx.check_nmse(what + " dB", dB.get(), want_dB, tol);
    ctx.check(std::memcmp(dA.view.data, dA2.view.data, dA.view.nbytes()) == 0 &&
                  std::memcmp(dB.view.data, dB2.view.data, dB.view.nbytes()) == 0,
              what + " dA, dB without dx: same bits");
    ctx.check(L.w.intact() && L.x.intact() && L.A.intact() && L.B.intact() && L.dy.intact(),
              what + ": input guards intact");
  });
}

TK_TEST(qlora_matches_ref) {
  std::vector<LayerCase> shapes;
  for (int64_t N : {1, 7, 97})
    for (int64_t in : {33, 65, 130, 257})
      for (int64_t out : {1, 17, 97}) shapes.push_back(LayerCase{N, in, out, 1, DType::F32, 64, false, 0, 0, 0});
  // Every combination of the settings, each on four shapes taken in turn from the list.
  size_t next = 0;
  uint64_t seed = 1;
  for (int combo = 0; combo < 32; ++combo)
    for (int j = 0; j < 4; ++j) {
      LayerCase c = shapes[next++ % shapes.size()];
      c.dt = combo & 1 ? DType::BF16 : DType::F32;
      c.block = combo & 2 ? 32 : 64;
      c.dq = combo & 4;
      c.dropout = combo & 8 ? 0.3f : 0.0f;
      c.scale = combo & 16 ? 2.0f : 0.0f;
      c.r = j % 2 ? 8 : 1;
      c.seed = seed++ * 1000;
      check_layer(ctx, c);
    }
}

// Enough rows that the widened / masked operands go through several row chunks (4 MiB each),
// which start at elements that are not multiples of 64 (the keep mask's word size).
TK_TEST(qlora_row_chunks) {
  for (DType dt : {DType::F32, DType::BF16})
    check_layer(ctx, LayerCase{4100, 257, 5, 2, dt, 64, true, 0.3f, 2.0f, 777});
}

// ==== dropout ========================================================================================

TK_TEST(qlora_dropout_mask) {
  const int64_t N = 257, in = 64;
  for (DType dt : {DType::F32, DType::BF16})
    for (float p : {0.0f, 0.3f, 0.9f}) {
      QWeight qw(3, in, 64, true, 11);
      Buf x({N, in}, dt), A({in, in}, dt), B({3, in}, dt), y({N, 3}, dt), xa({N, in}, DType::F32);
      const std::vector<double> xv = uniform(size_t(N * in), 12, 0.5, 2.0);  // never zero
      x.set(xv);
      std::vector<double> eye(size_t(in * in), 0.0);
      for (int64_t i = 0; i < in; ++i) eye[size_t(i * in + i)] = 1.0;
      A.set(eye);
      B.set(randn(size_t(3 * in), 13));
      QloraOptions opt;
      opt.dropout = p;
      opt.seed = 0x123456789abcdefULL;
      const std::vector<double> xs = x.get();
      const float c = 1.0f / (1.0f - p);
      for_each_isa([&](const std::string& isa) {
        const std::string what =
            std::string("qlora dropout p ") + std::to_string(p) + " " + dtype_name(dt) + " [" + isa + "]";
        qlora_forward_cpu(x.view, qw.qw, A.view, B.view, opt, y.view, xa.view, ctx.pool);
        const std::vector<double> got = xa.get();
        size_t bad = 0, kept = 0;
        for (int64_t e = 0; e < N * in; ++e) {
          const bool k = ref::qlora_keep_ref(opt.seed, uint64_t(e), p);
          kept += k;
          // xa = c * (keep * x) I^T: one fp32 product per element.
          const double want = k ? double(c * float(xs[size_t(e)])) : 0.0;
          bad += got[size_t(e)] != want;
        }
        ctx.check(bad == 0, what + ": xa = drop(x) bit for bit against the reference mask");
        if (dt == DType::F32) {  // the mask of the dropout op (cpu/elementwise.h) with the same seed
          Buf d({N, in}, DType::F32);
          dropout_cpu(x.view, p, opt.seed, d.view, ctx.pool);
          ctx.check(std::memcmp(d.view.data, xa.view.data, d.view.nbytes()) == 0,
                    what + ": xa = dropout_cpu(x) bit for bit");
        }
        const double rate = double(kept) / double(N * in);
        ctx.check(std::fabs(rate - (1.0 - p)) < 0.02, what + ": keep rate " + std::to_string(rate) + " near 1 - p");
      });
      if (p > 0) {
        QloraOptions other = opt;
        other.seed = opt.seed + 1;
        Buf xb({N, in}, DType::F32);
        qlora_forward_cpu(x.view, qw.qw, A.view, B.view, other, y.view, xb.view, ctx.pool);
        const std::vector<double> a = xa.get(), b = xb.get();
        size_t differ = 0;
        for (size_t i = 0; i < a.size(); ++i) differ += (a[i] == 0) != (b[i] == 0);
        ctx.check(differ > a.size() * p * (1 - p),
                  std::string("qlora dropout: another seed, another mask ") + dtype_name(dt));
      }
    }
}

// ==== other behaviour =================================================================================

TK_TEST(qlora_thread_count_invariant) {
  ThreadPool one(1);
  for (DType dt : {DType::F32, DType::BF16}) {
    Layer L(LayerCase{97, 257, 97, 8, dt, 64, true, 0.3f, 2.0f, 4242});
    Buf y1({97, 97}, dt), y2({97, 97}, dt), xa1({97, 8}, DType::F32), xa2({97, 8}, DType::F32);
    Buf dx1({97, 257}, dt), dx2({97, 257}, dt), dA1({8, 257}, dt), dA2({8, 257}, dt);
    Buf dB1({97, 8}, dt), dB2({97, 8}, dt);
    qlora_forward_cpu(L.x.view, L.w.qw, L.A.view, L.B.view, L.opt, y1.view, xa1.view, one);
    qlora_forward_cpu(L.x.view, L.w.qw, L.A.view, L.B.view, L.opt, y2.view, xa2.view, ctx.pool);
    qlora_backward_cpu(L.dy.view, L.x.view, L.w.qw, L.A.view, L.B.view, xa1.view, L.opt, dx1.view, dA1.view, dB1.view,
                       one);
    qlora_backward_cpu(L.dy.view, L.x.view, L.w.qw, L.A.view, L.B.view, xa2.view, L.opt, dx2.view, dA2.view, dB2.view,
                       ctx.pool);
    auto same = [](const Buf& a, const Buf& b) { return std::memcmp(a.view.data, b.view.data, a.view.nbytes()) == 0; };
    ctx.check(same(y1, y2) && same(xa1, xa2) && same(dx1, dx2) && same(dA1, dA2) && same(dB1, dB2),
              std::string("qlora results independent of the thread count ") + dtype_name(dt));
  }
}

TK_TEST(qlora_edge_shapes) {
  // x [2, 3, in]: the leading dims are the rows.
  QWeight qw(17, 65, 64, true, 77);
  Buf x({2, 3, 65}, DType::F32), A({4, 65}, DType::F32), B({17, 4}, DType::F32), y({2, 3, 17}, DType::F32);
  Buf x2({6, 65}, DType::F32), y2({6, 17}, DType::F32), xa({2, 3, 4}, DType::F32), xa2({6, 4}, DType::F32);
  const std::vector<double> xv = randn(6 * 65, 78);
  x.set(xv);
  x2.set(xv);
  A.set(randn(4 * 65, 79));
  B.set(randn(17 * 4, 80));
  QloraOptions opt;
  opt.scale = 0.5f;
  opt.dropout = 0.25f;
  qlora_forward_cpu(x.view, qw.qw, A.view, B.view, opt, y.view, xa.view, ctx.pool);
  qlora_forward_cpu(x2.view, qw.qw, A.view, B.view, opt, y2.view, xa2.view, ctx.pool);
  ctx.check(std::memcmp(y.view.data, y2.view.data, y.view.nbytes()) == 0, "qlora x [2, 3, in] equals x [6, in]");
  // N = 0: nothing to compute; dA and dB are zero.
  Buf x0({0, 65}, DType::F32), y0({0, 17}, DType::F32), xa0({0, 4}, DType::F32), dy0({0, 17}, DType::F32);
  Buf dx0({0, 65}, DType::F32), dA({4, 65}, DType::F32), dB({17, 4}, DType::F32);
  qlora_forward_cpu(x0.view, qw.qw, A.view, B.view, opt, y0.view, xa0.view, ctx.pool);
  qlora_backward_cpu(dy0.view, x0.view, qw.qw, A.view, B.view, xa0.view, opt, dx0.view, dA.view, dB.view, ctx.pool);
  bool zero = true;
  for (double v : dA.get()) zero = zero && v == 0.0;
  for (double v : dB.get()) zero = zero && v == 0.0;
  ctx.check(zero && dA.intact() && dB.intact() && y0.intact(), "qlora N = 0: dA and dB are zero");
}

TK_TEST(qlora_rejects_bad_arguments) {
  auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const Error&) {
      return true;
    }
    return false;
  };
  const int64_t N = 5, in = 33, out = 7, r = 2;
  QWeight qw(out, in, 32, true, 5);
  Buf x({N, in}, DType::F32), A({r, in}, DType::F32), B({out, r}, DType::F32), y({N, out}, DType::F32);
  Buf xa({N, r}, DType::F32), dy({N, out}, DType::F32), dx({N, in}, DType::F32), dA({r, in}, DType::F32),
      dB({out, r}, DType::F32);
  x.set(randn(size_t(N * in), 1));
  A.set(randn(size_t(r * in), 2));
  B.set(randn(size_t(out * r), 3));
  dy.set(randn(size_t(N * out), 4));
  QloraOptions opt;
  const QloraWeight& w = qw.qw;
  auto fwd = [&](const TensorView& xv, const QloraWeight& wv, const TensorView& av, const TensorView& bv,
                 const QloraOptions& o, const TensorView& yv, const TensorView& xav) {
    return throws([&] { qlora_forward_cpu(xv, wv, av, bv, o, yv, xav, ctx.pool); });
  };
  auto bwd = [&](const TensorView& xav, const TensorView& dxv, const TensorView& dav, const TensorView& dbv) {
    return throws([&] { qlora_backward_cpu(dy.view, x.view, w, A.view, B.view, xav, opt, dxv, dav, dbv, ctx.pool); });
  };
  Buf x_in({N, in + 1}, DType::F32), A_in({r, in + 1}, DType::F32), B_out({out + 1, r}, DType::F32),
      B_r({out, r + 1}, DType::F32), y_out({N, out + 1}, DType::F32), y_rows({N + 1, out}, DType::F32),
      xa_bf({N, r}, DType::BF16), x_f16({N, in}, DType::F16), A_bf({r, in}, DType::BF16), A1({r * in}, DType::F32),
      y3({1, N, out}, DType::F32);
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y.view, xa.view) == false, "qlora accepts valid arguments");
  ctx.check(fwd(x_in.view, w, A.view, B.view, opt, y.view, xa.view), "qlora rejects x whose last dim is not W's in");
  ctx.check(fwd(x.view, w, A_in.view, B.view, opt, y.view, xa.view), "qlora rejects A [r, in'] with in' != in");
  ctx.check(fwd(x.view, w, A.view, B_out.view, opt, y.view, xa.view), "qlora rejects B [out', r] with out' != W's out");
  ctx.check(fwd(x.view, w, A.view, B_r.view, opt, y.view, xa.view), "qlora rejects B [out, r'] with r' != A's r");
  ctx.check(fwd(x.view, w, A1.view, B.view, opt, y.view, xa.view), "qlora rejects a 1-D A");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y_out.view, xa.view), "qlora rejects y [N, out'] with out' != out");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y_rows.view, xa.view), "qlora rejects y with other rows than x");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y3.view, xa.view), "qlora rejects y with other leading dims than x");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y.view, xa_bf.view), "qlora rejects a bf16 xa");
  ctx.check(fwd(x_f16.view, w, A.view, B.view, opt, y.view, xa.view), "qlora rejects an f16 x");
  ctx.check(fwd(x.view, w, A_bf.view, B.view, opt, y.view, xa.view), "qlora rejects A of another dtype than x");
  QloraWeight bad = w;
  bad.layout = nf4_layout(out * in + 2, 32, true);
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view), "qlora rejects a W layout of another numel");
  bad = w;
  bad.out = out + 1;
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view),
            "qlora rejects W [out, in] that its layout does not hold");
  bad = w;
  bad.in = in + 1;
  bad.out = out;
  bad.layout = nf4_layout(out * (in + 1), 32, true);
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view), "qlora rejects W [out, in'] against x [N, in]");
  bad = w;
  bad.layout.block_size = 64;
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view), "qlora rejects an inconsistent W layout");
  bad = w;
  bad.q.scale2 = nullptr;
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view),
            "qlora rejects a double-quantized W without scale2");
  for (float p : {-0.1f, 1.0f, 1.5f, std::nanf("")}) {
    QloraOptions o = opt;
    o.dropout = p;
    ctx.check(fwd(x.view, w, A.view, B.view, o, y.view, xa.view), "qlora rejects dropout " + std::to_string(p));
  }
  QloraOptions o = opt;
  o.scale = INFINITY;
  ctx.check(fwd(x.view, w, A.view, B.view, o, y.view, xa.view), "qlora rejects an infinite scale");
  // Nothing is written before a check fails.
  y.nan();
  fwd(x.view, w, A.view, B.view, opt, y_out.view, xa.view);
  Buf keep_y({N, out}, DType::F32);
  bool untouched = std::memcmp(y.view.data, keep_y.view.data, y.view.nbytes()) == 0;
  ctx.check(untouched, "qlora writes nothing when a check fails");
  // Backward.
  qlora_forward_cpu(x.view, w, A.view, B.view, opt, y.view, xa.view, ctx.pool);
  ctx.check(bwd(xa.view, dx.view, dA.view, dB.view) == false, "qlora backward accepts valid arguments");
  ctx.check(bwd(none(), dx.view, dA.view, dB.view), "qlora backward requires xa");
  ctx.check(bwd(xa.view, dx.view, A_in.view, dB.view), "qlora backward rejects dA of another shape than A");
  ctx.check(bwd(xa.view, dx.view, dA.view, B_r.view), "qlora backward rejects dB of another shape than B");
  ctx.check(bwd(xa.view, x_in.view, dA.view, dB.view), "qlora backward rejects dx of another shape than x");
  Buf dx_bf({N, in}, DType::BF16);
  ctx.check(bwd(xa.view, dx_bf.view, dA.view, dB.view), "qlora backward rejects dx of another dtype than x");
  ctx.check(throws([&] {
              qlora_backward_cpu(y_out.view, x.view, w, A.view, B.view, xa.view, opt, dx.view, dA.view, dB.view,
                                 ctx.pool);
            }),
            "qlora backward rejects dy of another shape than y");
  ctx.check(!bwd(xa.view, none(), dA.view, dB.view), "qlora backward without dx");
}

// ==== --grad ==========================================================================================

// L = sum(y * R) by the reference forward; central differences at sampled elements of x, A and B
// against the kernel's gradients for dy = R.
TK_TEST(qlora_grad) {
  const int64_t N = 5, in = 37, out = 11, r = 3;
  for (DType dt : {DType::F32, DType::BF16})
    for (float p : {0.0f, 0.3f})
      for_each_isa([&](const std::string& isa) {
        Layer L(LayerCase{N, in, out, r, dt, 32, true, p, 1.5f, 555});
        const std::vector<double> R = L.dy.get();
        auto loss = [&](const ref::QloraRefProblem& rp) {
          const ref::QloraRefForward f = ref::qlora_forward_ref(rp);
          double l = 0;
          for (size_t i = 0; i < f.y.size(); ++i) l += f.y[i] * R[i];
          return l;
        };
        Buf y({N, out}, dt), xa({N, r}, DType::F32), dx({N, in}, dt), dA({r, in}, dt), dB({out, r}, dt);
        qlora_forward_cpu(L.x.view, L.w.qw, L.A.view, L.B.view, L.opt, y.view, xa.view, ctx.pool);
        qlora_backward_cpu(L.dy.view, L.x.view, L.w.qw, L.A.view, L.B.view, xa.view, L.opt, dx.view, dA.view, dB.view,
                           ctx.pool);
        std::vector<double> got, fd;
        auto probe = [&](std::vector<double> ref::QloraRefProblem::*field, const std::vector<double>& grad,
                         uint64_t sseed) {
          const std::vector<double> pick = uniform(16, sseed, 0.0, 1.0);
          for (double u : pick) {
            ref::QloraRefProblem rp = L.rp;
            std::vector<double>& v = rp.*field;
            const size_t i = size_t(u * double(v.size()));
            const double x0 = v[i], h = 0.05 * (std::fabs(x0) + 1.0);
            v[i] = x0 + h;
            const double lp = loss(rp);
            v[i] = x0 - h;
            const double lm = loss(rp);
            fd.push_back((lp - lm) / (2 * h));
            got.push_back(grad[i]);
          }
        };
        probe(&ref::QloraRefProblem::x, dx.get(), 1);
        probe(&ref::QloraRefProblem::A, dA.get(), 2);
        probe(&ref::QloraRefProblem::B, dB.get(), 3);
        const std::string what =
            std::string("qlora grad ") + dtype_name(dt) + " p " + std::to_string(p) + " [" + isa + "]";
        // bf16 gradients are stored in bf16 (one rounding, two for dx): ~2^-9 relative.
        ctx.check_nmse(what, got, fd, dt == DType::F32 ? 1e-9 : 3e-5);
      });
}

// ==== --perf ==========================================================================================

// Best (minimum) time of each function over `rounds` rounds that run them all in turn, after one
// warm-up round: the machine is shared, and interleaving plus the minimum keeps another process's
// burst from landing on one variant only.
std::vector<double> best_times(const std::vector<std::function<void()>>& fns, int rounds) {
  std::vector<double> best(fns.size(), 1e30);
  for (int r = 0; r <= rounds; ++r)
    for (size_t i = 0; i < fns.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fns[i]();
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) best[i] = std::min(best[i], t);
    }
  return best;
}

TK_TEST(qlora_perf) {
  struct Shape { int64_t N, in, out, r; };
  const Shape shapes[] = {{512, 4096, 4096, 16}, {2048, 2048, 2048, 16}};
  const int threads = ctx.pool.size();
  // The pool's threads for both dtypes, then (a shared machine disturbs one thread less) fp32 on
  // one thread.
  struct Run { int threads; DType dt; };
  std::vector<Run> runs = {{threads, DType::F32}, {threads, DType::BF16}};
  if (threads > 1) runs.push_back({1, DType::F32});
  for (const Run& run : runs)
    for (const Shape& s : shapes) {
      const DType dt = run.dt;
      ctx.pool.resize(run.threads);
      QWeight qw(s.out, s.in, 64, true, 99);
      const std::vector<unsigned char> wd = qw.dense(dt, ctx.pool);
      Buf x({s.N, s.in}, dt), A({s.r, s.in}, dt), B({s.out, s.r}, dt), dy({s.N, s.out}, dt);
      x.set(randn(size_t(s.N * s.in), 1));
      A.set(randn(size_t(s.r * s.in), 2));
      B.set(randn(size_t(s.out * s.r), 3));
      dy.set(randn(size_t(s.N * s.out), 4));
      Buf y({s.N, s.out}, dt), xa({s.N, s.r}, DType::F32), dx({s.N, s.in}, dt), dA({s.r, s.in}, dt),
          dB({s.out, s.r}, dt);
      QloraOptions opt, opt_d;
      opt.scale = opt_d.scale = 2.0f;
      opt_d.dropout = 0.1f;
      GemmParams fw;  // y = x W^T, W dense
      fw.M = s.N, fw.N = s.out, fw.K = s.in, fw.ab_dtype = dt, fw.c_dtype = dt;
      fw.A = x.view.data, fw.lda = s.in, fw.B = wd.data(), fw.ldb = s.in, fw.trans_b = true;
      fw.C = y.view.data, fw.ldc = s.out;
      GemmParams bw;  // dx = dy W
      bw.M = s.N, bw.N = s.in, bw.K = s.out, bw.ab_dtype = dt, bw.c_dtype = dt;
      bw.A = dy.view.data, bw.lda = s.out, bw.B = wd.data(), bw.ldb = s.in;
      bw.C = dx.view.data, bw.ldc = s.in;
      // The fused NF4 GEMM alone (the forward's base product).
      const QloraNf4Source src = qw.source(dt, true);
      const GemmBSource gs = qlora_nf4_gemm_source(src);
      GemmParams nf = fw;
      nf.B = nullptr;
      nf.b_source = &gs;
      std::vector<unsigned char> wtmp(wd.size());
      const std::vector<double> t = best_times(
          {[&] { gemm_cpu(fw, ctx.pool); },
           [&] { gemm_cpu(bw, ctx.pool); },
           [&] { gemm_cpu(nf, ctx.pool); },
           [&] {
             nf4_dequantize_cpu(qw.qw.q, qw.layout.numel, 64, true, wtmp.data(), dt, ctx.pool);
             GemmParams f = fw;
             f.B = wtmp.data();
             gemm_cpu(f, ctx.pool);
           },
           [&] { qlora_forward_cpu(x.view, qw.qw, A.view, B.view, opt, y.view, xa.view, ctx.pool); },
           [&] {
             qlora_backward_cpu(dy.view, x.view, qw.qw, A.view, B.view, xa.view, opt, dx.view, dA.view, dB.view,
                                ctx.pool);
           },
           [&] { qlora_forward_cpu(x.view, qw.qw, A.view, B.view, opt_d, y.view, xa.view, ctx.pool); },
           [&] {
             qlora_backward_cpu(dy.view, x.view, qw.qw, A.view, B.view, xa.view, opt_d, dx.view, dA.view, dB.view,
                                ctx.pool);
           }},
          7);
      const double flops = 2.0 * double(s.N) * double(s.in) * double(s.out);
      const double dense = t[0], dense_fb = t[0] + t[1];
      std::printf("  perf qlora %s N %lld in %lld out %lld r %lld (nf4 block 64 dq), %d thr, %s, best of 7:\n",
                  dtype_name(dt), (long long)s.N, (long long)s.in, (long long)s.out, (long long)s.r, run.threads,
                  isa_name(active_isa()));
      std::printf("    dense %-4s x W^T  %8.2f ms %6.1f GFLOP/s    dense dy W %8.2f ms\n", dtype_name(dt), dense * 1e3,
                  flops / dense * 1e-9, t[1] * 1e3);
      std::printf("    fused nf4 gemm x deq(W)^T  %8.2f ms  ratio %.3f\n", t[2] * 1e3, t[2] / dense);
      std::printf("    dequantize + dense gemm    %8.2f ms  ratio %.3f\n", t[3] * 1e3, t[3] / dense);
      std::printf("    qlora forward              %8.2f ms  ratio %.3f (/ dense fwd)\n", t[4] * 1e3, t[4] / dense);
      std::printf("    qlora backward             %8.2f ms  ratio %.3f (/ dense dx)\n", t[5] * 1e3, t[5] / t[1]);
      std::printf("    qlora fwd + bwd            %8.2f ms  ratio %.3f (/ dense fwd + dx)\n", (t[4] + t[5]) * 1e3,
                  (t[4] + t[5]) / dense_fb);
      std::printf("    dropout 0.1: fwd %8.2f ms  ratio %.3f;  fwd + bwd %8.2f ms  ratio %.3f\n", t[6] * 1e3,
                  t[6] / dense, (t[6] + t[7]) * 1e3, (t[6] + t[7]) / dense_fb);
    }
  ctx.pool.resize(threads);
}

}  // namespace
