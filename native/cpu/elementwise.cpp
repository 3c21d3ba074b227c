// CPU elementwise and reduction kernels (see elementwise.h for the contract).
//
// Design:
// - Every kernel first coalesces dimensions: size-1 dims are dropped and neighbours that are
//   contiguous with each other in every operand are merged, so a contiguous tensor of any rank is
//   one flat run, [97,257]+[257] is one 2-D walk, and a permuted [3,97,257] copy becomes a 2-D
//   transpose. What is left is walked row by row (the last dim) with an index counter; threads
//   split the flat output range, so one huge row is split as well as many short ones.
// - 16-bit floats are computed in fp32: a row is widened into a small fp32 block (4 KB, stays in
//   L1), computed, and rounded back (nearest even) in one vectorized pass. Contiguous f32 rows are
//   used in place, so the common case makes no copies.
// - The SIMD primitives (binary op, scale, bf16/f16 widen and narrow, sums) exist for AVX-512,
//   AVX2 and portable code; the level comes from active_isa() at each call. The binary is built
//   for baseline x86-64, so the AVX paths carry function-level target attributes. Rounding to bf16
//   is done with integer arithmetic, not VCVTNEPS2BF16, because that instruction flushes
//   subnormal inputs to zero and the scalar rule in dtype.h does not.
// - Sums are deterministic for any thread count: work is cut into parts whose size depends only on
//   the shape (never on the number of threads), each part is summed pairwise, and parts are
//   combined pairwise in a fixed order. Reducing innermost axes sums contiguous runs; reducing
//   outer axes with the innermost axis kept adds whole rows into fp32 row buffers (a binary-counter
//   cascade of row buffers keeps the pairwise error bound), so [N, D] over axis 0 streams memory
//   once instead of walking columns. I32 sums accumulate exactly in int64.
// - Casts: floats go through fp32 (so i32 -> bf16 is rounded once to fp32, then to bf16);
//   floats to ints truncate toward zero, saturate, NaN -> 0; int to int also saturates (i32 -> u8
//   clamps to [0, 255]) rather than wrapping, the same rule as for floats.
#include "elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../core/error.h"
#include "../core/rng.h"
#include "isa.h"
#include "simd.h"

namespace tk {
namespace {

constexpr int64_t kBlock = 1024;          // fp32 staging block (4 KB)
constexpr int64_t kGrain = 32768;         // elements below which a second thread costs more than it saves
constexpr int64_t kSumPart = int64_t(1) << 16;  // elements per reduction part (fixes the summation tree)
constexpr int64_t kLeafRows = 16;         // rows added naively before entering the pairwise cascade
constexpr int64_t kColChunk = 2048;       // row-buffer width for outer-axis sums (8 KB per buffer)
constexpr int64_t kWideRow = 256;         // narrow rows are grouped into rows of about this width
constexpr int64_t kTileK = 256;           // transpose tile extent along the source-contiguous dim
constexpr int64_t kStripL = 256;          // transpose task extent along the destination-contiguous dim

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

inline bool is_16bit_float(DType t) { return t == DType::BF16 || t == DType::F16; }

inline char* byte_ptr(const void* p, DType t, int64_t elems) {
  return static_cast<char*>(const_cast<void*>(p)) + elems * int64_t(dtype_size(t));
}

// ================================ fp32 array primitives ==========================================

// ---- portable --------------------------------------------------------------------------------

template <BinaryOp OP>
inline float apply(float a, float b) {
  if constexpr (OP == BinaryOp::Add) return a + b;
  else if constexpr (OP == BinaryOp::Sub) return a - b;
  else return a * b;
}

template <BinaryOp OP>
void binary_scalar(const float* a, const float* b, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = apply<OP>(a[i], b[i]);
}

void scale_scalar(const float* x, float alpha, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = alpha * x[i];
}

void add_scalar(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

void add4_scalar(float* acc, const float* a, const float* b, const float* c, const float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += (a[i] + b[i]) + (c[i] + d[i]);
}

float sum_scalar(const float* p, int64_t n) {
  if (n > 256) {
    int64_t h = (n / 2) & ~int64_t(7);
    return sum_scalar(p, h) + sum_scalar(p + h, n - h);
  }
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += p[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += p[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void widen_scalar(DType t, const uint16_t* s, float* d, int64_t n) {
  if (t == DType::BF16)
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
  else
    for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(s[i]);
}

void narrow_scalar(DType t, const float* s, uint16_t* d, int64_t n) {
  if (t == DType::BF16)
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
  else
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(s[i]);
}

#if TK_SIMD_X86
// ---- AVX2 (tails fall back to the portable code) -------------------------------------------------

template <BinaryOp OP>
TK_AVX2 inline __m256 apply8(__m256 a, __m256 b) {
  if constexpr (OP == BinaryOp::Add) return _mm256_add_ps(a, b);
  else if constexpr (OP == BinaryOp::Sub) return _mm256_sub_ps(a, b);
  else return _mm256_mul_ps(a, b);
}

template <BinaryOp OP>
TK_AVX2 void binary_avx2(const float* a, const float* b, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, apply8<OP>(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  binary_scalar<OP>(a + i, b + i, o + i, n - i);
}

TK_AVX2 void scale_avx2(const float* x, float alpha, float* o, int64_t n) {
  __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(va, _mm256_loadu_ps(x + i)));
  scale_scalar(x + i, alpha, o + i, n - i);
}

TK_AVX2 void add_avx2(float* acc, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_loadu_ps(x + i)));
  add_scalar(acc + i, x + i, n - i);
}

TK_AVX2 void add4_avx2(float* acc, const float* a, const float* b, const float* c, const float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 ab = _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    __m256 cd = _mm256_add_ps(_mm256_loadu_ps(c + i), _mm256_loadu_ps(d + i));
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_add_ps(ab, cd)));
  }
  add4_scalar(acc + i, a + i, b + i, c + i, d + i, n - i);
}

TK_AVX2 float sum_avx2(const float* p, int64_t n) {
  if (n > 1024) {
    int64_t h = (n / 2) & ~int64_t(31);
    return sum_avx2(p, h) + sum_avx2(p + h, n - h);
  }
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
  __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  float t = 0;
  for (; i < n; ++i) t += p[i];
  return s + t;
}

TK_AVX2 inline __m128i bf16_round8(__m256 x) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x400000);
  __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
  r = _mm256_srli_epi32(r, 16);  // every lane <= 0xffff, so the unsigned pack below is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

TK_AVX2 void widen_avx2(DType t, const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  if (t == DType::BF16) {
    for (; i + 8 <= n; i += 8) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  widen_scalar(t, s + i, d + i, n - i);
}

TK_AVX2 void narrow_avx2(DType t, const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  if (t == DType::BF16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), bf16_round8(_mm256_loadu_ps(s + i)));
  } else {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  narrow_scalar(t, s + i, d + i, n - i);
}

// dst rows [0, 8) = columns of the 8 x 8 block of 4-byte elements at src (row strides in elements).
TK_AVX2 void transpose8x8_avx2(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ds, t[i]);
}

// ---- AVX-512 (masked tails) ----------------------------------------------------------------------

TK_AVX512 inline __mmask16 tail_mask(int64_t r) { return __mmask16((1u << r) - 1u); }

template <BinaryOp OP>
TK_AVX512 inline __m512 apply16(__m512 a, __m512 b) {
  if constexpr (OP == BinaryOp::Add) return _mm512_add_ps(a, b);
  else if constexpr (OP == BinaryOp::Sub) return _mm512_sub_ps(a, b);
  else return _mm512_mul_ps(a, b);
}

