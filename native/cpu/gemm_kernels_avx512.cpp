// AVX-512 GEMM micro-kernels: fp32 FMA and AVX512-BF16 (vdpbf16ps), plus the packers they use.
//
// Register tile 14 x 32 for both: 28 zmm accumulators + 2 zmm of B = 30 of the 32 registers; A values
// come straight from memory as broadcast loads, so no register holds them. One k step is 2 vector
// loads + 14 broadcasts for 28 FMAs: the loads stay well below the load ports' rate while the FMA
// pipes stay busy, and 28 independent chains cover FMA latency x throughput (4 x 1 zmm per cycle
// on Zen 4, 4 x 2 on Intel server cores) several times over. Measured on Zen 4 with the panels in
// cache, the kernel alone runs at the FMA peak the probe measures: ~114 GFLOP/s per core for fp32
// and ~226-231 of ~233 for bf16.
//
// The bf16 kernel has the same shape: each lane of a B vector holds a (k, k+1) pair of one column,
// each broadcast 32-bit word a (k, k+1) pair of one row, so one vdpbf16ps does 16 columns x 2 k of
// multiply-adds -- twice the work of an fp32 FMA at the same issue rate.
//
// Edges: m < 14 selects a kernel instantiated for exactly m rows (no wasted FMAs on short row
// panels), n < 32 masks the loads and stores of C. The file is compiled for baseline x86-64, so
// every function using intrinsics carries its own target attribute.
#include "gemm_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

// GCC 12 flags the _mm*_undefined_* placeholders inside its own intrinsic headers as
// maybe-uninitialized once they are inlined here (a known false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define TK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace tk::gemm_detail {
namespace {

constexpr int kMR = 14, kNR = 32;

// The store of one 32-wide row of the tile: C = alpha * acc + beta * C, masked to n columns.
// mode 0: beta == 0 (C is not read), 1: beta == 1, 2: general beta.
TK_AVX512 inline void store_row(float* c, __m512 x0, __m512 x1, __m512 va, __m512 vb, int mode, int n) {
  if (n == kNR) {
    if (mode == 0) {
      _mm512_storeu_ps(c, _mm512_mul_ps(va, x0));
      _mm512_storeu_ps(c + 16, _mm512_mul_ps(va, x1));
    } else if (mode == 1) {
      _mm512_storeu_ps(c, _mm512_fmadd_ps(va, x0, _mm512_loadu_ps(c)));
      _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(va, x1, _mm512_loadu_ps(c + 16)));
    } else {
      _mm512_storeu_ps(c, _mm512_fmadd_ps(va, x0, _mm512_mul_ps(vb, _mm512_loadu_ps(c))));
      _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(va, x1, _mm512_mul_ps(vb, _mm512_loadu_ps(c + 16))));
    }
    return;
  }
  const __mmask16 m0 = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n <= 16 ? __mmask16(0) : n >= 32 ? __mmask16(0xffff) : __mmask16((1u << (n - 16)) - 1);
  __m512 r0 = _mm512_mul_ps(va, x0), r1 = _mm512_mul_ps(va, x1);
  if (mode != 0) {
    __m512 c0 = _mm512_maskz_loadu_ps(m0, c), c1 = _mm512_maskz_loadu_ps(m1, c + 16);
    if (mode == 2) {
      c0 = _mm512_mul_ps(vb, c0);
      c1 = _mm512_mul_ps(vb, c1);
    }
    r0 = _mm512_add_ps(r0, c0);
    r1 = _mm512_add_ps(r1, c1);
  }
  _mm512_mask_storeu_ps(c, m0, r0);
  _mm512_mask_storeu_ps(c + 16, m1, r1);
}

inline int epilogue_mode(float beta) { return beta == 0.0f ? 0 : beta == 1.0f ? 1 : 2; }

// Ap [kc][14] packed, Bp [kc][32] packed, C [ROWS][n] with row stride ldc.
template <int ROWS>
TK_AVX512 void tile_f32(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc, int n,
                        float alpha, float beta) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  // The C tile is written once per K block; fetching it early hides that miss behind the loop.
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kNR - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
    }
    a += kMR;
    b += kNR;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const int mode = epilogue_mode(beta);
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) store_row(c + i * ldc, acc0[i], acc1[i], va, vb, mode, n);
}

