// CUDA RMSNorm, SwiGLU, embedding and RoPE kernels (see norm_kernels.h for the contracts and the
// design). Host functions check their arguments like the CPU kernels (messages name the _cuda
// op), choose a path from the shape and alignment, and launch on the caller's stream. Kernels are
// templated on the storage type (F32 / BF16) and on whether the 128-bit path applies, nothing
// else, which keeps this file at a few dozen instantiations.
#include "norm_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "../core/error.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;       // flat kernels
constexpr int kBlocksPerSm = 8;     // grid cap for grid-stride loops: 2048 resident threads per SM
constexpr int kMaxRowThreads = 512; // row kernels: threads per row at most
constexpr int kCache = 4;           // 8-element groups a forward row thread keeps in registers
constexpr int kCacheBwd = 2;        // the same for the backward pass, which keeps two arrays (x, dy)
constexpr int kRopeMaxHalf = 512;   // D/2 at most (frequencies travel in the parameter space)

// ================================ host helpers ===================================================

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

int device_attribute(cudaDeviceAttr attr, int device) {
  static std::atomic<int> sms[64], smem[64];
  std::atomic<int>* cache = attr == cudaDevAttrMultiProcessorCount ? sms : smem;
  if (device < 0 || device >= 64) {
    int v = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    return v;
  }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}
int sm_count(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, device); }

unsigned grid_cap(int64_t blocks, int device) {
  return unsigned(std::max<int64_t>(1, std::min(blocks, int64_t(sm_count(device)) * kBlocksPerSm)));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The smallest power of two >= n, clamped to [lo, hi].
int pow2_threads(int64_t n, int lo, int hi) {
  int t = lo;
  while (t < hi && t < n) t *= 2;
  return t;
}

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CUDA, op, ": ", what, " is on ", v.device.name(), ", expected cuda");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_float(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.dtype == DType::F32 || v.dtype == DType::BF16, op, ": ", what, " ", describe(v),
           " must be f32 or bf16");
}

void check_dtype(const TensorView& v, DType t, const char* op, const char* what) {
  TK_CHECK(v.dtype == t, op, ": ", what, " ", describe(v), " must be ", dtype_name(t));
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  bool same = a.ndim == b.ndim;
  for (int d = 0; same && d < a.ndim; ++d) same = a.shape[d] == b.shape[d];
  TK_CHECK(same, op, ": ", an, " ", describe(a), " and ", bn, " ", describe(b), " must have the same shape");
}

void check_same_device(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  TK_CHECK(a.device == b.device, op, ": ", an, " is on ", a.device.name(), " but ", bn, " is on ", b.device.name());
}

int64_t last_dim(const TensorView& x, const char* op) {
  TK_CHECK(x.ndim >= 1 && x.shape[x.ndim - 1] >= 1, op, ": x ", describe(x), " must have a last dim D >= 1");
  return x.shape[x.ndim - 1];
}

void check_rms_common(const TensorView& x, const TensorView& weight, const TensorView& rstd, const char* op) {
  check_tensor(x, op, "x");
  check_tensor(weight, op, "weight");
  check_tensor(rstd, op, "rstd");
  check_float(x, op, "x");
  check_same_device(weight, x, op, "weight", "x");
  check_same_device(rstd, x, op, "rstd", "x");
  const int64_t D = last_dim(x, op);
  TK_CHECK(weight.ndim == 1 && weight.shape[0] == D && weight.dtype == x.dtype, op, ": weight ", describe(weight),
           " must be [", D, "] ", dtype_name(x.dtype), " for x ", describe(x));
  check_dtype(rstd, DType::F32, op, "rstd");
  TK_CHECK(rstd.numel() == x.numel() / D, op, ": rstd ", describe(rstd), " must have ", x.numel() / D,
           " elements (one per row of x ", describe(x), ")");
  TK_CHECK(D <= (int64_t(1) << 30), op, ": x ", describe(x), " has rows longer than 2^30");
}

