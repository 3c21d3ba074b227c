// CPU loss kernels: cross entropy, sequence log-probabilities, DPO (see loss.h for the contracts).
//
// Design:
// - Every vocabulary row goes through two fp32 primitives:
//     row_lse:  one pass, online max/sum (Milakov & Gimelshein): per SIMD lane a running max m and
//               a sum s of exp(x - m); blocks of 4 vectors take their lane max first, and only when
//               it exceeds m (rare after the first blocks) are the sums rescaled by exp(m - m_new).
//               The lanes are combined at the end: lse = M + log(sum_l s_l exp(m_l - M)). So the
//               cost is ~1 exp per logit and exp never sees a positive argument (no overflow for
//               logits of any size; ±1e4 works).
//     row_grad: one pass, g = exp(x - lse) * scale; the target element then gets -scale.
//   The fused kernel runs both on a row back to back, so the second read hits L2 (a 32K-vocab fp32
//   row is 128 KB); the split backward reads logits once and writes dlogits once.
// - Each primitive exists for AVX-512 (masked tails, masked-off lanes read as -inf), AVX2 (a
//   masked load for the tail) and portable code (8 scalar lanes with std::exp, so its summation
//   tree is as shallow as the SIMD paths'). The level comes from active_isa() at each call; the
//   binary is built for baseline x86-64, so the AVX paths carry function-level target attributes.
//   Avx512Bf16 runs the AVX-512 code (bf16 rounding is done with integer code, as elsewhere).
// - BF16 rows are widened into a per-thread fp32 row buffer, and gradients are computed there and
//   rounded once (nearest even, NaN kept quiet) into dlogits.
// - Threads split rows with a grain of ~16K logits. Per-row results land in per-row slots; sums
//   over rows (the reduced loss, sequence sums over t) are taken afterwards, in order, in double,
//   so every result is independent of the thread count.
// - The SIMD exp is Cephes' expf: n = round(a / ln 2), r = a - n ln2 (ln 2 split in two parts),
//   exp(r) ~ 1 + r + r^2 P(r) (degree 5 P), scaled by 2^n built in the exponent bits. Arguments are
//   clamped at ln(FLT_MIN) and results below it flushed to 0, so 2^n never leaves the normal range.
// - DPO is O(B) scalar work on [B] vectors, done in double with a stable logsigmoid.
#include "loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {

#if TK_SIMD_X86
using simd::bf16_round16;
using simd::bf16_round8;
using simd::exp_nonpos16;
using simd::exp_nonpos8;
#endif

const char* reduction_name(LossReduction r) {
  switch (r) {
    case LossReduction::None: return "none";
    case LossReduction::Sum: return "sum";
    case LossReduction::Mean: return "mean";
  }
  return "?";
}

const char* dpo_kind_name(DpoKind k) {
  switch (k) {
    case DpoKind::Sigmoid: return "sigmoid";
    case DpoKind::Ipo: return "ipo";
    case DpoKind::Hinge: return "hinge";
  }
  return "?";
}

namespace {

constexpr int64_t kGrain = 16384;  // logits per thread below which a second thread does not pay
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

// lse from the lane maxima m[l] and sums s[l] (s[l] = sum exp(x - m[l]) over lane l), with the
// row's non-finite flag: NaN for NaN/+inf rows, -inf for rows that are all -inf.
float combine_lanes(const float* m, const float* s, int lanes, bool bad) {
  if (bad) return kNaN;
  float M = -kInf;
  for (int l = 0; l < lanes; ++l) M = std::max(M, m[l]);
  if (M == -kInf) return -kInf;
  float S = 0;
  for (int l = 0; l < lanes; ++l)
    if (m[l] != -kInf) S += s[l] * std::exp(m[l] - M);
  return M + std::log(S);
}

// ================================ portable row primitives ========================================

void widen_scalar(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void narrow_scalar(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}

void vexp_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}

// 8 interleaved lanes, each an online max/sum.
float row_lse_scalar(const float* x, int64_t n) {
  float m[8], s[8];
  bool bad = false;
  for (int l = 0; l < 8; ++l) m[l] = -kInf, s[l] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int l = int(i & 7);
    const float v = x[i];
    if (!(v < kInf)) {  // NaN or +inf
      bad = true;
      continue;
    }
    if (v > m[l]) {
      s[l] = s[l] * std::exp(m[l] - v) + 1.0f;  // exp(-inf) = 0 on a lane's first finite value
      m[l] = v;
    } else if (v != -kInf) {
      s[l] += std::exp(v - m[l]);
    }
  }
  return combine_lanes(m, s, 8, bad);
}

