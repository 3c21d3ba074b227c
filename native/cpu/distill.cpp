// CPU distillation losses (see distill.h for the contracts).
//
// Design:
// - One row kernel, written once against a small vector type V (T: the register type, W: lanes)
//   and compiled three times: portable (W = 1, std::exp / std::log1p), AVX2 (W = 8) and AVX-512
//   (W = 16). The build is baseline x86-64, so the SIMD copies need function-level target
//   attributes on every function, the row kernel included; a template cannot carry a different
//   attribute per instantiation, so the kernel body sits at the end of this file, between
//   #ifdef TK_DISTILL_BODY guards, and the file includes itself once per ISA with TK_DK_ATTR,
//   TK_DK_VEC and TK_DK_NS set (the portable copy is included the same way, with no attribute).
// - Per row, in per-thread fp32 buffers padded to a multiple of 16 (pads = -inf, and the partial
//   last vector's contributions masked off):
//     1. z_s = s / T, z_t = t / T (BF16 widened), with their maxima;
//     2. e = exp(z - max), kept, and l = log sum e (exp never sees a positive argument);
//     3. log q = (z_s - max_s) - l_s, log p = (z_t - max_t) - l_t (never z - lse: with logits
//        ~1e4 an fp32 lse carries an ulp of 1e-3), q = e_s / sum e_s, p = e_t / sum e_t (so
//        forward_kl and reverse_kl cost 2 exps per logit pair, jsd 3 and a log); the divergence
//        is accumulated per lane in fp32, and with a gradient wanted the pass also leaves A, B:
//        dD/dz = A - B K (forward_kl: A = q, B = p, K = 1; reverse_kl: A = q (log q - log p),
//        B = q, K = D; jsd: A = g, B = q, K = sum g);
//     4. d s = c (A - B K), c = dloss T / #counted, then stored (BF16 rounded to nearest even).
//   A and B overwrite z_s and e_s. A 32K-vocab row is 4 x 128 KB of buffers (per thread): the
//   passes after the first read run out of L2.
// - SIMD exp: Cephes' expf (Cody-Waite reduction by ln 2, degree-5 polynomial, FMA), arguments
//   <= 0, results below FLT_MIN flushed to 0, NaN -> 0. SIMD log (jsd's log1p(u), u in [0, 1]):
//   Cephes' logf on w = 1 + u in [1, 2] (w halved above sqrt 2, degree-8 polynomial); the rounding
//   of 1 + u costs < 6e-8 absolute, negligible next to |log m|.
// - Threads split rows with a grain of ~16K logits; the mean is summed in double afterwards.
#ifndef TK_DISTILL_BODY
#include "distill.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {

const char* distill_kind_name(DistillKind k) {
  switch (k) {
    case DistillKind::ForwardKl: return "forward_kl";
    case DistillKind::ReverseKl: return "reverse_kl";
    case DistillKind::Jsd: return "jsd";
  }
  return "?";
}

