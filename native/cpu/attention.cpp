// CPU fused attention (see attention.h for the contract).
//
// Design:
// - Tiling. Queries are cut into blocks of kBq = 64 rows and keys into blocks of kBk = 64. A tile
//   of scores is [64 x 64] fp32 = 16 KB and each operand tile (Q, K^T, V, O) is 64 x Dp fp32
//   (Dp = D rounded up to 16): 16 KB at D = 64, 32 KB at D = 128. The B operand of each tile
//   product (16-32 KB) stays in L1 while the A rows stream; the whole working set of a task
//   (about 80 KB at D = 64) lives in L2. The [T, S] score matrix is never formed: the forward
//   pass keeps a running row max m and row sum l per query (online softmax) and rescales the
//   output accumulator by exp(m_old - m_new) when the max grows.
// - Tiles are staged as fp32 (bf16 widened on load), zero padded to Dp columns, and q is
//   pre-multiplied by `scale` while staging, so scores come out scaled and dk = ds^T (scale q)
//   needs no extra pass. Staging costs O(64 D) per tile against O(64 * 64 * D) of arithmetic.
// - Every tile product is one small GEMM C[M x N] (+)= A[M x K] B[K x N] with B row-major and N a
//   multiple of 16: q k^T uses a transposed K^T tile, p v a row-major V tile. The micro-kernels are
//   register tiled outer products (broadcast one A element, FMA against whole B vectors, no
//   horizontal sums): AVX-512 6 rows x 4 zmm (24 accumulators), AVX2 4 rows x 3 ymm (12
//   accumulators), and a portable row loop the compiler vectorizes for baseline SSE2. The GEMM
//   in gemm.h is not used here: it runs on the pool itself, and these tiles are executed from
//   inside pool tasks.
// - exp runs in SIMD (range reduction to 2^n * e^r with a degree-6 Cephes polynomial, about
//   1 ulp); arguments below -87 (and -inf from masked scores) give exactly 0.
// - Masks: a tile is classified as invisible (skipped without any arithmetic), fully visible (no
//   per-element work) or partial (masked scores set to -inf). Causal classification is O(1) per
//   tile; with segment ids the tile's pairs are compared once, so tiles that span two documents
//   are masked and tiles between unrelated documents are skipped.
// - Forward: one task per (b, h, query block), run from the biggest causal blocks down, handed
//   out through an atomic counter. A row that sees no key keeps m = -inf, l = 0 and is written as
//   zeros with lse = -inf.
// - Backward, two passes plus a tiny delta pre-pass (delta = rowsum(do * o), [B, H, T]):
//   (1) dk/dv: one task per (b, kv head, key block); it owns those dk/dv rows and loops over the
//       query heads of its group and the query blocks that can see the key block, working in
//       key-major orientation: s^T = K Q^T, p^T = exp(s^T - lse), dp^T = V dO^T,
//       ds^T = p^T (dp^T - delta), dv += p^T dO, dk += ds^T (scale Q).
//   (2) dq: one task per (b, h, query block), query-major: s = Q K^T, p, dp = dO V^T, ds,
//       dq += ds K, then dq *= scale.
//   Each output element is written by exactly one task in a fixed order, so there are no atomics,
//   no races and results are identical for any number of threads. Rows with lse = -inf use
//   +inf in the exponent, so p = 0 and their gradients are exactly 0.
// - The binary is built for baseline x86-64, so AVX paths carry function-level target attributes
//   and the level comes from active_isa() at each call.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {
namespace {

constexpr int kBq = 64;  // query rows per block
constexpr int kBk = 64;  // keys per block
constexpr float kInf = std::numeric_limits<float>::infinity();

// ================================ ISA kernels ====================================================
// gemm:        C[M x N] = (acc ? C : 0) + A[M x K] B[K x N]; N a multiple of 16; row strides lda,
//              ldb, ldc in floats.
// softmax_row: one online-softmax step over a row of n (multiple of 16) scaled scores s (masked =
//              -inf): updates the running max *m and sum *l, overwrites s with p = exp(s - m_new)
//              and returns the factor exp(m_old - m_new) the row's output must be multiplied by.
// ds_vec:      s <- p = exp(s - lse[j]), dp <- p * (dp - delta[j]) for j < n (per-column lse, delta).
// ds_scalar:   the same with one lse and delta for the whole row.
using GemmFn = void (*)(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                        bool acc);
using SoftmaxRowFn = float (*)(float* s, int n, float* m, float* l);
using DsVecFn = void (*)(float* s, float* dp, int n, const float* lse, const float* delta);
using DsScalarFn = void (*)(float* s, float* dp, int n, float lse, float delta);

struct Kernels {
  GemmFn gemm;
  SoftmaxRowFn softmax_row;
  DsVecFn ds_vec;
  DsScalarFn ds_scalar;
};

// ---- portable ------------------------------------------------------------------------------------

void gemm_portable(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                   bool acc) {
  for (int i = 0; i < M; ++i) {
    float* c = C + int64_t(i) * ldc;
    if (!acc)
      for (int j = 0; j < N; ++j) c[j] = 0.0f;
    const float* a = A + int64_t(i) * lda;
    for (int kk = 0; kk < K; ++kk) {
      const float av = a[kk];
      const float* b = B + int64_t(kk) * ldb;
      for (int j = 0; j < N; ++j) c[j] += av * b[j];
    }
  }
}

float finish_row(float m_old, float m_new, float* l, float sum) {
  float alpha = m_old == -kInf ? 0.0f : std::exp(m_old - m_new);
  *l = *l * alpha + sum;
  return alpha;
}

float softmax_row_portable(float* s, int n, float* m, float* l) {
  float mx = -kInf;
  for (int j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  const float m_new = std::max(*m, mx);
  if (m_new == -kInf) {
    for (int j = 0; j < n; ++j) s[j] = 0.0f;
    return 1.0f;
  }
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m_new);
    sum += s[j];
  }
  float alpha = finish_row(*m, m_new, l, sum);
  *m = m_new;
  return alpha;
}

