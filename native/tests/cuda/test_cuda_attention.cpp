// Tests of cuda/attention_kernels against ref/attention_ref (double), on the device.
//
// Shapes are odd (T, S in {1, 7, 97, 257}: no size is a multiple of the 64-row tensor-core tiles
// or the 32-row generic tiles), S > T (KV-cache alignment of the causal mask) and S < T (the
// first queries see no key), head layouts H/Hkv = 4/4 and 8/2 (grouped-query: dk/dv sum four query
// heads), D = 64 and 128 (tensor cores in bf16), 40 (the generic path in bf16), plus 8 and 160 (one
// and three 64-column output chunks of the generic path), causal and not, segment ids (one set,
// separate query/key sets, queries whose segment has no key), a custom scale, and B = 2.
// Every output lives in a guarded device buffer pre-filled with garbage.
//
// Tolerances (NMSE = sum (got - ref)^2 / sum ref^2 against the double reference computed from the
// same stored inputs):
// - bf16: a small multiple of the error of a naive bf16 kernel, computed here for each case: the
//   reference math in double from the same bf16 inputs, with bf16 rounding where a bf16 kernel
//   must round (P before P V, o on output; in the backward pass delta from the rounded o, P and
//   dS before their products, dq/dk/dv on output). The fused kernels round the same quantities
//   (P unnormalized, with an fp32 running max) and add only fp32 accumulation and ex2.approx
//   error (~1e-7 relative), so their error should be close to the naive one; kBf16Mult = 4 leaves
//   room for the different rounding points without hiding a real bug (a wrong mask, a dropped
//   tile or a misplaced fragment is an O(1) error). kBf16Floor covers cases where the naive error
//   is 0 (one visible key per query: o = v exactly).
// - f32 (generic CUDA-core path): fp32 throughout, expf/logf (<= 2 ulp), so the error is
//   ~1e-13 as on the CPU; o 1e-10, gradients 1e-9 (dp - delta cancels where dp ~ delta).
// - lse: 1e-9 (bf16 inputs: scores are exact products summed in fp32) and 1e-11 (f32), on finite
//   entries; -inf exactly where the reference has -inf, and those rows have o = 0 and dq = 0.
// - Where the reference gradient is identically 0 (every query sees one key), the mean square of
//   the result must stay under the tolerance instead.
// All tests return at once when no CUDA device is usable.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/core/tensor.h"
#include "native/cuda/attention_kernels.h"
#include "native/ref/attention_ref.h"
#include "native/tests/cuda/cuda_test.h"
#include "native/tests/harness.h"

using namespace tk;
using namespace tk::test;
using tk::test::cuda::DeviceBuffer;

namespace {

constexpr double kBf16Mult = 4.0;
constexpr double kBf16Floor = 1e-7;
constexpr double kF32TolO = 1e-10;
constexpr double kF32TolGrad = 1e-9;

bool correctness_mode(const Context& ctx) { return !ctx.opt.perf && !ctx.opt.grad; }

using Shape = std::vector<int64_t>;
int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}
const Device kCuda{DeviceType::CUDA, 0};

// Values as stored in `dtype` (bf16 rounding applied), as doubles.
std::vector<double> stored(const std::vector<double>& v, DType dtype) {
  std::vector<uint8_t> tmp(v.size() * dtype_size(dtype));
  from_double(v, tmp.data(), dtype);
  return to_double(tmp.data(), dtype, v.size());
}
double bf16_round(double x) { return double(bf16_to_f32(f32_to_bf16(float(x)))); }

