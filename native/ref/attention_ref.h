// Naive reference for cpu/attention: the oracle of the native tests, never used for speed.
//
// Everything is double. For each (b, h) the full [T, S] score matrix is materialized, masked
// (causal with the last query aligned to the last key, and segment ids), softmaxed and multiplied
// out; the backward pass goes through the same materialized matrices (dv = p^T do,
// dp = do v^T, ds = p * (dp - rowsum(p * dp)), dq = scale ds k, dk = scale ds^T q), so it shares
// no code and no formula shortcut (delta = rowsum(do * o), lse) with the fused kernels.
#pragma once
#include <cstdint>
#include <vector>

namespace tk::ref {

struct AttentionShape {
  int64_t B = 1, T = 1, S = 1, H = 1, Hkv = 1, D = 1;
  double scale = 1.0;                // used as given (callers resolve the 1/sqrt(D) default)
  bool causal = true;                // query t sees key s <= t + (S - T)
  const int32_t* seg_q = nullptr;    // [B, T] or null (no segments)
  const int32_t* seg_k = nullptr;    // [B, S]; must be set when seg_q is (may equal seg_q if S == T)
};

// q [B, T, H, D], k, v [B, S, Hkv, D] (row-major doubles) -> o [B, T, H, D], lse [B, H, T]
// (-inf for a query that sees no key; its o row is 0).
void attention_forward(const AttentionShape& a, const std::vector<double>& q, const std::vector<double>& k,
                       const std::vector<double>& v, std::vector<double>* o, std::vector<double>* lse);

// Gradients of attention_forward for the output gradient dout [B, T, H, D]:
// dq [B, T, H, D], dk, dv [B, S, Hkv, D].
void attention_backward(const AttentionShape& a, const std::vector<double>& dout, const std::vector<double>& q,
                        const std::vector<double>& k, const std::vector<double>& v, std::vector<double>* dq,
                        std::vector<double>* dk, std::vector<double>* dv);

}  // namespace tk::ref
