// CPU RMSNorm, SwiGLU and embedding kernels (see norm.h for the contracts).
//
// Design:
// - Row kernels work on fp32 arrays. F32 rows are used in place; BF16 rows are widened into
//   per-thread fp32 row buffers, computed, and rounded back (nearest even, integer arithmetic as in
//   elementwise.cpp, so subnormals are not flushed). The weight is widened once per call.
// - Each row primitive exists for AVX-512 (masked tails), AVX2 (portable tails) and portable
//   code; the level comes from active_isa() at each call. The binary is built for baseline
//   x86-64, so the AVX paths carry function-level target attributes.
// - Row reductions (sum of squares, the backward dot product) keep 4 vector accumulators and
//   split rows longer than a few thousand elements in halves, so the fp32 error grows with
//   log(D), not D.
// - Threads split rows (RMSNorm), flat ranges (SwiGLU) or output rows (embedding forward) with a
//   grain of ~16K elements: below that a second thread costs more than it saves.
// - Reductions over rows (dweight, dtable) avoid atomics and stay deterministic: dweight sums
//   fixed row parts into private buffers combined in part order; dtable is split by columns, so
//   each element is owned by one thread and summed in id order.
// - sigmoid uses e = exp(-|g|) (never overflows); the SIMD exp is the Cephes expf polynomial
//   (~1 ulp) with results below the fp32 normal range flushed to 0 (an absolute error < 1.2e-38).
#include "norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
namespace {

constexpr int64_t kGrain = 16384;      // elements per thread below which threading does not pay
constexpr int64_t kBlock = 1024;       // fp32 staging block for flat BF16 ops (4 KB per operand)
constexpr int64_t kMaxParts = 64;      // dweight row parts at most (bounds the partial buffers)
constexpr int64_t kMinPartRows = 8;    // rows per part at least (amortizes the part's buffer)
constexpr int64_t kColAlign = 16;      // dtable column ranges: whole 64-byte lines per thread

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

// ================================ portable row primitives ========================================

void widen_scalar(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void narrow_scalar(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}

void add_scalar(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

// sum x[i]^2 with 8 interleaved accumulators, halves above 256 elements.
float sumsq_scalar(const float* x, int64_t n) {
  if (n > 256) {
    int64_t h = (n / 2) & ~int64_t(7);
    return sumsq_scalar(x, h) + sumsq_scalar(x + h, n - h);
  }
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) a[l] += x[i + l] * x[i + l];
  for (int l = 0; i < n; ++i, ++l) a[l] += x[i] * x[i];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// sum dy[i] * w[i] * x[i], same summation tree as sumsq_scalar.
float dot3_scalar(const float* dy, const float* w, const float* x, int64_t n) {
  if (n > 256) {
    int64_t h = (n / 2) & ~int64_t(7);
    return dot3_scalar(dy, w, x, h) + dot3_scalar(dy + h, w + h, x + h, n - h);
  }
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) a[l] += dy[i + l] * w[i + l] * x[i + l];
  for (int l = 0; i < n; ++i, ++l) a[l] += dy[i] * w[i] * x[i];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// y = (x * r) * w
void rms_fwd_scalar(const float* x, const float* w, float r, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// dx = r * (dy * w) - c * x;  dw += dy * (x * r)
void rms_bwd_scalar(const float* dy, const float* w, const float* x, float r, float c, float* dx, float* dw,
                    int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float xi = x[i], dyi = dy[i];  // read before writing dx: dx may alias dy
    dw[i] += dyi * (xi * r);
    dx[i] = r * (dyi * w[i]) - c * xi;
  }
}

// sigmoid(g) from e = exp(-|g|) in (0, 1]: no overflow for any finite g.
inline float sigmoid_scalar(float g) {
  float e = std::exp(-std::fabs(g));
  float s = 1.0f / (1.0f + e);
  return g >= 0 ? s : e * s;
}

void swiglu_fwd_scalar(const float* g, const float* u, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] * sigmoid_scalar(g[i]) * u[i];
}

void swiglu_bwd_scalar(const float* d, const float* g, const float* u, float* dg, float* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i], ui = u[i], di = d[i];
    float s = sigmoid_scalar(gi);
    du[i] = di * (gi * s);
    dg[i] = di * ui * (s * (1.0f + gi * (1.0f - s)));
  }
}