// Ap [ceil(kc/2)][14][2] bf16 pairs, Bp [ceil(kc/2)][32][2] bf16 pairs, C [ROWS][n] fp32.
template <int ROWS>
TK_AVX512BF16 void tile_bf16(int64_t kc, const uint16_t* __restrict a, const uint16_t* __restrict b, float* c,
                             int64_t ldc, int n, float alpha, float beta) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kNR - 1), _MM_HINT_T0);
  }
  const int64_t kp = (kc + 1) / 2;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kp; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 32);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + 2 * i, 4);
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
    }
    a += 2 * kMR;
    b += 2 * kNR;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const int mode = epilogue_mode(beta);
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) store_row(c + i * ldc, acc0[i], acc1[i], va, vb, mode, n);
}

template <int... R>
struct RowTable {
  static constexpr decltype(&tile_f32<1>) f32[] = {nullptr, &tile_f32<R>...};
  static constexpr decltype(&tile_bf16<1>) bf16[] = {nullptr, &tile_bf16<R>...};
};
using Rows = RowTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14>;

void kernel_f32(int64_t kc, const void* ap, const void* bp, float* c, int64_t ldc, int m, int n, float alpha,
                float beta) {
  Rows::f32[m](kc, static_cast<const float*>(ap), static_cast<const float*>(bp), c, ldc, n, alpha, beta);
}

void kernel_bf16(int64_t kc, const void* ap, const void* bp, float* c, int64_t ldc, int m, int n, float alpha,
                 float beta) {
  Rows::bf16[m](kc, static_cast<const uint16_t*>(ap), static_cast<const uint16_t*>(bp), c, ldc, n, alpha, beta);
}

// ---- packing ------------------------------------------------------------------------------------
// The layouts GEMM meets most in training (x W^T forward, dY W and dY^T X backward) need transposing
// packs (source contiguous along k); scalar gathers would cost a few percent of a large GEMM, so
// the fp32 and bf16-pair cases get 16 x 16 transposes of 32-bit words. Copy-shaped packs (source
// contiguous along the panel width) are plain vector copies.

// 16 x 16 transpose of 32-bit words: rows r[0..15] in, columns out in place.
TK_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + s] now holds, per 128-bit lane L, the 4 words of column (4L + s') for rows 4q..4q+3,
  // with s' = {0, 1, 2, 3} for s = {0, 1, 2, 3}. Gather lanes across the row groups.
  for (int s = 0; s < 4; ++s) {
    __m512i a = _mm512_shuffle_i32x4(r[s], r[4 + s], 0x88);       // lanes 0,2 of r[s] | 0,2 of r[4+s]
    __m512i b = _mm512_shuffle_i32x4(r[s], r[4 + s], 0xdd);       // lanes 1,3
    __m512i c = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0x88);
    __m512i d = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0xdd);
    t[s] = _mm512_shuffle_i32x4(a, c, 0x88);       // lane 0 columns
    t[8 + s] = _mm512_shuffle_i32x4(a, c, 0xdd);   // lane 2
    t[4 + s] = _mm512_shuffle_i32x4(b, d, 0x88);   // lane 1
    t[12 + s] = _mm512_shuffle_i32x4(b, d, 0xdd);  // lane 3
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Transposing pack of 32-bit words: dst[k][w] = src[w * sw + k] for a full panel (W in {14, 32}
// columns present), k in [0, kw) 32-bit words. Columns >= width are zero.
TK_AVX512 void pack_transpose_words(const uint32_t* src, int64_t sw, int width, int64_t kw, int W, uint32_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= kw; k += 16) {
    for (int w0 = 0; w0 < W; w0 += 16) {
      __m512i r[16];
      const int cnt = W - w0 < 16 ? W - w0 : 16;
      for (int i = 0; i < 16; ++i)
        r[i] = (i < cnt && w0 + i < width) ? _mm512_loadu_si512(src + (w0 + i) * sw + k) : _mm512_setzero_si512();
      transpose16(r);
      const __mmask16 mask = __mmask16((1u << cnt) - 1);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(dst + (k + j) * W + w0, mask, r[j]);
    }
  }
  for (; k < kw; ++k)
    for (int w = 0; w < W; ++w) {
      uint32_t v = 0;
      if (w < width) std::memcpy(&v, src + w * sw + k, 4);  // bf16 pair sources may be 2-byte aligned
      dst[k * W + w] = v;
    }
}