void ds_vec_portable(float* s, float* dp, int n, const float* lse, const float* delta) {
  for (int j = 0; j < n; ++j) {
    float p = std::exp(s[j] - lse[j]);
    s[j] = p;
    dp[j] = p * (dp[j] - delta[j]);
  }
}

void ds_scalar_portable(float* s, float* dp, int n, float lse, float delta) {
  for (int j = 0; j < n; ++j) {
    float p = std::exp(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}

#if TK_SIMD_X86
// Cephes expf constants: exp(x) = 2^n e^r, r = x - n ln2 (ln2 split in two), |r| <= ln2 / 2.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
constexpr float kExpLo = -87.0f, kExpHi = 88.0f;

// ---- AVX-512 -------------------------------------------------------------------------------------

TK_AVX512 inline __m512 exp512(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kP0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(_mm512_knot(tiny), _mm512_scalef_ps(y, n));
}

template <int MR, int NV>
TK_AVX512 void micro512(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int kk = 0; kk < K; ++kk) {
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + int64_t(kk) * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + kk]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

using MicroFn = void (*)(int, const float*, int, const float*, int, float*, int, bool);
#define TK_ATTN_ROW512(mr) {&micro512<mr, 1>, &micro512<mr, 2>, &micro512<mr, 3>, &micro512<mr, 4>}
const MicroFn kMicro512[6][4] = {TK_ATTN_ROW512(1), TK_ATTN_ROW512(2), TK_ATTN_ROW512(3),
                                 TK_ATTN_ROW512(4), TK_ATTN_ROW512(5), TK_ATTN_ROW512(6)};
#undef TK_ATTN_ROW512

void gemm_avx512(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    const int nv = std::min(4, (N - n0) / 16);
    for (int m0 = 0; m0 < M; m0 += 6) {
      const int mr = std::min(6, M - m0);
      kMicro512[mr - 1][nv - 1](K, A + int64_t(m0) * lda, lda, B + n0, ldb, C + int64_t(m0) * ldc + n0, ldc, acc);
    }
  }
}

TK_AVX512 float softmax_row_avx512(float* s, int n, float* m, float* l) {
  __m512 mx = _mm512_set1_ps(-kInf);
  for (int j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  const float m_new = std::max(*m, _mm512_reduce_max_ps(mx));
  if (m_new == -kInf) {
    for (int j = 0; j < n; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
    return 1.0f;
  }
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  float alpha = finish_row(*m, m_new, l, _mm512_reduce_add_ps(sum));
  *m = m_new;
  return alpha;
}

TK_AVX512 void ds_vec_avx512(float* s, float* dp, int n, const float* lse, const float* delta) {
  for (int j = 0; j < n; j += 16) {
    __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(lse + j)));
    _mm512_storeu_ps(s + j, p);
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), _mm512_loadu_ps(delta + j))));
  }
}

TK_AVX512 void ds_scalar_avx512(float* s, float* dp, int n, float lse, float delta) {
  const __m512 vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta);
  for (int j = 0; j < n; j += 16) {
    __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vl));
    _mm512_storeu_ps(s + j, p);
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd)));
  }
}

// ---- AVX2 ----------------------------------------------------------------------------------------

TK_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n for n in [-126, 127]: a normal float built from the exponent bits.
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

