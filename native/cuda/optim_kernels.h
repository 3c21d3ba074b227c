// The optimizer step on CUDA: fused multi-tensor AdamW, the global gradient norm and clipping,
// with cpu/optim.h's semantics (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_) and its
// descriptor structs. A plain C++ header (host code includes it); streams are void* (a
// cudaStream_t). Work runs on the calling thread's current CUDA device, which a CUDA queue task
// has already made current.
//
// Design:
// - Tensor lists are device arrays of the CPU's descriptors (AdamWTensor, GradTensor: device
//   pointers, sizes, dtypes), uploaded once by the caller and reused every step, so a step is one
//   launch whatever the number of tensors, with nothing copied from the host. Each list is cut
//   into chunks of a fixed number of elements; blocks take chunks round-robin. A block finds its
//   chunks by scanning the sizes 32 descriptors at a time (one warp prefix sum each), so the host
//   never needs the sizes and the lookup costs O(count / 32) per block.
// - AdamW is one pass: 8 elements a thread with 128-bit loads of p, g, m and v where aligned
//   (28 bytes an element for f32 params and grads, 24 with bf16 ones). The per-step constants are
//   folded on the host in double exactly as on the CPU, and every multiply-add is the explicit
//   FMA the CPU's AVX2/AVX-512 paths use, so the CUDA step is bitwise equal to those paths.
// - Gradient norm: fp64 accumulation of fp32 squares (exact products; only additions round), in
//   two passes: a fixed grid of 512 blocks each reduce their chunks in a fixed order into one
//   partial, then one block adds the partials in a fixed tree. The order depends only on the
//   list, so the result is the same bytes on every run and every device; no atomics.
// - Clipping never synchronizes the host: the norm pass can also write the clip coefficient to
//   device memory, and both scale_grads_cuda and adamw_step_multi_cuda read a device coefficient.
//   Passing it to AdamW (which multiplies g by grad_scale * coef, the CPU's
//   `AdamWParams::grad_scale *= coef`) saves the separate scaling pass entirely.
//
// What cannot be checked on the host: the contents of a device list. Run check_adamw_list_cuda /
// check_grad_list_cuda on the host copy before uploading it (the CPU's checks); a descriptor with a
// dtype other than F32/BF16 that reaches a kernel anyway is skipped, never misread.
#pragma once
#include <cstdint>

#include "../cpu/optim.h"

namespace tk {

// The CPU's per-tensor checks (sizes >= 0, f32/bf16 dtypes, non-null buffers) on a host list.
// host_list [count]
void check_adamw_list_cuda(const AdamWTensor* host_list, int64_t count);
void check_grad_list_cuda(const GradTensor* host_list, int64_t count);

// One AdamW step over every tensor of the device list.
// tensors: device array [count] AdamWTensor (param [n] f32|bf16, grad [n] f32|bf16, m, v [n] f32).
// grad_coef: nullptr, or a device float multiplied into hp.grad_scale (g = grad * (grad_scale * coef)).
// Throws on the hyperparameter checks of adamw_step_cpu.
void adamw_step_multi_cuda(const AdamWTensor* tensors, int64_t count, const AdamWParams& hp, const float* grad_coef,
                           void* stream);

// *norm_sq = sum of squares of every element of every gradient (fp64, deterministic), and, when
// clip_coef is not null, *clip_coef = clip_coefficient(sqrt(*norm_sq), max_norm) (fp32, as
// cpu/optim.h's clip_coefficient: min(1, max_norm / (total_norm + 1e-6)), NaN stays NaN).
// grads: device array [count] GradTensor; norm_sq: device double [1]; clip_coef: device float [1].
void grad_norm_sq_cuda(const GradTensor* grads, int64_t count, double* norm_sq, float* clip_coef, double max_norm,
                       void* stream);

// g = g * (*coef) in place for every gradient (fp32 multiply, bf16 rounded to nearest even).
// When *coef == 1 (no clipping this step) the kernel returns at once and the gradients keep their
// bytes (the CPU multiplies by 1, which leaves every value unchanged too).
// grads: device array [count] GradTensor; coef: device float [1].
void scale_grads_cuda(const GradTensor* grads, int64_t count, const float* coef, void* stream);

}  // namespace tk
