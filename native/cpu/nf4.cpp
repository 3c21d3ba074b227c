// CPU NF4 quantize / dequantize (see nf4.h for the format and the bitsandbytes correspondence).
//
// Design:
// - Dequantize is the hot path (every forward of a QLoRA layer): it streams 0.5 byte per element
//   in and 4 (F32) or 2 (BF16) bytes out. Threads split the blocks; each task first rebuilds the
//   fp32 absmax of up to kAbsmaxChunk blocks (the double-quant decode, done by one portable
//   function so every ISA path uses the same fp32 operations), then expands the nibbles.
//   AVX-512: 16 bytes -> high/low nibbles interleaved with unpack{lo,hi}_epi8 -> 2 x 16 int32
//   indices -> VPERMPS against the 16-entry code table held in one zmm -> multiply by absmax.
//   AVX2: 8 bytes -> 16 indices; the table is two ymm halves, each looked up with VPERMPS and
//   the half chosen by bit 3 of the index (shifted into the sign bit for BLENDVPS). Portable: a
//   byte loop. The output is one fp32 multiply per element, so all paths are bit-identical;
//   BF16 output is rounded to nearest even with integer arithmetic (NaN kept quiet), the rule of
//   core/dtype.h, not VCVTNEPS2BF16.
// - Quantize runs once per weight, so it is scalar but threaded over blocks: absmax, the fp32
//   reciprocal, then the code of each element as the number of bitsandbytes thresholds it
//   exceeds (branch-free, same result as bitsandbytes' decision tree, NaN -> 0 like the tree).
// - Double quantization needs every absmax before the offset (their mean) is known, so quantize
//   keeps the fp32 absmaxes in a scratch vector, sums them in double in block order (the result
//   does not depend on the thread count), then encodes 256-blocks in parallel with a port of
//   bitsandbytes' dQuantize<0> binary search over the dynamic map.
// - The build is baseline x86-64: the AVX paths carry function-level target attributes and the
//   level comes from active_isa() at each call.
#include "nf4.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../core/error.h"
#include "isa.h"
#include "simd.h"

namespace tk {

// bitsandbytes functional.get_4bit_type("nf4"); every value is exactly an fp32 number.
const float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// bitsandbytes csrc dQuantizeNF4, in ascending order (the tree's pivots flattened).
const float kNf4Thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f,
};

// create_dynamic_map(signed=True) as torch 2.13 computes it on its AVX2/AVX-512 path (hex float
// literals, so every bit is stated).
const float kDynamicMap8[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f,
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f, -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f, -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f, -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f, -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0.0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, 0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, 0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, 0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, 0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

namespace {

constexpr int64_t kAbsmaxChunk = 512;  // blocks whose absmax a dequantize task rebuilds at once
constexpr int64_t kGrainElems = 32768; // elements below which a second thread costs more than it saves

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

int64_t grain_blocks(int64_t block_size) { return std::max<int64_t>(1, kGrainElems / block_size); }

// ================================ quantize =======================================================

// The NF4 code of a normalized value: how many thresholds it exceeds (bitsandbytes' tree).
inline uint8_t nf4_encode(float n) {
  int k = 0;
  for (int t = 0; t < 15; ++t) k += n > kNf4Thresholds[t] ? 1 : 0;
  return uint8_t(k);
}

// bitsandbytes dQuantize<0>: binary search of x in kDynamicMap8, then the nearer neighbour by
// an fp32 midpoint. Ported step for step so that the codes match bit for bit.
uint8_t dyn8_encode(float x) {
  const float* code = kDynamicMap8;
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    float midpoint = (upper + val) * 0.5f;
    return uint8_t(x > midpoint ? upper_pivot : pivot);
  }
  float midpoint = (lower + val) * 0.5f;
  return uint8_t(x < midpoint ? lower_pivot : pivot);
}

template <class T>
inline float load_f(const T* p, int64_t i) {
  if constexpr (std::is_same<T, float>::value) return p[i];
  else return bf16_to_f32(p[i]);
}

// Blocks [b0, b1) of w: absmax into absmax[b], codes into packed.
template <class T>
void quantize_blocks(const T* w, int64_t numel, int64_t B, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * B, n = std::min(B, numel - s);
    float m = 0.0f;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(load_f(w, s + i)));
    absmax[b] = m;
    uint8_t* q = packed + s / 2;
    if (!(m >= FLT_MIN)) {  // zero (or subnormal-only) block: every code is 0.0
      std::fill(q, q + (n + 1) / 2, uint8_t(0x77));
      continue;
    }
    const float inv = 1.0f / m;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2)
      q[i / 2] = uint8_t(nf4_encode(load_f(w, s + i) * inv) << 4 | nf4_encode(load_f(w, s + i + 1) * inv));
    if (i < n) q[i / 2] = uint8_t(nf4_encode(load_f(w, s + i) * inv) << 4 | 7);  // pad: the code of 0.0
  }
}

