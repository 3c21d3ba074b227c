// NF4 quantize / dequantize on CUDA (see nf4_kernels.h for the design and cpu/nf4.h for the format).
#include "nf4_kernels.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>

#include "../core/error.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {

namespace {

// The CPU's tables, passed to kernels by value (a kernel parameter lives in the constant bank:
// uniform indices are broadcast, per-thread indices are copied to shared memory first).
struct Nf4Tables {
  float code[16];
  float thr[16];  // kNf4Thresholds; [15] unused
  float dyn[256];
};

const Nf4Tables& tables() {
  static const Nf4Tables t = [] {
    Nf4Tables v;
    std::memcpy(v.code, kNf4Code, sizeof v.code);
    std::memcpy(v.thr, kNf4Thresholds, sizeof(float) * 15);
    v.thr[15] = 0.0f;
    std::memcpy(v.dyn, kDynamicMap8, sizeof v.dyn);
    return v;
  }();
  return t;
}

constexpr int kThreads = 256;
constexpr int64_t kWarpBlockMax = 2048;  // block sizes up to this get a warp each, larger ones a CTA
constexpr int kOffsetThreads = 1024;
constexpr int kStage = 4096;             // absmaxes staged per step of the sequential offset sum

class Scratch {
 public:
  Scratch(int device, size_t bytes, cudaStream_t stream) : device_(device), stream_(stream) {
    if (bytes) ptr_ = cuda::detail::allocate_on(device, bytes, stream);
  }
  ~Scratch() {
    if (ptr_) cuda::detail::release_on(device_, ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  int device_;
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

int current_device() {
  int d = 0;
  CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

int sm_count(int device) {
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return std::max(n, 1);
}

// ---- device helpers ------------------------------------------------------------------------------

__device__ __forceinline__ float load_w(const float* w, int64_t i) { return w[i]; }
__device__ __forceinline__ float load_w(const uint16_t* w, int64_t i) { return __uint_as_float(uint32_t(w[i]) << 16); }

// core/dtype.h's f32_to_bf16: round to nearest even, NaN kept quiet.
__device__ __forceinline__ uint32_t bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

// The number of thresholds n exceeds: bitsandbytes' decision tree flattened (NaN -> 0).
__device__ __forceinline__ uint32_t nf4_encode(float n, const Nf4Tables& t) {
  uint32_t k = 0;
#pragma unroll
  for (int j = 0; j < 15; ++j) k += n > t.thr[j] ? 1u : 0u;
  return k;
}

// Codes of the bytes [first, ceil(n/2)) step `step` of a block of n elements starting at w + s
// with absmax m, into q (the block's first packed byte).
template <class T>
__device__ __forceinline__ void encode_block(const T* w, int64_t s, int64_t n, float m, uint8_t* q, int64_t first,
                                             int64_t step, const Nf4Tables& t) {
  const int64_t nbytes = (n + 1) / 2;
  if (!(m >= FLT_MIN)) {  // zero (or subnormal-only) block: every code is 0.0
    for (int64_t j = first; j < nbytes; j += step) q[j] = 0x77;
    return;
  }
  const float inv = __fdiv_rn(1.0f, m);
  for (int64_t j = first; j < nbytes; j += step) {
    const int64_t i = 2 * j;
    const uint32_t hi = nf4_encode(__fmul_rn(load_w(w, s + i), inv), t);
    const uint32_t lo = i + 1 < n ? nf4_encode(__fmul_rn(load_w(w, s + i + 1), inv), t) : 7u;  // pad: code of 0.0
    q[j] = uint8_t(hi << 4 | lo);
  }
}

// bitsandbytes dQuantize<0>, step for step as cpu/nf4.cpp's port (code: the dynamic map).
__device__ uint32_t dyn8_encode(float x, const float* code) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return uint32_t(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return uint32_t(x < midpoint ? lower_pivot : pivot);
}

// ---- quantize ------------------------------------------------------------------------------------

// One warp per block.   w [numel] T; packed [ceil(numel/2)] u8; absmax [nblocks] f32
template <class T>
__global__ void __launch_bounds__(kThreads)
    quantize_warp_kernel(const T* w, int64_t numel, int64_t B, int64_t nblocks, uint8_t* packed, float* absmax,
                         const Nf4Tables t) {
  const int64_t lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += warps) {
    const int64_t s = b * B, n = min(B, numel - s);
    float m = 0.0f;
    for (int64_t i = lane; i < n; i += 32) m = fmaxf(m, fabsf(load_w(w, s + i)));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    encode_block(w, s, n, m, packed + s / 2, lane, 32, t);
  }
}

// One CTA per block (large block sizes).   shapes as above
template <class T>
__global__ void __launch_bounds__(kThreads)
    quantize_cta_kernel(const T* w, int64_t numel, int64_t B, int64_t nblocks, uint8_t* packed, float* absmax,
                        const Nf4Tables t) {
  __shared__ float red[kThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t s = b * B, n = min(B, numel - s);
    float m = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) m = fmaxf(m, fabsf(load_w(w, s + i)));
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    if (warp == 0) {
      m = warp_max(lane < kThreads / 32 ? red[lane] : 0.0f);
      if (lane == 0) red[0] = m;
    }
    __syncthreads();
    m = red[0];
    if (threadIdx.x == 0) absmax[b] = m;
    encode_block(w, s, n, m, packed + s / 2, threadIdx.x, kThreads, t);
    __syncthreads();  // red[] is rewritten by the next block
  }
}

// offset = float(sum(absmax) / nblocks) with the sum equal to the CPU's sequential double sum
// (see nf4_kernels.h).   absmax [nblocks] f32 (>= 0); offset [1] f32. One CTA of kOffsetThreads.
__global__ void __launch_bounds__(kOffsetThreads)
    dq_offset_kernel(const float* absmax, int64_t nblocks, int log2_nblocks, float* offset) {
  __shared__ double s_sum[kOffsetThreads / 32];
  __shared__ unsigned s_emax[kOffsetThreads / 32], s_emin[kOffsetThreads / 32];
  __shared__ int s_exact;
  __shared__ float stage[kStage];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  unsigned emax = 0, emin = 255;
  double sum = 0.0;
  for (int64_t i = tid; i < nblocks; i += kOffsetThreads) {
    const float v = absmax[i];
    const unsigned u = __float_as_uint(v);
    if (u != 0) {
      emax = max(emax, u >> 23);
      emin = min(emin, u >> 23);
    }
    sum = __dadd_rn(sum, double(v));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum = __dadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, o));
    emax = max(emax, __shfl_xor_sync(0xffffffffu, emax, o));
    emin = min(emin, __shfl_xor_sync(0xffffffffu, emin, o));
  }
  if (lane == 0) {
    s_sum[warp] = sum;
    s_emax[warp] = emax;
    s_emin[warp] = emin;
  }
  __syncthreads();
  if (warp == 0) {
    sum = s_sum[lane];
    emax = s_emax[lane];
    emin = s_emin[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sum = __dadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, o));
      emax = max(emax, __shfl_xor_sync(0xffffffffu, emax, o));
      emin = min(emin, __shfl_xor_sync(0xffffffffu, emin, o));
    }
    if (lane == 0) {
      // Every addition above was exact when this holds (all zero: emax 0, emin 255 holds too).
      const bool exact = log2_nblocks + int(emax) - max(int(emin), 1) <= 29;
      if (exact) *offset = __double2float_rn(__ddiv_rn(sum, double(nblocks)));
      s_exact = exact ? 1 : 0;
    }
  }
  __syncthreads();
  if (s_exact) return;
  // The CPU's order: one thread adds the absmaxes in block order.
  double acc = 0.0;
  for (int64_t base = 0; base < nblocks; base += kStage) {
    const int cnt = int(min(int64_t(kStage), nblocks - base));
    __syncthreads();
    for (int i = tid; i < cnt; i += kOffsetThreads) stage[i] = absmax[base + i];
    __syncthreads();
    if (tid == 0)
      for (int i = 0; i < cnt; ++i) acc = __dadd_rn(acc, double(stage[i]));
  }
  if (tid == 0) *offset = __double2float_rn(__ddiv_rn(acc, double(nblocks)));
}

