// Tests of cuda/qlora_kernels against ref/qlora_ref (double) and the CPU kernel of cpu/qlora.
//
// - The layer, forward and backward, on the CPU tests' odd shapes: N in {1, 7, 97}, in in {33, 65,
//   130, 257} (never a multiple of the block, so quantization blocks straddle rows of W), out in
//   {1, 17, 97}, r in {1, 8}; every combination of dtype (f32, bf16) x block (64, 32) x double
//   quant x dropout (0, 0.3) x scale (0, 2), each on four shapes. The reference uses the effective
//   weight (the NF4 values, rounded to bf16 for bf16 tensors). Tolerances (nmse):
//     f32 outputs and xa: 1e-10 (fp32 accumulation; TF32 would be ~1e-7).
//     bf16 outputs: 4 x the error of a naive bf16 kernel, i.e. of the exact result rounded once to
//     bf16 (y and dx are rounded twice by design, qlora.h: bf16(base + bf16(lora))), floored at
//     1e-6 for outputs so small that their naive error happens to be tiny.
//   The CUDA results are also compared with qlora_forward_cpu / qlora_backward_cpu on the same
//   inputs, to the same tolerances (against the CPU's result in place of the reference).
//   Outputs start as NaN and sit between guard bytes; omitting xa (forward) or dx (backward) must
//   not change the other results' bits.
// - Chunking: a scratch bound of a few KiB forces several W row chunks (forward), several W
//   column chunks (backward, with a 1-column last chunk) and several row chunks of the widened
//   operands; results match the reference as above.
// - Dropout: with A = I the saved xa is drop(x) itself; it must equal the CPU kernel's xa bit for
//   bit (the same dropout_keep mask), for f32 and bf16 x.
// - N = 0 (dA, dB zeroed) and 3-D x; argument errors (tk::Error) including host tensors.
// - Without cuBLASLt in the build the layer must fail with gemm_cuda's error (the GEMMs need it).
// - --perf: issue 8 (c). Forward + backward (dx, dA, dB) time against the dense bf16 GEMMs of
//   the same frozen layer through gemm_cuda (cuBLASLt): x W^T and dy W with a materialized bf16 W
//   (a frozen base needs no dW), at N 2048 / 4096 rows and in x out 4096 x 4096 and
//   4096 x 14336, r 16, without dropout and with dropout 0.1; also the time to dequantize all of W
//   (what a dequantize-then-GEMM layer would add). Medians of CUDA-event-timed runs, operands
//   rotated between two sets so the timed runs do not read an L2 still holding the last run's
//   inputs. Each shape ends with a "perf-json {...}" line for scripts/gpu-measure.sh.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/cpu/nf4.h"
#include "native/cpu/qlora.h"
#include "native/cuda/gemm_kernels.h"
#include "native/cuda/nf4_kernels.h"
#include "native/cuda/qlora_kernels.h"
#include "native/ref/qlora_ref.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;
using tk::test::cuda::DeviceBuffer;

