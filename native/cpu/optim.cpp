// CPU AdamW step and gradient-norm clipping (see optim.h for the contract).
//
// Design:
// - Memory-bound streaming kernels: one pass over p, g, m, v (28 bytes an element for f32, 24 for
//   bf16 params and grads). The per-tensor hyperparameters are folded on the host, in double, into
//   fp32 constants (1 - beta, 1 - lr * wd, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)), so the
//   inner loop is 2 loads-and-widens, 4 mul, 4 FMA, 1 sqrt, 1 div and 3 stores a vector.
// - Multi-tensor: the list is treated as one concatenated range of elements, split evenly over the
//   threads in one parallel region (split points rounded down to 32 elements inside a tensor so
//   threads do not share cache lines); each thread walks the tensors its range overlaps.
// - SIMD paths (AVX-512, AVX2) use explicit FMA for every multiply-add, so -ffp-contract cannot
//   change their rounding, and handle tails by staging into a zero-padded vector on the stack and
//   running the same vector code. An element's result therefore depends only on its inputs, never
//   on where a thread or tensor boundary falls: the multi-tensor step is bitwise equal to
//   per-tensor steps for any thread count, and AVX2 equals AVX-512 bit for bit. The portable path
//   uses separate multiplies and adds (it may differ from the SIMD paths in the last bit).
// - BF16 stores round to nearest even with integer arithmetic (NaN kept quiet), matching
//   core/dtype.h, not VCVTNEPS2BF16 (which flushes subnormals).
// - Gradient norm: sum of squares in fp64 (a square of an fp32 value is exact in fp64, so only the
//   additions round). Tensors are cut into parts of kNormPart elements; part sums use a fixed lane
//   layout and are added in list order after the parallel region, so the result does not depend on
//   the thread count.
#include "optim.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {
namespace {

constexpr int64_t kGrain = int64_t(1) << 14;     // elements per thread below which a thread is not woken
constexpr int64_t kAlign = 32;                   // split points inside a tensor are multiples of this
constexpr int64_t kNormPart = int64_t(1) << 16;  // elements per norm part (fixes the summation order)

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

// The step's constants, folded in double and rounded once to fp32.
struct Coef {
  float gs, b1, omb1, b2, omb2, decay, step_size, rbc2, eps;
};

Coef make_coef(const AdamWParams& hp) {
  const double t = double(hp.step);
  const double bc1 = 1.0 - std::pow(double(hp.beta1), t);
  const double bc2 = 1.0 - std::pow(double(hp.beta2), t);
  Coef c;
  c.gs = hp.grad_scale;
  c.b1 = hp.beta1;
  c.omb1 = float(1.0 - double(hp.beta1));
  c.b2 = hp.beta2;
  c.omb2 = float(1.0 - double(hp.beta2));
  c.decay = float(1.0 - double(hp.lr) * double(hp.weight_decay));
  c.step_size = float(double(hp.lr) / bc1);
  c.rbc2 = float(1.0 / std::sqrt(bc2));
  c.eps = hp.eps;
  return c;
}

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void st(float* p, int64_t i, float x) { p[i] = x; }
inline void st(uint16_t* p, int64_t i, float x) { p[i] = f32_to_bf16(x); }

// ================================ portable ========================================================

template <class PT, class GT>
void adamw_scalar(PT* p, const GT* g, float* m, float* v, int64_t n, const Coef& c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = ld(g, i) * c.gs;
    const float mi = c.b1 * m[i] + c.omb1 * gi;
    const float vi = c.b2 * v[i] + (c.omb2 * gi) * gi;
    m[i] = mi;
    v[i] = vi;
    const float den = std::sqrt(vi) * c.rbc2 + c.eps;
    st(p, i, ld(p, i) * c.decay - c.step_size * (mi / den));
  }
}

template <class GT>
double sumsq_scalar(const GT* g, int64_t n) {
  double a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) {
      const double x = ld(g, i + l);
      a[l] += x * x;
    }
  for (int l = 0; i < n; ++i, ++l) {
    const double x = ld(g, i);
    a[l] += x * x;
  }
  return (a[0] + a[1]) + (a[2] + a[3]);
}