class Scratch {
 public:
  Scratch(int device, size_t bytes, cudaStream_t s) : device_(device), stream_(s) {
    if (bytes) ptr_ = cuda::detail::allocate_on(device, bytes, s);
  }
  ~Scratch() {
    if (ptr_) cuda::detail::release_on(device_, ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* f32() const { return static_cast<float*>(ptr_); }

 private:
  int device_;
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// ================================ device scalars =================================================
// (The same conversions as elementwise_kernels.cu; each .cu keeps its own copy so that the kernel
// families stay independent translation units.)

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// core/dtype.h's f32_to_bf16 bit for bit: nearest even, NaN kept quiet, subnormals kept.
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

struct F32T {
  using S = float;
  __device__ static float ld(float v) { return v; }
  __device__ static float st(float v) { return v; }
};
struct BF16T {
  using S = uint16_t;
  __device__ static float ld(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t st(float v) { return float_to_bf16(v); }
};

// kV consecutive elements at p: 8 with 128-bit accesses (16-byte aligned p), or 1.
template <class T, int kV>
__device__ __forceinline__ void load_v(const typename T::S* p, float v[kV]) {
  if constexpr (kV == 1) {
    v[0] = T::ld(*p);
  } else if constexpr (sizeof(typename T::S) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = T::ld(uint16_t(w[k] & 0xffffu));
      v[2 * k + 1] = T::ld(uint16_t(w[k] >> 16));
    }
  }
}

template <class T, int kV>
__device__ __forceinline__ void store_v(typename T::S* p, const float v[kV]) {
  if constexpr (kV == 1) {
    *p = T::st(v[0]);
  } else if constexpr (sizeof(typename T::S) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = uint32_t(T::st(v[2 * k])) | (uint32_t(T::st(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's total of v, returned to every thread; a fixed tree, so the same bytes every run.
// blockDim.x is a multiple of 32; sh holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float t = lane < warps ? sh[lane] : 0.0f;
  t = warp_sum(t);
  __syncthreads();  // sh is free for the next call
  return t;
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// ================================ RMSNorm ========================================================

// One block per row; thread t owns groups t, t + blockDim, ... of kV elements.
template <class T, int kV>
__global__ void __launch_bounds__(kMaxRowThreads)
    rms_forward_kernel(const typename T::S* x, const typename T::S* w, float eps, typename T::S* y, float* rstd,
                       int64_t N, int D) {
  __shared__ float sh[32];
  const int groups = D / kV;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const typename T::S* xr = x + n * D;
    typename T::S* yr = y + n * D;
    float cache[kCache][kV];
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int g = threadIdx.x + c * blockDim.x;
      if (g < groups) {
        load_v<T, kV>(xr + g * kV, cache[c]);
#pragma unroll
        for (int k = 0; k < kV; ++k) ss += cache[c][k] * cache[c][k];
      }
    }
    for (int g = threadIdx.x + kCache * blockDim.x; g < groups; g += blockDim.x) {
      float v[kV];
      load_v<T, kV>(xr + g * kV, v);
#pragma unroll
      for (int k = 0; k < kV; ++k) ss += v[k] * v[k];
    }
    ss = block_sum(ss, sh);
    const float r = 1.0f / sqrtf(ss / float(D) + eps);
    if (threadIdx.x == 0) rstd[n] = r;
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int g = threadIdx.x + c * blockDim.x;
      if (g < groups) {
        float wv[kV];
        load_v<T, kV>(w + g * kV, wv);
#pragma unroll
        for (int k = 0; k < kV; ++k) wv[k] = __fmul_rn(__fmul_rn(cache[c][k], r), wv[k]);
        store_v<T, kV>(yr + g * kV, wv);
      }
    }
    for (int g = threadIdx.x + kCache * blockDim.x; g < groups; g += blockDim.x) {
      float v[kV], wv[kV];
      load_v<T, kV>(xr + g * kV, v);
      load_v<T, kV>(w + g * kV, wv);
#pragma unroll
      for (int k = 0; k < kV; ++k) v[k] = __fmul_rn(__fmul_rn(v[k], r), wv[k]);
      store_v<T, kV>(yr + g * kV, v);
    }
  }
}

// Block p handles rows [p * rows_per_part, ...) and writes its dweight partial to part_out + p * D
// (dweight itself when there is one part). acc_in_smem: the partial lives in dynamic shared
// memory until the end; otherwise it is accumulated in part_out directly (rows too long for
// shared memory). Either way each thread reads and writes only its own columns.
template <class T, int kV>
__global__ void __launch_bounds__(kMaxRowThreads, 2)
    rms_backward_kernel(const typename T::S* dy, const typename T::S* x, const typename T::S* w, const float* rstd,
                        typename T::S* dx, float* part_out, int64_t N, int D, int64_t rows_per_part, bool acc_in_smem) {
  extern __shared__ float acc_sh[];
  __shared__ float sh[32];
  const int groups = D / kV;
  const int64_t p = blockIdx.x;
  float* out = part_out + p * D;
  float* acc = acc_in_smem ? acc_sh : out;
  for (int g = threadIdx.x; g < groups; g += blockDim.x)
#pragma unroll
    for (int k = 0; k < kV; ++k) acc[g * kV + k] = 0.0f;
  const float inv_d = 1.0f / float(D);
  const int64_t n_end = min(N, (p + 1) * rows_per_part);
  for (int64_t n = p * rows_per_part; n < n_end; ++n) {
    const typename T::S* xr = x + n * D;
    const typename T::S* dyr = dy + n * D;
    float cx[kCacheBwd][kV], cdy[kCacheBwd][kV];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kCacheBwd; ++c) {
      const int g = threadIdx.x + c * blockDim.x;
      if (g < groups) {
        float wv[kV];
        load_v<T, kV>(xr + g * kV, cx[c]);
        load_v<T, kV>(dyr + g * kV, cdy[c]);
        load_v<T, kV>(w + g * kV, wv);
#pragma unroll
        for (int k = 0; k < kV; ++k) dot += cdy[c][k] * wv[k] * cx[c][k];
      }
    }
    for (int g = threadIdx.x + kCacheBwd * blockDim.x; g < groups; g += blockDim.x) {
      float xv[kV], dv[kV], wv[kV];
      load_v<T, kV>(xr + g * kV, xv);
      load_v<T, kV>(dyr + g * kV, dv);
      load_v<T, kV>(w + g * kV, wv);
#pragma unroll
      for (int k = 0; k < kV; ++k) dot += dv[k] * wv[k] * xv[k];
    }
    dot = block_sum(dot, sh);
    const float r = rstd[n];
    const float cf = r * r * r * (dot * inv_d);
    typename T::S* dxr = dx + n * D;
    // dx = r * (dy * w) - c * x and acc += dy * (x * r), as the CPU's FMA paths round them.
    auto finish = [&](int g, const float* xv, const float* dv) {
      float wv[kV], o[kV];
      load_v<T, kV>(w + g * kV, wv);
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        float* a = acc + g * kV + k;
        *a = __fmaf_rn(dv[k], __fmul_rn(xv[k], r), *a);
        o[k] = __fmaf_rn(-cf, xv[k], __fmul_rn(r, __fmul_rn(dv[k], wv[k])));
      }
      store_v<T, kV>(dxr + g * kV, o);
    };
#pragma unroll
    for (int c = 0; c < kCacheBwd; ++c) {
      const int g = threadIdx.x + c * blockDim.x;
      if (g < groups) finish(g, cx[c], cdy[c]);
    }
    for (int g = threadIdx.x + kCacheBwd * blockDim.x; g < groups; g += blockDim.x) {
      float xv[kV], dv[kV];
      load_v<T, kV>(xr + g * kV, xv);
      load_v<T, kV>(dyr + g * kV, dv);
      finish(g, xv, dv);
    }
  }
  if (acc_in_smem)
    for (int g = threadIdx.x; g < groups; g += blockDim.x)
#pragma unroll
      for (int k = 0; k < kV; ++k) out[g * kV + k] = acc[g * kV + k];
}

// dweight[d] = partial[0][d] + partial[1][d] + ... in part order.
__global__ void __launch_bounds__(kThreads) rms_dweight_kernel(const float* partial, int64_t parts, int D, float* dw) {
  for (int64_t d = global_thread(); d < D; d += grid_threads()) {
    float s = partial[d];
#pragma unroll 8
    for (int64_t p = 1; p < parts; ++p) s += partial[p * D + d];  // unrolled: 8 loads in flight
    dw[d] = s;
  }
}

template <class T, int kV>
void launch_rms_backward(const TensorView& dy, const TensorView& x, const TensorView& weight, const TensorView& rstd,
                         const TensorView& dx, float* part_out, int64_t N, int D, int64_t rows_per_part, int64_t parts,
                         cudaStream_t s) {
  using S = typename T::S;
  const int device = x.device.index;
  const int threads = pow2_threads(D / kV, 32, kMaxRowThreads);
  const size_t smem = size_t(D) * sizeof(float);
  const bool in_smem = smem <= size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) - 1024;
  auto kernel = rms_backward_kernel<T, kV>;
  if (in_smem && smem + sizeof(float) * 32 > 48 * 1024)  // beyond the default, with the static sh[32]
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(parts), threads, in_smem ? smem : 0, s>>>(dy.ptr<const S>(), x.ptr<const S>(),
                                                              weight.ptr<const S>(), rstd.ptr<const float>(),
                                                              dx.ptr<S>(), part_out, N, D, rows_per_part, in_smem);
  CUDA_CHECK(cudaGetLastError());
}

// ================================ SwiGLU =========================================================

// sigmoid(g) from e = exp(-|g|) in (0, 1]: no overflow for any finite g.
__device__ __forceinline__ float sigmoid(float g) {
  const float e = expf(-fabsf(g));
  const float s = 1.0f / (1.0f + e);
  return g >= 0.0f ? s : e * s;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const typename T::S* gate, const typename T::S* up, typename T::S* out, int64_t n, bool vec) {
  const int64_t t = global_thread(), stride = grid_threads();
  int64_t done = 0;
  if (vec) {
    const int64_t groups = n / 8;
    for (int64_t g8 = t; g8 < groups; g8 += stride) {
      float g[8], u[8];
      load_v<T, 8>(gate + g8 * 8, g);
      load_v<T, 8>(up + g8 * 8, u);
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = g[k] * sigmoid(g[k]) * u[k];
      store_v<T, 8>(out + g8 * 8, g);
    }
    done = groups * 8;
  }
  for (int64_t e = done + t; e < n; e += stride) {
    const float g = T::ld(gate[e]);
    out[e] = T::st(g * sigmoid(g) * T::ld(up[e]));
  }
}

__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
  const float s = sigmoid(g);
  du = d * (g * s);
  dg = d * u * (s * (1.0f + g * (1.0f - s)));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const typename T::S* dout, const typename T::S* gate, const typename T::S* up,
                           typename T::S* dgate, typename T::S* dup, int64_t n, bool vec) {
  const int64_t t = global_thread(), stride = grid_threads();
  int64_t done = 0;
  if (vec) {
    const int64_t groups = n / 8;
    for (int64_t g8 = t; g8 < groups; g8 += stride) {
      float d[8], g[8], u[8], dg[8], du[8];
      load_v<T, 8>(dout + g8 * 8, d);
      load_v<T, 8>(gate + g8 * 8, g);
      load_v<T, 8>(up + g8 * 8, u);
#pragma unroll
      for (int k = 0; k < 8; ++k) swiglu_grad(d[k], g[k], u[k], dg[k], du[k]);
      store_v<T, 8>(dgate + g8 * 8, dg);
      store_v<T, 8>(dup + g8 * 8, du);
    }
    done = groups * 8;
  }
  for (int64_t e = done + t; e < n; e += stride) {
    float dg, du;
    swiglu_grad(T::ld(dout[e]), T::ld(gate[e]), T::ld(up[e]), dg, du);
    dgate[e] = T::st(dg);
    dup[e] = T::st(du);
  }
}

void check_swiglu(const TensorView* const* ts, const char* const* names, int count, const char* op) {
  for (int i = 0; i < count; ++i) {
    check_tensor(*ts[i], op, names[i]);
    check_float(*ts[i], op, names[i]);
    check_same_shape(*ts[0], *ts[i], op, names[0], names[i]);
    check_dtype(*ts[i], ts[0]->dtype, op, names[i]);
    check_same_device(*ts[i], *ts[0], op, names[i], names[0]);
  }
}

// ================================ embedding ======================================================

// A warp per output row; units of U (16, 4 or 2 bytes) across the lanes.
template <class U>
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(const int32_t* ids, const U* table, U* out, int64_t N, int64_t V, int64_t row_units,
                             U nan_unit) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t n = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; n < N; n += warps) {
    const int64_t id = ids[n];
    U* o = out + n * row_units;
    if (id >= 0 && id < V) {
      const U* src = table + id * row_units;
      for (int64_t u = lane; u < row_units; u += 32) o[u] = src[u];
    } else {
      for (int64_t u = lane; u < row_units; u += 32) o[u] = nan_unit;
    }
  }
}