namespace {

void ck(cudaError_t e, const char* what) { tk::test::cuda::check(e, what); }

std::vector<double> round_to(const std::vector<double>& v, DType t) {
  std::vector<unsigned char> tmp(v.size() * dtype_size(t));
  from_double(v, tmp.data(), t);
  return to_double(tmp.data(), t, v.size());
}

TensorView none() { return TensorView{}; }

// A tensor in guarded device memory (256 bytes of 0xA5 on both sides), starting as NaN, with a
// host twin of the same bytes for the CPU kernel.
struct DTensor {
  static constexpr size_t kGuard = 256;
  DTensor(const std::vector<int64_t>& shape, DType t) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes = size_t(n) * dtype_size(t);
    buf.reset(new DeviceBuffer(bytes + 2 * kGuard, DType::U8));
    ck(cudaMemset(buf->data(), 0xA5, buf->bytes()), "cudaMemset");
    ck(cudaMemset(ptr(), 0xff, bytes), "cudaMemset");  // all-ones: NaN in f32 and bf16
    view = make_view(ptr(), t, Device{DeviceType::CUDA, 0}, shape);
    host.assign(std::max<size_t>(1, bytes), 0xff);
    hview = make_view(host.data(), t, Device{}, shape);
  }
  void* ptr() const { return static_cast<unsigned char*>(buf->data()) + kGuard; }
  void set(const std::vector<double>& v) {
    from_double(v, host.data(), view.dtype);
    ck(cudaMemcpy(ptr(), host.data(), bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<unsigned char> raw() const {
    std::vector<unsigned char> all = buf->raw();
    return std::vector<unsigned char>(all.begin() + long(kGuard), all.begin() + long(kGuard + bytes));
  }
  std::vector<double> get() const { return to_double(raw().data(), view.dtype, bytes / dtype_size(view.dtype)); }
  std::vector<double> host_values() const { return to_double(host.data(), view.dtype, bytes / dtype_size(view.dtype)); }
  bool intact() const {
    std::vector<unsigned char> all = buf->raw();
    for (size_t i = 0; i < kGuard; ++i)
      if (all[i] != 0xA5 || all[kGuard + bytes + i] != 0xA5) return false;
    return true;
  }
  size_t bytes = 0;
  std::unique_ptr<DeviceBuffer> buf;
  TensorView view, hview;
  std::vector<unsigned char> host;
};

// W [out, in] ~ N(0, 1) quantized on the CPU; the buffers on the host and on the device.
struct QWeight {
  QWeight(int64_t out, int64_t in, int64_t block, bool dq, uint64_t seed, ThreadPool& pool)
      : layout(nf4_layout(out * in, block, dq)) {
    const int64_t n = out * in;
    std::vector<float> w(static_cast<size_t>(n));
    const std::vector<double> v = randn(size_t(n), seed);
    for (int64_t i = 0; i < n; ++i) w[size_t(i)] = float(v[size_t(i)]);
    packed.resize(size_t(std::max<int64_t>(1, layout.packed_bytes)));
    absmax.resize(size_t(std::max<int64_t>(4, layout.absmax_bytes)));
    scale2.resize(size_t(std::max<int64_t>(4, layout.scale2_bytes)));
    offset.resize(4);
    hq.q = quantize_into(w, pool);
    hq.layout = layout;
    hq.out = out;
    hq.in = in;
    dpacked.reset(new DeviceBuffer(packed.size(), DType::U8));
    dabsmax.reset(new DeviceBuffer(absmax.size(), DType::U8));
    dscale2.reset(new DeviceBuffer(scale2.size(), DType::U8));
    doffset.reset(new DeviceBuffer(offset.size(), DType::U8));
    dpacked->set_bytes(packed.data());
    dabsmax->set_bytes(absmax.data());
    dscale2->set_bytes(scale2.data());
    doffset->set_bytes(offset.data());
    dw = hq;
    dw.q.packed = static_cast<const uint8_t*>(dpacked->data());
    dw.q.absmax = dq ? nullptr : static_cast<const float*>(dabsmax->data());
    dw.q.qabsmax = dq ? static_cast<const uint8_t*>(dabsmax->data()) : nullptr;
    dw.q.scale2 = dq ? static_cast<const float*>(dscale2->data()) : nullptr;
    dw.q.offset = dq ? static_cast<const float*>(doffset->data()) : nullptr;
  }
  Nf4In quantize_into(const std::vector<float>& w, ThreadPool& pool) {
    Nf4Out o;
    o.packed = packed.data();
    if (layout.double_quant) {
      o.qabsmax = absmax.data();
      o.scale2 = reinterpret_cast<float*>(scale2.data());
      o.offset = reinterpret_cast<float*>(offset.data());
    } else {
      o.absmax = reinterpret_cast<float*>(absmax.data());
    }
    nf4_quantize_cpu(w.data(), DType::F32, layout.numel, layout.block_size, layout.double_quant, o, pool);
    Nf4In i;
    i.packed = o.packed;
    i.absmax = o.absmax;
    i.qabsmax = o.qabsmax;
    i.scale2 = o.scale2;
    i.offset = o.offset;
    return i;
  }
  std::vector<double> effective(DType dt) const { return round_to(ref::qlora_weight_ref(hq.q, layout), dt); }
  Nf4Layout layout;
  std::vector<uint8_t> packed, absmax, scale2, offset;
  QloraWeight hq, dw;  // host buffers, device buffers
  std::unique_ptr<DeviceBuffer> dpacked, dabsmax, dscale2, doffset;
};

struct LayerCase {
  int64_t N, in, out, r;
  DType dt;
  int64_t block;
  bool dq;
  float dropout, scale;
  uint64_t seed;
  size_t scratch = 0;
};

std::string describe(const LayerCase& c) {
  char buf[220];
  std::snprintf(buf, sizeof buf, "cuda qlora N%lld in%lld out%lld r%lld %s block %lld%s p %.1f s %.0f%s",
                (long long)c.N, (long long)c.in, (long long)c.out, (long long)c.r, dtype_name(c.dt), (long long)c.block,
                c.dq ? " dq" : "", c.dropout, c.scale, c.scratch ? " small chunks" : "");
  return buf;
}

// The bf16 rounding model of qlora.h for a stored output that is base + lora.
std::vector<double> rounded_sum(const std::vector<double>& base, const std::vector<double>& lora, bool with_lora,
                                DType dt) {
  if (!with_lora) return round_to(base, dt);
  const std::vector<double> l = round_to(lora, dt);
  std::vector<double> s(base.size());
  for (size_t i = 0; i < s.size(); ++i) s[i] = base[i] + l[i];
  return round_to(s, dt);
}

// Tolerance for an output of dtype dt whose exact value is `exact`.
double tol_for(DType dt, const std::vector<double>& exact) {
  if (dt == DType::F32) return 1e-10;
  return 4.0 * std::max(nmse(round_to(exact, DType::BF16), exact), 1e-6);
}

void check_layer(Context& ctx, const LayerCase& c) {
  QWeight w(c.out, c.in, c.block, c.dq, c.seed, ctx.pool);
  DTensor x({c.N, c.in}, c.dt), A({c.r, c.in}, c.dt), B({c.out, c.r}, c.dt), dy({c.N, c.out}, c.dt);
  x.set(randn(size_t(c.N * c.in), c.seed + 1));
  A.set(randn(size_t(c.r * c.in), c.seed + 2));
  B.set(randn(size_t(c.out * c.r), c.seed + 3));
  dy.set(randn(size_t(c.N * c.out), c.seed + 4));
  QloraOptions opt;
  opt.scale = c.scale;
  opt.dropout = c.dropout;
  opt.seed = c.seed * 7919 + 5;
  ref::QloraRefProblem rp;
  rp.N = c.N, rp.in = c.in, rp.out = c.out, rp.r = c.r;
  rp.x = x.host_values();
  rp.w = w.effective(c.dt);
  rp.A = A.host_values();
  rp.B = B.host_values();
  rp.scale = c.scale;
  rp.dropout = c.dropout;
  rp.seed = opt.seed;
  const ref::QloraRefForward rf = ref::qlora_forward_ref(rp);
  const ref::QloraRefGrads rg = ref::qlora_backward_ref(rp, dy.host_values());
  const bool lora = c.scale != 0.0f;
  const std::string what = describe(c);

  DTensor y({c.N, c.out}, c.dt), xa({c.N, c.r}, DType::F32), y2({c.N, c.out}, c.dt);
  DTensor dx({c.N, c.in}, c.dt), dA({c.r, c.in}, c.dt), dB({c.out, c.r}, c.dt), dA2({c.r, c.in}, c.dt),
      dB2({c.out, c.r}, c.dt);
  try {
    qlora_forward_cuda(x.view, w.dw, A.view, B.view, opt, y.view, xa.view, nullptr, c.scratch);
    qlora_forward_cuda(x.view, w.dw, A.view, B.view, opt, y2.view, none(), nullptr, c.scratch);
    qlora_backward_cuda(dy.view, x.view, w.dw, A.view, B.view, xa.view, opt, dx.view, dA.view, dB.view, nullptr,
                        c.scratch);
    qlora_backward_cuda(dy.view, x.view, w.dw, A.view, B.view, xa.view, opt, none(), dA2.view, dB2.view, nullptr,
                        c.scratch);
    ck(cudaDeviceSynchronize(), "qlora");
  } catch (const std::exception& e) {
    ctx.check(false, what + ": threw " + e.what());
    return;
  }
  ctx.check(y.intact() && xa.intact() && y2.intact() && dx.intact() && dA.intact() && dB.intact() && dA2.intact() &&
                dB2.intact(),
            what + ": guards intact");
  const std::vector<double> exact_y = rf.y, exact_dx = rg.dx;
  const std::vector<double> gy = y.get(), gxa = xa.get(), gdx = dx.get(), gdA = dA.get(), gdB = dB.get();
  ctx.check_nmse(what + " y", gy, exact_y, tol_for(c.dt, exact_y));
  ctx.check_nmse(what + " xa", gxa, rf.xa, 1e-10);
  ctx.check_nmse(what + " dx", gdx, exact_dx, tol_for(c.dt, exact_dx));
  ctx.check_nmse(what + " dA", gdA, rg.dA, tol_for(c.dt, rg.dA));
  ctx.check_nmse(what + " dB", gdB, rg.dB, tol_for(c.dt, rg.dB));
  if (c.dt == DType::BF16) {
    // The rounding model itself (qlora.h): the reference rounded the way the kernel rounds.
    ctx.check_nmse(what + " y vs the bf16 rounding model", gy, rounded_sum(rf.base, rf.lora, lora, c.dt), 1e-5);
    ctx.check_nmse(what + " dx vs the bf16 rounding model", gdx, rounded_sum(rg.dx_base, rg.dx_lora, lora, c.dt),
                   1e-5);
  }
  ctx.check(y.raw() == y2.raw(), what + ": y without saving xa has the same bits");
  ctx.check(dA.raw() == dA2.raw() && dB.raw() == dB2.raw(), what + ": dA, dB without dx have the same bits");

  // Against the CPU kernel on the same inputs.
  DTensor cy({c.N, c.out}, c.dt), cxa({c.N, c.r}, DType::F32), cdx({c.N, c.in}, c.dt), cdA({c.r, c.in}, c.dt),
      cdB({c.out, c.r}, c.dt);
  qlora_forward_cpu(x.hview, w.hq, A.hview, B.hview, opt, cy.hview, cxa.hview, ctx.pool);
  qlora_backward_cpu(dy.hview, x.hview, w.hq, A.hview, B.hview, cxa.hview, opt, cdx.hview, cdA.hview, cdB.hview,
                     ctx.pool);
  ctx.check_nmse(what + " y vs cpu", gy, cy.host_values(), tol_for(c.dt, exact_y));
  ctx.check_nmse(what + " xa vs cpu", gxa, cxa.host_values(), 1e-10);
  ctx.check_nmse(what + " dx vs cpu", gdx, cdx.host_values(), tol_for(c.dt, exact_dx));
  ctx.check_nmse(what + " dA vs cpu", gdA, cdA.host_values(), tol_for(c.dt, rg.dA));
  ctx.check_nmse(what + " dB vs cpu", gdB, cdB.host_values(), tol_for(c.dt, rg.dB));
}

bool cublaslt_or_error_checked(Context& ctx) {
  if (tk::cuda::has_cublaslt()) return true;
  // The layer's products go through gemm_cuda: without cuBLASLt the forward fails with its error.
  QWeight w(17, 33, 64, true, 1, ctx.pool);
  DTensor x({3, 33}, DType::F32), A({2, 33}, DType::F32), B({17, 2}, DType::F32), y({3, 17}, DType::F32),
      xa({3, 2}, DType::F32);
  x.set(randn(99, 2));
  A.set(randn(66, 3));
  B.set(randn(34, 4));
  std::string msg;
  try {
    qlora_forward_cuda(x.view, w.dw, A.view, B.view, QloraOptions{}, y.view, xa.view, nullptr);
  } catch (const Error& e) {
    msg = e.what();
  }
  ck(cudaDeviceSynchronize(), "qlora");
  ctx.check(msg.find("no cuBLASLt") != std::string::npos,
            "cuda qlora without cuBLASLt fails with gemm_cuda's error (got \"" + msg + "\")");
  return false;
}

TK_TEST(cuda_qlora_matches_ref) {
  if (!tk::test::cuda::available() || !cublaslt_or_error_checked(ctx)) return;
  std::vector<LayerCase> shapes;
  for (int64_t N : {1, 7, 97})
    for (int64_t in : {33, 65, 130, 257})
      for (int64_t out : {1, 17, 97}) shapes.push_back(LayerCase{N, in, out, 1, DType::F32, 64, false, 0, 0, 0});
  size_t next = 0;
  uint64_t seed = 1;
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t block : {64, 32})
      for (bool dq : {false, true})
        for (float p : {0.0f, 0.3f})
          for (float s : {0.0f, 2.0f})
            for (int k = 0; k < 4; ++k) {
              LayerCase c = shapes[next++ % shapes.size()];
              c.r = next % 2 ? 8 : 1;
              c.dt = dt;
              c.block = block;
              c.dq = dq;
              c.dropout = p;
              c.scale = s;
              c.seed = seed++ * 1000;
              check_layer(ctx, c);
            }
}

TK_TEST(cuda_qlora_chunks) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  // W [200, 257]: with an 8 KiB bound the forward takes W 64 rows at a time (the minimum chunk),
  // the backward 64 columns at a time (5 chunks, the last 1 column wide), and the widened row
  // chunks hold 7 rows of x (f32, 257 wide) or 10 of dy.
  for (DType dt : {DType::F32, DType::BF16})
    for (float p : {0.0f, 0.25f})
      check_layer(ctx, LayerCase{61, 257, 200, 4, dt, 64, true, p, 1.5f, 4242, size_t(8) << 10});
  // W [130, 1000] with a bound that admits 128 rows (forward) and 960 columns (backward) per chunk.
  check_layer(ctx, LayerCase{33, 1000, 130, 8, DType::BF16, 64, true, 0.1f, 2.0f, 4343, size_t(128) * 1000 * 2});
}

TK_TEST(cuda_qlora_dropout_mask_matches_cpu) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  // A = I: xa = drop(x) exactly (one non-zero product per output), so the bits show the mask.
  const int64_t N = 37, in = 29, out = 5;
  for (DType dt : {DType::F32, DType::BF16}) {
    QWeight w(out, in, 32, false, 9, ctx.pool);
    DTensor x({N, in}, dt), A({in, in}, dt), B({out, in}, dt), y({N, out}, dt), xa({N, in}, DType::F32);
    DTensor cy({N, out}, dt), cxa({N, in}, DType::F32);
    x.set(randn(size_t(N * in), 10));
    std::vector<double> eye(size_t(in * in), 0.0);
    for (int64_t i = 0; i < in; ++i) eye[size_t(i * in + i)] = 1.0;
    A.set(eye);
    B.set(randn(size_t(out * in), 11));
    QloraOptions opt;
    opt.scale = 1.0f;
    opt.dropout = 0.4f;
    opt.seed = 0x1234567890abcdefull;
    qlora_forward_cuda(x.view, w.dw, A.view, B.view, opt, y.view, xa.view, nullptr);
    qlora_forward_cpu(x.hview, w.hq, A.hview, B.hview, opt, cy.hview, cxa.hview, ctx.pool);
    const std::vector<unsigned char> got = xa.raw();
    ctx.check(std::memcmp(got.data(), cxa.host.data(), got.size()) == 0,
              std::string("cuda qlora dropout mask (xa with A = I) equals the CPU's bit for bit ") + dtype_name(dt));
    size_t kept = 0;
    for (double v : xa.get()) kept += v != 0.0;
    ctx.check(kept > size_t(N * in) / 2 && kept < size_t(N * in) * 3 / 4, "cuda qlora dropout keeps about 60%");
  }
}