// The 8-bit codes of the absmaxes, one CTA per 256-block.
// absmax [nblocks] f32; offset [1] f32; qabsmax [nblocks] u8; scale2 [ceil(nblocks/256)] f32
__global__ void __launch_bounds__(kNf4Block2)
    dq_encode_kernel(const float* absmax, int64_t nblocks, const float* offset_p, uint8_t* qabsmax, float* scale2,
                     const Nf4Tables t) {
  __shared__ float map[256];
  __shared__ float red[kNf4Block2 / 32];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  map[tid] = t.dyn[tid];
  const float offset = *offset_p;
  __syncthreads();
  const int64_t nblocks2 = (nblocks + kNf4Block2 - 1) / kNf4Block2;
  for (int64_t s = blockIdx.x; s < nblocks2; s += gridDim.x) {
    const int64_t b = s * kNf4Block2 + tid;
    const bool live = b < nblocks;
    const float c = live ? __fsub_rn(absmax[b], offset) : 0.0f;
    float m = warp_max(fmaxf(0.0f, fabsf(c)));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    if (warp == 0) {
      m = warp_max(lane < kNf4Block2 / 32 ? red[lane] : 0.0f);
      if (lane == 0) red[0] = m;
    }
    __syncthreads();
    m = red[0];
    if (tid == 0) scale2[s] = m;
    if (live) qabsmax[b] = uint8_t(m >= FLT_MIN ? dyn8_encode(__fmul_rn(c, __fdiv_rn(1.0f, m)), map) : 127u);
    __syncthreads();
  }
}