#if TK_SIMD_X86
// ================================ AVX2 (portable tails) ==========================================

TK_AVX2 inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
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

TK_AVX2 void add_avx2(float* acc, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_loadu_ps(x + i)));
  add_scalar(acc + i, x + i, n - i);
}

TK_AVX2 float sumsq_avx2(const float* x, int64_t n) {
  if (n > 1024) {
    int64_t h = (n / 2) & ~int64_t(31);
    return sumsq_avx2(x, h) + sumsq_avx2(x + h, n - h);
  }
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float t = 0;
  for (; i < n; ++i) t += x[i] * x[i];
  return s + t;
}

// acc + dy[j..j+8) * w[j..j+8) * x[j..j+8)
TK_AVX2 inline __m256 dot3_step8(const float* dy, const float* w, const float* x, int64_t j, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + j), _mm256_loadu_ps(w + j)), _mm256_loadu_ps(x + j), acc);
}

TK_AVX2 float dot3_avx2(const float* dy, const float* w, const float* x, int64_t n) {
  if (n > 1024) {
    int64_t h = (n / 2) & ~int64_t(31);
    return dot3_avx2(dy, w, x, h) + dot3_avx2(dy + h, w + h, x + h, n - h);
  }
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = dot3_step8(dy, w, x, i, a0);
    a1 = dot3_step8(dy, w, x, i + 8, a1);
    a2 = dot3_step8(dy, w, x, i + 16, a2);
    a3 = dot3_step8(dy, w, x, i + 24, a3);
  }
  for (; i + 8 <= n; i += 8) a0 = dot3_step8(dy, w, x, i, a0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float t = 0;
  for (; i < n; ++i) t += dy[i] * w[i] * x[i];
  return s + t;
}

TK_AVX2 void rms_fwd_avx2(const float* x, const float* w, float r, float* y, int64_t n) {
  const __m256 vr = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
  rms_fwd_scalar(x + i, w + i, r, y + i, n - i);
}

TK_AVX2 void rms_bwd_avx2(const float* dy, const float* w, const float* x, float r, float c, float* dx, float* dw,
                          int64_t n) {
  const __m256 vr = _mm256_set1_ps(r), vc = _mm256_set1_ps(c);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 vdy = _mm256_loadu_ps(dy + i), vx = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(dw + i, _mm256_fmadd_ps(vdy, _mm256_mul_ps(vx, vr), _mm256_loadu_ps(dw + i)));
    __m256 g = _mm256_mul_ps(vr, _mm256_mul_ps(vdy, _mm256_loadu_ps(w + i)));
    _mm256_storeu_ps(dx + i, _mm256_fnmadd_ps(vc, vx, g));
  }
  rms_bwd_scalar(dy + i, w + i, x + i, r, c, dx + i, dw + i, n - i);
}

TK_AVX2 inline __m256 sigmoid8(__m256 g) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  __m256 e = exp_nonpos8(_mm256_or_ps(g, sign));  // exp(-|g|)
  __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
  return _mm256_blendv_ps(s, _mm256_mul_ps(e, s), _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
}

TK_AVX2 void swiglu_fwd_avx2(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 vg = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(vg, sigmoid8(vg)), _mm256_loadu_ps(u + i)));
  }
  swiglu_fwd_scalar(g + i, u + i, o + i, n - i);
}

TK_AVX2 void swiglu_bwd_avx2(const float* d, const float* g, const float* u, float* dg, float* du, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 vg = _mm256_loadu_ps(g + i), vu = _mm256_loadu_ps(u + i), vd = _mm256_loadu_ps(d + i);
    __m256 s = sigmoid8(vg);
    __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(vg, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(du + i, _mm256_mul_ps(vd, _mm256_mul_ps(vg, s)));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(vd, vu), ds));
  }
  swiglu_bwd_scalar(d + i, g + i, u + i, dg + i, du + i, n - i);
}

// ================================ AVX-512 (masked tails) =========================================

TK_AVX512 inline __mmask16 tail_mask(int64_t r) { return __mmask16((1u << r) - 1u); }

TK_AVX512 void widen_avx512(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
    _mm512_mask_storeu_ps(d + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

TK_AVX512 void narrow_avx512(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), bf16_round16(_mm512_loadu_ps(s + i)));
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm256_mask_storeu_epi16(d + i, m, bf16_round16(_mm512_maskz_loadu_ps(m, s + i)));
  }
}

