// CUDA kernels for the Llama block's cheap-but-everywhere ops: RMSNorm, SwiGLU, the token
// embedding and RoPE, forward and backward. The device column of cpu/norm.h and cpu/rope.h, with
// their contracts (shapes, dtypes, aliasing, rounding once to bf16 on store) unless a difference
// is stated below. A plain C++ header (the op table and the tests include it from host code):
// streams are void* (a cudaStream_t) and every TensorView is device memory of one CUDA device.
//
// Design (all memory-bound: the aim is one pass over the bytes each op must move):
// - RMSNorm: one block per row (grid-stride over rows), each thread owning fixed 8-element groups
//   of the row, read with 128-bit loads when D % 8 == 0 and the pointers are aligned. The first
//   pass keeps its groups in registers while the block reduces the row (sum of squares, or the
//   backward dot product), so the second pass does not read them again: 4 groups a thread in the
//   forward pass (rows up to 16K elements at 512 threads), 2 in the backward pass, which keeps x
//   and dy (8K elements; 64 registers of cache leave room for 2 blocks of 512 threads per SM).
//   Longer rows re-read the rest, mostly from L2. The block size is the row's group count rounded
//   up to a power of two (32..512), so short rows do not idle threads.
//   Bytes: forward reads x and writes y (4 bytes an element in bf16), backward reads x and dy and
//   writes dx (6 bytes). rstd is computed with IEEE division and square root, as on the CPU.
// - dweight without atomics: rows are cut into parts whose size depends on N only; a block owns a
//   part and accumulates dy * xhat for its columns in shared memory (each thread always touches
//   the same columns, so no synchronization), writes its part's row of partial sums, and a second
//   kernel adds the parts in part order. Deterministic and independent of the device.
// - SwiGLU: flat, 8 elements a thread with 128-bit accesses; sigmoid from e = exp(-|g|) as on the
//   CPU (no overflow for any finite g).
// - Embedding backward, deterministic without sorting: one warp owns a tile of 128 (or 32)
//   columns for the ids of one residue class v % R; it scans all ids in order (32 at a time, a
//   ballot picks its own) and adds the matching dout rows into dtable. Every dtable element is
//   therefore owned by one lane and summed in ascending n from zero, exactly the CPU's order: the
//   result is bitwise identical to embedding_backward_cpu. R is chosen from the SM count for
//   occupancy; it changes who adds, never the order.
// - RoPE: a block handles one position's row(s): it evaluates the D/2 cos/sin pairs once (angle
//   and trig in double, rounded to fp32 as on the CPU) into shared memory, then rotates every head
//   (and, for shared positions, several batch rows) with 128-bit loads of both halves. Each thread
//   reads both halves of its pairs before writing, so out may alias x. The multiply-adds are the
//   CPU SIMD paths' FMAs, written explicitly.
//
// Differences from the CPU contracts, all because the data live on the device and checking them
// would cost a device-to-host synchronization:
// - Embedding ids are not range-checked before launch. An id outside [0, V) reads and writes
//   nothing out of bounds: the forward pass fills that output row with NaN (so the mistake shows
//   in the loss instead of training on zeros) and the backward pass ignores it. The op layer checks
//   ids on the host before they are uploaded.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tk {

// y = x * rstd * weight, rstd[n] = 1 / sqrt(mean_d(x[n, :]^2) + eps) (cpu/norm.h).
// x [..., D] F32 | BF16, weight [D] x's dtype, y [..., D] x's dtype (may alias x), rstd [N] F32.
void rms_norm_forward_cuda(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                           const TensorView& rstd, void* stream);

// dx = rstd * dy * w - rstd^3 * x * mean(dy * w * x); dweight = sum_n dy * x * rstd (overwritten).
// dy [..., D], x [..., D] F32 | BF16, weight [D], rstd [N] F32, dx [..., D] (may alias dy),
// dweight [D] F32.
void rms_norm_backward_cuda(const TensorView& dy, const TensorView& x, const TensorView& weight,
                            const TensorView& rstd, const TensorView& dx, const TensorView& dweight, void* stream);

// out = silu(gate) * up.
// gate [n], up [n], out [n] (any rank, flat): one dtype F32 | BF16; out may alias either input.
void swiglu_forward_cuda(const TensorView& gate, const TensorView& up, const TensorView& out, void* stream);

// dup = dout * silu(gate), dgate = dout * up * s * (1 + gate * (1 - s)), s = sigmoid(gate).
// dout [n], gate [n], up [n], dgate [n], dup [n]: one dtype F32 | BF16; dgate and dup distinct,
// either may alias dout.
void swiglu_backward_cuda(const TensorView& dout, const TensorView& gate, const TensorView& up,
                          const TensorView& dgate, const TensorView& dup, void* stream);

// out[n, :] = table[ids[n], :] (a NaN row for an id outside [0, V), see above).
// ids [...] I32 (N elements), table [V, D] F32 | BF16, out [..., D] table's dtype (N * D elements).
void embedding_forward_cuda(const TensorView& ids, const TensorView& table, const TensorView& out, void* stream);

// dtable = 0, then dtable[ids[n], :] += dout[n, :] in ascending n (ids outside [0, V) skipped).
// dout [..., D] F32 | BF16 (N * D elements), ids [...] I32 (N), dtable [V, D] F32.
void embedding_backward_cuda(const TensorView& dout, const TensorView& ids, const TensorView& dtable, void* stream);

// out = rope(x) with the frequencies and attention factor of rope_inv_freq() (cpu/rope.h), which
// are computed on the host and passed by value (D <= 1024).
// x [B, T, H, D] F32 | BF16 contiguous, positions [T] (shared) or [B, T] (positions_per_batch)
// I32, inv_freq D/2 entries, out [B, T, H, D] x's dtype (may be x itself).
void rope_forward_cuda(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                       const std::vector<float>& inv_freq, float attention_factor, const TensorView& out,
                       void* stream);

// dx = rope^T(dy): rotation by -angle times the attention factor. Same shapes as the forward pass.
void rope_backward_cuda(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                        const std::vector<float>& inv_freq, float attention_factor, const TensorView& dx,
                        void* stream);

}  // namespace tk