template <BinaryOp OP>
TK_AVX512 void binary_avx512(const float* a, const float* b, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 x0 = apply16<OP>(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
    __m512 x1 = apply16<OP>(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16));
    _mm512_storeu_ps(o + i, x0);
    _mm512_storeu_ps(o + i + 16, x1);
  }
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, apply16<OP>(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(o + i, m, apply16<OP>(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i)));
  }
}

TK_AVX512 void scale_avx512(const float* x, float alpha, float* o, int64_t n) {
  __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_mul_ps(va, _mm512_loadu_ps(x + i)));
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, x + i)));
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

TK_AVX512 void add4_avx512(float* acc, const float* a, const float* b, const float* c, const float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 ab = _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
    __m512 cd = _mm512_add_ps(_mm512_loadu_ps(c + i), _mm512_loadu_ps(d + i));
    _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), _mm512_add_ps(ab, cd)));
  }
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    __m512 ab = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i));
    __m512 cd = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + i), _mm512_maskz_loadu_ps(m, d + i));
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), _mm512_add_ps(ab, cd)));
  }
}

TK_AVX512 float sum_avx512(const float* p, int64_t n) {
  if (n > 2048) {  // each of the 64 lanes below then adds at most 32 values naively
    int64_t h = (n / 2) & ~int64_t(63);
    return sum_avx512(p, h) + sum_avx512(p + h, n - h);
  }
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
  if (i < n) a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(tail_mask(n - i), p + i));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

TK_AVX512 inline __m256i bf16_round16(__m512 x) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x400000);
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, quiet);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

TK_AVX512 void widen_avx512(DType t, const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  if (t == DType::BF16) {
    for (; i + 16 <= n; i += 16) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    if (i < n) {
      __mmask16 m = tail_mask(n - i);
      __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
      _mm512_mask_storeu_ps(d + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  } else {
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    if (i < n) {
      __mmask16 m = tail_mask(n - i);
      _mm512_mask_storeu_ps(d + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)));
    }
  }
}

TK_AVX512 void narrow_avx512(DType t, const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  if (t == DType::BF16) {
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), bf16_round16(_mm512_loadu_ps(s + i)));
    if (i < n) {
      __mmask16 m = tail_mask(n - i);
      _mm256_mask_storeu_epi16(d + i, m, bf16_round16(_mm512_maskz_loadu_ps(m, s + i)));
    }
  } else {
    constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), kRne));
    if (i < n) {
      __mmask16 m = tail_mask(n - i);
      _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, s + i), kRne));
    }
  }
}
// dst rows [0, 16) = columns of the 16 x 16 block of 4-byte elements at src (row strides in
// elements): 16 line loads, 64 shuffles, 16 line stores.
TK_AVX512 void transpose16x16_avx512(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; ++i) {  // interleave pairs of rows: 2 x 2 blocks
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 4 x 4 blocks within each 128-bit lane
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // then whole 128-bit lanes across rows 4 apart ...
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {  // ... and 8 apart
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}
#endif  // TK_SIMD_X86

// ---- dispatch ------------------------------------------------------------------------------------

template <BinaryOp OP>
void binary_f32(Level L, const float* a, const float* b, float* o, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return binary_avx512<OP>(a, b, o, n);
  if (L == Level::Avx2) return binary_avx2<OP>(a, b, o, n);
#endif
  binary_scalar<OP>(a, b, o, n);
}

void binary_f32(Level L, BinaryOp op, const float* a, const float* b, float* o, int64_t n) {
  switch (op) {
    case BinaryOp::Add: return binary_f32<BinaryOp::Add>(L, a, b, o, n);
    case BinaryOp::Sub: return binary_f32<BinaryOp::Sub>(L, a, b, o, n);
    case BinaryOp::Mul: return binary_f32<BinaryOp::Mul>(L, a, b, o, n);
  }
}

void scale_f32(Level L, const float* x, float alpha, float* o, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return scale_avx512(x, alpha, o, n);
  if (L == Level::Avx2) return scale_avx2(x, alpha, o, n);
#endif
  scale_scalar(x, alpha, o, n);
}

// acc[0, n) += x[0, n)
void add_f32(Level L, float* acc, const float* x, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return add_avx512(acc, x, n);
  if (L == Level::Avx2) return add_avx2(acc, x, n);
#endif
  add_scalar(acc, x, n);
}

// acc[0, n) += (a + b) + (c + d): four rows per pass over the accumulator.
void add4_f32(Level L, float* acc, const float* a, const float* b, const float* c, const float* d, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return add4_avx512(acc, a, b, c, d, n);
  if (L == Level::Avx2) return add4_avx2(acc, a, b, c, d, n);
#endif
  add4_scalar(acc, a, b, c, d, n);
}

// Pairwise sum of a contiguous run.
float sum_f32(Level L, const float* p, int64_t n) {
  if (n < 8) {  // too short for a vector reduction to pay off
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += p[i];
    return s;
  }
#if TK_SIMD_X86
  if (L == Level::Avx512) return sum_avx512(p, n);
  if (L == Level::Avx2) return sum_avx2(p, n);
#endif
  return sum_scalar(p, n);
}

// n contiguous values of float dtype t -> fp32.
void widen(Level L, DType t, const void* src, float* dst, int64_t n) {
  if (t == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
#if TK_SIMD_X86
  if (L == Level::Avx512) return widen_avx512(t, s, dst, n);
  if (L == Level::Avx2) return widen_avx2(t, s, dst, n);
#endif
  widen_scalar(t, s, dst, n);
}

// n fp32 values -> contiguous float dtype t (round to nearest even).
void narrow(Level L, DType t, const float* src, void* dst, int64_t n) {
  if (t == DType::F32) {
    if (dst != src) std::memmove(dst, src, size_t(n) * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
#if TK_SIMD_X86
  if (L == Level::Avx512) return narrow_avx512(t, src, d, n);
  if (L == Level::Avx2) return narrow_avx2(t, src, d, n);
#endif
  narrow_scalar(t, src, d, n);
}

inline float load_f32(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return 0.f;
  }
}

// n fp32 values of a float-typed row at p (element stride `stride`; 0 broadcasts one value):
// the row itself when it is contiguous f32, else `buf` (kBlock floats) filled with the values.
const float* stage_f32(Level L, DType t, const void* p, int64_t stride, int64_t n, float* buf) {
  if (stride == 1) {
    if (t == DType::F32) return static_cast<const float*>(p);
    widen(L, t, p, buf, n);
  } else if (stride == 0) {
    std::fill(buf, buf + n, load_f32(t, p, 0));
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = load_f32(t, p, i * stride);
  }
  return buf;
}

// ================================ element conversions ============================================

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

template <class T>
constexpr bool kIsFloatish = std::is_same<T, float>::value || std::is_same<T, bf16_t>::value ||
                             std::is_same<T, f16_t>::value;

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return bf16_to_f32(v.bits); }
inline float to_f32(f16_t v) { return f16_to_f32(v.bits); }

// Truncation toward zero with saturation; NaN -> 0. F is float or double.
template <class F>
inline int32_t sat_i32(F v) {
  if (!(v == v)) return 0;
  if (v >= F(2147483648.0)) return std::numeric_limits<int32_t>::max();
  if (v <= F(-2147483648.0)) return std::numeric_limits<int32_t>::min();
  return int32_t(v);
}
template <class F>
inline uint8_t sat_u8(F v) {
  if (!(v == v)) return 0;
  if (v >= F(255)) return 255;
  if (v <= F(0)) return 0;
  return uint8_t(v);
}

template <class D>
inline D from_f32(float v) {
  if constexpr (std::is_same<D, float>::value) return v;
  else if constexpr (std::is_same<D, bf16_t>::value) return bf16_t{f32_to_bf16(v)};
  else if constexpr (std::is_same<D, f16_t>::value) return f16_t{f32_to_f16(v)};
  else if constexpr (std::is_same<D, int32_t>::value) return sat_i32(v);
  else return sat_u8(v);
}

template <class S, class D>
inline D convert(S s) {
  if constexpr (std::is_same<S, D>::value) {
    return s;
  } else if constexpr (kIsFloatish<S>) {
    return from_f32<D>(to_f32(s));
  } else if constexpr (kIsFloatish<D>) {
    return from_f32<D>(float(s));  // i32 -> f32 rounds to nearest even; u8 is exact
  } else if constexpr (std::is_same<D, uint8_t>::value) {
    return uint8_t(std::min<int32_t>(255, std::max<int32_t>(0, int32_t(s))));
  } else {
    return int32_t(s);  // u8 -> i32
  }
}

// Calls f(T{}) with T the C++ storage type of t.
template <class F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::BF16: return f(bf16_t{});
    case DType::F16: return f(f16_t{});
    case DType::I32: return f(int32_t{});
    case DType::U8: return f(uint8_t{});
  }
}