template <class GT>
void scale_scalar(GT* g, int64_t n, float coef) {
  for (int64_t i = 0; i < n; ++i) st(g, i, ld(g, i) * coef);
}

#if TK_SIMD_X86
// A zero-padded stack copy of the last r < W elements of a tensor, so that tails run through the
// same vector code as full vectors (and every element gets the same operations).
template <int W, class PT, class GT>
struct Stage {
  PT p[W] = {};
  GT g[W] = {};
  float m[W] = {}, v[W] = {};
  Stage(const PT* p0, const GT* g0, const float* m0, const float* v0, int64_t r) {
    std::memcpy(p, p0, size_t(r) * sizeof(PT));
    std::memcpy(g, g0, size_t(r) * sizeof(GT));
    std::memcpy(m, m0, size_t(r) * sizeof(float));
    std::memcpy(v, v0, size_t(r) * sizeof(float));
  }
  void store(PT* p0, float* m0, float* v0, int64_t r) const {
    std::memcpy(p0, p, size_t(r) * sizeof(PT));
    std::memcpy(m0, m, size_t(r) * sizeof(float));
    std::memcpy(v0, v, size_t(r) * sizeof(float));
  }
};

// ================================ AVX2 ============================================================

TK_AVX2 inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
TK_AVX2 inline __m256 ld8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
TK_AVX2 inline void st8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
TK_AVX2 inline void st8(uint16_t* p, __m256 x) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x400000);
  __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
  r = _mm256_srli_epi32(r, 16);  // every lane <= 0xffff, so the unsigned pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

struct Coef8 {
  __m256 gs, b1, omb1, b2, omb2, decay, step_size, rbc2, eps;
};

TK_AVX2 inline Coef8 broadcast8(const Coef& c) {
  return {_mm256_set1_ps(c.gs),    _mm256_set1_ps(c.b1),        _mm256_set1_ps(c.omb1),
          _mm256_set1_ps(c.b2),    _mm256_set1_ps(c.omb2),      _mm256_set1_ps(c.decay),
          _mm256_set1_ps(c.step_size), _mm256_set1_ps(c.rbc2), _mm256_set1_ps(c.eps)};
}

template <class PT, class GT>
TK_AVX2 inline void adamw8(PT* p, const GT* g, float* m, float* v, const Coef8& c) {
  const __m256 gi = _mm256_mul_ps(ld8(g), c.gs);
  const __m256 mi = _mm256_fmadd_ps(c.b1, _mm256_loadu_ps(m), _mm256_mul_ps(c.omb1, gi));
  const __m256 vi = _mm256_fmadd_ps(c.b2, _mm256_loadu_ps(v), _mm256_mul_ps(_mm256_mul_ps(c.omb2, gi), gi));
  _mm256_storeu_ps(m, mi);
  _mm256_storeu_ps(v, vi);
  const __m256 den = _mm256_fmadd_ps(_mm256_sqrt_ps(vi), c.rbc2, c.eps);
  st8(p, _mm256_fnmadd_ps(c.step_size, _mm256_div_ps(mi, den), _mm256_mul_ps(ld8(p), c.decay)));
}

template <class PT, class GT>
TK_AVX2 void adamw_avx2(PT* p, const GT* g, float* m, float* v, int64_t n, const Coef& cs) {
  const Coef8 c = broadcast8(cs);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    adamw8(p + i, g + i, m + i, v + i, c);
    adamw8(p + i + 8, g + i + 8, m + i + 8, v + i + 8, c);
  }
  for (; i + 8 <= n; i += 8) adamw8(p + i, g + i, m + i, v + i, c);
  if (i < n) {
    Stage<8, PT, GT> t(p + i, g + i, m + i, v + i, n - i);
    adamw8(t.p, t.g, t.m, t.v, c);
    t.store(p + i, m + i, v + i, n - i);
  }
}

TK_AVX2 inline __m256d sq_acc4(__m128 x, __m256d acc) {
  const __m256d d = _mm256_cvtps_pd(x);
  return _mm256_fmadd_pd(d, d, acc);
}

