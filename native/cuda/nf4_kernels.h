// NF4 quantization on CUDA: the GPU column of cpu/nf4.h, same format, same bits.
//
// Every function mirrors its CPU namesake (the format, bitsandbytes' thresholds, nibble order,
// double quantization and the zero-block rule are specified in cpu/nf4.h), with device pointers
// and the stream (a cudaStream_t as void*) in place of the thread pool. Results are bit-identical
// to nf4_quantize_cpu / nf4_dequantize_cpu / nf4_absmax_cpu for every input, which the tests check
// byte for byte. Work runs on the current device, asynchronously on `stream`; arguments are checked
// (tk::Error) before anything is issued.
//
// How bit-identity is kept. Every fp32 step the CPU does is written as the same single IEEE
// operation with an explicit rounding intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn), so
// nvcc cannot contract a multiply and an add into an FMA or use an approximate division:
//   quantize:    n = w * (1.0f / absmax)   (the reciprocal correctly rounded, as the CPU's 1.0f / m)
//                code = number of kNf4Thresholds that n exceeds (NaN -> 0, like the CPU)
//   dequantize:  w' = kNf4Code[code] * absmax, then bf16 by integer round-to-nearest-even
//   double quant decode: absmax = kDynamicMap8[q] * scale2 + offset (two roundings, no FMA)
// The tables are the CPU's own arrays (kNf4Code, kNf4Thresholds, kDynamicMap8), passed to the
// kernels by value as a kernel parameter, so there is no second copy of their values to drift.
//
// The double-quant offset is mean(absmax) summed in double in block order on the CPU. Double
// addition is not associative, so a parallel sum could differ in the last bit; the GPU therefore
// proves its parallel sum exact or falls back to the CPU's order:
//   - every absmax is an fp32 value >= 0; each is an integer multiple of g = 2^(max(emin, 1) - 150)
//     (emin: the smallest biased exponent among the non-zero ones) and smaller than
//     2^(emax - 126). If ceil(log2(nblocks)) + emax - max(emin, 1) <= 29, every partial sum of any
//     subset is an integer multiple of g below 2^53 g, so every double addition is exact and the
//     parallel sum (a 1024-thread tree) equals the sequential one bit for bit. That holds for
//     ordinary weights (absmaxes within a factor ~2^7 of each other at up to 4M blocks).
//   - otherwise one thread adds them in block order, as the CPU does (staged through shared
//     memory; ~1-2 ms per million blocks). Either way the result is deterministic and equals the
//     CPU's.
// Then offset = float(sum / nblocks), and the 256-blocks are encoded in parallel with the port of
// bitsandbytes' dQuantize<0> binary search that the CPU uses.
//
// Kernels:
//   quantize: one warp per quantization block (block_size <= 2048; 64 by default, i.e. one byte
//     per lane), or one 256-thread CTA per block for larger block sizes: absmax by a shuffle (or
//     shared-memory) max, which is exact in any order, then codes for byte pairs.
//   dequantize: each thread expands 8 elements (4 packed bytes, one 32-bit load) to two float4 or
//     one 16-byte bf16 store, with the 16 code values in shared memory (conflict-free: 16 words in
//     16 banks) and, with double quantization, the dynamic map in shared memory for the absmax
//     decode. Used when the start is 8-element aligned and the pointers allow vector accesses;
//     otherwise (and for row tails) element by element. Memory-bound: 2.5 (bf16) or 4.5 (f32) bytes
//     of traffic per element.
//   dequantize a window: rows [r0, r0 + nr) x cols [c0, c0 + nc) of the flattened W [rows, cols],
//     for qlora_kernels' chunked GEMMs (a full-width row range is one contiguous run).
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "../cpu/nf4.h"

namespace tk {

// w: [numel] w_dtype (F32 | BF16) device memory. Writes out's device buffers (see cpu/nf4.h's
// Nf4Out; sizes from nf4_layout): packed [ceil(numel/2)] u8 and absmax [nblocks] f32, or with
// double quantization packed, qabsmax [nblocks] u8, scale2 [nblocks2] f32 and offset [1] f32.
// With double quantization a scratch of 4 * nblocks bytes is taken from the caching allocator.
void nf4_quantize_cuda(const void* w, DType w_dtype, int64_t numel, int64_t block_size, bool double_quant,
                       const Nf4Out& out, void* stream);

// out: [numel] out_dtype (F32 | BF16) device memory = the dequantized weight. `in`: device buffers.
void nf4_dequantize_cuda(const Nf4In& in, int64_t numel, int64_t block_size, bool double_quant, void* out,
                         DType out_dtype, void* stream);

// absmax: [nblocks] f32 device memory, the per-block absmax as dequantize uses it.
void nf4_absmax_cuda(const Nf4In& in, int64_t nblocks, bool double_quant, float* absmax, void* stream);

// The window rows [r0, r0 + nr) x cols [c0, c0 + nc) of W [rows, cols], whose rows * cols elements
// were quantized flattened with `layout` (layout.numel == rows * cols), into out [nr, nc] (row-major,
// leading dimension nc) of out_dtype (F32 | BF16). nr or nc may be 0.
void nf4_dequantize_window_cuda(const Nf4In& in, const Nf4Layout& layout, int64_t rows, int64_t cols, int64_t r0,
                                int64_t nr, int64_t c0, int64_t nc, void* out, DType out_dtype, void* stream);

}  // namespace tk
