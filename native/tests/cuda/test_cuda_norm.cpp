// Tests of cuda/norm_kernels (RMSNorm, SwiGLU, embedding, RoPE; forward and backward) against
// ref/norm_ref and ref/rope_ref, and against the CPU kernels where the two must agree bit for bit.
//
// Every output lives in a guarded device buffer (64 pattern bytes on each side). Shapes are odd
// (N in {1, 7, 97, 257, 1031}, D in {1, 97, 257, 1025, 4096}, plus rows long enough for the
// register cache to overflow (20000), for shared memory beyond 48 KB (16384) and beyond the
// device's shared memory (70000), and views offset by one element so that the scalar paths run
// too). Tolerances (NMSE) are the CPU tests':
// - F32 outputs: a few fp32 roundings per element and fp32 reductions in a fixed tree: forward
//   1e-11, gradients 1e-10, rstd 1e-12; dweight (F32 for both dtypes) 1e-10. RMSNorm's dx is
//   normalized by the larger of its own size and that of its first term (they cancel when D = 1).
// - BF16 outputs: one rounding to bf16 (NMSE ~1.3e-6 against the exact value): 1e-5.
// - Embedding: forward is a copy (exact); backward is bitwise equal to embedding_backward_cpu
//   (same order of fp32 additions) and within 1e-9 of the double reference.
// - RoPE: f32 1e-11; bf16 2^-16 against the exact value and 1e-7 against the exact value rounded
//   to bf16 (only elements whose fp32 result sits across a rounding boundary differ).
// - Determinism: the backward passes (the ones that reduce) run twice and must give equal bytes.
// The perf test prints GB/s for RMSNorm, RoPE and SwiGLU (bf16) next to a device-to-device
// cudaMemcpy, which is the copy bandwidth these kernels should approach. Every test returns at
// once without a device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/core/queue.h"
#include "native/cpu/norm.h"
#include "native/cpu/rope.h"
#include "native/cuda/elementwise_kernels.h"
#include "native/cuda/norm_kernels.h"
#include "native/ref/norm_ref.h"
#include "native/ref/rope_ref.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;
using tk::test::cuda::available;
using tk::test::cuda::check;

const DType kTypes[] = {DType::F32, DType::BF16};
constexpr double kEps = 1e-6;

// The queue stream of device 0 for every launch of this file (kernels take scratch memory from
// the allocator tagged with their stream); the queue lives as long as the process.
cudaStream_t test_stream() {
  static Queue* q = tk::cuda::make_queue(0).release();
  return static_cast<cudaStream_t>(tk::cuda::stream_of(*q));
}
void* stream() { return test_stream(); }
void sync() { check(cudaStreamSynchronize(test_stream()), "cudaStreamSynchronize"); }

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