// Double quantization of absmax [nblocks] into qabsmax, scale2, offset.
void double_quantize(const float* absmax, int64_t nblocks, const Nf4Out& out, ThreadPool& pool) {
  double sum = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) sum += double(absmax[b]);
  const float offset = nblocks > 0 ? float(sum / double(nblocks)) : 0.0f;
  *out.offset = offset;
  const int64_t nblocks2 = (nblocks + kNf4Block2 - 1) / kNf4Block2;
  pool.parallel_for(nblocks2, 16, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = s * kNf4Block2, b1 = std::min(nblocks, b0 + kNf4Block2);
      float m = 0.0f;
      for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(absmax[b] - offset));
      out.scale2[s] = m;
      if (!(m >= FLT_MIN)) {
        for (int64_t b = b0; b < b1; ++b) out.qabsmax[b] = 127;  // the code of 0.0
        continue;
      }
      const float inv = 1.0f / m;
      for (int64_t b = b0; b < b1; ++b) {
        const float c = absmax[b] - offset;
        out.qabsmax[b] = dyn8_encode(c * inv);
      }
    }
  });
}

// ================================ dequantize =====================================================

// Rebuilds absmax for blocks [b0, b1) into dst[0 .. b1-b0). Shared by every ISA path.
void absmax_range(const Nf4In& in, bool double_quant, int64_t b0, int64_t b1, float* dst) {
  if (!double_quant) {
    std::copy(in.absmax + b0, in.absmax + b1, dst);
    return;
  }
  const float offset = *in.offset;
  for (int64_t b = b0; b < b1; ++b) {
    const float scaled = kDynamicMap8[in.qabsmax[b]] * in.scale2[b / kNf4Block2];
    dst[b - b0] = scaled + offset;
  }
}

// Elements [i0, i1) of one block (i0 even, relative to the block start q) - the scalar tail and
// the portable path.
void deq_scalar(const uint8_t* q, int64_t i0, int64_t i1, float a, float* of, uint16_t* ob) {
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t byte = q[i / 2];
    const float y = kNf4Code[(i & 1) ? (byte & 15) : (byte >> 4)] * a;
    if (of) of[i] = y;
    else ob[i] = f32_to_bf16(y);
  }
}

// Blocks [0, nb) of a run starting at block-aligned `packed`, with absmax `amax`; n_total is the
// number of elements left from the run's start; outputs (one of of / ob) point at the run's start.
void deq_run_scalar(const uint8_t* packed, const float* amax, int64_t nb, int64_t B, int64_t n_total, float* of,
                    uint16_t* ob) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t s = b * B, n = std::min(B, n_total - s);
    deq_scalar(packed + s / 2, 0, n, amax[b], of ? of + s : nullptr, ob ? ob + s : nullptr);
  }
}

#if TK_SIMD_X86
// ---- AVX2 -----------------------------------------------------------------------------------------

TK_AVX2 inline __m128i bf16_round8(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(pk);
}

// 8 int32 indices -> 8 code values.
TK_AVX2 inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  const __m256 a = _mm256_permutevar8x32_ps(tlo, idx);
  const __m256 c = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

TK_AVX2 inline void store8(__m256 y, float* of, uint16_t* ob, int64_t i) {
  if (of) _mm256_storeu_ps(of + i, y);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + i), bf16_round8(y));
}