TK_AVX2 inline float hmax256(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

TK_AVX2 inline float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

template <int MR, int NV>
TK_AVX2 void micro256(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int kk = 0; kk < K; ++kk) {
    __m256 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + int64_t(kk) * ldb + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + kk);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

#define TK_ATTN_ROW256(mr) {&micro256<mr, 1>, &micro256<mr, 2>, &micro256<mr, 3>}
const MicroFn kMicro256[4][3] = {TK_ATTN_ROW256(1), TK_ATTN_ROW256(2), TK_ATTN_ROW256(3), TK_ATTN_ROW256(4)};
#undef TK_ATTN_ROW256

void gemm_avx2(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 24) {
    const int nv = std::min(3, (N - n0) / 8);
    for (int m0 = 0; m0 < M; m0 += 4) {
      const int mr = std::min(4, M - m0);
      kMicro256[mr - 1][nv - 1](K, A + int64_t(m0) * lda, lda, B + n0, ldb, C + int64_t(m0) * ldc + n0, ldc, acc);
    }
  }
}

TK_AVX2 float softmax_row_avx2(float* s, int n, float* m, float* l) {
  __m256 mx = _mm256_set1_ps(-kInf);
  for (int j = 0; j < n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
  const float m_new = std::max(*m, hmax256(mx));
  if (m_new == -kInf) {
    for (int j = 0; j < n; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    return 1.0f;
  }
  const __m256 vm = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, p);
    sum = _mm256_add_ps(sum, p);
  }
  float alpha = finish_row(*m, m_new, l, hsum256(sum));
  *m = m_new;
  return alpha;
}

TK_AVX2 void ds_vec_avx2(float* s, float* dp, int n, const float* lse, const float* delta) {
  for (int j = 0; j < n; j += 8) {
    __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(lse + j)));
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), _mm256_loadu_ps(delta + j))));
  }
}

TK_AVX2 void ds_scalar_avx2(float* s, float* dp, int n, float lse, float delta) {
  const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(delta);
  for (int j = 0; j < n; j += 8) {
    __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vl));
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd)));
  }
}
#endif  // TK_SIMD_X86

Kernels kernels() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return {gemm_avx512, softmax_row_avx512, ds_vec_avx512, ds_scalar_avx512};
  if (isa >= CpuIsa::Avx2) return {gemm_avx2, softmax_row_avx2, ds_vec_avx2, ds_scalar_avx2};
#endif
  return {gemm_portable, softmax_row_portable, ds_vec_portable, ds_scalar_portable};
}

// ================================ staging ========================================================

inline float elem(const void* p, DType t, int64_t i) {
  return t == DType::F32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// dst[r * ld + d] = mul * src[r * stride + d] for r < n, d < D; zero for D <= d < ld.
// src: n rows of a [.., D] tensor (element offset already applied), dst: [n x ld] fp32.
void load_rows(const void* src, DType t, int64_t stride, int n, int D, float mul, float* dst, int ld) {
  for (int r = 0; r < n; ++r) {
    float* d = dst + int64_t(r) * ld;
    if (t == DType::F32) {
      const float* s = static_cast<const float*>(src) + r * stride;
      for (int i = 0; i < D; ++i) d[i] = mul * s[i];
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src) + r * stride;
      for (int i = 0; i < D; ++i) d[i] = mul * bf16_to_f32(s[i]);
    }
    for (int i = D; i < ld; ++i) d[i] = 0.0f;
  }
}

// Transposed staging: dst[d * ld + r] = mul * src[r * stride + d] for d < D, r < n; zero for
// n <= r < ld. dst: [D x ld] fp32 (rows D..Dp-1 are never read: products run K = D).
inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return bf16_to_f32(x); }

template <typename Src>
void load_cols_t(const Src* src, int64_t stride, int n, int D, float mul, float* dst, int ld) {
  for (int r = 0; r < n; ++r) {
    const Src* s = src + r * stride;
    for (int i = 0; i < D; ++i) dst[int64_t(i) * ld + r] = mul * widen(s[i]);
  }
  for (int i = 0; i < D; ++i)
    for (int r = n; r < ld; ++r) dst[int64_t(i) * ld + r] = 0.0f;
}

void load_cols(const void* src, DType t, int64_t stride, int n, int D, float mul, float* dst, int ld) {
  if (t == DType::F32)
    load_cols_t(static_cast<const float*>(src), stride, n, D, mul, dst, ld);
  else
    load_cols_t(static_cast<const uint16_t*>(src), stride, n, D, mul, dst, ld);
}

// dst[r * stride + d] = round(mul * src[r * ld + d]) for r < n, d < D.
void store_rows(const float* src, int ld, int n, int D, float mul, void* dst, DType t, int64_t stride) {
  for (int r = 0; r < n; ++r) {
    const float* s = src + int64_t(r) * ld;
    if (t == DType::F32) {
      float* d = static_cast<float*>(dst) + r * stride;
      for (int i = 0; i < D; ++i) d[i] = mul * s[i];
    } else {
      uint16_t* d = static_cast<uint16_t*>(dst) + r * stride;
      for (int i = 0; i < D; ++i) d[i] = f32_to_bf16(mul * s[i]);
    }
  }
}