// dst[i] = convert(src[i * stride]) for i in [0, n); stride 0 broadcasts.
template <class S, class D>
void cast_row(const S* src, int64_t stride, D* dst, int64_t n) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = convert<S, D>(src[i]);
  } else if (stride == 0) {
    D v = convert<S, D>(src[0]);
    std::fill(dst, dst + n, v);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = convert<S, D>(src[i * stride]);
  }
}

// One row of a copy: n elements from src (element stride `stride`) to contiguous dst.
void copy_row(Level L, DType st, const void* src, int64_t stride, DType dt, void* dst, int64_t n) {
  if (st == dt && stride == 1) {
    std::memcpy(dst, src, size_t(n) * dtype_size(st));
    return;
  }
  bool vector_cast = stride == 1 && is_floating(st) && is_floating(dt) && (is_16bit_float(st) || is_16bit_float(dt));
  if (vector_cast) {
    if (st == DType::F32) return narrow(L, dt, static_cast<const float*>(src), dst, n);
    if (dt == DType::F32) return widen(L, st, src, static_cast<float*>(dst), n);
    float buf[kBlock];  // bf16 <-> f16 through fp32
    for (int64_t i = 0; i < n; i += kBlock) {
      int64_t m = std::min(kBlock, n - i);
      widen(L, st, byte_ptr(src, st, i), buf, m);
      narrow(L, dt, buf, byte_ptr(dst, dt, i), m);
    }
    return;
  }
  with_type(st, [&](auto s) {
    using S = decltype(s);
    with_type(dt, [&](auto d) {
      using D = decltype(d);
      cast_row<S, D>(static_cast<const S*>(src), stride, static_cast<D*>(dst), n);
    });
  });
}

// ================================ strided walking ================================================

// Coalesced iteration space of a contiguous output and K strided inputs.
template <int K>
struct Walk {
  int nd = 0;
  int64_t shape[kMaxDims] = {};
  int64_t st[K][kMaxDims] = {};
  int64_t inner() const { return shape[nd - 1]; }
};

// Drops size-1 dims and merges neighbours that are contiguous with each other in every input (the
// output is contiguous, so it always allows the merge). Rank 0 becomes one dim of size 1.
template <int K>
Walk<K> make_walk(const TensorView& out, const TensorView* const* in) {
  Walk<K> w;
  for (int d = 0; d < out.ndim; ++d) {
    if (out.shape[d] == 1) continue;
    int n = w.nd;
    bool merge = n > 0;
    for (int k = 0; k < K && merge; ++k) merge = w.st[k][n - 1] == in[k]->strides[d] * out.shape[d];
    if (merge) {
      w.shape[n - 1] *= out.shape[d];
      for (int k = 0; k < K; ++k) w.st[k][n - 1] = in[k]->strides[d];
    } else {
      w.shape[n] = out.shape[d];
      for (int k = 0; k < K; ++k) w.st[k][n] = in[k]->strides[d];
      ++w.nd;
    }
  }
  if (w.nd == 0) {
    w.nd = 1;
    w.shape[0] = 1;
  }
  return w;
}

// Calls f(e, off, len) for the pieces of rows covering flat output elements [e0, e1): output
// elements [e, e + len) of one row, whose first elements sit at offsets off[k] in input k
// (the inputs then advance by w.st[k][nd-1] per element).
template <int K, class F>
void walk_rows(const Walk<K>& w, int64_t e0, int64_t e1, F&& f) {
  const int nd = w.nd;
  const int64_t inner = w.inner();
  int64_t row = e0 / inner, col = e0 - row * inner;
  int64_t idx[kMaxDims] = {};
  int64_t base[K] = {};
  for (int d = nd - 2; d >= 0; --d) {
    idx[d] = row % w.shape[d];
    row /= w.shape[d];
    for (int k = 0; k < K; ++k) base[k] += idx[d] * w.st[k][d];
  }
  for (int64_t e = e0; e < e1;) {
    int64_t len = std::min(inner - col, e1 - e);
    int64_t off[K];
    for (int k = 0; k < K; ++k) off[k] = base[k] + col * w.st[k][nd - 1];
    f(e, off, len);
    e += len;
    col = 0;
    for (int d = nd - 2; d >= 0; --d) {  // odometer step to the next row
      for (int k = 0; k < K; ++k) base[k] += w.st[k][d];
      if (++idx[d] < w.shape[d]) break;
      for (int k = 0; k < K; ++k) base[k] -= w.st[k][d] * w.shape[d];
      idx[d] = 0;
    }
  }
}

void check_cpu(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CPU, op, ": ", what, " is on ", v.device.name(), ", expected cpu");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  bool same = a.ndim == b.ndim;
  for (int d = 0; same && d < a.ndim; ++d) same = a.shape[d] == b.shape[d];
  TK_CHECK(same, op, ": ", an, " ", describe(a), " and ", bn, " ", describe(b), " must have the same shape");
}

// ================================ binary / scale =================================================

void binary_i32(BinaryOp op, const int32_t* a, int64_t sa, const int32_t* b, int64_t sb, int32_t* o, int64_t n) {
  // Unsigned arithmetic: int32 overflow wraps (two's complement) instead of being undefined.
  auto run = [&](auto f) {
    if (sa == 1 && sb == 1) {
      for (int64_t i = 0; i < n; ++i) o[i] = int32_t(f(uint32_t(a[i]), uint32_t(b[i])));
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = int32_t(f(uint32_t(a[i * sa]), uint32_t(b[i * sb])));
    }
  };
  switch (op) {
    case BinaryOp::Add: return run([](uint32_t x, uint32_t y) { return x + y; });
    case BinaryOp::Sub: return run([](uint32_t x, uint32_t y) { return x - y; });
    case BinaryOp::Mul: return run([](uint32_t x, uint32_t y) { return x * y; });
  }
}

}  // namespace

