// CPU QLoRA linear layer (see qlora.h for the math, the dropout formula and what is saved).
//
// Layout of this file:
// - The NF4 GEMM source: packs panels of op(B) = deq(W)^T or deq(W) straight from the nibbles.
//   Element (k, j) of op(B) is flattened element e = j * in + k of W (transposed) or
//   e = k * in + j (not), in block e / block_size. The AVX-512 packers keep, per W row being
//   read, the block index and the offset inside the block, advanced incrementally (no division
//   in the loops), and decode 16 consecutive elements per step: a masked load of the <= 9 bytes
//   that hold them, nibbles split and interleaved in element order (shifted by one nibble when
//   the run starts at an odd element, as every other row does when in is odd), VPERMPS against
//   the 16-entry code table, times the absmax -- of one block, or of two with a lane mask where
//   a block boundary falls inside the 16 (block_size >= 16 allows at most one). Panels across
//   W's rows (the forward) are then transposed 16 x 16 in registers; panels along W's rows (dx)
//   are stored directly. bf16 values are rounded with the integer rule of core/dtype.h and, for
//   the bf16-pair panel, paired (k, k+1) in 32-bit words. Block sizes below 16 and the other ISA
//   levels use the scalar packer (a run decoded into a small buffer, then scattered); every path
//   computes code * absmax with one fp32 multiply, so all of them give the same bits.
// - Dropout: a keep bit per element of x (dropout_keep of core/rng.h), generated once per call
//   into a bitmask of N * in / 8 bytes, threaded; on AVX-512 the Philox rounds run on 16 blocks
//   (64 elements, one mask word) per vector, with VPMULUDQ on the even and odd lanes for the
//   32 x 32 -> 64-bit products. The mask is applied with masked loads and stores.
// - The forward and backward drivers: a handful of gemm_cpu calls (qlora.h lists them). Operands
//   of mixed precision (an fp32 intermediate against a bf16 tensor) are met by widening the bf16
//   side: the small ones (A, B) whole, the large ones (dy, keep * x) a row chunk of at most
//   kChunkBytes at a time, with the fp32 product accumulating over chunks (GEMM beta = 1).
//   Scratch buffers belong to the calling thread and only grow, so steady-state calls allocate
//   nothing.
#include "qlora.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../core/rng.h"
#include "gemm.h"
#include "gemm_internal.h"
#include "isa.h"
#include "simd.h"

namespace tk {
namespace {

using gemm_detail::PackFmt;
using gemm_detail::panel_bytes;

// Widened row chunks (fp32) stay below this size.
constexpr int64_t kChunkBytes = int64_t(4) << 20;
// Elements per scalar decode run (a stack buffer).
constexpr int64_t kRun = 256;

// ================================ scratch ============================================================

// Per-thread grow-only buffers (the calling thread's: the CPU queue's worker, or a test), so calls
// in steady state allocate, and fault in, nothing. Each purpose has its own buffer.
struct Scratch {
  std::vector<float> amax, xa, b32, a32, g, acc, wide;
  std::vector<uint16_t> xm16;
  std::vector<uint64_t> bits;
};
thread_local Scratch t_scratch;

template <class T>
T* take(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

// ================================ NF4 panel packing ==================================================

// Elements [e, e + n) of the weight (n >= 1), rounded to s.dtype, into out. One division per run.
void decode_run(const QloraNf4Source& s, int64_t e, int64_t n, float* out) {
  const int64_t bs = s.block_size;
  int64_t b = e / bs, rem = (b + 1) * bs - e;
  float a = s.absmax[b];
  for (int64_t i = 0; i < n; ++i, ++e) {
    if (rem == 0) {
      a = s.absmax[++b];
      rem = bs;
    }
    --rem;
    const uint8_t byte = s.packed[e >> 1];
    float v = kNf4Code[(e & 1) ? (byte & 15) : (byte >> 4)] * a;
    if (s.dtype == DType::BF16) v = bf16_to_f32(f32_to_bf16(v));
    out[i] = v;
  }
}

// Any format, panel width, block size and orientation: runs along W's rows decoded into a
// buffer, then scattered into the zeroed panel.
void pack_generic(const QloraNf4Source& s, PackFmt fmt, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                  void* dst) {
  const int64_t pb = panel_bytes(fmt, kc, W), cols = s.cols;
  float buf[kRun];
  for (int64_t p = 0; p < width; p += W) {
    const int64_t w = std::min<int64_t>(W, width - p);
    char* panel = static_cast<char*>(dst) + (p / W) * pb;
    std::memset(panel, 0, size_t(pb));
    float* pf = reinterpret_cast<float*>(panel);
    uint16_t* ph = reinterpret_cast<uint16_t*>(panel);
    auto put = [&](int64_t k, int64_t j, float v) {
      if (fmt == PackFmt::F32)
        pf[k * W + j] = v;
      else
        ph[((k >> 1) * W + j) * 2 + (k & 1)] = f32_to_bf16(v);
    };
    if (s.trans) {  // panel column j = W row w0 + p + j, read along k
      for (int64_t j = 0; j < w; ++j)
        for (int64_t k = 0; k < kc; k += kRun) {
          const int64_t n = std::min(kRun, kc - k);
          decode_run(s, (w0 + p + j) * cols + k0 + k, n, buf);
          for (int64_t i = 0; i < n; ++i) put(k + i, j, buf[i]);
        }
    } else {  // panel row k = W row k0 + k, read along j
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < w; j += kRun) {
          const int64_t n = std::min(kRun, w - j);
          decode_run(s, (k0 + k) * cols + w0 + p + j, n, buf);
          for (int64_t i = 0; i < n; ++i) put(k, j + i, buf[i]);
        }
    }
  }
}

#if TK_SIMD_X86

// Where one W row's run stands: element e, in block b at offset off (0 <= off < block_size).
struct RunPos {
  int64_t e, b, off;
};

inline RunPos run_pos(int64_t e, int64_t bs) { return RunPos{e, e / bs, e % bs}; }

// Moves n <= block_size elements on.
inline void advance(RunPos& r, int64_t n, int64_t bs) {
  r.e += n;
  r.off += n;
  if (r.off >= bs) {
    r.off -= bs;
    ++r.b;
  }
}

// Elements [r.e, r.e + cnt) (1 <= cnt <= 16, block size >= 16) into lanes 0 .. cnt-1, zero above.
TK_AVX512 inline __m512 decode16(const QloraNf4Source& s, const RunPos& r, int cnt, __m512 table) {
  const int64_t first = r.e >> 1;
  const int nbytes = int(((r.e + cnt - 1) >> 1) - first + 1);  // <= 9
  const __m128i v = _mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), s.packed + first);
  const __m128i m0f = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f), lo = _mm_and_si128(v, m0f);
  __m128i nib = _mm_unpacklo_epi8(hi, lo);  // elements 2 first .. 2 first + 15, one per byte
  if (r.e & 1) nib = _mm_alignr_epi8(_mm_unpackhi_epi8(hi, lo), nib, 1);
  const __m512 code = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib), table);
  __m512 a = _mm512_set1_ps(s.absmax[r.b]);
  const int64_t rem = s.block_size - r.off;  // elements left in block b
  if (rem < cnt) a = _mm512_mask_mov_ps(a, __mmask16(0xffffu << rem), _mm512_set1_ps(s.absmax[r.b + 1]));
  return _mm512_maskz_mul_ps(__mmask16((1u << cnt) - 1), code, a);
}