TK_AVX512 void add_avx512(float* acc, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), _mm512_loadu_ps(x + i)));
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}

TK_AVX512 float sumsq_avx512(const float* x, int64_t n) {
  if (n > 2048) {
    int64_t h = (n / 2) & ~int64_t(63);
    return sumsq_avx512(x, h) + sumsq_avx512(x + h, n - h);
  }
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
    a2 = _mm512_fmadd_ps(v2, v2, a2);
    a3 = _mm512_fmadd_ps(v3, v3, a3);
  }
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  if (i < n) {
    __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    a1 = _mm512_fmadd_ps(v, v, a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// acc + dy[j..j+16) * w[j..j+16) * x[j..j+16)
TK_AVX512 inline __m512 dot3_step16(const float* dy, const float* w, const float* x, int64_t j, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(dy + j), _mm512_loadu_ps(w + j)), _mm512_loadu_ps(x + j), acc);
}

TK_AVX512 float dot3_avx512(const float* dy, const float* w, const float* x, int64_t n) {
  if (n > 2048) {
    int64_t h = (n / 2) & ~int64_t(63);
    return dot3_avx512(dy, w, x, h) + dot3_avx512(dy + h, w + h, x + h, n - h);
  }
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = dot3_step16(dy, w, x, i, a0);
    a1 = dot3_step16(dy, w, x, i + 16, a1);
    a2 = dot3_step16(dy, w, x, i + 32, a2);
    a3 = dot3_step16(dy, w, x, i + 48, a3);
  }
  for (; i + 16 <= n; i += 16) a0 = dot3_step16(dy, w, x, i, a0);
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, w + i));
    a1 = _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(m, x + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

TK_AVX512 void rms_fwd_avx512(const float* x, const float* w, float r, float* y, int64_t n) {
  const __m512 vr = _mm512_set1_ps(r);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vr), _mm512_loadu_ps(w + i)));
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m,
                          _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vr), _mm512_maskz_loadu_ps(m, w + i)));
  }
}

TK_AVX512 void rms_bwd_avx512(const float* dy, const float* w, const float* x, float r, float c, float* dx, float* dw,
                              int64_t n) {
  const __m512 vr = _mm512_set1_ps(r), vc = _mm512_set1_ps(c);
  int64_t i = 0;
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512 vdy = _mm512_maskz_loadu_ps(m, dy + i), vx = _mm512_maskz_loadu_ps(m, x + i);
    __m512 vdw = _mm512_fmadd_ps(vdy, _mm512_mul_ps(vx, vr), _mm512_maskz_loadu_ps(m, dw + i));
    _mm512_mask_storeu_ps(dw + i, m, vdw);
    __m512 g = _mm512_mul_ps(vr, _mm512_mul_ps(vdy, _mm512_maskz_loadu_ps(m, w + i)));
    _mm512_mask_storeu_ps(dx + i, m, _mm512_fnmadd_ps(vc, vx, g));
  }
}

TK_AVX512 inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = exp_nonpos16(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(int(0x80000000u)))));
  __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
  return _mm512_mask_mul_ps(s, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), e, s);
}

TK_AVX512 void swiglu_fwd_avx512(const float* g, const float* u, float* o, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512 vg = _mm512_maskz_loadu_ps(m, g + i);
    _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(_mm512_mul_ps(vg, sigmoid16(vg)), _mm512_maskz_loadu_ps(m, u + i)));
  }
}

TK_AVX512 void swiglu_bwd_avx512(const float* d, const float* g, const float* u, float* dg, float* du, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512 vg = _mm512_maskz_loadu_ps(m, g + i), vu = _mm512_maskz_loadu_ps(m, u + i), vd = _mm512_maskz_loadu_ps(m, d + i);
    __m512 s = sigmoid16(vg);
    __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(vg, _mm512_sub_ps(one, s), one));
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(vd, _mm512_mul_ps(vg, s)));
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(vd, vu), ds));
  }
}
#endif  // TK_SIMD_X86

// ================================ dispatch =======================================================

#if TK_SIMD_X86
#define TK_DISPATCH(L, name, ...)                                     \
  do {                                                                \
    if ((L) == Level::Avx512) return name##_avx512(__VA_ARGS__);      \
    if ((L) == Level::Avx2) return name##_avx2(__VA_ARGS__);          \
    return name##_scalar(__VA_ARGS__);                                \
  } while (0)