TK_AVX2 void deq_run_avx2(const uint8_t* packed, const float* amax, int64_t nb, int64_t B, int64_t n_total, float* of,
                          uint16_t* ob) {
  const __m256 tlo = _mm256_loadu_ps(kNf4Code), thi = _mm256_loadu_ps(kNf4Code + 8);
  const __m128i m0f = _mm_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t s = b * B, n = std::min(B, n_total - s);
    const uint8_t* q = packed + s / 2;
    float* o = of ? of + s : nullptr;
    uint16_t* h = ob ? ob + s : nullptr;
    const __m256 a = _mm256_set1_ps(amax[b]);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
      const __m128i lo = _mm_and_si128(v, m0f);
      const __m128i e = _mm_unpacklo_epi8(hi, lo);  // elements i .. i+15, one per byte
      const __m256 y0 = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(e), tlo, thi), a);
      const __m256 y1 = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(e, 8)), tlo, thi), a);
      store8(y0, o, h, i);
      store8(y1, o, h, i + 8);
    }
    deq_scalar(q, i, n, amax[b], o, h);
  }
}

// ---- AVX-512 --------------------------------------------------------------------------------------

TK_AVX512 inline __m256i bf16_round16(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

TK_AVX512 inline void store16(__m512 y, float* of, uint16_t* ob, int64_t i) {
  if (of) _mm512_storeu_ps(of + i, y);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob + i), bf16_round16(y));
}

TK_AVX512 void deq_run_avx512(const uint8_t* packed, const float* amax, int64_t nb, int64_t B, int64_t n_total,
                              float* of, uint16_t* ob) {
  const __m512 table = _mm512_loadu_ps(kNf4Code);
  const __m128i m0f = _mm_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t s = b * B, n = std::min(B, n_total - s);
    const uint8_t* q = packed + s / 2;
    float* o = of ? of + s : nullptr;
    uint16_t* h = ob ? ob + s : nullptr;
    const __m512 a = _mm512_set1_ps(amax[b]);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
      const __m128i lo = _mm_and_si128(v, m0f);
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  // elements i .. i+15
      const __m512i i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));  // elements i+16 .. i+31
      store16(_mm512_mul_ps(_mm512_permutexvar_ps(i0, table), a), o, h, i);
      store16(_mm512_mul_ps(_mm512_permutexvar_ps(i1, table), a), o, h, i + 16);
    }
    if (i + 16 <= n) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
      const __m128i lo = _mm_and_si128(v, m0f);
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
      store16(_mm512_mul_ps(_mm512_permutexvar_ps(i0, table), a), o, h, i);
      i += 16;
    }
    deq_scalar(q, i, n, amax[b], o, h);
  }
}
#endif

void check_block(int64_t block_size, const char* op) {
  TK_CHECK(block_size >= 2 && block_size <= (int64_t(1) << 24) && block_size % 2 == 0, op,
           ": block_size must be even and in [2, 16777216], got ", block_size);
}

}  // namespace

Nf4Layout nf4_layout(int64_t numel, int64_t block_size, bool double_quant) {
  check_block(block_size, "nf4_layout");
  TK_CHECK(numel >= 0, "nf4_layout: numel must be >= 0, got ", numel);
  Nf4Layout l;
  l.numel = numel;
  l.block_size = block_size;
  l.double_quant = double_quant;
  l.nblocks = (numel + block_size - 1) / block_size;
  l.packed_bytes = (numel + 1) / 2;
  if (double_quant) {
    l.nblocks2 = (l.nblocks + kNf4Block2 - 1) / kNf4Block2;
    l.absmax_bytes = l.nblocks;
    l.scale2_bytes = 4 * l.nblocks2;
    l.offset_bytes = 4;
  } else {
    l.absmax_bytes = 4 * l.nblocks;
  }
  return l;
}

