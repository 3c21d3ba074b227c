// Elementwise and reduction basics the autograd layer is built from: broadcast binary ops,
// scaling, sums over axes, dtype casts fused with strided (permute/transpose) copies, fills and
// seeded normal samples. 16-bit floats are widened to fp32 to compute and rounded to nearest even
// on store. Every kernel writes a contiguous `out`; inputs may be strided (stride 0 = broadcast).
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

enum class BinaryOp : uint8_t { Add, Sub, Mul };

// out = a (op) b. a and b are already expanded to out's shape (stride 0 on broadcast dims);
// all three share one dtype: F32, BF16, F16 or I32. out is contiguous.
void binary_cpu(BinaryOp op, const TensorView& a, const TensorView& b, const TensorView& out, ThreadPool& pool);

// out = alpha * x. x and out contiguous, same shape and floating dtype.
void scale_cpu(const TensorView& x, float alpha, const TensorView& out, ThreadPool& pool);

// out = sum of x over the axes set in axes_mask (bit i = axis i). out has x's rank with size 1
// on reduced axes, is contiguous, and has x's dtype. Floats accumulate in fp32 (pairwise, so the
// error grows with log n), I32 in int64 then wraps to int32.
void sum_cpu(const TensorView& x, uint32_t axes_mask, const TensorView& out, ThreadPool& pool);

// dst = cast(src) elementwise, with src read through its strides (any permutation or broadcast)
// and dst contiguous of the same shape. Any dtype to any dtype: floats to ints truncate toward
// zero and saturate to the target range, NaN becomes 0.
void copy_cpu(const TensorView& src, const TensorView& dst, ThreadPool& pool);

// out = the inputs joined along `axis`: inputs[count] and out contiguous, one dtype, equal sizes
// on every other axis; out's size on `axis` is the sum of theirs.
void concat_cpu(const TensorView* inputs, int count, int axis, const TensorView& out, ThreadPool& pool);

// out[:] = value (rounded to out's dtype).
void fill_cpu(const TensorView& out, double value, ThreadPool& pool);

// out[i] = mean + std * z_i with z_i ~ N(0, 1) from a counter-based generator (core/rng.h):
// element i depends only on (seed, i), so results do not depend on thread count or device.
void randn_cpu(const TensorView& out, uint64_t seed, float mean, float std, ThreadPool& pool);

// Inverted dropout: out[i] = dropout_keep(seed, i, p) ? x[i] / (1 - p) : 0 (core/rng.h), p in [0, 1).
// x, out: same shape, one floating dtype, contiguous; out may alias x. The gradient is the same
// call on the upstream gradient with the same seed.
void dropout_cpu(const TensorView& x, float p, uint64_t seed, const TensorView& out, ThreadPool& pool);

}  // namespace tk