inline const void* at(const TensorView& v, int64_t elems) {
  return static_cast<const char*>(v.data) + elems * int64_t(dtype_size(v.dtype));
}
inline void* at_mut(const TensorView& v, int64_t elems) {
  return static_cast<char*>(v.data) + elems * int64_t(dtype_size(v.dtype));
}

// ================================ problem, masks, tasks ==========================================

struct Problem {
  int64_t B = 0, T = 0, S = 0, H = 0, Hkv = 0, D = 0;
  int Dp = 0;           // D rounded up to 16
  int64_t group = 1;    // H / Hkv
  int64_t off = 0;      // S - T: causal diagonal offset
  float scale = 1.0f;
  bool causal = true;
  const int32_t* seg_q = nullptr;  // [B, T] or null
  const int32_t* seg_k = nullptr;  // [B, S] (seg_q when shared) or null
  int64_t nqb = 0, nkb = 0;        // query / key block counts
};

enum class Vis { None, Partial, Full };

inline bool visible(const Problem& p, int64_t b, int64_t t, int64_t s) {
  if (p.causal && s > t + p.off) return false;
  return !p.seg_q || p.seg_q[b * p.T + t] == p.seg_k[b * p.S + s];
}

// Visibility of the tile queries [t0, t0 + qn) x keys [s0, s0 + kn) of batch row b.
Vis classify(const Problem& p, int64_t b, int64_t t0, int qn, int64_t s0, int kn) {
  if (p.causal && s0 > t0 + qn - 1 + p.off) return Vis::None;
  const bool causal_full = !p.causal || s0 + kn - 1 <= t0 + p.off;
  if (!p.seg_q) return causal_full ? Vis::Full : Vis::Partial;
  bool any = false, all = true;
  for (int i = 0; i < qn; ++i)
    for (int j = 0; j < kn; ++j) {
      bool v = visible(p, b, t0 + i, s0 + j);
      any |= v;
      all &= v;
    }
  return !any ? Vis::None : all ? Vis::Full : Vis::Partial;
}

// Masked scores -> -inf. Query-major tile: s[i * ld + j]; key-major: s[j * ld + i].
void mask_tile(const Problem& p, int64_t b, int64_t t0, int qn, int64_t s0, int kn, float* s, int ld,
               bool key_major) {
  for (int i = 0; i < qn; ++i)
    for (int j = 0; j < kn; ++j)
      if (!visible(p, b, t0 + i, s0 + j)) s[key_major ? int64_t(j) * ld + i : int64_t(i) * ld + j] = -kInf;
}

// One past the last key any query in [t0, t0 + qn) can see (causal), clamped to [0, S].
int64_t key_end(const Problem& p, int64_t t0, int qn) {
  if (!p.causal) return p.S;
  return std::clamp<int64_t>(t0 + qn + p.off, 0, p.S);
}

// Runs fn(task, scratch) for task in [0, n) on the pool, handing tasks out through an atomic
// counter; each thread gets its own fp32 scratch of `scratch_floats`. Which thread runs a task
// never changes its result.
template <class F>
void run_tasks(ThreadPool& pool, int64_t n, size_t scratch_floats, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int threads = int(std::min<int64_t>(n, pool.size()));
  pool.parallel(
      [&](int, int) {
        std::vector<float> scratch(scratch_floats);
        for (;;) {
          int64_t task = next.fetch_add(1, std::memory_order_relaxed);
          if (task >= n) break;
          fn(task, scratch.data());
        }
      },
      threads);
}

// Carves 64-byte aligned-size pieces out of one scratch buffer.
struct Carver {
  float* base;
  size_t used = 0;
  float* take(size_t n) {
    float* r = base + used;
    used += (n + 15) / 16 * 16;
    return r;
  }
};

bool is_float_storage(DType t) { return t == DType::F32 || t == DType::BF16; }