// fp32 -> bf16 rounding (nearest even, NaN kept quiet) as 32-bit lanes whose high half is the
// bf16 value: the rule of f32_to_bf16.
TK_AVX512 inline __m512i bf16_round_hi(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
}

// The value rounded to bf16, kept as fp32.
TK_AVX512 inline __m512 round_to_bf16(__m512 y) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_round_hi(y), _mm512_set1_epi32(int(0xffff0000u))));
}

// 32 consecutive elements (two fp32 vectors) as 16 words of bf16 (k, k + 1) pairs.
TK_AVX512 inline __m512i pairs_along(__m512 v0, __m512 v1) {
  const __m256i lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round_hi(v0), 16));
  const __m256i hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round_hi(v1), 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// One stage of transpose16x16: lanes with bit h set in row i trade places with the lanes with it
// clear in row i + h (for the rows i with bit h clear), one two-source permute per output row.
TK_AVX512 inline void transpose_stage(__m512i r[16], int h, __m512i lo, __m512i hi) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i & h) continue;
    const __m512i a = r[i], b = r[i + h];
    r[i] = _mm512_permutex2var_epi32(a, lo, b);
    r[i + h] = _mm512_permutex2var_epi32(a, hi, b);
  }
}

// Transposes 16 rows of 16 32-bit words in place: stage h swaps bit h of the row index with bit h
// of the lane index, so the four stages exchange row and lane indices.
TK_AVX512 inline void transpose16x16(__m512i r[16]) {
  transpose_stage(r, 8, _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0),
                  _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8));
  transpose_stage(r, 4, _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0),
                  _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 23, 22, 21, 20, 7, 6, 5, 4));
  transpose_stage(r, 2, _mm512_set_epi32(29, 28, 13, 12, 25, 24, 9, 8, 21, 20, 5, 4, 17, 16, 1, 0),
                  _mm512_set_epi32(31, 30, 15, 14, 27, 26, 11, 10, 23, 22, 7, 6, 19, 18, 3, 2));
  transpose_stage(r, 1, _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0),
                  _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1));
}

// One W row's run of c0 + max(c1, 0) <= 32 elements (c0 >= 1) as two vectors.
TK_AVX512 inline void row32(const QloraNf4Source& s, const RunPos& r, int c0, int c1, __m512 table, __m512& v0,
                            __m512& v1) {
  v0 = decode16(s, r, c0, table);
  v1 = _mm512_setzero_ps();
  if (c1 > 0) {
    RunPos t = r;
    advance(t, 16, s.block_size);
    v1 = decode16(s, t, c1, table);
  }
}

