// The optimizer step on the CPU: fused AdamW (torch.optim.AdamW semantics, decoupled weight decay)
// and global gradient-norm clipping (torch.nn.utils.clip_grad_norm_).
//
// AdamW, per element, with g = grad * grad_scale and t = step (counting from 1):
//   p = p * (1 - lr * weight_decay)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// which is PyTorch's update (m_hat / (sqrt(v_hat) + eps) written the way torch evaluates it).
// Parameters are an fp32 master copy (F32) or BF16 parameters; gradients F32 or BF16; m and v are
// always F32. Everything is computed in fp32; a BF16 parameter is widened, updated in fp32 and
// rounded once to nearest even when stored (torch rounds after the decay and again after the
// update). grad_scale multiplies g before anything else: pass a clip coefficient or 1/loss_scale
// there instead of rescaling the gradients in a separate pass.
//
// Clipping: total_norm = sqrt(grad_norm_sq_cpu(grads)), coef = clip_coefficient(total_norm,
// max_norm), then either scale_grads_cpu(grads, coef) or AdamWParams::grad_scale *= coef.
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "../core/thread_pool.h"

namespace tk {

struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
  float grad_scale = 1.0f;  // g = grad * grad_scale, applied first
  int64_t step = 1;         // the step being taken, counting from 1 (bias corrections use it)
};

// One tensor of a multi-tensor AdamW step.
struct AdamWTensor {
  void* param;       // [n] param_dtype (F32 or BF16), updated in place
  const void* grad;  // [n] grad_dtype (F32 or BF16)
  float* m;          // [n] first moment, updated in place
  float* v;          // [n] second moment, updated in place
  int64_t n;
  DType param_dtype;
  DType grad_dtype;
};

// One gradient of a list (read-only for grad_norm_sq_cpu, scaled in place by scale_grads_cpu).
struct GradTensor {
  void* data;  // [n] dtype (F32 or BF16)
  int64_t n;
  DType dtype;
};

// param: [n] param_dtype, grad: [n] grad_dtype, m, v: [n] f32; param, m, v updated in place.
// Throws tk::Error on an unsupported dtype, step < 1, beta outside [0, 1), or a negative lr, eps or
// weight_decay (torch's checks).
void adamw_step_cpu(void* param, const void* grad, float* m, float* v, int64_t n, DType param_dtype,
                    DType grad_dtype, const AdamWParams& hp, ThreadPool& pool);

// tensors: [count] AdamWTensor, each as in adamw_step_cpu. One parallel region for the whole list:
// the concatenated elements are split evenly over the threads, so many small tensors cost one
// wake-up. Each element's result depends only on its own inputs, so this is bitwise identical to
// per-tensor adamw_step_cpu calls at the same ISA level, for any thread count.
void adamw_step_multi_cpu(const AdamWTensor* tensors, int64_t count, const AdamWParams& hp, ThreadPool& pool);

// grads: [count] GradTensor. Returns the sum of squares of every element of every tensor.
// Accumulated in fp64 (each square of an fp32/bf16 value is exact in fp64): each tensor is cut into
// parts of a fixed size, each part is summed with a fixed lane layout, and the part sums are added
// in list order, so the result is bitwise identical for any thread count (it may differ in the
// last bits between ISA levels). NaN or inf in a gradient propagates.
double grad_norm_sq_cpu(const GradTensor* grads, int64_t count, ThreadPool& pool);

// min(1, max_norm / (total_norm + 1e-6)) computed in fp32 as torch.nn.utils.clip_grad_norm_ does
// for fp32 gradients (NaN total_norm gives NaN, inf gives 0, as in torch).
float clip_coefficient(double total_norm, double max_norm);

// grads: [count] GradTensor; every element g = g * coef in place (fp32 multiply, BF16 rounded to
// nearest even), one parallel region for the whole list.
void scale_grads_cpu(const GradTensor* grads, int64_t count, float coef, ThreadPool& pool);

}  // namespace tk