// bf16 rows k and k+1 (contiguous along w) interleaved into pairs: dst[kp][w] = (x[2kp][w], x[2kp+1][w]).
TK_AVX512BF16 void pack_interleave_pairs(const uint16_t* src, int64_t sk, int width, int64_t kc, int W,
                                         uint32_t* dst) {
  const int64_t kp = (kc + 1) / 2;
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < kp; ++p) {
    const uint16_t* r0 = src + 2 * p * sk;
    const bool has1 = 2 * p + 1 < kc;
    for (int w0 = 0; w0 < W; w0 += 32) {
      const int avail = width - w0;
      const __mmask32 m = avail >= 32 ? __mmask32(0xffffffffu) : avail <= 0 ? 0 : __mmask32((1u << avail) - 1);
      const __m512i x0 = _mm512_maskz_loadu_epi16(m, r0 + w0);
      const __m512i x1 = has1 ? _mm512_maskz_loadu_epi16(m, r0 + sk + w0) : _mm512_setzero_si512();
      const int cnt = W - w0 < 32 ? W - w0 : 32;  // words to store
      const __m512i lo = _mm512_permutex2var_epi16(x0, idx_lo, x1);  // words w0 .. w0+15
      const __m512i hi = _mm512_permutex2var_epi16(x0, idx_hi, x1);  // words w0+16 .. w0+31
      const __mmask16 s0 = cnt >= 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
      const __mmask16 s1 = cnt <= 16 ? __mmask16(0) : __mmask16((1u << (cnt - 16)) - 1);
      _mm512_mask_storeu_epi32(dst + p * W + w0, s0, lo);
      _mm512_mask_storeu_epi32(dst + p * W + w0 + 16, s1, hi);
    }
  }
}

// f32 rows (contiguous along w) copied: dst[k][w] = x[k][w].
TK_AVX512 void pack_copy_f32(const float* src, int64_t sk, int width, int64_t kc, int W, float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* r = src + k * sk;
    for (int w0 = 0; w0 < W; w0 += 16) {
      const int avail = width - w0;
      const __mmask16 m = avail >= 16 ? __mmask16(0xffff) : avail <= 0 ? 0 : __mmask16((1u << avail) - 1);
      const int cnt = W - w0 < 16 ? W - w0 : 16;
      _mm512_mask_storeu_ps(dst + k * W + w0, __mmask16((1u << cnt) - 1), _mm512_maskz_loadu_ps(m, r + w0));
    }
  }
}

void pack_f32(const PanelSrc& s, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W, void* dst) {
  if (s.dtype != DType::F32 || (s.sk != 1 && s.sw != 1)) return pack_panels_f32_generic(s, w0, width, k0, kc, W, dst);
  const float* base = static_cast<const float*>(s.base);
  float* out = static_cast<float*>(dst);
  for (int64_t p = 0; p < width; p += W) {
    const int w = int(width - p < W ? width - p : W);
    const float* src = base + (w0 + p) * s.sw + k0 * s.sk;
    if (s.sk == 1)
      pack_transpose_words(reinterpret_cast<const uint32_t*>(src), s.sw, w, kc, W, reinterpret_cast<uint32_t*>(out));
    else
      pack_copy_f32(src, s.sk, w, kc, W, out);
    out += kc * W;
  }
}