void check_qkv(const char* op, const TensorView& q, const TensorView& k, const TensorView& v) {
  TK_CHECK(q.ndim == 4 && k.ndim == 4 && v.ndim == 4, op, ": q, k, v must be 4-D ([B, T, H, D], [B, S, Hkv, D]), got q ",
           describe(q), ", k ", describe(k), ", v ", describe(v));
  TK_CHECK(q.device.type == DeviceType::CPU && k.device.type == DeviceType::CPU && v.device.type == DeviceType::CPU,
           op, ": tensors must be on the CPU");
  TK_CHECK(is_float_storage(q.dtype) && is_float_storage(k.dtype), op, ": q, k, v must be f32 or bf16, got q ",
           describe(q), ", k ", describe(k));
  TK_CHECK(v.dtype == k.dtype, op, ": k and v must share a dtype, got k ", describe(k), ", v ", describe(v));
  TK_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), op, ": q, k, v must be contiguous");
  for (int i = 0; i < 4; ++i)
    TK_CHECK(k.shape[i] == v.shape[i], op, ": k and v shapes differ: ", describe(k), " vs ", describe(v));
  TK_CHECK(q.shape[0] == k.shape[0] && q.shape[3] == k.shape[3], op,
           ": q [B, T, H, D] and k [B, S, Hkv, D] must agree on B and D, got q ", describe(q), ", k ", describe(k));
  TK_CHECK(q.shape[3] >= 1 && k.shape[2] >= 1 && q.shape[2] % k.shape[2] == 0, op,
           ": need D >= 1, Hkv >= 1 and H % Hkv == 0, got q ", describe(q), ", k ", describe(k));
}

void check_like(const char* op, const char* name, const TensorView& t, const TensorView& like, DType dtype) {
  bool same = t.ndim == like.ndim && t.dtype == dtype && t.device.type == DeviceType::CPU && t.is_contiguous();
  for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == like.shape[i];
  TK_CHECK(same, op, ": ", name, " must be a contiguous CPU tensor of shape ", describe(like), " with dtype ",
           dtype_name(dtype), ", got ", describe(t));
}

Problem make_problem(const char* op, const TensorView& q, const TensorView& k, const TensorView* seg_q,
                     const TensorView* seg_k, const AttentionOptions& opt) {
  Problem p;
  p.B = q.shape[0];
  p.T = q.shape[1];
  p.H = q.shape[2];
  p.D = q.shape[3];
  p.S = k.shape[1];
  p.Hkv = k.shape[2];
  TK_CHECK(p.D <= (int64_t(1) << 20) && p.T < (int64_t(1) << 40) && p.S < (int64_t(1) << 40), op,
           ": sizes out of range: q ", describe(q), ", k ", describe(k));
  p.Dp = int((p.D + 15) / 16 * 16);
  p.group = p.H / p.Hkv;
  p.off = p.S - p.T;
  p.causal = opt.causal;
  TK_CHECK(std::isfinite(opt.scale), op, ": scale must be finite, got ", opt.scale);
  p.scale = opt.scale == 0.0f ? float(1.0 / std::sqrt(double(p.D))) : opt.scale;
  auto check_seg = [&](const TensorView& s, int64_t len, const char* name) {
    TK_CHECK(s.data != nullptr && s.ndim == 2 && s.shape[0] == p.B && s.shape[1] == len && s.dtype == DType::I32 &&
                 s.is_contiguous() && s.device.type == DeviceType::CPU,
             op, ": ", name, " must be a contiguous CPU i32 tensor [", p.B, ", ", len, "], got ", describe(s));
  };
  if (seg_q) {
    check_seg(*seg_q, p.T, "segment ids of the queries");
    p.seg_q = seg_q->ptr<const int32_t>();
    if (seg_k) {
      check_seg(*seg_k, p.S, "segment ids of the keys");
      p.seg_k = seg_k->ptr<const int32_t>();
    } else {
      TK_CHECK(p.S == p.T, op, ": one set of segment ids [B, T] needs S == T, got T = ", p.T, ", S = ", p.S,
               "; pass key segment ids [B, S] as well");
      p.seg_k = p.seg_q;
    }
  } else {
    TK_CHECK(!seg_k, op, ": key segment ids given without query segment ids");
  }
  p.nqb = (p.T + kBq - 1) / kBq;
  p.nkb = (p.S + kBk - 1) / kBk;
  return p;
}

}  // namespace

// ================================ forward ========================================================