// Warp task (column tile, residue r): lanes own kV adjacent columns of the tile; the warp scans
// every id in order and adds the dout rows whose id % R == r into their dtable rows.
template <class T, int kV>
__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(const typename T::S* dout, const int32_t* ids, float* dtable, int64_t N, int64_t V,
                              int64_t D, int64_t R, int64_t tiles) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t task = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; task < tiles * R; task += warps) {
    const int64_t tile = task % tiles, r = task / tiles;
    const int64_t c = (tile * 32 + lane) * kV;
    const bool active = c < D;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const int64_t mine_n = n0 + lane;
      const int64_t id = mine_n < N ? int64_t(ids[mine_n]) : -1;
      unsigned mask = __ballot_sync(0xffffffffu, id >= 0 && id < V && uint32_t(id) % uint32_t(R) == uint32_t(r));
      while (mask) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1;
        const int64_t v = __shfl_sync(0xffffffffu, id, src);
        if (!active) continue;
        const int64_t n = n0 + src;
        float* row = dtable + v * D + c;
        const typename T::S* d = dout + n * D + c;
        if constexpr (kV == 4) {
          float4 a = *reinterpret_cast<float4*>(row);
          if constexpr (sizeof(typename T::S) == 4) {
            const float4 b = *reinterpret_cast<const float4*>(d);
            a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
          } else {
            const uint2 b = *reinterpret_cast<const uint2*>(d);
            a.x += T::ld(uint16_t(b.x & 0xffffu)), a.y += T::ld(uint16_t(b.x >> 16));
            a.z += T::ld(uint16_t(b.y & 0xffffu)), a.w += T::ld(uint16_t(b.y >> 16));
          }
          *reinterpret_cast<float4*>(row) = a;
        } else {
          *row += T::ld(*d);
        }
      }
    }
  }
}