#else
#define TK_DISPATCH(L, name, ...) \
  do {                            \
    (void)(L);                    \
    return name##_scalar(__VA_ARGS__); \
  } while (0)
#endif

void widen(Level L, const uint16_t* s, float* d, int64_t n) { TK_DISPATCH(L, widen, s, d, n); }
void narrow(Level L, const float* s, uint16_t* d, int64_t n) { TK_DISPATCH(L, narrow, s, d, n); }
void add_f32(Level L, float* acc, const float* x, int64_t n) { TK_DISPATCH(L, add, acc, x, n); }
float sumsq(Level L, const float* x, int64_t n) { TK_DISPATCH(L, sumsq, x, n); }
float dot3(Level L, const float* dy, const float* w, const float* x, int64_t n) { TK_DISPATCH(L, dot3, dy, w, x, n); }
void rms_fwd(Level L, const float* x, const float* w, float r, float* y, int64_t n) {
  TK_DISPATCH(L, rms_fwd, x, w, r, y, n);
}
void rms_bwd(Level L, const float* dy, const float* w, const float* x, float r, float c, float* dx, float* dw,
             int64_t n) {
  TK_DISPATCH(L, rms_bwd, dy, w, x, r, c, dx, dw, n);
}
void swiglu_fwd(Level L, const float* g, const float* u, float* o, int64_t n) { TK_DISPATCH(L, swiglu_fwd, g, u, o, n); }
void swiglu_bwd(Level L, const float* d, const float* g, const float* u, float* dg, float* du, int64_t n) {
  TK_DISPATCH(L, swiglu_bwd, d, g, u, dg, du, n);
}
#undef TK_DISPATCH

// Row `row` (D elements) of a F32|BF16 tensor as fp32: the row itself for F32, else `buf` filled.
const float* row_f32(Level L, const TensorView& t, int64_t row, int64_t D, float* buf) {
  if (t.dtype == DType::F32) return t.ptr<const float>() + row * D;
  widen(L, t.ptr<const uint16_t>() + row * D, buf, D);
  return buf;
}

// Where to compute output row `row`: in place for F32, else `buf` (stored by store_row).
float* out_row(const TensorView& t, int64_t row, int64_t D, float* buf) {
  return t.dtype == DType::F32 ? t.ptr<float>() + row * D : buf;
}
void store_row(Level L, const TensorView& t, int64_t row, int64_t D, const float* buf) {
  if (t.dtype != DType::F32) narrow(L, buf, t.ptr<uint16_t>() + row * D, D);
}

// ================================ argument checks ================================================

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CPU, op, ": ", what, " is on ", v.device.name(), ", expected cpu");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_float(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.dtype == DType::F32 || v.dtype == DType::BF16, op, ": ", what, " ", describe(v),
           " must be f32 or bf16");
}

void check_dtype(const TensorView& v, DType t, const char* op, const char* what) {
  TK_CHECK(v.dtype == t, op, ": ", what, " ", describe(v), " must be ", dtype_name(t));
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  bool same = a.ndim == b.ndim;
  for (int d = 0; same && d < a.ndim; ++d) same = a.shape[d] == b.shape[d];
  TK_CHECK(same, op, ": ", an, " ", describe(a), " and ", bn, " ", describe(b), " must have the same shape");
}

// x [..., D] with D >= 1: returns D (N is numel / D).
int64_t last_dim(const TensorView& x, const char* op) {
  TK_CHECK(x.ndim >= 1 && x.shape[x.ndim - 1] >= 1, op, ": x ", describe(x), " must have a last dim D >= 1");
  return x.shape[x.ndim - 1];
}

void check_ids(const TensorView& ids, int64_t V, const char* op) {
  check_tensor(ids, op, "ids");
  check_dtype(ids, DType::I32, op, "ids");
  const int32_t* p = ids.ptr<const int32_t>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i)
    TK_CHECK(p[i] >= 0 && p[i] < V, op, ": ids[", i, "] = ", p[i], " is out of range for a table of V = ", V,
             " rows (valid ids are 0 .. ", V - 1, ")");
}