TK_TEST(cuda_qlora_edge_shapes) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  QWeight w(17, 65, 64, true, 77, ctx.pool);
  DTensor x({2, 3, 65}, DType::F32), x2({6, 65}, DType::F32), A({4, 65}, DType::F32), B({17, 4}, DType::F32);
  DTensor y({2, 3, 17}, DType::F32), y2({6, 17}, DType::F32), xa({2, 3, 4}, DType::F32), xa2({6, 4}, DType::F32);
  const std::vector<double> xv = randn(6 * 65, 78);
  x.set(xv);
  x2.set(xv);
  A.set(randn(4 * 65, 79));
  B.set(randn(17 * 4, 80));
  QloraOptions opt;
  opt.scale = 0.5f;
  opt.dropout = 0.25f;
  qlora_forward_cuda(x.view, w.dw, A.view, B.view, opt, y.view, xa.view, nullptr);
  qlora_forward_cuda(x2.view, w.dw, A.view, B.view, opt, y2.view, xa2.view, nullptr);
  ctx.check(y.raw() == y2.raw(), "cuda qlora x [2, 3, in] equals x [6, in]");
  DTensor x0({0, 65}, DType::F32), y0({0, 17}, DType::F32), xa0({0, 4}, DType::F32), dy0({0, 17}, DType::F32),
      dx0({0, 65}, DType::F32), dA({4, 65}, DType::F32), dB({17, 4}, DType::F32);
  qlora_forward_cuda(x0.view, w.dw, A.view, B.view, opt, y0.view, xa0.view, nullptr);
  qlora_backward_cuda(dy0.view, x0.view, w.dw, A.view, B.view, xa0.view, opt, dx0.view, dA.view, dB.view, nullptr);
  bool zero = true;
  for (double v : dA.get()) zero = zero && v == 0.0;
  for (double v : dB.get()) zero = zero && v == 0.0;
  ctx.check(zero && dA.intact() && dB.intact(), "cuda qlora N = 0: dA and dB are zero");
}