// ================================ RoPE ===========================================================

struct RopeFreqs {
  float f[kRopeMaxHalf];
};

// Rotates the heads of rows at one position: cos/sin for the position in shared memory (fp32
// from double), then groups of kV pairs (i, i + half) across the threads.
template <class T, int kV>
__device__ __forceinline__ void rope_rows(const typename T::S* x, typename T::S* out, int64_t row0, int64_t rows,
                                          int64_t row_step, int H, int half, const float* cs) {
  const int per_head = half / kV;
  const int groups = H * per_head;
  const int D = 2 * half;
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t base = (row0 + q * row_step) * int64_t(H) * D;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
      const int h = g / per_head, i0 = (g - h * per_head) * kV;
      const int64_t off = base + int64_t(h) * D + i0;
      float a[kV], b[kV];
      load_v<T, kV>(x + off, a);
      load_v<T, kV>(x + off + half, b);
      float lo[kV], hi[kV];
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const float c = cs[i0 + k], s = cs[half + i0 + k];
        lo[k] = __fmaf_rn(a[k], c, -__fmul_rn(b[k], s));
        hi[k] = __fmaf_rn(b[k], c, __fmul_rn(a[k], s));
      }
      store_v<T, kV>(out + off, lo);
      store_v<T, kV>(out + off + half, hi);
    }
  }
}

