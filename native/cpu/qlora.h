// QLoRA linear layer on the CPU, forward and backward: a frozen NF4 base weight plus a trainable
// low-rank update (QLoRA, Dettmers et al. 2023; LoRA, Hu et al. 2021).
//
//   y  = x deq(W)^T + s (drop(x) A^T) B^T
//   x [N, in] (N = all leading dims of x)   W [out, in] NF4 (frozen)   A [r, in]   B [out, r]
//   y [N, out]   s = scale (alpha / r, or alpha / sqrt(r) with rsLoRA)
//
// Where dequantization happens, and why. W is never dequantized as a whole. The base product is
// one GEMM (cpu/gemm.h) whose B operand is a GemmBSource: when the GEMM packs a K block of B
// panels (kc x 32 for AVX-512) it calls back here, and the NF4 nibbles and the per-block absmax
// are expanded straight into the packed panel (fp32, or bf16 (k, k+1) pairs for the AVX512-BF16
// kernel) -- in registers on AVX-512: 16 elements decoded per step, transposed 16 x 16 where the
// panel runs across W's rows. Each weight element is decoded once per GEMM into a packed block
// that every row of x then reuses, so the decoding is amortized over the N rows, and the weight
// streams from memory at 0.5 byte per element instead of 4 (no [out, in] fp32 buffer, no extra
// pass over one); kernels, blocking and threading are the dense GEMM's. The backward's
// dx = dy deq(W) uses the same source in the other orientation (panels along W's rows instead of
// across them). Double-quantized absmaxes are decoded once per call into an fp32 array of
// nblocks values (1/64 of the weight's element count at block 64).
// Values equal nf4_dequantize_cpu's bit for bit (one fp32 multiply; rounded to nearest even for
// bf16), so the fused GEMM equals dequantize-then-GEMM exactly.
//
// Dtypes. x, A, B, y (and dy, dx, dA, dB) share one dtype, F32 or BF16. With BF16 the effective
// weight is deq(W) rounded to bf16 (what a materialized bf16 weight would be) and everything is
// computed in fp32 from bf16-exact inputs (the bf16 dot-product kernel where the CPU has it);
// results are rounded once per stored output, except as noted below.
//
// Dropout (inverted, on the LoRA path only): drop(x) = x * keep / (1 - p). The mask is never
// stored: it is a function of (seed, element index), regenerated in the backward pass. For
// element e = n * in + k of x (row-major over all of x):
//   (w0, w1, w2, w3) = philox4x32_10(ctr = {e/4 low 32 bits, e/4 high 32 bits, 0, 0},
//                                    key = {seed low 32 bits, seed high 32 bits})   (core/rng.h)
//   keep(e) = uniform24(w[e % 4]) > p,   uniform24(w) = ((w >> 8) + 1) * 2^-24
// which is core/rng.h's dropout_keep(seed, e, p): the mask of dropout_cpu (cpu/elementwise.h) on x
// with the same seed. P(keep) = 1 - p within 2^-24; p = 0 keeps everything (and skips the
// generator). The kernels form keep * x (exact in any dtype) and apply c = 1.0f / (1.0f - p)
// (fp32) as a GEMM alpha, so dropout adds no rounding of its own.
//
// Forward, in this order (each step one gemm_cpu call; row chunks bound the scratch memory):
//   xa = c (keep * x) A^T                 [N, r] fp32: saved for the backward pass (see below)
//   y  = s xa B^T                         the LoRA term first (B widened to fp32 if bf16) ...
//   y  = x deq(W)^T + 1 * y               ... then the fused NF4 GEMM accumulates onto it (beta 1)
// With fp32 y this is exact fp32 accumulation. With bf16 y the LoRA term is rounded to bf16 and
// the sum rounded once more: y = bf16(x deq(W)^T + bf16(s xa B^T)) -- the large base product is
// rounded once, only the (usually much smaller) LoRA term twice. s == 0 skips the LoRA term.
//
// What is saved for the backward pass: xa = drop(x) A^T, [N, r] fp32 (r / in of x's size, kept in
// fp32 so dB = s dy^T xa gets no bf16 rounding of it). x, A, B and W are the layer's own inputs;
// the dropout mask is regenerated from the seed. xa may be omitted (inference): pass a view with
// data == nullptr.
//
// Backward (W frozen, so no dW), given dy [N, out]:
//   g  = dy B                             [N, r] fp32
//   dB = s dy^T xa                        [out, r]
//   dA = s g^T drop(x) = s c g^T (keep * x)     [r, in]
//   dx = dy deq(W) + s c keep * (g A)     [N, in]: first dx = s c (g A) in x's dtype, the
//        dropped elements zeroed in place, then the fused NF4 GEMM with beta 1 (rounding as in
//        the forward). dx is optional (x does not require grad): a view with data == nullptr.
// With bf16 tensors the fp32 operands (g, xa) are not rounded to bf16: the bf16 operand of those
// products (dy, keep * x) is widened to fp32 a row chunk at a time and dA, dB accumulate in fp32,
// rounded once at the end. dx, dA, dB are overwritten.
//
// Conventions: CPU tensors, contiguous, row-major. All checks happen before anything is written;
// errors are tk::Error naming the kernel and the operands. Results do not depend on the thread
// count. The GEMMs dispatch on active_isa(); all ISA levels dequantize to identical bits (the
// NF4 packer has an AVX-512 path; other levels and block sizes below 16 use a scalar one).
// Scratch (row chunks of at most 4 MiB, the mask, g, the decoded absmax) is kept per calling
// thread and only grows.
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"
#include "gemm.h"
#include "nf4.h"