// A device tensor with kGuard pattern bytes on both sides (overruns fail the test).
class GuardedDevice {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  GuardedDevice(Shape shape, DType dtype) : shape_(std::move(shape)), dtype_(dtype) {
    bytes_ = size_t(numel(shape_)) * dtype_size(dtype_);
    tk::test::cuda::check(cudaMalloc(&base_, bytes_ + 2 * kGuard), "cudaMalloc");
    tk::test::cuda::check(cudaMemset(base_, kPattern, bytes_ + 2 * kGuard), "cudaMemset");
    fill(0x7f);  // garbage (large finite values) where the kernels must write
  }
  ~GuardedDevice() { cudaFree(base_); }
  GuardedDevice(const GuardedDevice&) = delete;
  GuardedDevice& operator=(const GuardedDevice&) = delete;
  void* data() const { return static_cast<unsigned char*>(base_) + kGuard; }
  TensorView view() const { return make_view(data(), dtype_, kCuda, shape_); }
  void fill(unsigned char byte) {
    tk::test::cuda::check(cudaMemset(data(), byte, bytes_), "cudaMemset");
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> host(bytes_);
    tk::test::cuda::check(cudaDeviceSynchronize(), "kernel");
    tk::test::cuda::check(cudaMemcpy(host.data(), data(), bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }
  std::vector<double> values() const {
    std::vector<uint8_t> host = raw();
    return to_double(host.data(), dtype_, host.size() / dtype_size(dtype_));
  }
  bool intact() const {
    std::vector<uint8_t> g(kGuard);
    for (size_t at : {size_t(0), kGuard + bytes_}) {
      const unsigned char* src = static_cast<const unsigned char*>(base_) + at;
      tk::test::cuda::check(cudaMemcpy(g.data(), src, kGuard, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
      for (unsigned char x : g)
        if (x != kPattern) return false;
    }
    return true;
  }

 private:
  Shape shape_;
  DType dtype_;
  size_t bytes_ = 0;
  void* base_ = nullptr;
};

enum class Seg { None, Shared, Separate, Missing };

struct Case {
  int64_t B, T, S, H, Hkv, D;
  bool causal;
  Seg seg = Seg::None;
  float scale = 0.0f;  // 0: default 1/sqrt(D)
};

std::string describe_case(const Case& c, DType dt) {
  char buf[220], scale[32] = "";
  if (c.scale != 0.0f) std::snprintf(scale, sizeof scale, ", scale %g", double(c.scale));
  static const char* seg_names[] = {"", ", segments [B,T]", ", segments q/k", ", segments with keyless rows"};
  std::snprintf(buf, sizeof buf, "B=%lld T=%lld S=%lld H=%lld Hkv=%lld D=%lld %s%s%s %s", (long long)c.B,
                (long long)c.T, (long long)c.S, (long long)c.H, (long long)c.Hkv, (long long)c.D,
                c.causal ? "causal" : "non-causal", seg_names[int(c.seg)], scale, dtype_name(dt));
  return buf;
}

// Segment ids of n positions: documents of the given lengths, numbered from first_id (the last
// one runs to the end).
std::vector<int32_t> documents(int64_t n, const std::vector<int64_t>& lengths, int32_t first_id) {
  std::vector<int32_t> ids;
  int32_t id = first_id;
  for (int64_t len : lengths) {
    for (int64_t i = 0; i < len && int64_t(ids.size()) < n; ++i) ids.push_back(id);
    ++id;
  }
  while (int64_t(ids.size()) < n) ids.push_back(id - 1);
  return ids;
}

void make_segments(const Case& c, std::vector<int32_t>* sq, std::vector<int32_t>* sk) {
  sq->clear();
  sk->clear();
  for (int64_t b = 0; b < c.B; ++b) {
    // Three uneven documents, cut differently in each batch row; ids need not be sorted.
    const int32_t base = b % 2 == 0 ? int32_t(10 * b) : int32_t(100 - 10 * b);
    const std::vector<int64_t> cut = b % 2 == 0 ? std::vector<int64_t>{c.S * 3 / 7 + 1, c.S / 9 + 1, c.S}
                                                : std::vector<int64_t>{c.S / 11 + 2, c.S * 5 / 8, c.S};
    const std::vector<int32_t> keys = documents(c.S, cut, base);
    switch (c.seg) {
      case Seg::None: break;
      case Seg::Shared: sq->insert(sq->end(), keys.begin(), keys.end()); break;
      case Seg::Separate:  // queries are the last T positions, like the causal alignment
        sk->insert(sk->end(), keys.begin(), keys.end());
        sq->insert(sq->end(), keys.end() - c.T, keys.end());
        break;
      case Seg::Missing:  // queries cycle through the documents and an id (999) no key has
        sk->insert(sk->end(), keys.begin(), keys.end());
        for (int64_t t = 0; t < c.T; ++t) sq->push_back(t % 4 == 3 ? 999 : base + int32_t(t % 3));
        break;
    }
  }
}

// Inputs of one case on the device (as stored) and on the host (the same values as doubles).
struct Problem {
  Case c;
  DType dt;
  Shape qshape, kshape;
  std::vector<double> q, k, v, dout;
  std::vector<int32_t> sq, sk;
  std::unique_ptr<DeviceBuffer> dq_in, dk_in, dv_in, ddout, dsegq, dsegk;
  ref::AttentionShape shape;
  float scale = 1.0f;

  Problem(const Case& cs, DType t, uint64_t seed, double logit_scale = 1.0)
      : c(cs), dt(t), qshape{cs.B, cs.T, cs.H, cs.D}, kshape{cs.B, cs.S, cs.Hkv, cs.D} {
    std::vector<double> x = randn(size_t(numel(qshape)), seed);
    for (double& e : x) e *= logit_scale;
    q = stored(x, dt);
    k = stored(randn(size_t(numel(kshape)), seed + 1), dt);
    v = stored(randn(size_t(numel(kshape)), seed + 2), dt);
    dout = stored(randn(size_t(numel(qshape)), seed + 3), dt);
    dq_in.reset(new DeviceBuffer(q.size(), dt));
    dk_in.reset(new DeviceBuffer(k.size(), dt));
    dv_in.reset(new DeviceBuffer(v.size(), dt));
    ddout.reset(new DeviceBuffer(dout.size(), dt));
    dq_in->set(q);
    dk_in->set(k);
    dv_in->set(v);
    ddout->set(dout);
    make_segments(c, &sq, &sk);
    if (!sq.empty()) {
      dsegq.reset(new DeviceBuffer(sq.size(), DType::I32));
      dsegq->set_bytes(sq.data());
    }
    if (!sk.empty()) {
      dsegk.reset(new DeviceBuffer(sk.size(), DType::I32));
      dsegk->set_bytes(sk.data());
    }
    scale = c.scale != 0.0f ? c.scale : float(1.0 / std::sqrt(double(c.D)));
    shape.B = c.B, shape.T = c.T, shape.S = c.S, shape.H = c.H, shape.Hkv = c.Hkv, shape.D = c.D;
    shape.scale = double(scale);
    shape.causal = c.causal;
    shape.seg_q = sq.empty() ? nullptr : sq.data();
    shape.seg_k = sk.empty() ? shape.seg_q : sk.data();
  }
  AttentionOptions options() const {
    AttentionOptions o;
    o.causal = c.causal;
    o.scale = c.scale;
    return o;
  }
  TensorView qv() const { return make_view(dq_in->data(), dt, kCuda, qshape); }
  TensorView kv() const { return make_view(dk_in->data(), dt, kCuda, kshape); }
  TensorView vv() const { return make_view(dv_in->data(), dt, kCuda, kshape); }
  TensorView dov() const { return make_view(ddout->data(), dt, kCuda, qshape); }
  TensorView segq_view() const {
    return dsegq ? make_view(dsegq->data(), DType::I32, kCuda, {c.B, c.T}) : TensorView{};
  }
  TensorView segk_view() const {
    return dsegk ? make_view(dsegk->data(), DType::I32, kCuda, {c.B, c.S}) : TensorView{};
  }

  struct Out {
    GuardedDevice o, lse, dq, dk, dv;
  };
  std::unique_ptr<Out> make_out() const {
    return std::unique_ptr<Out>(new Out{GuardedDevice(qshape, dt), GuardedDevice({c.B, c.H, c.T}, DType::F32),
                                        GuardedDevice(qshape, dt), GuardedDevice(kshape, dt),
                                        GuardedDevice(kshape, dt)});
  }
  void forward(Out& r, cudaStream_t st) const {
    const TensorView sqv = segq_view(), skv = segk_view();
    attention_forward_cuda(qv(), kv(), vv(), dsegq ? &sqv : nullptr, dsegk ? &skv : nullptr, options(), r.o.view(),
                           r.lse.view(), st);
  }
  void backward(Out& r, cudaStream_t st) const {
    const TensorView sqv = segq_view(), skv = segk_view();
    attention_backward_cuda(dov(), qv(), kv(), vv(), r.o.view(), r.lse.view(), dsegq ? &sqv : nullptr,
                            dsegk ? &skv : nullptr, options(), r.dq.view(), r.dk.view(), r.dv.view(), st);
  }
  std::unique_ptr<Out> run(cudaStream_t st) const {
    std::unique_ptr<Out> r = make_out();
    forward(*r, st);
    backward(*r, st);
    tk::test::cuda::check(cudaStreamSynchronize(st), "attention kernels");
    return r;
  }

  // Query t of batch row b sees key s.
  bool visible(int64_t b, int64_t t, int64_t s) const {
    if (c.causal && s > t + (c.S - c.T)) return false;
    if (shape.seg_q && shape.seg_q[b * c.T + t] != shape.seg_k[b * c.S + s]) return false;
    return true;
  }

  // A naive bf16 kernel, emulated: the reference math in double from these (bf16) inputs, rounded
  // to bf16 where a bf16 kernel must round. Fills o, dq, dk, dv [same layouts as the outputs].
  void naive_bf16(std::vector<double>* o, std::vector<double>* dq, std::vector<double>* dk,
                  std::vector<double>* dv) const {
    const int64_t B = c.B, T = c.T, S = c.S, H = c.H, Hkv = c.Hkv, D = c.D, G = H / Hkv;
    o->assign(q.size(), 0.0);
    dq->assign(q.size(), 0.0);
    dk->assign(k.size(), 0.0);
    dv->assign(v.size(), 0.0);
    std::vector<double> p(static_cast<size_t>(S)), pb(p), dsb(p);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t g = h / G;
          const double* qr = &q[size_t(((b * T + t) * H + h) * D)];
          const double* dor = &dout[size_t(((b * T + t) * H + h) * D)];
          double mx = -std::numeric_limits<double>::infinity();
          for (int64_t s = 0; s < S; ++s) {
            p[size_t(s)] = -std::numeric_limits<double>::infinity();
            if (!visible(b, t, s)) continue;
            const double* kr = &k[size_t(((b * S + s) * Hkv + g) * D)];
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
            p[size_t(s)] = dot * double(scale);
            mx = std::max(mx, p[size_t(s)]);
          }
          if (mx == -std::numeric_limits<double>::infinity()) continue;  // no visible key: zeros
          double sum = 0.0;
          for (int64_t s = 0; s < S; ++s) sum += p[size_t(s)] = std::exp(p[size_t(s)] - mx);
          for (int64_t s = 0; s < S; ++s) {
            p[size_t(s)] /= sum;
            pb[size_t(s)] = bf16_round(p[size_t(s)]);
          }
          double* orow = &(*o)[size_t(((b * T + t) * H + h) * D)];
          for (int64_t s = 0; s < S; ++s) {
            const double* vr = &v[size_t(((b * S + s) * Hkv + g) * D)];
            for (int64_t d = 0; d < D; ++d) orow[d] += pb[size_t(s)] * vr[d];
          }
          for (int64_t d = 0; d < D; ++d) orow[d] = bf16_round(orow[d]);
          double delta = 0.0;
          for (int64_t d = 0; d < D; ++d) delta += dor[d] * orow[d];
          for (int64_t s = 0; s < S; ++s) {
            if (p[size_t(s)] == 0.0) {
              dsb[size_t(s)] = 0.0;
              continue;
            }
            const double* vr = &v[size_t(((b * S + s) * Hkv + g) * D)];
            double dp = 0.0;
            for (int64_t d = 0; d < D; ++d) dp += dor[d] * vr[d];
            dsb[size_t(s)] = bf16_round(p[size_t(s)] * (dp - delta) * double(scale));
          }
          double* dqr = &(*dq)[size_t(((b * T + t) * H + h) * D)];
          for (int64_t s = 0; s < S; ++s) {
            const size_t kofs = size_t(((b * S + s) * Hkv + g) * D);
            for (int64_t d = 0; d < D; ++d) {
              dqr[d] += dsb[size_t(s)] * k[kofs + size_t(d)];
              (*dk)[kofs + size_t(d)] += dsb[size_t(s)] * qr[d];
              (*dv)[kofs + size_t(d)] += pb[size_t(s)] * dor[d];
            }
          }
        }
    for (auto* x : {dq, dk, dv})
      for (double& e : *x) e = bf16_round(e);
  }
};

// NMSE, except where the reference is identically zero: there the mean square of `got` (inputs
// have unit variance) must stay under the tolerance.
void check_close(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                 double tol) {
  double den = 0.0, ms = 0.0;
  for (double w : want) den += w * w;
  if (den != 0.0 || got.size() != want.size()) {
    ctx.check_nmse(what, got, want, tol);
    return;
  }
  for (double g : got) ms += g * g;
  ms /= double(std::max<size_t>(1, got.size()));
  char buf[96];
  std::snprintf(buf, sizeof buf, ": reference is 0, mean square %.3e (tol %.1e)", ms, tol);
  ctx.check(ms <= tol, what + buf);
}

// Tolerance of a bf16 output: kBf16Mult times the naive bf16 kernel's NMSE (mean square when the
// reference is 0), at least kBf16Floor.
double bf16_tol(const std::vector<double>& naive, const std::vector<double>& want) {
  double den = 0.0;
  for (double w : want) den += w * w;
  double err;
  if (den != 0.0) {
    err = nmse(naive, want);
  } else {
    err = 0.0;
    for (double g : naive) err += g * g;
    err /= double(std::max<size_t>(1, naive.size()));
  }
  return std::max(kBf16Floor, kBf16Mult * err);
}

void check_lse(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
               double tol) {
  std::vector<double> g, w;
  bool inf_match = true;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool wi = std::isinf(want[i]), gi = std::isinf(got[i]) && got[i] < 0;
    if (wi != gi) inf_match = false;
    if (!wi) {
      g.push_back(got[i]);
      w.push_back(want[i]);
    }
  }
  ctx.check(inf_match, what + " lse: -inf exactly on rows with no visible key");
  if (!w.empty()) ctx.check_nmse(what + " lse", g, w, tol);
}

std::vector<Case> cases() {
  struct Heads {
    int64_t H, Hkv;
  };
  const Heads heads[] = {{4, 4}, {8, 2}};
  const int64_t dims[] = {64, 128, 40};
  const std::pair<int64_t, int64_t> lengths[] = {{1, 1}, {1, 7}, {7, 7}, {7, 97}, {97, 97},
                                                 {97, 257}, {257, 257}, {1, 257}, {97, 7}};
  std::vector<Case> r;
  int i = 0;
  for (auto ts : lengths)
    for (bool causal : {false, true}) {
      const Heads hd = heads[i % 2];
      r.push_back({i % 5 == 0 ? 2 : 1, ts.first, ts.second, hd.H, hd.Hkv, dims[(i / 2 + i) % 3], causal});
      ++i;
    }
  r.push_back({2, 257, 257, 8, 2, 64, true, Seg::Shared});
  r.push_back({1, 257, 257, 4, 4, 128, false, Seg::Shared});
  r.push_back({2, 97, 257, 4, 4, 128, true, Seg::Separate});
  r.push_back({2, 97, 97, 8, 2, 40, false, Seg::Shared});
  r.push_back({1, 257, 97, 8, 2, 64, false, Seg::Missing});
  r.push_back({1, 97, 257, 8, 2, 128, false, Seg::None, 0.3f});
  r.push_back({1, 97, 97, 4, 4, 64, true, Seg::None, 1.5f});
  r.push_back({1, 97, 97, 8, 2, 160, true});
  r.push_back({2, 7, 97, 4, 4, 8, false, Seg::Separate});
  return r;
}

// The kernels run on the legacy default stream here: DeviceBuffer's copies and cudaMemset use it,
// so every fill, launch and read-back is ordered without extra synchronization. (A stream created
// and destroyed by a test would also leave the allocator caching scratch under a dead handle.)
struct Stream {
  cudaStream_t s = nullptr;
};

}  // namespace

TK_TEST(cuda_attention_vs_reference) {
  if (!correctness_mode(ctx) || !tk::test::cuda::available()) return;
  Stream stream;
  uint64_t seed = 300;
  for (const Case& c : cases()) {
    for (DType dt : {DType::BF16, DType::F32}) {
      seed += 10;
      Problem pr(c, dt, seed);
      std::vector<double> o_ref, lse_ref, dq_ref, dk_ref, dv_ref;
      ref::attention_forward(pr.shape, pr.q, pr.k, pr.v, &o_ref, &lse_ref);
      ref::attention_backward(pr.shape, pr.dout, pr.q, pr.k, pr.v, &dq_ref, &dk_ref, &dv_ref);
      double tol_o = kF32TolO, tol_dq = kF32TolGrad, tol_dk = kF32TolGrad, tol_dv = kF32TolGrad, tol_lse = 1e-11;
      if (dt == DType::BF16) {
        std::vector<double> o_nv, dq_nv, dk_nv, dv_nv;
        pr.naive_bf16(&o_nv, &dq_nv, &dk_nv, &dv_nv);
        tol_o = bf16_tol(o_nv, o_ref);
        tol_dq = bf16_tol(dq_nv, dq_ref);
        tol_dk = bf16_tol(dk_nv, dk_ref);
        tol_dv = bf16_tol(dv_nv, dv_ref);
        tol_lse = 1e-9;
      }
      const bool mma = dt == DType::BF16 && (c.D == 64 || c.D == 128);
      const std::string what = "cuda attention " + describe_case(c, dt) + (mma ? " (tensor cores)" : " (generic)");
      auto out = pr.run(stream.s);
      ctx.check_nmse(what + " o", out->o.values(), o_ref, tol_o);
      check_lse(ctx, what, out->lse.values(), lse_ref, tol_lse);
      check_close(ctx, what + " dq", out->dq.values(), dq_ref, tol_dq);
      check_close(ctx, what + " dk", out->dk.values(), dk_ref, tol_dk);
      check_close(ctx, what + " dv", out->dv.values(), dv_ref, tol_dv);
      ctx.check(out->o.intact() && out->lse.intact() && out->dq.intact() && out->dk.intact() && out->dv.intact(),
                what + ": guard bytes intact");
      bool zero_rows = true;
      const std::vector<double> o = out->o.values(), dq = out->dq.values();
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t h = 0; h < c.H; ++h)
          for (int64_t t = 0; t < c.T; ++t)
            if (std::isinf(lse_ref[size_t((b * c.H + h) * c.T + t)]))
              for (int64_t d = 0; d < c.D; ++d) {
                const size_t i = size_t(((b * c.T + t) * c.H + h) * c.D + d);
                zero_rows &= o[i] == 0.0 && dq[i] == 0.0;
              }
      ctx.check(zero_rows, what + ": rows with no visible key give o = 0 and dq = 0");
    }
  }
}

