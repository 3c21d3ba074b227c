// Tests of the CUDA loss kernels (cuda/loss_kernels.h: cross entropy, sequence log-probabilities,
// DPO, distillation; cuda/linear_loss_kernels.h: the fused chunked linear cross entropy and linear
// distillation) against the double references of native/ref.
//
// Every test returns at once when no CUDA device is usable (tk::test::cuda::available()).
//
// Shapes are odd: V in {17, 1025, 2049, 32003} (17 and 1025 run the warp-per-row kernels, 2049 and
// 32003 the block-per-row ones; odd V puts most rows at unaligned addresses, so the element-wise
// head, the 4-element vector body and the tail all run; V = 1 and 3 have no vector body), N in
// {1, 7, 97}, about 20% of the
// targets ignore_index. Outputs live in device buffers with 256 guard bytes on both sides (a known
// pattern, checked after every call). The reference gets the very values the kernel read (bf16
// inputs are rounded first and widened).
//
// Tolerances (NMSE), after DESIGN.md: a small multiple of the error of a naive kernel of the same
// precision. Each case also runs a naive host kernel -- fp32 arithmetic, two-pass log-sum-exp summed
// in order, outputs rounded to the output dtype exactly as the device rounds them (for the linear
// losses also the logits as fp32 dot products and, with a bf16 head, the logit gradient rounded to
// bf16 before the gradient products, as the device does) -- measures its NMSE against the same
// reference, and holds the device to max(4 x that, 1e-10). 1e-10 is the fp32 bound of the CPU
// suite (cpu/loss, cpu/distill, cpu/linear_loss tests): fp32 outputs from sums of thousands of
// terms can sit that far from the double reference while bf16 outputs sit at ~1e-6, so a wrong
// formula, a dropped term or a row counted twice cannot pass either bound. For bf16 outputs the
// naive kernel's error is the output rounding (<= 2^-16), and the device's is the same rounding of
// nearly the same fp32 values.
// Exact properties are checked bitwise: fused == forward + backward, dlogits written over the
// logits == a separate output, two runs of the same call == each other (determinism: per-row
// values and fixed-order reductions, no float atomics), forward-only linear calls == the full call.
// DPO is computed in double on the device and held to 1e-12, like the CPU.
//
// The linear losses need cuBLASLt: in a build without it, the tests assert that both calls throw
// the clear "no cuBLASLt" tk::Error before writing anything.
// --perf: issue 8 (d). Linear cross entropy at N = 8192, D = 4096, V = 128256 bf16, forward +
// backward with the head frozen (LoRA SFT: dhidden only) and trained (dhidden and dweight): median
// time, and the bytes the call needs beyond its inputs (its outputs plus the scratch, whose size
// is both planned and measured as the caching allocator's peak). Beside it the
// materialized path at its most frugal, built from tunekit's own kernels: the bf16 [N, V] logits
// by a cuBLASLt GEMM, the fused cross entropy writing dlogits over them in place, then dhidden
// (and dweight) by GEMMs; its bytes are the logits plus the same outputs and its scratch.
// (PyTorch's materialized cross entropy, which also upcasts the logits to fp32 as HF's loss does,
// is measured by bench/torch_cuda_kernels.py.) Each case ends with a "perf-json {...}" line.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/cuda/device.h"
#include "native/cuda/gemm_kernels.h"
#include "native/cuda/linear_loss_kernels.h"
#include "native/cuda/loss_kernels.h"
#include "native/ref/distill_ref.h"
#include "native/ref/linear_loss_ref.h"
#include "native/ref/loss_ref.h"
#include "native/tests/cuda/cuda_test.h"
#include "native/tests/harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

constexpr int32_t kIgnore = kDefaultIgnoreIndex;
constexpr double kFloor = 1e-10;        // the CPU suite's fp32 bound
constexpr double kNaiveMultiple = 4.0;  // device error <= 4 x the naive same-precision kernel's
constexpr double kInf = std::numeric_limits<double>::infinity();

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

void cu(cudaError_t e, const char* what) { tk::test::cuda::check(e, what); }