// Shared positions: task = (t, batch chunk); per-batch positions: task = row (b, t).
template <class T, int kV>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const typename T::S* x, typename T::S* out, const int32_t* pos, bool per_batch, RopeFreqs fr, int half,
                float af, float sign, int64_t B, int64_t Tn, int H, int64_t b_chunk) {
  __shared__ float cs[2 * kRopeMaxHalf];
  const int64_t chunks = (B + b_chunk - 1) / b_chunk;
  const int64_t tasks = per_batch ? B * Tn : Tn * chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t t = per_batch ? task : task % Tn;
    const int32_t p = per_batch ? pos[task] : pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      double s, c;
      sincos(double(p) * double(fr.f[i]), &s, &c);
      cs[i] = float(double(af) * c);
      cs[half + i] = float(double(sign) * double(af) * s);
    }
    __syncthreads();
    if (per_batch) {
      rope_rows<T, kV>(x, out, task, 1, 1, H, half, cs);
    } else {
      const int64_t b0 = (task / Tn) * b_chunk, nb = min(B - b0, b_chunk);
      rope_rows<T, kV>(x, out, b0 * Tn + t, nb, Tn, H, half, cs);
    }
    __syncthreads();
  }
}

void rope_apply(const char* op, const char* xname, const char* outname, const TensorView& x,
                const TensorView& positions, bool per_batch, const std::vector<float>& inv_freq, float attention_factor,
                float sign, const TensorView& out, void* stream) {
  TK_CHECK(x.device.type == DeviceType::CUDA && out.device.type == DeviceType::CUDA &&
               positions.device.type == DeviceType::CUDA,
           op, ": all tensors must be on cuda");
  TK_CHECK(x.device == out.device && x.device == positions.device, op, ": all tensors must be on one device");
  TK_CHECK(x.ndim == 4, op, ": ", xname, " must be [B, T, H, D], got ", describe(x));
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": ", xname, " must be f32 or bf16, got ",
           describe(x));
  TK_CHECK(out.dtype == x.dtype && out.ndim == 4 && std::equal(x.shape, x.shape + 4, out.shape), op, ": ", outname,
           " ", describe(out), " must match ", xname, " ", describe(x));
  TK_CHECK(x.is_contiguous() && out.is_contiguous(), op, ": ", xname, " and ", outname, " must be contiguous");
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3];
  TK_CHECK(D >= 2 && D % 2 == 0, op, ": head dim D must be even and >= 2, got ", describe(x));
  TK_CHECK(D / 2 <= kRopeMaxHalf, op, ": head dim D = ", D, " is above the CUDA kernel's limit of ",
           2 * kRopeMaxHalf);
  TK_CHECK(H <= (int64_t(1) << 20), op, ": ", describe(x), " has too many heads");
  TK_CHECK(int64_t(inv_freq.size()) == D / 2, op, ": inv_freq has ", inv_freq.size(), " entries, expected D/2 = ",
           D / 2);
  TK_CHECK(std::isfinite(attention_factor), op, ": attention_factor must be finite, got ", attention_factor);
  TK_CHECK(positions.dtype == DType::I32 && positions.is_contiguous(), op, ": positions must be contiguous i32, got ",
           describe(positions));
  if (per_batch)
    TK_CHECK(positions.ndim == 2 && positions.shape[0] == B && positions.shape[1] == T, op,
             ": per-batch positions must be [B, T] = [", B, ", ", T, "], got ", describe(positions));
  else
    TK_CHECK(positions.ndim == 1 && positions.shape[0] == T, op, ": shared positions must be [T] = [", T, "], got ",
             describe(positions));
  const char* xb = static_cast<const char*>(x.data);
  const char* ob = static_cast<const char*>(out.data);
  const size_t bytes = x.nbytes();
  TK_CHECK(bytes == 0 || xb == ob || xb + bytes <= ob || ob + bytes <= xb, op, ": ", outname,
           " partially overlaps ", xname);
  if (B * T == 0 || H == 0) return;

  RopeFreqs fr;
  std::memcpy(fr.f, inv_freq.data(), inv_freq.size() * sizeof(float));
  const int half = int(D / 2), device = x.device.index;
  const bool bf16 = x.dtype == DType::BF16;
  const bool vec = half % 8 == 0 && aligned16(x.data) && aligned16(out.data);
  const int groups = int(H) * (vec ? half / 8 : half);
  const int threads = pow2_threads(groups, 64, kThreads);
  // Shared positions: enough (t, batch chunk) tasks to fill the device, whole batches otherwise,
  // since every chunk re-evaluates the position's cos/sin.
  const int64_t want = int64_t(sm_count(device)) * kBlocksPerSm;
  const int64_t chunks = per_batch ? 1 : std::min<int64_t>(B, std::max<int64_t>(1, (want + T - 1) / T));
  const int64_t b_chunk = (B + chunks - 1) / chunks;
  const int64_t tasks = per_batch ? B * T : T * ((B + b_chunk - 1) / b_chunk);
  const unsigned grid = grid_cap(tasks, device);
  const cudaStream_t s = as_stream(stream);
  const int32_t* pos = positions.ptr<const int32_t>();
  if (bf16) {
    using S = BF16T::S;
    if (vec)
      rope_kernel<BF16T, 8><<<grid, threads, 0, s>>>(x.ptr<const S>(), out.ptr<S>(), pos, per_batch, fr, half,
                                                     attention_factor, sign, B, T, int(H), b_chunk);
    else
      rope_kernel<BF16T, 1><<<grid, threads, 0, s>>>(x.ptr<const S>(), out.ptr<S>(), pos, per_batch, fr, half,
                                                     attention_factor, sign, B, T, int(H), b_chunk);
  } else {
    if (vec)
      rope_kernel<F32T, 8><<<grid, threads, 0, s>>>(x.ptr<const float>(), out.ptr<float>(), pos, per_batch, fr, half,
                                                    attention_factor, sign, B, T, int(H), b_chunk);
    else
      rope_kernel<F32T, 1><<<grid, threads, 0, s>>>(x.ptr<const float>(), out.ptr<float>(), pos, per_batch, fr, half,
                                                    attention_factor, sign, B, T, int(H), b_chunk);
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ================================ entry points ===================================================

void rms_norm_forward_cuda(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                           const TensorView& rstd, void* stream) {
  const char* op = "rms_norm_forward_cuda";
  check_rms_common(x, weight, rstd, op);
  check_tensor(y, op, "y");
  check_same_device(y, x, op, "y", "x");
  check_same_shape(x, y, op, "x", "y");
  check_dtype(y, x.dtype, op, "y");
  TK_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps = ", eps, " must be finite and >= 0");
  const int64_t D = x.shape[x.ndim - 1], N = x.numel() / D;
  if (N == 0) return;
  const bool vec = D % 8 == 0 && aligned16(x.data) && aligned16(weight.data) && aligned16(y.data);
  const int threads = pow2_threads(vec ? D / 8 : D, 32, kMaxRowThreads);
  const unsigned grid = grid_cap(N, x.device.index);
  const cudaStream_t s = as_stream(stream);
  auto launch = [&](auto tag, auto kv) {
    using T = decltype(tag);
    using S = typename T::S;
    rms_forward_kernel<T, decltype(kv)::value><<<grid, threads, 0, s>>>(
        x.ptr<const S>(), weight.ptr<const S>(), eps, y.ptr<S>(), rstd.ptr<float>(), N, int(D));
  };
  using V8 = std::integral_constant<int, 8>;
  using V1 = std::integral_constant<int, 1>;
  if (x.dtype == DType::BF16) vec ? launch(BF16T{}, V8{}) : launch(BF16T{}, V1{});
  else vec ? launch(F32T{}, V8{}) : launch(F32T{}, V1{});
  CUDA_CHECK(cudaGetLastError());
}

void rms_norm_backward_cuda(const TensorView& dy, const TensorView& x, const TensorView& weight,
                            const TensorView& rstd, const TensorView& dx, const TensorView& dweight, void* stream) {
  const char* op = "rms_norm_backward_cuda";
  check_rms_common(x, weight, rstd, op);
  check_tensor(dy, op, "dy");
  check_tensor(dx, op, "dx");
  check_tensor(dweight, op, "dweight");
  check_same_device(dy, x, op, "dy", "x");
  check_same_device(dx, x, op, "dx", "x");
  check_same_device(dweight, x, op, "dweight", "x");
  check_same_shape(x, dy, op, "x", "dy");
  check_same_shape(x, dx, op, "x", "dx");
  check_dtype(dy, x.dtype, op, "dy");
  check_dtype(dx, x.dtype, op, "dx");
  const int64_t D = x.shape[x.ndim - 1], N = x.numel() / D;
  TK_CHECK(dweight.ndim == 1 && dweight.shape[0] == D && dweight.dtype == DType::F32, op, ": dweight ",
           describe(dweight), " must be [", D, "] f32");
  const cudaStream_t s = as_stream(stream);
  if (N == 0) {
    CUDA_CHECK(cudaMemsetAsync(dweight.data, 0, size_t(D) * sizeof(float), s));
    return;
  }
  // Parts depend on N only (at least 16 rows, at most 1024 parts), so dweight's summation order
  // is the same on every device; 1024 parts of up to 512 threads fill any current GPU.
  const int64_t rows_per_part = std::max<int64_t>(16, (N + 1023) / 1024);
  const int64_t parts = (N + rows_per_part - 1) / rows_per_part;
  Scratch scratch(x.device.index, parts > 1 ? size_t(parts * D) * sizeof(float) : 0, s);
  float* part_out = parts > 1 ? scratch.f32() : dweight.ptr<float>();
  const bool vec = D % 8 == 0 && aligned16(x.data) && aligned16(dy.data) && aligned16(weight.data) &&
                   aligned16(dx.data) && aligned16(part_out);
  if (x.dtype == DType::BF16) {
    if (vec) launch_rms_backward<BF16T, 8>(dy, x, weight, rstd, dx, part_out, N, int(D), rows_per_part, parts, s);
    else launch_rms_backward<BF16T, 1>(dy, x, weight, rstd, dx, part_out, N, int(D), rows_per_part, parts, s);
  } else {
    if (vec) launch_rms_backward<F32T, 8>(dy, x, weight, rstd, dx, part_out, N, int(D), rows_per_part, parts, s);
    else launch_rms_backward<F32T, 1>(dy, x, weight, rstd, dx, part_out, N, int(D), rows_per_part, parts, s);
  }
  if (parts > 1) {
    rms_dweight_kernel<<<grid_cap((D + kThreads - 1) / kThreads, x.device.index), kThreads, 0, s>>>(
        part_out, parts, int(D), dweight.ptr<float>());
    CUDA_CHECK(cudaGetLastError());
  }
}

void swiglu_forward_cuda(const TensorView& gate, const TensorView& up, const TensorView& out, void* stream) {
  const char* op = "swiglu_forward_cuda";
  const TensorView* ts[] = {&gate, &up, &out};
  const char* names[] = {"gate", "up", "out"};
  check_swiglu(ts, names, 3, op);
  const int64_t n = gate.numel();
  if (n == 0) return;
  const bool vec = aligned16(gate.data) && aligned16(up.data) && aligned16(out.data);
  const unsigned grid = grid_cap(((vec ? n / 8 : n) + kThreads) / kThreads, gate.device.index);
  const cudaStream_t s = as_stream(stream);
  if (gate.dtype == DType::BF16)
    swiglu_forward_kernel<BF16T><<<grid, kThreads, 0, s>>>(gate.ptr<const uint16_t>(), up.ptr<const uint16_t>(),
                                                           out.ptr<uint16_t>(), n, vec);
  else
    swiglu_forward_kernel<F32T><<<grid, kThreads, 0, s>>>(gate.ptr<const float>(), up.ptr<const float>(),
                                                          out.ptr<float>(), n, vec);
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward_cuda(const TensorView& dout, const TensorView& gate, const TensorView& up,
                          const TensorView& dgate, const TensorView& dup, void* stream) {
  const char* op = "swiglu_backward_cuda";
  const TensorView* ts[] = {&dout, &gate, &up, &dgate, &dup};
  const char* names[] = {"dout", "gate", "up", "dgate", "dup"};
  check_swiglu(ts, names, 5, op);
  TK_CHECK(dgate.numel() == 0 || dgate.data != dup.data, op, ": dgate and dup must be different buffers");
  const int64_t n = gate.numel();
  if (n == 0) return;
  const bool vec = aligned16(dout.data) && aligned16(gate.data) && aligned16(up.data) && aligned16(dgate.data) &&
                   aligned16(dup.data);
  const unsigned grid = grid_cap(((vec ? n / 8 : n) + kThreads) / kThreads, gate.device.index);
  const cudaStream_t s = as_stream(stream);
  if (gate.dtype == DType::BF16)
    swiglu_backward_kernel<BF16T><<<grid, kThreads, 0, s>>>(dout.ptr<const uint16_t>(), gate.ptr<const uint16_t>(),
                                                            up.ptr<const uint16_t>(), dgate.ptr<uint16_t>(),
                                                            dup.ptr<uint16_t>(), n, vec);
  else
    swiglu_backward_kernel<F32T><<<grid, kThreads, 0, s>>>(dout.ptr<const float>(), gate.ptr<const float>(),
                                                           up.ptr<const float>(), dgate.ptr<float>(),
                                                           dup.ptr<float>(), n, vec);
  CUDA_CHECK(cudaGetLastError());
}

void embedding_forward_cuda(const TensorView& ids, const TensorView& table, const TensorView& out, void* stream) {
  const char* op = "embedding_forward_cuda";
  check_tensor(table, op, "table");
  check_tensor(out, op, "out");
  check_tensor(ids, op, "ids");
  check_float(table, op, "table");
  check_dtype(ids, DType::I32, op, "ids");
  check_same_device(ids, table, op, "ids", "table");
  check_same_device(out, table, op, "out", "table");
  TK_CHECK(table.ndim == 2, op, ": table ", describe(table), " must be [V, D]");
  const int64_t V = table.shape[0], D = table.shape[1];
  const int64_t N = ids.numel();
  TK_CHECK(out.dtype == table.dtype && out.numel() == N * D, op, ": out ", describe(out), " must hold ", N, " x ", D,
           " ", dtype_name(table.dtype), " elements (ids ", describe(ids), ", table ", describe(table), ")");
  if (N == 0 || D == 0) return;
  const int64_t row_bytes = D * int64_t(dtype_size(table.dtype));
  const uint32_t nan_bits = table.dtype == DType::F32 ? 0x7fc00000u : 0x7fc07fc0u;
  const unsigned grid = grid_cap((N + kThreads / 32 - 1) / (kThreads / 32), table.device.index);
  const cudaStream_t s = as_stream(stream);
  const int32_t* id = ids.ptr<const int32_t>();
  if (row_bytes % 16 == 0 && aligned16(table.data) && aligned16(out.data)) {
    const uint4 nan = make_uint4(nan_bits, nan_bits, nan_bits, nan_bits);
    embedding_forward_kernel<uint4><<<grid, kThreads, 0, s>>>(id, table.ptr<const uint4>(), out.ptr<uint4>(), N, V,
                                                              row_bytes / 16, nan);
  } else if (row_bytes % 4 == 0) {
    embedding_forward_kernel<uint32_t><<<grid, kThreads, 0, s>>>(id, table.ptr<const uint32_t>(), out.ptr<uint32_t>(),
                                                                 N, V, row_bytes / 4, nan_bits);
  } else {
    embedding_forward_kernel<uint16_t><<<grid, kThreads, 0, s>>>(id, table.ptr<const uint16_t>(), out.ptr<uint16_t>(),
                                                                 N, V, row_bytes / 2, uint16_t(0x7fc0));
  }
  CUDA_CHECK(cudaGetLastError());
}

void embedding_backward_cuda(const TensorView& dout, const TensorView& ids, const TensorView& dtable, void* stream) {
  const char* op = "embedding_backward_cuda";
  check_tensor(dout, op, "dout");
  check_tensor(dtable, op, "dtable");
  check_tensor(ids, op, "ids");
  check_float(dout, op, "dout");
  check_dtype(ids, DType::I32, op, "ids");
  check_same_device(ids, dtable, op, "ids", "dtable");
  check_same_device(dout, dtable, op, "dout", "dtable");
  TK_CHECK(dtable.ndim == 2 && dtable.dtype == DType::F32, op, ": dtable ", describe(dtable), " must be [V, D] f32");
  const int64_t V = dtable.shape[0], D = dtable.shape[1];
  const int64_t N = ids.numel();
  TK_CHECK(dout.numel() == N * D, op, ": dout ", describe(dout), " must hold ", N, " x ", D, " elements (ids ",
           describe(ids), ", dtable ", describe(dtable), ")");
  const cudaStream_t s = as_stream(stream);
  if (V * D > 0) CUDA_CHECK(cudaMemsetAsync(dtable.data, 0, size_t(V * D) * sizeof(float), s));
  if (N == 0 || D == 0 || V == 0) return;
  const int device = dtable.device.index;
  const bool vec = D % 4 == 0 && aligned16(dtable.data) &&
                   (dout.dtype == DType::F32 ? aligned16(dout.data) : (reinterpret_cast<uintptr_t>(dout.data) & 7u) == 0);
  const int64_t cols_per_tile = vec ? 128 : 32;
  const int64_t tiles = (D + cols_per_tile - 1) / cols_per_tile;
  // Residue classes: enough warps for every SM's 64 warp slots; more would only add id scans.
  const int64_t want_warps = int64_t(sm_count(device)) * 64;
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(V, (want_warps + tiles - 1) / tiles));
  const unsigned grid = grid_cap((tiles * R + kThreads / 32 - 1) / (kThreads / 32), device);
  const int32_t* id = ids.ptr<const int32_t>();
  float* dt = dtable.ptr<float>();
  if (dout.dtype == DType::BF16) {
    if (vec)
      embedding_backward_kernel<BF16T, 4><<<grid, kThreads, 0, s>>>(dout.ptr<const uint16_t>(), id, dt, N, V, D, R, tiles);
    else
      embedding_backward_kernel<BF16T, 1><<<grid, kThreads, 0, s>>>(dout.ptr<const uint16_t>(), id, dt, N, V, D, R, tiles);
  } else {
    if (vec)
      embedding_backward_kernel<F32T, 4><<<grid, kThreads, 0, s>>>(dout.ptr<const float>(), id, dt, N, V, D, R, tiles);
    else
      embedding_backward_kernel<F32T, 1><<<grid, kThreads, 0, s>>>(dout.ptr<const float>(), id, dt, N, V, D, R, tiles);
  }
  CUDA_CHECK(cudaGetLastError());
}

void rope_forward_cuda(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                       const std::vector<float>& inv_freq, float attention_factor, const TensorView& out,
                       void* stream) {
  rope_apply("rope_forward_cuda", "x", "out", x, positions, positions_per_batch, inv_freq, attention_factor, 1.0f,
             out, stream);
}

void rope_backward_cuda(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                        const std::vector<float>& inv_freq, float attention_factor, const TensorView& dx,
                        void* stream) {
  // The transpose of [[c, -s], [s, c]] is the same rotation with s negated.
  rope_apply("rope_backward_cuda", "dy", "dx", dy, positions, positions_per_batch, inv_freq, attention_factor, -1.0f,
             dx, stream);
}

}  // namespace tk