// a, b: out's shape, any strides (0 = broadcast); out: contiguous. All one dtype.
void binary_cpu(BinaryOp op, const TensorView& a, const TensorView& b, const TensorView& out, ThreadPool& pool) {
  const char* name = "binary_cpu";
  check_cpu(a, name, "a");
  check_cpu(b, name, "b");
  check_cpu(out, name, "out");
  check_same_shape(a, out, name, "a", "out");
  check_same_shape(b, out, name, "b", "out");
  TK_CHECK(a.dtype == out.dtype && b.dtype == out.dtype, name, ": dtypes differ (a ", dtype_name(a.dtype), ", b ",
           dtype_name(b.dtype), ", out ", dtype_name(out.dtype), ")");
  TK_CHECK(out.dtype != DType::U8, name, ": u8 is not supported (f32, bf16, f16 or i32)");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;

  const TensorView* ins[2] = {&a, &b};
  const Walk<2> w = make_walk<2>(out, ins);
  const int64_t sa = w.st[0][w.nd - 1], sb = w.st[1][w.nd - 1];
  const DType t = out.dtype;
  const Level L = level();

  pool.parallel_for(n, kGrain, [&](int64_t e0, int64_t e1) {
    if (t == DType::I32) {
      walk_rows(w, e0, e1, [&](int64_t e, const int64_t* off, int64_t len) {
        binary_i32(op, a.ptr<int32_t>() + off[0], sa, b.ptr<int32_t>() + off[1], sb, out.ptr<int32_t>() + e, len);
      });
      return;
    }
    float ba[kBlock], bb[kBlock], bo[kBlock];
    walk_rows(w, e0, e1, [&](int64_t e, const int64_t* off, int64_t len) {
      for (int64_t c = 0; c < len; c += kBlock) {
        int64_t m = std::min(kBlock, len - c);
        const float* pa = stage_f32(L, t, byte_ptr(a.data, t, off[0] + c * sa), sa, m, ba);
        const float* pb = stage_f32(L, t, byte_ptr(b.data, t, off[1] + c * sb), sb, m, bb);
        float* po = t == DType::F32 ? out.ptr<float>() + e + c : bo;
        binary_f32(L, op, pa, pb, po, m);
        if (t != DType::F32) narrow(L, t, bo, byte_ptr(out.data, t, e + c), m);
      }
    });
  });
}