void row_grad_scalar(const float* x, int64_t n, float lse, float scale, float* g) {
  for (int64_t i = 0; i < n; ++i) g[i] = std::exp(x[i] - lse) * scale;
}

#if TK_SIMD_X86
// ================================ AVX2 ============================================================

// Lanes [0, k) of an 8-lane vector, 0 < k <= 8, as an integer mask for maskload/maskstore.
TK_AVX2 inline __m256i tail_mask8(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

TK_AVX2 void widen_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  widen_scalar(s + i, d + i, n - i);
}

TK_AVX2 void narrow_avx2(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), bf16_round8(_mm256_loadu_ps(s + i)));
  narrow_scalar(s + i, d + i, n - i);
}

TK_AVX2 void vexp_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp_nonpos8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    __m256i k = tail_mask8(n - i);
    _mm256_maskstore_ps(y + i, k, exp_nonpos8(_mm256_maskload_ps(x + i, k)));
  }
}

// Folds one vector into the lane state: sums rescaled only when some lane's max grows.
TK_AVX2 inline void online8(__m256 v, __m256& m, __m256& s) {
  __m256 mn = _mm256_max_ps(m, v);
  if (_mm256_movemask_ps(_mm256_cmp_ps(mn, m, _CMP_GT_OQ))) {
    s = _mm256_mul_ps(s, exp_nonpos8(_mm256_sub_ps(m, mn)));  // -inf - finite: exp gives 0
    m = mn;
  }
  s = _mm256_add_ps(s, exp_nonpos8(_mm256_sub_ps(v, m)));  // -inf - (-inf) = NaN: exp gives 0
}

TK_AVX2 float row_lse_avx2(const float* x, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-kInf), pinf = _mm256_set1_ps(kInf);
  __m256 m = ninf, s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, bad = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, pinf, _CMP_NLT_UQ), _mm256_cmp_ps(v1, pinf, _CMP_NLT_UQ)),
                                         _mm256_or_ps(_mm256_cmp_ps(v2, pinf, _CMP_NLT_UQ), _mm256_cmp_ps(v3, pinf, _CMP_NLT_UQ))));
    __m256 bm = _mm256_max_ps(_mm256_max_ps(v0, v1), _mm256_max_ps(v2, v3));
    if (_mm256_movemask_ps(_mm256_cmp_ps(bm, m, _CMP_GT_OQ))) {
      __m256 mn = _mm256_max_ps(m, bm);
      __m256 c = exp_nonpos8(_mm256_sub_ps(m, mn));
      s0 = _mm256_mul_ps(s0, c);
      s1 = _mm256_mul_ps(s1, c);
      s2 = _mm256_mul_ps(s2, c);
      s3 = _mm256_mul_ps(s3, c);
      m = mn;
    }
    s0 = _mm256_add_ps(s0, exp_nonpos8(_mm256_sub_ps(v0, m)));
    s1 = _mm256_add_ps(s1, exp_nonpos8(_mm256_sub_ps(v1, m)));
    s2 = _mm256_add_ps(s2, exp_nonpos8(_mm256_sub_ps(v2, m)));
    s3 = _mm256_add_ps(s3, exp_nonpos8(_mm256_sub_ps(v3, m)));
  }
  s0 = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  for (; i < n; i += 8) {
    __m256 v;
    if (n - i >= 8) {
      v = _mm256_loadu_ps(x + i);
    } else {
      __m256i k = tail_mask8(n - i);
      v = _mm256_blendv_ps(ninf, _mm256_maskload_ps(x + i, k), _mm256_castsi256_ps(k));
    }
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, pinf, _CMP_NLT_UQ));
    online8(v, m, s0);
  }
  alignas(32) float ml[8], sl[8];
  _mm256_store_ps(ml, m);
  _mm256_store_ps(sl, s0);
  return combine_lanes(ml, sl, 8, _mm256_movemask_ps(bad) != 0);
}

