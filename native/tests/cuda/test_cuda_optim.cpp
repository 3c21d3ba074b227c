// Tests of cuda/optim_kernels (multi-tensor AdamW, gradient norm, clipping) against the CPU
// kernels and ref/optim_ref.
//
// Every buffer is a guarded device buffer (64 pattern bytes on each side); tensor lists are
// device arrays of descriptors, as the op layer passes them. Expected values:
// - AdamW: the CUDA step does the CPU AVX2/AVX-512 paths' fp32 operations (explicit FMAs) with the
//   same host-folded constants, so p, m and v must be bitwise equal to adamw_step_cpu at the AVX2
//   level (checked when this CPU has AVX2), one tensor or 50 in one launch, aligned or not, with
//   and without a device clip coefficient. Against the double reference, the CPU test's bounds:
//   NMSE < 1e-12 for f32 p, m, v; bf16 p within one bf16 ulp and NMSE < 1e-6.
// - Gradient norm (fp64 accumulation): relative error < 1e-12 against the reference, the same
//   bytes on a second run, NaN and inf propagate. The device clip coefficient equals
//   clip_coefficient() of the device norm exactly; scaling is exact against ref::scale_ref and
//   bitwise equal to scale_grads_cpu; a coefficient of 1 leaves the bytes untouched.
// Every test returns at once without a device.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/core/queue.h"
#include "native/cpu/isa.h"
#include "native/cpu/optim.h"
#include "native/cuda/optim_kernels.h"
#include "native/ref/optim_ref.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;