// 16 elements into 4 fp64 accumulators of 4 lanes.
template <class GT>
TK_AVX2 inline void sumsq16_avx2(const GT* q, __m256d* a) {
  const __m256 x0 = ld8(q), x1 = ld8(q + 8);
  a[0] = sq_acc4(_mm256_castps256_ps128(x0), a[0]);
  a[1] = sq_acc4(_mm256_extractf128_ps(x0, 1), a[1]);
  a[2] = sq_acc4(_mm256_castps256_ps128(x1), a[2]);
  a[3] = sq_acc4(_mm256_extractf128_ps(x1, 1), a[3]);
}

template <class GT>
TK_AVX2 double sumsq_avx2(const GT* g, int64_t n) {
  __m256d a[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) sumsq16_avx2(g + i, a);
  if (i < n) {
    GT tail[16] = {};
    std::memcpy(tail, g + i, size_t(n - i) * sizeof(GT));
    sumsq16_avx2(tail, a);
  }
  const __m256d a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const __m256d s = _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

template <class GT>
TK_AVX2 void scale_avx2(GT* g, int64_t n, float coef) {
  const __m256 c = _mm256_set1_ps(coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) st8(g + i, _mm256_mul_ps(ld8(g + i), c));
  if (i < n) {
    GT tail[8] = {};
    std::memcpy(tail, g + i, size_t(n - i) * sizeof(GT));
    st8(tail, _mm256_mul_ps(ld8(tail), c));
    std::memcpy(g + i, tail, size_t(n - i) * sizeof(GT));
  }
}

// ================================ AVX-512 =========================================================

TK_AVX512 inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
TK_AVX512 inline __m512 ld16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
TK_AVX512 inline void st16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
TK_AVX512 inline void st16(uint16_t* p, __m512 x) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x400000);
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, quiet);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

struct Coef16 {
  __m512 gs, b1, omb1, b2, omb2, decay, step_size, rbc2, eps;
};

TK_AVX512 inline Coef16 broadcast16(const Coef& c) {
  return {_mm512_set1_ps(c.gs),    _mm512_set1_ps(c.b1),        _mm512_set1_ps(c.omb1),
          _mm512_set1_ps(c.b2),    _mm512_set1_ps(c.omb2),      _mm512_set1_ps(c.decay),
          _mm512_set1_ps(c.step_size), _mm512_set1_ps(c.rbc2), _mm512_set1_ps(c.eps)};
}

template <class PT, class GT>
TK_AVX512 inline void adamw16(PT* p, const GT* g, float* m, float* v, const Coef16& c) {
  const __m512 gi = _mm512_mul_ps(ld16(g), c.gs);
  const __m512 mi = _mm512_fmadd_ps(c.b1, _mm512_loadu_ps(m), _mm512_mul_ps(c.omb1, gi));
  const __m512 vi = _mm512_fmadd_ps(c.b2, _mm512_loadu_ps(v), _mm512_mul_ps(_mm512_mul_ps(c.omb2, gi), gi));
  _mm512_storeu_ps(m, mi);
  _mm512_storeu_ps(v, vi);
  const __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(vi), c.rbc2, c.eps);
  st16(p, _mm512_fnmadd_ps(c.step_size, _mm512_div_ps(mi, den), _mm512_mul_ps(ld16(p), c.decay)));
}

template <class PT, class GT>
TK_AVX512 void adamw_avx512(PT* p, const GT* g, float* m, float* v, int64_t n, const Coef& cs) {
  const Coef16 c = broadcast16(cs);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    adamw16(p + i, g + i, m + i, v + i, c);
    adamw16(p + i + 16, g + i + 16, m + i + 16, v + i + 16, c);
  }
  for (; i + 16 <= n; i += 16) adamw16(p + i, g + i, m + i, v + i, c);
  if (i < n) {
    Stage<16, PT, GT> t(p + i, g + i, m + i, v + i, n - i);
    adamw16(t.p, t.g, t.m, t.v, c);
    t.store(p + i, m + i, v + i, n - i);
  }
}

TK_AVX512 inline __m512d sq_acc8(__m256 x, __m512d acc) {
  const __m512d d = _mm512_cvtps_pd(x);
  return _mm512_fmadd_pd(d, d, acc);
}