TK_AVX2 void row_grad_avx2(const float* x, int64_t n, float lse, float scale, float* g) {
  const __m256 vl = _mm256_set1_ps(lse), vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 e0 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vl));
    __m256 e1 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vl));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(e0, vs));
    _mm256_storeu_ps(g + i + 8, _mm256_mul_ps(e1, vs));
  }
  for (; i < n; i += 8) {
    if (n - i >= 8) {
      _mm256_storeu_ps(g + i, _mm256_mul_ps(exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vl)), vs));
    } else {
      __m256i k = tail_mask8(n - i);
      _mm256_maskstore_ps(g + i, k, _mm256_mul_ps(exp_nonpos8(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), vl)), vs));
    }
  }
}

// ================================ AVX-512 =========================================================

TK_AVX512 inline __mmask16 tail_mask(int64_t k) { return __mmask16((1u << k) - 1u); }

TK_AVX512 void widen_avx512(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
    _mm512_mask_storeu_ps(d + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

TK_AVX512 void narrow_avx512(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    _mm256_mask_storeu_epi16(d + i, m, bf16_round16(_mm512_maskz_loadu_ps(m, s + i)));
  }
}

TK_AVX512 void vexp_avx512(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, exp_nonpos16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

TK_AVX512 float row_lse_avx512(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-kInf), pinf = _mm512_set1_ps(kInf);
  __m512 m = ninf, s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
    bad |= _mm512_cmp_ps_mask(v0, pinf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(v1, pinf, _CMP_NLT_UQ) |
           _mm512_cmp_ps_mask(v2, pinf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(v3, pinf, _CMP_NLT_UQ);
    __m512 bm = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
    if (_mm512_cmp_ps_mask(bm, m, _CMP_GT_OQ)) {
      __m512 mn = _mm512_max_ps(m, bm);
      __m512 c = exp_nonpos16(_mm512_sub_ps(m, mn));
      s0 = _mm512_mul_ps(s0, c);
      s1 = _mm512_mul_ps(s1, c);
      s2 = _mm512_mul_ps(s2, c);
      s3 = _mm512_mul_ps(s3, c);
      m = mn;
    }
    s0 = _mm512_add_ps(s0, exp_nonpos16(_mm512_sub_ps(v0, m)));
    s1 = _mm512_add_ps(s1, exp_nonpos16(_mm512_sub_ps(v1, m)));
    s2 = _mm512_add_ps(s2, exp_nonpos16(_mm512_sub_ps(v2, m)));
    s3 = _mm512_add_ps(s3, exp_nonpos16(_mm512_sub_ps(v3, m)));
  }
  s0 = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
  for (; i < n; i += 16) {
    __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512 v = _mm512_mask_loadu_ps(ninf, k, x + i);  // masked-off lanes read as -inf
    bad |= _mm512_cmp_ps_mask(v, pinf, _CMP_NLT_UQ);
    __m512 mn = _mm512_max_ps(m, v);
    if (_mm512_cmp_ps_mask(mn, m, _CMP_GT_OQ)) {
      s0 = _mm512_mul_ps(s0, exp_nonpos16(_mm512_sub_ps(m, mn)));
      m = mn;
    }
    s0 = _mm512_add_ps(s0, exp_nonpos16(_mm512_sub_ps(v, m)));
  }
  alignas(64) float ml[16], sl[16];
  _mm512_store_ps(ml, m);
  _mm512_store_ps(sl, s0);
  return combine_lanes(ml, sl, 16, bad != 0);
}

TK_AVX512 void row_grad_avx512(const float* x, int64_t n, float lse, float scale, float* g) {
  const __m512 vl = _mm512_set1_ps(lse), vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 e0 = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vl));
    __m512 e1 = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vl));
    _mm512_storeu_ps(g + i, _mm512_mul_ps(e0, vs));
    _mm512_storeu_ps(g + i + 16, _mm512_mul_ps(e1, vs));
  }
  for (; i < n; i += 16) {
    __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(exp_nonpos16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vl)), vs));
  }
}
#endif  // TK_SIMD_X86