namespace {

using tk::test::cuda::available;
using tk::test::cuda::check;

const DType kTypes[] = {DType::F32, DType::BF16};

// The queue stream of device 0 (kernels take scratch memory from the allocator tagged with their
// stream); the queue lives as long as the process.
cudaStream_t test_stream() {
  static Queue* q = tk::cuda::make_queue(0).release();
  return static_cast<cudaStream_t>(tk::cuda::stream_of(*q));
}
void* stream() { return test_stream(); }
void sync() { check(cudaStreamSynchronize(test_stream()), "cudaStreamSynchronize"); }

// n elements of device memory `offset` elements past an aligned address, 64 pattern bytes on
// either side.
class Dev {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kPattern = 0xA5;
  Dev(int64_t n, DType t, int64_t offset = 0) : n_(n), dtype_(t) {
    pre_ = kGuard + size_t(offset) * dtype_size(t);
    total_ = pre_ + bytes() + kGuard;
    check(cudaMalloc(&base_, total_), "cudaMalloc");
    check(cudaMemset(base_, kPattern, total_), "cudaMemset");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  ~Dev() { cudaFree(base_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  size_t bytes() const { return size_t(n_) * dtype_size(dtype_); }
  void* data() const { return static_cast<char*>(base_) + pre_; }
  void set_bytes(const void* src) {
    check(cudaMemcpyAsync(data(), src, bytes(), cudaMemcpyHostToDevice, test_stream()), "cudaMemcpyAsync H2D");
    sync();
  }
  void set(const std::vector<double>& v) {
    std::vector<uint8_t> h(bytes());
    from_double(v, h.data(), dtype_);
    set_bytes(h.data());
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> h(bytes());
    sync();
    check(cudaMemcpy(h.data(), data(), bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
  std::vector<double> values() const {
    std::vector<uint8_t> h = raw();
    return to_double(h.data(), dtype_, size_t(n_));
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
  int64_t n_;
  DType dtype_;
  void* base_ = nullptr;
  size_t pre_ = 0, total_ = 0;
};

// A host array copied to device memory (a descriptor list, a scalar).
template <class T>
class DevArray {
 public:
  explicit DevArray(const std::vector<T>& v) : n_(v.size()) {
    check(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(1, n_) * sizeof(T)), "cudaMalloc");
    if (n_) check(cudaMemcpyAsync(ptr_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, test_stream()), "H2D");
    sync();
  }
  ~DevArray() { cudaFree(ptr_); }
  DevArray(const DevArray&) = delete;
  DevArray& operator=(const DevArray&) = delete;
  T* get() const { return ptr_; }
  std::vector<T> read() const {
    std::vector<T> h(n_);
    sync();
    if (n_) check(cudaMemcpy(h.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "D2H");
    return h;
  }

 private:
  size_t n_;
  T* ptr_ = nullptr;
};

std::vector<double> scaled(std::vector<double> x, double s) {
  for (double& e : x) e *= s;
  return x;
}

AdamWParams base_params() {
  AdamWParams hp;
  hp.lr = 1e-2f;
  hp.weight_decay = 0.0f;
  hp.grad_scale = 1.0f;
  hp.step = 1;
  return hp;
}

// One tensor's state on the device and, for the CPU kernel, on the host.
struct Slot {
  Slot(int64_t n, DType pt, DType gt, int64_t offset = 0)
      : n(n), pt(pt), gt(gt), p(n, pt, offset), g(n, gt, offset), m(n, DType::F32, offset), v(n, DType::F32, offset),
        hp_(size_t(n) * dtype_size(pt)), hg_(size_t(n) * dtype_size(gt)), hm_(size_t(n)), hv_(size_t(n)) {}
  int64_t n;
  DType pt, gt;
  Dev p, g, m, v;
  std::vector<uint8_t> hp_, hg_;
  std::vector<float> hm_, hv_;

  AdamWTensor device() const {
    return {p.data(), g.data(), static_cast<float*>(m.data()), static_cast<float*>(v.data()), n, pt, gt};
  }
  AdamWTensor host() { return {hp_.data(), hg_.data(), hm_.data(), hv_.data(), n, pt, gt}; }
  void set(const std::vector<double>& p0, const std::vector<double>& m0, const std::vector<double>& v0) {
    from_double(p0, hp_.data(), pt);
    from_double(m0, hm_.data(), DType::F32);
    from_double(v0, hv_.data(), DType::F32);
    p.set_bytes(hp_.data());
    m.set_bytes(hm_.data());
    v.set_bytes(hv_.data());
  }
  void set_grad(const std::vector<double>& g0) {
    from_double(g0, hg_.data(), gt);
    g.set_bytes(hg_.data());
  }
  std::vector<double> P() const { return p.values(); }
  std::vector<double> G() const { return to_double(hg_.data(), gt, size_t(n)); }
  // Device state bitwise equal to the host state.
  bool same_as_host() const {
    const std::vector<uint8_t> dp = p.raw(), dm = m.raw(), dv = v.raw();
    return std::memcmp(dp.data(), hp_.data(), dp.size()) == 0 && std::memcmp(dm.data(), hm_.data(), dm.size()) == 0 &&
           std::memcmp(dv.data(), hv_.data(), dv.size()) == 0;
  }
  bool intact() const { return p.intact() && g.intact() && m.intact() && v.intact(); }
};

// Initial state: p ~ N(0, 1), m ~ N(0, 0.1^2), v = (0.1 * N)^2, or zero moments.
struct Init {
  std::vector<double> p, m, v;
  Init(int64_t n, uint64_t seed, bool zero_moments) {
    p = randn(size_t(n), seed);
    if (zero_moments) {
      m.assign(size_t(n), 0.0);
      v.assign(size_t(n), 0.0);
    } else {
      m = scaled(randn(size_t(n), seed + 1), 0.1);
      v = randn(size_t(n), seed + 2);
      for (double& x : v) x = 0.01 * x * x;
    }
  }
};

// The CPU's test bounds against the reference state.
void check_state(Context& ctx, const std::string& what, const Slot& s, const std::vector<double>& rp,
                 const std::vector<double>& rm, const std::vector<double>& rv) {
  const std::vector<double> gp = s.P();
  if (s.pt == DType::BF16) {
    ctx.check_nmse(what + " p", gp, rp, 1e-6);
    size_t bad = 0;
    for (size_t i = 0; i < gp.size(); ++i)
      if (std::fabs(gp[i] - rp[i]) > std::ldexp(std::fabs(rp[i]), -7)) ++bad;
    ctx.check(bad == 0, what + " p within one bf16 ulp (" + std::to_string(bad) + " elements off)");
  } else {
    ctx.check_nmse(what + " p", gp, rp, 1e-12);
  }
  ctx.check_nmse(what + " m", s.m.values(), rm, 1e-12);
  ctx.check_nmse(what + " v", s.v.values(), rv, 1e-12);
  ctx.check(s.intact(), what + " guards intact");
}

// Runs the CPU kernel at the AVX2 level (the FMA sequence the CUDA kernel reproduces); false when
// this CPU has no AVX2, in which case there is nothing bitwise to compare with.
bool cpu_step_avx2(std::vector<AdamWTensor>& list, const AdamWParams& hp, ThreadPool& pool) {
  if (detected_isa() < CpuIsa::Avx2) return false;
  const CpuIsa saved = active_isa();
  set_active_isa(CpuIsa::Avx2);
  adamw_step_multi_cpu(list.data(), int64_t(list.size()), hp, pool);
  set_active_isa(saved);
  return true;
}

std::string case_str(int64_t n, DType pt, DType gt, const AdamWParams& hp, int64_t offset) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "adamw n %lld p %s g %s wd %g gs %g step %lld%s", static_cast<long long>(n),
                dtype_name(pt), dtype_name(gt), double(hp.weight_decay), double(hp.grad_scale),
                static_cast<long long>(hp.step), offset ? " offset" : "");
  return buf;
}

std::vector<int64_t> mixed_sizes() {
  const int64_t base[] = {1, 3, 15, 16, 17, 31, 32, 33, 97, 0, 255, 1025, 4099, 20000, 65537, 130001, 7, 8192, 8193, 50};
  std::vector<int64_t> r;
  for (int i = 0; i < 50; ++i) r.push_back(base[i % 20] + (i >= 20 ? i : 0));
  return r;
}

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

}  // namespace

// ==== AdamW ===========================================================================================

TK_TEST(cuda_optim_adamw_one_step) {
  if (!available()) return;
  for (int64_t n : {int64_t(1), int64_t(97), int64_t(1025), int64_t(8193), int64_t(100003)}) {
    const Init init(n, 100 + uint64_t(n), false);
    const std::vector<double> g0 = randn(size_t(n), 7 + uint64_t(n));
    for (float wd : {0.0f, 0.1f})
      for (float gs : {1.0f, 0.37f})
        for (DType pt : kTypes)
          for (DType gt : kTypes)
            for (int64_t offset : {0, 1}) {
              AdamWParams hp = base_params();
              hp.weight_decay = wd;
              hp.grad_scale = gs;
              hp.step = 3;
              Slot s(n, pt, gt, offset);
              s.set(init.p, init.m, init.v);
              s.set_grad(g0);
              std::vector<double> rp = s.P(), rm = s.m.values(), rv = s.v.values();
              DevArray<AdamWTensor> list({s.device()});
              adamw_step_multi_cuda(list.get(), 1, hp, nullptr, stream());
              ref::adamw_step_ref(rp, rm, rv, s.G(), pt, hp);
              const std::string what = case_str(n, pt, gt, hp, offset);
              check_state(ctx, what, s, rp, rm, rv);
              std::vector<AdamWTensor> host = {s.host()};
              if (cpu_step_avx2(host, hp, ctx.pool)) ctx.check(s.same_as_host(), what + ": bitwise equal to the CPU (avx2)");
            }
  }
}

TK_TEST(cuda_optim_adamw_five_steps) {
  if (!available()) return;
  for (int64_t n : {int64_t(97), int64_t(100003)})
    for (DType pt : kTypes)
      for (DType gt : kTypes) {
        const Init init(n, 300 + uint64_t(n), true);
        Slot s(n, pt, gt);
        s.set(init.p, init.m, init.v);
        std::vector<double> rp = s.P(), rm = s.m.values(), rv = s.v.values();
        DevArray<AdamWTensor> list({s.device()});
        AdamWParams hp = base_params();
        hp.weight_decay = 0.1f;
        for (int64_t step = 1; step <= 5; ++step) {
          hp.step = step;
          s.set_grad(randn(size_t(n), 400 + uint64_t(step)));
          adamw_step_multi_cuda(list.get(), 1, hp, nullptr, stream());
          ref::adamw_step_ref(rp, rm, rv, s.G(), pt, hp);
        }
        check_state(ctx, case_str(n, pt, gt, hp, 0) + " after 5 steps", s, rp, rm, rv);
      }
}

TK_TEST(cuda_optim_adamw_multi) {
  if (!available()) return;
  // 50 tensors of mixed sizes (one empty, some spanning several chunks) and dtypes, one of them
  // misaligned, in one launch per step; the second step takes its grad scale from a device
  // coefficient, as clipping does.
  const std::vector<int64_t> sizes = mixed_sizes();
  std::vector<std::unique_ptr<Slot>> slots;
  std::vector<std::vector<double>> rp, rm, rv;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const DType pt = i % 2 ? DType::BF16 : DType::F32, gt = (i / 2) % 2 ? DType::BF16 : DType::F32;
    slots.emplace_back(new Slot(sizes[i], pt, gt, i == 11 ? 1 : 0));
    const Init init(sizes[i], 1000 + i, false);
    slots.back()->set(init.p, init.m, init.v);
    rp.push_back(slots.back()->P());
    rm.push_back(slots.back()->m.values());
    rv.push_back(slots.back()->v.values());
  }
  std::vector<AdamWTensor> dlist, hlist;
  for (auto& s : slots) {
    dlist.push_back(s->device());
    hlist.push_back(s->host());
  }
  check_adamw_list_cuda(hlist.data(), int64_t(hlist.size()));
  DevArray<AdamWTensor> list(dlist);
  const float coef = 0.6f;
  DevArray<float> dcoef({coef});
  AdamWParams hp = base_params();
  hp.weight_decay = 0.1f;
  hp.grad_scale = 0.8f;
  bool bitwise = true, compared = true;
  for (int k = 0; k < 2; ++k) {
    hp.step = 10 + k;
    for (size_t i = 0; i < slots.size(); ++i) slots[i]->set_grad(randn(size_t(sizes[i]), 5000 + i * 3 + uint64_t(k)));
    AdamWParams cpu_hp = hp;
    if (k == 1) cpu_hp.grad_scale = hp.grad_scale * coef;  // what the kernel computes from the device coefficient
    adamw_step_multi_cuda(list.get(), int64_t(dlist.size()), hp, k == 1 ? dcoef.get() : nullptr, stream());
    for (size_t i = 0; i < slots.size(); ++i) ref::adamw_step_ref(rp[i], rm[i], rv[i], slots[i]->G(), slots[i]->pt, cpu_hp);
    compared = cpu_step_avx2(hlist, cpu_hp, ctx.pool);
    if (compared)
      for (auto& s : slots) bitwise = bitwise && s->same_as_host();
  }
  if (compared) ctx.check(bitwise, "adamw multi: 50 tensors bitwise equal to the CPU (avx2)");
  for (size_t i = 0; i < slots.size(); ++i)
    if (sizes[i] >= 97) check_state(ctx, "adamw multi tensor " + std::to_string(i) + " n " + std::to_string(sizes[i]),
                                    *slots[i], rp[i], rm[i], rv[i]);
  bool intact = true;
  for (auto& s : slots) intact = intact && s->intact();
  ctx.check(intact, "adamw multi: guards intact");
}

// ==== gradient norm, clipping, scaling =================================================================

namespace {

struct GradList {
  std::vector<std::unique_ptr<Dev>> bufs;
  std::vector<GradTensor> list;             // device descriptors
  std::vector<std::vector<uint8_t>> host;   // host copies for the CPU kernels
  std::vector<std::vector<double>> values;  // what the buffers hold
  void add(int64_t n, DType t, uint64_t seed, double scale) {
    bufs.emplace_back(new Dev(n, t, bufs.size() % 5 == 4 ? 1 : 0));
    std::vector<uint8_t> h(size_t(n) * dtype_size(t));
    from_double(scaled(randn(size_t(n), seed), scale), h.data(), t);
    bufs.back()->set_bytes(h.data());
    list.push_back({bufs.back()->data(), n, t});
    values.push_back(to_double(h.data(), t, size_t(n)));
    host.push_back(std::move(h));
  }
  std::vector<GradTensor> host_list() {
    std::vector<GradTensor> r;
    for (size_t i = 0; i < list.size(); ++i) r.push_back({host[i].data(), list[i].n, list[i].dtype});
    return r;
  }
  bool intact() const {
    for (auto& b : bufs)
      if (!b->intact()) return false;
    return true;
  }
  std::string str() const {
    int64_t total = 0;
    for (auto& t : list) total += t.n;
    return std::to_string(list.size()) + " tensors, " + std::to_string(total) + " elements";
  }
};

std::vector<std::unique_ptr<GradList>> norm_cases() {
  std::vector<std::unique_ptr<GradList>> cases;
  for (int64_t n : {int64_t(1), int64_t(97), int64_t(1025), int64_t(100003)})
    for (DType t : kTypes) {
      cases.emplace_back(new GradList);
      cases.back()->add(n, t, 40 + uint64_t(n), 1.0);
    }
  cases.emplace_back(new GradList);  // 50 mixed tensors, magnitudes 1e-3 .. 1e2, one of many chunks
  const std::vector<int64_t> sizes = mixed_sizes();
  for (size_t i = 0; i < sizes.size(); ++i)
    cases.back()->add(i == 13 ? 300001 : sizes[i], i % 3 ? DType::F32 : DType::BF16, 900 + i,
                      std::pow(10.0, double(i % 6) - 3));
  return cases;
}

}  // namespace

TK_TEST(cuda_optim_global_norm_and_clip) {
  if (!available()) return;
  for (auto& cp : norm_cases()) {
    GradList& c = *cp;
    const double want = ref::grad_norm_sq_ref(c.values);
    DevArray<GradTensor> list(c.list);
    DevArray<double> norm({-1.0});
    DevArray<float> coef({-1.0f});
    const std::string what = "grad_norm_sq " + c.str();
    grad_norm_sq_cuda(list.get(), int64_t(c.list.size()), norm.get(), nullptr, 0.0, stream());
    const double got = norm.read()[0];
    const double rel = std::fabs(got - want) / want;
    char buf[64];
    std::snprintf(buf, sizeof buf, ": rel err %.2e", rel);
    ctx.check(rel < 1e-12, what + buf);
    // Clip to a quarter of the norm: the coefficient on the device, the scaling in place by it,
    // compared with the CPU on the host copies.
    const double max_norm = 0.25 * std::sqrt(got);
    grad_norm_sq_cuda(list.get(), int64_t(c.list.size()), norm.get(), coef.get(), max_norm, stream());
    const double again = norm.read()[0];
    const float dc = coef.read()[0];
    ctx.check(std::memcmp(&again, &got, 8) == 0, what + ": a second run gives the same bytes");
    ctx.check(dc == clip_coefficient(std::sqrt(again), max_norm), what + ": device clip coefficient is exact");
    std::vector<GradTensor> hl = c.host_list();
    scale_grads_cuda(list.get(), int64_t(c.list.size()), coef.get(), stream());
    scale_grads_cpu(hl.data(), int64_t(hl.size()), dc, ctx.pool);
    size_t bad = 0, bytes_differ = 0;
    for (size_t i = 0; i < c.list.size(); ++i) {
      const std::vector<uint8_t> raw = c.bufs[i]->raw();
      bytes_differ += raw != c.host[i];
      const std::vector<double> got_v = to_double(raw.data(), c.list[i].dtype, size_t(c.list[i].n));
      const std::vector<double> want_v = ref::scale_ref(c.values[i], dc, c.list[i].dtype);
      for (size_t k = 0; k < got_v.size(); ++k) bad += got_v[k] != want_v[k];
    }
    const std::string sw = "scale_grads " + c.str() + " by the clip coefficient";
    ctx.check(bad == 0, sw + ": exact (" + std::to_string(bad) + " elements differ)");
    ctx.check(bytes_differ == 0, sw + ": bitwise equal to scale_grads_cpu");
    ctx.check(c.intact(), sw + ": guards intact");
    grad_norm_sq_cuda(list.get(), int64_t(c.list.size()), norm.get(), nullptr, 0.0, stream());
    ctx.check(std::fabs(std::sqrt(norm.read()[0]) / max_norm - 1) < 1e-2, sw + ": the norm after clipping is max_norm");
  }
  // No clipping: coefficient 1, gradients keep their bytes.
  for (auto& cp : norm_cases()) {
    GradList& c = *cp;
    DevArray<GradTensor> list(c.list);
    DevArray<double> norm({0.0});
    DevArray<float> coef({0.0f});
    grad_norm_sq_cuda(list.get(), int64_t(c.list.size()), norm.get(), coef.get(), 10.0 * std::sqrt(ref::grad_norm_sq_ref(c.values)),
                      stream());
    ctx.check(coef.read()[0] == 1.0f, "clip " + c.str() + ": below max_norm the coefficient is 1");
    scale_grads_cuda(list.get(), int64_t(c.list.size()), coef.get(), stream());
    bool same = true;
    for (size_t i = 0; i < c.list.size(); ++i) same = same && c.bufs[i]->raw() == c.host[i];
    ctx.check(same, "scale_grads " + c.str() + " by 1: the gradients keep their bytes");
  }
  // NaN and inf propagate; an empty list has norm 0 and coefficient 1.
  for (float badv : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const std::vector<float> hb = {1.0f, badv, 2.0f};
    DevArray<float> bad(hb);
    DevArray<GradTensor> list({GradTensor{bad.get(), 3, DType::F32}});
    DevArray<double> norm({0.0});
    DevArray<float> coef({0.0f});
    grad_norm_sq_cuda(list.get(), 1, norm.get(), coef.get(), 1.0, stream());
    const double nv = norm.read()[0];
    const float cv = coef.read()[0];
    if (std::isnan(badv))
      ctx.check(std::isnan(nv) && std::isnan(cv), "grad_norm_sq: NaN propagates to the norm and the coefficient");
    else
      ctx.check(std::isinf(nv) && cv == 0.0f, "grad_norm_sq: inf gives an inf norm and coefficient 0");
  }
  DevArray<double> norm({-1.0});
  DevArray<float> coef({-1.0f});
  grad_norm_sq_cuda(nullptr, 0, norm.get(), coef.get(), 1.0, stream());
  ctx.check(norm.read()[0] == 0.0 && coef.read()[0] == 1.0f, "grad_norm_sq: an empty list has norm 0, coefficient 1");
}

// ==== errors ==========================================================================================

TK_TEST(cuda_optim_rejects_bad_arguments) {
  if (!available()) return;
  std::string msg;
  Slot s(16, DType::F32, DType::F32);
  DevArray<AdamWTensor> list({s.device()});
  auto step_with = [&](AdamWParams hp) { return [&, hp] { adamw_step_multi_cuda(list.get(), 1, hp, nullptr, stream()); }; };
  AdamWParams hp = base_params();
  hp.step = 0;
  ctx.check(throws_with(step_with(hp), "step must count from 1", &msg), "adamw: step 0: " + msg);
  hp = base_params();
  hp.beta1 = 1.0f;
  ctx.check(throws_with(step_with(hp), "beta1", &msg), "adamw: beta1 = 1: " + msg);
  hp = base_params();
  hp.lr = -1.0f;
  ctx.check(throws_with(step_with(hp), "lr", &msg), "adamw: negative lr: " + msg);
  AdamWTensor bad = s.host();
  bad.param_dtype = DType::F16;
  ctx.check(throws_with([&] { check_adamw_list_cuda(&bad, 1); }, "param dtype f16", &msg), "adamw list: f16 param: " + msg);
  bad = s.host();
  bad.n = -1;
  ctx.check(throws_with([&] { check_adamw_list_cuda(&bad, 1); }, "negative size", &msg), "adamw list: negative n: " + msg);
  GradTensor g{nullptr, 5, DType::F32};
  ctx.check(throws_with([&] { check_grad_list_cuda(&g, 1); }, "null buffer", &msg), "grad list: null data: " + msg);
  g = GradTensor{s.g.data(), 5, DType::I32};
  ctx.check(throws_with([&] { check_grad_list_cuda(&g, 1); }, "not supported", &msg), "grad list: i32: " + msg);
  ctx.check(s.intact(), "rejected calls write nothing");
}