// x, out: contiguous, same shape, same float dtype (may be the same buffer).
void scale_cpu(const TensorView& x, float alpha, const TensorView& out, ThreadPool& pool) {
  const char* name = "scale_cpu";
  check_cpu(x, name, "x");
  check_cpu(out, name, "out");
  check_same_shape(x, out, name, "x", "out");
  TK_CHECK(x.dtype == out.dtype && is_floating(x.dtype), name, ": x ", describe(x), " and out ", describe(out),
           " must share a floating dtype");
  TK_CHECK(x.is_contiguous() && out.is_contiguous(), name, ": x and out must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  const DType t = out.dtype;
  const Level L = level();
  pool.parallel_for(n, kGrain, [&](int64_t e0, int64_t e1) {
    float buf[kBlock];
    for (int64_t e = e0; e < e1; e += kBlock) {
      int64_t m = std::min(kBlock, e1 - e);
      if (t == DType::F32) {
        scale_f32(L, x.ptr<float>() + e, alpha, out.ptr<float>() + e, m);
      } else {
        widen(L, t, byte_ptr(x.data, t, e), buf, m);
        scale_f32(L, buf, alpha, buf, m);
        narrow(L, t, buf, byte_ptr(out.data, t, e), m);
      }
    }
  });
}

// ================================ copy / cast ====================================================

namespace {

// A copy whose source is contiguous along some dim k other than the last, while the destination
// is contiguous along the last (a transpose, possibly batched over the other dims). It goes
// through tiles of kTileK (along k) x one destination cache line (along the last dim), staged
// in a 16 KB buffer: a tile reads kTileK contiguous source elements from each of its rows, long
// enough runs for the prefetchers to follow, and writes exactly one whole line per destination
// row. (Square 32 x 32 tiles measured 2x slower: 128-byte source runs leave DRAM latency exposed,
// and a buffer filling L1 evicts the lines being streamed.) Plain 4-byte moves skip the buffer
// and transpose 16 x 16 (AVX-512) or 8 x 8 (AVX2) blocks in registers, another 2x. Tasks are
// strips of tiles: kTileK x kStripL elements sharing one outer index.
struct TransposePlan {
  int nd = 0, k = 0;
  int64_t shape[kMaxDims] = {};
  int64_t sst[kMaxDims] = {};  // source strides (sst[k] == 1)
  int64_t dst[kMaxDims] = {};  // destination strides (contiguous)
  int64_t strips_k = 0, strips_l = 0, outer = 0;
};

// Strips [t0, t1), numbered (outer index, strip along k, strip along the last dim).
template <class S, class D>
void transpose_strips(Level L, const TransposePlan& p, const S* src, D* dst, int64_t t0, int64_t t1) {
  constexpr int64_t kLineL = 64 / int64_t(sizeof(D));  // one destination cache line
  const int last = p.nd - 1;
  const int64_t sl = p.sst[last], dk = p.dst[p.k];
  D tile[kLineL][kTileK];  // [l][k]: one source tile, already converted
  for (int64_t t = t0; t < t1; ++t) {
    int64_t sl_idx = t % p.strips_l, rest = t / p.strips_l;
    int64_t sk_idx = rest % p.strips_k, o = rest / p.strips_k;
    int64_t soff = 0, doff = 0;
    for (int d = last - 1; d >= 0; --d) {  // the other dims, decomposed from o
      if (d == p.k) continue;
      int64_t i = o % p.shape[d];
      o /= p.shape[d];
      soff += i * p.sst[d];
      doff += i * p.dst[d];
    }
    const int64_t k0 = sk_idx * kTileK, nk = std::min(kTileK, p.shape[p.k] - k0);
    const int64_t l_end = std::min(p.shape[last], (sl_idx + 1) * kStripL);
    for (int64_t l0 = sl_idx * kStripL; l0 < l_end; l0 += kLineL) {
      const int64_t nl = std::min(kLineL, l_end - l0);
      int64_t kb = 0;  // columns [0, kb) done by the register transpose
#if TK_SIMD_X86
      if constexpr (std::is_same<S, D>::value && sizeof(S) == 4) {  // a plain 4-byte move
        const float* s = reinterpret_cast<const float*>(src + soff + l0 * sl + k0);
        float* d = reinterpret_cast<float*>(dst + doff + k0 * dk + l0);
        if (L == Level::Avx512 && nl == 16) {
          for (; kb + 16 <= nk; kb += 16) transpose16x16_avx512(s + kb, sl, d + kb * dk, dk);
        } else if (L == Level::Avx2 && nl == 16) {
          for (; kb + 8 <= nk; kb += 8) {
            transpose8x8_avx2(s + kb, sl, d + kb * dk, dk);
            transpose8x8_avx2(s + 8 * sl + kb, sl, d + kb * dk + 8, dk);
          }
        }
      }
#endif
      if (kb == nk) continue;
      for (int64_t j = 0; j < nl; ++j) {
        const S* s = src + soff + (l0 + j) * sl + k0;
        for (int64_t i = kb; i < nk; ++i) tile[j][i] = convert<S, D>(s[i]);
      }
      for (int64_t i = kb; i < nk; ++i) {
        D* d = dst + doff + (k0 + i) * dk + l0;
        for (int64_t j = 0; j < nl; ++j) d[j] = tile[j][i];
      }
    }
  }
}

}  // namespace

// src: dst's shape, any strides and dtype; dst: contiguous.
void copy_cpu(const TensorView& src, const TensorView& dst, ThreadPool& pool) {
  const char* name = "copy_cpu";
  check_cpu(src, name, "src");
  check_cpu(dst, name, "dst");
  check_same_shape(src, dst, name, "src", "dst");
  TK_CHECK(dst.is_contiguous(), name, ": dst ", describe(dst), " must be contiguous");
  const int64_t n = dst.numel();
  if (n == 0) return;
  const TensorView* ins[1] = {&src};
  const Walk<1> w = make_walk<1>(dst, ins);
  const DType st = src.dtype, dt = dst.dtype;
  const Level L = level();
  const int last = w.nd - 1;

  // Both sides contiguous: a flat memcpy or cast, split across threads.
  if (w.nd == 1 && (w.st[0][0] == 1 || n == 1)) {
    int64_t grain = st == dt ? 4 * kGrain : kGrain;
    pool.parallel_for(n, grain, [&](int64_t e0, int64_t e1) {
      copy_row(L, st, byte_ptr(src.data, st, e0), 1, dt, byte_ptr(dst.data, dt, e0), e1 - e0);
    });
    return;
  }

  // Transposition: find a dim k < last along which the source is contiguous.
  int k = -1;
  if (w.st[0][last] != 1 && w.st[0][last] != 0)
    for (int d = 0; d < last; ++d)
      if (w.st[0][d] == 1) k = d;
  if (k >= 0) {
    TransposePlan p;
    p.nd = w.nd;
    p.k = k;
    for (int d = 0; d < w.nd; ++d) {
      p.shape[d] = w.shape[d];
      p.sst[d] = w.st[0][d];
    }
    contiguous_strides(p.nd, p.shape, p.dst);
    p.strips_k = (p.shape[k] + kTileK - 1) / kTileK;
    p.strips_l = (p.shape[last] + kStripL - 1) / kStripL;
    p.outer = n / (p.shape[k] * p.shape[last]);
    const int64_t strips = p.outer * p.strips_k * p.strips_l;
    const int64_t per_strip = n / strips;  // average, for the grain
    with_type(st, [&](auto s) {
      using S = decltype(s);
      with_type(dt, [&](auto d) {
        using D = decltype(d);
        pool.parallel_for(strips, std::max<int64_t>(1, kGrain / per_strip), [&](int64_t t0, int64_t t1) {
          transpose_strips<S, D>(L, p, src.ptr<S>(), dst.ptr<D>(), t0, t1);
        });
      });
    });
    return;
  }

  // Anything else (broadcasts, strided rows): row by row.
  const int64_t ss = w.st[0][last];
  pool.parallel_for(n, kGrain, [&](int64_t e0, int64_t e1) {
    walk_rows(w, e0, e1, [&](int64_t e, const int64_t* off, int64_t len) {
      copy_row(L, st, byte_ptr(src.data, st, off[0]), ss, dt, byte_ptr(dst.data, dt, e), len);
    });
  });
}

// ================================ fill / randn ===================================================

// out: contiguous, any dtype.
void fill_cpu(const TensorView& out, double value, ThreadPool& pool) {
  const char* name = "fill_cpu";
  check_cpu(out, name, "out");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  // The value is rounded as a cast would: through fp32 for floats, truncated and saturated for ints.
  auto run = [&](auto v) {
    using T = decltype(v);
    T* p = out.ptr<T>();
    pool.parallel_for(n, 4 * kGrain, [&](int64_t e0, int64_t e1) { std::fill(p + e0, p + e1, v); });
  };
  switch (out.dtype) {
    case DType::F32: return run(float(value));
    case DType::BF16: return run(f32_to_bf16(float(value)));
    case DType::F16: return run(f32_to_f16(float(value)));
    case DType::I32: return run(sat_i32(value));
    case DType::U8: return run(sat_u8(value));
  }
}

// out: contiguous, float dtype. Element i = mean + stddev * normal_sample(seed, i).
void randn_cpu(const TensorView& out, uint64_t seed, float mean, float stddev, ThreadPool& pool) {
  const char* name = "randn_cpu";
  check_cpu(out, name, "out");
  TK_CHECK(is_floating(out.dtype), name, ": out ", describe(out), " must have a floating dtype");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  const DType t = out.dtype;
  const Level L = level();
  // ~20 ns per sample (a logarithm and a sine or cosine), so threads pay off early.
  pool.parallel_for(n, 2048, [&](int64_t e0, int64_t e1) {
    float buf[kBlock];
    for (int64_t e = e0; e < e1; e += kBlock) {
      int64_t m = std::min(kBlock, e1 - e), j = 0;
      uint64_t i = uint64_t(e);
      // Unaligned head and tail one sample at a time; whole Philox blocks in between.
      for (; j < m && (i & 3u); ++j, ++i) buf[j] = normal_sample(seed, i);
      for (; j + 4 <= m; j += 4, i += 4) normal_block4(seed, i >> 2, buf + j);
      for (; j < m; ++j, ++i) buf[j] = normal_sample(seed, i);
      for (j = 0; j < m; ++j) buf[j] = mean + stddev * buf[j];
      narrow(L, t, buf, byte_ptr(out.data, t, e), m);
    }
  });
}

void concat_cpu(const TensorView* inputs, int count, int axis, const TensorView& out, ThreadPool& pool) {
  const char* name = "concat_cpu";
  check_cpu(out, name, "out");
  TK_CHECK(out.is_contiguous() && axis >= 0 && axis < out.ndim, name, ": out ", describe(out), " must be contiguous with axis ",
           axis, " in range");
  const size_t es = dtype_size(out.dtype);
  int64_t rows = 1, inner = 1, total = 0;
  for (int d = 0; d < axis; ++d) rows *= out.shape[d];
  for (int d = axis + 1; d < out.ndim; ++d) inner *= out.shape[d];
  for (int i = 0; i < count; ++i) {
    const TensorView& in = inputs[i];
    check_cpu(in, name, "input");
    TK_CHECK(in.dtype == out.dtype && in.ndim == out.ndim && in.is_contiguous(), name, ": input ", i, " ", describe(in),
             " must be contiguous with out's dtype and rank");
    for (int d = 0; d < out.ndim; ++d)
      TK_CHECK(d == axis || in.shape[d] == out.shape[d], name, ": input ", i, " ", describe(in), " differs from out ",
               describe(out), " off axis ", axis);
    total += in.shape[axis];
  }
  TK_CHECK(total == out.shape[axis], name, ": the inputs add up to ", total, " on axis ", axis, ", out has ", out.shape[axis]);
  if (out.numel() == 0) return;
  // Each output row (one index of the axes before `axis`) is the inputs' rows back to back.
  const int64_t row_bytes = out.shape[axis] * inner * int64_t(es);
  pool.parallel_for(rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, row_bytes)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      char* dst = static_cast<char*>(out.data) + r * row_bytes;
      for (int i = 0; i < count; ++i) {
        const int64_t n = inputs[i].shape[axis] * inner * int64_t(es);
        if (n) std::memcpy(dst, static_cast<const char*>(inputs[i].data) + r * n, size_t(n));
        dst += n;
      }
    }
  });
}

void dropout_cpu(const TensorView& x, float p, uint64_t seed, const TensorView& out, ThreadPool& pool) {
  const char* name = "dropout_cpu";
  check_cpu(x, name, "x");
  check_cpu(out, name, "out");
  TK_CHECK(is_floating(x.dtype) && x.dtype == out.dtype, name, ": x ", describe(x), " and out ", describe(out),
           " must share one floating dtype");
  TK_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel(), name, ": x ", describe(x), " and out ",
           describe(out), " must be contiguous with the same element count");
  TK_CHECK(p >= 0.0f && p < 1.0f, name, ": p must be in [0, 1), got ", p);
  const int64_t n = x.numel();
  if (n == 0) return;
  const DType t = x.dtype;
  const Level L = level();
  const float keep_scale = 1.0f / (1.0f - p);
  // One Philox call decides four consecutive elements.
  pool.parallel_for(n, 4096, [&](int64_t e0, int64_t e1) {
    float buf[kBlock];
    for (int64_t e = e0; e < e1; e += kBlock) {
      int64_t m = std::min(kBlock, e1 - e);
      widen(L, t, byte_ptr(x.data, t, e), buf, m);
      Philox4x32 r{};
      uint64_t block = ~uint64_t(0);
      for (int64_t j = 0; j < m; ++j) {
        uint64_t i = uint64_t(e + j);
        if ((i >> 2) != block) r = philox_block(seed, i), block = i >> 2;  // as dropout_keep, once per block
        buf[j] = uniform24(r.v[i & 3u]) > p ? buf[j] * keep_scale : 0.0f;
      }
      narrow(L, t, buf, byte_ptr(out.data, t, e), m);
    }
  });
}