cudaStream_t test_stream() {
  static cudaStream_t s = [] {
    cudaStream_t st = nullptr;
    cu(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return st;
  }();
  return s;
}

void sync() { cu(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

// A contiguous device tensor with kGuard pattern bytes on both sides.
class DBuf {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  DBuf(Shape s, DType t) : shape(std::move(s)), dtype(t), bytes_(size_t(numel(shape)) * dtype_size(t)) {
    cu(cudaMalloc(&base_, bytes_ + 2 * kGuard), "cudaMalloc");
    cu(cudaMemset(base_, kPattern, bytes_ + 2 * kGuard), "cudaMemset");
    sync();
  }
  ~DBuf() { cudaFree(base_); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(const DBuf&) = delete;

  Shape shape;
  DType dtype;
  int64_t n() const { return numel(shape); }
  void* data() const { return static_cast<char*>(base_) + kGuard; }
  TensorView view() const { return make_view(data(), dtype, Device{DeviceType::CUDA, 0}, shape); }
  void set(const std::vector<double>& v) {
    std::vector<uint8_t> host(bytes_);
    from_double(v, host.data(), dtype);
    set_bytes(host.data());
  }
  void set_ids(const std::vector<int32_t>& v) { set_bytes(v.data()); }
  void set_bytes(const void* p) {
    sync();
    cu(cudaMemcpy(data(), p, bytes_, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    sync();
  }
  void fill(unsigned char b) {
    sync();
    cu(cudaMemset(data(), b, bytes_), "cudaMemset");
    sync();
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> host(bytes_);
    sync();
    cu(cudaMemcpy(host.data(), data(), bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }
  std::vector<double> values() const {
    std::vector<uint8_t> h = raw();
    return to_double(h.data(), dtype, size_t(n()));
  }
  bool intact() const {
    std::vector<uint8_t> g(kGuard);
    sync();
    for (size_t off : {size_t(0), kGuard + bytes_}) {
      cu(cudaMemcpy(g.data(), static_cast<char*>(base_) + off, kGuard, cudaMemcpyDeviceToHost), "cudaMemcpy guard");
      for (uint8_t b : g)
        if (b != kPattern) return false;
    }
    return true;
  }

 private:
  void* base_ = nullptr;
  size_t bytes_;
};

bool same_bits(const DBuf& a, const DBuf& b) { return a.raw() == b.raw(); }

// The values a buffer of dtype t holds after storing v (bf16: rounded to nearest even).
std::vector<double> rounded(const std::vector<double>& v, DType t) {
  std::vector<uint8_t> host(v.size() * dtype_size(t));
  from_double(v, host.data(), t);
  return to_double(host.data(), t, v.size());
}

float round_to(float x, DType t) { return t == DType::BF16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

std::vector<double> scaled(const std::vector<double>& v, double s) {
  std::vector<double> r(v);
  for (double& x : r) x *= s;
  return r;
}

// Targets uniform in [0, V), each ignore_index with probability `ignored`.
std::vector<int32_t> random_targets(int64_t N, int64_t V, uint64_t seed, double ignored) {
  std::vector<double> u = uniform(size_t(N), seed, 0, double(V)), w = uniform(size_t(N), seed + 1, 0, 1);
  std::vector<int32_t> y(static_cast<size_t>(N));
  for (size_t i = 0; i < y.size(); ++i)
    y[i] = w[i] < ignored ? kIgnore : int32_t(std::min<double>(std::floor(u[i]), double(V - 1)));
  return y;
}

int64_t count_valid(const std::vector<int32_t>& y) {
  int64_t c = 0;
  for (int32_t t : y) c += t != kIgnore;
  return c;
}

std::vector<double> randn_scaled(size_t n, uint64_t seed, double scale) { return scaled(randn(n, seed), scale); }

// Device NMSE against the reference, held to max(kNaiveMultiple x the naive kernel's, kFloor);
// where the reference is all zero, the largest |got| must be <= 1e-6.
bool check_vs(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
              const std::vector<double>& naive) {
  bool zero = true;
  for (double r : ref) zero = zero && std::fabs(r) <= 1e-12;
  if (zero) {
    double mx = 0;
    for (double g : got) mx = std::isnan(g) ? kInf : std::max(mx, std::fabs(g));
    char buf[96];
    std::snprintf(buf, sizeof buf, ": zero reference, max |got| %.3e (tol 1e-6)", mx);
    return ctx.check(got.size() == ref.size() && mx <= 1e-6, what + buf);
  }
  const double tol = std::max(kNaiveMultiple * nmse(naive, ref), kFloor);
  return ctx.check_nmse(what, got, ref, tol);
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

// Runs a test body, turning an unexpected exception into a failure instead of ending the binary.
void guarded(Context& ctx, const std::string& what, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    ctx.check(false, what + ": unexpected exception: " + e.what());
  }
}

TensorView none() { return TensorView{}; }

// ================================ naive fp32 kernels (the tolerance yardstick) ======================

// Two-pass log-sum-exp of a row in fp32, summed in order.
float naive_lse(const double* x, int64_t V) {
  float m = -INFINITY;
  for (int64_t v = 0; v < V; ++v) m = std::max(m, float(x[v]));
  if (m == -INFINITY) return m;
  float s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(float(x[v]) - m);
  return m + std::log(s);
}

struct NaiveCe {
  std::vector<double> losses, lse, grad;
};

// Cross entropy rows in fp32; row n's gradient scale is g[n] (0 for ignored rows), gradients
// rounded to gdt.
NaiveCe naive_ce(const std::vector<double>& x, const std::vector<int32_t>& y, int64_t N, int64_t V,
                 const std::vector<float>& g, DType gdt) {
  NaiveCe r{std::vector<double>(size_t(N)), std::vector<double>(size_t(N)), std::vector<double>(size_t(N * V))};
  for (int64_t n = 0; n < N; ++n) {
    if (y[size_t(n)] == kIgnore) continue;
    const double* row = x.data() + n * V;
    const float lse = naive_lse(row, V), s = g[size_t(n)];
    r.lse[size_t(n)] = lse;
    r.losses[size_t(n)] = lse - float(row[y[size_t(n)]]);
    for (int64_t v = 0; v < V; ++v) {
      float e = std::exp(float(row[v]) - lse) * s;
      if (v == y[size_t(n)]) e -= s;
      r.grad[size_t(n * V + v)] = round_to(e, gdt);
    }
  }
  return r;
}

// One distillation row in fp32 (cpu/distill.h's formulas, two-pass, summed in order): returns D
// and, with g set, writes c (A - B K).
float naive_kd_row(const double* s, const double* t, int64_t V, DistillKind kind, float T, float beta, float c,
                   float* g) {
  if (kind == DistillKind::Jsd && beta == 0.0f) kind = DistillKind::ForwardKl;
  if (kind == DistillKind::Jsd && beta == 1.0f) kind = DistillKind::ReverseKl;
  const float inv_t = 1.0f / T;
  const size_t nv = static_cast<size_t>(V);
  std::vector<float> zs(nv), zt(nv), A(nv), B(nv);
  float ms = -INFINITY, mt = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    zs[size_t(v)] = float(s[v]) * inv_t;
    zt[size_t(v)] = float(t[v]) * inv_t;
    ms = std::max(ms, zs[size_t(v)]);
    mt = std::max(mt, zt[size_t(v)]);
  }
  float ss = 0, st = 0;
  for (int64_t v = 0; v < V; ++v) ss += std::exp(zs[size_t(v)] - ms), st += std::exp(zt[size_t(v)] - mt);
  const float ls = std::log(ss), lt = std::log(st);
  float D = 0, Kj = 0;
  for (int64_t v = 0; v < V; ++v) {
    const float lq = (zs[size_t(v)] - ms) - ls, lp = (zt[size_t(v)] - mt) - lt;
    const float q = std::exp(zs[size_t(v)] - ms) / ss, p = std::exp(zt[size_t(v)] - mt) / st;
    float term;
    if (kind == DistillKind::ForwardKl) {
      term = p * (lp - lq);
      A[size_t(v)] = q, B[size_t(v)] = p;
    } else if (kind == DistillKind::ReverseKl) {
      term = q * (lq - lp);
      A[size_t(v)] = term, B[size_t(v)] = q;
    } else {
      const float a = lp + std::log(beta), b = lq + std::log1p(-beta);
      const float hi = std::max(a, b), lo = std::min(a, b);
      const float lm = hi + std::log1p(std::exp(lo - hi));
      const float gq = (1 - beta) * q * (lq - lm);
      term = beta * p * (lp - lm) + gq;
      A[size_t(v)] = gq, B[size_t(v)] = q;
      Kj += gq;
    }
    D += term;
  }
  const float K = kind == DistillKind::ForwardKl ? 1.0f : (kind == DistillKind::ReverseKl ? D : Kj);
  if (g)
    for (int64_t v = 0; v < V; ++v) g[v] = c * (A[size_t(v)] - B[size_t(v)] * K);
  return D;
}

struct NaiveKd {
  std::vector<double> losses, grad;
  double loss = 0;
};

NaiveKd naive_kd(const std::vector<double>& s, const std::vector<double>& t, const std::vector<int32_t>& y, int64_t N,
                 int64_t V, const DistillParams& p, double dloss, DType gdt) {
  NaiveKd r{std::vector<double>(size_t(N)), std::vector<double>(size_t(N * V)), 0};
  int64_t counted = 0;
  for (int64_t n = 0; n < N; ++n) counted += y.empty() || y[size_t(n)] != p.ignore_index;
  const float c = counted ? float(dloss * p.temperature / double(counted)) : 0.0f;
  std::vector<float> g(static_cast<size_t>(V));
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (!y.empty() && y[size_t(n)] == p.ignore_index) continue;
    const float D = naive_kd_row(s.data() + n * V, t.data() + n * V, V, p.kind, p.temperature, p.beta, c, g.data());
    r.losses[size_t(n)] = p.temperature * p.temperature * D;
    sum += r.losses[size_t(n)];
    for (int64_t v = 0; v < V; ++v) r.grad[size_t(n * V + v)] = round_to(g[size_t(v)], gdt);
  }
  r.loss = counted ? sum / double(counted) : 0.0;
  return r;
}

// The naive fused linear loss: fp32 logits (dot products in order), fp32 rows, G rounded to the
// head's dtype (as the device feeds it to the gradient GEMMs), fp32 gradient sums rounded to dt.
struct NaiveLinear {
  std::vector<double> losses, dhidden, dweight;
  double loss = 0;
};

// alpha < 0: cross entropy alone with `reduction`; otherwise alpha CE + (1 - alpha) KD (means).
NaiveLinear naive_linear(const std::vector<double>& h, const std::vector<double>& w, const std::vector<double>& th,
                         const std::vector<double>& tw, const std::vector<int32_t>& y, int64_t N, int64_t D,
                         int64_t Dt, int64_t V, DType dt, double alpha, LossReduction reduction,
                         const DistillParams& p, double dloss) {
  NaiveLinear r{std::vector<double>(size_t(N)), std::vector<double>(size_t(N * D)), std::vector<double>(size_t(V * D)),
                0};
  const bool ce_only = alpha < 0;
  const bool ce = ce_only || alpha > 0, kd = !ce_only && alpha < 1;
  int64_t counted = 0;
  for (int64_t n = 0; n < N; ++n) counted += y.empty() || y[size_t(n)] != kIgnore;
  const double wce = ce_only ? 1.0 : alpha, wkd = 1.0 - alpha;
  const bool mean = !ce_only || reduction == LossReduction::Mean;
  const float ce_scale = counted ? float(dloss * wce / (mean ? double(counted) : 1.0)) : 0.0f;
  const float kd_c = counted ? float(dloss * wkd * p.temperature / double(counted)) : 0.0f;
  std::vector<double> srow(static_cast<size_t>(V)), trow(static_cast<size_t>(V));
  std::vector<float> G(size_t(N * V), 0.0f), gk(static_cast<size_t>(V));
  double sce = 0, skd = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (!y.empty() && y[size_t(n)] == kIgnore) continue;
    for (int64_t v = 0; v < V; ++v) {
      float a = 0, b = 0;
      for (int64_t k = 0; k < D; ++k) a += float(h[size_t(n * D + k)]) * float(w[size_t(v * D + k)]);
      srow[size_t(v)] = a;
      if (kd) {
        for (int64_t k = 0; k < Dt; ++k) b += float(th[size_t(n * Dt + k)]) * float(tw[size_t(v * Dt + k)]);
        trow[size_t(v)] = b;
      }
    }
    double row_loss = 0;
    float* g = G.data() + n * V;
    if (ce) {
      const float lse = naive_lse(srow.data(), V);
      const float l = lse - float(srow[size_t(y[size_t(n)])]);
      sce += l;
      row_loss += wce * l;
      for (int64_t v = 0; v < V; ++v) {
        float e = std::exp(float(srow[size_t(v)]) - lse) * ce_scale;
        if (v == y[size_t(n)]) e -= ce_scale;
        g[v] = e;
      }
    }
    if (kd) {
      const float Dv = naive_kd_row(srow.data(), trow.data(), V, p.kind, p.temperature, p.beta, kd_c, gk.data());
      const float l = p.temperature * p.temperature * Dv;
      skd += l;
      row_loss += wkd * l;
      for (int64_t v = 0; v < V; ++v) g[v] = ce ? gk[size_t(v)] + g[v] : gk[size_t(v)];
    }
    r.losses[size_t(n)] = float(row_loss);
    for (int64_t v = 0; v < V; ++v) g[v] = round_to(g[v], dt);
  }
  if (counted || !mean) {
    double total = 0;
    if (ce) total += wce * (mean ? sce / double(counted) : sce);
    if (kd) total += wkd * skd / double(counted);
    r.loss = total;
  }
  for (int64_t n = 0; n < N; ++n) {
    if (!y.empty() && y[size_t(n)] == kIgnore) continue;
    for (int64_t k = 0; k < D; ++k) {
      float a = 0;
      for (int64_t v = 0; v < V; ++v) a += G[size_t(n * V + v)] * float(w[size_t(v * D + k)]);
      r.dhidden[size_t(n * D + k)] = round_to(a, dt);
    }
  }
  for (int64_t v = 0; v < V; ++v)
    for (int64_t k = 0; k < D; ++k) {
      float a = 0;
      for (int64_t n = 0; n < N; ++n)
        if (y.empty() || y[size_t(n)] != kIgnore) a += G[size_t(n * V + v)] * float(h[size_t(n * D + k)]);
      r.dweight[size_t(v * D + k)] = round_to(a, dt);
    }
  return r;
}

// ================================ cross entropy cases ===============================================

const DType kTypes[] = {DType::F32, DType::BF16};
const LossReduction kReductions[] = {LossReduction::None, LossReduction::Sum, LossReduction::Mean};

// One cross entropy case (logits x, targets y): every reduction, forward / backward / fused against
// the reference; fused == forward + backward bitwise; `extras`: fused in place and a second run.
void run_ce_case(Context& ctx, const std::string& name, const Shape& shape, DType t, const std::vector<double>& x,
                 const std::vector<int32_t>& y, bool extras) {
  const int64_t V = shape.back(), N = numel(shape) / V;
  DBuf logits(shape, t), targets({N}, DType::I32);
  logits.set(x);
  targets.set_ids(y);
  const std::vector<double> xv = logits.values();
  const int64_t valid = count_valid(y);
  const ref::CrossEntropyForward rf = ref::cross_entropy_forward(xv, y, N, V, kIgnore, LossReduction::Sum);
  const std::vector<double> unit = ref::cross_entropy_backward(xv, y, N, V, kIgnore, LossReduction::Sum, {1.0});
  const std::vector<double> dl_rows = randn(size_t(N), 77 + uint64_t(N));
  DBuf dlr({N}, DType::F32), dl1({1}, DType::F32), dlc({N}, DType::F32);
  dlr.set(dl_rows);
  const double dscalar = 0.7;
  dl1.set({dscalar});
  dlc.set(std::vector<double>(size_t(N), dscalar));
  const std::vector<double> dlrv = dlr.values();
  const std::vector<double> ref_none = ref::cross_entropy_backward(xv, y, N, V, kIgnore, LossReduction::None, dlrv);
  // naive fp32 kernels for the tolerances
  const size_t nr = static_cast<size_t>(N);
  std::vector<float> g_one(nr), g_rows(nr), g_mean(nr);
  const float fmean = valid ? float(dscalar / double(valid)) : 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    g_one[size_t(n)] = float(dscalar);
    g_rows[size_t(n)] = float(dlrv[size_t(n)]);
    g_mean[size_t(n)] = fmean;
  }
  const NaiveCe n_sum = naive_ce(xv, y, N, V, g_one, t), n_rows = naive_ce(xv, y, N, V, g_rows, t),
                n_mean = naive_ce(xv, y, N, V, g_mean, t);
  double naive_total = 0;
  for (double l : n_sum.losses) naive_total += l;

  for (LossReduction r : kReductions) {
    const std::string what = name + " " + dtype_name(t) + " " + reduction_name(r);
    DBuf losses({N}, DType::F32), lse({N}, DType::F32), loss({1}, DType::F32), d1(shape, t);
    DBuf l2({N}, DType::F32), s2({N}, DType::F32), o2({1}, DType::F32), d2(shape, t);
    d1.fill(0x7f);
    d2.fill(0x7f);
    cross_entropy_forward_cuda(logits.view(), targets.view(), kIgnore, r, losses.view(), lse.view(), loss.view(),
                               test_stream());
    check_vs(ctx, what + " fwd losses", losses.values(), rf.losses, n_sum.losses);
    check_vs(ctx, what + " fwd lse", lse.values(), rf.lse, n_sum.lse);
    if (r != LossReduction::None) {
      const bool mean = r == LossReduction::Mean;
      const double want = mean ? (valid ? rf.loss / double(valid) : 0.0) : rf.loss;
      const double naive = mean ? (valid ? naive_total / double(valid) : 0.0) : naive_total;
      check_vs(ctx, what + " fwd loss", loss.values(), {want}, {naive});
    }
    const DBuf& dl = r == LossReduction::None ? dlr : dl1;
    cross_entropy_backward_cuda(logits.view(), targets.view(), lse.view(), dl.view(), kIgnore, r, d1.view(),
                                test_stream());
    if (r == LossReduction::None)
      check_vs(ctx, what + " bwd dlogits", d1.values(), ref_none, n_rows.grad);
    else if (r == LossReduction::Sum)
      check_vs(ctx, what + " bwd dlogits", d1.values(), scaled(unit, dscalar), n_sum.grad);
    else
      check_vs(ctx, what + " bwd dlogits", d1.values(), scaled(unit, valid ? dscalar / double(valid) : 0.0),
               n_mean.grad);

    cross_entropy_fused_cuda(logits.view(), targets.view(), kIgnore, r, float(dscalar), l2.view(), s2.view(),
                             o2.view(), d2.view(), test_stream());
    ctx.check(same_bits(l2, losses) && same_bits(s2, lse) && (r == LossReduction::None || same_bits(o2, loss)),
              what + " fused: forward outputs equal the forward kernel's bitwise");
    if (r == LossReduction::None) {  // the scalar dloss goes to every row: the backward with a constant vector
      DBuf d3(shape, t);
      cross_entropy_backward_cuda(logits.view(), targets.view(), lse.view(), dlc.view(), kIgnore, r, d3.view(),
                                  test_stream());
      ctx.check(same_bits(d2, d3), what + " fused dlogits equal the backward kernel's bitwise");
    } else {
      ctx.check(same_bits(d2, d1), what + " fused dlogits equal the backward kernel's bitwise");
    }
    ctx.check(losses.intact() && lse.intact() && loss.intact() && d1.intact() && d2.intact() && l2.intact() &&
                  s2.intact() && o2.intact(),
              what + ": guard bytes");
    if (!extras || r != LossReduction::Mean) continue;
    // determinism: a second run gives the same bytes; in place: dlogits over the logits
    DBuf l3({N}, DType::F32), s3({N}, DType::F32), o3({1}, DType::F32), d3(shape, t), ip(shape, t);
    cross_entropy_fused_cuda(logits.view(), targets.view(), kIgnore, r, float(dscalar), l3.view(), s3.view(),
                             o3.view(), d3.view(), test_stream());
    ctx.check(same_bits(d3, d2) && same_bits(l3, l2) && same_bits(s3, s2) && same_bits(o3, o2),
              what + ": a second run gives the same bytes");
    ip.set(xv);
    cross_entropy_fused_cuda(ip.view(), targets.view(), kIgnore, r, float(dscalar), l3.view(), s3.view(), o3.view(),
                             ip.view(), test_stream());
    ctx.check(same_bits(ip, d2) && same_bits(o3, o2) && ip.intact(), what + ": fused dlogits over the logits");
    ip.set(xv);
    cross_entropy_backward_cuda(ip.view(), targets.view(), lse.view(), dl1.view(), kIgnore, r, ip.view(),
                                test_stream());
    ctx.check(same_bits(ip, d1), what + ": backward dlogits over the logits");
  }
}

}  // namespace

// ==== cross entropy ===================================================================================

TK_TEST(cuda_cross_entropy) {
  if (!tk::test::cuda::available()) return;
  const int64_t rows[] = {1, 7, 97};
  const int64_t cols[] = {1, 3, 17, 1025, 2049, 32003};  // 1, 3: no vector body at all
  for (DType t : kTypes)
    for (int64_t N : rows)
      for (int64_t V : cols) {
        const std::string name = "cuda cross_entropy " + shape_str({N, V});
        guarded(ctx, name, [&] {
          run_ce_case(ctx, name, {N, V}, t, randn_scaled(size_t(N * V), 100 + uint64_t(N * 131 + V), 3.0),
                      random_targets(N, V, 200 + uint64_t(N + V), 0.2), N == 7);
        });
      }
  // rank 3: [2, 5, 257] is 10 rows
  guarded(ctx, "rank 3", [&] {
    for (DType t : kTypes)
      run_ce_case(ctx, "cuda cross_entropy [2, 5, 257]", {2, 5, 257}, t, randn_scaled(2570, 31, 2.0),
                  random_targets(10, 257, 32, 0.2), true);
  });
}

TK_TEST(cuda_cross_entropy_extreme_logits) {
  if (!tk::test::cuda::available()) return;
  // +-1e4 clusters, an ascending ramp (the running max grows everywhere), the max in the tail,
  // masked (-inf) vocabulary, all-large rows, the max first; targets on -1e4 and on the max.
  for (int64_t V : {int64_t(1025), int64_t(4099)}) {
    const int64_t N = 6;
    std::vector<double> x(size_t(N * V));
    const std::vector<double> z = randn(x.size(), 9);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t v = 0; v < V; ++v) {
        double& e = x[size_t(n * V + v)];
        const double r = z[size_t(n * V + v)];
        switch (n) {
          case 0: e = (v % 3 == 0) ? 1e4 : (v % 3 == 1 ? -1e4 : r); break;
          case 1: e = -1e4 + 2e4 * double(v) / double(V - 1); break;
          case 2: e = v == V - 1 ? 1e4 : -1e4 + r; break;
          case 3: e = v % 5 == 0 ? -kInf : 3 * r; break;
          case 4: e = 1e4 + r; break;
          case 5: e = v == 0 ? 1e4 : -1e4; break;
        }
      }
    const std::vector<int32_t> y = {1, 0, int32_t(V - 1), 7, 500, 3};
    for (DType t : kTypes)
      guarded(ctx, "extreme", [&] {
        run_ce_case(ctx, "cuda cross_entropy extreme " + shape_str({N, V}), {N, V}, t, x, y, false);
      });
  }
}

TK_TEST(cuda_cross_entropy_all_ignored_nan_bad_target) {
  if (!tk::test::cuda::available()) return;
  guarded(ctx, "cross_entropy special rows", [&] {
    // No row counts: mean 0 (not NaN), zero gradients; a custom ignore_index inside [0, V).
    for (int32_t ignore : {kIgnore, 0})
      for (DType t : kTypes)
        for (int64_t V : {int64_t(97), int64_t(3001)}) {
          const int64_t N = 7;
          DBuf logits({N, V}, t), targets({N}, DType::I32), losses({N}, DType::F32), lse({N}, DType::F32);
          DBuf loss({1}, DType::F32), d({N, V}, t);
          logits.set(randn(size_t(N * V), 5));
          targets.set_ids(std::vector<int32_t>(size_t(N), ignore));
          d.fill(0x7f);
          loss.fill(0x7f);
          cross_entropy_fused_cuda(logits.view(), targets.view(), ignore, LossReduction::Mean, 1.0f, losses.view(),
                                   lse.view(), loss.view(), d.view(), test_stream());
          const std::vector<double> zN(size_t(N), 0.0), zNV(size_t(N * V), 0.0);
          ctx.check(losses.values() == zN && lse.values() == zN && d.values() == zNV && loss.values()[0] == 0.0 &&
                        d.intact() && loss.intact(),
                    std::string("cuda cross_entropy all ignored (ignore_index ") + std::to_string(ignore) + ") " +
                        dtype_name(t) + " V " + std::to_string(V) + ": zeros");
        }
    // A NaN or +inf logit makes its row NaN; a target out of range (which the device cannot reject
    // without a host wait) makes its row NaN; other rows are unaffected.
    for (DType t : kTypes)
      for (int64_t V : {int64_t(97), int64_t(3001)}) {
        const int64_t N = 4;
        DBuf logits({N, V}, t), targets({N}, DType::I32), losses({N}, DType::F32), lse({N}, DType::F32);
        DBuf loss({1}, DType::F32), d({N, V}, t);
        std::vector<double> x = randn(size_t(N * V), 11);
        x[size_t(0 * V + 50)] = std::numeric_limits<double>::quiet_NaN();
        x[size_t(1 * V + V - 1)] = kInf;
        logits.set(x);
        targets.set_ids({3, 3, 3, int32_t(V)});
        cross_entropy_fused_cuda(logits.view(), targets.view(), kIgnore, LossReduction::None, 1.0f, losses.view(),
                                 lse.view(), loss.view(), d.view(), test_stream());
        const std::vector<double> l = losses.values(), dv = d.values();
        const bool ok = std::isnan(l[0]) && std::isnan(l[1]) && std::isfinite(l[2]) && std::isnan(l[3]) &&
                        std::isnan(dv[0]) && std::isnan(dv[size_t(V + 5)]) && std::isfinite(dv[size_t(2 * V + 5)]) &&
                        std::isnan(dv[size_t(3 * V + 5)]);
        ctx.check(ok && d.intact(), std::string("cuda cross_entropy NaN / +inf / bad-target rows ") + dtype_name(t) +
                                        " V " + std::to_string(V));
      }
  });
}

// ==== sequence log-probabilities ===================================================================

TK_TEST(cuda_sequence_logprobs) {
  if (!tk::test::cuda::available()) return;
  const int64_t shapes[][3] = {{1, 1, 17}, {3, 7, 17}, {3, 7, 1025}, {2, 5, 32003}};
  for (DType t : kTypes)
    for (auto& sh : shapes) {
      const int64_t B = sh[0], T = sh[1], V = sh[2];
      const std::string what = "cuda sequence_logprobs " + shape_str({B, T, V}) + " " + dtype_name(t);
      guarded(ctx, what, [&] {
        DBuf logits({B, T, V}, t), targets({B, T}, DType::I32), dout({B}, DType::F32);
        logits.set(randn_scaled(size_t(B * T * V), 300 + uint64_t(B * T + V), 2.0));
        std::vector<int32_t> y = random_targets(B * T, V, 400 + uint64_t(V), 0.2);
        if (B > 1)
          for (int64_t i = 0; i < T; ++i) y[size_t(i)] = kIgnore;  // sequence 0 fully masked: sum 0
        targets.set_ids(y);
        dout.set(randn(size_t(B), 500));
        const std::vector<double> xv = logits.values(), dv = dout.values();
        const std::vector<double> want = ref::sequence_logprobs(xv, y, B, T, V, kIgnore);
        const std::vector<double> dwant = ref::sequence_logprobs_backward(xv, y, B, T, V, kIgnore, dv);
        std::vector<float> g(size_t(B * T));
        for (int64_t i = 0; i < B * T; ++i) g[size_t(i)] = -float(dv[size_t(i / T)]);
        const NaiveCe nv = naive_ce(xv, y, B * T, V, g, t);
        std::vector<double> nout(size_t(B), 0.0);
        for (int64_t i = 0; i < B * T; ++i) nout[size_t(i / T)] -= nv.losses[size_t(i)];
        DBuf out({B}, DType::F32), lse({B, T}, DType::F32), d({B, T, V}, t), out2({B}, DType::F32);
        d.fill(0x7f);
        sequence_logprobs_forward_cuda(logits.view(), targets.view(), kIgnore, out.view(), lse.view(), test_stream());
        sequence_logprobs_backward_cuda(logits.view(), targets.view(), lse.view(), dout.view(), kIgnore, d.view(),
                                        test_stream());
        check_vs(ctx, what + " fwd", out.values(), want, nout);
        check_vs(ctx, what + " bwd dlogits", d.values(), dwant, nv.grad);
        sequence_logprobs_forward_cuda(logits.view(), targets.view(), kIgnore, out2.view(), lse.view(), test_stream());
        ctx.check(same_bits(out, out2), what + ": a second run gives the same bytes");
        ctx.check(out.intact() && lse.intact() && d.intact(), what + ": guard bytes");
      });
    }
}

// ==== DPO ==========================================================================================

TK_TEST(cuda_dpo) {
  if (!tk::test::cuda::available()) return;
  guarded(ctx, "cuda dpo", [&] {
    const int64_t B = 97;
    std::vector<double> pc = randn(B, 601), pr = randn(B, 602), rc = randn(B, 603), rr = randn(B, 604);
    for (int64_t b = 0; b < B; ++b) {
      pc[size_t(b)] = -40 + 10 * pc[size_t(b)];
      pr[size_t(b)] = -45 + 10 * pr[size_t(b)];
      rc[size_t(b)] = pc[size_t(b)] + 2 * rc[size_t(b)];
      rr[size_t(b)] = pr[size_t(b)] + 2 * rr[size_t(b)];
    }
    pc[0] = -1e4, pr[0] = -10, rc[0] = -10, rr[0] = -1e4;  // |beta z| ~ 1e3..1e4
    DBuf bpc({B}, DType::F32), bpr({B}, DType::F32), brc({B}, DType::F32), brr({B}, DType::F32), dout({B}, DType::F32);
    bpc.set(pc), bpr.set(pr), brc.set(rc), brr.set(rr);
    dout.set(randn(B, 605));
    pc = bpc.values(), pr = bpr.values(), rc = brc.values(), rr = brr.values();
    const std::vector<double> dv = dout.values();
    for (DpoKind kind : {DpoKind::Sigmoid, DpoKind::Ipo, DpoKind::Hinge})
      for (double ls : {0.0, 0.1})
        for (double beta : {0.1, 0.5}) {
          DpoParams p;
          p.beta = float(beta);
          p.kind = kind;
          p.label_smoothing = float(ls);
          char w[96];
          std::snprintf(w, sizeof w, "cuda dpo %s beta %.1f ls %.1f", dpo_kind_name(kind), beta, ls);
          const std::string what = w;
          DBuf l({B}, DType::F32), cr({B}, DType::F32), rj({B}, DType::F32), gc({B}, DType::F32), gr({B}, DType::F32);
          dpo_loss_forward_cuda(bpc.view(), bpr.view(), brc.view(), brr.view(), p, l.view(), cr.view(), rj.view(),
                                test_stream());
          dpo_loss_backward_cuda(bpc.view(), bpr.view(), brc.view(), brr.view(), p, dout.view(), gc.view(), gr.view(),
                                 test_stream());
          const double fb = p.beta, fls = kind == DpoKind::Sigmoid ? double(p.label_smoothing) : 0.0;
          const ref::DpoForward f = ref::dpo_loss(pc, pr, rc, rr, fb, kind, fls);
          const ref::DpoBackward g = ref::dpo_loss_backward(pc, pr, rc, rr, fb, kind, fls, dv);
          ctx.check_nmse(what + " losses", l.values(), f.losses, 1e-12);
          ctx.check_nmse(what + " chosen_rewards", cr.values(), f.chosen_rewards, 1e-12);
          ctx.check_nmse(what + " rejected_rewards", rj.values(), f.rejected_rewards, 1e-12);
          ctx.check_nmse(what + " d_policy_chosen", gc.values(), g.d_policy_chosen, 1e-12);
          ctx.check_nmse(what + " d_policy_rejected", gr.values(), g.d_policy_rejected, 1e-12);
          bool finite = true;
          for (double v : l.values()) finite = finite && std::isfinite(v);
          ctx.check(finite, what + ": finite losses at |beta z| ~ 1e3");
          ctx.check(l.intact() && cr.intact() && rj.intact() && gc.intact() && gr.intact(), what + ": guard bytes");
        }
  });
}

// ==== distillation =================================================================================

namespace {

struct KindCase {
  DistillKind kind;
  float beta;
  const char* name;
};
const KindCase kKinds[] = {{DistillKind::ForwardKl, 0.5f, "forward_kl"},
                           {DistillKind::ReverseKl, 0.5f, "reverse_kl"},
                           {DistillKind::Jsd, 0.5f, "jsd(0.5)"},
                           {DistillKind::Jsd, 0.1f, "jsd(0.1)"},
                           {DistillKind::Jsd, 0.0f, "jsd(0)"},
                           {DistillKind::Jsd, 1.0f, "jsd(1)"}};

void run_distill_case(Context& ctx, int64_t N, int64_t V, DType sdt, DType tdt, const KindCase& kc, float T,
                      bool masked, bool extras, uint64_t seed) {
  char name[160];
  std::snprintf(name, sizeof name, "cuda distill %s T %.0f [%lld, %lld] student %s teacher %s %s", kc.name, T,
                (long long)N, (long long)V, dtype_name(sdt), dtype_name(tdt), masked ? "masked" : "all rows");
  const std::string what = name;
  DBuf s({N, V}, sdt), t({N, V}, tdt), y({N}, DType::I32), dloss({1}, DType::F32);
  s.set(randn_scaled(size_t(N * V), seed, 2.0));
  std::vector<double> tv = randn_scaled(size_t(N * V), seed + 1, 2.0), sv0 = s.values();
  for (size_t i = 0; i < tv.size(); ++i) tv[i] = 0.6 * sv0[i] + tv[i];  // correlated teacher
  t.set(tv);
  const std::vector<int32_t> yv = masked ? random_targets(N, V, seed + 2, 0.2) : std::vector<int32_t>{};
  if (masked) y.set_ids(yv);
  const double dl = 0.7;
  dloss.set({dl});
  const TensorView yview = masked ? y.view() : none();
  DistillParams p;
  p.kind = kc.kind;
  p.temperature = T;
  p.beta = kc.beta;
  p.ignore_index = kIgnore;
  const std::vector<double> sv = s.values(), tvv = t.values();
  const ref::DistillForward rf = ref::distill_forward(sv, tvv, yv, N, V, kc.kind, T, kc.beta, kIgnore);
  const std::vector<double> rg = ref::distill_backward(sv, tvv, yv, N, V, kc.kind, T, kc.beta, kIgnore, dl);
  const NaiveKd nv = naive_kd(sv, tvv, yv, N, V, p, dl, sdt);

  DBuf losses({N}, DType::F32), loss({1}, DType::F32), d1({N, V}, sdt);
  DBuf l2({N}, DType::F32), o2({1}, DType::F32), d2({N, V}, sdt);
  d1.fill(0x7f);
  d2.fill(0x7f);
  distill_forward_cuda(s.view(), t.view(), yview, p, losses.view(), loss.view(), test_stream());
  distill_backward_cuda(s.view(), t.view(), yview, p, dloss.view(), d1.view(), test_stream());
  check_vs(ctx, what + " losses", losses.values(), rf.losses, nv.losses);
  check_vs(ctx, what + " loss", loss.values(), {rf.loss}, {nv.loss});
  check_vs(ctx, what + " dstudent", d1.values(), rg, nv.grad);
  distill_fused_cuda(s.view(), t.view(), yview, p, float(dl), l2.view(), o2.view(), d2.view(), test_stream());
  ctx.check(same_bits(l2, losses) && same_bits(o2, loss) && same_bits(d2, d1),
            what + ": fused equals forward + backward bitwise");
  ctx.check(losses.intact() && loss.intact() && d1.intact() && d2.intact() && l2.intact() && o2.intact(),
            what + ": guard bytes");
  if (!extras) return;
  DBuf l3({N}, DType::F32), o3({1}, DType::F32), d3({N, V}, sdt), ip({N, V}, sdt);
  distill_fused_cuda(s.view(), t.view(), yview, p, float(dl), l3.view(), o3.view(), d3.view(), test_stream());
  ctx.check(same_bits(l3, l2) && same_bits(o3, o2) && same_bits(d3, d2), what + ": a second run gives the same bytes");
  ip.set(sv);
  distill_fused_cuda(ip.view(), t.view(), yview, p, float(dl), l3.view(), o3.view(), ip.view(), test_stream());
  ctx.check(same_bits(ip, d2) && ip.intact(), what + ": dstudent over the student");
}

}  // namespace

TK_TEST(cuda_distill) {
  if (!tk::test::cuda::available()) return;
  uint64_t seed = 7000;
  const std::pair<DType, DType> dts[] = {
      {DType::F32, DType::F32}, {DType::BF16, DType::BF16}, {DType::BF16, DType::F32}, {DType::F32, DType::BF16}};
  for (const KindCase& kc : kKinds)
    for (float T : {1.0f, 2.0f})
      for (const auto& dt : dts)
        for (int64_t V : {int64_t(17), int64_t(1025), int64_t(32003)}) {
          const int64_t N = V == 32003 ? 7 : 97;
          const bool masked = (seed / 10) % 2 == 0;
          guarded(ctx, std::string("cuda distill ") + kc.name, [&] {
            run_distill_case(ctx, N, V, dt.first, dt.second, kc, T, masked, V == 1025 && T == 2.0f, seed += 10);
          });
        }
}

// ==== fused linear losses ==========================================================================

namespace {

std::vector<double> hidden_values(int64_t N, int64_t D, uint64_t seed) { return randn(size_t(N * D), seed); }
std::vector<double> weight_values(int64_t V, int64_t D, uint64_t seed) {
  return randn_scaled(size_t(V * D), seed, 2.5 / std::sqrt(double(D)));  // logits ~ N(0, 2.5^2)
}

// The clear error of a build without cuBLASLt, before anything is written.
void check_no_cublaslt(Context& ctx) {
  const int64_t N = 7, D = 33, V = 17;
  DBuf h({N, D}, DType::F32), w({V, D}, DType::F32), y({N}, DType::I32), loss({1}, DType::F32), losses({N}, DType::F32);
  h.set(hidden_values(N, D, 1));
  w.set(weight_values(V, D, 2));
  y.set_ids(random_targets(N, V, 3, 0.2));
  losses.fill(0x5a);
  const std::vector<uint8_t> before = losses.raw();
  std::string msg;
  LinearCrossEntropyParams p;
  ctx.check(throws_with([&] {
    linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), none(), none(),
                              test_stream());
  }, {"linear_cross_entropy_cuda", "no cuBLASLt"}, &msg) && losses.raw() == before,
            "linear_cross_entropy_cuda without cuBLASLt raises the cuBLASLt error, writes nothing: " + msg);
  LinearDistillParams dp;
  ctx.check(throws_with([&] {
    linear_distill_cuda(h.view(), w.view(), h.view(), w.view(), y.view(), dp, loss.view(), losses.view(), none(),
                        none(), test_stream());
  }, {"linear_distill_cuda", "no cuBLASLt"}, &msg) && losses.raw() == before,
            "linear_distill_cuda without cuBLASLt raises the cuBLASLt error, writes nothing: " + msg);
}

struct LinCase {
  int64_t N, D, V, chunk;
  LossReduction reduction;
  double ignored;
};

void run_linear_ce_case(Context& ctx, const LinCase& c, DType dt, uint64_t seed) {
  const int64_t N = c.N, D = c.D, V = c.V;
  char name[160];
  std::snprintf(name, sizeof name, "cuda linear_ce [N %lld, D %lld, V %lld] chunk %lld %s %s ignored %.0f%%",
                (long long)N, (long long)D, (long long)V, (long long)c.chunk, reduction_name(c.reduction),
                dtype_name(dt), 100 * c.ignored);
  const std::string what = name;
  DBuf h({N, D}, dt), w({V, D}, dt), y({N}, DType::I32);
  h.set(hidden_values(N, D, seed));
  w.set(weight_values(V, D, seed + 1));
  const std::vector<int32_t> yv = random_targets(N, V, seed + 2, c.ignored);
  y.set_ids(yv);
  const int64_t valid = count_valid(yv);
  const double dloss = 0.7;
  const std::vector<double> hv = h.values(), wv = w.values();
  const ref::LinearLoss rf = ref::linear_cross_entropy(hv, wv, yv, N, D, V, kIgnore, c.reduction, dloss);
  const NaiveLinear nv = naive_linear(hv, wv, {}, {}, yv, N, D, 0, V, dt, -1.0, c.reduction, DistillParams{}, dloss);

  DBuf loss({1}, DType::F32), losses({N}, DType::F32), dh({N, D}, dt), dw({V, D}, dt);
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
  linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), dw.view(),
                            test_stream());
  check_vs(ctx, what + " losses", losses.values(), rf.losses, nv.losses);
  check_vs(ctx, what + " loss", loss.values(), {rf.loss}, {nv.loss});
  check_vs(ctx, what + " dhidden", dh.values(), rf.dhidden, nv.dhidden);
  check_vs(ctx, what + " dweight", dw.values(), rf.dweight, nv.dweight);
  const int64_t want_rows = c.chunk > 0 ? std::min(c.chunk, valid) : st.chunk_rows;
  ctx.check(st.counted_rows == valid && st.chunk_rows == want_rows &&
                st.chunks == (valid ? (valid + want_rows - 1) / want_rows : 0) && (valid == 0 || st.scratch_bytes > 0),
            what + " stats: " + std::to_string(st.chunks) + " chunks of " + std::to_string(st.chunk_rows));
  ctx.check(loss.intact() && losses.intact() && dh.intact() && dw.intact(), what + ": guard bytes");

  // forward only, single gradients and a second run: the same bytes (the same arithmetic)
  DBuf loss2({1}, DType::F32), losses2({N}, DType::F32), dh2({N, D}, dt), dw2({V, D}, dt);
  p.stats = nullptr;
  linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), none(), none(),
                            test_stream());
  ctx.check(same_bits(loss2, loss) && same_bits(losses2, losses), what + " forward-only equals the full call");
  linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), dh2.view(), none(),
                            test_stream());
  linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), none(), dw2.view(),
                            test_stream());
  ctx.check(same_bits(dh2, dh) && same_bits(dw2, dw), what + " single-gradient calls equal the full call");
  linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss2.view(), losses2.view(), dh2.view(), dw2.view(),
                            test_stream());
  ctx.check(same_bits(dh2, dh) && same_bits(dw2, dw) && same_bits(loss2, loss) && same_bits(losses2, losses),
            what + ": a second run gives the same bytes");
  ctx.check(loss2.intact() && losses2.intact() && dh2.intact() && dw2.intact(), what + ": guard bytes (variants)");
}

