// See ops_glue.h. Grid-stride loops over contiguous data; bf16 is widened to fp32, multiplied and
// rounded to nearest even once, as the CPU's scale_cpu does.
#include "ops_glue.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "check.cuh"

namespace tk {
namespace {

// x [n] f32, s [1] f32
__global__ void scale_f32_kernel(float* x, const float* s, int64_t n) {
  const float v = *s;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] *= v;
}

// x [n] bf16, s [1] f32
__global__ void scale_bf16_kernel(__nv_bfloat16* x, const float* s, int64_t n) {
  const float v = *s;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * v);
}

// norm_sq [1] f64 -> norm [1] f32
__global__ void norm_kernel(const double* norm_sq, float* norm) { *norm = float(sqrt(*norm_sq)); }

}  // namespace

void scale_by_device_scalar_cuda(const TensorView& x, const float* s, void* stream) {
  TK_CHECK((x.dtype == DType::F32 || x.dtype == DType::BF16) && x.is_contiguous(), "scale_by_device_scalar_cuda: x ",
           dtype_name(x.dtype), " must be contiguous f32 or bf16");
  const int64_t n = x.numel();
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 4096));
  auto st = static_cast<cudaStream_t>(stream);
  if (x.dtype == DType::F32) scale_f32_kernel<<<blocks, threads, 0, st>>>(static_cast<float*>(x.data), s, n);
  else scale_bf16_kernel<<<blocks, threads, 0, st>>>(static_cast<__nv_bfloat16*>(x.data), s, n);
  CUDA_CHECK(cudaGetLastError());
}

void norm_from_square_cuda(const double* norm_sq, float* norm, void* stream) {
  norm_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(norm_sq, norm);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tk