// Widened weight: the F32 weight itself, or `buf` filled from BF16.
const float* weight_f32(Level L, const TensorView& w, std::vector<float>& buf) {
  if (w.dtype == DType::F32) return w.ptr<const float>();
  buf.resize(size_t(w.numel()));
  widen(L, w.ptr<const uint16_t>(), buf.data(), w.numel());
  return buf.data();
}

void check_rms_common(const TensorView& x, const TensorView& weight, const TensorView& rstd, const char* op) {
  check_tensor(x, op, "x");
  check_tensor(weight, op, "weight");
  check_tensor(rstd, op, "rstd");
  check_float(x, op, "x");
  const int64_t D = last_dim(x, op);
  TK_CHECK(weight.ndim == 1 && weight.shape[0] == D && weight.dtype == x.dtype, op, ": weight ", describe(weight),
           " must be [", D, "] ", dtype_name(x.dtype), " for x ", describe(x));
  check_dtype(rstd, DType::F32, op, "rstd");
  TK_CHECK(rstd.numel() == x.numel() / D, op, ": rstd ", describe(rstd), " must have ", x.numel() / D,
           " elements (one per row of x ", describe(x), ")");
}

}  // namespace

// ================================ RMSNorm ========================================================

void rms_norm_forward_cpu(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                          const TensorView& rstd, ThreadPool& pool) {
  const char* op = "rms_norm_forward_cpu";
  check_rms_common(x, weight, rstd, op);
  check_tensor(y, op, "y");
  check_same_shape(x, y, op, "x", "y");
  check_dtype(y, x.dtype, op, "y");
  TK_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps = ", eps, " must be finite and >= 0");
  const int64_t D = x.shape[x.ndim - 1], N = x.numel() / D;
  if (N == 0) return;
  const Level L = level();
  std::vector<float> wbuf;
  const float* w = weight_f32(L, weight, wbuf);
  float* r_out = rstd.ptr<float>();
  pool.parallel_for(N, std::max<int64_t>(1, kGrain / D), [&](int64_t n0, int64_t n1) {
    std::vector<float> xb, yb;
    if (x.dtype != DType::F32) {
      xb.resize(size_t(D));
      yb.resize(size_t(D));
    }
    for (int64_t n = n0; n < n1; ++n) {
      const float* xr = row_f32(L, x, n, D, xb.data());
      float r = 1.0f / std::sqrt(sumsq(L, xr, D) / float(D) + eps);
      r_out[n] = r;
      float* yr = out_row(y, n, D, yb.data());
      rms_fwd(L, xr, w, r, yr, D);
      store_row(L, y, n, D, yb.data());
    }
  });
}

void rms_norm_backward_cpu(const TensorView& dy, const TensorView& x, const TensorView& weight,
                           const TensorView& rstd, const TensorView& dx, const TensorView& dweight,
                           ThreadPool& pool) {
  const char* op = "rms_norm_backward_cpu";
  check_rms_common(x, weight, rstd, op);
  check_tensor(dy, op, "dy");
  check_tensor(dx, op, "dx");
  check_tensor(dweight, op, "dweight");
  check_same_shape(x, dy, op, "x", "dy");
  check_same_shape(x, dx, op, "x", "dx");
  check_dtype(dy, x.dtype, op, "dy");
  check_dtype(dx, x.dtype, op, "dx");
  const int64_t D = x.shape[x.ndim - 1], N = x.numel() / D;
  TK_CHECK(dweight.ndim == 1 && dweight.shape[0] == D && dweight.dtype == DType::F32, op, ": dweight ",
           describe(dweight), " must be [", D, "] f32");
  float* dw_out = dweight.ptr<float>();
  if (N == 0) {
    std::fill(dw_out, dw_out + D, 0.0f);
    return;
  }
  const Level L = level();
  std::vector<float> wbuf;
  const float* w = weight_f32(L, weight, wbuf);
  const float* r_in = rstd.ptr<const float>();

  // Parts depend on N only, so the summation order of dweight does not depend on the pool.
  const int64_t rows_per_part = std::max(kMinPartRows, (N + kMaxParts - 1) / kMaxParts);
  const int64_t parts = (N + rows_per_part - 1) / rows_per_part;
  std::vector<float> partial(size_t(parts * D), 0.0f);
  const float inv_d = 1.0f / float(D);

  pool.parallel_for(parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> xb, dyb, dxb;
    if (x.dtype != DType::F32) {
      xb.resize(size_t(D));
      dyb.resize(size_t(D));
      dxb.resize(size_t(D));
    }
    for (int64_t p = p0; p < p1; ++p) {
      float* dw = partial.data() + p * D;
      const int64_t n_end = std::min(N, (p + 1) * rows_per_part);
      for (int64_t n = p * rows_per_part; n < n_end; ++n) {
        const float* xr = row_f32(L, x, n, D, xb.data());
        const float* dyr = row_f32(L, dy, n, D, dyb.data());
        const float r = r_in[n];
        const float c = r * r * r * (dot3(L, dyr, w, xr, D) * inv_d);
        float* dxr = out_row(dx, n, D, dxb.data());
        rms_bwd(L, dyr, w, xr, r, c, dxr, dw, D);
        store_row(L, dx, n, D, dxb.data());
      }
    }
  });

  // dweight = partial[0] + partial[1] + ... in part order, threaded over columns.
  pool.parallel_for(D, std::max<int64_t>(kColAlign, kGrain / parts), [&](int64_t c0, int64_t c1) {
    std::memcpy(dw_out + c0, partial.data() + c0, size_t(c1 - c0) * 4);
    for (int64_t p = 1; p < parts; ++p) add_f32(L, dw_out + c0, partial.data() + p * D + c0, c1 - c0);
  });
}