// Peaked softmax (large logits: the running max changes often, exp underflows), both paths.
TK_TEST(cuda_attention_large_logits) {
  if (!correctness_mode(ctx) || !tk::test::cuda::available()) return;
  Stream stream;
  const Case c{1, 257, 257, 4, 4, 64, true, Seg::Shared};
  for (DType dt : {DType::BF16, DType::F32}) {
    Problem pr(c, dt, 7, 8.0);
    std::vector<double> o_ref, lse_ref, dq_ref, dk_ref, dv_ref;
    ref::attention_forward(pr.shape, pr.q, pr.k, pr.v, &o_ref, &lse_ref);
    ref::attention_backward(pr.shape, pr.dout, pr.q, pr.k, pr.v, &dq_ref, &dk_ref, &dv_ref);
    double tol_o = kF32TolO, tol_g = kF32TolGrad * 10, tol_dv = kF32TolGrad;
    double tol_dq = tol_g, tol_dk = tol_g;
    if (dt == DType::BF16) {
      std::vector<double> o_nv, dq_nv, dk_nv, dv_nv;
      pr.naive_bf16(&o_nv, &dq_nv, &dk_nv, &dv_nv);
      tol_o = bf16_tol(o_nv, o_ref);
      tol_dq = bf16_tol(dq_nv, dq_ref);
      tol_dk = bf16_tol(dk_nv, dk_ref);
      tol_dv = bf16_tol(dv_nv, dv_ref);
    }
    const std::string what = "cuda attention large logits " + describe_case(c, dt);
    auto out = pr.run(stream.s);
    ctx.check_nmse(what + " o", out->o.values(), o_ref, tol_o);
    check_lse(ctx, what, out->lse.values(), lse_ref, dt == DType::BF16 ? 1e-9 : 1e-11);
    ctx.check_nmse(what + " dq", out->dq.values(), dq_ref, tol_dq);
    ctx.check_nmse(what + " dk", out->dk.values(), dk_ref, tol_dk);
    ctx.check_nmse(what + " dv", out->dv.values(), dv_ref, tol_dv);
  }
}