// ================================ dispatch =======================================================

#if TK_SIMD_X86
#define TK_DISPATCH(L, name, ...)                                \
  do {                                                           \
    if ((L) == Level::Avx512) return name##_avx512(__VA_ARGS__); \
    if ((L) == Level::Avx2) return name##_avx2(__VA_ARGS__);     \
    return name##_scalar(__VA_ARGS__);                           \
  } while (0)
#else
#define TK_DISPATCH(L, name, ...)      \
  do {                                 \
    (void)(L);                         \
    return name##_scalar(__VA_ARGS__); \
  } while (0)
#endif

void widen(Level L, const uint16_t* s, float* d, int64_t n) { TK_DISPATCH(L, widen, s, d, n); }
void narrow(Level L, const float* s, uint16_t* d, int64_t n) { TK_DISPATCH(L, narrow, s, d, n); }
void vexp(Level L, const float* x, float* y, int64_t n) { TK_DISPATCH(L, vexp, x, y, n); }
float row_lse(Level L, const float* x, int64_t n) { TK_DISPATCH(L, row_lse, x, n); }
void row_grad(Level L, const float* x, int64_t n, float lse, float scale, float* g) {
  TK_DISPATCH(L, row_grad, x, n, lse, scale, g);
}
#undef TK_DISPATCH

// ================================ argument checks ================================================

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

// logits [..., V], F32 | BF16: returns V (N = numel / V).
int64_t check_logits(const TensorView& x, const char* op) {
  check_tensor(x, op, "logits");
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": logits ", describe(x), " must be f32 or bf16");
  TK_CHECK(x.ndim >= 1 && x.shape[x.ndim - 1] >= 1, op, ": logits ", describe(x),
           " must have a last (vocabulary) dim V >= 1");
  return x.shape[x.ndim - 1];
}

void check_dlogits(const TensorView& d, const TensorView& x, const char* op) {
  check_tensor(d, op, "dlogits");
  bool same = d.ndim == x.ndim && d.dtype == x.dtype;
  for (int i = 0; same && i < x.ndim; ++i) same = d.shape[i] == x.shape[i];
  TK_CHECK(same, op, ": dlogits ", describe(d), " must match logits ", describe(x));
}

// targets: N elements I32, each ignore_index or in [0, V). Returns the number of non-ignored ones.
int64_t check_targets(const TensorView& t, int64_t N, int64_t V, int32_t ignore_index, const char* op) {
  check_tensor(t, op, "targets");
  TK_CHECK(t.dtype == DType::I32, op, ": targets ", describe(t), " must be i32");
  TK_CHECK(t.numel() == N, op, ": targets ", describe(t), " must have ", N, " elements (one per logits row)");
  const int32_t* p = t.ptr<const int32_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (p[i] == ignore_index) continue;
    TK_CHECK(p[i] >= 0 && p[i] < V, op, ": targets[", i, "] = ", p[i], " is out of range for V = ", V,
             " (and is not ignore_index = ", ignore_index, ")");
    ++valid;
  }
  return valid;
}