// ---- dequantize ----------------------------------------------------------------------------------

struct DeqArgs {
  const uint8_t* packed;
  const float* absmax;    // without double quant
  const uint8_t* qabsmax;  // with it
  const float* scale2;
  const float* offset;
  int dq;
  int shift;              // log2(block) when block is a power of two, else -1
  int64_t block;
  int64_t base;           // flattened index of window element (0, 0)
  int64_t cols;           // flattened distance between window rows
  int64_t nr, nc;         // window size; out is [nr, nc]
  void* out;
};

__device__ __forceinline__ int64_t block_of(const DeqArgs& a, int64_t e) {
  return a.shift >= 0 ? (e >> a.shift) : (e / a.block);
}

__device__ __forceinline__ float absmax_of(const DeqArgs& a, const float* map, float offset, int64_t b) {
  if (!a.dq) return a.absmax[b];
  return __fadd_rn(__fmul_rn(map[a.qabsmax[b]], a.scale2[b / kNf4Block2]), offset);
}

template <bool BF16>
__device__ __forceinline__ void store1(void* out, int64_t i, float v) {
  if (BF16) static_cast<uint16_t*>(out)[i] = uint16_t(bf16_rne(v));
  else static_cast<float*>(out)[i] = v;
}

// 8 values at out + i (i a multiple of 8, 16-byte aligned).
template <bool BF16>
__device__ __forceinline__ void store8(void* out, int64_t i, const float (&y)[8]) {
  if (BF16) {
    uint4 v;
    v.x = bf16_rne(y[0]) | bf16_rne(y[1]) << 16;
    v.y = bf16_rne(y[2]) | bf16_rne(y[3]) << 16;
    v.z = bf16_rne(y[4]) | bf16_rne(y[5]) << 16;
    v.w = bf16_rne(y[6]) | bf16_rne(y[7]) << 16;
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + i) = v;
  } else {
    float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + i);
    o[0] = make_float4(y[0], y[1], y[2], y[3]);
    o[1] = make_float4(y[4], y[5], y[6], y[7]);
  }
}