void run_linear_distill_case(Context& ctx, int64_t N, int64_t Ds, int64_t Dt, int64_t V, DType sdt, DType tdt,
                             const KindCase& kc, float T, float alpha, bool targets, int64_t chunk, uint64_t seed) {
  char name[200];
  std::snprintf(name, sizeof name,
                "cuda linear_distill %s T %.0f alpha %.2f [N %lld, Ds %lld, Dt %lld, V %lld] %s/%s chunk %lld %s",
                kc.name, T, alpha, (long long)N, (long long)Ds, (long long)Dt, (long long)V, dtype_name(sdt),
                dtype_name(tdt), (long long)chunk, targets ? "targets" : "no targets");
  const std::string what = name;
  DBuf sh({N, Ds}, sdt), sw({V, Ds}, sdt), th({N, Dt}, tdt), tw({V, Dt}, tdt), y({N}, DType::I32);
  sh.set(hidden_values(N, Ds, seed));
  sw.set(weight_values(V, Ds, seed + 1));
  th.set(hidden_values(N, Dt, seed + 2));
  tw.set(weight_values(V, Dt, seed + 3));
  const std::vector<int32_t> yv = targets ? random_targets(N, V, seed + 4, 0.2) : std::vector<int32_t>{};
  if (targets) y.set_ids(yv);
  const TensorView yview = targets ? y.view() : none();
  const double dloss = 0.7;
  DistillParams dp;
  dp.kind = kc.kind;
  dp.temperature = T;
  dp.beta = kc.beta;
  dp.ignore_index = kIgnore;
  const std::vector<double> shv = sh.values(), swv = sw.values(), thv = th.values(), twv = tw.values();
  const ref::LinearLoss rf = ref::linear_distill(shv, swv, thv, twv, yv, N, Ds, Dt, V, kc.kind, T, kc.beta, kIgnore,
                                                 alpha, dloss);
  const NaiveLinear nv =
      naive_linear(shv, swv, thv, twv, yv, N, Ds, Dt, V, sdt, alpha, LossReduction::Mean, dp, dloss);
  DBuf loss({1}, DType::F32), losses({N}, DType::F32), dh({N, Ds}, sdt), dw({V, Ds}, sdt);
  losses.fill(0x7f);
  dh.fill(0x7f);
  dw.fill(0x7f);
  LinearDistillParams p;
  p.distill = dp;
  p.alpha = alpha;
  p.dloss = float(dloss);
  p.chunk_rows = chunk;
  linear_distill_cuda(sh.view(), sw.view(), th.view(), tw.view(), yview, p, loss.view(), losses.view(), dh.view(),
                      dw.view(), test_stream());
  check_vs(ctx, what + " losses", losses.values(), rf.losses, nv.losses);
  check_vs(ctx, what + " loss", loss.values(), {rf.loss}, {nv.loss});
  check_vs(ctx, what + " dstudent_hidden", dh.values(), rf.dhidden, nv.dhidden);
  check_vs(ctx, what + " dstudent_weight", dw.values(), rf.dweight, nv.dweight);
  DBuf loss2({1}, DType::F32), dh2({N, Ds}, sdt), dw2({V, Ds}, sdt);
  linear_distill_cuda(sh.view(), sw.view(), th.view(), tw.view(), yview, p, loss2.view(), none(), none(), none(),
                      test_stream());
  ctx.check(same_bits(loss2, loss), what + " forward-only loss equals the full call's");
  linear_distill_cuda(sh.view(), sw.view(), th.view(), tw.view(), yview, p, loss2.view(), none(), dh2.view(),
                      dw2.view(), test_stream());
  ctx.check(same_bits(dh2, dh) && same_bits(dw2, dw) && same_bits(loss2, loss),
            what + ": a second run gives the same bytes");
  ctx.check(loss.intact() && losses.intact() && dh.intact() && dw.intact() && loss2.intact() && dh2.intact() &&
                dw2.intact(),
            what + ": guard bytes");
}

}  // namespace