void check_reduction(LossReduction r, const char* op) {
  TK_CHECK(r == LossReduction::None || r == LossReduction::Sum || r == LossReduction::Mean, op,
           ": unknown reduction ", int(r));
}

// ================================ row drivers ====================================================

// What a row pass does with each non-ignored row.
struct RowJob {
  const TensorView* logits = nullptr;
  const int32_t* targets = nullptr;
  int32_t ignore_index = 0;
  int64_t N = 0, V = 0;
  float* lse_out = nullptr;      // forward: write lse and row loss
  float* loss_out = nullptr;
  const float* lse_in = nullptr; // backward: lse from the forward (else the one just computed)
  const TensorView* dlogits = nullptr;  // backward: write the gradient
  // the row's upstream gradient: scale_vec[n] * scale (scale_vec may be null)
  const float* scale_vec = nullptr;
  float scale = 1.0f;
};

void run_rows(const RowJob& job, ThreadPool& pool) {
  const Level L = level();
  const int64_t V = job.V;
  const bool bf16 = job.logits->dtype == DType::BF16;
  pool.parallel_for(job.N, std::max<int64_t>(1, kGrain / V), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(bf16 ? size_t(V) : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t t = job.targets[n];
      const bool ignored = t == job.ignore_index;
      const float* x = nullptr;
      if (!ignored) {
        if (bf16) {
          widen(L, job.logits->ptr<const uint16_t>() + n * V, buf.data(), V);
          x = buf.data();
        } else {
          x = job.logits->ptr<const float>() + n * V;
        }
      }
      float lse = 0;
      if (job.lse_in) {
        lse = job.lse_in[n];
      } else if (!ignored) {
        lse = row_lse(L, x, V);
      }
      if (job.lse_out) {
        job.lse_out[n] = ignored ? 0.0f : lse;
        job.loss_out[n] = ignored ? 0.0f : lse - x[t];
      }
      if (!job.dlogits) continue;
      const float g = ignored ? 0.0f : (job.scale_vec ? job.scale_vec[n] : 1.0f) * job.scale;
      if (!ignored && std::isnan(lse)) {  // a NaN/+inf row: the SIMD exp maps NaN to 0, so say it here
        if (bf16) {
          std::fill(job.dlogits->ptr<uint16_t>() + n * V, job.dlogits->ptr<uint16_t>() + (n + 1) * V, f32_to_bf16(kNaN));
        } else {
          std::fill(job.dlogits->ptr<float>() + n * V, job.dlogits->ptr<float>() + (n + 1) * V, kNaN);
        }
        continue;
      }
      if (bf16) {
        uint16_t* d = job.dlogits->ptr<uint16_t>() + n * V;
        if (ignored) {
          std::memset(d, 0, size_t(V) * 2);
          continue;
        }
        const float xt = x[t];
        row_grad(L, x, V, lse, g, buf.data());  // in place over the widened row
        buf[size_t(t)] = std::exp(xt - lse) * g - g;
        narrow(L, buf.data(), d, V);
      } else {
        float* d = job.dlogits->ptr<float>() + n * V;
        if (ignored) {
          std::memset(d, 0, size_t(V) * 4);
          continue;
        }
        const float xt = x[t];  // read before the row is written: d may alias x
        row_grad(L, x, V, lse, g, d);
        d[t] = std::exp(xt - lse) * g - g;
      }
    }
  });
}

// Writes the Sum/Mean reduction of losses[0..N) into loss[0].
void reduce_losses(const float* losses, int64_t N, int64_t valid, LossReduction r, const TensorView& loss) {
  if (r == LossReduction::None) return;
  double s = 0;
  for (int64_t n = 0; n < N; ++n) s += losses[n];
  if (r == LossReduction::Mean) s = valid > 0 ? s / double(valid) : 0.0;
  loss.ptr<float>()[0] = float(s);
}