void nf4_quantize_cpu(const void* w, DType w_dtype, int64_t numel, int64_t block_size, bool double_quant,
                      const Nf4Out& out, ThreadPool& pool) {
  check_block(block_size, "nf4_quantize");
  TK_CHECK(numel >= 0, "nf4_quantize: numel must be >= 0, got ", numel);
  TK_CHECK(w_dtype == DType::F32 || w_dtype == DType::BF16, "nf4_quantize: weight dtype must be f32 or bf16, got ",
           dtype_name(w_dtype));
  if (double_quant) {
    TK_CHECK(out.offset, "nf4_quantize: double quantization needs an offset output");
  }
  if (numel == 0) {
    if (double_quant) *out.offset = 0.0f;
    return;
  }
  TK_CHECK(w && out.packed, "nf4_quantize: null weight or packed output");
  TK_CHECK(double_quant ? (out.qabsmax && out.scale2) : out.absmax != nullptr,
           double_quant ? "nf4_quantize: double quantization needs qabsmax and scale2 outputs"
                        : "nf4_quantize: missing absmax output");
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  std::vector<float> scratch;
  float* absmax = out.absmax;
  if (double_quant) {
    scratch.resize(size_t(nblocks));
    absmax = scratch.data();
  }
  pool.parallel_for(nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    if (w_dtype == DType::F32)
      quantize_blocks(static_cast<const float*>(w), numel, block_size, b0, b1, out.packed, absmax);
    else
      quantize_blocks(static_cast<const uint16_t*>(w), numel, block_size, b0, b1, out.packed, absmax);
  });
  if (double_quant) double_quantize(absmax, nblocks, out, pool);
}

void nf4_absmax_cpu(const Nf4In& in, int64_t nblocks, bool double_quant, float* absmax) {
  TK_CHECK(nblocks >= 0, "nf4_absmax: nblocks must be >= 0");
  if (nblocks == 0) return;
  TK_CHECK(absmax && (double_quant ? (in.qabsmax && in.scale2 && in.offset) : in.absmax != nullptr),
           "nf4_absmax: missing input or output");
  absmax_range(in, double_quant, 0, nblocks, absmax);
}

void nf4_dequantize_cpu(const Nf4In& in, int64_t numel, int64_t block_size, bool double_quant, void* out,
                        DType out_dtype, ThreadPool& pool) {
  check_block(block_size, "nf4_dequantize");
  TK_CHECK(numel >= 0, "nf4_dequantize: numel must be >= 0, got ", numel);
  TK_CHECK(out_dtype == DType::F32 || out_dtype == DType::BF16, "nf4_dequantize: output dtype must be f32 or bf16, got ",
           dtype_name(out_dtype));
  if (numel == 0) return;
  TK_CHECK(out && in.packed, "nf4_dequantize: null output or packed input");
  TK_CHECK(double_quant ? (in.qabsmax && in.scale2 && in.offset) : in.absmax != nullptr,
           double_quant ? "nf4_dequantize: double quantization needs qabsmax, scale2 and offset"
                        : "nf4_dequantize: missing absmax input");
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  const Level lv = level();
  float* of = out_dtype == DType::F32 ? static_cast<float*>(out) : nullptr;
  uint16_t* ob = out_dtype == DType::BF16 ? static_cast<uint16_t*>(out) : nullptr;
  pool.parallel_for(nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    float amax[kAbsmaxChunk];
    for (int64_t c0 = b0; c0 < b1; c0 += kAbsmaxChunk) {
      const int64_t c1 = std::min(b1, c0 + kAbsmaxChunk);
      absmax_range(in, double_quant, c0, c1, amax);
      const int64_t s = c0 * block_size;
      const uint8_t* p = in.packed + s / 2;
      float* o = of ? of + s : nullptr;
      uint16_t* h = ob ? ob + s : nullptr;
#if TK_SIMD_X86
      if (lv == Level::Avx512) { deq_run_avx512(p, amax, c1 - c0, block_size, numel - s, o, h); continue; }
      if (lv == Level::Avx2) { deq_run_avx2(p, amax, c1 - c0, block_size, numel - s, o, h); continue; }
#endif
      deq_run_scalar(p, amax, c1 - c0, block_size, numel - s, o, h);
    }
  });
  (void)lv;
}

}  // namespace tk
