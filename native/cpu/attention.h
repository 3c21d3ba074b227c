// Fused ("flash-style") scaled dot-product attention on the CPU, forward and backward.
//
// Shapes (all contiguous, row-major):
//   q, o, do, dq   [B, T, H, D]      F32 or BF16 storage, fp32 compute
//   k, v, dk, dv   [B, S, Hkv, D]    F32 or BF16 storage (k and v share one dtype)
//   lse            [B, H, T]         F32: logsumexp of each query row's scaled, masked scores
//   seg_q          [B, T] I32        optional segment (packed document) id of each query
//   seg_k          [B, S] I32        optional segment id of each key; when absent and seg_q is
//                                    given, S must equal T and seg_q serves keys too
// Grouped-query attention: H % Hkv == 0 and query head h reads kv head h / (H / Hkv).
//
// Which keys a query sees: query t sees key s when
//   (!causal || s <= t + (S - T))        the last query aligns with the last key (KV-cache style)
//   && (no segments || seg_q[b, t] == seg_k[b, s]).
// A query that sees no key outputs zeros and gets lse = -inf; its backward contributes nothing
// (dq row = 0, nothing added to dk/dv), never NaN.
//
// Math (scale defaults to 1/sqrt(D)): s = scale * q.k, p = softmax(s over visible keys),
// o = p v, lse = log(sum exp(s)). Backward: delta = rowsum(do * o), dp = do v^T,
// ds = p * (dp - delta), dq = scale * ds k, dk = scale * ds^T q, dv = p^T do; dk/dv of a kv head
// sum over its group of query heads.
//
// Results are deterministic and independent of the number of threads: every output element is
// produced by exactly one task, in a fixed order.
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

struct AttentionOptions {
  bool causal = true;
  float scale = 0.0f;  // 0 means 1/sqrt(D); any other finite value is used as given
};

// o = attention(q, k, v), lse = per-row logsumexp (saved for the backward pass).
// q [B, T, H, D] (F32/BF16), k, v [B, S, Hkv, D] (F32/BF16, one dtype), seg_q [B, T] I32 or
// nullptr, seg_k [B, S] I32 or nullptr (see above), o [B, T, H, D] with q's dtype, lse [B, H, T]
// F32. Throws tk::Error on a shape or dtype mismatch.
void attention_forward_cpu(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* seg_q,
                           const TensorView* seg_k, const AttentionOptions& opt, const TensorView& o,
                           const TensorView& lse, ThreadPool& pool);

// Gradients of attention_forward_cpu. dout, o [B, T, H, D] with q's dtype; lse [B, H, T] F32 as
// written by the forward pass (same q, k, v, segments and options); dq [B, T, H, D] with q's
// dtype; dk, dv [B, S, Hkv, D] with k's dtype. Accumulates in fp32 and overwrites dq, dk, dv.
void attention_backward_cpu(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& o, const TensorView& lse, const TensorView* seg_q,
                            const TensorView* seg_k, const AttentionOptions& opt, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, ThreadPool& pool);

}  // namespace tk