// A contiguous device tensor `offset` elements past an aligned address, with 64 pattern bytes on
// either side (checked by intact()).
class Dev {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kPattern = 0xA5;
  Dev(Shape shape, DType t, int64_t offset = 0) : shape_(std::move(shape)), dtype_(t) {
    pre_ = kGuard + size_t(offset) * dtype_size(t);
    total_ = pre_ + bytes() + kGuard;
    check(cudaMalloc(&base_, total_), "cudaMalloc");
    check(cudaMemset(base_, kPattern, total_), "cudaMemset");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  ~Dev() { cudaFree(base_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  int64_t n() const { return numel(shape_); }
  size_t bytes() const { return size_t(n()) * dtype_size(dtype_); }
  void* data() const { return static_cast<char*>(base_) + pre_; }
  TensorView view() const { return make_view(data(), dtype_, Device{DeviceType::CUDA, 0}, shape_); }
  void set_bytes(const void* src) {
    check(cudaMemcpyAsync(data(), src, bytes(), cudaMemcpyHostToDevice, test_stream()), "cudaMemcpyAsync H2D");
    sync();
  }
  void set(const std::vector<double>& v) {
    std::vector<uint8_t> h(bytes());
    from_double(v, h.data(), dtype_);
    set_bytes(h.data());
  }
  void fill(unsigned char byte) {
    check(cudaMemsetAsync(data(), byte, bytes(), test_stream()), "cudaMemsetAsync");
    sync();
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> h(bytes());
    sync();
    check(cudaMemcpy(h.data(), data(), bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
  std::vector<double> values() const {
    std::vector<uint8_t> h = raw();
    return to_double(h.data(), dtype_, size_t(n()));
  }
  std::vector<int32_t> ids() const {
    std::vector<uint8_t> h = raw();
    std::vector<int32_t> r(static_cast<size_t>(n()));
    std::memcpy(r.data(), h.data(), h.size());
    return r;
  }
  bool intact() const {
    std::vector<unsigned char> h(total_);
    sync();
    check(cudaMemcpy(h.data(), base_, total_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    for (size_t i = 0; i < total_; ++i)
      if ((i < pre_ || i >= pre_ + bytes()) && h[i] != kPattern) return false;
    return true;
  }

 private:
  Shape shape_;
  DType dtype_;
  void* base_ = nullptr;
  size_t pre_ = 0, total_ = 0;
};

// Host storage for the CPU kernels and the references.
struct Host {
  Host(Shape s, DType t) : shape(std::move(s)), dtype(t), mem(size_t(numel(shape)) * dtype_size(t) + 16) {}
  Shape shape;
  DType dtype;
  std::vector<uint8_t> mem;
  TensorView view() { return make_view(mem.data(), dtype, Device{}, shape); }
  std::vector<uint8_t> raw() const {
    return std::vector<uint8_t>(mem.begin(), mem.begin() + int64_t(size_t(numel(shape)) * dtype_size(dtype)));
  }
};

// normal(0, 1) * scale + shift in b's dtype; returns the values b holds (after rounding).
std::vector<double> randomize(Dev& b, DType t, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  std::vector<double> v = randn(size_t(b.n()), seed);
  for (double& x : v) x = x * scale + shift;
  b.set(v);
  std::vector<uint8_t> h(b.bytes());
  from_double(v, h.data(), t);
  return to_double(h.data(), t, v.size());
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::vector<double> u = uniform(size_t(n), seed, 0, double(V));
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (size_t i = 0; i < u.size(); ++i) ids[i] = int32_t(std::min<double>(std::floor(u[i]), double(V - 1)));
  return ids;
}

std::string label(const char* op, const Shape& s, DType t, const char* extra = "") {
  return std::string(op) + " " + shape_str(s) + " " + dtype_name(t) + extra;
}

double fwd_tol(DType t) { return t == DType::F32 ? 1e-11 : 1e-5; }
double bwd_tol(DType t) { return t == DType::F32 ? 1e-10 : 1e-5; }

bool same_bytes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) { return a == b; }

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

// ---- RMSNorm: forward and backward of one shape against the reference -------------------------------

void run_rms(Context& ctx, int64_t N, int64_t D, DType t, int64_t offset = 0) {
  const Shape xs = {N, D};
  Dev x(xs, t, offset), w({D}, t, offset), dy(xs, t, offset), y(xs, t, offset), rstd({N}, DType::F32);
  Dev dx(xs, t, offset), dw({D}, DType::F32), dx2(xs, t, offset), dw2({D}, DType::F32);
  const std::vector<double> xv = randomize(x, t, 1000 + uint64_t(N * 7 + D), 2.0);
  const std::vector<double> wv = randomize(w, t, 2000 + uint64_t(D), 0.1, 1.0);
  const std::vector<double> dyv = randomize(dy, t, 3000 + uint64_t(N + D));
  dw.fill(0x7f);
  rms_norm_forward_cuda(x.view(), w.view(), float(kEps), y.view(), rstd.view(), stream());
  rms_norm_backward_cuda(dy.view(), x.view(), w.view(), rstd.view(), dx.view(), dw.view(), stream());
  rms_norm_backward_cuda(dy.view(), x.view(), w.view(), rstd.view(), dx2.view(), dw2.view(), stream());

  const ref::RmsNormForward f = ref::rms_norm_forward(xv, wv, N, D, kEps);
  const ref::RmsNormBackward b = ref::rms_norm_backward(dyv, xv, wv, N, D, kEps);
  const char* extra = offset ? " (offset by one element)" : "";
  const std::string fw = label("rms_norm fwd", xs, t, extra), bw = label("rms_norm bwd", xs, t, extra);
  ctx.check_nmse(fw + " y", y.values(), f.y, fwd_tol(t));
  ctx.check_nmse(fw + " rstd", rstd.values(), f.rstd, 1e-12);
  ctx.check_nmse(bw + " dweight", dw.values(), b.dweight, 1e-10);

  const std::vector<double> got = dx.values();
  double num = 0, den_ref = 0, den_term = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      const size_t i = size_t(n * D + d);
      const double term = f.rstd[size_t(n)] * dyv[i] * wv[size_t(d)];
      num += (got[i] - b.dx[i]) * (got[i] - b.dx[i]);
      den_ref += b.dx[i] * b.dx[i];
      den_term += term * term;
    }
  const double e = num / std::max(den_ref, den_term);
  char buf[96];
  std::snprintf(buf, sizeof buf, " dx: scaled nmse %.3e (tol %.1e)", e, bwd_tol(t));
  ctx.check(e <= bwd_tol(t), bw + buf);
  ctx.check(same_bytes(dx.raw(), dx2.raw()) && same_bytes(dw.raw(), dw2.raw()), bw + ": two runs give the same bytes");
  ctx.check(y.intact() && rstd.intact() && dx.intact() && dw.intact(), fw + " / bwd: guard bytes");
}

void run_swiglu(Context& ctx, int64_t n, DType t, int64_t offset) {
  const Shape s = {n};
  Dev g(s, t, offset), u(s, t, offset), d(s, t, offset), out(s, t, offset), dg(s, t, offset), du(s, t, offset);
  const std::vector<double> gv = randomize(g, t, 4000 + uint64_t(n), 4.0);  // |gate| up to ~16
  const std::vector<double> uv = randomize(u, t, 5000 + uint64_t(n));
  const std::vector<double> dv = randomize(d, t, 6000 + uint64_t(n));
  swiglu_forward_cuda(g.view(), u.view(), out.view(), stream());
  swiglu_backward_cuda(d.view(), g.view(), u.view(), dg.view(), du.view(), stream());
  const ref::SwigluBackward b = ref::swiglu_backward(dv, gv, uv);
  const char* extra = offset ? " (offset by one element)" : "";
  const std::string fw = label("swiglu fwd", s, t, extra), bw = label("swiglu bwd", s, t, extra);
  ctx.check_nmse(fw + " out", out.values(), ref::swiglu_forward(gv, uv), fwd_tol(t));
  ctx.check_nmse(bw + " dgate", dg.values(), b.dgate, bwd_tol(t));
  ctx.check_nmse(bw + " dup", du.values(), b.dup, bwd_tol(t));
  ctx.check(out.intact() && dg.intact() && du.intact(), fw + " / bwd: guard bytes");
}

void run_embedding(Context& ctx, int64_t N, int64_t V, int64_t D, DType t, int64_t offset = 0) {
  Dev ids({N}, DType::I32), table({V, D}, t, offset), out({N, D}, t, offset), dout({N, D}, t, offset);
  Dev dtable({V, D}, DType::F32), dtable2({V, D}, DType::F32);
  const std::vector<int32_t> idv = random_ids(N, V, 7000 + uint64_t(N * 3 + V));
  ids.set_bytes(idv.data());
  const std::vector<double> tv = randomize(table, t, 8000 + uint64_t(V + D));
  const std::vector<double> dv = randomize(dout, t, 9000 + uint64_t(N + D));
  dtable.fill(0x7f);  // garbage: the kernel must zero it
  embedding_forward_cuda(ids.view(), table.view(), out.view(), stream());
  embedding_backward_cuda(dout.view(), ids.view(), dtable.view(), stream());
  embedding_backward_cuda(dout.view(), ids.view(), dtable2.view(), stream());

  // The CPU backward on the same values, for the bitwise comparison.
  Host hids({N}, DType::I32), hdout({N, D}, t), hdt({V, D}, DType::F32);
  std::memcpy(hids.mem.data(), idv.data(), idv.size() * 4);
  const std::vector<uint8_t> draw = dout.raw();
  std::memcpy(hdout.mem.data(), draw.data(), draw.size());
  embedding_backward_cpu(hdout.view(), hids.view(), hdt.view(), ctx.pool);

  const std::string what = "embedding N " + std::to_string(N) + " table " + shape_str({V, D}) + " " + dtype_name(t) +
                           (offset ? " (offset by one element)" : "");
  ctx.check_nmse(what + " fwd", out.values(), ref::embedding_forward(idv, tv, V, D), 0.0);
  ctx.check_nmse(what + " bwd dtable", dtable.values(), ref::embedding_backward(dv, idv, V, D), 1e-9);
  ctx.check(same_bytes(dtable.raw(), hdt.raw()), what + " bwd: bytes equal embedding_backward_cpu's");
  ctx.check(same_bytes(dtable.raw(), dtable2.raw()), what + " bwd: two runs give the same bytes");
  ctx.check(out.intact() && dtable.intact(), what + ": guard bytes");
}

}  // namespace

// ==== RMSNorm =========================================================================================

TK_TEST(cuda_norm_rms_forward_backward) {
  if (!available()) return;
  for (DType t : kTypes) {
    for (int64_t N : {1, 7, 97, 257, 1031})
      for (int64_t D : {1, 97, 257, 1025, 4096}) run_rms(ctx, N, D, t);
    run_rms(ctx, 97, 256, t, 1);   // D % 8 == 0 but misaligned: the scalar path
    run_rms(ctx, 3, 20000, t);     // beyond the register cache of both passes
    run_rms(ctx, 5, 16384, t);     // dweight accumulator beyond 48 KB of shared memory
  }
  run_rms(ctx, 5, 70000, DType::F32);  // beyond any device's shared memory: accumulated in place
}

TK_TEST(cuda_norm_rms_alias) {
  if (!available()) return;
  // y written over x, dx over dy: the same bytes as out of place.
  for (DType t : kTypes) {
    const Shape xs = {15, 97};
    Dev x(xs, t), w({97}, t), y(xs, t), r({15}, DType::F32), dy(xs, t), dx(xs, t), dw({97}, DType::F32);
    randomize(x, t, 11);
    randomize(w, t, 12, 0.1, 1.0);
    randomize(dy, t, 13);
    rms_norm_forward_cuda(x.view(), w.view(), float(kEps), y.view(), r.view(), stream());
    rms_norm_backward_cuda(dy.view(), x.view(), w.view(), r.view(), dx.view(), dw.view(), stream());
    Dev dw2({97}, DType::F32);
    rms_norm_backward_cuda(dy.view(), x.view(), w.view(), r.view(), dy.view(), dw2.view(), stream());
    ctx.check(same_bytes(dy.raw(), dx.raw()) && same_bytes(dw2.raw(), dw.raw()),
              label("rms_norm", xs, t) + ": dx written over dy matches");
    rms_norm_forward_cuda(x.view(), w.view(), float(kEps), x.view(), r.view(), stream());
    ctx.check(same_bytes(x.raw(), y.raw()), label("rms_norm", xs, t) + ": y written over x matches");
  }
}

// ==== SwiGLU ==========================================================================================

TK_TEST(cuda_norm_swiglu_forward_backward) {
  if (!available()) return;
  const int64_t sizes[] = {1, 7, 15, 16, 17, 97, 257, 1025, 97 * 257, 257 * 1025};
  for (DType t : kTypes)
    for (int64_t n : sizes)
      for (int64_t offset : {0, 1}) run_swiglu(ctx, n, t, offset);
}

TK_TEST(cuda_norm_swiglu_extreme_gates) {
  if (!available()) return;
  // Finite gates of any size: no overflow in sigmoid, silu -> 0 on the left and -> g on the right.
  const std::vector<double> g = {-3e38, -1e30, -1e4, -1000, -104, -100, -89, -88, -87, -80, -20, -1.5, -1e-30,
                                 0,     1e-30, 1e-3, 1,     20,   80,   87,  88,  89,  100, 1e4, 1e30, 3e38};
  const int64_t n = int64_t(g.size());
  for (DType t : kTypes) {
    Dev bg({n}, t), bu({n}, t), bd({n}, t), out({n}, t), dg({n}, t), du({n}, t);
    bg.set(g);
    bu.set(std::vector<double>(g.size(), 1.0));
    bd.set(std::vector<double>(g.size(), 1.0));
    swiglu_forward_cuda(bg.view(), bu.view(), out.view(), stream());
    swiglu_backward_cuda(bd.view(), bg.view(), bu.view(), dg.view(), du.view(), stream());
    const std::vector<double> gv = bg.values(), ones(g.size(), 1.0);
    const std::vector<double> o = out.values(), want = ref::swiglu_forward(gv, ones);
    const ref::SwigluBackward b = ref::swiglu_backward(ones, gv, ones);
    const std::vector<double> dgv = dg.values(), duv = du.values();
    bool ok = true;
    std::string bad;
    for (size_t i = 0; i < g.size(); ++i) {
      // Relative error 2^-7 (bf16) / 1e-5 (f32), or an absolute error below 1e-30.
      const double rel = t == DType::F32 ? 1e-5 : 1.0 / 128;
      auto close = [&](double a, double w) {
        return std::isfinite(a) && (std::fabs(a - w) <= rel * std::fabs(w) || std::fabs(a - w) < 1e-30);
      };
      if (!close(o[i], want[i]) || !close(duv[i], b.dup[i]) || !close(dgv[i], b.dgate[i])) {
        ok = false;
        char buf[160];
        std::snprintf(buf, sizeof buf, " g=%.9g: out %.6g (want %.6g) dgate %.6g (%.6g) dup %.6g (%.6g);", gv[i], o[i],
                      want[i], dgv[i], b.dgate[i], duv[i], b.dup[i]);
        bad += buf;
      }
    }
    ctx.check(ok, label("swiglu extreme gates", {n}, t) + bad);
    ctx.check(out.intact() && dg.intact() && du.intact(), label("swiglu extreme gates", {n}, t) + ": guards");
  }
}

// ==== embedding =======================================================================================

TK_TEST(cuda_norm_embedding_forward_backward) {
  if (!available()) return;
  // (N, V): single lookups, every id repeated (V = 1), some repeats, more ids than rows.
  const int64_t cases[][2] = {{1, 257}, {7, 1}, {97, 97}, {257, 1}, {257, 97}, {1031, 50}};
  for (DType t : kTypes) {
    for (auto& c : cases)
      for (int64_t D : {1, 97, 257, 1025, 4096}) run_embedding(ctx, c[0], c[1], D, t);
    run_embedding(ctx, 97, 31, 1024, t, 1);  // misaligned rows: the scalar paths
  }
}

TK_TEST(cuda_norm_embedding_bad_ids) {
  if (!available()) return;
  // Ids outside [0, V) are not checked on the host: the forward row is NaN, the backward pass
  // skips it, and nothing outside the tensors is touched.
  const int64_t V = 97, D = 33, N = 5;
  for (DType t : kTypes)
    for (int32_t bad : {97, -1, 1 << 30}) {
      Dev ids({N}, DType::I32), table({V, D}, t), out({N, D}, t), dout({N, D}, t), dtable({V, D}, DType::F32);
      std::vector<int32_t> idv = {0, 10, 20, bad, 40};
      ids.set_bytes(idv.data());
      const std::vector<double> tv = randomize(table, t, 21);
      std::vector<double> dv = randomize(dout, t, 22);
      embedding_forward_cuda(ids.view(), table.view(), out.view(), stream());
      embedding_backward_cuda(dout.view(), ids.view(), dtable.view(), stream());
      const std::vector<double> o = out.values();
      bool ok = true;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) {
          const double v = o[size_t(n * D + d)];
          ok = ok && (n == 3 ? std::isnan(v) : v == tv[size_t(idv[size_t(n)] * D + d)]);
        }
      const std::string what = std::string("embedding ") + dtype_name(t) + " with id " + std::to_string(bad);
      ctx.check(ok, what + ": fwd gives a NaN row for the bad id, the table rows for the others");
      std::vector<int32_t> good = idv;
      good[3] = 0;
      for (int64_t d = 0; d < D; ++d) dv[size_t(3 * D + d)] = 0.0;  // row 3 contributes nothing
      ctx.check_nmse(what + ": bwd skips the bad id", dtable.values(), ref::embedding_backward(dv, good, V, D), 0.0);
      ctx.check(out.intact() && dtable.intact(), what + ": guard bytes");
    }
}

// ==== RoPE ============================================================================================

TK_TEST(cuda_norm_rope_forward_backward) {
  if (!available()) return;
  RopeScaling yarn;
  yarn.type = RopeScaling::Yarn;
  yarn.factor = 4.0f;
  yarn.original_max_position_embeddings = 4096;
  const RopeScaling none;
  int k = 0;
  for (DType dt : kTypes)
    for (bool per_batch : {false, true})
      for (int64_t T : {1, 97})
        for (int64_t H : {1, 3})
          for (int64_t D : {2, 64, 128, 130})
            for (int64_t offset : {0, 1}) {
              const bool use_yarn = (k++ % 2) == 1;
              const RopeFrequencies fr = rope_inv_freq(D, use_yarn ? 10000.0 : 500000.0, use_yarn ? yarn : none, 0);
              const int64_t B = 2;
              const Shape shape = {B, T, H, D};
              Dev x(shape, dt, offset), out(shape, dt, offset), dx(shape, dt, offset);
              const Shape ps = per_batch ? Shape{B, T} : Shape{T};
              Dev pos(ps, DType::I32);
              std::vector<int32_t> pv(size_t(numel(ps)));
              for (int64_t b = 0; b < (per_batch ? B : 1); ++b)
                for (int64_t t = 0; t < T; ++t)
                  pv[size_t(b * T + t)] = b == 0 ? int32_t(t < 40 ? t : t - 40) : int32_t(70000 + 2 * t);
              pos.set_bytes(pv.data());
              randomize(x, dt, uint64_t(1000 + k));
              Host hx(shape, dt), hpos(ps, DType::I32);
              const std::vector<uint8_t> xr = x.raw();
              std::memcpy(hx.mem.data(), xr.data(), xr.size());
              std::memcpy(hpos.mem.data(), pv.data(), pv.size() * 4);
              rope_forward_cuda(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, out.view(), stream());
              rope_backward_cuda(x.view(), pos.view(), per_batch, fr.inv_freq, fr.attention_factor, dx.view(), stream());
              for (bool backward : {false, true}) {
                const std::vector<double> want =
                    backward ? ref::rope_backward(hx.view(), hpos.view(), per_batch, fr.inv_freq, fr.attention_factor)
                             : ref::rope_forward(hx.view(), hpos.view(), per_batch, fr.inv_freq, fr.attention_factor);
                const std::string what = std::string(backward ? "rope_backward " : "rope_forward ") + dtype_name(dt) +
                                         " " + shape_str(shape) + (per_batch ? " per-batch" : " shared") +
                                         " positions" + (use_yarn ? ", yarn" : "") + (offset ? ", offset" : "");
                const std::vector<double> got = (backward ? dx : out).values();
                if (dt == DType::F32) {
                  ctx.check_nmse(what, got, want, 1e-11);
                } else {
                  ctx.check_nmse(what + " vs exact", got, want, 1.0 / 65536);
                  std::vector<double> rounded(want.size());
                  std::vector<uint8_t> tmp(want.size() * 2);
                  from_double(want, tmp.data(), DType::BF16);
                  rounded = to_double(tmp.data(), DType::BF16, want.size());
                  ctx.check_nmse(what + " vs exact rounded to bf16", got, rounded, 1e-7);
                }
                ctx.check((backward ? dx : out).intact(), what + ": guard bytes");
              }
            }
}

TK_TEST(cuda_norm_rope_inverse_and_in_place) {
  if (!available()) return;
  RopeScaling yarn;
  yarn.type = RopeScaling::Yarn;
  yarn.factor = 16.0f;
  yarn.original_max_position_embeddings = 4096;
  const RopeFrequencies fr = rope_inv_freq(130, 10000.0, yarn, 0);
  const Shape shape = {2, 97, 3, 130};
  for (DType t : kTypes) {
    Dev x(shape, t), out(shape, t), back(shape, t), pos({97}, DType::I32);
    std::vector<int32_t> pv(97);
    for (int i = 0; i < 97; ++i) pv[size_t(i)] = 3 * i;
    pos.set_bytes(pv.data());
    const std::vector<double> xv = randomize(x, t, 77);
    rope_forward_cuda(x.view(), pos.view(), false, fr.inv_freq, fr.attention_factor, out.view(), stream());
    rope_backward_cuda(out.view(), pos.view(), false, fr.inv_freq, fr.attention_factor, back.view(), stream());
    const double af2 = double(fr.attention_factor) * double(fr.attention_factor);
    std::vector<double> want(xv.size());
    for (size_t i = 0; i < xv.size(); ++i) want[i] = af2 * xv[i];
    ctx.check_nmse(label("rope backward(forward(x)) = af^2 x", shape, t), back.values(), want,
                   t == DType::F32 ? 1e-11 : 2e-5);
    rope_forward_cuda(x.view(), pos.view(), false, fr.inv_freq, fr.attention_factor, x.view(), stream());
    ctx.check(same_bytes(x.raw(), out.raw()), label("rope in place", shape, t) + ": same bytes as out of place");
  }
}

// ==== errors ==========================================================================================

TK_TEST(cuda_norm_rejects_bad_arguments) {
  if (!available()) return;
  std::string msg;
  Dev x({4, 8}, DType::F32), wb({8}, DType::BF16), y({4, 8}, DType::F32), r({4}, DType::F32);
  ctx.check(throws_with([&] { rms_norm_forward_cuda(x.view(), wb.view(), 1e-6f, y.view(), r.view(), stream()); },
                        "weight", &msg),
            "rms: weight dtype: " + msg);
  std::vector<float> host(32);
  const TensorView cpu = make_view(host.data(), DType::F32, Device{}, {4, 8});
  ctx.check(throws_with([&] { rms_norm_forward_cuda(cpu, wb.view(), 1e-6f, y.view(), r.view(), stream()); },
                        "expected cuda", &msg),
            "rms: cpu tensor: " + msg);
  Dev g({10}, DType::F32), o({10}, DType::F32);
  ctx.check(throws_with([&] { swiglu_backward_cuda(g.view(), g.view(), g.view(), o.view(), o.view(), stream()); },
                        "dgate and dup", &msg),
            "swiglu bwd: aliased outputs: " + msg);
  Dev big({1, 1, 1, 2050}, DType::F32), pos({1}, DType::I32);
  const std::vector<float> freq(1025, 1.0f);
  ctx.check(throws_with([&] { rope_forward_cuda(big.view(), pos.view(), false, freq, 1.0f, big.view(), stream()); },
                        "limit", &msg),
            "rope: head dim above the limit: " + msg);
  ctx.check(x.intact() && y.intact() && o.intact(), "rejected calls write nothing");
}

// ==== perf ============================================================================================

TK_TEST(cuda_norm_perf) {
  if (!available()) return;
  const cudaStream_t s = test_stream();
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  // Seconds per call, the median of 5 timings of 10 calls each, after a warm-up call.
  auto time = [&](const std::function<void()>& fn) {
    fn();
    std::vector<float> ms;
    for (int rep = 0; rep < 5; ++rep) {
      check(cudaEventRecord(start, s), "cudaEventRecord");
      for (int i = 0; i < 10; ++i) fn();
      check(cudaEventRecord(stop, s), "cudaEventRecord");
      check(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float t = 0;
      check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
      ms.push_back(t / 10);
    }
    std::sort(ms.begin(), ms.end());
    return double(ms[2]) * 1e-3;
  };
  auto device = [](size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    return std::unique_ptr<void, void (*)(void*)>(p, [](void* q) { cudaFree(q); });
  };
  auto view = [](void* p, DType t, const Shape& shape) { return make_view(p, t, Device{DeviceType::CUDA, 0}, shape); };
  auto report = [](const char* what, double bytes, double sec) {
    std::printf("  %-58s %8.1f us  %7.1f GB/s\n", what, sec * 1e6, bytes / sec * 1e-9);
  };
  const DType bf = DType::BF16;

  {  // the copy bandwidth: read + write of 512 MiB
    const size_t bytes = size_t(512) << 20;
    auto a = device(bytes), b = device(bytes);
    check(cudaMemsetAsync(a.get(), 0, bytes, s), "cudaMemsetAsync");
    const double sec = time([&] { check(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync"); });
    report("cudaMemcpy device to device, 512 MiB (read + write)", 2.0 * double(bytes), sec);
  }
  {  // RMSNorm, bf16 [16384, 4096]
    const int64_t N = 16384, D = 4096;
    auto x = device(size_t(N * D) * 2), y = device(size_t(N * D) * 2), dy = device(size_t(N * D) * 2);
    auto w = device(size_t(D) * 2), r = device(size_t(N) * 4), dw = device(size_t(D) * 4);
    randn_cuda(view(x.get(), bf, {N, D}), 1, 0.0f, 1.0f, stream());
    randn_cuda(view(dy.get(), bf, {N, D}), 2, 0.0f, 1.0f, stream());
    randn_cuda(view(w.get(), bf, {D}), 3, 1.0f, 0.1f, stream());
    const TensorView xv = view(x.get(), bf, {N, D}), yv = view(y.get(), bf, {N, D}), dyv = view(dy.get(), bf, {N, D});
    const TensorView wv = view(w.get(), bf, {D}), rv = view(r.get(), DType::F32, {N}), dwv = view(dw.get(), DType::F32, {D});
    double sec = time([&] { rms_norm_forward_cuda(xv, wv, 1e-6f, yv, rv, stream()); });
    report("rms_norm fwd bf16 [16384, 4096] (x in, y out)", 4.0 * double(N * D), sec);
    sec = time([&] { rms_norm_backward_cuda(dyv, xv, wv, rv, yv, dwv, stream()); });
    report("rms_norm bwd bf16 [16384, 4096] (x, dy in, dx out)", 6.0 * double(N * D), sec);
  }
  {  // RoPE, bf16 [4, 4096, 32, 128], shared positions
    const int64_t B = 4, T = 4096, H = 32, D = 128;
    const int64_t n = B * T * H * D;
    auto x = device(size_t(n) * 2), o = device(size_t(n) * 2), p = device(size_t(T) * 4);
    std::vector<int32_t> pv(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) pv[size_t(t)] = int32_t(t);
    check(cudaMemcpyAsync(p.get(), pv.data(), pv.size() * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
    randn_cuda(view(x.get(), bf, {n}), 4, 0.0f, 1.0f, stream());
    const RopeFrequencies fr = rope_inv_freq(D, 500000.0, RopeScaling{}, 0);
    const TensorView xv = view(x.get(), bf, {B, T, H, D}), ov = view(o.get(), bf, {B, T, H, D});
    const TensorView pv_ = view(p.get(), DType::I32, {T});
    double sec = time([&] { rope_forward_cuda(xv, pv_, false, fr.inv_freq, fr.attention_factor, ov, stream()); });
    report("rope fwd bf16 [4, 4096, 32, 128] (x in, out out)", 4.0 * double(n), sec);
    sec = time([&] { rope_forward_cuda(xv, pv_, false, fr.inv_freq, fr.attention_factor, xv, stream()); });
    report("rope fwd bf16 [4, 4096, 32, 128] in place", 4.0 * double(n), sec);
  }
  {  // SwiGLU, bf16 [8192 x 11008]
    const int64_t n = int64_t(8192) * 11008;
    auto g = device(size_t(n) * 2), u = device(size_t(n) * 2), o = device(size_t(n) * 2);
    auto dg = device(size_t(n) * 2), du = device(size_t(n) * 2);
    randn_cuda(view(g.get(), bf, {n}), 5, 0.0f, 2.0f, stream());
    randn_cuda(view(u.get(), bf, {n}), 6, 0.0f, 1.0f, stream());
    const TensorView gv = view(g.get(), bf, {n}), uv = view(u.get(), bf, {n}), ov = view(o.get(), bf, {n});
    const TensorView dgv = view(dg.get(), bf, {n}), duv = view(du.get(), bf, {n});
    double sec = time([&] { swiglu_forward_cuda(gv, uv, ov, stream()); });
    report("swiglu fwd bf16 [8192 x 11008] (gate, up in, out out)", 6.0 * double(n), sec);
    sec = time([&] { swiglu_backward_cuda(ov, gv, uv, dgv, duv, stream()); });
    report("swiglu bwd bf16 [8192 x 11008] (3 in, 2 out)", 10.0 * double(n), sec);
  }
  check(cudaEventDestroy(start), "cudaEventDestroy");
  check(cudaEventDestroy(stop), "cudaEventDestroy");
  ctx.check(true, "cuda norm perf ran");
}