// Panels along W's rows (op(B) = deq(W), the dx GEMM): panel row k is W row k0 + k, columns
// [w0 + p, w0 + p + 32). W = 32.
TK_AVX512 void pack_rows_avx512(const QloraNf4Source& s, PackFmt fmt, int64_t w0, int64_t width, int64_t k0,
                                int64_t kc, void* dst) {
  const __m512 table = _mm512_loadu_ps(kNf4Code);
  const int64_t bs = s.block_size, cols = s.cols, cdiv = cols / bs, cmod = cols % bs;
  const int64_t pb = panel_bytes(fmt, kc, 32);
  const bool bf16 = s.dtype == DType::BF16;
  auto next_row = [&](RunPos& r) {
    r.e += cols;
    r.b += cdiv;
    r.off += cmod;
    if (r.off >= bs) {
      r.off -= bs;
      ++r.b;
    }
  };
  for (int64_t p = 0; p < width; p += 32) {
    const int w = int(std::min<int64_t>(32, width - p));
    const int c0 = std::min(16, w), c1 = w - 16;
    char* panel = static_cast<char*>(dst) + (p / 32) * pb;
    RunPos r = run_pos(k0 * cols + w0 + p, bs);
    if (fmt == PackFmt::F32) {
      float* out = reinterpret_cast<float*>(panel);
      for (int64_t k = 0; k < kc; ++k, next_row(r)) {
        __m512 v0, v1;
        row32(s, r, c0, c1, table, v0, v1);
        if (bf16) {
          v0 = round_to_bf16(v0);
          v1 = round_to_bf16(v1);
        }
        _mm512_storeu_ps(out + k * 32, v0);
        _mm512_storeu_ps(out + k * 32 + 16, v1);
      }
    } else {
      // Word j of pair row q: (row 2q, column j) in the low half, (row 2q + 1, column j) high.
      uint32_t* out = reinterpret_cast<uint32_t*>(panel);
      const __m512i himask = _mm512_set1_epi32(int(0xffff0000u));
      for (int64_t q = 0; q < (kc + 1) / 2; ++q) {
        __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        row32(s, r, c0, c1, table, a0, a1);
        next_row(r);
        if (2 * q + 1 < kc) {
          row32(s, r, c0, c1, table, b0, b1);
          next_row(r);
        }
        const __m512i x0 = _mm512_or_si512(_mm512_srli_epi32(bf16_round_hi(a0), 16),
                                           _mm512_and_si512(bf16_round_hi(b0), himask));
        const __m512i x1 = _mm512_or_si512(_mm512_srli_epi32(bf16_round_hi(a1), 16),
                                           _mm512_and_si512(bf16_round_hi(b1), himask));
        _mm512_storeu_si512(out + q * 32, x0);
        _mm512_storeu_si512(out + q * 32 + 16, x1);
      }
    }
  }
}

// Panels across W's rows (op(B) = deq(W)^T, the forward GEMM): panel column j is W row
// w0 + p + j, read along k from k0. Two groups of 16 W rows per panel, each decoded 16 (F32) or
// 32 (bf16 pairs) k at a time and transposed in registers. W = 32.
TK_AVX512 void pack_cols_avx512(const QloraNf4Source& s, PackFmt fmt, int64_t w0, int64_t width, int64_t k0,
                                int64_t kc, void* dst) {
  const __m512 table = _mm512_loadu_ps(kNf4Code);
  const int64_t bs = s.block_size, cols = s.cols;
  const int64_t pb = panel_bytes(fmt, kc, 32);
  const bool bf16 = s.dtype == DType::BF16;
  for (int64_t p = 0; p < width; p += 32) {
    const int w = int(std::min<int64_t>(32, width - p));
    char* panel = static_cast<char*>(dst) + (p / 32) * pb;
    for (int g = 0; g < 32; g += 16) {
      const int rows = std::max(0, std::min(16, w - g));
      RunPos pos[16];
      for (int i = 0; i < rows; ++i) pos[i] = run_pos((w0 + p + g + i) * cols + k0, bs);
      __m512i t[16];
      if (fmt == PackFmt::F32) {
        float* out = reinterpret_cast<float*>(panel);
        for (int64_t kk = 0; kk < kc; kk += 16) {
          const int cnt = int(std::min<int64_t>(16, kc - kk));
          for (int i = 0; i < 16; ++i) {
            if (i < rows) {
              __m512 v = decode16(s, pos[i], cnt, table);
              if (bf16) v = round_to_bf16(v);
              t[i] = _mm512_castps_si512(v);
              advance(pos[i], 16, bs);
            } else {
              t[i] = _mm512_setzero_si512();
            }
          }
          transpose16x16(t);
          for (int j = 0; j < cnt; ++j) _mm512_storeu_si512(out + (kk + j) * 32 + g, t[j]);
        }
      } else {
        uint32_t* out = reinterpret_cast<uint32_t*>(panel);
        for (int64_t kk = 0; kk < kc; kk += 32) {
          const int cnt = int(std::min<int64_t>(32, kc - kk));
          const int c0 = std::min(16, cnt), c1 = cnt - 16;
          for (int i = 0; i < 16; ++i) {
            if (i < rows) {
              const __m512 v0 = decode16(s, pos[i], c0, table);
              advance(pos[i], 16, bs);
              __m512 v1 = _mm512_setzero_ps();
              if (c1 > 0) v1 = decode16(s, pos[i], c1, table);
              advance(pos[i], 16, bs);
              t[i] = pairs_along(v0, v1);
            } else {
              t[i] = _mm512_setzero_si512();
            }
          }
          transpose16x16(t);
          for (int j = 0; j < (cnt + 1) / 2; ++j) _mm512_storeu_si512(out + (kk / 2 + j) * 32 + g, t[j]);
        }
      }
    }
  }
}