namespace tk {

// The frozen base weight: W [out, in] quantized by nf4_quantize_cpu (flattened row-major, so
// quantization blocks run across row ends when in % block_size != 0).
struct QloraWeight {
  Nf4In q;           // the buffers nf4_quantize_cpu wrote
  Nf4Layout layout;  // nf4_layout(out * in, block_size, double_quant)
  int64_t out = 0, in = 0;
};

struct QloraOptions {
  float scale = 1.0f;    // s, finite
  float dropout = 0.0f;  // p in [0, 1), on the LoRA path only
  uint64_t seed = 0;     // dropout mask key (see above); the same value in forward and backward
};

// Forward. Throws tk::Error on a shape, dtype or argument mismatch.
// x  [..., in]  F32 | BF16 (N = product of the leading dims; N = 0 is allowed)
// A  [r, in]    x's dtype, r >= 1
// B  [out, r]   x's dtype
// y  [..., out] x's dtype, x's leading dims
// xa [..., r]   F32, x's leading dims; or data == nullptr (not saved)
void qlora_forward_cpu(const TensorView& x, const QloraWeight& w, const TensorView& A, const TensorView& B,
                       const QloraOptions& opt, const TensorView& y, const TensorView& xa, ThreadPool& pool);

// Backward: the gradients of the forward above for the upstream gradient dy (the same x, w, A, B,
// opt; xa as the forward wrote it). Throws tk::Error on a shape, dtype or argument mismatch.
// dy [..., out] x's dtype and leading dims
// x  [..., in]  F32 | BF16
// A  [r, in], B [out, r]   x's dtype
// xa [..., r]   F32, from qlora_forward_cpu (required)
// dx [..., in]  x's shape and dtype; or data == nullptr (not computed)
// dA [r, in]    x's dtype
// dB [out, r]   x's dtype
void qlora_backward_cpu(const TensorView& dy, const TensorView& x, const QloraWeight& w, const TensorView& A,
                        const TensorView& B, const TensorView& xa, const QloraOptions& opt, const TensorView& dx,
                        const TensorView& dA, const TensorView& dB, ThreadPool& pool);

// The GEMM B operand that expands an NF4 weight while packing (see above), for tests and for other
// fused ops: op(B) = deq(W)^T (K = cols, N = rows) when trans, else deq(W) (K = rows, N = cols),
// values rounded to `dtype` (the GEMM's ab_dtype, F32 | BF16). `absmax` is the per-block fp32
// absmax (w.q.absmax, or nf4_absmax_cpu's output with double quantization).
struct QloraNf4Source {
  const uint8_t* packed = nullptr;  // [ceil(rows * cols / 2)]
  const float* absmax = nullptr;    // [nblocks]
  int64_t rows = 0, cols = 0;       // W [rows, cols] = [out, in]
  int64_t block_size = 0;           // even, >= 2
  bool trans = false;               // op(B) = deq(W)^T
  DType dtype = DType::F32;
};
// The GemmBSource (for GemmParams::b_source) that packs `src`; src and the buffers it points to
// must outlive every GEMM that uses it.
GemmBSource qlora_nf4_gemm_source(const QloraNf4Source& src);

}  // namespace tk