// Checks shared by the cross-entropy entry points; returns {N, V, valid}.
struct CeDims {
  int64_t N, V, valid;
};
CeDims check_ce(const TensorView& logits, const TensorView& targets, int32_t ignore_index, LossReduction r,
                const char* op) {
  check_reduction(r, op);
  const int64_t V = check_logits(logits, op);
  const int64_t N = logits.numel() / V;
  const int64_t valid = check_targets(targets, N, V, ignore_index, op);
  return {N, V, valid};
}

void check_ce_forward_outputs(const CeDims& d, LossReduction r, const TensorView& losses, const TensorView& lse,
                              const TensorView& loss, const char* op) {
  check_f32(losses, d.N, op, "losses");
  check_f32(lse, d.N, op, "lse");
  if (r != LossReduction::None) check_f32(loss, 1, op, "loss");
}

// ================================ DPO scalar math ================================================

double log_sigmoid(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::fabs(x))); }
double sigmoid(double x) {
  double e = std::exp(-std::fabs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

void check_dpo(const TensorView& pc, const TensorView& pr, const TensorView& rc, const TensorView& rr,
               const DpoParams& p, const char* op) {
  check_tensor(pc, op, "policy_chosen");
  TK_CHECK(pc.dtype == DType::F32, op, ": policy_chosen ", describe(pc), " must be f32");
  const int64_t B = pc.numel();
  check_f32(pr, B, op, "policy_rejected");
  check_f32(rc, B, op, "ref_chosen");
  check_f32(rr, B, op, "ref_rejected");
  TK_CHECK(std::isfinite(p.beta) && p.beta > 0, op, ": beta = ", p.beta, " must be finite and > 0");
  TK_CHECK(p.kind == DpoKind::Sigmoid || p.kind == DpoKind::Ipo || p.kind == DpoKind::Hinge, op,
           ": unknown kind ", int(p.kind));
  TK_CHECK(p.label_smoothing >= 0 && p.label_smoothing <= 0.5f, op, ": label_smoothing = ", p.label_smoothing,
           " must be in [0, 0.5]");
}

}  // namespace

// ================================ public entry points ============================================

void vexp_nonpos_cpu(const float* x, float* y, int64_t n) { vexp(level(), x, y, n); }

void cross_entropy_forward_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                               LossReduction reduction, const TensorView& losses, const TensorView& lse,
                               const TensorView& loss, ThreadPool& pool) {
  const char* op = "cross_entropy_forward_cpu";
  const CeDims d = check_ce(logits, targets, ignore_index, reduction, op);
  check_ce_forward_outputs(d, reduction, losses, lse, loss, op);
  RowJob job;
  job.logits = &logits;
  job.targets = targets.ptr<const int32_t>();
  job.ignore_index = ignore_index;
  job.N = d.N;
  job.V = d.V;
  job.lse_out = lse.ptr<float>();
  job.loss_out = losses.ptr<float>();
  run_rows(job, pool);
  reduce_losses(losses.ptr<const float>(), d.N, d.valid, reduction, loss);
}

void cross_entropy_backward_cpu(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                const TensorView& dloss, int32_t ignore_index, LossReduction reduction,
                                const TensorView& dlogits, ThreadPool& pool) {
  const char* op = "cross_entropy_backward_cpu";
  const CeDims d = check_ce(logits, targets, ignore_index, reduction, op);
  check_f32(lse, d.N, op, "lse");
  check_f32(dloss, reduction == LossReduction::None ? d.N : 1, op, "dloss");
  check_dlogits(dlogits, logits, op);
  RowJob job;
  job.logits = &logits;
  job.targets = targets.ptr<const int32_t>();
  job.ignore_index = ignore_index;
  job.N = d.N;
  job.V = d.V;
  job.lse_in = lse.ptr<const float>();
  job.dlogits = &dlogits;
  if (reduction == LossReduction::None) {
    job.scale_vec = dloss.ptr<const float>();
  } else {
    job.scale = dloss.ptr<const float>()[0];
    if (reduction == LossReduction::Mean) job.scale = d.valid > 0 ? float(double(job.scale) / double(d.valid)) : 0.0f;
  }
  run_rows(job, pool);
}