void pack_bf16(const PanelSrc& s, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W, void* dst) {
  // Word transposes need a row stride of whole words (k0 is always even: kc blocks are).
  const bool transpose_ok = s.sk == 1 && s.sw % 2 == 0;
  if (s.dtype != DType::BF16 || !(transpose_ok || s.sw == 1))
    return pack_panels_bf16pairs_generic(s, w0, width, k0, kc, W, dst);
  const uint16_t* base = static_cast<const uint16_t*>(s.base);
  uint32_t* out = static_cast<uint32_t*>(dst);
  const int64_t kp = (kc + 1) / 2;
  for (int64_t p = 0; p < width; p += W) {
    const int w = int(width - p < W ? width - p : W);
    const uint16_t* src = base + (w0 + p) * s.sw + k0 * s.sk;
    if (s.sw == 1) {
      pack_interleave_pairs(src, s.sk, w, kc, W, out);
    } else {
      // Words of a row are the k pairs; the word stride is sw / 2. An odd kc leaves one lone k
      // whose partner must be zero, not the next element in memory.
      pack_transpose_words(reinterpret_cast<const uint32_t*>(src), s.sw / 2, w, kc / 2, W, out);
      if (kc % 2)
        for (int j = 0; j < W; ++j) out[(kp - 1) * W + j] = j < w ? uint32_t(src[j * s.sw + kc - 1]) : 0u;
    }
    out += kp * W;
  }
}

// ---- bf16 output --------------------------------------------------------------------------------

// fp32 -> bf16 bits, round to nearest even, NaN kept quiet: the vector form of f32_to_bf16 (the
// vcvtneps2bf16 instruction would flush denormals, so the integer form is used on both ISAs).
TK_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// acc [m][n] fp32 (row stride ld_acc) -> C [m][n] bf16 (row stride ldc) as alpha * acc + beta * C.
TK_AVX512 void store_bf16(const float* acc, int64_t ld_acc, uint16_t* c, int64_t ldc, int64_t m, int64_t n,
                          float alpha, float beta) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int64_t i = 0; i < m; ++i) {
    const float* a = acc + i * ld_acc;
    uint16_t* row = c + i * ldc;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
      __m512 v = _mm512_mul_ps(va, _mm512_maskz_loadu_ps(mk, a + j));
      if (beta != 0.0f) {
        const __m256i old = _mm256_maskz_loadu_epi16(mk, row + j);
        const __m512 of = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16));
        v = _mm512_fmadd_ps(vb, of, v);
      }
      _mm256_mask_storeu_epi16(row + j, mk, to_bf16(v));
    }
  }
}

}  // namespace

bool kernels_avx512_f32(KernelSet* ks) {
  ks->name = "avx512-f32-14x32";
  ks->mr = kMR;
  ks->nr = kNR;
  ks->fmt = PackFmt::F32;
  ks->kernel = &kernel_f32;
  ks->pack = &pack_f32;
  ks->store_bf16 = &store_bf16;
  // Blocking measured on Zen 4 (32 KiB L1d, 1 MiB L2 per core): the B panel (kc x 128 B) and the
  // A panels stream from L2/L3 well enough at this tile size (the kernel alone runs at FMA peak
  // with its panels in L2), so what is left to win is the C traffic: every K block reads and
  // writes the C tile once, and kc = 1024 cuts that to a few percent (256 -> 1024 took one core
  // from ~93 to ~108 GFLOP/s at 2048^3). mc = 280 caps a row chunk's A block at 1.1 MiB (140 to
  // 560 measured alike: A streams from L2/L3 too); nc = 2048 bounds the shared B block at 8 MiB
  // (L3) while A is repacked only every 2048 columns.
  ks->kc = 1024;
  ks->mc = 14 * 20;
  ks->nc = 2048;
  return true;
}

bool kernels_avx512_bf16(KernelSet* ks) {
  ks->name = "avx512bf16-14x32";
  ks->mr = kMR;
  ks->nr = kNR;
  ks->fmt = PackFmt::Bf16Pairs;
  ks->kernel = &kernel_bf16;
  ks->pack = &pack_bf16;
  ks->store_bf16 = &store_bf16;
  // The fp32 blocking at the same bytes per block: twice the k depth (2048 bf16 = 1024 pairs);
  // on one core at 2048^3, kc = 512 / 1024 / 2048 measured ~204 / ~213 / ~218 GFLOP/s.
  ks->kc = 2048;
  ks->mc = 14 * 20;
  ks->nc = 2048;
  return true;
}

}  // namespace tk::gemm_detail

#else  // not x86-64: no AVX-512 kernels

namespace tk::gemm_detail {
bool kernels_avx512_f32(KernelSet*) { return false; }
bool kernels_avx512_bf16(KernelSet*) { return false; }
}  // namespace tk::gemm_detail

#endif