// ================================ sum ============================================================

namespace {

// Dims of one kind (kept or reduced) with x's strides.
struct DimList {
  int n = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  int64_t count() const {
    int64_t c = 1;
    for (int i = 0; i < n; ++i) c *= size[i];
    return c;
  }
  void add(int64_t s, int64_t st) {
    size[n] = s;
    stride[n] = st;
    ++n;
  }
  // Merges neighbours i-1, i when stride[i-1] == stride[i] * size[i]: same addresses, fewer dims.
  void coalesce() {
    int m = 0;
    for (int i = 0; i < n; ++i) {
      if (m > 0 && stride[m - 1] == stride[i] * size[i]) {
        size[m - 1] *= size[i];
        stride[m - 1] = stride[i];
      } else {
        size[m] = size[i];
        stride[m] = stride[i];
        ++m;
      }
    }
    n = m;
  }
  // Element offset of flat index f over dims [0, upto).
  int64_t offset(int64_t f, int upto) const {
    int64_t off = 0;
    for (int d = upto - 1; d >= 0; --d) {
      off += (f % size[d]) * stride[d];
      f /= size[d];
    }
    return off;
  }
};

// An odometer over dims [0, upto) of a DimList, tracking the element offset.
struct Odometer {
  const DimList* dims;
  int upto;
  int64_t idx[kMaxDims] = {};
  int64_t off = 0;
  Odometer(const DimList& d, int upto_, int64_t start) : dims(&d), upto(upto_) {
    for (int i = upto - 1; i >= 0; --i) {
      idx[i] = start % d.size[i];
      start /= d.size[i];
      off += idx[i] * d.stride[i];
    }
  }
  void next() {
    for (int i = upto - 1; i >= 0; --i) {
      off += dims->stride[i];
      if (++idx[i] < dims->size[i]) return;
      off -= dims->stride[i] * dims->size[i];
      idx[i] = 0;
    }
  }
};

// Pairwise combination of a stream of partial sums in O(log n) space: a binary counter whose
// slot l holds the sum of 2^l consecutive pushes, so the error grows with log(pushes).
class PairwiseSum {
 public:
  void push(float v) {
    int l = 0;
    for (uint64_t c = count_; c & 1u; c >>= 1, ++l) v = slot_[l] + v;
    slot_[l] = v;
    ++count_;
  }
  float total() const {
    float s = 0;
    bool any = false;
    for (int l = 0; l < 64 && (count_ >> l); ++l)
      if ((count_ >> l) & 1u) {
        s = any ? slot_[l] + s : slot_[l];
        any = true;
      }
    return s;
  }

 private:
  float slot_[64];
  uint64_t count_ = 0;
};

class ExactSum {  // int64 addition is associative: no tree needed
 public:
  void push(int64_t v) { s_ += v; }
  int64_t total() const { return s_; }

 private:
  int64_t s_ = 0;
};

// The row version of PairwiseSum for outer-axis sums: leaves are fp32 row buffers, and a full
// slot merges into the carry with one vector add. Buffers are recycled through a free list.
class PairwiseRows {
 public:
  explicit PairwiseRows(int64_t cap) : cap_(cap) {}
  void reset(int64_t w) {
    for (int l = 0; l < 64; ++l)
      if ((count_ >> l) & 1u) free_.push_back(slot_[l]);
    count_ = 0;
    w_ = w;
  }
  float* leaf() {
    float* p = take();
    std::fill(p, p + w_, 0.f);
    return p;
  }
  void push(Level L, float* leaf) {
    int l = 0;
    for (uint64_t c = count_; c & 1u; c >>= 1, ++l) {
      add_f32(L, leaf, slot_[l], w_);
      free_.push_back(slot_[l]);
    }
    slot_[l] = leaf;
    ++count_;
  }
  void total(Level L, float* out) {
    bool any = false;
    for (int l = 0; l < 64; ++l)
      if ((count_ >> l) & 1u) {
        if (any) add_f32(L, out, slot_[l], w_);
        else std::memcpy(out, slot_[l], size_t(w_) * 4);
        any = true;
      }
    if (!any) std::fill(out, out + w_, 0.f);
  }

 private:
  float* take() {
    if (free_.empty()) {
      store_.emplace_back(new float[size_t(cap_)]);
      return store_.back().get();
    }
    float* p = free_.back();
    free_.pop_back();
    return p;
  }
  int64_t cap_, w_ = 0;
  uint64_t count_ = 0;
  float* slot_[64] = {};
  std::vector<std::unique_ptr<float[]>> store_;
  std::vector<float*> free_;
};

class ExactRows {  // one int64 accumulator row serves as every leaf
 public:
  explicit ExactRows(int64_t cap) : acc_(size_t(cap)) {}
  void reset(int64_t w) {
    w_ = w;
    std::fill(acc_.begin(), acc_.begin() + w, 0);
  }
  int64_t* leaf() { return acc_.data(); }
  void push(Level, int64_t*) {}
  void total(Level, int64_t* out) { std::copy(acc_.begin(), acc_.begin() + w_, out); }

