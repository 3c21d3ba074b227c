// CUDA elementwise and reduction basics: the device column of cpu/elementwise.h, with the same
// contracts (shapes, dtypes, rounding, saturation, the Philox streams) so that the op table can
// hand either device the same TensorViews. A plain C++ header: the op table and the tests are
// compiled by the host compiler, so no CUDA type appears here and streams travel as void*
// (a cudaStream_t). Every TensorView is device memory of one CUDA device (view.device.index).
//
// Design (everything here is memory-bound, so the figure of merit is bytes moved per element and
// the number of passes):
// - One pass per op. Contiguous operands take a flat path: each thread moves 8 elements with
//   128-bit loads and stores (two for f32) when every pointer is 16-byte aligned, otherwise one
//   element at a time; grid-stride loops over a grid of about 8 blocks of 256 threads per SM, which
//   is enough resident warps to cover DRAM latency and lets one launch cover any size.
// - Strided operands (broadcasts, permutations) are first coalesced on the host exactly as the CPU
//   kernels do (size-1 dims dropped, neighbours contiguous in every operand merged), so a
//   broadcast [N, D] + [D] is a 2-D walk and a contiguous tensor of any rank is flat. What stays
//   strided is indexed per element with 32-bit division when the size allows it. A copy whose
//   source is contiguous along a non-last dim (a transpose or head permute) goes through 32 x 32
//   shared-memory tiles, so both the reads and the writes are coalesced.
// - 16-bit floats are computed in fp32 and rounded once on store with the integer rule of
//   core/dtype.h (nearest even, NaN kept quiet, subnormals kept), so results match the CPU bit
//   for bit wherever the arithmetic is the same single operation (binary, scale, casts, fill,
//   dropout, concat).
// - Sums accumulate in fp32 (int64 for i32) in an order fixed by the shape alone: each output's
//   reduced range is cut into a number of splits that depends only on (outputs, reduced count),
//   each split is summed by one warp (or one column of threads, when the kept innermost dim is
//   the contiguous one, so that neighbouring threads read neighbouring outputs) in a fixed lane
//   order and the splits are added in split order by a second pass. Reductions of at most 32
//   elements take one thread per output instead. No float atomics, so the bytes are the same
//   on every run and every device. The split partials live in scratch memory from the
//   stream-ordered allocator (released on the same stream, so reuse is ordered after the kernels).
// - randn: the Philox words and uniforms are those of core/rng.h (shared TK_HOST_DEVICE code), so
//   the stream is the CPU's. The transcendental step (log, cos, sin of fp32 arguments) is
//   evaluated in double and rounded once to fp32, i.e. correctly rounded: over all 2^24 possible
//   uniforms no double result lies within 7 double ulps of an fp32 rounding boundary, so any
//   double log/sin/cos accurate to 2 ulps (CUDA's are) gives these exact fp32 values. The CPU
//   kernel calls the host libm's logf/sinf/cosf instead, which are not correctly rounded
//   everywhere (glibc 2.36 differs from the correctly rounded value by one ulp on 0.7% of the
//   uniforms for logf and 1.3% for sinf/cosf), so CUDA and CPU samples agree bit for bit except for
//   those, which differ by an ulp or two. Dropout has no transcendental step and is bit-identical.
#pragma once
#include <cstdint>

#include "../core/tensor.h"
#include "../cpu/elementwise.h"  // BinaryOp

namespace tk {

// out = a (op) b. a, b: out's shape with any strides (0 on broadcast dims); out contiguous; one
// dtype F32 | BF16 | F16 | I32 (i32 wraps modulo 2^32).
// a [...], b [...], out [...]
void binary_cuda(BinaryOp op, const TensorView& a, const TensorView& b, const TensorView& out, void* stream);

// out = alpha * x. x, out contiguous, same shape and floating dtype; out may alias x.
// x [...], out [...]
void scale_cuda(const TensorView& x, float alpha, const TensorView& out, void* stream);

// out = sum of x over the axes in axes_mask (bit i = axis i); out has x's rank with size 1 on the
// reduced axes, is contiguous and has x's dtype (F32 | BF16 | F16 | I32). fp32 accumulation for
// floats, int64 wrapped to int32 for I32; deterministic (see the header comment).
// x [...] any strides, out [...] with reduced dims 1
void sum_cuda(const TensorView& x, uint32_t axes_mask, const TensorView& out, void* stream);

// dst = cast(src) elementwise, src read through its strides (permutes, broadcasts), dst contiguous
// with src's shape. Any of f32/bf16/f16/i32/u8 to any: floats go through fp32, floats to ints
// truncate toward zero and saturate (NaN -> 0), ints to ints saturate.
// src [...] any strides, dst [...]
void copy_cuda(const TensorView& src, const TensorView& dst, void* stream);

// out = inputs[0..count) joined along `axis`: all contiguous, one dtype, equal sizes off `axis`.
// inputs[i] [..., n_i, ...], out [..., sum n_i, ...]
void concat_cuda(const TensorView* inputs, int count, int axis, const TensorView& out, void* stream);

// out[:] = value, rounded as a cast would (through fp32 for floats, saturating for ints).
// out [...] contiguous, any dtype
void fill_cuda(const TensorView& out, double value, void* stream);

// out[i] = mean + stddev * z_i, z_i the Philox/Box-Muller sample i of `seed` (core/rng.h).
// out [...] contiguous, floating dtype
void randn_cuda(const TensorView& out, uint64_t seed, float mean, float stddev, void* stream);

// Inverted dropout: out[i] = dropout_keep(seed, i, p) ? x[i] / (1 - p) : 0, p in [0, 1); the
// gradient is the same call on the upstream gradient with the same seed. out may alias x.
// x [...], out [...] contiguous, one floating dtype, same element count
void dropout_cuda(const TensorView& x, float p, uint64_t seed, const TensorView& out, void* stream);

}  // namespace tk