// ================================ SwiGLU =========================================================

namespace {

void check_swiglu(const TensorView* const* ts, const char* const* names, int count, const char* op) {
  for (int i = 0; i < count; ++i) {
    check_tensor(*ts[i], op, names[i]);
    check_float(*ts[i], op, names[i]);
    check_same_shape(*ts[0], *ts[i], op, names[0], names[i]);
    check_dtype(*ts[i], ts[0]->dtype, op, names[i]);
  }
}

inline const float* stage(Level L, const TensorView& t, int64_t e, int64_t m, float* buf) {
  if (t.dtype == DType::F32) return t.ptr<const float>() + e;
  widen(L, t.ptr<const uint16_t>() + e, buf, m);
  return buf;
}

}  // namespace

void swiglu_forward_cpu(const TensorView& gate, const TensorView& up, const TensorView& out, ThreadPool& pool) {
  const char* op = "swiglu_forward_cpu";
  const TensorView* ts[] = {&gate, &up, &out};
  const char* names[] = {"gate", "up", "out"};
  check_swiglu(ts, names, 3, op);
  const int64_t n = gate.numel();
  const Level L = level();
  const bool f32 = gate.dtype == DType::F32;
  pool.parallel_for(n, kGrain, [&](int64_t e0, int64_t e1) {
    if (f32) {
      swiglu_fwd(L, gate.ptr<const float>() + e0, up.ptr<const float>() + e0, out.ptr<float>() + e0, e1 - e0);
      return;
    }
    float bg[kBlock], bu[kBlock], bo[kBlock];
    for (int64_t e = e0; e < e1; e += kBlock) {
      const int64_t m = std::min(kBlock, e1 - e);
      swiglu_fwd(L, stage(L, gate, e, m, bg), stage(L, up, e, m, bu), bo, m);
      narrow(L, bo, out.ptr<uint16_t>() + e, m);
    }
  });
}

void swiglu_backward_cpu(const TensorView& dout, const TensorView& gate, const TensorView& up,
                         const TensorView& dgate, const TensorView& dup, ThreadPool& pool) {
  const char* op = "swiglu_backward_cpu";
  const TensorView* ts[] = {&dout, &gate, &up, &dgate, &dup};
  const char* names[] = {"dout", "gate", "up", "dgate", "dup"};
  check_swiglu(ts, names, 5, op);
  TK_CHECK(dgate.numel() == 0 || dgate.data != dup.data, op, ": dgate and dup must be different buffers");
  const int64_t n = gate.numel();
  const Level L = level();
  const bool f32 = gate.dtype == DType::F32;
  pool.parallel_for(n, kGrain, [&](int64_t e0, int64_t e1) {
    if (f32) {
      swiglu_bwd(L, dout.ptr<const float>() + e0, gate.ptr<const float>() + e0, up.ptr<const float>() + e0,
                 dgate.ptr<float>() + e0, dup.ptr<float>() + e0, e1 - e0);
      return;
    }
    float bd[kBlock], bg[kBlock], bu[kBlock], bdg[kBlock], bdu[kBlock];
    for (int64_t e = e0; e < e1; e += kBlock) {
      const int64_t m = std::min(kBlock, e1 - e);
      swiglu_bwd(L, stage(L, dout, e, m, bd), stage(L, gate, e, m, bg), stage(L, up, e, m, bu), bdg, bdu, m);
      narrow(L, bdg, dgate.ptr<uint16_t>() + e, m);
      narrow(L, bdu, dup.ptr<uint16_t>() + e, m);
    }
  });
}

