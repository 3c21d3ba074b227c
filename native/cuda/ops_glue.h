// Small CUDA kernels the op table needs around the kernel families: scaling a tensor in place by a
// scalar that exists only on the device (an upstream gradient), and turning the gradient-norm
// pass's fp64 sum of squares into the f32 norm tk.optim.clipGradNorm returns. A plain C++ header.
#pragma once
#include "../core/tensor.h"

namespace tk {

// x *= *s in place; x f32|bf16 contiguous, s one device f32.
void scale_by_device_scalar_cuda(const TensorView& x, const float* s, void* stream);

// *norm = float(sqrt(*norm_sq)); both device pointers.
void norm_from_square_cuda(const double* norm_sq, float* norm, void* stream);

}  // namespace tk