TK_TEST(cuda_linear_cross_entropy) {
  if (!tk::test::cuda::available()) return;
  if (!tk::cuda::has_cublaslt()) {
    guarded(ctx, "no cuBLASLt", [&] { check_no_cublaslt(ctx); });
    return;
  }
  const LossReduction kMean = LossReduction::Mean, kSum = LossReduction::Sum;
  const LinCase cases[] = {
      {1, 33, 17, 0, kMean, 0.0},       {7, 1, 1025, 0, kSum, 0.2},       {97, 33, 17, 10, kSum, 0.2},
      {97, 65, 1025, 16, kMean, 0.0},   {257, 33, 1025, 64, kMean, 0.2},  {97, 33, 32003, 40, kMean, 0.2},
      {257, 1, 17, 0, kMean, 0.2},      {7, 65, 32003, 0, kSum, 0.0},     {257, 65, 1025, 37, kSum, 0.0},
      {7, 33, 17, 0, kMean, 1.0},       {7, 65, 1, 3, kMean, 0.2},        {9, 17, 3, 0, kSum, 0.0},
      // ^ every row ignored; V = 1 (zero gradients) and V = 3 (no vector body)
  };
  uint64_t seed = 9000;
  for (const LinCase& c : cases)
    for (DType dt : kTypes)
      guarded(ctx, "cuda linear_ce", [&] { run_linear_ce_case(ctx, c, dt, seed += 10); });

  guarded(ctx, "cuda linear_ce bad target", [&] {
    // A target out of range is rejected with the CPU's error, before anything is written.
    const int64_t N = 9, D = 17, V = 33;
    DBuf h({N, D}, DType::F32), w({V, D}, DType::F32), y({N}, DType::I32), loss({1}, DType::F32),
        losses({N}, DType::F32), dh({N, D}, DType::F32);
    h.set(hidden_values(N, D, 1));
    w.set(weight_values(V, D, 2));
    std::vector<int32_t> yv = random_targets(N, V, 3, 0.2);
    yv[4] = int32_t(V);
    yv[6] = -5;
    y.set_ids(yv);
    losses.fill(0x5a);
    dh.fill(0x5a);
    const std::vector<uint8_t> lb = losses.raw(), hb = dh.raw();
    std::string msg;
    LinearCrossEntropyParams p;
    const std::string id = "targets[4] = " + std::to_string(V);
    ctx.check(throws_with([&] {
      linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(), none(),
                                test_stream());
    }, {"linear_cross_entropy_cuda", id.c_str(), "out of range"}, &msg) && losses.raw() == lb && dh.raw() == hb,
              "cuda linear_ce rejects the first bad target, writes nothing: " + msg);
  });
}

