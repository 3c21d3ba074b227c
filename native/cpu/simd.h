// SIMD building blocks shared by the CPU kernel families: the target attributes of the AVX2 and
// AVX-512 levels (the library is built for baseline x86-64 and dispatches at run time, so every
// function using wider intrinsics carries one), a vectorized exp for non-positive arguments, and
// fp32 -> bf16 rounding to nearest even that matches f32_to_bf16 in core/dtype.h bit for bit.
//
// exp_nonpos: Cephes' expf range reduction (2^n * e^r, r in [-ln2/2, ln2/2]) with its degree-6
// polynomial; max relative error 1.17e-7 over [-87.34, 0] (test_loss.cpp measures it). Arguments
// below ln(FLT_MIN), and NaN, give exactly 0, which is what masked scores (-inf) need.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define TK_SIMD_X86 1
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define TK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace tk::simd {

TK_AVX2 inline __m256 exp_nonpos8(__m256 a) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);  // ln(FLT_MIN)
  __m256 under = _mm256_cmp_ps(a, lo, _CMP_NGE_UQ);  // below, or NaN
  a = _mm256_max_ps(a, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), a);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

TK_AVX512 inline __m512 exp_nonpos16(__m512 a) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  __mmask16 ok = _mm512_cmp_ps_mask(a, lo, _CMP_GE_OQ);  // false below ln(FLT_MIN) and for NaN
  a = _mm512_max_ps(a, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), a);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(ok, p, _mm512_castsi512_ps(e));
}

// Round 8 fp32 lanes to bf16 (nearest even; NaN stays a quiet NaN).
TK_AVX2 inline __m128i bf16_round8(__m256 x) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x400000);
  __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
  r = _mm256_srli_epi32(r, 16);  // every lane <= 0xffff, so the unsigned pack below is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// Round 16 fp32 lanes to bf16 (nearest even; NaN stays a quiet NaN).
TK_AVX512 inline __m256i bf16_round16(__m512 x) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x400000);
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, quiet);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

}  // namespace tk::simd

#else
#define TK_SIMD_X86 0
#endif