void cross_entropy_fused_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                             LossReduction reduction, float dloss, const TensorView& losses, const TensorView& lse,
                             const TensorView& loss, const TensorView& dlogits, ThreadPool& pool) {
  const char* op = "cross_entropy_fused_cpu";
  const CeDims d = check_ce(logits, targets, ignore_index, reduction, op);
  check_ce_forward_outputs(d, reduction, losses, lse, loss, op);
  check_dlogits(dlogits, logits, op);
  RowJob job;
  job.logits = &logits;
  job.targets = targets.ptr<const int32_t>();
  job.ignore_index = ignore_index;
  job.N = d.N;
  job.V = d.V;
  job.lse_out = lse.ptr<float>();
  job.loss_out = losses.ptr<float>();
  job.dlogits = &dlogits;
  job.scale = dloss;
  if (reduction == LossReduction::Mean) job.scale = d.valid > 0 ? float(double(dloss) / double(d.valid)) : 0.0f;
  run_rows(job, pool);
  reduce_losses(losses.ptr<const float>(), d.N, d.valid, reduction, loss);
}

// logits [B, T, V], targets [B, T]: returns {B, T, V}.
namespace {
struct SeqDims {
  int64_t B, T, V;
};
SeqDims check_seq(const TensorView& logits, const TensorView& targets, int32_t ignore_index, const char* op) {
  const int64_t V = check_logits(logits, op);
  TK_CHECK(logits.ndim == 3, op, ": logits ", describe(logits), " must be [B, T, V]");
  const int64_t B = logits.shape[0], T = logits.shape[1];
  check_tensor(targets, op, "targets");
  TK_CHECK(targets.ndim == 2 && targets.shape[0] == B && targets.shape[1] == T, op, ": targets ", describe(targets),
           " must be [", B, ", ", T, "] to match logits ", describe(logits));
  check_targets(targets, B * T, V, ignore_index, op);
  return {B, T, V};
}
}  // namespace

void sequence_logprobs_forward_cpu(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                   const TensorView& out, const TensorView& lse, ThreadPool& pool) {
  const char* op = "sequence_logprobs_forward_cpu";
  const SeqDims d = check_seq(logits, targets, ignore_index, op);
  check_f32(out, d.B, op, "out");
  check_f32(lse, d.B * d.T, op, "lse");
  std::vector<float> row_loss(size_t(d.B * d.T));
  RowJob job;
  job.logits = &logits;
  job.targets = targets.ptr<const int32_t>();
  job.ignore_index = ignore_index;
  job.N = d.B * d.T;
  job.V = d.V;
  job.lse_out = lse.ptr<float>();
  job.loss_out = row_loss.data();
  run_rows(job, pool);
  float* o = out.ptr<float>();
  for (int64_t b = 0; b < d.B; ++b) {
    double s = 0;
    for (int64_t t = 0; t < d.T; ++t) s -= row_loss[size_t(b * d.T + t)];  // 0 on ignored positions
    o[b] = float(s);
  }
}