TK_TEST(cuda_linear_distill) {
  if (!tk::test::cuda::available()) return;
  if (!tk::cuda::has_cublaslt()) {
    guarded(ctx, "no cuBLASLt", [&] { check_no_cublaslt(ctx); });
    return;
  }
  uint64_t seed = 11000;
  const KindCase kinds[] = {kKinds[0], kKinds[1], kKinds[2]};
  for (const KindCase& kc : kinds)
    for (DType dt : kTypes)
      for (float alpha : {0.0f, 0.5f, 1.0f}) {
        seed += 10;
        const bool targets = alpha > 0 || seed % 20 == 0;  // alpha = 0: with and without targets
        guarded(ctx, "cuda linear_distill", [&] {
          run_linear_distill_case(ctx, 97, 33, 17, 1025, dt, dt, kc, 2.0f, alpha, targets, 16, seed);
        });
      }
  guarded(ctx, "cuda linear_distill shapes", [&] {
    // mixed dtypes (bf16 student, f32 teacher), automatic chunks, V = 17 and 32003
    run_linear_distill_case(ctx, 57, 33, 65, 17, DType::BF16, DType::F32, kKinds[2], 1.0f, 0.5f, true, 0, 12001);
    run_linear_distill_case(ctx, 7, 33, 17, 32003, DType::F32, DType::BF16, kKinds[0], 2.0f, 0.25f, true, 3, 12011);
    run_linear_distill_case(ctx, 31, 65, 33, 32003, DType::BF16, DType::BF16, kKinds[1], 1.0f, 0.0f, false, 0, 12021);
  });
}