TK_TEST(cuda_qlora_rejects_bad_arguments) {
  if (!tk::test::cuda::available()) return;
  auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const Error&) {
      return true;
    }
    return false;
  };
  const int64_t N = 5, in = 33, out = 7, r = 2;
  QWeight qw(out, in, 32, true, 5, ctx.pool);
  const QloraWeight& w = qw.dw;
  DTensor x({N, in}, DType::F32), A({r, in}, DType::F32), B({out, r}, DType::F32), y({N, out}, DType::F32),
      xa({N, r}, DType::F32), dy({N, out}, DType::F32), dx({N, in}, DType::F32), dA({r, in}, DType::F32),
      dB({out, r}, DType::F32);
  x.set(randn(size_t(N * in), 1));
  A.set(randn(size_t(r * in), 2));
  B.set(randn(size_t(out * r), 3));
  dy.set(randn(size_t(N * out), 4));
  QloraOptions opt;
  auto fwd = [&](const TensorView& xv, const QloraWeight& wv, const TensorView& av, const TensorView& bv,
                 const QloraOptions& o, const TensorView& yv, const TensorView& xav) {
    return throws([&] { qlora_forward_cuda(xv, wv, av, bv, o, yv, xav, nullptr); });
  };
  DTensor x_in({N, in + 1}, DType::F32), B_r({out, r + 1}, DType::F32), y_out({N, out + 1}, DType::F32),
      xa_bf({N, r}, DType::BF16), A_bf({r, in}, DType::BF16), x_f16({N, in}, DType::F16);
  if (tk::cuda::has_cublaslt())
    ctx.check(!fwd(x.view, w, A.view, B.view, opt, y.view, xa.view), "cuda qlora accepts valid arguments");
  ctx.check(fwd(x.hview, w, A.view, B.view, opt, y.view, xa.view), "cuda qlora rejects a host x");
  ctx.check(fwd(x.view, w, A.hview, B.view, opt, y.view, xa.view), "cuda qlora rejects a host A");
  ctx.check(fwd(x_in.view, w, A.view, B.view, opt, y.view, xa.view), "cuda qlora rejects x whose last dim is not in");
  ctx.check(fwd(x.view, w, A.view, B_r.view, opt, y.view, xa.view), "cuda qlora rejects B [out, r'] with r' != r");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y_out.view, xa.view),
            "cuda qlora rejects y [N, out'] with out' != out");
  ctx.check(fwd(x.view, w, A.view, B.view, opt, y.view, xa_bf.view), "cuda qlora rejects a bf16 xa");
  ctx.check(fwd(x.view, w, A_bf.view, B.view, opt, y.view, xa.view), "cuda qlora rejects A of another dtype than x");
  ctx.check(fwd(x_f16.view, w, A.view, B.view, opt, y.view, xa.view), "cuda qlora rejects an f16 x");
  QloraWeight bad = w;
  bad.layout = nf4_layout(out * in + 2, 32, true);
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view), "cuda qlora rejects a W layout of another numel");
  bad = w;
  bad.q.scale2 = nullptr;
  ctx.check(fwd(x.view, bad, A.view, B.view, opt, y.view, xa.view), "cuda qlora rejects a dq W without scale2");
  QloraOptions o = opt;
  o.dropout = 1.0f;
  ctx.check(fwd(x.view, w, A.view, B.view, o, y.view, xa.view), "cuda qlora rejects dropout 1");
  o = opt;
  o.scale = INFINITY;
  ctx.check(fwd(x.view, w, A.view, B.view, o, y.view, xa.view), "cuda qlora rejects an infinite scale");
  auto bwd = [&](const TensorView& xav, const TensorView& dxv, const TensorView& dav, const TensorView& dbv) {
    return throws([&] { qlora_backward_cuda(dy.view, x.view, w, A.view, B.view, xav, opt, dxv, dav, dbv, nullptr); });
  };
  ctx.check(bwd(none(), dx.view, dA.view, dB.view), "cuda qlora backward requires xa");
  ctx.check(bwd(xa.view, dx.view, A_bf.view, dB.view), "cuda qlora backward rejects dA of another dtype");
  ctx.check(bwd(xa.view, x_in.view, dA.view, dB.view), "cuda qlora backward rejects dx of another shape than x");
  ctx.check(bwd(xa.view, dx.view, dA.hview, dB.view), "cuda qlora backward rejects a host dA");
  ck(cudaDeviceSynchronize(), "qlora");
}

