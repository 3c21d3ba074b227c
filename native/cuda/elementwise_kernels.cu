// CUDA elementwise and reduction kernels (see elementwise_kernels.h for the contracts and the
// design). Conventions of this file:
// - Host functions validate like the CPU kernels (same conditions, messages naming the _cuda op)
//   before anything is launched, coalesce the iteration space, pick a path and launch on the
//   caller's stream; every launch is checked with cudaGetLastError.
// - Kernels are templated on the storage type only where the inner loop depends on it (flat
//   float paths, sums); the strided copy and transpose read and write through a runtime dtype
//   switch instead, which costs a few uniform branches per element but keeps the 25 dtype pairs
//   from becoming 25 instantiations per kernel (compile time).
#include "elementwise_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../core/error.h"
#include "../core/rng.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;     // 2048 resident threads per SM: the occupancy limit on sm_80/sm_90
constexpr int kConcatBatch = 8;     // inputs per concat launch (kernel parameter space)

// ================================ host helpers ===================================================

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return 80;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Blocks of kThreads for `items` work items handled one per thread, capped for grid-stride loops.
unsigned grid_for(int64_t items, int device) {
  const int64_t want = (items + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sm_count(device)) * kBlocksPerSm;
  return unsigned(std::max<int64_t>(1, std::min(want, cap)));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_view(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CUDA, op, ": ", what, " is on ", v.device.name(), ", expected cuda");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
}

void check_same_device(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  TK_CHECK(a.device == b.device, op, ": ", an, " is on ", a.device.name(), " but ", bn, " is on ", b.device.name());
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* op, const char* an, const char* bn) {
  bool same = a.ndim == b.ndim;
  for (int d = 0; same && d < a.ndim; ++d) same = a.shape[d] == b.shape[d];
  TK_CHECK(same, op, ": ", an, " ", describe(a), " and ", bn, " ", describe(b), " must have the same shape");
}