#endif  // TK_SIMD_X86

// The GemmBSource callback.
void nf4_pack(const void* ctx, PackFmt fmt, CpuIsa isa, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
              void* dst) {
  const QloraNf4Source& s = *static_cast<const QloraNf4Source*>(ctx);
#if TK_SIMD_X86
  if (isa >= CpuIsa::Avx512 && W == 32 && s.block_size >= 16 && (fmt == PackFmt::F32 || s.dtype == DType::BF16)) {
    if (s.trans)
      pack_cols_avx512(s, fmt, w0, width, k0, kc, dst);
    else
      pack_rows_avx512(s, fmt, w0, width, k0, kc, dst);
    return;
  }
#endif
  (void)isa;
  pack_generic(s, fmt, w0, width, k0, kc, W, dst);
}

// The weight as a GEMM source; a double-quantized weight's absmax is decoded into the calling
// thread's scratch (one Nf4Operand at a time per thread).
class Nf4Operand {
 public:
  Nf4Operand(const QloraWeight& w, DType dtype, bool trans, ThreadPool& pool) {
    const Nf4Layout& l = w.layout;
    src_.packed = w.q.packed;
    src_.rows = w.out;
    src_.cols = w.in;
    src_.block_size = l.block_size;
    src_.trans = trans;
    src_.dtype = dtype;
    if (!l.double_quant) {
      src_.absmax = w.q.absmax;
    } else {
      // Decoded by nf4_absmax_cpu itself (the function dequantize uses), 256-block groups in parallel.
      float* amax = take(t_scratch.amax, l.nblocks);
      const int64_t groups = (l.nblocks + kNf4Block2 - 1) / kNf4Block2;
      pool.parallel_for(groups, 64, [&](int64_t g0, int64_t g1) {
        const int64_t b0 = g0 * kNf4Block2, b1 = std::min(l.nblocks, g1 * kNf4Block2);
        Nf4In part = w.q;
        part.qabsmax += b0;
        part.scale2 += g0;
        nf4_absmax_cpu(part, b1 - b0, true, amax + b0);
      });
      src_.absmax = amax;
    }
    gs_ = qlora_nf4_gemm_source(src_);
  }
  Nf4Operand(const Nf4Operand&) = delete;
  Nf4Operand& operator=(const Nf4Operand&) = delete;
  const GemmBSource* source() const { return &gs_; }

 private:
  QloraNf4Source src_;
  GemmBSource gs_;
};

// ================================ dropout ============================================================

// Bits [e, e + cnt) of a keep mask (cnt <= 32), bit i = element e + i. The mask covers every
// element that is asked for, so a run crossing into the next word finds it present.
inline uint32_t mask_bits(const uint64_t* bits, int64_t e, int cnt) {
  const int64_t w = e >> 6;
  const int sh = int(e & 63);
  uint64_t v = bits[w] >> sh;
  if (sh > 0 && 64 - sh < cnt) v |= bits[w + 1] << (64 - sh);
  return uint32_t(v) & (cnt >= 32 ? 0xffffffffu : (1u << cnt) - 1);
}

inline bool kept(const uint64_t* bits, int64_t e) { return (bits[e >> 6] >> (e & 63)) & 1u; }

// Spreads the 16 bits of m to bits 0, 4, 8, ..., 60.
inline uint64_t spread4(uint64_t m) {
  m = (m | (m << 24)) & 0x000000FF000000FFull;
  m = (m | (m << 12)) & 0x000F000F000F000Full;
  m = (m | (m << 6)) & 0x0303030303030303ull;
  m = (m | (m << 3)) & 0x1111111111111111ull;
  return m;
}

#if TK_SIMD_X86
// a * b (32 x 32 -> 64 bits) per 32-bit lane, as high and low halves.
TK_AVX512 inline void mul_hilo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Keep-mask words [w0, w1): lane q of the vectors runs Philox block 16 w + q (elements 64 w + 4 q
// .. + 3), the rounds of philox4x32_10 (core/rng.h) on 16 blocks at once.
TK_AVX512 void keep_words_avx512(uint64_t seed, float p, int64_t w0, int64_t w1, uint64_t* out) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i m0 = _mm512_set1_epi32(int(0xD2511F53u)), m1 = _mm512_set1_epi32(int(0xCD9E8D57u));
  const __m512 vp = _mm512_set1_ps(p), scale = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t w = w0; w < w1; ++w) {
    const uint64_t blk = uint64_t(w) * 16;  // a multiple of 16: the low word never carries
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(blk))), lane);
    __m512i c1 = _mm512_set1_epi32(int(uint32_t(blk >> 32)));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      __m512i hi0, lo0, hi1, lo1;
      mul_hilo(c0, m0, hi0, lo0);
      mul_hilo(c2, m1, hi1, lo1);
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    const __m512i v[4] = {c0, c1, c2, c3};
    uint64_t m = 0;
    for (int l = 0; l < 4; ++l) {
      // uniform24 exactly: ((w >> 8) + 1) * 2^-24, then u > p.
      const __m512 u = _mm512_mul_ps(_mm512_cvtepu32_ps(_mm512_add_epi32(_mm512_srli_epi32(v[l], 8), one)), scale);
      m |= spread4(_mm512_cmp_ps_mask(u, vp, _CMP_GT_OQ)) << l;
    }
    out[w] = m;
  }
}
#endif