// o, lse, dk and dv are bitwise reproducible (one owner per element, fixed order); dq goes
// through fp32 atomics and may differ in its last bits, which is reported, not asserted.
TK_TEST(cuda_attention_determinism) {
  if (!correctness_mode(ctx) || !tk::test::cuda::available()) return;
  Stream stream;
  const Case det_cases[] = {
      {2, 257, 257, 8, 2, 128, true, Seg::Shared},  // tensor cores, grouped heads, segments
      {2, 257, 257, 8, 2, 64, false},               // tensor cores
      {1, 97, 257, 8, 2, 40, true},                 // generic path
  };
  for (const Case& c : det_cases)
    for (DType dt : {DType::BF16, DType::F32}) {
      Problem pr(c, dt, 77);
      auto a = pr.run(stream.s);
      auto b = pr.run(stream.s);
      const std::string what = "cuda attention " + describe_case(c, dt);
      ctx.check(a->o.raw() == b->o.raw() && a->lse.raw() == b->lse.raw(), what + ": forward bitwise reproducible");
      ctx.check(a->dk.raw() == b->dk.raw() && a->dv.raw() == b->dv.raw(), what + ": dk, dv bitwise reproducible");
      if (a->dq.raw() != b->dq.raw())
        std::printf("  (%s: dq differs between runs in its last bits: fp32 atomic order)\n", what.c_str());
    }
}

