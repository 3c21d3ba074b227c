// NF4 (QLoRA NormalFloat4) quantization of weights on the CPU, with double quantization of the
// per-block absmax, bit-compatible with bitsandbytes' quantize_4bit(quant_type="nf4") /
// dequantize_4bit (compress_statistics=True for double quantization).
//
// Format, for a weight w of numel elements (flattened), block size B (64 by default):
//   nblocks    = ceil(numel / B); block b holds elements [b*B, min(numel, (b+1)*B)).
//   absmax[b]  = max |w| over block b (fp32).
//   code(i)    = the index k in 0..15 of the NF4 value nearest to n_i = w_i * (1.0f / absmax[b]),
//                with n_i computed in fp32 exactly like bitsandbytes (a multiply by the fp32
//                reciprocal, not a division). Boundaries are bitsandbytes' decision-tree
//                thresholds kNf4Thresholds: the midpoints of consecutive code values as
//                bitsandbytes prints them in decimal, compiled as fp32 literals; n goes to the
//                UPPER code only when n > threshold (ties go down). Where the literal lies above
//                the exact midpoint (thresholds 1, 3, 4 and 8), the one fp32 value equal to it
//                goes to the lower code although the upper is nearer by under one ulp; we keep
//                bitsandbytes' choice.
//   packed[j]  = code(2j) << 4 | code(2j+1): element 2j in the HIGH nibble. An odd numel pads the
//                last low nibble with 7 (the code of 0.0), as bitsandbytes does.
//   w'_i       = kNf4Code[code(i)] * absmax[b], one fp32 multiply (rounded to nearest even for
//                a BF16 output).
//   A block whose absmax is below FLT_MIN (all zeros, or only subnormals) stores code 7 (0.0) for
//   every element, so it dequantizes to exact zeros even when its absmax comes back from double
//   quantization as a small non-zero number. (bitsandbytes' kernel would compute 0 * inf = NaN
//   there and store code 0, i.e. -1.0 * absmax; this is our one deliberate difference.)
//
// Double quantization (QLoRA section 3, bitsandbytes compress_statistics):
//   offset     = mean(absmax) in fp32 (summed in double, rounded once; torch sums in fp32, so
//                the offset can differ from bitsandbytes' in the last bit).
//   c[b]       = absmax[b] - offset (fp32), quantized blockwise with block size 256:
//   scale2[s]  = max |c| over 256-block s (fp32), nblocks2 = ceil(nblocks / 256),
//   qabsmax[b] = bitsandbytes' dQuantize<0> binary search of c[b] * (1.0f / scale2[s]) in the
//                signed dynamic 8-bit map kDynamicMap8 (create_dynamic_map(signed=True)); a
//                256-block whose scale is below FLT_MIN stores code 127 (0.0).
//   absmax'[b] = kDynamicMap8[qabsmax[b]] * scale2[s] + offset, each step an fp32 operation.
//
// Memory (Nf4Layout): 0.5 byte per element (packed), plus 4 bytes per block without double
// quantization, or 1 byte per block + 4 bytes per 256 blocks + 4 bytes (the offset) with it:
// for B = 64 that is 0.5 + 1/64 + 4/16384 bytes per parameter (4.127 bits), as in bitsandbytes.
//
// About kDynamicMap8: bitsandbytes builds the map at run time with torch.linspace in fp32, whose
// last-bit rounding depends on torch's SIMD path. The table here is what torch 2.13 produces on
// its AVX2 and AVX-512 paths; torch's scalar (ATEN_CPU_CAPABILITY=default) path gives 42 entries
// that differ by 1 or 2 ulp. bitsandbytes stores the map it used in a checkpoint's quant state
// ("nested_quant_map"); a loader should check it against kDynamicMap8.
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "../core/thread_pool.h"

namespace tk {

// The 16 NormalFloat4 values of the QLoRA paper (bitsandbytes get_4bit_type("nf4")), index = code.
extern const float kNf4Code[16];
// bitsandbytes' dQuantizeNF4 thresholds: code k+1 is chosen over code k when n > kNf4Thresholds[k].
extern const float kNf4Thresholds[15];
// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted:
// [0] = -0.99296874, [127] = 0, [255] = 1; symmetric: [127 - k] = -[127 + k] for k in 1..127.
extern const float kDynamicMap8[256];

constexpr int64_t kNf4DefaultBlock = 64;
constexpr int64_t kNf4Block2 = 256;  // block size of the double quantization

// Sizes of the buffers of one NF4-quantized tensor.
struct Nf4Layout {
  int64_t numel = 0;
  int64_t block_size = kNf4DefaultBlock;
  bool double_quant = false;
  int64_t nblocks = 0;       // ceil(numel / block_size)
  int64_t nblocks2 = 0;      // ceil(nblocks / 256) with double quant, else 0
  int64_t packed_bytes = 0;  // u8 [ceil(numel / 2)]
  int64_t absmax_bytes = 0;  // f32 [nblocks] (4 * nblocks), or with double quant u8 [nblocks]
  int64_t scale2_bytes = 0;  // f32 [nblocks2] with double quant, else 0
  int64_t offset_bytes = 0;  // f32 [1] with double quant, else 0
  int64_t total_bytes() const { return packed_bytes + absmax_bytes + scale2_bytes + offset_bytes; }
};

// Throws tk::Error unless numel >= 0 and block_size is even and in [2, 2^24].
Nf4Layout nf4_layout(int64_t numel, int64_t block_size = kNf4DefaultBlock, bool double_quant = true);

// Where quantize writes. Without double quant: packed and absmax. With it: packed, qabsmax,
// scale2 and offset (absmax is not used and may be null).
struct Nf4Out {
  uint8_t* packed = nullptr;   // [packed_bytes]
  float* absmax = nullptr;     // [nblocks] f32, without double quant
  uint8_t* qabsmax = nullptr;  // [nblocks] u8 dynamic-map codes, with double quant
  float* scale2 = nullptr;     // [nblocks2] f32, with double quant
  float* offset = nullptr;     // [1] f32, with double quant
};

// What dequantize reads (same fields, const).
struct Nf4In {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* scale2 = nullptr;
  const float* offset = nullptr;
};

// w: [numel] w_dtype (F32 or BF16), finite values. Writes the buffers of `out` described above.
// Throws tk::Error on an unsupported dtype, a bad block size or a missing output pointer.
void nf4_quantize_cpu(const void* w, DType w_dtype, int64_t numel, int64_t block_size, bool double_quant,
                      const Nf4Out& out, ThreadPool& pool);

// out: [numel] out_dtype (F32 or BF16) = the dequantized weight. Dispatches on active_isa()
// (AVX-512, AVX2 or portable); all paths give identical bits.
void nf4_dequantize_cpu(const Nf4In& in, int64_t numel, int64_t block_size, bool double_quant, void* out,
                        DType out_dtype, ThreadPool& pool);

// The per-block absmax as dequantize uses it: absmax[b] = in.absmax[b] without double quant, or
// kDynamicMap8[qabsmax[b]] * scale2[b / 256] + offset with it. absmax: [nblocks] f32.
void nf4_absmax_cpu(const Nf4In& in, int64_t nblocks, bool double_quant, float* absmax);

}  // namespace tk
