// CUDA AdamW, gradient norm and gradient scaling (see optim_kernels.h for the contracts and the
// design).
#include "optim_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../core/error.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
constexpr int64_t kChunk = 8192;  // elements per chunk: 4 groups of 8 per thread of a 256-thread block
constexpr int kNormBlocks = 512;  // fixed, so the norm's summation order does not depend on the device

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

int current_device() {
  int d = 0;
  CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  int v = device >= 0 && device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// ================================ device helpers =================================================

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// core/dtype.h's f32_to_bf16 bit for bit (nearest even, NaN kept quiet, subnormals kept).
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// 8 elements at p + i (16-byte aligned).
__device__ __forceinline__ void ld8(const float* p, int64_t i, float v[8]) {
  const float4 a = reinterpret_cast<const float4*>(p + i)[0], b = reinterpret_cast<const float4*>(p + i)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void ld8(const uint16_t* p, int64_t i, float v[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p + i);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = bf16_to_float(uint16_t(w[k] & 0xffffu));
    v[2 * k + 1] = bf16_to_float(uint16_t(w[k] >> 16));
  }
}
__device__ __forceinline__ void st8(float* p, int64_t i, const float v[8]) {
  reinterpret_cast<float4*>(p + i)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p + i)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(uint16_t* p, int64_t i, const float v[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) w[k] = uint32_t(float_to_bf16(v[2 * k])) | (uint32_t(float_to_bf16(v[2 * k + 1])) << 16);
  *reinterpret_cast<uint4*>(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Calls f(tensor index, first element, end element) for each chunk this block owns: global chunk
// ids blockIdx.x, blockIdx.x + gridDim.x, ... over the list's chunks in list order. Every warp
// computes the same walk (32 descriptors per prefix sum), so control flow is block-uniform.
template <class Desc, class F>
__device__ __forceinline__ void for_each_chunk(const Desc* list, int64_t count, F&& f) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  int64_t next = blockIdx.x, first = 0;
  for (int64_t base = 0; base < count; base += 32) {
    const int64_t i = base + lane;
    const int64_t n = i < count ? list[i].n : 0;
    const int64_t c = n > 0 ? (n + kChunk - 1) / kChunk : 0;
    int64_t incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(full, incl, o);
      if (lane >= o) incl += y;
    }
    const int64_t total = __shfl_sync(full, incl, 31);
    const int64_t start = first + incl - c;  // global id of tensor i's first chunk
    while (next < first + total) {
      const unsigned own = __ballot_sync(full, c > 0 && next >= start && next < start + c);
      const int src = __ffs(own) - 1;
      const int64_t k = next - __shfl_sync(full, start, src);
      const int64_t nt = __shfl_sync(full, n, src);
      f(base + src, k * kChunk, min(nt, (k + 1) * kChunk));
      next += gridDim.x;
    }
    first += total;
  }
}

// ================================ AdamW ==========================================================

// The step's constants, folded in double and rounded once to fp32 (cpu/optim.cpp's make_coef).
struct Coef {
  float gs, b1, omb1, b2, omb2, decay, step_size, rbc2, eps;
};

Coef make_coef(const AdamWParams& hp) {
  const double t = double(hp.step);
  const double bc1 = 1.0 - std::pow(double(hp.beta1), t);
  const double bc2 = 1.0 - std::pow(double(hp.beta2), t);
  Coef c;
  c.gs = hp.grad_scale;
  c.b1 = hp.beta1;
  c.omb1 = float(1.0 - double(hp.beta1));
  c.b2 = hp.beta2;
  c.omb2 = float(1.0 - double(hp.beta2));
  c.decay = float(1.0 - double(hp.lr) * double(hp.weight_decay));
  c.step_size = float(double(hp.lr) / bc1);
  c.rbc2 = float(1.0 / std::sqrt(bc2));
  c.eps = hp.eps;
  return c;
}

// One element, with the CPU SIMD paths' exact sequence of roundings.
__device__ __forceinline__ float adamw_elem(float p, float g, float& m, float& v, const Coef& c, float gs) {
  const float gi = __fmul_rn(g, gs);
  const float mi = __fmaf_rn(c.b1, m, __fmul_rn(c.omb1, gi));
  const float vi = __fmaf_rn(c.b2, v, __fmul_rn(__fmul_rn(c.omb2, gi), gi));
  m = mi;
  v = vi;
  const float den = __fmaf_rn(__fsqrt_rn(vi), c.rbc2, c.eps);
  return __fmaf_rn(-c.step_size, __fdiv_rn(mi, den), __fmul_rn(p, c.decay));
}

template <class PT, class GT>
__device__ __forceinline__ void adamw_range(const AdamWTensor& t, int64_t lo, int64_t hi, const Coef& c, float gs) {
  PT* p = static_cast<PT*>(t.param);
  const GT* g = static_cast<const GT*>(t.grad);
  float* m = t.m;
  float* v = t.v;
  const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v);  // lo is a multiple of 8
  int64_t e = lo + int64_t(threadIdx.x) * 8;
  if (vec) {
    for (; e + 8 <= hi; e += int64_t(blockDim.x) * 8) {
      float pv[8], gv[8], mv[8], vv[8];
      ld8(p, e, pv);
      ld8(g, e, gv);
      ld8(m, e, mv);
      ld8(v, e, vv);
#pragma unroll
      for (int k = 0; k < 8; ++k) pv[k] = adamw_elem(pv[k], gv[k], mv[k], vv[k], c, gs);
      st8(p, e, pv);
      st8(m, e, mv);
      st8(v, e, vv);
    }
  }
  // The tail (or everything, unaligned): element by element, same arithmetic.
  for (; e < hi; e += int64_t(blockDim.x) * 8)
    for (int64_t i = e; i < min(hi, e + 8); ++i) {
      float mi = m[i], vi = v[i];
      st(p, i, adamw_elem(ld(p, i), ld(g, i), mi, vi, c, gs));
      m[i] = mi;
      v[i] = vi;
    }
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWTensor* list, int64_t count, Coef c, const float* grad_coef) {
  const float gs = grad_coef ? __fmul_rn(c.gs, *grad_coef) : c.gs;
  for_each_chunk(list, count, [&](int64_t i, int64_t lo, int64_t hi) {
    const AdamWTensor t = list[i];
    const bool pf = t.param_dtype == DType::F32, pb = t.param_dtype == DType::BF16;
    const bool gf = t.grad_dtype == DType::F32, gb = t.grad_dtype == DType::BF16;
    if (pf && gf) adamw_range<float, float>(t, lo, hi, c, gs);
    else if (pf && gb) adamw_range<float, uint16_t>(t, lo, hi, c, gs);
    else if (pb && gf) adamw_range<uint16_t, float>(t, lo, hi, c, gs);
    else if (pb && gb) adamw_range<uint16_t, uint16_t>(t, lo, hi, c, gs);
  });
}