// out [nr, nc] = the window of the dequantized weight. Grid: x over 8-element groups of a row,
// y over rows, both grid-strided. VEC: every row starts at a flattened index that is a multiple of
// 8, packed is 4-byte and out 16-byte aligned, nc % 8 == 0 when nr > 1.
template <bool BF16, bool VEC>
__global__ void __launch_bounds__(kThreads, 4) dequant_kernel(const DeqArgs a, const Nf4Tables t) {
  __shared__ float code[16];
  __shared__ float map[256];
  if (threadIdx.x < 16) code[threadIdx.x] = t.code[threadIdx.x];
  if (a.dq)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = t.dyn[i];
  const float offset = a.dq ? *a.offset : 0.0f;
  __syncthreads();
  const int64_t groups = (a.nc + 7) / 8;
  for (int64_t r = blockIdx.y; r < a.nr; r += gridDim.y) {
    const int64_t e_row = a.base + r * a.cols, o_row = r * a.nc;
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += int64_t(gridDim.x) * blockDim.x) {
      const int64_t c = g * 8, e = e_row + c;
      const int n = int(min(int64_t(8), a.nc - c));
      if (VEC && n == 8) {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(a.packed + (e >> 1));
        int64_t b = block_of(a, e);
        int64_t next = (b + 1) * a.block;
        float am = absmax_of(a, map, offset, b);
        float y[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (e + k >= next) {  // blocks are >= 2 elements: at most one boundary per step
            ++b;
            next += a.block;
            am = absmax_of(a, map, offset, b);
          }
          const uint32_t byte = (word >> (8 * (k >> 1))) & 0xffu;
          y[k] = __fmul_rn(code[(k & 1) ? (byte & 15u) : (byte >> 4)], am);
        }
        store8<BF16>(a.out, o_row + c, y);
      } else {
        for (int k = 0; k < n; ++k) {
          const int64_t ek = e + k;
          const uint32_t byte = a.packed[ek >> 1];
          const float v = __fmul_rn(code[(ek & 1) ? (byte & 15u) : (byte >> 4)],
                                    absmax_of(a, map, offset, block_of(a, ek)));
          store1<BF16>(a.out, o_row + c + k, v);
        }
      }
    }
  }
}

// absmax [nblocks] f32 as dequantize uses it.
__global__ void __launch_bounds__(kThreads) absmax_kernel(const DeqArgs a, int64_t nblocks, float* absmax,
                                                          const Nf4Tables t) {
  __shared__ float map[256];
  if (a.dq)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = t.dyn[i];
  const float offset = a.dq ? *a.offset : 0.0f;
  __syncthreads();
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < nblocks; b += int64_t(gridDim.x) * blockDim.x)
    absmax[b] = absmax_of(a, map, offset, b);
}

// ---- host side -----------------------------------------------------------------------------------

void check_block(int64_t block_size, const char* op) {
  TK_CHECK(block_size >= 2 && block_size <= (int64_t(1) << 24) && block_size % 2 == 0, op,
           ": block_size must be even and in [2, 16777216], got ", block_size);
}

void check_in(const Nf4In& in, bool double_quant, const char* op) {
  TK_CHECK(in.packed, op, ": null packed input");
  TK_CHECK(double_quant ? (in.qabsmax && in.scale2 && in.offset) : in.absmax != nullptr, op,
           double_quant ? ": double quantization needs qabsmax, scale2 and offset" : ": missing absmax input");
}

int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

DeqArgs deq_args(const Nf4In& in, int64_t block_size, bool double_quant) {
  DeqArgs a;
  a.packed = in.packed;
  a.absmax = in.absmax;
  a.qabsmax = in.qabsmax;
  a.scale2 = in.scale2;
  a.offset = in.offset;
  a.dq = double_quant ? 1 : 0;
  a.shift = log2_exact(block_size);
  a.block = block_size;
  a.base = 0;
  a.cols = 0;
  a.nr = a.nc = 0;
  a.out = nullptr;
  return a;
}