// dropout_keep(seed, e, p) (core/rng.h) for e in [0, n) as bits (bit e % 64 of word e / 64): one
// Philox block per four elements, 16 blocks per vector on AVX-512.
const uint64_t* keep_bits(uint64_t seed, float p, int64_t n, ThreadPool& pool) {
  const int64_t words = (n + 63) / 64;
  uint64_t* bits = take(t_scratch.bits, words);
  const bool simd = TK_SIMD_X86 && active_isa() >= CpuIsa::Avx512;
  pool.parallel_for(words, 256, [&](int64_t w0, int64_t w1) {
#if TK_SIMD_X86
    if (simd) return keep_words_avx512(seed, p, w0, w1, bits);
#endif
    for (int64_t w = w0; w < w1; ++w) {
      uint64_t m = 0;
      for (int q = 0; q < 16; ++q) {
        const Philox4x32 r = philox_block(seed, uint64_t(w) * 64 + uint64_t(q) * 4);
        for (int l = 0; l < 4; ++l) m |= uint64_t(uniform24(r.v[l]) > p) << (4 * q + l);
      }
      bits[w] = m;
    }
  });
  (void)simd;
  return bits;
}

// ================================ elementwise helpers ================================================

constexpr int64_t kGrain = 16384;

inline float load(const void* p, DType t, int64_t i) {
  return t == DType::F32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

#if TK_SIMD_X86
// Elements [i0, i1) of masked_copy (below).
TK_AVX512 void masked_copy_avx512(const void* src, DType st, void* dst, DType dt, int64_t i0, int64_t i1,
                                  const uint64_t* bits, int64_t e0) {
  if (st == DType::BF16 && dt == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = i0; i < i1; i += 32) {
      const int cnt = int(std::min<int64_t>(32, i1 - i));
      const __mmask32 all = cnt == 32 ? __mmask32(0xffffffffu) : __mmask32((1u << cnt) - 1);
      const __mmask32 k = bits ? __mmask32(mask_bits(bits, e0 + i, cnt)) : all;
      _mm512_mask_storeu_epi16(d + i, all, _mm512_maskz_loadu_epi16(k, s + i));
    }
    return;
  }
  float* d = static_cast<float*>(dst);
  for (int64_t i = i0; i < i1; i += 16) {
    const int cnt = int(std::min<int64_t>(16, i1 - i));
    const __mmask16 all = __mmask16((1u << cnt) - 1);
    const __mmask16 k = bits ? __mmask16(mask_bits(bits, e0 + i, cnt)) : all;
    __m512 v;
    if (st == DType::F32) {
      v = _mm512_maskz_loadu_ps(k, static_cast<const float*>(src) + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(src) + i);
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_mask_storeu_ps(d + i, all, v);
  }
}

// Elements [i0, i1) of zero_dropped (below).
TK_AVX512 void zero_dropped_avx512(void* data, DType t, int64_t i0, int64_t i1, const uint64_t* bits) {
  const int step = t == DType::F32 ? 16 : 32;
  for (int64_t i = i0; i < i1; i += step) {
    const int cnt = int(std::min<int64_t>(step, i1 - i));
    const uint32_t all = cnt == 32 ? 0xffffffffu : (1u << cnt) - 1;
    const uint32_t drop = ~mask_bits(bits, i, cnt) & all;
    if (t == DType::F32)
      _mm512_mask_storeu_ps(static_cast<float*>(data) + i, __mmask16(drop), _mm512_setzero_ps());
    else
      _mm512_mask_storeu_epi16(static_cast<uint16_t*>(data) + i, __mmask32(drop), _mm512_setzero_si512());
  }
}
#endif

// dst[i] = keep(e0 + i) ? src[i] : 0 for i < n, converted from st to dt (F32, or st itself: both
// exact). bits == nullptr keeps everything.
void masked_copy(const void* src, DType st, void* dst, DType dt, int64_t n, const uint64_t* bits, int64_t e0,
                 ThreadPool& pool) {
  const bool simd = TK_SIMD_X86 && active_isa() >= CpuIsa::Avx512;
  pool.parallel_for(n, kGrain, [&](int64_t i0, int64_t i1) {
    if (dt == st && !bits) {
      const size_t es = dtype_size(st);
      std::memcpy(static_cast<char*>(dst) + i0 * es, static_cast<const char*>(src) + i0 * es, size_t(i1 - i0) * es);
      return;
    }
#if TK_SIMD_X86
    if (simd) return masked_copy_avx512(src, st, dst, dt, i0, i1, bits, e0);
#endif
    if (dt == st && st == DType::BF16) {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = i0; i < i1; ++i) d[i] = kept(bits, e0 + i) ? s[i] : uint16_t(0);
      return;
    }
    float* d = static_cast<float*>(dst);
    for (int64_t i = i0; i < i1; ++i) d[i] = (!bits || kept(bits, e0 + i)) ? load(src, st, i) : 0.0f;
  });
  (void)simd;
}