// ==== argument checks ==============================================================================

TK_TEST(cuda_loss_rejects_bad_arguments) {
  if (!tk::test::cuda::available()) return;
  guarded(ctx, "cuda loss checks", [&] {
    std::string msg;
    const int64_t N = 4, V = 9;
    DBuf logits({N, V}, DType::F32), targets({N}, DType::I32), losses({N}, DType::F32), lse({N}, DType::F32);
    DBuf loss({1}, DType::F32), db({N, V}, DType::BF16), l3({3}, DType::F32), hl({N, V}, DType::F16);
    float host[N * V] = {};
    const TensorView cpu_logits = make_view(host, DType::F32, Device{}, {N, V});
    ctx.check(throws_with([&] {
      cross_entropy_forward_cuda(cpu_logits, targets.view(), kIgnore, LossReduction::Mean, losses.view(), lse.view(),
                                 loss.view(), test_stream());
    }, {"cross_entropy_forward_cuda", "logits", "cpu", "cuda"}, &msg), "ce: cpu logits: " + msg);
    ctx.check(throws_with([&] {
      cross_entropy_forward_cuda(logits.view(), targets.view(), kIgnore, LossReduction::None, l3.view(), lse.view(),
                                 loss.view(), test_stream());
    }, {"losses", "[3] f32", "4 elements"}, &msg), "ce: losses size: " + msg);
    ctx.check(throws_with([&] {
      cross_entropy_forward_cuda(hl.view(), targets.view(), kIgnore, LossReduction::None, losses.view(), lse.view(),
                                 loss.view(), test_stream());
    }, {"logits", "f16", "f32 or bf16"}, &msg), "ce: f16 logits: " + msg);
    ctx.check(throws_with([&] {
      cross_entropy_backward_cuda(logits.view(), targets.view(), lse.view(), loss.view(), kIgnore,
                                  LossReduction::Mean, db.view(), test_stream());
    }, {"dlogits", "bf16", "must match logits"}, &msg), "ce bwd: dlogits dtype: " + msg);
    DistillParams p;
    p.temperature = 0;
    ctx.check(throws_with([&] {
      distill_forward_cuda(logits.view(), logits.view(), none(), p, losses.view(), loss.view(), test_stream());
    }, {"distill_forward_cuda", "temperature"}, &msg), "distill: temperature 0: " + msg);
    DpoParams dpp;
    dpp.label_smoothing = 0.7f;
    ctx.check(throws_with([&] {
      dpo_loss_forward_cuda(losses.view(), losses.view(), losses.view(), losses.view(), dpp, lse.view(), lse.view(),
                            lse.view(), test_stream());
    }, {"dpo_loss_forward_cuda", "label_smoothing"}, &msg), "dpo: label smoothing: " + msg);
    LinearCrossEntropyParams lp;
    lp.reduction = LossReduction::None;
    DBuf w({V, N}, DType::F32), h({N, N}, DType::F32);
    ctx.check(throws_with([&] {
      linear_cross_entropy_cuda(h.view(), w.view(), targets.view(), lp, loss.view(), losses.view(), none(), none(),
                                test_stream());
    }, {"linear_cross_entropy_cuda", "reduction"}, &msg), "linear_ce: reduction none: " + msg);
    ctx.check(losses.intact() && lse.intact() && loss.intact(), "cuda loss checks: guard bytes");
  });
}