// 32 elements into 4 fp64 accumulators of 8 lanes.
template <class GT>
TK_AVX512 inline void sumsq32_avx512(const GT* q, __m512d* a) {
  const __m512 x0 = ld16(q), x1 = ld16(q + 16);
  a[0] = sq_acc8(_mm512_castps512_ps256(x0), a[0]);
  a[1] = sq_acc8(_mm512_extractf32x8_ps(x0, 1), a[1]);
  a[2] = sq_acc8(_mm512_castps512_ps256(x1), a[2]);
  a[3] = sq_acc8(_mm512_extractf32x8_ps(x1, 1), a[3]);
}

template <class GT>
TK_AVX512 double sumsq_avx512(const GT* g, int64_t n) {
  __m512d a[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) sumsq32_avx512(g + i, a);
  if (i < n) {
    GT tail[32] = {};
    std::memcpy(tail, g + i, size_t(n - i) * sizeof(GT));
    sumsq32_avx512(tail, a);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a[0], a[1]), _mm512_add_pd(a[2], a[3])));
}

template <class GT>
TK_AVX512 void scale_avx512(GT* g, int64_t n, float coef) {
  const __m512 c = _mm512_set1_ps(coef);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) st16(g + i, _mm512_mul_ps(ld16(g + i), c));
  if (i < n) {
    GT tail[16] = {};
    std::memcpy(tail, g + i, size_t(n - i) * sizeof(GT));
    st16(tail, _mm512_mul_ps(ld16(tail), c));
    std::memcpy(g + i, tail, size_t(n - i) * sizeof(GT));
  }
}
#endif  // TK_SIMD_X86

// ================================ dispatch ========================================================

template <class PT, class GT>
void adamw_typed(Level L, PT* p, const GT* g, float* m, float* v, int64_t n, const Coef& c) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return adamw_avx512(p, g, m, v, n, c);
  if (L == Level::Avx2) return adamw_avx2(p, g, m, v, n, c);
#endif
  adamw_scalar(p, g, m, v, n, c);
}

// Elements [lo, hi) of one tensor.
void adamw_range(Level L, const AdamWTensor& t, int64_t lo, int64_t hi, const Coef& c) {
  float* m = t.m + lo;
  float* v = t.v + lo;
  const int64_t n = hi - lo;
  const bool pf = t.param_dtype == DType::F32, gf = t.grad_dtype == DType::F32;
  if (pf) {
    float* p = static_cast<float*>(t.param) + lo;
    if (gf) adamw_typed(L, p, static_cast<const float*>(t.grad) + lo, m, v, n, c);
    else adamw_typed(L, p, static_cast<const uint16_t*>(t.grad) + lo, m, v, n, c);
  } else {
    uint16_t* p = static_cast<uint16_t*>(t.param) + lo;
    if (gf) adamw_typed(L, p, static_cast<const float*>(t.grad) + lo, m, v, n, c);
    else adamw_typed(L, p, static_cast<const uint16_t*>(t.grad) + lo, m, v, n, c);
  }
}

template <class GT>
double sumsq_typed(Level L, const GT* g, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return sumsq_avx512(g, n);
  if (L == Level::Avx2) return sumsq_avx2(g, n);
#endif
  return sumsq_scalar(g, n);
}

double sumsq_range(Level L, const GradTensor& t, int64_t lo, int64_t hi) {
  if (t.dtype == DType::F32) return sumsq_typed(L, static_cast<const float*>(t.data) + lo, hi - lo);
  return sumsq_typed(L, static_cast<const uint16_t*>(t.data) + lo, hi - lo);
}

template <class GT>
void scale_typed(Level L, GT* g, int64_t n, float coef) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return scale_avx512(g, n, coef);
  if (L == Level::Avx2) return scale_avx2(g, n, coef);
#endif
  scale_scalar(g, n, coef);
}

void scale_range(Level L, const GradTensor& t, int64_t lo, int64_t hi, float coef) {
  if (t.dtype == DType::F32) scale_typed(L, static_cast<float*>(t.data) + lo, hi - lo, coef);
  else scale_typed(L, static_cast<uint16_t*>(t.data) + lo, hi - lo, coef);
}

// ================================ list splitting ==================================================