// Scratch device memory for one call, from the stream-ordered allocator: released on the same
// stream right after the kernels are issued, so a later user of the block runs after them.
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
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  int device_;
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// ================================ device scalars =================================================

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// core/dtype.h's f32_to_bf16, bit for bit (cvt.rn.bf16 would canonicalize NaN payloads).
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ float f16_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// Nearest even with subnormals and overflow to inf (the hardware conversion), NaN as dtype.h.
__device__ __forceinline__ uint16_t float_to_f16(float f) {
  if (f != f) return uint16_t(((__float_as_uint(f) >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(f));
}

__device__ __forceinline__ int32_t sat_i32(float v) {
  if (!(v == v)) return 0;
  if (v >= 2147483648.0f) return 2147483647;
  if (v <= -2147483648.0f) return -2147483647 - 1;
  return int32_t(v);
}

__device__ __forceinline__ uint32_t sat_u8(float v) {
  if (!(v == v)) return 0;
  if (v >= 255.0f) return 255;
  if (v <= 0.0f) return 0;
  return uint32_t(v);
}

// Storage tags: S is the stored type, C the type arithmetic happens in.
struct F32T {
  using S = float;
  using C = float;
  __device__ static float ld(float v) { return v; }
  __device__ static float st(float v) { return v; }
};
struct BF16T {
  using S = uint16_t;
  using C = float;
  __device__ static float ld(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t st(float v) { return float_to_bf16(v); }
};
struct F16T {
  using S = uint16_t;
  using C = float;
  __device__ static float ld(uint16_t v) { return f16_to_float(v); }
  __device__ static uint16_t st(float v) { return float_to_f16(v); }
};
// i32 arithmetic is done unsigned, so overflow wraps as on the CPU instead of being undefined.
struct I32T {
  using S = int32_t;
  using C = uint32_t;
  __device__ static uint32_t ld(int32_t v) { return uint32_t(v); }
  __device__ static int32_t st(uint32_t v) { return int32_t(v); }
};

// 8 elements at p (16-byte aligned): two 128-bit loads for f32, one for 16-bit types.
template <class T>
__device__ __forceinline__ void load8(const typename T::S* p, float v[8]) {
  if constexpr (sizeof(typename T::S) == 4) {
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

template <class T>
__device__ __forceinline__ void store8(typename T::S* p, const float v[8]) {
  if constexpr (sizeof(typename T::S) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = uint32_t(T::st(v[2 * k])) | (uint32_t(T::st(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// Grid-stride over [0, n): body8(e) for each whole group [e, e + 8) when vec, then body1(e) for
// the remaining elements (all of them when !vec).
template <class B8, class B1>
__device__ __forceinline__ void flat_for(int64_t n, bool vec, B8&& body8, B1&& body1) {
  const int64_t t = global_thread(), stride = grid_threads();
  int64_t done = 0;
  if (vec) {
    const int64_t groups = n / 8;
    for (int64_t g = t; g < groups; g += stride) body8(g * 8);
    done = groups * 8;
  }
  for (int64_t e = done + t; e < n; e += stride) body1(e);
}

__device__ __forceinline__ float apply_op(BinaryOp op, float a, float b) {
  return op == BinaryOp::Add ? a + b : op == BinaryOp::Sub ? a - b : a * b;
}
__device__ __forceinline__ uint32_t apply_op(BinaryOp op, uint32_t a, uint32_t b) {
  return op == BinaryOp::Add ? a + b : op == BinaryOp::Sub ? a - b : a * b;
}

// ================================ strided walks ==================================================

// Coalesced iteration space of a contiguous output and K strided inputs (cpu/elementwise.cpp's
// make_walk): size-1 dims dropped, neighbours contiguous in every input merged.
template <int K>
struct Walk {
  int nd = 0;
  int64_t shape[kMaxDims] = {};
  int64_t st[K][kMaxDims] = {};
};

template <int K>
Walk<K> make_walk(const TensorView& out, const TensorView* const* in) {
  Walk<K> w;
  for (int d = 0; d < out.ndim; ++d) {
    if (out.shape[d] == 1) continue;
    const int n = w.nd;
    bool merge = n > 0;
    for (int k = 0; k < K && merge; ++k) merge = w.st[k][n - 1] == in[k]->strides[d] * out.shape[d];
    if (merge) {
      w.shape[n - 1] *= out.shape[d];
      for (int k = 0; k < K; ++k) w.st[k][n - 1] = in[k]->strides[d];
    } else {
      w.shape[n] = out.shape[d];
      for (int k = 0; k < K; ++k) w.st[k][n] = in[k]->strides[d];
      ++w.nd;
    }
  }
  if (w.nd == 0) {
    w.nd = 1;
    w.shape[0] = 1;
  }
  return w;
}

// Offsets of flat output element e in each input. Div is uint32_t when every index fits, which
// makes the divisions several times cheaper than 64-bit ones.
template <class Div, int K>
__device__ __forceinline__ void walk_offsets(const Walk<K>& w, int64_t e, int64_t off[K]) {
  Div rem = Div(e);
#pragma unroll
  for (int k = 0; k < K; ++k) off[k] = 0;
  for (int d = w.nd - 1; d >= 0; --d) {
    const Div size = Div(w.shape[d]);
    const Div q = rem / size;
    const int64_t i = int64_t(rem - q * size);
    rem = q;
#pragma unroll
    for (int k = 0; k < K; ++k) off[k] += i * w.st[k][d];
  }
}

// ================================ binary / scale =================================================

template <class T>
__global__ void __launch_bounds__(kThreads)
    binary_flat_kernel(BinaryOp op, const typename T::S* a, bool a_bcast, const typename T::S* b, bool b_bcast,
                       typename T::S* o, int64_t n, bool vec) {
  const float a0 = a_bcast ? T::ld(a[0]) : 0.0f, b0 = b_bcast ? T::ld(b[0]) : 0.0f;
  flat_for(
      n, vec,
      [&](int64_t e) {
        float x[8], y[8];
        if (a_bcast) {
#pragma unroll
          for (int k = 0; k < 8; ++k) x[k] = a0;
        } else {
          load8<T>(a + e, x);
        }
        if (b_bcast) {
#pragma unroll
          for (int k = 0; k < 8; ++k) y[k] = b0;
        } else {
          load8<T>(b + e, y);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = apply_op(op, x[k], y[k]);
        store8<T>(o + e, x);
      },
      [&](int64_t e) {
        const float x = a_bcast ? a0 : T::ld(a[e]), y = b_bcast ? b0 : T::ld(b[e]);
        o[e] = T::st(apply_op(op, x, y));
      });
}

template <class T, class Div>
__global__ void __launch_bounds__(kThreads)
    binary_strided_kernel(BinaryOp op, const typename T::S* a, const typename T::S* b, typename T::S* o, int64_t n,
                          Walk<2> w) {
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    int64_t off[2];
    walk_offsets<Div, 2>(w, e, off);
    o[e] = T::st(apply_op(op, T::ld(a[off[0]]), T::ld(b[off[1]])));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const typename T::S* x, float alpha, typename T::S* o, int64_t n, bool vec) {
  flat_for(
      n, vec,
      [&](int64_t e) {
        float v[8];
        load8<T>(x + e, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = alpha * v[k];
        store8<T>(o + e, v);
      },
      [&](int64_t e) { o[e] = T::st(alpha * T::ld(x[e])); });
}

// Calls f(Tag{}) for a floating dtype.
template <class F>
void with_float_tag(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(F32T{});
    case DType::BF16: return f(BF16T{});
    case DType::F16: return f(F16T{});
    default: fail("internal: not a floating dtype: ", dtype_name(t));
  }
}

bool fits_u32(int64_t n) { return n < (int64_t(1) << 32); }

// ================================ sum ============================================================

// Dims of one kind (kept or reduced) with x's strides.
struct Dims {
  int n = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  __host__ __device__ int64_t count() const {
    int64_t c = 1;
    for (int i = 0; i < n; ++i) c *= size[i];
    return c;
  }
  void add(int64_t s, int64_t st) {
    size[n] = s;
    stride[n] = st;
    ++n;
  }
  // Merges neighbours whose strides make them one run.
  void coalesce() {
    Dims c;
    for (int i = 0; i < n; ++i) {
      if (c.n > 0 && c.stride[c.n - 1] == stride[i] * size[i]) {
        c.size[c.n - 1] *= size[i];
        c.stride[c.n - 1] = stride[i];
      } else {
        c.add(size[i], stride[i]);
      }
    }
    *this = c;
  }
};

// Offset of the flat index m over the first `nd` dims of d (last of them fastest).
__device__ __forceinline__ int64_t dims_offset(const Dims& d, int nd, int64_t m) {
  int64_t off = 0;
  for (int k = nd - 1; k >= 0; --k) {
    const int64_t q = m / d.size[k];
    off += (m - q * d.size[k]) * d.stride[k];
    m = q;
  }
  return off;
}

// A multi-index over reduced dims that advances without dividing unless a dim wraps.
struct Odometer {
  int64_t idx[kMaxDims];
  int64_t off;
  __device__ void init(const Dims& d, int64_t j) {
    off = 0;
    for (int k = d.n - 1; k >= 0; --k) {
      const int64_t q = j / d.size[k];
      idx[k] = j - q * d.size[k];
      off += idx[k] * d.stride[k];
      j = q;
    }
  }
  __device__ void advance(const Dims& d, int64_t step) {
    int k = d.n - 1;
    idx[k] += step;
    off += step * d.stride[k];
    while (k > 0 && idx[k] >= d.size[k]) {
      const int64_t q = idx[k] / d.size[k];
      idx[k] -= q * d.size[k];
      off += q * (d.stride[k - 1] - d.size[k] * d.stride[k]);
      idx[k - 1] += q;
      --k;
    }
  }
};

struct SumPlan {
  Dims kept, red;
  int64_t M = 0, N = 0;  // outputs; reduced elements per output
  int64_t S = 1, C = 0;  // splits per output; reduced elements per split
  int64_t Lk = 1;        // column mode: extent of the contiguous kept dim (kept's last)
  int ct = 32, jp = 1;   // column mode: threads across columns, phases across reduced rows
};

// Accumulator per storage tag: fp32 for floats, int64 for i32 (wrapped to int32 at the end).
template <class T>
struct SumAcc {
  using A = float;
  __device__ static float load(typename T::S v) { return T::ld(v); }
  __device__ static typename T::S finish(float v) { return T::st(v); }
};
template <>
struct SumAcc<I32T> {
  using A = long long;
  __device__ static long long load(int32_t v) { return v; }
  __device__ static int32_t finish(long long v) { return int32_t(uint32_t(static_cast<unsigned long long>(v))); }
};

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of elements j0 + ph, j0 + ph + step, ... < j1 of the reduced range at base.
template <class T, class A = typename SumAcc<T>::A>
__device__ __forceinline__ A sum_strided(const typename T::S* x, int64_t base, const Dims& red, int64_t j0, int64_t j1,
                                         int64_t step) {
  A acc = 0;
  if (j0 >= j1) return acc;
  if (red.n == 1) {
    const int64_t rs = red.stride[0];
#pragma unroll 4
    for (int64_t j = j0; j < j1; j += step) acc += SumAcc<T>::load(x[base + j * rs]);
  } else {
    Odometer o;
    o.init(red, j0);
    for (int64_t j = j0; j < j1; j += step) {
      acc += SumAcc<T>::load(x[base + o.off]);
      if (j + step < j1) o.advance(red, step);
    }
  }
  return acc;
}

// Run mode: one warp per (output m, split s); lanes take every 32nd reduced element.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_run_kernel(const typename T::S* x, SumPlan p, typename T::S* out, typename SumAcc<T>::A* partial) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t task = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; task < p.M * p.S; task += warps) {
    const int64_t m = task / p.S, s = task - m * p.S;
    const int64_t j0 = s * p.C, j1 = min(p.N, j0 + p.C);
    auto acc = warp_sum(sum_strided<T>(x, dims_offset(p.kept, p.kept.n, m), p.red, j0 + lane, j1, 32));
    if (lane == 0) {
      if (p.S == 1) out[m] = SumAcc<T>::finish(acc);
      else partial[m * p.S + s] = acc;
    }
  }
}

// Short reductions (N <= 32): one thread per output, adding its elements in order, so a sum over
// a small trailing axis does not leave most lanes of a warp idle.
template <class T>
__global__ void __launch_bounds__(kThreads) sum_thread_kernel(const typename T::S* x, SumPlan p, typename T::S* out) {
  for (int64_t m = global_thread(); m < p.M; m += grid_threads())
    out[m] = SumAcc<T>::finish(sum_strided<T>(x, dims_offset(p.kept, p.kept.n, m), p.red, 0, p.N, 1));
}

// Column mode: the innermost kept dim is contiguous, so threads take adjacent outputs (coalesced
// loads) and walk the reduced index; jp phases per column split the rows, then fold in shared
// memory in a fixed tree.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_col_kernel(const typename T::S* x, SumPlan p, typename T::S* out, typename SumAcc<T>::A* partial) {
  using A = typename SumAcc<T>::A;
  __shared__ A sh[kThreads];
  const int tx = threadIdx.x % p.ct, ph = threadIdx.x / p.ct;
  const int64_t tiles = (p.Lk + p.ct - 1) / p.ct, Mo = p.M / p.Lk;
  const int64_t tasks = tiles * Mo * p.S;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t tile = task % tiles, rest = task / tiles;
    const int64_t s = rest % p.S, mo = rest / p.S;
    const int64_t c = tile * p.ct + tx;
    A acc = 0;
    if (c < p.Lk) {
      const int64_t base = dims_offset(p.kept, p.kept.n - 1, mo) + c;
      const int64_t j0 = s * p.C, j1 = min(p.N, j0 + p.C);
      acc = sum_strided<T>(x, base, p.red, j0 + ph, j1, p.jp);
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int h = p.jp / 2; h >= 1; h /= 2) {
      if (ph < h) sh[threadIdx.x] += sh[threadIdx.x + h * p.ct];
      __syncthreads();
    }
    if (ph == 0 && c < p.Lk) {
      const int64_t m = mo * p.Lk + c;
      if (p.S == 1) out[m] = SumAcc<T>::finish(sh[threadIdx.x]);
      else partial[s * p.M + m] = sh[threadIdx.x];
    }
    __syncthreads();
  }
}

// Adds the S partials of each output in a fixed order (a warp per output, lanes strided over s).
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_finish_kernel(const typename SumAcc<T>::A* partial, int64_t M, int64_t S, int64_t m_stride, int64_t s_stride,
                      typename T::S* out) {
  using A = typename SumAcc<T>::A;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t m = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; m < M; m += warps) {
    A acc = 0;
    for (int64_t s = lane; s < S; s += 32) acc += partial[m * m_stride + s * s_stride];
    acc = warp_sum(acc);
    if (lane == 0) out[m] = SumAcc<T>::finish(acc);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class SumMode { Thread, Run, Column };

template <class T>
void launch_sum(const TensorView& x, SumPlan p, SumMode mode, const TensorView& out, cudaStream_t stream) {
  using A = typename SumAcc<T>::A;
  using S = typename T::S;
  const int device = x.device.index;
  const S* xs = x.ptr<const S>();
  S* os = out.ptr<S>();
  Scratch scratch(device, p.S > 1 ? size_t(p.M * p.S) * sizeof(A) : 0, stream);
  const int64_t cap = int64_t(sm_count(device)) * kBlocksPerSm;
  const bool column_mode = mode == SumMode::Column;
  if (mode == SumMode::Thread) {
    sum_thread_kernel<T><<<unsigned(std::min(ceil_div(p.M, kThreads), cap)), kThreads, 0, stream>>>(xs, p, os);
  } else if (column_mode) {
    const int64_t tasks = ceil_div(p.Lk, p.ct) * (p.M / p.Lk) * p.S;
    sum_col_kernel<T><<<unsigned(std::min(tasks, cap)), kThreads, 0, stream>>>(xs, p, os, scratch.as<A>());
  } else {
    const int64_t blocks = ceil_div(p.M * p.S, kThreads / 32);
    sum_run_kernel<T><<<unsigned(std::min(blocks, cap)), kThreads, 0, stream>>>(xs, p, os, scratch.as<A>());
  }
  CUDA_CHECK(cudaGetLastError());
  if (p.S > 1) {
    const int64_t blocks = ceil_div(p.M, kThreads / 32);
    const int64_t ms = column_mode ? 1 : p.S, ss = column_mode ? p.M : 1;
    sum_finish_kernel<T><<<unsigned(std::min(blocks, cap)), kThreads, 0, stream>>>(scratch.as<A>(), p.M, p.S, ms, ss, os);
    CUDA_CHECK(cudaGetLastError());
  }
}

// ================================ copy / cast ====================================================

__device__ __forceinline__ uint32_t load_bits(const void* base, int64_t off, int es) {
  if (es == 4) return static_cast<const uint32_t*>(base)[off];
  if (es == 2) return static_cast<const uint16_t*>(base)[off];
  return static_cast<const uint8_t*>(base)[off];
}

__device__ __forceinline__ void store_bits(void* base, int64_t off, int es, uint32_t v) {
  if (es == 4) static_cast<uint32_t*>(base)[off] = v;
  else if (es == 2) static_cast<uint16_t*>(base)[off] = uint16_t(v);
  else static_cast<uint8_t*>(base)[off] = uint8_t(v);
}

// The bits of dtype dt that cpu/elementwise.cpp's convert<S, D> gives for the bits of dtype st.
__device__ __forceinline__ uint32_t convert_bits(uint32_t bits, DType st, DType dt) {
  if (st == dt) return bits;
  const bool s_int = st == DType::I32 || st == DType::U8;
  float f = 0.0f;
  int32_t i = 0;
  switch (st) {
    case DType::F32: f = __uint_as_float(bits); break;
    case DType::BF16: f = bf16_to_float(uint16_t(bits)); break;
    case DType::F16: f = f16_to_float(uint16_t(bits)); break;
    case DType::I32: i = int32_t(bits); break;
    case DType::U8: i = int32_t(bits & 0xffu); break;
  }
  if (s_int && (dt == DType::F32 || dt == DType::BF16 || dt == DType::F16)) f = float(i);  // nearest even
  switch (dt) {
    case DType::F32: return __float_as_uint(f);
    case DType::BF16: return float_to_bf16(f);
    case DType::F16: return float_to_f16(f);
    case DType::I32: return s_int ? uint32_t(i) : uint32_t(sat_i32(f));
    case DType::U8: return s_int ? uint32_t(min(255, max(0, i))) : sat_u8(f);
  }
  return 0;
}

template <class ST, class DT>
__global__ void __launch_bounds__(kThreads)
    cast_flat_kernel(const typename ST::S* src, typename DT::S* dst, int64_t n, bool vec) {
  flat_for(
      n, vec,
      [&](int64_t e) {
        float v[8];
        load8<ST>(src + e, v);
        store8<DT>(dst + e, v);
      },
      [&](int64_t e) { dst[e] = DT::st(ST::ld(src[e])); });
}

template <class Div>
__global__ void __launch_bounds__(kThreads)
    copy_gather_kernel(const void* src, DType st, void* dst, DType dt, int64_t n, Walk<1> w) {
  const int ses = st == DType::U8 ? 1 : (st == DType::F32 || st == DType::I32) ? 4 : 2;
  const int des = dt == DType::U8 ? 1 : (dt == DType::F32 || dt == DType::I32) ? 4 : 2;
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    int64_t off[1];
    walk_offsets<Div, 1>(w, e, off);
    store_bits(dst, e, des, convert_bits(load_bits(src, off[0], ses), st, dt));
  }
}

// A copy whose source is contiguous along walk dim k (not the last): the (k, last) plane is moved
// in 32 x 32 tiles through shared memory, read along k and written along last.
struct TransposePlan {
  int64_t K = 1, L = 1;           // extents of dim k and of the last dim
  int64_t sk = 1, sl = 1, dk = 1;  // source strides of k and last; destination stride of k
  int no = 0;                      // the other dims, outermost first
  int64_t osize[kMaxDims] = {}, osrc[kMaxDims] = {}, odst[kMaxDims] = {};
  int64_t outer = 1;
};

__global__ void __launch_bounds__(kThreads)
    copy_transpose_kernel(const void* src, DType st, void* dst, DType dt, TransposePlan p) {
  __shared__ uint32_t tile[32][33];
  const int ses = st == DType::U8 ? 1 : (st == DType::F32 || st == DType::I32) ? 4 : 2;
  const int des = dt == DType::U8 ? 1 : (dt == DType::F32 || dt == DType::I32) ? 4 : 2;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8 threads
  const int64_t tk_n = (p.K + 31) / 32, tl_n = (p.L + 31) / 32;
  const int64_t tasks = p.outer * tk_n * tl_n;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t tl = task % tl_n, rest = task / tl_n;
    const int64_t tk = rest % tk_n;
    int64_t o = rest / tk_n, sbase = 0, dbase = 0;
    for (int d = p.no - 1; d >= 0; --d) {
      const int64_t q = o / p.osize[d], i = o - q * p.osize[d];
      sbase += i * p.osrc[d];
      dbase += i * p.odst[d];
      o = q;
    }
    const int64_t k = tk * 32 + tx;
    for (int r = ty; r < 32; r += 8) {
      const int64_t l = tl * 32 + r;
      if (k < p.K && l < p.L) tile[r][tx] = convert_bits(load_bits(src, sbase + k * p.sk + l * p.sl, ses), st, dt);
    }
    __syncthreads();
    const int64_t l = tl * 32 + tx;
    for (int r = ty; r < 32; r += 8) {
      const int64_t kk = tk * 32 + r;
      if (kk < p.K && l < p.L) store_bits(dst, dbase + kk * p.dk + l, des, tile[tx][r]);
    }
    __syncthreads();
  }
}

// ================================ fill / randn / dropout =========================================

// Writes the element bits in `pattern` (repeated to 16 bytes) over n elements of es bytes: 128-bit
// stores for the aligned body, then element stores for the tail.
__global__ void __launch_bounds__(kThreads) fill_kernel(void* out, int64_t n, int es, uint4 pattern, bool vec) {
  const int64_t t = global_thread(), stride = grid_threads();
  int64_t done = 0;
  if (vec) {
    const int64_t groups = n * es / 16;
    for (int64_t g = t; g < groups; g += stride) static_cast<uint4*>(out)[g] = pattern;
    done = groups * 16 / es;
  }
  for (int64_t e = done + t; e < n; e += stride) store_bits(out, e, es, pattern.x);
}

// Box-Muller on one Philox block, with log/sin/cos in double and one rounding to fp32 (see the
// header: these are the correctly rounded fp32 values), and no contraction into FMAs, which would
// change the CPU's roundings.
__device__ __forceinline__ void normal4(uint64_t seed, uint64_t block, float z[4]) {
  const Philox4x32 r = philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = uniform24(r.v[2 * pair]), u2 = uniform24(r.v[2 * pair + 1]);
    const float radius = __fsqrt_rn(__fmul_rn(-2.0f, __double2float_rn(log(double(u1)))));
    const float theta = __fmul_rn(6.28318530717958647692f, u2);
    double s, c;
    sincos(double(theta), &s, &c);
    z[2 * pair] = __fmul_rn(radius, __double2float_rn(c));
    z[2 * pair + 1] = __fmul_rn(radius, __double2float_rn(s));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    randn_kernel(typename T::S* out, int64_t n, uint64_t seed, float mean, float stddev) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = global_thread(); b < blocks; b += grid_threads()) {
    float z[4];
    normal4(seed, uint64_t(b), z);
    const int64_t e0 = b * 4;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e0 + k < n) out[e0 + k] = T::st(__fadd_rn(mean, __fmul_rn(stddev, z[k])));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const typename T::S* x, typename T::S* out, int64_t n, uint64_t seed, float p, float scale,
                   bool vec) {
  flat_for(
      n, vec,
      [&](int64_t e) {  // e is a multiple of 8: Philox blocks e/4 and e/4 + 1 decide the group
        float v[8];
        load8<T>(x + e, v);
        const uint64_t b = uint64_t(e) >> 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const Philox4x32 r = philox_block(seed, (b + h) << 2);
#pragma unroll
          for (int k = 0; k < 4; ++k) v[4 * h + k] = uniform24(r.v[k]) > p ? __fmul_rn(v[4 * h + k], scale) : 0.0f;
        }
        store8<T>(out + e, v);
      },
      [&](int64_t e) { out[e] = T::st(dropout_keep(seed, uint64_t(e), p) ? __fmul_rn(T::ld(x[e]), scale) : 0.0f); });
}

// ================================ concat =========================================================

struct ConcatBatch {
  const void* src[kConcatBatch] = {};
  int64_t width[kConcatBatch] = {};      // units per row of each input
  int64_t start[kConcatBatch + 1] = {};  // first unit of each input within the batch's span
  int count = 0;
};

// Out rows are the inputs' rows back to back; this launch writes units [col0, col0 + span) of
// each of `rows` out rows (out_row units long), taken from the batch's inputs.
template <class U>
__global__ void __launch_bounds__(kThreads)
    concat_kernel(ConcatBatch b, U* out, int64_t rows, int64_t out_row, int64_t col0) {
  const int64_t span = b.start[b.count];
  const int64_t n = rows * span;
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    const int64_t r = e / span, c = e - r * span;
    int i = 0;
    while (c >= b.start[i + 1]) ++i;
    out[r * out_row + col0 + c] = static_cast<const U*>(b.src[i])[r * b.width[i] + (c - b.start[i])];
  }
}

template <class U>
void launch_concat(const ConcatBatch& b, void* out, int64_t rows, int64_t out_row, int64_t col0, int device,
                   cudaStream_t stream) {
  const int64_t n = rows * b.start[b.count];
  if (n == 0) return;
  concat_kernel<U><<<grid_for(n, device), kThreads, 0, stream>>>(b, static_cast<U*>(out), rows, out_row, col0);
  CUDA_CHECK(cudaGetLastError());
}

// Host-side conversions for fill (the CPU's rules: through fp32 for floats, saturating for ints).
int32_t host_sat_i32(double v) {
  if (!(v == v)) return 0;
  if (v >= 2147483648.0) return std::numeric_limits<int32_t>::max();
  if (v <= -2147483648.0) return std::numeric_limits<int32_t>::min();
  return int32_t(v);
}
uint8_t host_sat_u8(double v) {
  if (!(v == v)) return 0;
  if (v >= 255.0) return 255;
  if (v <= 0.0) return 0;
  return uint8_t(v);
}

}  // namespace

// ================================ entry points ===================================================

void binary_cuda(BinaryOp op, const TensorView& a, const TensorView& b, const TensorView& out, void* stream) {
  const char* name = "binary_cuda";
  check_view(a, name, "a");
  check_view(b, name, "b");
  check_view(out, name, "out");
  check_same_device(a, out, name, "a", "out");
  check_same_device(b, out, name, "b", "out");
  check_same_shape(a, out, name, "a", "out");
  check_same_shape(b, out, name, "b", "out");
  TK_CHECK(a.dtype == out.dtype && b.dtype == out.dtype, name, ": dtypes differ (a ", dtype_name(a.dtype), ", b ",
           dtype_name(b.dtype), ", out ", dtype_name(out.dtype), ")");
  TK_CHECK(out.dtype != DType::U8, name, ": u8 is not supported (f32, bf16, f16 or i32)");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int device = out.device.index;
  const TensorView* ins[2] = {&a, &b};
  const Walk<2> w = make_walk<2>(out, ins);
  const bool flat = w.nd == 1 && (w.st[0][0] == 0 || w.st[0][0] == 1) && (w.st[1][0] == 0 || w.st[1][0] == 1);

  if (flat && out.dtype != DType::I32) {
    const bool ab = w.st[0][0] == 0 || n == 1, bb = w.st[1][0] == 0 || n == 1;
    const bool vec = (ab || aligned16(a.data)) && (bb || aligned16(b.data)) && aligned16(out.data);
    with_float_tag(out.dtype, [&](auto tag) {
      using T = decltype(tag);
      using S = typename T::S;
      binary_flat_kernel<T><<<grid_for(vec ? n / 8 + 1 : n, device), kThreads, 0, s>>>(
          op, a.ptr<const S>(), ab, b.ptr<const S>(), bb, out.ptr<S>(), n, vec);
    });
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::S;
    if (fits_u32(n))
      binary_strided_kernel<T, uint32_t><<<grid_for(n, device), kThreads, 0, s>>>(op, a.ptr<const S>(), b.ptr<const S>(),
                                                                                  out.ptr<S>(), n, w);
    else
      binary_strided_kernel<T, uint64_t><<<grid_for(n, device), kThreads, 0, s>>>(op, a.ptr<const S>(), b.ptr<const S>(),
                                                                                  out.ptr<S>(), n, w);
  };
  if (out.dtype == DType::I32) launch(I32T{});
  else with_float_tag(out.dtype, launch);
  CUDA_CHECK(cudaGetLastError());
}

void scale_cuda(const TensorView& x, float alpha, const TensorView& out, void* stream) {
  const char* name = "scale_cuda";
  check_view(x, name, "x");
  check_view(out, name, "out");
  check_same_device(x, out, name, "x", "out");
  check_same_shape(x, out, name, "x", "out");
  TK_CHECK(x.dtype == out.dtype && is_floating(x.dtype), name, ": x ", describe(x), " and out ", describe(out),
           " must share a floating dtype");
  TK_CHECK(x.is_contiguous() && out.is_contiguous(), name, ": x and out must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  const bool vec = aligned16(x.data) && aligned16(out.data);
  with_float_tag(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::S;
    scale_kernel<T><<<grid_for(vec ? n / 8 + 1 : n, out.device.index), kThreads, 0, as_stream(stream)>>>(
        x.ptr<const S>(), alpha, out.ptr<S>(), n, vec);
  });
  CUDA_CHECK(cudaGetLastError());
}

void sum_cuda(const TensorView& x, uint32_t axes_mask, const TensorView& out, void* stream) {
  const char* name = "sum_cuda";
  check_view(x, name, "x");
  check_view(out, name, "out");
  check_same_device(x, out, name, "x", "out");
  TK_CHECK(x.dtype == out.dtype, name, ": x ", describe(x), " and out ", describe(out), " must share a dtype");
  TK_CHECK(is_floating(x.dtype) || x.dtype == DType::I32, name, ": ", dtype_name(x.dtype),
           " is not supported (f32, bf16, f16 or i32)");
  TK_CHECK(x.ndim == out.ndim, name, ": out ", describe(out), " must keep the rank of x ", describe(x));
  TK_CHECK((axes_mask >> x.ndim) == 0, name, ": axes mask 0x", std::hex, axes_mask, " names axes beyond rank ",
           std::dec, x.ndim);
  for (int d = 0; d < x.ndim; ++d) {
    const bool reduced = (axes_mask >> d) & 1u;
    TK_CHECK(out.shape[d] == (reduced ? 1 : x.shape[d]), name, ": out ", describe(out), " does not match x ",
             describe(x), " summed over axis mask 0x", std::hex, axes_mask);
  }
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  if (out.numel() == 0) return;
  if (x.numel() == 0) {  // an empty sum is zero
    fill_cuda(out, 0.0, stream);
    return;
  }
  SumPlan p;
  for (int d = 0; d < x.ndim; ++d) {
    if (x.shape[d] == 1) continue;
    if ((axes_mask >> d) & 1u) p.red.add(x.shape[d], x.strides[d]);
    else p.kept.add(x.shape[d], x.strides[d]);
  }
  if (p.red.n == 0) {  // nothing to add up: out has x's shape
    copy_cuda(x, out, stream);
    return;
  }
  {  // The reduced dims' order is free: largest stride first makes the innermost run the densest.
    int order[kMaxDims];
    for (int i = 0; i < p.red.n; ++i) order[i] = i;
    std::stable_sort(order, order + p.red.n,
                     [&](int i, int j) { return std::llabs(p.red.stride[i]) > std::llabs(p.red.stride[j]); });
    Dims sorted;
    for (int i = 0; i < p.red.n; ++i) sorted.add(p.red.size[order[i]], p.red.stride[order[i]]);
    p.red = sorted;
  }
  p.kept.coalesce();
  p.red.coalesce();
  p.M = p.kept.count();
  p.N = p.red.count();

  // The split counts below depend only on (M, N), which fixes every summation order.
  const bool column_mode = p.kept.n > 0 && p.kept.stride[p.kept.n - 1] == 1 && p.red.stride[p.red.n - 1] != 1;
  const SumMode mode = column_mode ? SumMode::Column : p.N <= 32 ? SumMode::Thread : SumMode::Run;
  if (mode == SumMode::Thread) {
    p.S = 1;
    p.C = p.N;
  } else if (column_mode) {
    p.Lk = p.kept.size[p.kept.n - 1];
    int ct = 32;
    while (ct < kThreads && ct < p.Lk) ct *= 2;
    p.ct = ct;
    p.jp = kThreads / ct;
    // About 2^18 threads in flight, each summing at least 32 rows.
    const int64_t want = ceil_div(int64_t(1) << 18, p.M * p.jp);
    p.S = std::max<int64_t>(1, std::min(want, p.N / (int64_t(p.jp) * 32)));
    p.C = ceil_div(p.N, p.S);
  } else {
    // About 8192 warps in flight, each lane summing at least 32 elements.
    const int64_t want = ceil_div(8192, p.M);
    p.S = std::max<int64_t>(1, std::min(want, p.N / 1024));
    p.C = ceil_div(ceil_div(p.N, p.S), 32) * 32;
  }
  p.S = ceil_div(p.N, p.C);

  const cudaStream_t s = as_stream(stream);
  switch (x.dtype) {
    case DType::F32: return launch_sum<F32T>(x, p, mode, out, s);
    case DType::BF16: return launch_sum<BF16T>(x, p, mode, out, s);
    case DType::F16: return launch_sum<F16T>(x, p, mode, out, s);
    default: return launch_sum<I32T>(x, p, mode, out, s);
  }
}

void copy_cuda(const TensorView& src, const TensorView& dst, void* stream) {
  const char* name = "copy_cuda";
  check_view(src, name, "src");
  check_view(dst, name, "dst");
  check_same_device(src, dst, name, "src", "dst");
  check_same_shape(src, dst, name, "src", "dst");
  TK_CHECK(dst.is_contiguous(), name, ": dst ", describe(dst), " must be contiguous");
  const int64_t n = dst.numel();
  if (n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int device = dst.device.index;
  const TensorView* ins[1] = {&src};
  const Walk<1> w = make_walk<1>(dst, ins);
  const DType st = src.dtype, dt = dst.dtype;
  const int last = w.nd - 1;

  if (w.nd == 1 && (w.st[0][0] == 1 || n == 1)) {  // both contiguous
    if (st == dt) {
      CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, size_t(n) * dtype_size(dt), cudaMemcpyDeviceToDevice, s));
      return;
    }
    const bool floats = st != DType::I32 && st != DType::U8 && dt != DType::I32 && dt != DType::U8;
    if (floats) {
      const bool vec = aligned16(src.data) && aligned16(dst.data);
      with_float_tag(st, [&](auto stag) {
        using ST = decltype(stag);
        with_float_tag(dt, [&](auto dtag) {
          using DT = decltype(dtag);
          if constexpr (!std::is_same<ST, DT>::value)  // equal dtypes took the memcpy above
            cast_flat_kernel<ST, DT><<<grid_for(vec ? n / 8 + 1 : n, device), kThreads, 0, s>>>(
                src.ptr<const typename ST::S>(), dst.ptr<typename DT::S>(), n, vec);
        });
      });
      CUDA_CHECK(cudaGetLastError());
      return;
    }
  }

  // Transposition: a dim k < last along which the source is contiguous.
  int k = -1;
  if (w.st[0][last] != 1 && w.st[0][last] != 0)
    for (int d = 0; d < last; ++d)
      if (w.st[0][d] == 1) k = d;
  if (k >= 0) {
    TransposePlan p;
    int64_t dstr[kMaxDims];
    contiguous_strides(w.nd, w.shape, dstr);
    p.K = w.shape[k];
    p.L = w.shape[last];
    p.sk = w.st[0][k];
    p.sl = w.st[0][last];
    p.dk = dstr[k];
    for (int d = 0; d < last; ++d) {
      if (d == k) continue;
      p.osize[p.no] = w.shape[d];
      p.osrc[p.no] = w.st[0][d];
      p.odst[p.no] = dstr[d];
      p.outer *= w.shape[d];
      ++p.no;
    }
    const int64_t tiles = p.outer * ceil_div(p.K, 32) * ceil_div(p.L, 32);
    const int64_t cap = int64_t(sm_count(device)) * kBlocksPerSm;
    copy_transpose_kernel<<<unsigned(std::min(tiles, cap)), kThreads, 0, s>>>(src.data, st, dst.data, dt, p);
    CUDA_CHECK(cudaGetLastError());
    return;
  }

  if (fits_u32(n)) copy_gather_kernel<uint32_t><<<grid_for(n, device), kThreads, 0, s>>>(src.data, st, dst.data, dt, n, w);
  else copy_gather_kernel<uint64_t><<<grid_for(n, device), kThreads, 0, s>>>(src.data, st, dst.data, dt, n, w);
  CUDA_CHECK(cudaGetLastError());
}

void concat_cuda(const TensorView* inputs, int count, int axis, const TensorView& out, void* stream) {
  const char* name = "concat_cuda";
  check_view(out, name, "out");
  TK_CHECK(out.is_contiguous() && axis >= 0 && axis < out.ndim, name, ": out ", describe(out),
           " must be contiguous with axis ", axis, " in range");
  TK_CHECK(count >= 0 && (count == 0 || inputs != nullptr), name, ": bad input list (count ", count, ")");
  const size_t es = dtype_size(out.dtype);
  int64_t rows = 1, inner = 1, total = 0;
  for (int d = 0; d < axis; ++d) rows *= out.shape[d];
  for (int d = axis + 1; d < out.ndim; ++d) inner *= out.shape[d];
  for (int i = 0; i < count; ++i) {
    const TensorView& in = inputs[i];
    check_view(in, name, "input");
    check_same_device(in, out, name, "input", "out");
    TK_CHECK(in.dtype == out.dtype && in.ndim == out.ndim && in.is_contiguous(), name, ": input ", i, " ",
             describe(in), " must be contiguous with out's dtype and rank");
    for (int d = 0; d < out.ndim; ++d)
      TK_CHECK(d == axis || in.shape[d] == out.shape[d], name, ": input ", i, " ", describe(in), " differs from out ",
               describe(out), " off axis ", axis);
    total += in.shape[axis];
  }
  TK_CHECK(total == out.shape[axis], name, ": the inputs add up to ", total, " on axis ", axis, ", out has ",
           out.shape[axis]);
  if (out.numel() == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int device = out.device.index;
  const int64_t out_row_bytes = out.shape[axis] * inner * int64_t(es);
  // The widest unit (16, 8, 4, 2 or 1 bytes) that divides every row width and aligns every pointer.
  uint64_t bits = uint64_t(out_row_bytes) | reinterpret_cast<uintptr_t>(out.data) | 16u;
  for (int i = 0; i < count; ++i)
    bits |= uint64_t(inputs[i].shape[axis] * inner * int64_t(es)) | reinterpret_cast<uintptr_t>(inputs[i].data);
  const int64_t unit = int64_t(bits & (~bits + 1));  // lowest set bit
  int64_t col = 0;
  for (int i0 = 0; i0 < count; i0 += kConcatBatch) {
    ConcatBatch b;
    for (int i = i0; i < count && b.count < kConcatBatch; ++i) {
      const int64_t width = inputs[i].shape[axis] * inner * int64_t(es) / unit;
      b.src[b.count] = inputs[i].data;
      b.width[b.count] = width;
      b.start[b.count + 1] = b.start[b.count] + width;
      ++b.count;
    }
    const int64_t out_row = out_row_bytes / unit;
    switch (unit) {
      case 16: launch_concat<uint4>(b, out.data, rows, out_row, col, device, s); break;
      case 8: launch_concat<uint2>(b, out.data, rows, out_row, col, device, s); break;
      case 4: launch_concat<uint32_t>(b, out.data, rows, out_row, col, device, s); break;
      case 2: launch_concat<uint16_t>(b, out.data, rows, out_row, col, device, s); break;
      default: launch_concat<uint8_t>(b, out.data, rows, out_row, col, device, s); break;
    }
    col += b.start[b.count];
  }
}

void fill_cuda(const TensorView& out, double value, void* stream) {
  const char* name = "fill_cuda";
  check_view(out, name, "out");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int es = int(dtype_size(out.dtype));
  uint32_t bits = 0;
  switch (out.dtype) {
    case DType::F32: bits = f32_to_bits(float(value)); break;
    case DType::BF16: bits = f32_to_bf16(float(value)); break;
    case DType::F16: bits = f32_to_f16(float(value)); break;
    case DType::I32: bits = uint32_t(host_sat_i32(value)); break;
    case DType::U8: bits = host_sat_u8(value); break;
  }
  const uint32_t lo = bits & 0xffu;
  bool bytewise = es == 1;
  if (!bytewise) {
    bytewise = true;
    for (int i = 1; i < es; ++i) bytewise = bytewise && ((bits >> (8 * i)) & 0xffu) == lo;
  }
  if (bytewise) {  // zeros, 0xff.. patterns and u8: the driver's memset
    CUDA_CHECK(cudaMemsetAsync(out.data, int(lo), size_t(n) * size_t(es), s));
    return;
  }
  const uint32_t word = es == 4 ? bits : (bits & 0xffffu) | (bits << 16);
  const uint4 pattern = make_uint4(word, word, word, word);
  const bool vec = aligned16(out.data);
  const int64_t items = vec ? n * es / 16 + 16 : n;
  fill_kernel<<<grid_for(items, out.device.index), kThreads, 0, s>>>(out.data, n, es, pattern, vec);
  CUDA_CHECK(cudaGetLastError());
}

void randn_cuda(const TensorView& out, uint64_t seed, float mean, float stddev, void* stream) {
  const char* name = "randn_cuda";
  check_view(out, name, "out");
  TK_CHECK(is_floating(out.dtype), name, ": out ", describe(out), " must have a floating dtype");
  TK_CHECK(out.is_contiguous(), name, ": out ", describe(out), " must be contiguous");
  const int64_t n = out.numel();
  if (n == 0) return;
  with_float_tag(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    randn_kernel<T><<<grid_for((n + 3) / 4, out.device.index), kThreads, 0, as_stream(stream)>>>(
        out.ptr<typename T::S>(), n, seed, mean, stddev);
  });
  CUDA_CHECK(cudaGetLastError());
}

void dropout_cuda(const TensorView& x, float p, uint64_t seed, const TensorView& out, void* stream) {
  const char* name = "dropout_cuda";
  check_view(x, name, "x");
  check_view(out, name, "out");
  check_same_device(x, out, name, "x", "out");
  TK_CHECK(is_floating(x.dtype) && x.dtype == out.dtype, name, ": x ", describe(x), " and out ", describe(out),
           " must share one floating dtype");
  TK_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel(), name, ": x ", describe(x),
           " and out ", describe(out), " must be contiguous with the same element count");
  TK_CHECK(p >= 0.0f && p < 1.0f, name, ": p must be in [0, 1), got ", p);
  const int64_t n = x.numel();
  if (n == 0) return;
  const float keep_scale = 1.0f / (1.0f - p);  // the CPU's fp32 constant
  const bool vec = aligned16(x.data) && aligned16(out.data);
  with_float_tag(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::S;
    dropout_kernel<T><<<grid_for(vec ? n / 8 + 1 : n, out.device.index), kThreads, 0, as_stream(stream)>>>(
        x.ptr<const S>(), out.ptr<S>(), n, seed, p, keep_scale, vec);
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tk