void sequence_logprobs_backward_cpu(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                    const TensorView& dout, int32_t ignore_index, const TensorView& dlogits,
                                    ThreadPool& pool) {
  const char* op = "sequence_logprobs_backward_cpu";
  const SeqDims d = check_seq(logits, targets, ignore_index, op);
  check_f32(lse, d.B * d.T, op, "lse");
  check_f32(dout, d.B, op, "dout");
  check_dlogits(dlogits, logits, op);
  // log p = -(cross entropy of the row), so the row's upstream gradient is -dout[b].
  std::vector<float> g(size_t(d.B * d.T));
  const float* dp = dout.ptr<const float>();
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t) g[size_t(b * d.T + t)] = -dp[b];
  RowJob job;
  job.logits = &logits;
  job.targets = targets.ptr<const int32_t>();
  job.ignore_index = ignore_index;
  job.N = d.B * d.T;
  job.V = d.V;
  job.lse_in = lse.ptr<const float>();
  job.dlogits = &dlogits;
  job.scale_vec = g.data();
  run_rows(job, pool);
}

void dpo_loss_forward_cpu(const TensorView& policy_chosen, const TensorView& policy_rejected,
                          const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                          const TensorView& losses, const TensorView& chosen_rewards,
                          const TensorView& rejected_rewards) {
  const char* op = "dpo_loss_forward_cpu";
  check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, op);
  const int64_t B = policy_chosen.numel();
  check_f32(losses, B, op, "losses");
  check_f32(chosen_rewards, B, op, "chosen_rewards");
  check_f32(rejected_rewards, B, op, "rejected_rewards");
  const float *pc = policy_chosen.ptr<const float>(), *pr = policy_rejected.ptr<const float>();
  const float *rc = ref_chosen.ptr<const float>(), *rr = ref_rejected.ptr<const float>();
  const double beta = params.beta, ls = params.label_smoothing;
  for (int64_t b = 0; b < B; ++b) {
    const double z = (double(pc[b]) - pr[b]) - (double(rc[b]) - rr[b]);
    double l = 0;
    switch (params.kind) {
      case DpoKind::Sigmoid: l = -log_sigmoid(beta * z) * (1 - ls) - log_sigmoid(-beta * z) * ls; break;
      case DpoKind::Ipo: l = (z - 1 / (2 * beta)) * (z - 1 / (2 * beta)); break;
      case DpoKind::Hinge: l = std::max(0.0, 1 - beta * z); break;
    }
    losses.ptr<float>()[b] = float(l);
    chosen_rewards.ptr<float>()[b] = float(beta * (double(pc[b]) - rc[b]));
    rejected_rewards.ptr<float>()[b] = float(beta * (double(pr[b]) - rr[b]));
  }
}

void dpo_loss_backward_cpu(const TensorView& policy_chosen, const TensorView& policy_rejected,
                           const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                           const TensorView& dout, const TensorView& d_policy_chosen,
                           const TensorView& d_policy_rejected) {
  const char* op = "dpo_loss_backward_cpu";
  check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, op);
  const int64_t B = policy_chosen.numel();
  check_f32(dout, B, op, "dout");
  check_f32(d_policy_chosen, B, op, "d_policy_chosen");
  check_f32(d_policy_rejected, B, op, "d_policy_rejected");
  const float *pc = policy_chosen.ptr<const float>(), *pr = policy_rejected.ptr<const float>();
  const float *rc = ref_chosen.ptr<const float>(), *rr = ref_rejected.ptr<const float>();
  const float* go = dout.ptr<const float>();
  const double beta = params.beta, ls = params.label_smoothing;
  for (int64_t b = 0; b < B; ++b) {
    const double z = (double(pc[b]) - pr[b]) - (double(rc[b]) - rr[b]);
    double dz = 0;
    switch (params.kind) {
      case DpoKind::Sigmoid: dz = beta * (sigmoid(beta * z) * ls - sigmoid(-beta * z) * (1 - ls)); break;
      case DpoKind::Ipo: dz = 2 * (z - 1 / (2 * beta)); break;
      case DpoKind::Hinge: dz = 1 - beta * z > 0 ? -beta : 0.0; break;
    }
    const double g = double(go[b]) * dz;
    d_policy_chosen.ptr<float>()[b] = float(g);
    d_policy_rejected.ptr<float>()[b] = float(-g);
  }
}

}  // namespace tk