// ==== --perf =======================================================================================

namespace {
// Fills a large buffer with N(0, scale^2) values cheaply: one random block of up to 16M values,
// copied over the buffer as often as it takes.
void fill_tiled(DBuf& b, uint64_t seed, double scale) {
  const int64_t n = b.n(), m = std::min<int64_t>(n, int64_t(1) << 24);
  const size_t esz = dtype_size(b.dtype);
  std::vector<uint8_t> host(size_t(m) * esz);
  from_double(randn_scaled(size_t(m), seed, scale), host.data(), b.dtype);
  sync();
  for (int64_t i = 0; i < n; i += m) {
    const int64_t k = std::min(m, n - i);
    cu(cudaMemcpy(static_cast<char*>(b.data()) + size_t(i) * esz, host.data(), size_t(k) * esz,
                  cudaMemcpyHostToDevice),
       "cudaMemcpy H2D");
  }
  sync();
}
}  // namespace

TK_TEST(cuda_linear_cross_entropy_perf) {
  if (!ctx.opt.perf || !tk::test::cuda::available()) return;
  if (!tk::cuda::has_cublaslt()) {
    std::printf("  perf cuda linear_cross_entropy: skipped (this build has no cuBLASLt)\n");
    return;
  }
  guarded(ctx, "cuda linear_ce perf", [&] {
    const int64_t N = 8192, D = 4096, V = 128256;
    const DType dt = DType::BF16;
    const double mib = 1024.0 * 1024.0;
    DBuf h({N, D}, dt), w({V, D}, dt), y({N}, DType::I32), loss({1}, DType::F32), losses({N}, DType::F32);
    DBuf lse({N}, DType::F32), dh({N, D}, dt), dw({V, D}, dt), logits({N, V}, dt);
    fill_tiled(h, 1, 1.0);
    fill_tiled(w, 2, 2.5 / std::sqrt(double(D)));
    y.set_ids(random_targets(N, V, 3, 0.0));
    // Scratch comes from tunekit's caching allocator, and this test's buffers from plain cudaMalloc:
    // the allocator's peak over the timed calls, measured from a reset, is the calls' scratch peak.
    cudaEvent_t e0, e1;
    cu(cudaEventCreate(&e0), "cudaEventCreate");
    cu(cudaEventCreate(&e1), "cudaEventCreate");
    // Median ms of 5 timed calls after a warm-up, and the allocator's peak above its baseline over them.
    auto measure = [&](const std::function<void()>& fn, uint64_t& high) {
      fn();  // warm-up: cuBLASLt plans, the allocator's cache
      sync();
      const int64_t base = tk::cuda::allocator_stats(0).allocated_bytes;
      tk::cuda::reset_peak(0);
      std::vector<float> ms;
      for (int i = 0; i < 5; ++i) {
        cu(cudaEventRecord(e0, test_stream()), "cudaEventRecord");
        fn();
        cu(cudaEventRecord(e1, test_stream()), "cudaEventRecord");
        cu(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float t = 0;
        cu(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime");
        ms.push_back(t);
      }
      sync();
      high = uint64_t(tk::cuda::allocator_stats(0).peak_allocated_bytes - base);
      std::sort(ms.begin(), ms.end());
      return double(ms[ms.size() / 2]);
    };
    auto gemm = [&](bool ta, bool tb, int64_t M, int64_t Nn, int64_t K, const void* a, int64_t lda, const void* b,
                    int64_t ldb, void* c, int64_t ldc) {
      GemmParams p;
      p.M = M, p.N = Nn, p.K = K, p.ab_dtype = dt, p.c_dtype = dt;
      p.A = a, p.lda = lda, p.trans_a = ta, p.B = b, p.ldb = ldb, p.trans_b = tb, p.C = c, p.ldc = ldc;
      gemm_cuda(p, test_stream());
    };
    std::printf("  perf cuda linear_cross_entropy [N %lld, D %lld, V %lld] bf16 on %s (median of 5):\n", (long long)N,
                (long long)D, (long long)V, tk::cuda::device_props(0).name.c_str());
    for (bool train_head : {false, true}) {
      const char* head = train_head ? "trained" : "frozen";
      LinearLossStats st;
      LinearCrossEntropyParams p;
      p.stats = &st;
      uint64_t fused_high = 0, mat_high = 0;
      const double t_fused = measure([&] {
        linear_cross_entropy_cuda(h.view(), w.view(), y.view(), p, loss.view(), losses.view(), dh.view(),
                                  train_head ? dw.view() : none(), test_stream());
      }, fused_high);
      const double t_mat = measure([&] {
        gemm(false, true, N, V, D, h.data(), D, w.data(), D, logits.data(), V);  // logits = h W^T
        cross_entropy_fused_cuda(logits.view(), y.view(), kIgnore, LossReduction::Mean, 1.0f, losses.view(),
                                 lse.view(), loss.view(), logits.view(), test_stream());
        gemm(false, false, N, D, V, logits.data(), V, w.data(), D, dh.data(), D);  // dh = G W
        if (train_head) gemm(true, false, V, D, N, logits.data(), V, h.data(), D, dw.data(), D);  // dW = G^T h
      }, mat_high);
      // Bytes beyond the inputs (h, W, targets): the outputs every path writes, plus each path's own.
      const double outputs = double(N * D * 2 + (train_head ? V * D * 2 : 0) + N * 4 + 4);
      const double fused_bytes = outputs + double(fused_high);
      const double mat_bytes = outputs + double(N * V * 2 + N * 4) + double(mat_high);
      const double flop = (train_head ? 3.0 : 2.0) * 2.0 * double(N) * double(V) * double(D);
      std::printf("    head %-7s fused %8.2f ms (%4.0f TFLOP/s), %8.1f MiB beyond the inputs (%lld chunks of %lld rows, "
                  "scratch %.1f MiB planned, %.1f MiB allocator peak)\n",
                  head, t_fused, flop / (t_fused * 1e-3) / 1e12, fused_bytes / mib, (long long)st.chunks,
                  (long long)st.chunk_rows, double(st.scratch_bytes) / mib, double(fused_high) / mib);
      std::printf("    head %-7s materialized bf16 logits (GEMM, fused CE in place, GEMM%s) %8.2f ms (%4.0f TFLOP/s), "
                  "%8.1f MiB beyond the inputs\n",
                  head, train_head ? "s" : "", t_mat, flop / (t_mat * 1e-3) / 1e12, mat_bytes / mib);
      std::printf("    head %-7s fused / materialized: time %.3f, memory %.3f\n", head, t_fused / t_mat,
                  fused_bytes / mat_bytes);
      std::printf("    perf-json {\"test\":\"cuda_linear_ce\",\"N\":%lld,\"D\":%lld,\"V\":%lld,\"head\":\"%s\","
                  "\"fused_ms\":%.4f,\"fused_bytes\":%.0f,\"scratch_planned\":%lld,\"scratch_high\":%llu,"
                  "\"materialized_ms\":%.4f,\"materialized_bytes\":%.0f}\n",
                  (long long)N, (long long)D, (long long)V, head, t_fused, fused_bytes, (long long)st.scratch_bytes,
                  (unsigned long long)fused_high, t_mat, mat_bytes);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::printf("    (materialized fp32 logits, as HF's loss upcasts them, would be %.1f MiB, and as much again for "
                "their gradient)\n", double(N * V) * 4.0 / mib);
  });
}
