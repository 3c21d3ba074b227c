// AVX2 + FMA GEMM micro-kernel (fp32; bf16 inputs arrive widened by the packer).
//
// Register tile 6 x 16: 12 ymm accumulators + 2 ymm of B + 1 broadcast = 15 of the 16 registers.
// One k step is 2 loads + 6 broadcasts for 12 FMAs; with two FMA pipes of latency 4-5 the 12
// independent chains just cover latency x throughput (8-10 in flight). m < 6 selects a kernel
// instantiated for exactly m rows; n < 16 masks the C accesses with vmaskmov. The file is
// compiled for baseline x86-64, so every function using intrinsics carries a target attribute.
#include "gemm_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TK_AVX2 __attribute__((target("avx2,fma")))

namespace tk::gemm_detail {
namespace {

constexpr int kMR = 6, kNR = 16;

TK_AVX2 inline __m256i lane_mask(int n) {  // lanes j < n set (n may be <= 0 or >= 8)
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

// C = alpha * acc + beta * C for one 16-wide row, masked to n columns; mode 0: beta == 0 (C is
// not read), 1: beta == 1, 2: general.
TK_AVX2 inline void store_row(float* c, __m256 x0, __m256 x1, __m256 va, __m256 vb, int mode, int n) {
  if (n == kNR) {
    __m256 r0 = _mm256_mul_ps(va, x0), r1 = _mm256_mul_ps(va, x1);
    if (mode == 1) {
      r0 = _mm256_add_ps(r0, _mm256_loadu_ps(c));
      r1 = _mm256_add_ps(r1, _mm256_loadu_ps(c + 8));
    } else if (mode == 2) {
      r0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), r0);
      r1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), r1);
    }
    _mm256_storeu_ps(c, r0);
    _mm256_storeu_ps(c + 8, r1);
    return;
  }
  const __m256i m0 = lane_mask(n), m1 = lane_mask(n - 8);
  __m256 r0 = _mm256_mul_ps(va, x0), r1 = _mm256_mul_ps(va, x1);
  if (mode != 0) {
    const __m256 c0 = _mm256_maskload_ps(c, m0), c1 = _mm256_maskload_ps(c + 8, m1);
    r0 = _mm256_fmadd_ps(mode == 1 ? _mm256_set1_ps(1.0f) : vb, c0, r0);
    r1 = _mm256_fmadd_ps(mode == 1 ? _mm256_set1_ps(1.0f) : vb, c1, r1);
  }
  _mm256_maskstore_ps(c, m0, r0);
  _mm256_maskstore_ps(c + 8, m1, r1);
}

// Ap [kc][6] packed, Bp [kc][16] packed, C [ROWS][n] with row stride ldc.
template <int ROWS>
TK_AVX2 void tile_f32(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc, int n,
                      float alpha, float beta) {
  __m256 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      acc0[i] = _mm256_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(ai, b1, acc1[i]);
    }
    a += kMR;
    b += kNR;
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  const int mode = beta == 0.0f ? 0 : beta == 1.0f ? 1 : 2;
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) store_row(c + i * ldc, acc0[i], acc1[i], va, vb, mode, n);
}

using TileFn = decltype(&tile_f32<1>);
constexpr TileFn kTiles[] = {nullptr,      &tile_f32<1>, &tile_f32<2>, &tile_f32<3>,
                             &tile_f32<4>, &tile_f32<5>, &tile_f32<6>};

void kernel_f32(int64_t kc, const void* ap, const void* bp, float* c, int64_t ldc, int m, int n, float alpha,
                float beta) {
  kTiles[m](kc, static_cast<const float*>(ap), static_cast<const float*>(bp), c, ldc, n, alpha, beta);
}

}  // namespace

bool kernels_avx2_f32(KernelSet* ks) {
  ks->name = "avx2-f32-6x16";
  ks->mr = kMR;
  ks->nr = kNR;
  ks->fmt = PackFmt::F32;
  ks->kernel = &kernel_f32;
  ks->pack = &pack_panels_f32_generic;
  ks->store_bf16 = &store_bf16_generic;
  // As for AVX-512 (see gemm_kernels_avx512.cpp), a deep K block pays most: it divides the C tile
  // traffic, and the 64 KiB B panel streams from L2 at this tile's load rate. kc = 1024 measured
  // ~6% above kc = 256 on Zen 4; mc = 192 keeps the A block at 768 KiB.
  ks->kc = 1024;
  ks->mc = 6 * 32;
  ks->nc = 2048;
  return true;
}

}  // namespace tk::gemm_detail

#else

namespace tk::gemm_detail {
bool kernels_avx2_f32(KernelSet*) { return false; }
}  // namespace tk::gemm_detail

#endif