namespace {

constexpr int64_t kGrain = 16384;  // logits per thread below which a second thread does not pay
constexpr int kPad = 16;           // buffers are padded to a multiple of the widest vector
constexpr float kInf = std::numeric_limits<float>::infinity();

// What a row kernel needs besides the row pointers.
struct RowParams {
  int64_t V = 0;
  DType sdt = DType::F32, tdt = DType::F32, gdt = DType::F32;
  float inv_t = 1.0f;
  DistillKind kind = DistillKind::ForwardKl;  // jsd with beta 0 / 1 already mapped to a KL
  float beta = 0.5f, log_beta = 0.0f, log_1mbeta = 0.0f;
  float c = 0.0f;  // gradient scale dloss * T / #counted
};

// Row pointers and the per-thread buffers (each of roundup(V, kPad) floats).
struct RowData {
  const void* s = nullptr;
  const void* t = nullptr;
  void* grad = nullptr;  // null: no gradient
  float *zs = nullptr, *zt = nullptr, *es = nullptr, *et = nullptr;
};

// ================================ vector types =====================================================

struct VecScalar {
  using T = float;
  static constexpr int W = 1;
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set(float x) { return x; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T fmadd(T a, T b, T c) { return a * b + c; }
  static T max(T a, T b) { return a > b ? a : b; }
  static T min(T a, T b) { return a < b ? a : b; }
  static T exp_nonpos(T a) { return std::exp(a); }
  static T log1p_unit(T u) { return std::log1p(u); }
  static T keep_first(T v, int) { return v; }  // W = 1: a vector is never partial
  static float hsum(T v) { return v; }
  static float hmax(T v) { return v; }
};

#if TK_SIMD_X86
struct VecAvx2 {
  using T = __m256;
  static constexpr int W = 8;
  TK_AVX2 static T load(const float* p) { return _mm256_loadu_ps(p); }
  TK_AVX2 static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  TK_AVX2 static T set(float x) { return _mm256_set1_ps(x); }
  TK_AVX2 static T add(T a, T b) { return _mm256_add_ps(a, b); }
  TK_AVX2 static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  TK_AVX2 static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  TK_AVX2 static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  TK_AVX2 static T max(T a, T b) { return _mm256_max_ps(a, b); }
  TK_AVX2 static T min(T a, T b) { return _mm256_min_ps(a, b); }
  TK_AVX2 static T exp_nonpos(T a) { return simd::exp_nonpos8(a); }  // 0 below ln(FLT_MIN) and for NaN
  // log(1 + u) for u in [0, 1].
  TK_AVX2 static T log1p_unit(T u) {
    __m256 w = _mm256_add_ps(u, _mm256_set1_ps(1.0f));
    __m256 big = _mm256_cmp_ps(w, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
    __m256 e = _mm256_and_ps(big, _mm256_set1_ps(1.0f));
    __m256 x = _mm256_sub_ps(_mm256_blendv_ps(w, _mm256_mul_ps(w, _mm256_set1_ps(0.5f)), big), _mm256_set1_ps(1.0f));
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(7.0376836292e-2f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(-1.1514610310e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.1676998740e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(-1.2420140846e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.4249322787e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(-1.6668057665e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(2.0000714765e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(-2.4999993993e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(3.3333331174e-1f));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(x, z), p);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(x, y));
  }
  TK_AVX2 static T keep_first(T v, int k) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(v, _mm256_castsi256_ps(m));
  }
  TK_AVX2 static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  TK_AVX2 static float hmax(T v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

struct VecAvx512 {
  using T = __m512;
  static constexpr int W = 16;
  TK_AVX512 static T load(const float* p) { return _mm512_loadu_ps(p); }
  TK_AVX512 static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  TK_AVX512 static T set(float x) { return _mm512_set1_ps(x); }
  TK_AVX512 static T add(T a, T b) { return _mm512_add_ps(a, b); }
  TK_AVX512 static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  TK_AVX512 static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  TK_AVX512 static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  TK_AVX512 static T max(T a, T b) { return _mm512_max_ps(a, b); }
  TK_AVX512 static T min(T a, T b) { return _mm512_min_ps(a, b); }
  TK_AVX512 static T exp_nonpos(T a) { return simd::exp_nonpos16(a); }  // 0 below ln(FLT_MIN) and for NaN
  TK_AVX512 static T log1p_unit(T u) {
    __m512 w = _mm512_add_ps(u, _mm512_set1_ps(1.0f));
    __mmask16 big = _mm512_cmp_ps_mask(w, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    __m512 e = _mm512_maskz_mov_ps(big, _mm512_set1_ps(1.0f));
    __m512 x = _mm512_sub_ps(_mm512_mask_mul_ps(w, big, w, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.0f));
    __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(7.0376836292e-2f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(-1.1514610310e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.1676998740e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(-1.2420140846e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.4249322787e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(-1.6668057665e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(2.0000714765e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(-2.4999993993e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(3.3333331174e-1f));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(x, z), p);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
    return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(x, y));
  }
  TK_AVX512 static T keep_first(T v, int k) { return _mm512_maskz_mov_ps(__mmask16((1u << k) - 1u), v); }
  TK_AVX512 static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  TK_AVX512 static float hmax(T v) { return _mm512_reduce_max_ps(v); }
};
#endif  // TK_SIMD_X86

}  // namespace

// ================================ the row kernel, once per ISA =====================================

#define TK_DISTILL_BODY 1
#define TK_DK_ATTR
#define TK_DK_VEC VecScalar
#define TK_DK_NS dk_scalar
#include "distill.cpp"
#undef TK_DK_ATTR
#undef TK_DK_VEC
#undef TK_DK_NS
#if TK_SIMD_X86
#define TK_DK_ATTR TK_AVX2
#define TK_DK_VEC VecAvx2
#define TK_DK_NS dk_avx2
#include "distill.cpp"
#undef TK_DK_ATTR
#undef TK_DK_VEC
#undef TK_DK_NS
#define TK_DK_ATTR TK_AVX512
#define TK_DK_VEC VecAvx512
#define TK_DK_NS dk_avx512
#include "distill.cpp"
#undef TK_DK_ATTR
#undef TK_DK_VEC
#undef TK_DK_NS
#endif
#undef TK_DISTILL_BODY

namespace {

using RowFn = float (*)(const RowParams&, const RowData&);

RowFn pick_row_fn() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return dk_avx512::row;
  if (isa >= CpuIsa::Avx2) return dk_avx2::row;
#endif
  return dk_scalar::row;
}

// ================================ argument checks ==================================================

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CPU, op, ": ", what, " is on ", v.device.name(), ", expected cpu");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_f32(const TensorView& v, int64_t numel, const char* op, const char* what) {
  check_tensor(v, op, what);
  TK_CHECK(v.dtype == DType::F32, op, ": ", what, " ", describe(v), " must be f32");
  TK_CHECK(v.numel() == numel, op, ": ", what, " ", describe(v), " must have ", numel, " elements");
}

bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  return true;
}

struct Dims {
  int64_t N, V, counted;
};

Dims check_common(const TensorView& s, const TensorView& t, const TensorView& targets, const DistillParams& p,
                  const char* op) {
  check_tensor(s, op, "student");
  TK_CHECK(s.dtype == DType::F32 || s.dtype == DType::BF16, op, ": student ", describe(s), " must be f32 or bf16");
  TK_CHECK(s.ndim >= 1 && s.shape[s.ndim - 1] >= 1, op, ": student ", describe(s),
           " must have a last (vocabulary) dim V >= 1");
  check_tensor(t, op, "teacher");
  TK_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16, op, ": teacher ", describe(t), " must be f32 or bf16");
  TK_CHECK(same_shape(s, t), op, ": teacher ", describe(t), " must have the student's shape ", describe(s));
  TK_CHECK(p.kind == DistillKind::ForwardKl || p.kind == DistillKind::ReverseKl || p.kind == DistillKind::Jsd, op,
           ": unknown distillation kind ", int(p.kind));
  TK_CHECK(std::isfinite(p.temperature) && p.temperature > 0, op, ": temperature ", p.temperature,
           " must be finite and > 0");
  if (p.kind == DistillKind::Jsd)
    TK_CHECK(p.beta >= 0.0f && p.beta <= 1.0f, op, ": jsd beta ", p.beta, " must be in [0, 1]");
  const int64_t V = s.shape[s.ndim - 1], N = s.numel() / V;
  int64_t counted = N;
  if (targets.data != nullptr) {
    check_tensor(targets, op, "targets");
    TK_CHECK(targets.dtype == DType::I32, op, ": targets ", describe(targets), " must be i32");
    TK_CHECK(targets.numel() == N, op, ": targets ", describe(targets), " must have ", N,
             " elements (one per logits row)");
    const int32_t* y = targets.ptr<const int32_t>();
    counted = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (y[i] == p.ignore_index) continue;
      TK_CHECK(y[i] >= 0 && y[i] < V, op, ": targets[", i, "] = ", y[i], " is out of range for V = ", V,
               " (and is not ignore_index = ", p.ignore_index, ")");
      ++counted;
    }
  }
  return {N, V, counted};
}

void check_dstudent(const TensorView& d, const TensorView& s, const char* op) {
  check_tensor(d, op, "dstudent");
  TK_CHECK(same_shape(d, s) && d.dtype == s.dtype, op, ": dstudent ", describe(d), " must match student ",
           describe(s));
}

// ================================ the row driver ===================================================

void run(const TensorView& s, const TensorView& t, const TensorView& targets, const DistillParams& p, const Dims& d,
         float* losses, const TensorView* dstudent, float dloss, ThreadPool& pool) {
  RowParams rp;
  rp.V = d.V;
  rp.sdt = s.dtype;
  rp.tdt = t.dtype;
  rp.gdt = s.dtype;
  rp.inv_t = 1.0f / p.temperature;
  rp.kind = p.kind;
  if (p.kind == DistillKind::Jsd && p.beta == 0.0f) rp.kind = DistillKind::ForwardKl;  // Liger's convention
  if (p.kind == DistillKind::Jsd && p.beta == 1.0f) rp.kind = DistillKind::ReverseKl;
  rp.beta = p.beta;
  rp.log_beta = std::log(p.beta);
  rp.log_1mbeta = std::log1p(-p.beta);
  rp.c = d.counted > 0 ? float(double(dloss) * double(p.temperature) / double(d.counted)) : 0.0f;
  const float t2 = p.temperature * p.temperature;
  const int32_t* y = targets.data ? targets.ptr<const int32_t>() : nullptr;
  const int32_t ignore = p.ignore_index;
  const RowFn fn = pick_row_fn();
  const int64_t V = d.V, Vp = (V + kPad - 1) / kPad * kPad;
  const size_t ss = dtype_size(s.dtype), ts = dtype_size(t.dtype);
  pool.parallel_for(d.N, std::max<int64_t>(1, kGrain / V), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(size_t(Vp) * 4);
    RowData rd;
    rd.zs = buf.data();
    rd.zt = buf.data() + Vp;
    rd.es = buf.data() + 2 * Vp;
    rd.et = buf.data() + 3 * Vp;
    for (int64_t n = n0; n < n1; ++n) {
      void* g = dstudent ? static_cast<char*>(dstudent->data) + size_t(n * V) * ss : nullptr;
      if (y && y[n] == ignore) {
        if (losses) losses[n] = 0.0f;
        if (g) std::memset(g, 0, size_t(V) * ss);
        continue;
      }
      rd.s = static_cast<const char*>(s.data) + size_t(n * V) * ss;
      rd.t = static_cast<const char*>(t.data) + size_t(n * V) * ts;
      rd.grad = g;
      const float div = fn(rp, rd);
      if (losses) losses[n] = t2 * div;
    }
  });
}

void reduce(const float* losses, const Dims& d, const TensorView& loss) {
  double sum = 0;
  for (int64_t n = 0; n < d.N; ++n) sum += losses[n];
  loss.ptr<float>()[0] = d.counted > 0 ? float(sum / double(d.counted)) : 0.0f;
}

}  // namespace

// ================================ entry points =====================================================

void distill_forward_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                         const DistillParams& params, const TensorView& losses, const TensorView& loss,
                         ThreadPool& pool) {
  const char* op = "distill_forward_cpu";
  const Dims d = check_common(student, teacher, targets, params, op);
  check_f32(losses, d.N, op, "losses");
  check_f32(loss, 1, op, "loss");
  run(student, teacher, targets, params, d, losses.ptr<float>(), nullptr, 0.0f, pool);
  reduce(losses.ptr<float>(), d, loss);
}

void distill_backward_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                          const DistillParams& params, const TensorView& dloss, const TensorView& dstudent,
                          ThreadPool& pool) {
  const char* op = "distill_backward_cpu";
  const Dims d = check_common(student, teacher, targets, params, op);
  check_f32(dloss, 1, op, "dloss");
  check_dstudent(dstudent, student, op);
  run(student, teacher, targets, params, d, nullptr, &dstudent, dloss.ptr<const float>()[0], pool);
}

void distill_fused_cpu(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                       const DistillParams& params, float dloss, const TensorView& losses, const TensorView& loss,
                       const TensorView& dstudent, ThreadPool& pool) {
  const char* op = "distill_fused_cpu";
  const Dims d = check_common(student, teacher, targets, params, op);
  check_f32(losses, d.N, op, "losses");
  check_f32(loss, 1, op, "loss");
  check_dstudent(dstudent, student, op);
  run(student, teacher, targets, params, d, losses.ptr<float>(), &dstudent, dloss, pool);
  reduce(losses.ptr<float>(), d, loss);
}

}  // namespace tk

#else  // TK_DISTILL_BODY: the row kernel, included above (inside namespace tk) once per ISA

namespace {
namespace TK_DK_NS {

using V = TK_DK_VEC;
using T = V::T;
constexpr int W = V::W;

// z[0, V) = x / T (x F32 or BF16), z[V, Vp) = -inf; returns max z.
TK_DK_ATTR inline float load_scaled(const void* x, DType dt, int64_t n, int64_t np, float inv_t, float* z) {
  if (dt == DType::F32) {
    const float* s = static_cast<const float*>(x);
    int64_t j = 0;
    const T vi = V::set(inv_t);
    for (; j + W <= n; j += W) V::store(z + j, V::mul(V::load(s + j), vi));
    for (; j < n; ++j) z[j] = s[j] * inv_t;
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(x);
    for (int64_t j = 0; j < n; ++j) z[j] = bf16_to_f32(s[j]) * inv_t;
  }
  for (int64_t j = n; j < np; ++j) z[j] = -kInf;
  T m = V::set(-kInf);
  for (int64_t j = 0; j < np; j += W) m = V::max(m, V::load(z + j));
  return V::hmax(m);
}

// e[j] = exp(z[j] - mx) over [0, np), given mx = max z (pads are -inf: e = 0); returns sum e.
// The caller keeps log(sum e) apart from mx: log q = (z - mx) - log(sum e), where z - mx is exact
// near the max, so logits offset by ~1e4 (ulp 1e-3) lose nothing to rounding a full lse.
TK_DK_ATTR inline float exp_shifted(const float* z, int64_t np, float mx, float* e) {
  const T vm = V::set(mx);
  T s0 = V::set(0.0f), s1 = s0;
  int64_t j = 0;
  for (; j + 2 * W <= np; j += 2 * W) {
    const T e0 = V::exp_nonpos(V::sub(V::load(z + j), vm)), e1 = V::exp_nonpos(V::sub(V::load(z + j + W), vm));
    V::store(e + j, e0);
    V::store(e + j + W, e1);
    s0 = V::add(s0, e0);
    s1 = V::add(s1, e1);
  }
  for (; j < np; j += W) {
    const T e0 = V::exp_nonpos(V::sub(V::load(z + j), vm));
    V::store(e + j, e0);
    s0 = V::add(s0, e0);
  }
  return V::hsum(V::add(s0, s1));
}

// One row: returns the divergence D (before T^2); with rd.grad set, writes d student there.
TK_DK_ATTR float row(const RowParams& p, const RowData& rd) {
  const int64_t n = p.V, np = (n + W - 1) / W * W;
  const int rem = int(n - (np - W));  // valid lanes of the last vector, in [1, W]
  float* zs = rd.zs;
  float* zt = rd.zt;
  float* es = rd.es;
  float* et = rd.et;
  const float ms = load_scaled(rd.s, p.sdt, n, np, p.inv_t, zs);
  const float mt = load_scaled(rd.t, p.tdt, n, np, p.inv_t, zt);
  const float ss = exp_shifted(zs, np, ms, es), st = exp_shifted(zt, np, mt, et);
  const T vms = V::set(ms), vmt = V::set(mt);
  const T vls = V::set(std::log(ss)), vlt = V::set(std::log(st));
  const T vis = V::set(1.0f / ss), vit = V::set(1.0f / st);
  const bool grad = rd.grad != nullptr;
  const int64_t last = np - W;
  T acc = V::set(0.0f);
  float K = 1.0f;
  switch (p.kind) {
    case DistillKind::ForwardKl: {  // D = sum p (log p - log q); A = q, B = p, K = 1
      for (int64_t j = 0; j < np; j += W) {
        const T lq = V::sub(V::sub(V::load(zs + j), vms), vls), lp = V::sub(V::sub(V::load(zt + j), vmt), vlt);
        const T q = V::mul(V::load(es + j), vis), pp = V::mul(V::load(et + j), vit);
        T term = V::mul(pp, V::sub(lp, lq));
        if (j == last) term = V::keep_first(term, rem);
        acc = V::add(acc, term);
        if (grad) {
          V::store(zs + j, q);
          V::store(es + j, pp);
        }
      }
      break;
    }
    case DistillKind::ReverseKl: {  // D = sum q (log q - log p); A = q (log q - log p), B = q, K = D
      for (int64_t j = 0; j < np; j += W) {
        const T lq = V::sub(V::sub(V::load(zs + j), vms), vls), lp = V::sub(V::sub(V::load(zt + j), vmt), vlt);
        const T q = V::mul(V::load(es + j), vis);
        T term = V::mul(q, V::sub(lq, lp));
        if (j == last) term = V::keep_first(term, rem);
        acc = V::add(acc, term);
        if (grad) {
          V::store(zs + j, term);
          V::store(es + j, q);
        }
      }
      K = V::hsum(acc);
      break;
    }
    case DistillKind::Jsd: {  // A = g = (1 - beta) q (log q - log m), B = q, K = sum g
      const T lb = V::set(p.log_beta), l1b = V::set(p.log_1mbeta), vb = V::set(p.beta), v1b = V::set(1.0f - p.beta);
      T gacc = V::set(0.0f);
      for (int64_t j = 0; j < np; j += W) {
        const T lq = V::sub(V::sub(V::load(zs + j), vms), vls), lp = V::sub(V::sub(V::load(zt + j), vmt), vlt);
        const T q = V::mul(V::load(es + j), vis), pp = V::mul(V::load(et + j), vit);
        const T a = V::add(lp, lb), b = V::add(lq, l1b);
        const T hi = V::max(a, b), lo = V::min(a, b);
        const T lm = V::add(hi, V::log1p_unit(V::exp_nonpos(V::sub(lo, hi))));
        const T gq = V::mul(V::mul(v1b, q), V::sub(lq, lm));
        T term = V::fmadd(V::mul(vb, pp), V::sub(lp, lm), gq);
        T g = gq;
        if (j == last) {
          term = V::keep_first(term, rem);
          g = V::keep_first(g, rem);
        }
        acc = V::add(acc, term);
        if (grad) {
          gacc = V::add(gacc, g);
          V::store(zs + j, g);
          V::store(es + j, q);
        }
      }
      K = V::hsum(gacc);
      break;
    }
  }
  const float D = V::hsum(acc);
  if (grad) {
    const T vc = V::set(p.c), vk = V::set(K);
    for (int64_t j = 0; j < np; j += W)
      V::store(es + j, V::mul(vc, V::sub(V::load(zs + j), V::mul(V::load(es + j), vk))));
    if (p.gdt == DType::F32) {
      std::memcpy(rd.grad, es, size_t(n) * 4);
    } else {
      uint16_t* g = static_cast<uint16_t*>(rd.grad);
      for (int64_t j = 0; j < n; ++j) g[j] = f32_to_bf16(es[j]);
    }
  }
  return D;
}

}  // namespace TK_DK_NS
}  // namespace

#endif  // TK_DISTILL_BODY
