// Fused ("flash") attention on CUDA, forward and backward: the CUDA column of the attention op.
// A plain C++ header (no CUDA types: streams travel as void*), so the op table and the tests can
// include it from host code. The contract is cpu/attention.h's, exactly:
//
//   q, o, do, dq   [B, T, H, D]      F32 or BF16, contiguous, on one CUDA device
//   k, v, dk, dv   [B, S, Hkv, D]    F32 or BF16 (k and v share one dtype), H % Hkv == 0
//   lse            [B, H, T]         F32, logsumexp of each query row's scaled, masked scores
//   seg_q [B, T], seg_k [B, S]       optional I32 segment ids (seg_k absent: S == T, seg_q serves)
//   query t sees key s when (!causal || s <= t + (S - T)) && (no segments || seg_q == seg_k);
//   a query that sees no key outputs zeros with lse = -inf and contributes no gradient.
//
// Which kernel runs (attention_kernels.cu explains the design):
//   - q, k, v bf16, D = 64 or 128, 16-byte aligned pointers, compute capability >= 8.0: tensor
//     cores (mma.sync m16n8k16 bf16 -> fp32, FlashAttention-2 tiling). No Hopper-specific
//     (wgmma/TMA) path: sm_90 runs the same sm_80-style kernels.
//   - anything else (f32 storage, any other D, mixed dtypes): a tiled fp32 CUDA-core path.
// Numerics (DESIGN.md): bf16 operands with fp32 accumulation and an fp32 online softmax; lse and
// all row statistics in fp32.
//
// Determinism: o, lse, dk and dv are bitwise reproducible run to run (each element has one owner,
// fixed reduction order; dk/dv of a grouped kv head sum their query heads inside one CTA). dq is
// accumulated with fp32 atomics (FlashAttention-2's choice: no second pass over S and dP), so its
// last bits can vary between runs; the difference is at fp32 rounding level, before the final
// rounding to dq's dtype.
//
// Scratch memory: the backward pass needs delta = rowsum(do * o) and the adjusted lse [B, H, T]
// (8 bytes a row), plus an fp32 dq accumulator [B, T, H, D] when dq is bf16; with segment ids
// both passes need 8 bytes per 64-row tile. It comes from tunekit's own stream-ordered caching
// allocator (the same heap as tk::cuda::allocate, tagged with `stream`), so it is counted in the
// allocator's statistics, reported in its out-of-memory message, and reused from the cache; it is
// released before the call returns, which is safe because the allocator hands a block released on
// a stream only to later work on that same stream.
//
// Errors: shape, dtype and device mismatches throw tk::Error synchronously, naming the op and the
// shapes; a failed launch throws tk::Error naming the kernel. Everything else is asynchronous on
// `stream` (a cudaStream_t; nullptr is the legacy default stream).
#pragma once

#include "../core/tensor.h"
#include "../cpu/attention.h"

namespace tk {

// o = attention(q, k, v), lse = per-row logsumexp. Shapes and dtypes as above; o has q's dtype.
void attention_forward_cuda(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* seg_q,
                            const TensorView* seg_k, const AttentionOptions& opt, const TensorView& o,
                            const TensorView& lse, void* stream);

// Gradients of attention_forward_cuda for the output gradient dout (q's dtype and shape). o and lse
// are the forward pass's outputs for the same q, k, v, segments and options. Overwrites dq (q's
// dtype), dk and dv (k's dtype).
void attention_backward_cuda(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView& lse, const TensorView* seg_q,
                             const TensorView* seg_k, const AttentionOptions& opt, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, void* stream);

}  // namespace tk