// Launches dequant_kernel over a.nr x a.nc.
void launch_dequant(DeqArgs a, DType out_dtype, cudaStream_t stream) {
  if (a.nr == 0 || a.nc == 0) return;
  const bool vec = a.base % 8 == 0 && (a.nr == 1 || (a.cols % 8 == 0 && a.nc % 8 == 0)) &&
                   reinterpret_cast<uintptr_t>(a.packed) % 4 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  const int64_t groups = (a.nc + 7) / 8;
  const int64_t gy = std::min<int64_t>(a.nr, 65535);
  const int64_t target = int64_t(sm_count(current_device())) * 4;  // the CTAs __launch_bounds__ keeps resident
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((groups + kThreads - 1) / kThreads,
                                                            std::max<int64_t>(1, (target + gy - 1) / gy)));
  const dim3 grid{unsigned(gx), unsigned(gy), 1u};
  const Nf4Tables& t = tables();
  const bool bf16 = out_dtype == DType::BF16;
  if (bf16 && vec) dequant_kernel<true, true><<<grid, kThreads, 0, stream>>>(a, t);
  else if (bf16) dequant_kernel<true, false><<<grid, kThreads, 0, stream>>>(a, t);
  else if (vec) dequant_kernel<false, true><<<grid, kThreads, 0, stream>>>(a, t);
  else dequant_kernel<false, false><<<grid, kThreads, 0, stream>>>(a, t);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void nf4_quantize_cuda(const void* w, DType w_dtype, int64_t numel, int64_t block_size, bool double_quant,
                       const Nf4Out& out, void* stream) {
  const char* op = "nf4_quantize_cuda";
  check_block(block_size, op);
  TK_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TK_CHECK(w_dtype == DType::F32 || w_dtype == DType::BF16, op, ": weight dtype must be f32 or bf16, got ",
           dtype_name(w_dtype));
  if (double_quant) TK_CHECK(out.offset, op, ": double quantization needs an offset output");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (numel == 0) {
    if (double_quant) CUDA_CHECK(cudaMemsetAsync(out.offset, 0, sizeof(float), st));
    return;
  }
  TK_CHECK(w && out.packed, op, ": null weight or packed output");
  TK_CHECK(double_quant ? (out.qabsmax && out.scale2) : out.absmax != nullptr, op,
           double_quant ? ": double quantization needs qabsmax and scale2 outputs" : ": missing absmax output");
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  const int device = current_device();
  Scratch scratch(device, double_quant ? size_t(nblocks) * sizeof(float) : 0, st);
  float* absmax = double_quant ? static_cast<float*>(scratch.get()) : out.absmax;
  const Nf4Tables& t = tables();

  if (block_size <= kWarpBlockMax) {
    const int64_t ctas = std::min<int64_t>((nblocks + kThreads / 32 - 1) / (kThreads / 32), int64_t(1) << 20);
    if (w_dtype == DType::F32)
      quantize_warp_kernel<float><<<unsigned(ctas), kThreads, 0, st>>>(static_cast<const float*>(w), numel,
                                                                         block_size, nblocks, out.packed, absmax, t);
    else
      quantize_warp_kernel<uint16_t><<<unsigned(ctas), kThreads, 0, st>>>(static_cast<const uint16_t*>(w), numel,
                                                                            block_size, nblocks, out.packed, absmax, t);
  } else {
    const int64_t ctas = std::min<int64_t>(nblocks, int64_t(1) << 20);
    if (w_dtype == DType::F32)
      quantize_cta_kernel<float><<<unsigned(ctas), kThreads, 0, st>>>(static_cast<const float*>(w), numel,
                                                                        block_size, nblocks, out.packed, absmax, t);
    else
      quantize_cta_kernel<uint16_t><<<unsigned(ctas), kThreads, 0, st>>>(static_cast<const uint16_t*>(w), numel,
                                                                           block_size, nblocks, out.packed, absmax, t);
  }
  CUDA_CHECK(cudaGetLastError());
  if (!double_quant) return;

  int log2n = 0;
  while ((int64_t(1) << log2n) < nblocks) ++log2n;
  dq_offset_kernel<<<1, kOffsetThreads, 0, st>>>(absmax, nblocks, log2n, out.offset);
  CUDA_CHECK(cudaGetLastError());
  const int64_t nblocks2 = (nblocks + kNf4Block2 - 1) / kNf4Block2;
  dq_encode_kernel<<<unsigned(std::min<int64_t>(nblocks2, int64_t(1) << 20)), kNf4Block2, 0, st>>>(
      absmax, nblocks, out.offset, out.qabsmax, out.scale2, t);
  CUDA_CHECK(cudaGetLastError());
}