 private:
  std::vector<int64_t> acc_;
  int64_t w_ = 0;
};

// What the sum driver needs per accumulator type: fp32 (pairwise) for floats, int64 for I32.
template <class Acc>
struct SumOps;

template <>
struct SumOps<float> {
  using Scalar = PairwiseSum;
  using Rows = PairwiseRows;
  // Pushes the sum of n elements at p (element stride s) of float dtype t.
  static void segment(Level L, DType t, const void* p, int64_t s, int64_t n, PairwiseSum& acc, float* buf) {
    if (t == DType::F32 && s == 1) {
      acc.push(sum_f32(L, static_cast<const float*>(p), n));
      return;
    }
    for (int64_t i = 0; i < n; i += kBlock) {
      int64_t m = std::min(kBlock, n - i);
      acc.push(sum_f32(L, stage_f32(L, t, byte_ptr(p, t, i * s), s, m, buf), m));
    }
  }
  // The sum of one run.
  static float run(Level L, DType t, const void* p, int64_t s, int64_t n, float* buf) {
    if (t == DType::F32 && s == 1) return sum_f32(L, static_cast<const float*>(p), n);
    PairwiseSum acc;
    segment(L, t, p, s, n, acc, buf);
    return acc.total();
  }
  // acc[0, w) += the contiguous row at p.
  static void add_row(Level L, DType t, const void* p, int64_t w, float* acc, float* buf) {
    for (int64_t i = 0; i < w; i += kBlock) {
      int64_t m = std::min(kBlock, w - i);
      add_f32(L, acc + i, stage_f32(L, t, byte_ptr(p, t, i), 1, m, buf), m);
    }
  }
  // acc[0, w) += the sum of the four contiguous rows at p[0..3]; buf holds 4 * kBlock floats.
  static void add_rows4(Level L, DType t, const void* const* p, int64_t w, float* acc, float* buf) {
    for (int64_t i = 0; i < w; i += kBlock) {
      int64_t m = std::min(kBlock, w - i);
      const float* r[4];
      for (int q = 0; q < 4; ++q) r[q] = stage_f32(L, t, byte_ptr(p[q], t, i), 1, m, buf + q * kBlock);
      add4_f32(L, acc + i, r[0], r[1], r[2], r[3], m);
    }
  }
  static void add_acc(Level L, float* acc, const float* x, int64_t w) { add_f32(L, acc, x, w); }
  static void store(Level L, DType t, const float* v, void* out, int64_t idx, int64_t w) {
    narrow(L, t, v, byte_ptr(out, t, idx), w);
  }
};

template <>
struct SumOps<int64_t> {
  using Scalar = ExactSum;
  using Rows = ExactRows;
  static void segment(Level, DType, const void* p, int64_t s, int64_t n, ExactSum& acc, float*) {
    const int32_t* x = static_cast<const int32_t*>(p);
    int64_t t = 0;
    for (int64_t i = 0; i < n; ++i) t += x[i * s];
    acc.push(t);
  }
  static int64_t run(Level L, DType t, const void* p, int64_t s, int64_t n, float* buf) {
    ExactSum acc;
    segment(L, t, p, s, n, acc, buf);
    return acc.total();
  }
  static void add_row(Level, DType, const void* p, int64_t w, int64_t* acc, float*) {
    const int32_t* x = static_cast<const int32_t*>(p);
    for (int64_t i = 0; i < w; ++i) acc[i] += x[i];
  }
  static void add_rows4(Level L, DType t, const void* const* p, int64_t w, int64_t* acc, float* buf) {
    for (int q = 0; q < 4; ++q) add_row(L, t, p[q], w, acc, buf);
  }
  static void add_acc(Level, int64_t* acc, const int64_t* x, int64_t w) {
    for (int64_t i = 0; i < w; ++i) acc[i] += x[i];
  }
  static void store(Level, DType, const int64_t* v, void* out, int64_t idx, int64_t w) {
    int32_t* o = static_cast<int32_t*>(out) + idx;
    for (int64_t i = 0; i < w; ++i) o[i] = int32_t(uint32_t(uint64_t(v[i])));  // wraps mod 2^32
  }
};

// Innermost reduced axis is the fastest in memory: every output element sums runs along it.
// kept: the kept dims (out's order), red: the reduced dims (last = the run), N = red.count().
// Each output's reduced range is cut into parts of kSumPart elements; tasks are (output, part).
template <class Acc>
void sum_runs(Level L, const TensorView& x, const DimList& kept, const DimList& red, const TensorView& out,
              ThreadPool& pool) {
  using Ops = SumOps<Acc>;
  const DType t = x.dtype;
  const int64_t M = kept.count(), N = red.count();
  const int64_t run = red.size[red.n - 1], rs = red.stride[red.n - 1];
  const int64_t P = (N + kSumPart - 1) / kSumPart;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(N, kSumPart));

  if constexpr (std::is_same<Acc, float>::value) {
    if (red.n == 1 && rs == 1 && run < 16 && (kept.n == 0 || (kept.n == 1 && kept.stride[0] == run))) {
      // Short runs packed back to back (e.g. [R, 7] over axis 1): x is one contiguous stream of
      // M * run values, staged a block of whole runs at a time and summed in a plain loop.
      const int64_t per_block = kBlock / run;
      pool.parallel_for(M, std::max<int64_t>(1, kGrain / run), [&](int64_t m0, int64_t m1) {
        float buf[kBlock], res[kBlock];
        for (int64_t m = m0; m < m1; m += per_block) {
          const int64_t cnt = std::min(per_block, m1 - m);
          const float* v = stage_f32(L, t, byte_ptr(x.data, t, m * run), 1, cnt * run, buf);
          for (int64_t i = 0; i < cnt; ++i) {
            float acc = 0;
            for (int64_t j = 0; j < run; ++j) acc += v[i * run + j];
            res[i] = acc;
          }
          Ops::store(L, t, res, out.data, m, cnt);
        }
      });
      return;
    }
  }

  if (P == 1 && red.n == 1) {
    // One run per output (e.g. [R, D] over axis 1): walk the outputs with an odometer and store
    // them a block at a time, so that short runs cost little more than their loads.
    pool.parallel_for(M, grain, [&](int64_t m0, int64_t m1) {
      Acc res[kBlock];
      float buf[kBlock];
      Odometer o(kept, kept.n, m0);
      for (int64_t m = m0; m < m1; m += kBlock) {
        const int64_t cnt = std::min(kBlock, m1 - m);
        for (int64_t i = 0; i < cnt; ++i, o.next()) res[i] = Ops::run(L, t, byte_ptr(x.data, t, o.off), rs, run, buf);
        Ops::store(L, t, res, out.data, m, cnt);
      }
    });
    return;
  }

  std::vector<Acc> parts(P > 1 ? size_t(M * P) : 0);
  pool.parallel_for(M * P, grain, [&](int64_t t0, int64_t t1) {
    float buf[kBlock];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t m = task / P, p = task % P;
      const int64_t f0 = p * kSumPart, f1 = std::min(N, f0 + kSumPart);
      const int64_t base = kept.offset(m, kept.n);
      typename Ops::Scalar acc;
      Odometer runs(red, red.n - 1, f0 / run);
      for (int64_t f = f0, c = f0 % run; f < f1; c = 0, runs.next()) {
        int64_t len = std::min(run - c, f1 - f);
        Ops::segment(L, t, byte_ptr(x.data, t, base + runs.off + c * rs), rs, len, acc, buf);
        f += len;
      }
      Acc total = acc.total();
      if (P == 1) Ops::store(L, t, &total, out.data, m, 1);
      else parts[size_t(task)] = total;
    }
  });
  if (P == 1) return;
  pool.parallel_for(M, std::max<int64_t>(1, kGrain / P), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      typename Ops::Scalar acc;
      for (int64_t p = 0; p < P; ++p) acc.push(parts[size_t(m * P + p)]);
      Acc total = acc.total();
      Ops::store(L, t, &total, out.data, m, 1);
    }
  });
}