// Zeroes the dropped elements of x-shaped data (dtype t, n elements).
void zero_dropped(void* data, DType t, int64_t n, const uint64_t* bits, ThreadPool& pool) {
  const bool simd = TK_SIMD_X86 && active_isa() >= CpuIsa::Avx512;
  pool.parallel_for(n, kGrain, [&](int64_t i0, int64_t i1) {
#if TK_SIMD_X86
    if (simd) return zero_dropped_avx512(data, t, i0, i1, bits);
#endif
    for (int64_t i = i0; i < i1; ++i) {
      if (kept(bits, i)) continue;
      if (t == DType::F32)
        static_cast<float*>(data)[i] = 0.0f;
      else
        static_cast<uint16_t*>(data)[i] = 0;
    }
  });
  (void)simd;
}

// fp32 -> dst dtype (F32 copy, or BF16 rounded to nearest even).
void store_from_f32(const float* src, void* dst, DType dt, int64_t n) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

// A small operand as fp32: an F32 one in place, a BF16 one widened into `buf`.
const float* as_f32(const void* p, DType t, int64_t n, std::vector<float>& buf) {
  if (t == DType::F32) return static_cast<const float*>(p);
  float* d = take(buf, n);
  for (int64_t i = 0; i < n; ++i) d[i] = load(p, t, i);
  return d;
}

// Rows per chunk for widened rows of `cols` fp32 values.
int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, kChunkBytes / (4 * std::max<int64_t>(1, cols))); }

// One row-major GEMM: C [M, N] (ct, ldc) = alpha op(A) op(B) + beta C; A and B in `ab`.
struct Operand {
  const void* p;
  int64_t ld;
  bool trans;
};

void mm(DType ab, int64_t M, int64_t N, int64_t K, Operand a, Operand b, const GemmBSource* bsrc, void* c, DType ct,
        int64_t ldc, float alpha, float beta, ThreadPool& pool) {
  GemmParams g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.ab_dtype = ab;
  g.c_dtype = ct;
  g.A = a.p;
  g.lda = a.ld;
  g.trans_a = a.trans;
  g.B = b.p;
  g.ldb = b.ld;
  g.trans_b = b.trans;
  g.b_source = bsrc;
  g.C = c;
  g.ldc = ldc;
  g.alpha = alpha;
  g.beta = beta;
  gemm_cpu(g, pool);
}

// ================================ argument checks ====================================================

struct Dims {
  int64_t N = 0, in = 0, out = 0, r = 0;
  DType dt = DType::F32;
};

void check_cpu(const char* op, const char* name, const TensorView& v) {
  TK_CHECK(v.device.type == DeviceType::CPU, op, ": ", name, " must be on the CPU, got ", v.device.name());
  TK_CHECK(v.is_contiguous(), op, ": ", name, " ", describe(v), " must be contiguous");
  TK_CHECK(v.data != nullptr || v.numel() == 0, op, ": ", name, " ", describe(v), " has no data");
}

// `v` has `like`'s leading dims, last dim `last` and dtype `dt`.
void check_like(const char* op, const char* name, const TensorView& v, const TensorView& like, int64_t last,
                DType dt, const char* what) {
  check_cpu(op, name, v);
  bool ok = v.ndim == like.ndim && v.shape[v.ndim - 1] == last;
  for (int i = 0; ok && i + 1 < like.ndim; ++i) ok = v.shape[i] == like.shape[i];
  TK_CHECK(ok, op, ": ", name, " ", describe(v), " must be x's leading dims with last dim ", last, " (", what,
           "), x is ", describe(like));
  TK_CHECK(v.dtype == dt, op, ": ", name, " ", describe(v), " must be ", dtype_name(dt));
}

void check_matrix(const char* op, const char* name, const TensorView& v, int64_t rows, int64_t cols, DType dt,
                  const char* what) {
  check_cpu(op, name, v);
  TK_CHECK(v.ndim == 2 && v.shape[0] == rows && v.shape[1] == cols, op, ": ", name, " ", describe(v), " must be [",
           rows, ", ", cols, "] (", what, ")");
  TK_CHECK(v.dtype == dt, op, ": ", name, " ", describe(v), " must be ", dtype_name(dt), " (x's dtype)");
}