void nf4_dequantize_cuda(const Nf4In& in, int64_t numel, int64_t block_size, bool double_quant, void* out,
                         DType out_dtype, void* stream) {
  const char* op = "nf4_dequantize_cuda";
  check_block(block_size, op);
  TK_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TK_CHECK(out_dtype == DType::F32 || out_dtype == DType::BF16, op, ": output dtype must be f32 or bf16, got ",
           dtype_name(out_dtype));
  if (numel == 0) return;
  TK_CHECK(out, op, ": null output");
  check_in(in, double_quant, op);
  DeqArgs a = deq_args(in, block_size, double_quant);
  a.nr = 1;
  a.nc = numel;
  a.out = out;
  launch_dequant(a, out_dtype, static_cast<cudaStream_t>(stream));
}

void nf4_dequantize_window_cuda(const Nf4In& in, const Nf4Layout& layout, int64_t rows, int64_t cols, int64_t r0,
                                int64_t nr, int64_t c0, int64_t nc, void* out, DType out_dtype, void* stream) {
  const char* op = "nf4_dequantize_window_cuda";
  check_block(layout.block_size, op);
  TK_CHECK(rows >= 0 && cols >= 0 && layout.numel == rows * cols, op, ": W [", rows, ", ", cols,
           "] does not match a layout of ", layout.numel, " elements");
  TK_CHECK(r0 >= 0 && nr >= 0 && r0 + nr <= rows && c0 >= 0 && nc >= 0 && c0 + nc <= cols, op, ": window rows [",
           r0, ", ", r0 + nr, ") x cols [", c0, ", ", c0 + nc, ") is outside W [", rows, ", ", cols, "]");
  TK_CHECK(out_dtype == DType::F32 || out_dtype == DType::BF16, op, ": output dtype must be f32 or bf16, got ",
           dtype_name(out_dtype));
  if (nr == 0 || nc == 0) return;
  TK_CHECK(out, op, ": null output");
  check_in(in, layout.double_quant, op);
  DeqArgs a = deq_args(in, layout.block_size, layout.double_quant);
  a.out = out;
  if (c0 == 0 && nc == cols) {  // whole rows: one contiguous run
    a.base = r0 * cols;
    a.nr = 1;
    a.nc = nr * cols;
  } else {
    a.base = r0 * cols + c0;
    a.cols = cols;
    a.nr = nr;
    a.nc = nc;
  }
  launch_dequant(a, out_dtype, static_cast<cudaStream_t>(stream));
}

void nf4_absmax_cuda(const Nf4In& in, int64_t nblocks, bool double_quant, float* absmax, void* stream) {
  const char* op = "nf4_absmax_cuda";
  TK_CHECK(nblocks >= 0, op, ": nblocks must be >= 0");
  if (nblocks == 0) return;
  TK_CHECK(absmax && (double_quant ? (in.qabsmax && in.scale2 && in.offset) : in.absmax != nullptr), op,
           ": missing input or output");
  DeqArgs a = deq_args(in, 2, double_quant);
  const int64_t ctas = std::min<int64_t>((nblocks + kThreads - 1) / kThreads, int64_t(sm_count(current_device())) * 8);
  absmax_kernel<<<unsigned(ctas), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, nblocks, absmax, tables());
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tk