void attention_forward_cpu(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* seg_q,
                           const TensorView* seg_k, const AttentionOptions& opt, const TensorView& o,
                           const TensorView& lse, ThreadPool& pool) {
  const char* op = "attention_forward";
  check_qkv(op, q, k, v);
  check_like(op, "o", o, q, q.dtype);
  TensorView lse_shape = make_view(nullptr, DType::F32, Device{}, {q.shape[0], q.shape[2], q.shape[1]});
  check_like(op, "lse", lse, lse_shape, DType::F32);
  const Problem p = make_problem(op, q, k, seg_q, seg_k, opt);
  const Kernels kern = kernels();
  const int D = int(p.D), Dp = p.Dp;
  const int64_t qstride = p.H * p.D, kstride = p.Hkv * p.D;
  const size_t scratch = size_t(kBq) * Dp * 2 + size_t(Dp) * kBk + size_t(kBk) * Dp + size_t(kBq) * kBk + 2 * kBq + 96;
  float* lse_out = lse.ptr<float>();

  run_tasks(pool, p.B * p.H * p.nqb, scratch, [&](int64_t task, float* buf) {
    const int64_t qb = p.nqb - 1 - task % p.nqb;  // biggest causal blocks first
    const int64_t h = (task / p.nqb) % p.H, b = task / (p.nqb * p.H);
    const int64_t g = h / p.group;
    const int64_t t0 = qb * kBq;
    const int qn = int(std::min<int64_t>(kBq, p.T - t0));
    Carver c{buf};
    float* Qs = c.take(size_t(kBq) * Dp);   // [qn x Dp], scaled
    float* O = c.take(size_t(kBq) * Dp);    // [qn x Dp] accumulator
    float* Kt = c.take(size_t(Dp) * kBk);   // [D x kBk]
    float* Vb = c.take(size_t(kBk) * Dp);   // [kn x Dp]
    float* Sb = c.take(size_t(kBq) * kBk);  // [qn x kBk] scores, then p
    float* m = c.take(kBq);
    float* l = c.take(kBq);

    const int64_t q_off = (b * p.T + t0) * p.H * p.D + h * p.D;
    load_rows(at(q, q_off), q.dtype, qstride, qn, D, p.scale, Qs, Dp);
    std::fill(O, O + size_t(qn) * Dp, 0.0f);
    std::fill(m, m + qn, -kInf);
    std::fill(l, l + qn, 0.0f);

    const int64_t s_end = key_end(p, t0, qn);
    for (int64_t s0 = 0; s0 < s_end; s0 += kBk) {
      const int kn = int(std::min<int64_t>(kBk, p.S - s0));
      const Vis vis = classify(p, b, t0, qn, s0, kn);
      if (vis == Vis::None) continue;
      const int64_t k_off = (b * p.S + s0) * p.Hkv * p.D + g * p.D;
      load_cols(at(k, k_off), k.dtype, kstride, kn, D, 1.0f, Kt, kBk);
      load_rows(at(v, k_off), v.dtype, kstride, kn, D, 1.0f, Vb, Dp);
      kern.gemm(qn, kBk, D, Qs, Dp, Kt, kBk, Sb, kBk, false);
      if (vis == Vis::Partial) mask_tile(p, b, t0, qn, s0, kn, Sb, kBk, false);
      if (kn < kBk)
        for (int i = 0; i < qn; ++i) std::fill(Sb + int64_t(i) * kBk + kn, Sb + int64_t(i + 1) * kBk, -kInf);
      for (int i = 0; i < qn; ++i) {
        const float alpha = kern.softmax_row(Sb + int64_t(i) * kBk, kBk, &m[i], &l[i]);
        if (alpha != 1.0f) {
          float* orow = O + int64_t(i) * Dp;
          for (int d = 0; d < Dp; ++d) orow[d] *= alpha;
        }
      }
      kern.gemm(qn, Dp, kn, Sb, kBk, Vb, Dp, O, Dp, true);
    }
    float* lrow = lse_out + (b * p.H + h) * p.T + t0;
    for (int i = 0; i < qn; ++i) {
      float* orow = O + int64_t(i) * Dp;
      if (l[i] == 0.0f) {  // no visible key
        std::fill(orow, orow + Dp, 0.0f);
        lrow[i] = -kInf;
      } else {
        const float inv = 1.0f / l[i];
        for (int d = 0; d < Dp; ++d) orow[d] *= inv;
        lrow[i] = m[i] + std::log(l[i]);
      }
    }
    store_rows(O, Dp, qn, D, 1.0f, at_mut(o, q_off), o.dtype, qstride);
  });
}

// ================================ backward =======================================================

