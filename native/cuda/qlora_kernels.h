// QLoRA linear layer on CUDA, forward and backward: the GPU column of cpu/qlora.h, with the same
// contract (shapes, dtypes, dropout mask, what is saved, the order of roundings), device tensors
// and the stream (a cudaStream_t as void*) in place of the thread pool.
//
//   y  = x deq(W)^T + s (drop(x) A^T) B^T
//   x [N, in]   W [out, in] NF4 (frozen)   A [r, in]   B [out, r]   y [N, out]
//
// Where dequantization happens, and the memory it costs. The CPU GEMM expands NF4 while it packs
// B panels; cuBLASLt takes only dense operands, so here W is dequantized into a dense scratch
// tile in x's dtype (bf16 for bf16 activations: exactly the effective weight of the CPU kernel, a
// bf16 rounding of one fp32 product) by nf4_kernels' vectorized dequantizer, and cuBLASLt
// multiplies with it. Materializing the whole of deq(W) per call would cost 2 bytes per weight
// (4 times the NF4 weight itself: 470 MiB for an 8192 x 28672 Llama-70B MLP matrix); instead W
// is taken in chunks, so scratch stays below a bound (64 MiB by default, `scratch_bytes` to
// change it):
//   forward   y[:, o0:o1]  = x W[o0:o1, :]^T (+ the LoRA term already in y): chunks of W's OUTPUT
//             rows, each a contiguous run of the flattened NF4 weight, each GEMM with full K.
//   backward  dx[:, i0:i1] = dy W[:, i0:i1]  (+ the LoRA term already in dx): chunks of W's
//             COLUMNS, so each GEMM still has the full K = out and the bf16 output is rounded
//             once (chunks along K would round a bf16 dx once per chunk).
// Chunks are multiples of 64 rows / columns (at least 64, and all of W when it fits), so every
// GEMM is large enough to run cuBLASLt's tiles at speed: with in = 8192 a 64 MiB bf16 chunk is
// 4096 rows. The dequantization is a memory-bound pass over the chunk (2.5 bytes of traffic per
// element for bf16) issued on the same stream just before its GEMM; the chunk is then reused for
// every row of x, like the CPU's packed panels. Against the GEMM's 2N flops per weight element
// that is an overhead of roughly (2.5 B / memory bandwidth) / (2N / tensor-core rate): on the
// order of 15% at N = 2048 tokens on an H100, shrinking as 1/N (an estimate from the datasheet
// rates; cuda_qlora_perf measures it). Each call dequantizes again (the backward too): nothing
// but the NF4 bytes stays resident.
//
// The rest, as in cpu/qlora.h (each product one gemm_cuda call, fp32 compute):
//   forward   xa = c (keep * x) A^T          [N, r] fp32, saved (c = 1 / (1 - p) as GEMM alpha)
//             y  = s xa B^T                  (B widened to fp32; rounded to y's dtype)
//             y  = x deq(W)^T + 1 * y        (chunked, beta 1: bf16(base + bf16(lora)))
//   backward  g  = dy B                      [N, r] fp32
//             dB = s dy^T xa                 (bf16 dy widened to fp32 a row chunk at a time,
//                                            accumulated in fp32, rounded once)
//             dA = s c g^T (keep * x)        (likewise, with keep * x formed per row chunk)
//             dx = s c keep * (g A) + dy deq(W)   (LoRA term in dx's dtype, dropped elements
//                                            zeroed, then the chunked GEMMs with beta 1)
// The dropout mask is core/rng.h's dropout_keep(seed, e, p) for element e of x (row-major over
// all of x): the same mask as qlora_forward_cpu and dropout_cpu, regenerated in the backward
// pass. Results match the CPU kernels to fp32 accumulation-order differences (and, for bf16
// outputs, the rare rounding those flip), not bit for bit: cuBLASLt sums in its own order.
//
// Scratch (the W chunk, widened or masked row chunks, g, fp32 accumulators, a temporary xa when
// none is saved) comes from tunekit's stream-ordered caching allocator and returns to it when the
// call has issued its work. Arguments are checked (tk::Error) before anything is issued. Work runs
// on x's device (made current) asynchronously on `stream`; QloraWeight's buffers are device
// memory of that device.
#pragma once
#include <cstddef>

#include "../core/tensor.h"
#include "../cpu/qlora.h"

namespace tk {

// Default bound on the dequantized-W chunk and on each widened row chunk, in bytes.
constexpr size_t kQloraCudaScratchBytes = size_t(64) << 20;

// Forward. Throws tk::Error on a shape, dtype, device or argument mismatch.
// x  [..., in]  F32 | BF16, CUDA (N = product of the leading dims; N = 0 is allowed)
// A  [r, in]    x's dtype, r >= 1
// B  [out, r]   x's dtype
// y  [..., out] x's dtype, x's leading dims
// xa [..., r]   F32, x's leading dims; or data == nullptr (not saved)
// scratch_bytes: bound on the W chunk (0: kQloraCudaScratchBytes)
void qlora_forward_cuda(const TensorView& x, const QloraWeight& w, const TensorView& A, const TensorView& B,
                        const QloraOptions& opt, const TensorView& y, const TensorView& xa, void* stream,
                        size_t scratch_bytes = 0);

// Backward for the upstream gradient dy (the same x, w, A, B, opt; xa as the forward wrote it).
// dy [..., out] x's dtype and leading dims
// x  [..., in]  F32 | BF16
// A  [r, in], B [out, r]   x's dtype
// xa [..., r]   F32, from qlora_forward_cuda (required)
// dx [..., in]  x's shape and dtype; or data == nullptr (not computed)
// dA [r, in]    x's dtype (overwritten)
// dB [out, r]   x's dtype (overwritten)
void qlora_backward_cuda(const TensorView& dy, const TensorView& x, const QloraWeight& w, const TensorView& A,
                         const TensorView& B, const TensorView& xa, const QloraOptions& opt, const TensorView& dx,
                         const TensorView& dA, const TensorView& dB, void* stream, size_t scratch_bytes = 0);

}  // namespace tk