// x, W, A, B and the options; returns the sizes.
Dims check_layer(const char* op, const TensorView& x, const QloraWeight& w, const TensorView& A,
                 const TensorView& B, const QloraOptions& opt) {
  check_cpu(op, "x", x);
  TK_CHECK(x.ndim >= 1, op, ": x must have at least one dim, got a scalar");
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": x ", describe(x), " must be f32 or bf16");
  Dims d;
  d.dt = x.dtype;
  d.in = x.shape[x.ndim - 1];
  d.N = d.in > 0 ? x.numel() / d.in : 0;
  const Nf4Layout& l = w.layout;
  TK_CHECK(w.out >= 1 && w.in >= 1, op, ": W must be [out, in] with out, in >= 1, got [", w.out, ", ", w.in, "]");
  TK_CHECK(l.numel == w.out * w.in, op, ": W's NF4 layout holds ", l.numel, " elements, but W is [", w.out, ", ",
           w.in, "] = ", w.out * w.in);
  const Nf4Layout want = nf4_layout(l.numel, l.block_size, l.double_quant);
  TK_CHECK(l.nblocks == want.nblocks && l.nblocks2 == want.nblocks2 && l.packed_bytes == want.packed_bytes &&
               l.absmax_bytes == want.absmax_bytes,
           op, ": W's NF4 layout is inconsistent (make it with nf4_layout(out * in, block_size, double_quant))");
  TK_CHECK(w.q.packed != nullptr, op, ": W has no packed codes");
  TK_CHECK(l.double_quant ? (w.q.qabsmax && w.q.scale2 && w.q.offset) : w.q.absmax != nullptr, op,
           l.double_quant ? ": W is double-quantized but lacks qabsmax, scale2 or offset" : ": W lacks absmax");
  TK_CHECK(d.in == w.in, op, ": x ", describe(x), " does not match W [", w.out, ", ", w.in, "]: x's last dim must be ",
           w.in);
  d.out = w.out;
  check_cpu(op, "A", A);
  TK_CHECK(A.ndim == 2 && A.shape[0] >= 1, op, ": A ", describe(A), " must be [r, in] with r >= 1");
  d.r = A.shape[0];
  check_matrix(op, "A", A, d.r, d.in, d.dt, "r x in");
  check_matrix(op, "B", B, d.out, d.r, d.dt, "out x r");
  TK_CHECK(std::isfinite(opt.scale), op, ": scale must be finite, got ", opt.scale);
  TK_CHECK(opt.dropout >= 0.0f && opt.dropout < 1.0f, op, ": dropout must be in [0, 1), got ", opt.dropout);
  return d;
}

void fill_zero(const TensorView& v) { std::memset(v.data, 0, v.nbytes()); }

}  // namespace

GemmBSource qlora_nf4_gemm_source(const QloraNf4Source& src) {
  GemmBSource g;
  g.pack = &nf4_pack;
  g.ctx = &src;
  return g;
}

// ================================ forward ============================================================

void qlora_forward_cpu(const TensorView& x, const QloraWeight& w, const TensorView& A, const TensorView& B,
                       const QloraOptions& opt, const TensorView& y, const TensorView& xa, ThreadPool& pool) {
  const char* op = "qlora_forward";
  const Dims d = check_layer(op, x, w, A, B, opt);
  check_like(op, "y", y, x, d.out, d.dt, "out");
  if (xa.data) check_like(op, "xa", xa, x, d.r, DType::F32, "r");
  if (d.N == 0) return;
  const int64_t N = d.N, in = d.in, out = d.out, r = d.r;
  const DType dt = d.dt;
  const size_t es = dtype_size(dt);
  const bool lora = opt.scale != 0.0f;
  Scratch& sc = t_scratch;

  // xa = c (keep * x) A^T, unless nobody needs it.
  float* xa_p = static_cast<float*>(xa.data);
  if (!xa_p && lora) xa_p = take(sc.xa, N * r);
  if (xa_p) {
    const Operand a_t{A.data, in, true};
    if (opt.dropout == 0.0f) {
      mm(dt, N, r, in, Operand{x.data, in, false}, a_t, nullptr, xa_p, DType::F32, r, 1.0f, 0.0f, pool);
    } else {
      const float c = 1.0f / (1.0f - opt.dropout);
      const uint64_t* keep = keep_bits(opt.seed, opt.dropout, N * in, pool);
      const int64_t rows = std::min(N, chunk_rows(in));
      void* xm = dt == DType::F32 ? static_cast<void*>(take(sc.wide, rows * in))
                                  : static_cast<void*>(take(sc.xm16, rows * in));
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        masked_copy(static_cast<const char*>(x.data) + size_t(n0 * in) * es, dt, xm, dt, nr * in, keep, n0 * in,
                    pool);
        mm(dt, nr, r, in, Operand{xm, in, false}, a_t, nullptr, xa_p + n0 * r, DType::F32, r, c, 0.0f, pool);
      }
    }
  }
  // y = s xa B^T, then y += x deq(W)^T.
  if (lora) {
    const float* b32 = as_f32(B.data, dt, out * r, sc.b32);
    mm(DType::F32, N, out, r, Operand{xa_p, r, false}, Operand{b32, r, true}, nullptr, y.data, dt, out, opt.scale,
       0.0f, pool);
  }
  const Nf4Operand wt(w, dt, /*trans=*/true, pool);
  mm(dt, N, out, in, Operand{x.data, in, false}, Operand{nullptr, 0, false}, wt.source(), y.data, dt, out, 1.0f,
     lora ? 1.0f : 0.0f, pool);
}