// A list of tensors seen as one concatenated range of elements.
class Concat {
 public:
  template <class T>
  Concat(const T* ts, int64_t count) : start_(size_t(count) + 1, 0) {
    for (int64_t i = 0; i < count; ++i) start_[size_t(i) + 1] = start_[size_t(i)] + ts[i].n;
  }
  int64_t total() const { return start_.back(); }
  int64_t count() const { return int64_t(start_.size()) - 1; }

  // Threads for `total` elements: one per kGrain elements, at most the pool's size.
  int threads(const ThreadPool& pool) const {
    return int(std::max<int64_t>(1, std::min<int64_t>(pool.size(), total() / kGrain)));
  }

  // The first element of thread t of nt: an even split of the concatenation, rounded down to a
  // multiple of kAlign inside the tensor it falls in (so bound is monotonic in t).
  int64_t bound(int t, int nt) const {
    if (t <= 0) return 0;
    if (t >= nt) return total();
    const int64_t g = total() / nt * t + total() % nt * t / nt;  // floor(total * t / nt) without overflow
    const size_t i = size_t(std::upper_bound(start_.begin(), start_.end(), g) - start_.begin()) - 1;
    return start_[i] + ((g - start_[i]) & ~(kAlign - 1));
  }

  // fn(tensor index, lo, hi) for every tensor overlapping global range [b, e), in list order.
  template <class F>
  void for_range(int64_t b, int64_t e, F&& fn) const {
    if (b >= e) return;
    size_t i = size_t(std::upper_bound(start_.begin(), start_.end(), b) - start_.begin()) - 1;
    for (; i + 1 < start_.size() && start_[i] < e; ++i) {
      const int64_t lo = std::max(b, start_[i]), hi = std::min(e, start_[i + 1]);
      if (lo < hi) fn(int64_t(i), lo - start_[i], hi - start_[i]);
    }
  }

 private:
  std::vector<int64_t> start_;  // [count + 1] prefix sums of the sizes
};

void check_adamw(const AdamWTensor* ts, int64_t count, const AdamWParams& hp) {
  const char* name = "adamw_step_cpu";
  TK_CHECK(count >= 0 && (count == 0 || ts != nullptr), name, ": bad tensor list (count ", count, ")");
  TK_CHECK(hp.step >= 1, name, ": step must count from 1, got ", hp.step);
  TK_CHECK(hp.beta1 >= 0 && hp.beta1 < 1, name, ": beta1 must be in [0, 1), got ", hp.beta1);
  TK_CHECK(hp.beta2 >= 0 && hp.beta2 < 1, name, ": beta2 must be in [0, 1), got ", hp.beta2);
  TK_CHECK(hp.lr >= 0, name, ": lr must be >= 0, got ", hp.lr);
  TK_CHECK(hp.eps >= 0, name, ": eps must be >= 0, got ", hp.eps);
  TK_CHECK(hp.weight_decay >= 0, name, ": weight_decay must be >= 0, got ", hp.weight_decay);
  for (int64_t i = 0; i < count; ++i) {
    const AdamWTensor& t = ts[i];
    TK_CHECK(t.n >= 0, name, ": tensor ", i, " has negative size ", t.n);
    TK_CHECK(t.param_dtype == DType::F32 || t.param_dtype == DType::BF16, name, ": tensor ", i, " param dtype ",
             dtype_name(t.param_dtype), " is not supported (f32 or bf16)");
    TK_CHECK(t.grad_dtype == DType::F32 || t.grad_dtype == DType::BF16, name, ": tensor ", i, " grad dtype ",
             dtype_name(t.grad_dtype), " is not supported (f32 or bf16)");
    TK_CHECK(t.n == 0 || (t.param && t.grad && t.m && t.v), name, ": tensor ", i, " has a null buffer");
  }
}