// ================================ gradient norm ==================================================

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's total in a fixed tree; valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double sh[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (warp == 0) {
    t = lane < int(blockDim.x >> 5) ? sh[lane] : 0.0;
    t = warp_sum(t);
  }
  return t;
}

template <class GT>
__device__ __forceinline__ double sumsq_range(const GT* g, int64_t lo, int64_t hi, double acc) {
  int64_t e = lo + int64_t(threadIdx.x) * 8;
  if (aligned16(g)) {
    for (; e + 8 <= hi; e += int64_t(blockDim.x) * 8) {
      float v[8];
      ld8(g, e, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc = __fma_rn(double(v[k]), double(v[k]), acc);
    }
  }
  for (; e < hi; e += int64_t(blockDim.x) * 8)
    for (int64_t i = e; i < min(hi, e + 8); ++i) {
      const double x = ld(g, i);
      acc = __fma_rn(x, x, acc);
    }
  return acc;
}

__global__ void __launch_bounds__(kThreads) norm_partial_kernel(const GradTensor* list, int64_t count, double* partial) {
  double acc = 0.0;
  for_each_chunk(list, count, [&](int64_t i, int64_t lo, int64_t hi) {
    const GradTensor t = list[i];
    if (t.dtype == DType::F32) acc = sumsq_range(static_cast<const float*>(t.data), lo, hi, acc);
    else if (t.dtype == DType::BF16) acc = sumsq_range(static_cast<const uint16_t*>(t.data), lo, hi, acc);
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block of kNormBlocks threads: the partials in a fixed tree, then the clip coefficient.
__global__ void __launch_bounds__(kNormBlocks)
    norm_final_kernel(const double* partial, double* norm_sq, float* clip_coef, double max_norm) {
  const double total = block_sum(partial[threadIdx.x]);
  if (threadIdx.x == 0) {
    *norm_sq = total;
    if (clip_coef) {
      // clip_coefficient(): torch's max_norm / (total_norm + 1e-6) clamped at 1, in fp32.
      const float coef = __fdiv_rn(float(max_norm), __fadd_rn(__double2float_rn(__dsqrt_rn(total)), 1e-6f));
      *clip_coef = coef > 1.0f ? 1.0f : coef;  // NaN stays NaN
    }
  }
}

template <class GT>
__device__ __forceinline__ void scale_range(GT* g, int64_t lo, int64_t hi, float coef) {
  int64_t e = lo + int64_t(threadIdx.x) * 8;
  if (aligned16(g)) {
    for (; e + 8 <= hi; e += int64_t(blockDim.x) * 8) {
      float v[8];
      ld8(g, e, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = __fmul_rn(v[k], coef);
      st8(g, e, v);
    }
  }
  for (; e < hi; e += int64_t(blockDim.x) * 8)
    for (int64_t i = e; i < min(hi, e + 8); ++i) st(g, i, __fmul_rn(ld(g, i), coef));
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const GradTensor* list, int64_t count, const float* coef_ptr) {
  const float coef = *coef_ptr;
  if (coef == 1.0f) return;
  for_each_chunk(list, count, [&](int64_t i, int64_t lo, int64_t hi) {
    const GradTensor t = list[i];
    if (t.dtype == DType::F32) scale_range(static_cast<float*>(t.data), lo, hi, coef);
    else if (t.dtype == DType::BF16) scale_range(static_cast<uint16_t*>(t.data), lo, hi, coef);
  });
}

unsigned list_grid(int device) { return unsigned(sm_count(device) * kBlocksPerSm); }

}  // namespace

void check_adamw_list_cuda(const AdamWTensor* ts, int64_t count) {
  const char* name = "adamw_step_multi_cuda";
  TK_CHECK(count >= 0 && (count == 0 || ts != nullptr), name, ": bad tensor list (count ", count, ")");
  for (int64_t i = 0; i < count; ++i) {
    const AdamWTensor& t = ts[i];
    TK_CHECK(t.n >= 0, name, ": tensor ", i, " has negative size ", t.n);
    TK_CHECK(t.param_dtype == DType::F32 || t.param_dtype == DType::BF16, name, ": tensor ", i, " param dtype ",
             dtype_name(t.param_dtype), " is not supported (f32 or bf16)");
    TK_CHECK(t.grad_dtype == DType::F32 || t.grad_dtype == DType::BF16, name, ": tensor ", i, " grad dtype ",
             dtype_name(t.grad_dtype), " is not supported (f32 or bf16)");
    TK_CHECK(t.n == 0 || (t.param && t.grad && t.m && t.v), name, ": tensor ", i, " has a null buffer");
  }
}

void check_grad_list_cuda(const GradTensor* gs, int64_t count) {
  const char* name = "grad_norm_sq_cuda";
  TK_CHECK(count >= 0 && (count == 0 || gs != nullptr), name, ": bad gradient list (count ", count, ")");
  for (int64_t i = 0; i < count; ++i) {
    TK_CHECK(gs[i].n >= 0, name, ": gradient ", i, " has negative size ", gs[i].n);
    TK_CHECK(gs[i].dtype == DType::F32 || gs[i].dtype == DType::BF16, name, ": gradient ", i, " dtype ",
             dtype_name(gs[i].dtype), " is not supported (f32 or bf16)");
    TK_CHECK(gs[i].n == 0 || gs[i].data, name, ": gradient ", i, " has a null buffer");
  }
}

void adamw_step_multi_cuda(const AdamWTensor* tensors, int64_t count, const AdamWParams& hp, const float* grad_coef,
                           void* stream) {
  const char* name = "adamw_step_multi_cuda";
  TK_CHECK(count >= 0 && (count == 0 || tensors != nullptr), name, ": bad tensor list (count ", count, ")");
  TK_CHECK(hp.step >= 1, name, ": step must count from 1, got ", hp.step);
  TK_CHECK(hp.beta1 >= 0 && hp.beta1 < 1, name, ": beta1 must be in [0, 1), got ", hp.beta1);
  TK_CHECK(hp.beta2 >= 0 && hp.beta2 < 1, name, ": beta2 must be in [0, 1), got ", hp.beta2);
  TK_CHECK(hp.lr >= 0, name, ": lr must be >= 0, got ", hp.lr);
  TK_CHECK(hp.eps >= 0, name, ": eps must be >= 0, got ", hp.eps);
  TK_CHECK(hp.weight_decay >= 0, name, ": weight_decay must be >= 0, got ", hp.weight_decay);
  if (count == 0) return;
  adamw_kernel<<<list_grid(current_device()), kThreads, 0, as_stream(stream)>>>(tensors, count, make_coef(hp),
                                                                                grad_coef);
  CUDA_CHECK(cudaGetLastError());
}

void grad_norm_sq_cuda(const GradTensor* grads, int64_t count, double* norm_sq, float* clip_coef, double max_norm,
                       void* stream) {
  const char* name = "grad_norm_sq_cuda";
  TK_CHECK(count >= 0 && (count == 0 || grads != nullptr), name, ": bad gradient list (count ", count, ")");
  TK_CHECK(norm_sq != nullptr, name, ": norm_sq is null");
  const int device = current_device();
  const cudaStream_t s = as_stream(stream);
  double* partial = static_cast<double*>(cuda::detail::allocate_on(device, kNormBlocks * sizeof(double), s));
  struct Release {
    int device;
    void* p;
    cudaStream_t s;
    ~Release() { cuda::detail::release_on(device, p, s); }
  } release{device, partial, s};
  norm_partial_kernel<<<kNormBlocks, kThreads, 0, s>>>(grads, count, partial);
  CUDA_CHECK(cudaGetLastError());
  norm_final_kernel<<<1, kNormBlocks, 0, s>>>(partial, norm_sq, clip_coef, max_norm);
  CUDA_CHECK(cudaGetLastError());
}

void scale_grads_cuda(const GradTensor* grads, int64_t count, const float* coef, void* stream) {
  const char* name = "scale_grads_cuda";
  TK_CHECK(count >= 0 && (count == 0 || grads != nullptr), name, ": bad gradient list (count ", count, ")");
  TK_CHECK(coef != nullptr, name, ": coef is null");
  if (count == 0) return;
  scale_kernel<<<list_grid(current_device()), kThreads, 0, as_stream(stream)>>>(grads, count, coef);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tk