// ================================ embedding ======================================================

void embedding_forward_cpu(const TensorView& ids, const TensorView& table, const TensorView& out, ThreadPool& pool) {
  const char* op = "embedding_forward_cpu";
  check_tensor(table, op, "table");
  check_tensor(out, op, "out");
  check_float(table, op, "table");
  TK_CHECK(table.ndim == 2, op, ": table ", describe(table), " must be [V, D]");
  const int64_t V = table.shape[0], D = table.shape[1];
  check_ids(ids, V, op);  // also checks ids' dtype and layout
  const int64_t N = ids.numel();
  TK_CHECK(out.dtype == table.dtype && out.numel() == N * D, op, ": out ", describe(out), " must hold ", N, " x ", D,
           " ", dtype_name(table.dtype), " elements (ids ", describe(ids), ", table ", describe(table), ")");
  if (N == 0 || D == 0) return;
  const size_t row_bytes = size_t(D) * dtype_size(table.dtype);
  const int32_t* id = ids.ptr<const int32_t>();
  const char* src = static_cast<const char*>(table.data);
  char* dst = static_cast<char*>(out.data);
  // A row copy is a memcpy: already at memory speed, nothing for SIMD code to add.
  pool.parallel_for(N, std::max<int64_t>(1, kGrain / D), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) std::memcpy(dst + size_t(n) * row_bytes, src + size_t(id[n]) * row_bytes, row_bytes);
  });
}

void embedding_backward_cpu(const TensorView& dout, const TensorView& ids, const TensorView& dtable,
                            ThreadPool& pool) {
  const char* op = "embedding_backward_cpu";
  check_tensor(dout, op, "dout");
  check_tensor(dtable, op, "dtable");
  check_float(dout, op, "dout");
  TK_CHECK(dtable.ndim == 2 && dtable.dtype == DType::F32, op, ": dtable ", describe(dtable), " must be [V, D] f32");
  const int64_t V = dtable.shape[0], D = dtable.shape[1];
  check_ids(ids, V, op);
  const int64_t N = ids.numel();
  TK_CHECK(dout.numel() == N * D, op, ": dout ", describe(dout), " must hold ", N, " x ", D, " elements (ids ",
           describe(ids), ", dtable ", describe(dtable), ")");
  float* tab = dtable.ptr<float>();
  const int64_t total = V * D;
  pool.parallel_for(total, int64_t(1) << 16,
                    [&](int64_t e0, int64_t e1) { std::memset(tab + e0, 0, size_t(e1 - e0) * 4); });
  if (N == 0 || D == 0) return;
  const Level L = level();
  const int32_t* id = ids.ptr<const int32_t>();
  const bool f32 = dout.dtype == DType::F32;
  // Column blocks of kColAlign floats; a thread owns a contiguous range of blocks (its columns in
  // every row of dtable) and adds the rows of dout in order n = 0, 1, ... into them.
  const int64_t blocks = (D + kColAlign - 1) / kColAlign;
  const int64_t grain = std::max<int64_t>(1, kGrain / (N * kColAlign));
  pool.parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kColAlign, c1 = std::min(D, b1 * kColAlign);
    float buf[kBlock];
    for (int64_t n = 0; n < N; ++n) {
      float* acc = tab + int64_t(id[n]) * D;
      if (f32) {
        add_f32(L, acc + c0, dout.ptr<const float>() + n * D + c0, c1 - c0);
        continue;
      }
      for (int64_t c = c0; c < c1; c += kBlock) {
        const int64_t m = std::min(kBlock, c1 - c);
        widen(L, dout.ptr<const uint16_t>() + n * D + c, buf, m);
        add_f32(L, acc + c, buf, m);
      }
    }
  });
}

}  // namespace tk