void check_grads(const char* name, const GradTensor* gs, int64_t count) {
  TK_CHECK(count >= 0 && (count == 0 || gs != nullptr), name, ": bad gradient list (count ", count, ")");
  for (int64_t i = 0; i < count; ++i) {
    TK_CHECK(gs[i].n >= 0, name, ": gradient ", i, " has negative size ", gs[i].n);
    TK_CHECK(gs[i].dtype == DType::F32 || gs[i].dtype == DType::BF16, name, ": gradient ", i, " dtype ",
             dtype_name(gs[i].dtype), " is not supported (f32 or bf16)");
    TK_CHECK(gs[i].n == 0 || gs[i].data, name, ": gradient ", i, " has a null buffer");
  }
}

}  // namespace

// param: [n] param_dtype, grad: [n] grad_dtype, m, v: [n] f32.
void adamw_step_cpu(void* param, const void* grad, float* m, float* v, int64_t n, DType param_dtype,
                    DType grad_dtype, const AdamWParams& hp, ThreadPool& pool) {
  const AdamWTensor t{param, grad, m, v, n, param_dtype, grad_dtype};
  adamw_step_multi_cpu(&t, 1, hp, pool);
}

// tensors: [count] AdamWTensor.
void adamw_step_multi_cpu(const AdamWTensor* tensors, int64_t count, const AdamWParams& hp, ThreadPool& pool) {
  check_adamw(tensors, count, hp);
  const Concat cat(tensors, count);
  if (cat.total() == 0) return;
  const Coef c = make_coef(hp);
  const Level L = level();
  pool.parallel(
      [&](int tid, int nt) {
        cat.for_range(cat.bound(tid, nt), cat.bound(tid + 1, nt),
                      [&](int64_t i, int64_t lo, int64_t hi) { adamw_range(L, tensors[i], lo, hi, c); });
      },
      cat.threads(pool));
}

// grads: [count] GradTensor -> sum of squares (fp64).
double grad_norm_sq_cpu(const GradTensor* grads, int64_t count, ThreadPool& pool) {
  check_grads("grad_norm_sq_cpu", grads, count);
  // Parts depend only on the list: part k of tensor i covers [k * kNormPart, (k + 1) * kNormPart).
  struct Part {
    int64_t tensor, lo, hi, gstart;
  };
  std::vector<Part> parts;
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t lo = 0; lo < grads[i].n; lo += kNormPart)
      parts.push_back({i, lo, std::min(grads[i].n, lo + kNormPart), total + lo});
    total += grads[i].n;
  }
  if (parts.empty()) return 0.0;
  std::vector<double> sums(parts.size(), 0.0);
  const Level L = level();
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(pool.size(), total / kGrain)));
  pool.parallel(
      [&](int tid, int nthreads) {
        // Thread tid takes the parts that start in its even share of the concatenated elements.
        auto first = [&](int t) {
          const int64_t g = total / nthreads * t + total % nthreads * t / nthreads;
          return size_t(std::lower_bound(parts.begin(), parts.end(), g,
                                         [](const Part& p, int64_t x) { return p.gstart < x; }) -
                        parts.begin());
        };
        const size_t b = first(tid), e = tid + 1 == nthreads ? parts.size() : first(tid + 1);
        for (size_t j = b; j < e; ++j) sums[j] = sumsq_range(L, grads[parts[j].tensor], parts[j].lo, parts[j].hi);
      },
      nt);
  double s = 0.0;
  for (double x : sums) s += x;
  return s;
}

float clip_coefficient(double total_norm, double max_norm) {
  // torch: clip_coef = max_norm / (total_norm + 1e-6); torch.clamp(clip_coef, max=1.0), in fp32.
  const float coef = float(max_norm) / (float(total_norm) + 1e-6f);
  return coef > 1.0f ? 1.0f : coef;  // NaN stays NaN, as torch.clamp keeps it
}

// grads: [count] GradTensor, scaled in place.
void scale_grads_cpu(const GradTensor* grads, int64_t count, float coef, ThreadPool& pool) {
  check_grads("scale_grads_cpu", grads, count);
  const Concat cat(grads, count);
  if (cat.total() == 0) return;
  const Level L = level();
  pool.parallel(
      [&](int tid, int nt) {
        cat.for_range(cat.bound(tid, nt), cat.bound(tid + 1, nt),
                      [&](int64_t i, int64_t lo, int64_t hi) { scale_range(L, grads[i], lo, hi, coef); });
      },
      cat.threads(pool));
}

}  // namespace tk
