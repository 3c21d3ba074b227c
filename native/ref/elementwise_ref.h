// Naive references for the elementwise kernels (cpu/elementwise.h): the oracle of the native
// tests, never used for speed. Everything is computed in double, element by element, by walking
// multi-indices in row-major order and reading inputs through their strides, with no blocking,
// no coalescing and no SIMD, so that the code is obviously right rather than fast. Each function
// returns the output as doubles in row-major order of the output shape.
//
// Rounding to a storage dtype is implemented here independently of core/dtype.h (by scaling to
// the target's quantum and rounding to nearest even in double), so the tests also check the
// conversions the kernels share.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"
#include "../cpu/elementwise.h"

namespace tk::ref {

// Element `flat` (row-major over v's shape) of v, read through v's strides, widened to double.
double load(const TensorView& v, int64_t flat);
// All elements of v, row-major.
std::vector<double> read(const TensorView& v);

// The value a tensor of dtype t holds after a kernel stores v: floats round to nearest even
// through fp32 (f16/bf16 round the fp32 value again), overflowing to infinity; integers truncate
// toward zero and saturate; NaN stays NaN for floats and becomes 0 for integers.
double store_as(DType t, double v);
std::vector<double> store_as(DType t, const std::vector<double>& v);

// a (op) b for a, b of one shape (strides may be 0). Floats: exact double arithmetic (the test
// rounds to the output dtype). I32: int64 arithmetic wrapped to int32, the kernel's semantics.
std::vector<double> binary(BinaryOp op, const TensorView& a, const TensorView& b);
// alpha * x in double.
std::vector<double> scale(const TensorView& x, double alpha);
// Sum over the axes in axes_mask, in double; the result has x's rank with reduced dims of size
// 1. I32 sums are wrapped to int32 like the kernel's.
std::vector<double> sum(const TensorView& x, uint32_t axes_mask);
// src converted to dtype dst, exactly as dst holds it (store_as of each element).
std::vector<double> cast(const TensorView& src, DType dst);
// mean + stddev * z_i for i in [0, n), with z_i from the Philox stream of core/rng.h and
// Box-Muller evaluated in double on the same 24-bit uniforms.
std::vector<double> randn(int64_t n, uint64_t seed, double mean, double stddev);
// Inverted dropout from the Philox words directly (not through rng.h's dropout_keep).
std::vector<double> dropout(const std::vector<double>& x, double p, uint64_t seed);

}  // namespace tk::ref