void attention_backward_cpu(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& o, const TensorView& lse, const TensorView* seg_q,
                            const TensorView* seg_k, const AttentionOptions& opt, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, ThreadPool& pool) {
  const char* op = "attention_backward";
  check_qkv(op, q, k, v);
  check_like(op, "do (the output gradient)", dout, q, q.dtype);
  check_like(op, "o", o, q, q.dtype);
  TensorView lse_shape = make_view(nullptr, DType::F32, Device{}, {q.shape[0], q.shape[2], q.shape[1]});
  check_like(op, "lse", lse, lse_shape, DType::F32);
  check_like(op, "dq", dq, q, q.dtype);
  check_like(op, "dk", dk, k, k.dtype);
  check_like(op, "dv", dv, k, k.dtype);
  const Problem p = make_problem(op, q, k, seg_q, seg_k, opt);
  const Kernels kern = kernels();
  const int D = int(p.D), Dp = p.Dp;
  const int64_t qstride = p.H * p.D, kstride = p.Hkv * p.D;
  const float* lse_in = lse.ptr<const float>();

  // delta[b, h, t] = sum_d do * o, accumulated in double (O(B T H D), negligible).
  std::vector<float> delta(size_t(p.B * p.H * p.T));
  pool.parallel_for(p.B * p.T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.H * p.D)),
                    [&](int64_t r0, int64_t r1) {
                      for (int64_t r = r0; r < r1; ++r) {
                        const int64_t b = r / p.T, t = r % p.T;
                        for (int64_t h = 0; h < p.H; ++h) {
                          const int64_t base = r * qstride + h * p.D;
                          double acc = 0.0;
                          for (int64_t d = 0; d < p.D; ++d)
                            acc += double(elem(dout.data, dout.dtype, base + d)) * double(elem(o.data, o.dtype, base + d));
                          delta[size_t((b * p.H + h) * p.T + t)] = float(acc);
                        }
                      }
                    });
  // The exponent's offset: lse, or +inf for rows that see no key (so that p = 0 there).
  auto lse_eff = [&](int64_t b, int64_t h, int64_t t) {
    float x = lse_in[(b * p.H + h) * p.T + t];
    return x == -kInf ? kInf : x;
  };

  // ---- pass 1: dk, dv. One task per (b, kv head, key block), key-major tiles.
  const size_t scratch1 = size_t(kBk) * Dp * 4 + size_t(Dp) * kBq * 2 + size_t(kBq) * Dp * 2 +
                          size_t(kBk) * kBq * 2 + 2 * kBq + 192;
  run_tasks(pool, p.B * p.Hkv * p.nkb, scratch1, [&](int64_t task, float* buf) {
    const int64_t kb = task % p.nkb;  // early key blocks (most causal work) first
    const int64_t g = (task / p.nkb) % p.Hkv, b = task / (p.nkb * p.Hkv);
    const int64_t s0 = kb * kBk;
    const int kn = int(std::min<int64_t>(kBk, p.S - s0));
    Carver c{buf};
    float* Ks = c.take(size_t(kBk) * Dp);   // [kn x Dp]
    float* Vs = c.take(size_t(kBk) * Dp);   // [kn x Dp]
    float* dK = c.take(size_t(kBk) * Dp);   // [kn x Dp] accumulator
    float* dV = c.take(size_t(kBk) * Dp);   // [kn x Dp] accumulator
    float* Qt = c.take(size_t(Dp) * kBq);   // [D x kBq], scaled
    float* dOt = c.take(size_t(Dp) * kBq);  // [D x kBq]
    float* Qr = c.take(size_t(kBq) * Dp);   // [qn x Dp], scaled
    float* dOr = c.take(size_t(kBq) * Dp);  // [qn x Dp]
    float* ST = c.take(size_t(kBk) * kBq);  // [kn x kBq] scores, then p^T
    float* dPT = c.take(size_t(kBk) * kBq); // [kn x kBq] dp^T, then ds^T
    float* lse_v = c.take(kBq);
    float* delta_v = c.take(kBq);

    const int64_t k_off = (b * p.S + s0) * p.Hkv * p.D + g * p.D;
    load_rows(at(k, k_off), k.dtype, kstride, kn, D, 1.0f, Ks, Dp);
    load_rows(at(v, k_off), v.dtype, kstride, kn, D, 1.0f, Vs, Dp);
    std::fill(dK, dK + size_t(kn) * Dp, 0.0f);
    std::fill(dV, dV + size_t(kn) * Dp, 0.0f);
    // Queries t see key s0 only if t + off >= s0.
    const int64_t t_start = p.causal ? std::clamp<int64_t>(s0 - p.off, 0, p.T) : 0;
    for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
      for (int64_t qb = t_start / kBq; qb < p.nqb; ++qb) {
        const int64_t t0 = qb * kBq;
        const int qn = int(std::min<int64_t>(kBq, p.T - t0));
        const Vis vis = classify(p, b, t0, qn, s0, kn);
        if (vis == Vis::None) continue;
        const int64_t q_off = (b * p.T + t0) * p.H * p.D + h * p.D;
        load_cols(at(q, q_off), q.dtype, qstride, qn, D, p.scale, Qt, kBq);
        load_cols(at(dout, q_off), dout.dtype, qstride, qn, D, 1.0f, dOt, kBq);
        load_rows(at(q, q_off), q.dtype, qstride, qn, D, p.scale, Qr, Dp);
        load_rows(at(dout, q_off), dout.dtype, qstride, qn, D, 1.0f, dOr, Dp);
        for (int i = 0; i < kBq; ++i) {
          lse_v[i] = i < qn ? lse_eff(b, h, t0 + i) : kInf;
          delta_v[i] = i < qn ? delta[size_t((b * p.H + h) * p.T + t0 + i)] : 0.0f;
        }
        kern.gemm(kn, kBq, D, Ks, Dp, Qt, kBq, ST, kBq, false);
        if (vis == Vis::Partial) mask_tile(p, b, t0, qn, s0, kn, ST, kBq, true);
        kern.gemm(kn, kBq, D, Vs, Dp, dOt, kBq, dPT, kBq, false);
        for (int j = 0; j < kn; ++j) kern.ds_vec(ST + int64_t(j) * kBq, dPT + int64_t(j) * kBq, kBq, lse_v, delta_v);
        kern.gemm(kn, Dp, qn, ST, kBq, dOr, Dp, dV, Dp, true);
        kern.gemm(kn, Dp, qn, dPT, kBq, Qr, Dp, dK, Dp, true);
      }
    }
    store_rows(dK, Dp, kn, D, 1.0f, at_mut(dk, k_off), dk.dtype, kstride);
    store_rows(dV, Dp, kn, D, 1.0f, at_mut(dv, k_off), dv.dtype, kstride);
  });

  // ---- pass 2: dq. One task per (b, h, query block), query-major tiles.
  const size_t scratch2 = size_t(kBq) * Dp * 3 + size_t(Dp) * kBk * 2 + size_t(kBk) * Dp + size_t(kBq) * kBk * 2 + 128;
  run_tasks(pool, p.B * p.H * p.nqb, scratch2, [&](int64_t task, float* buf) {
    const int64_t qb = p.nqb - 1 - task % p.nqb;
    const int64_t h = (task / p.nqb) % p.H, b = task / (p.nqb * p.H);
    const int64_t g = h / p.group;
    const int64_t t0 = qb * kBq;
    const int qn = int(std::min<int64_t>(kBq, p.T - t0));
    Carver c{buf};
    float* Qr = c.take(size_t(kBq) * Dp);   // [qn x Dp], scaled
    float* dOr = c.take(size_t(kBq) * Dp);  // [qn x Dp]
    float* dQ = c.take(size_t(kBq) * Dp);   // [qn x Dp] accumulator
    float* Kt = c.take(size_t(Dp) * kBk);   // [D x kBk]
    float* Vt = c.take(size_t(Dp) * kBk);   // [D x kBk]
    float* Ks = c.take(size_t(kBk) * Dp);   // [kn x Dp]
    float* Sb = c.take(size_t(kBq) * kBk);  // [qn x kBk] scores, then p
    float* dP = c.take(size_t(kBq) * kBk);  // [qn x kBk] dp, then ds

    const int64_t q_off = (b * p.T + t0) * p.H * p.D + h * p.D;
    load_rows(at(q, q_off), q.dtype, qstride, qn, D, p.scale, Qr, Dp);
    load_rows(at(dout, q_off), dout.dtype, qstride, qn, D, 1.0f, dOr, Dp);
    std::fill(dQ, dQ + size_t(qn) * Dp, 0.0f);
    const int64_t s_end = key_end(p, t0, qn);
    for (int64_t s0 = 0; s0 < s_end; s0 += kBk) {
      const int kn = int(std::min<int64_t>(kBk, p.S - s0));
      const Vis vis = classify(p, b, t0, qn, s0, kn);
      if (vis == Vis::None) continue;
      const int64_t k_off = (b * p.S + s0) * p.Hkv * p.D + g * p.D;
      load_cols(at(k, k_off), k.dtype, kstride, kn, D, 1.0f, Kt, kBk);
      load_cols(at(v, k_off), v.dtype, kstride, kn, D, 1.0f, Vt, kBk);
      load_rows(at(k, k_off), k.dtype, kstride, kn, D, 1.0f, Ks, Dp);
      kern.gemm(qn, kBk, D, Qr, Dp, Kt, kBk, Sb, kBk, false);
      if (vis == Vis::Partial) mask_tile(p, b, t0, qn, s0, kn, Sb, kBk, false);
      kern.gemm(qn, kBk, D, dOr, Dp, Vt, kBk, dP, kBk, false);
      // Columns kn..kBk-1 hold padding; the ds k product below reads only the first kn.
      for (int i = 0; i < qn; ++i)
        kern.ds_scalar(Sb + int64_t(i) * kBk, dP + int64_t(i) * kBk, kBk, lse_eff(b, h, t0 + i),
                       delta[size_t((b * p.H + h) * p.T + t0 + i)]);
      kern.gemm(qn, Dp, kn, dP, kBk, Ks, Dp, dQ, Dp, true);
    }
    store_rows(dQ, Dp, qn, D, p.scale, at_mut(dq, q_off), dq.dtype, qstride);
  });
}

}  // namespace tk
