// CPU kernels for the Llama block's cheap-but-everywhere ops: RMSNorm, SwiGLU and the token
// embedding, forward and backward (llm.c style: one function per pass, shapes on every signature).
//
// Conventions shared by every kernel here:
// - Tensors are TensorViews on the CPU, contiguous. Floating tensors are F32 or BF16; BF16 is a
//   storage format only: values are widened to fp32, computed in fp32, and rounded to nearest
//   even once, on the store.
// - Shapes are checked and violations throw tk::Error naming the kernel, the operand and its
//   shape/dtype. All checks (embedding ids included) happen before any output is written, so a
//   rejected call leaves its outputs untouched.
// - Results do not depend on the thread count or on the ISA path beyond fp32 rounding (the SIMD
//   paths use FMA and a polynomial exp; the portable path plain multiply-add and std::exp).
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

// RMSNorm forward (Llama / Hugging Face semantics, computed in fp32):
//   rstd[n] = 1 / sqrt(mean_d(x[n, d]^2) + eps)
//   y[n, d] = x[n, d] * rstd[n] * weight[d]          (one rounding to y's dtype, at the store)
// x:      [..., D]  F32 | BF16; all leading dims together are the N rows; D >= 1
// weight: [D]       x's dtype
// y:      [..., D]  x's dtype and shape (may alias x)
// rstd:   N elements F32 (any shape with numel N), saved for the backward pass
// (HF's LlamaRMSNorm rounds x*rstd to the input dtype before multiplying by the weight; for F32
// the two agree, for BF16 this kernel rounds once instead of twice.)
void rms_norm_forward_cpu(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                          const TensorView& rstd, ThreadPool& pool);

// RMSNorm backward. With xhat = x * rstd and g = dy * weight:
//   dx[n, d]   = rstd[n] * g[n, d] - rstd[n]^3 * x[n, d] * mean_d(g[n, :] * x[n, :])
//   dweight[d] = sum_n dy[n, d] * xhat[n, d]
// dy:      [..., D]  x's dtype and shape
// x:       [..., D]  F32 | BF16 (the forward input)
// weight:  [D]       x's dtype
// rstd:    N elements F32 (from rms_norm_forward_cpu)
// dx:      [..., D]  x's dtype (may alias dy)
// dweight: [D]       F32, overwritten (not accumulated into)
// dweight is deterministic for any thread count: rows are cut into parts whose size depends only
// on N, each part sums its rows in order into its own fp32 buffer, and the parts are added in
// part order.
void rms_norm_backward_cpu(const TensorView& dy, const TensorView& x, const TensorView& weight,
                           const TensorView& rstd, const TensorView& dx, const TensorView& dweight,
                           ThreadPool& pool);

// SwiGLU forward: out = silu(gate) * up, silu(g) = g * sigmoid(g).
// gate, up, out: same shape (any rank, treated as flat [n]), one dtype F32 | BF16; out may alias.
// sigmoid is evaluated as 1 / (1 + e) or e / (1 + e) with e = exp(-|g|) <= 1, so no intermediate
// overflows for any finite g. (silu(+inf) = inf; silu(-inf) = -inf * 0 = NaN, as in PyTorch.)
void swiglu_forward_cpu(const TensorView& gate, const TensorView& up, const TensorView& out, ThreadPool& pool);

// SwiGLU backward, with s = sigmoid(gate):
//   dup   = dout * silu(gate)
//   dgate = dout * up * s * (1 + gate * (1 - s))
// dout, gate, up, dgate, dup: same shape (flat [n]), one dtype F32 | BF16. dgate and dup must not
// alias each other; either may alias dout.
void swiglu_backward_cpu(const TensorView& dout, const TensorView& gate, const TensorView& up,
                         const TensorView& dgate, const TensorView& dup, ThreadPool& pool);

// Embedding lookup: out[n, :] = table[ids[n], :].
// ids:   [...]     I32, N elements in total; every id must be in [0, V)
// table: [V, D]    F32 | BF16
// out:   [..., D]  table's dtype, ids' shape with D appended (any shape with numel N*D is taken)
// An id outside [0, V) throws tk::Error naming its position, its value and V; nothing is read
// out of bounds and nothing is written.
void embedding_forward_cpu(const TensorView& ids, const TensorView& table, const TensorView& out, ThreadPool& pool);

// Embedding backward: dtable = 0, then dtable[ids[n], :] += dout[n, :] for n = 0 .. N-1.
// dout:   [..., D]  F32 | BF16, N*D elements
// ids:    [...]     I32, N elements, each in [0, V) (checked as in the forward pass)
// dtable: [V, D]    F32, overwritten
// Threads own disjoint column ranges of dtable and walk all ids in order, so there are no races
// and every element sums its contributions in ascending n: bitwise identical for any thread count.
void embedding_backward_cpu(const TensorView& dout, const TensorView& ids, const TensorView& dtable,
                            ThreadPool& pool);

}  // namespace tk