TK_TEST(cuda_attention_rejects_bad_arguments) {
  if (!correctness_mode(ctx) || !tk::test::cuda::available()) return;
  auto throws = [&](const std::string& what, const std::function<void()>& fn) {
    bool threw = false;
    try {
      fn();
    } catch (const tk::Error&) {
      threw = true;
    }
    ctx.check(threw, "cuda attention rejects " + what);
  };
  DeviceBuffer q(1 * 5 * 3 * 8, DType::F32), k(1 * 6 * 2 * 8, DType::F32), o(1 * 5 * 3 * 8, DType::F32);
  DeviceBuffer lse(1 * 3 * 5, DType::F32), k1(6 * 8, DType::F32), v16(6 * 8, DType::BF16), seg(5, DType::I32);
  auto view = [](const DeviceBuffer& b, Shape s) { return make_view(b.data(), b.dtype(), kCuda, s); };
  AttentionOptions opt;
  throws("H % Hkv != 0", [&] {
    attention_forward_cuda(view(q, {1, 5, 3, 8}), view(k, {1, 6, 2, 8}), view(k, {1, 6, 2, 8}), nullptr, nullptr, opt,
                           view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr);
  });
  throws("k and v of different dtypes", [&] {
    attention_forward_cuda(view(q, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}), view(v16, {1, 6, 1, 8}), nullptr, nullptr,
                           opt, view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr);
  });
  const TensorView sq = view(seg, {1, 5});
  throws("one set of segment ids with S != T", [&] {
    attention_forward_cuda(view(q, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}), view(k1, {1, 6, 1, 8}), &sq, nullptr, opt,
                           view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr);
  });
  throws("key segment ids of the wrong length", [&] {
    attention_forward_cuda(view(q, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}), view(k1, {1, 6, 1, 8}), &sq, &sq, opt,
                           view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr);
  });
  throws("lse of shape [B, T, H]", [&] {
    attention_forward_cuda(view(q, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}), view(k1, {1, 6, 1, 8}), nullptr, nullptr,
                           opt, view(o, {1, 5, 3, 8}), view(lse, {1, 5, 3}), nullptr);
  });
  throws("a CPU tensor", [&] {
    TensorView qc = view(q, {1, 5, 3, 8});
    qc.device = Device{};
    attention_forward_cuda(qc, view(k1, {1, 6, 1, 8}), view(k1, {1, 6, 1, 8}), nullptr, nullptr, opt,
                           view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr);
  });
  throws("dq of the wrong dtype", [&] {
    attention_backward_cuda(view(q, {1, 5, 3, 8}), view(q, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}),
                            view(k1, {1, 6, 1, 8}), view(o, {1, 5, 3, 8}), view(lse, {1, 3, 5}), nullptr, nullptr, opt,
                            view(v16, {1, 5, 3, 8}), view(k1, {1, 6, 1, 8}), view(k1, {1, 6, 1, 8}), nullptr);
  });
}