// Innermost kept axis is contiguous: add whole rows (over the reduced index) into row buffers.
// Tasks are (outer kept index, part of RP rows, column chunk of width <= kColChunk); RP depends
// only on the shape, so the summation tree does not depend on the thread count. Consecutive
// tasks take consecutive column chunks of the same rows, so each row is streamed in order.
//
// Narrow rows (e.g. [N, 7] over axis 0) would spend their time in per-row overhead. When the rows
// are packed back to back (a single reduced dim of stride Lk), G consecutive rows are instead
// taken as one "wide row" of G * Lk contiguous elements, summed the same way, and the G
// sub-rows of the result are folded pairwise at the end.
template <class Acc>
void sum_rows(Level L, const TensorView& x, const DimList& kept, const DimList& red, const TensorView& out,
              ThreadPool& pool) {
  using Ops = SumOps<Acc>;
  const DType t = x.dtype;
  const int64_t N = red.count();
  const int64_t Lk = kept.size[kept.n - 1];  // the contiguous kept axis
  const int64_t Mo = kept.count() / Lk;
  const bool grouped = Lk < kWideRow / 2 && red.n == 1 && red.stride[0] == Lk;
  const int64_t G = grouped ? kWideRow / Lk : 1;    // rows per wide row
  const int64_t Wd = G * Lk;                        // width of a (wide) row
  const int64_t Nr = (N + G - 1) / G;               // (wide) rows to add
  const int64_t W = std::min(Wd, kColChunk), CC = (Wd + W - 1) / W;
  int64_t RP = std::max<int64_t>(kLeafRows, kSumPart / W);
  RP = (RP + kLeafRows - 1) / kLeafRows * kLeafRows;
  const int64_t P = (Nr + RP - 1) / RP;
  const bool packed = CC == 1 && red.n == 1 && red.stride[0] * G == Wd;  // rows back to back

  // Sums of (wide) rows for columns [c0, c0 + w) of the output row mo: fold the G sub-rows, store.
  auto finish = [&](const Acc* v, int64_t mo, int64_t c0, int64_t w) {
    if (G == 1) return Ops::store(L, t, v, out.data, mo * Lk + c0, w);
    Acc folded[kWideRow];
    for (int64_t c = 0; c < Lk; ++c) {
      typename Ops::Scalar acc;
      for (int64_t g = 0; g < G; ++g) acc.push(v[g * Lk + c]);
      folded[c] = acc.total();
    }
    Ops::store(L, t, folded, out.data, mo * Lk, Lk);
  };

  // Partial rows per part, laid out [Mo][P][Wd].
  std::vector<Acc> parts(P > 1 ? size_t(Mo * P * Wd) : 0);
  const int64_t grain = std::max<int64_t>(1, kGrain / (W * std::min(Nr, RP)));
  pool.parallel_for(Mo * P * CC, grain, [&](int64_t t0, int64_t t1) {
    typename Ops::Rows rows(W);
    std::vector<Acc> result(static_cast<size_t>(W));
    std::vector<float> buf(static_cast<size_t>(4 * kBlock));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t cc = task % CC, p = (task / CC) % P, mo = task / (CC * P);
      const int64_t c0 = cc * W, w = std::min(W, Wd - c0);
      const int64_t r0 = p * RP, r1 = std::min(Nr, r0 + RP);
      const int64_t base = kept.offset(mo, kept.n - 1) + c0;
      rows.reset(w);
      Odometer r(red, red.n, grouped ? 0 : r0);
      // Leaves of up to kLeafRows rows. Rows far apart are added four at a time (one pass over
      // the leaf per four rows, four memory streams in flight); packed rows are one sequential
      // stream already, which four interleaved streams would only break up.
      for (int64_t i = r0; i < r1;) {
        Acc* leaf = rows.leaf();
        const int64_t i_end = std::min(r1, i + kLeafRows);
        while (i < i_end) {
          const void* row[4];
          int64_t width[4], nq = 0;
          for (; nq < 4 && i < i_end; ++nq, ++i) {
            if (grouped) {  // wide row i: rows [i G, min(N, (i + 1) G)), contiguous
              width[nq] = (std::min(N, (i + 1) * G) - i * G) * Lk;
              row[nq] = byte_ptr(x.data, t, base + i * Wd);
            } else {
              width[nq] = w;
              row[nq] = byte_ptr(x.data, t, base + r.off);
              r.next();
            }
          }
          if (!packed && nq == 4 && width[3] == w) {
            Ops::add_rows4(L, t, row, w, leaf, buf.data());
          } else {
            for (int64_t q = 0; q < nq; ++q) Ops::add_row(L, t, row[q], width[q], leaf, buf.data());
          }
        }
        rows.push(L, leaf);
      }
      if (P == 1) {
        rows.total(L, result.data());
        finish(result.data(), mo, c0, w);
      } else {
        rows.total(L, parts.data() + (mo * P + p) * Wd + c0);
      }
    }
  });
  if (P == 1) return;
  // Combine the parts of each (outer index, column chunk), again pairwise over row buffers.
  pool.parallel_for(Mo * CC, std::max<int64_t>(1, kGrain / (W * P)), [&](int64_t t0, int64_t t1) {
    typename Ops::Rows rows(W);
    std::vector<Acc> result(static_cast<size_t>(W));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t cc = task % CC, mo = task / CC;
      const int64_t c0 = cc * W, w = std::min(W, Wd - c0);
      rows.reset(w);
      Acc* leaf = nullptr;
      int64_t in_leaf = 0;
      for (int64_t p = 0; p < P; ++p) {
        if (!leaf) leaf = rows.leaf();
        Ops::add_acc(L, leaf, parts.data() + (mo * P + p) * Wd + c0, w);
        if (++in_leaf == kLeafRows) {
          rows.push(L, leaf);
          leaf = nullptr;
          in_leaf = 0;
        }
      }
      if (leaf) rows.push(L, leaf);
      rows.total(L, result.data());
      finish(result.data(), mo, c0, w);
    }
  });
}

}  // namespace

// x: any strides, rank r; out: contiguous, rank r, x's dims with reduced ones set to 1.
void sum_cpu(const TensorView& x, uint32_t axes_mask, const TensorView& out, ThreadPool& pool) {
  const char* name = "sum_cpu";
  check_cpu(x, name, "x");
  check_cpu(out, name, "out");
  TK_CHECK(x.dtype == out.dtype, name, ": x ", describe(x), " and out ", describe(out), " must share a dtype");
  TK_CHECK(is_floating(x.dtype) || x.dtype == DType::I32, name, ": ", dtype_name(x.dtype),
           " is not supported (f32, bf16, f16 or i32)");
  TK_CHECK(x.ndim == out.ndim, name, ": out ", describe(out), " must keep the rank of x ", describe(x));
  TK_CHECK((axes_mask >> x.ndim) == 0, name, ": axes mask 0x", std::hex, axes_mask,
           " names axes beyond rank ", std::dec, x.ndim);
  for (int d = 0; d < x.ndim; ++d) {
    bool reduced = (axes_mask >> d) & 1u;
    TK_CHECK(out.shape[d] == (reduced ? 1 : x.shape[d]), name, ": out ", describe(out), " does not match x ",
             describe(x), " summed over axis mask 0x", std::hex, axes_mask);
  }
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  if (out.numel() == 0) return;
  if (x.numel() == 0) {  // an empty sum is zero
    fill_cpu(out, 0.0, pool);
    return;
  }

  DimList kept, red;
  for (int d = 0; d < x.ndim; ++d) {
    if (x.shape[d] == 1) continue;
    if ((axes_mask >> d) & 1u) red.add(x.shape[d], x.strides[d]);
    else kept.add(x.shape[d], x.strides[d]);
  }
  if (red.n == 0) {  // nothing to add up: out has x's shape
    copy_cpu(x, out, pool);
    return;
  }
  // The order of the reduced dims is free: largest stride first makes the innermost run the most
  // contiguous one and lets more of them merge.
  {
    int order[kMaxDims];
    for (int i = 0; i < red.n; ++i) order[i] = i;
    std::stable_sort(order, order + red.n, [&](int i, int j) { return std::llabs(red.stride[i]) > std::llabs(red.stride[j]); });
    DimList sorted;
    for (int i = 0; i < red.n; ++i) sorted.add(red.size[order[i]], red.stride[order[i]]);
    red = sorted;
  }
  kept.coalesce();
  red.coalesce();

  const Level L = level();
  const bool rows = kept.n > 0 && kept.stride[kept.n - 1] == 1 && red.stride[red.n - 1] != 1;
  if (x.dtype == DType::I32) {
    if (rows) sum_rows<int64_t>(L, x, kept, red, out, pool);
    else sum_runs<int64_t>(L, x, kept, red, out, pool);
  } else {
    if (rows) sum_rows<float>(L, x, kept, red, out, pool);
    else sum_runs<float>(L, x, kept, red, out, pool);
  }
}

}  // namespace tk