// ================================ backward ===========================================================

void qlora_backward_cpu(const TensorView& dy, const TensorView& x, const QloraWeight& w, const TensorView& A,
                        const TensorView& B, const TensorView& xa, const QloraOptions& opt, const TensorView& dx,
                        const TensorView& dA, const TensorView& dB, ThreadPool& pool) {
  const char* op = "qlora_backward";
  const Dims d = check_layer(op, x, w, A, B, opt);
  check_like(op, "dy", dy, x, d.out, d.dt, "out");
  TK_CHECK(xa.data != nullptr || d.N == 0, op, ": xa (saved by qlora_forward_cpu) is required");
  check_like(op, "xa", xa, x, d.r, DType::F32, "r");
  if (dx.data) check_like(op, "dx", dx, x, d.in, d.dt, "in");
  check_matrix(op, "dA", dA, d.r, d.in, d.dt, "A's shape");
  check_matrix(op, "dB", dB, d.out, d.r, d.dt, "B's shape");
  const int64_t N = d.N, in = d.in, out = d.out, r = d.r;
  const DType dt = d.dt;
  const size_t es = dtype_size(dt);
  const bool lora = opt.scale != 0.0f;
  const float s = opt.scale, p = opt.dropout;
  const float c = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
  Scratch& sc = t_scratch;

  if (!lora || N == 0) {
    fill_zero(dA);
    fill_zero(dB);
  }
  if (N == 0) return;
  const uint64_t* keep = lora && p > 0.0f ? keep_bits(opt.seed, p, N * in, pool) : nullptr;

  float* g = nullptr;
  if (lora) {
    // g = dy B  [N, r] fp32.
    g = take(sc.g, N * r);
    mm(dt, N, r, out, Operand{dy.data, out, false}, Operand{B.data, r, false}, nullptr, g, DType::F32, r, 1.0f, 0.0f,
       pool);

    // dB = s dy^T xa  [out, r]; bf16 dy is widened a row chunk at a time.
    const float* xa_p = static_cast<const float*>(xa.data);
    if (dt == DType::F32) {
      mm(dt, out, r, N, Operand{dy.data, out, true}, Operand{xa_p, r, false}, nullptr, dB.data, dt, r, s, 0.0f, pool);
    } else {
      float* acc = take(sc.acc, out * r);
      const int64_t rows = std::min(N, chunk_rows(out));
      float* dy32 = take(sc.wide, rows * out);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        masked_copy(static_cast<const char*>(dy.data) + size_t(n0 * out) * es, dt, dy32, DType::F32, nr * out, nullptr,
                    0, pool);
        mm(DType::F32, out, r, nr, Operand{dy32, out, true}, Operand{xa_p + n0 * r, r, false}, nullptr, acc,
           DType::F32, r, s, n0 ? 1.0f : 0.0f, pool);
      }
      store_from_f32(acc, dB.data, dt, out * r);
    }

    // dA = s c g^T (keep * x)  [r, in]; keep * x formed (and widened) a row chunk at a time.
    if (dt == DType::F32 && !keep) {
      mm(dt, r, in, N, Operand{g, r, true}, Operand{x.data, in, false}, nullptr, dA.data, dt, in, s, 0.0f, pool);
    } else {
      float* target = dt == DType::F32 ? static_cast<float*>(dA.data) : take(sc.acc, r * in);
      const int64_t rows = std::min(N, chunk_rows(in));
      float* xm = take(sc.wide, rows * in);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        masked_copy(static_cast<const char*>(x.data) + size_t(n0 * in) * es, dt, xm, DType::F32, nr * in, keep,
                    n0 * in, pool);
        mm(DType::F32, r, in, nr, Operand{g + n0 * r, r, true}, Operand{xm, in, false}, nullptr, target, DType::F32,
           in, s * c, n0 ? 1.0f : 0.0f, pool);
      }
      if (dt != DType::F32) store_from_f32(target, dA.data, dt, r * in);
    }
  }

  // dx = dy deq(W) + s c keep * (g A): the LoRA term first, dropped elements zeroed, then the
  // fused NF4 GEMM accumulates onto it.
  if (dx.data) {
    if (lora) {
      const float* a32 = as_f32(A.data, dt, r * in, sc.a32);
      mm(DType::F32, N, in, r, Operand{g, r, false}, Operand{a32, in, false}, nullptr, dx.data, dt, in, s * c, 0.0f,
         pool);
      if (keep) zero_dropped(dx.data, dt, N * in, keep, pool);
    }
    const Nf4Operand wn(w, dt, /*trans=*/false, pool);
    mm(dt, N, in, out, Operand{dy.data, out, false}, Operand{nullptr, 0, false}, wn.source(), dx.data, dt, in, 1.0f,
       lora ? 1.0f : 0.0f, pool);
  }
}

}  // namespace tk