// Throughput at training shapes (D = 128, bf16 on tensor cores; one f32 line for the generic
// path). FLOPs: forward 4 B H T S D (two products), backward 2.5x that (five products); causal
// counts half. Reports, never fails.
TK_TEST(cuda_attention_perf) {
  if (!tk::test::cuda::available()) return;
  struct PerfCase {
    int64_t B, T, H, Hkv;
    DType dt;
  };
  const PerfCase perf_cases[] = {
      {1, 4096, 32, 32, DType::BF16}, {2, 4096, 16, 16, DType::BF16}, {4, 2048, 16, 16, DType::BF16},
      {4, 2048, 32, 32, DType::BF16}, {2, 4096, 32, 8, DType::BF16},  {1, 2048, 16, 16, DType::F32},
  };
  const int64_t D = 128;
  cudaDeviceProp prop{};
  tk::test::cuda::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("  attention on %s, D=%lld (TFLOP/s; causal counts half the score matrix)\n", prop.name,
              (long long)D);
  Stream stream;
  cudaEvent_t e0, e1;
  tk::test::cuda::check(cudaEventCreate(&e0), "cudaEventCreate");
  tk::test::cuda::check(cudaEventCreate(&e1), "cudaEventCreate");
  for (const PerfCase& pc : perf_cases)
    for (bool causal : {true, false}) {
      const int64_t B = pc.B, T = pc.T, H = pc.H, Hkv = pc.Hkv;
      const Shape qs{B, T, H, D}, ks{B, T, Hkv, D};
      // Inputs: a 64K-value normal pattern repeated (the values do not change the speed).
      const std::vector<double> pattern = randn(size_t(1) << 16, 5);
      auto filled = [&](const Shape& s) {
        std::unique_ptr<DeviceBuffer> b(new DeviceBuffer(size_t(numel(s)), pc.dt));
        std::vector<double> x(b->n());
        for (size_t i = 0; i < x.size(); ++i) x[i] = pattern[(i * 7919) % pattern.size()];
        b->set(x);
        return b;
      };
      auto q = filled(qs), k = filled(ks), v = filled(ks), dout = filled(qs);
      DeviceBuffer o(size_t(numel(qs)), pc.dt), lse(size_t(B * H * T), DType::F32), dq(size_t(numel(qs)), pc.dt);
      DeviceBuffer dk(size_t(numel(ks)), pc.dt), dv(size_t(numel(ks)), pc.dt);
      auto view = [&](const DeviceBuffer& b, const Shape& s) { return make_view(b.data(), b.dtype(), kCuda, s); };
      AttentionOptions opt;
      opt.causal = causal;
      const double fwd_flops = 4.0 * double(B * H) * double(T) * double(T) * double(D) * (causal ? 0.5 : 1.0);
      const double bwd_flops = 2.5 * fwd_flops;
      auto time_ms = [&](const std::function<void()>& fn) {
        fn();  // warm-up (and first-use attribute setup)
        tk::test::cuda::check(cudaStreamSynchronize(stream.s), "warm-up");
        const int reps = pc.dt == DType::F32 ? 2 : 10;
        tk::test::cuda::check(cudaEventRecord(e0, stream.s), "cudaEventRecord");
        for (int r = 0; r < reps; ++r) fn();
        tk::test::cuda::check(cudaEventRecord(e1, stream.s), "cudaEventRecord");
        tk::test::cuda::check(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float ms = 0.0f;
        tk::test::cuda::check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        return double(ms) / reps;
      };
      const double tf = time_ms([&] {
        attention_forward_cuda(view(*q, qs), view(*k, ks), view(*v, ks), nullptr, nullptr, opt, view(o, qs),
                               view(lse, {B, H, T}), stream.s);
      });
      const double tb = time_ms([&] {
        attention_backward_cuda(view(*dout, qs), view(*q, qs), view(*k, ks), view(*v, ks), view(o, qs),
                                view(lse, {B, H, T}), nullptr, nullptr, opt, view(dq, qs), view(dk, ks), view(dv, ks),
                                stream.s);
      });
      std::printf("  attention %-4s B=%lld T=S=%lld H=%lld Hkv=%lld %-10s fwd %8.3f ms %6.1f TFLOP/s | bwd %8.3f ms "
                  "%6.1f TFLOP/s | fwd+bwd %6.1f TFLOP/s\n",
                  dtype_name(pc.dt), (long long)B, (long long)T, (long long)H, (long long)Hkv,
                  causal ? "causal" : "non-causal", tf, fwd_flops / tf * 1e-9, tb, bwd_flops / tb * 1e-9,
                  (fwd_flops + bwd_flops) / (tf + tb) * 1e-9);
    }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}