// ==== --perf ==========================================================================================

// Median seconds of fn(i) over `reps` CUDA-event-timed runs (i = 0, 1, ... picks an operand set),
// after one warm-up run.
double gpu_median(const std::function<void(int)>& fn, int reps = 11) {
  cudaEvent_t e0, e1;
  ck(cudaEventCreate(&e0), "cudaEventCreate");
  ck(cudaEventCreate(&e1), "cudaEventCreate");
  fn(0);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    ck(cudaEventRecord(e0, nullptr), "cudaEventRecord");
    fn(i);
    ck(cudaEventRecord(e1, nullptr), "cudaEventRecord");
    ck(cudaEventSynchronize(e1), "perf");
    float ms = 0;
    ck(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    t.push_back(double(ms) * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Fills a device buffer of bf16 with N(0, std^2) values: one random tile of 4M values, uploaded
// as often as it takes (generating hundreds of millions of normals on the host would dominate).
void fill_bf16(void* dst, int64_t n, uint64_t seed, double std) {
  const int64_t tile = std::min<int64_t>(n, int64_t(1) << 22);
  std::vector<double> v = randn(size_t(tile), seed);
  for (double& x : v) x *= std;
  std::vector<unsigned char> host(size_t(tile) * 2);
  from_double(v, host.data(), DType::BF16);
  for (int64_t off = 0; off < n; off += tile)
    ck(cudaMemcpy(static_cast<uint16_t*>(dst) + off, host.data(), size_t(std::min(tile, n - off)) * 2,
                  cudaMemcpyHostToDevice),
       "upload");
}

TK_TEST(cuda_qlora_perf) {
  if (!tk::test::cuda::available()) return;
  if (!tk::cuda::has_cublaslt()) {
    std::printf("  perf cuda qlora: skipped (this build has no cuBLASLt)\n");
    return;
  }
  struct Shape { int64_t N, in, out, r; };
  const Shape shapes[] = {{2048, 4096, 4096, 16}, {4096, 4096, 4096, 16}, {2048, 4096, 14336, 16}, {4096, 4096, 14336, 16}};
  const DType dt = DType::BF16;
  std::printf("  perf cuda qlora bf16 on %s (nf4 block 64 dq, median of 11):\n", tk::cuda::device_props(0).name.c_str());
  for (const Shape& s : shapes) {
    // W quantized on the device from random bf16 values, and the same W dequantized for the dense GEMMs.
    const int64_t n = s.out * s.in;
    const Nf4Layout l = nf4_layout(n, 64, true);
    DeviceBuffer wsrc(size_t(n), dt), wdense(size_t(n), dt);
    fill_bf16(wsrc.data(), n, 5, 0.02);
    DeviceBuffer packed(size_t(l.packed_bytes), DType::U8), qabsmax(size_t(l.absmax_bytes), DType::U8),
        scale2(size_t(l.scale2_bytes), DType::U8), offset(4, DType::U8);
    Nf4Out o;
    o.packed = static_cast<uint8_t*>(packed.data());
    o.qabsmax = static_cast<uint8_t*>(qabsmax.data());
    o.scale2 = static_cast<float*>(scale2.data());
    o.offset = static_cast<float*>(offset.data());
    nf4_quantize_cuda(wsrc.data(), dt, n, 64, true, o, nullptr);
    QloraWeight w;
    w.q.packed = o.packed;
    w.q.qabsmax = o.qabsmax;
    w.q.scale2 = o.scale2;
    w.q.offset = o.offset;
    w.layout = l;
    w.out = s.out;
    w.in = s.in;
    nf4_dequantize_cuda(w.q, n, 64, true, wdense.data(), dt, nullptr);

    // Two sets of activations (x, dy and what is computed from them), used in turn.
    struct Set {
      DTensor x, dy, y, xa, dx;
      Set(const Shape& s, DType dt)
          : x({s.N, s.in}, dt), dy({s.N, s.out}, dt), y({s.N, s.out}, dt), xa({s.N, s.r}, DType::F32),
            dx({s.N, s.in}, dt) {}
    };
    std::unique_ptr<Set> sets[2] = {std::make_unique<Set>(s, dt), std::make_unique<Set>(s, dt)};
    for (int k = 0; k < 2; ++k) {
      fill_bf16(sets[k]->x.ptr(), s.N * s.in, 10 + uint64_t(k), 1.0);
      fill_bf16(sets[k]->dy.ptr(), s.N * s.out, 20 + uint64_t(k), 1.0);
    }
    DTensor A({s.r, s.in}, dt), B({s.out, s.r}, dt), dA({s.r, s.in}, dt), dB({s.out, s.r}, dt);
    fill_bf16(A.ptr(), s.r * s.in, 2, 1.0 / std::sqrt(double(s.in)));
    fill_bf16(B.ptr(), s.out * s.r, 3, 0.02);

    auto gemm_fw = [&](Set& z) {  // y = x W^T
      GemmParams p;
      p.M = s.N, p.N = s.out, p.K = s.in, p.ab_dtype = dt, p.c_dtype = dt;
      p.A = z.x.ptr(), p.lda = s.in, p.B = wdense.data(), p.ldb = s.in, p.trans_b = true;
      p.C = z.y.ptr(), p.ldc = s.out;
      gemm_cuda(p, nullptr);
    };
    auto gemm_bw = [&](Set& z) {  // dx = dy W
      GemmParams p;
      p.M = s.N, p.N = s.in, p.K = s.out, p.ab_dtype = dt, p.c_dtype = dt;
      p.A = z.dy.ptr(), p.lda = s.out, p.B = wdense.data(), p.ldb = s.in;
      p.C = z.dx.ptr(), p.ldc = s.in;
      gemm_cuda(p, nullptr);
    };
    const double t_fw = gpu_median([&](int i) { gemm_fw(*sets[i & 1]); });
    const double t_bw = gpu_median([&](int i) { gemm_bw(*sets[i & 1]); });
    const double t_deq = gpu_median([&](int) { nf4_dequantize_cuda(w.q, n, 64, true, wdense.data(), dt, nullptr); });
    const double flops = 2.0 * double(s.N) * double(s.in) * double(s.out);
    std::printf("    N %lld in %lld out %lld r %lld:\n", (long long)s.N, (long long)s.in, (long long)s.out, (long long)s.r);
    std::printf("      dense bf16 x W^T %8.3f ms (%6.1f TFLOP/s)   dense dy W %8.3f ms (%6.1f TFLOP/s)   nf4 dequantize of W %8.3f ms\n",
                t_fw * 1e3, flops / t_fw * 1e-12, t_bw * 1e3, flops / t_bw * 1e-12, t_deq * 1e3);
    for (float dropout : {0.0f, 0.1f}) {
      QloraOptions opt;
      opt.scale = 2.0f;
      opt.dropout = dropout;
      opt.seed = 7;
      const double t_qf = gpu_median([&](int i) {
        Set& z = *sets[i & 1];
        qlora_forward_cuda(z.x.view, w, A.view, B.view, opt, z.y.view, z.xa.view, nullptr);
      });
      const double t_qb = gpu_median([&](int i) {
        Set& z = *sets[i & 1];
        qlora_backward_cuda(z.dy.view, z.x.view, w, A.view, B.view, z.xa.view, opt, z.dx.view, dA.view, dB.view, nullptr);
      });
      const double ratio = (t_qf + t_qb) / (t_fw + t_bw);
      std::printf("      dropout %.1f: qlora forward %8.3f ms (%.3f x dense x W^T)   backward %8.3f ms (%.3f x dense dy W)"
                  "   fwd + bwd %8.3f ms, ratio %.3f\n",
                  double(dropout), t_qf * 1e3, t_qf / t_fw, t_qb * 1e3, t_qb / t_bw, (t_qf + t_qb) * 1e3, ratio);
      std::printf("      perf-json {\"test\":\"cuda_qlora\",\"N\":%lld,\"in\":%lld,\"out\":%lld,\"r\":%lld,\"dropout\":%.1f,"
                  "\"dense_fwd_ms\":%.6f,\"dense_dx_ms\":%.6f,\"dequant_ms\":%.6f,\"qlora_fwd_ms\":%.6f,\"qlora_bwd_ms\":%.6f,"
                  "\"ratio\":%.4f}\n",
                  (long long)s.N, (long long)s.in, (long long)s.out, (long long)s.r, double(dropout), t_fw * 1e3,
                  t_bw * 1e3, t_deq * 1e3, t_qf * 1e3, t_qb * 1e3, ratio);
    }
    ck(cudaDeviceSynchronize(), "qlora perf");
  }
}

}  // namespace
