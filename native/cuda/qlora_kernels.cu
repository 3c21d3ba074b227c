// QLoRA linear layer on CUDA (see qlora_kernels.h for the design and cpu/qlora.h for the contract).
#include "qlora_kernels.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/error.h"
#include "../core/rng.h"
#include "check.cuh"
#include "gemm_kernels.h"
#include "internal.cuh"
#include "nf4_kernels.h"

namespace tk {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkAlign = 64;  // W chunks are multiples of this many rows / columns

class Scratch {
 public:
  Scratch() = default;
  Scratch(int device, size_t bytes, cudaStream_t stream) { reset(device, bytes, stream); }
  ~Scratch() { release(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void reset(int device, size_t bytes, cudaStream_t stream) {
    release();
    device_ = device;
    stream_ = stream;
    if (bytes) ptr_ = cuda::detail::allocate_on(device, bytes, stream);
  }
  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }

 private:
  void release() {
    if (ptr_) cuda::detail::release_on(device_, ptr_, stream_);
    ptr_ = nullptr;
  }
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  void* ptr_ = nullptr;
};

// ---- the elementwise kernel: widen, narrow, mask ------------------------------------------------

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const uint16_t* p, int64_t i) { return __uint_as_float(uint32_t(p[i]) << 16); }

// core/dtype.h's f32_to_bf16: round to nearest even, NaN kept quiet.
__device__ __forceinline__ uint16_t bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(uint16_t* p, int64_t i, float v) { p[i] = bf16_rne(v); }

// dst[i] = keep(e0 + i) ? src[i] : 0 for i in [0, n), converted from S to D (float or bf16 bits);
// keep is dropout_keep(seed, e, p) when `mask`, else always true. src == dst is allowed.
// src [n] S, dst [n] D
template <class S, class D>
__global__ void __launch_bounds__(kThreads)
    convert_kernel(const S* src, D* dst, int64_t n, int mask, uint64_t seed, float p, int64_t e0) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = load_f(src, i);
    if (mask && !dropout_keep(seed, uint64_t(e0 + i), p)) v = 0.0f;
    store_f(dst, i, v);
  }
}

int sm_count(int device) {
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return std::max(n, 1);
}

struct Ctx {
  int device = 0;
  cudaStream_t stream = nullptr;
  int sms = 1;
};

// dst = mask(src) converted; dropout p > 0 applies the mask of elements [e0, e0 + n) of x.
void convert(const Ctx& c, const void* src, DType sdt, void* dst, DType ddt, int64_t n, float p = 0.0f,
             uint64_t seed = 0, int64_t e0 = 0) {
  if (n == 0) return;
  const unsigned ctas = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(c.sms) * 8));
  const int mask = p > 0.0f ? 1 : 0;
  const bool s32 = sdt == DType::F32, d32 = ddt == DType::F32;
  if (s32 && d32)
    convert_kernel<<<ctas, kThreads, 0, c.stream>>>(static_cast<const float*>(src), static_cast<float*>(dst), n, mask,
                                                    seed, p, e0);
  else if (s32)
    convert_kernel<<<ctas, kThreads, 0, c.stream>>>(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n,
                                                    mask, seed, p, e0);
  else if (d32)
    convert_kernel<<<ctas, kThreads, 0, c.stream>>>(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n,
                                                    mask, seed, p, e0);
  else
    convert_kernel<<<ctas, kThreads, 0, c.stream>>>(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), n,
                                                    mask, seed, p, e0);
  CUDA_CHECK(cudaGetLastError());
}

// ---- products ------------------------------------------------------------------------------------

struct Operand {
  const void* p;
  int64_t ld;
  bool trans;
};

// C [M, N] (ldc) = alpha op(A) op(B) + beta C, A and B of dtype ab.
void mm(const Ctx& c, DType ab, int64_t M, int64_t N, int64_t K, Operand a, Operand b, void* C, DType ct,
        int64_t ldc, float alpha, float beta) {
  GemmParams g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.ab_dtype = ab;
  g.c_dtype = ct;
  g.A = a.p;
  g.lda = a.ld;
  g.trans_a = a.trans;
  g.B = b.p;
  g.ldb = b.ld;
  g.trans_b = b.trans;
  g.C = C;
  g.ldc = ldc;
  g.alpha = alpha;
  g.beta = beta;
  gemm_cuda(g, c.stream);
}

// p + elems elements of dtype t (TensorView data is a non-const void*).
char* es_ptr(void* p, int64_t elems, DType t) { return static_cast<char*>(p) + size_t(elems) * dtype_size(t); }

// Rows of a [rows, width] operand of `esize`-byte elements that fit the scratch bound.
int64_t chunk_rows(size_t limit, int64_t width, size_t esize, int64_t total) {
  const int64_t fit = int64_t(limit / (size_t(std::max<int64_t>(width, 1)) * esize));
  return std::min(total, std::max<int64_t>(fit, 1));
}

// W chunk length (rows or columns) of `extent` that fits `limit` with `across` elements each.
int64_t w_chunk(size_t limit, int64_t extent, int64_t across, size_t esize) {
  const int64_t fit = int64_t(limit / (size_t(across) * esize));
  if (fit >= extent) return extent;
  return std::min(extent, std::max<int64_t>(kChunkAlign, fit / kChunkAlign * kChunkAlign));
}

// ---- checks (cpu/qlora.cpp's, for device tensors) -------------------------------------------------

struct Dims {
  int64_t N = 0, in = 0, out = 0, r = 0;
  DType dt = DType::F32;
  int device = 0;
};

void check_cuda(const char* op, const char* name, const TensorView& v, int device) {
  TK_CHECK(v.device.type == DeviceType::CUDA, op, ": ", name, " must be on a CUDA device, got ", v.device.name());
  TK_CHECK(v.device.index == device, op, ": ", name, " is on ", v.device.name(), " but x is on cuda:", device);
  TK_CHECK(v.is_contiguous(), op, ": ", name, " ", describe(v), " must be contiguous");
  TK_CHECK(v.data != nullptr || v.numel() == 0, op, ": ", name, " ", describe(v), " has no data");
}

void check_like(const char* op, const char* name, const TensorView& v, const TensorView& like, int64_t last, DType dt,
                const char* what, int device) {
  check_cuda(op, name, v, device);
  bool ok = v.ndim == like.ndim && v.shape[v.ndim - 1] == last;
  for (int i = 0; ok && i + 1 < like.ndim; ++i) ok = v.shape[i] == like.shape[i];
  TK_CHECK(ok, op, ": ", name, " ", describe(v), " must be x's leading dims with last dim ", last, " (", what,
           "), x is ", describe(like));
  TK_CHECK(v.dtype == dt, op, ": ", name, " ", describe(v), " must be ", dtype_name(dt));
}

void check_matrix(const char* op, const char* name, const TensorView& v, int64_t rows, int64_t cols, DType dt,
                  const char* what, int device) {
  check_cuda(op, name, v, device);
  TK_CHECK(v.ndim == 2 && v.shape[0] == rows && v.shape[1] == cols, op, ": ", name, " ", describe(v), " must be [",
           rows, ", ", cols, "] (", what, ")");
  TK_CHECK(v.dtype == dt, op, ": ", name, " ", describe(v), " must be ", dtype_name(dt), " (x's dtype)");
}

Dims check_layer(const char* op, const TensorView& x, const QloraWeight& w, const TensorView& A, const TensorView& B,
                 const QloraOptions& opt) {
  TK_CHECK(x.device.type == DeviceType::CUDA, op, ": x must be on a CUDA device, got ", x.device.name());
  Dims d;
  d.device = x.device.index;
  check_cuda(op, "x", x, d.device);
  TK_CHECK(x.ndim >= 1, op, ": x must have at least one dim, got a scalar");
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": x ", describe(x), " must be f32 or bf16");
  d.dt = x.dtype;
  d.in = x.shape[x.ndim - 1];
  d.N = d.in > 0 ? x.numel() / d.in : 0;
  const Nf4Layout& l = w.layout;
  TK_CHECK(w.out >= 1 && w.in >= 1, op, ": W must be [out, in] with out, in >= 1, got [", w.out, ", ", w.in, "]");
  TK_CHECK(l.numel == w.out * w.in, op, ": W's NF4 layout holds ", l.numel, " elements, but W is [", w.out, ", ",
           w.in, "] = ", w.out * w.in);
  const Nf4Layout want = nf4_layout(l.numel, l.block_size, l.double_quant);
  TK_CHECK(l.nblocks == want.nblocks && l.nblocks2 == want.nblocks2 && l.packed_bytes == want.packed_bytes &&
               l.absmax_bytes == want.absmax_bytes,
           op, ": W's NF4 layout is inconsistent (make it with nf4_layout(out * in, block_size, double_quant))");
  TK_CHECK(w.q.packed != nullptr, op, ": W has no packed codes");
  TK_CHECK(l.double_quant ? (w.q.qabsmax && w.q.scale2 && w.q.offset) : w.q.absmax != nullptr, op,
           l.double_quant ? ": W is double-quantized but lacks qabsmax, scale2 or offset" : ": W lacks absmax");
  TK_CHECK(d.in == w.in, op, ": x ", describe(x), " does not match W [", w.out, ", ", w.in, "]: x's last dim must be ",
           w.in);
  d.out = w.out;
  check_cuda(op, "A", A, d.device);
  TK_CHECK(A.ndim == 2 && A.shape[0] >= 1, op, ": A ", describe(A), " must be [r, in] with r >= 1");
  d.r = A.shape[0];
  check_matrix(op, "A", A, d.r, d.in, d.dt, "r x in", d.device);
  check_matrix(op, "B", B, d.out, d.r, d.dt, "out x r", d.device);
  TK_CHECK(std::isfinite(opt.scale), op, ": scale must be finite, got ", opt.scale);
  TK_CHECK(opt.dropout >= 0.0f && opt.dropout < 1.0f, op, ": dropout must be in [0, 1), got ", opt.dropout);
  return d;
}

Ctx make_ctx(const Dims& d, void* stream) {
  cuda::make_current(d.device);
  Ctx c;
  c.device = d.device;
  c.stream = static_cast<cudaStream_t>(stream);
  c.sms = sm_count(d.device);
  return c;
}

// base += x deq(W)^T over chunks of W's rows: y[:, o0:o1] = x W[o0:o1, :]^T + beta y[:, o0:o1].
// x [N, in] dt; y [N, out] dt
void base_forward(const Ctx& c, const QloraWeight& w, DType dt, int64_t N, const void* x, void* y, float beta,
                  size_t limit) {
  const int64_t in = w.in, out = w.out;
  const size_t es = dtype_size(dt);
  const int64_t rows = w_chunk(limit, out, in, es);
  Scratch wc(c.device, size_t(rows * in) * es, c.stream);
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t n = std::min(rows, out - o0);
    nf4_dequantize_window_cuda(w.q, w.layout, out, in, o0, n, 0, in, wc.get(), dt, c.stream);
    mm(c, dt, N, n, in, Operand{x, in, false}, Operand{wc.get(), in, true}, es_ptr(y, o0, dt), dt, out, 1.0f, beta);
  }
}

// dx += dy deq(W) over chunks of W's columns: dx[:, i0:i1] = dy W[:, i0:i1] + beta dx[:, i0:i1].
// dy [N, out] dt; dx [N, in] dt
void base_backward(const Ctx& c, const QloraWeight& w, DType dt, int64_t N, const void* dy, void* dx, float beta,
                   size_t limit) {
  const int64_t in = w.in, out = w.out;
  const size_t es = dtype_size(dt);
  const int64_t cols = w_chunk(limit, in, out, es);
  Scratch wc(c.device, size_t(cols * out) * es, c.stream);
  for (int64_t i0 = 0; i0 < in; i0 += cols) {
    const int64_t n = std::min(cols, in - i0);
    nf4_dequantize_window_cuda(w.q, w.layout, out, in, 0, out, i0, n, wc.get(), dt, c.stream);
    mm(c, dt, N, n, out, Operand{dy, out, false}, Operand{wc.get(), n, false}, es_ptr(dx, i0, dt), dt, in, 1.0f,
       beta);
  }
}

}  // namespace

// ================================ forward ============================================================

void qlora_forward_cuda(const TensorView& x, const QloraWeight& w, const TensorView& A, const TensorView& B,
                        const QloraOptions& opt, const TensorView& y, const TensorView& xa, void* stream,
                        size_t scratch_bytes) {
  const char* op = "qlora_forward_cuda";
  const Dims d = check_layer(op, x, w, A, B, opt);
  check_like(op, "y", y, x, d.out, d.dt, "out", d.device);
  if (xa.data) check_like(op, "xa", xa, x, d.r, DType::F32, "r", d.device);
  if (d.N == 0) return;
  const Ctx c = make_ctx(d, stream);
  const size_t limit = scratch_bytes ? scratch_bytes : kQloraCudaScratchBytes;
  const int64_t N = d.N, in = d.in, out = d.out, r = d.r;
  const DType dt = d.dt;
  const bool lora = opt.scale != 0.0f;

  // xa = c (keep * x) A^T, unless nobody needs it.
  float* xa_p = static_cast<float*>(xa.data);
  Scratch xa_tmp;
  if (!xa_p && lora) {
    xa_tmp.reset(c.device, size_t(N * r) * sizeof(float), c.stream);
    xa_p = xa_tmp.get<float>();
  }
  if (xa_p) {
    const Operand a_t{A.data, in, true};
    if (opt.dropout == 0.0f) {
      mm(c, dt, N, r, in, Operand{x.data, in, false}, a_t, xa_p, DType::F32, r, 1.0f, 0.0f);
    } else {
      const float keep_scale = 1.0f / (1.0f - opt.dropout);
      const int64_t rows = chunk_rows(limit, in, dtype_size(dt), N);
      Scratch xm(c.device, size_t(rows * in) * dtype_size(dt), c.stream);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        convert(c, es_ptr(x.data, n0 * in, dt), dt, xm.get(), dt, nr * in, opt.dropout, opt.seed, n0 * in);
        mm(c, dt, nr, r, in, Operand{xm.get(), in, false}, a_t, xa_p + n0 * r, DType::F32, r, keep_scale, 0.0f);
      }
    }
  }
  // y = s xa B^T, then y += x deq(W)^T.
  if (lora) {
    Scratch b32;
    const void* bp = B.data;
    if (dt != DType::F32) {
      b32.reset(c.device, size_t(out * r) * sizeof(float), c.stream);
      convert(c, B.data, dt, b32.get(), DType::F32, out * r);
      bp = b32.get();
    }
    mm(c, DType::F32, N, out, r, Operand{xa_p, r, false}, Operand{bp, r, true}, y.data, dt, out, opt.scale, 0.0f);
  }
  base_forward(c, w, dt, N, x.data, y.data, lora ? 1.0f : 0.0f, limit);
}

// ================================ backward ===========================================================

void qlora_backward_cuda(const TensorView& dy, const TensorView& x, const QloraWeight& w, const TensorView& A,
                         const TensorView& B, const TensorView& xa, const QloraOptions& opt, const TensorView& dx,
                         const TensorView& dA, const TensorView& dB, void* stream, size_t scratch_bytes) {
  const char* op = "qlora_backward_cuda";
  const Dims d = check_layer(op, x, w, A, B, opt);
  check_like(op, "dy", dy, x, d.out, d.dt, "out", d.device);
  TK_CHECK(xa.data != nullptr || d.N == 0, op, ": xa (saved by qlora_forward_cuda) is required");
  if (xa.data) check_like(op, "xa", xa, x, d.r, DType::F32, "r", d.device);
  if (dx.data) check_like(op, "dx", dx, x, d.in, d.dt, "in", d.device);
  check_matrix(op, "dA", dA, d.r, d.in, d.dt, "A's shape", d.device);
  check_matrix(op, "dB", dB, d.out, d.r, d.dt, "B's shape", d.device);
  const Ctx c = make_ctx(d, stream);
  const size_t limit = scratch_bytes ? scratch_bytes : kQloraCudaScratchBytes;
  const int64_t N = d.N, in = d.in, out = d.out, r = d.r;
  const DType dt = d.dt;
  const bool lora = opt.scale != 0.0f;
  const float s = opt.scale, p = opt.dropout;
  const float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;

  if (!lora || N == 0) {
    CUDA_CHECK(cudaMemsetAsync(dA.data, 0, dA.nbytes(), c.stream));
    CUDA_CHECK(cudaMemsetAsync(dB.data, 0, dB.nbytes(), c.stream));
  }
  if (N == 0) return;

  Scratch g_buf;
  const float* g = nullptr;
  if (lora) {
    // g = dy B  [N, r] fp32.
    g_buf.reset(c.device, size_t(N * r) * sizeof(float), c.stream);
    float* gw = g_buf.get<float>();
    mm(c, dt, N, r, out, Operand{dy.data, out, false}, Operand{B.data, r, false}, gw, DType::F32, r, 1.0f, 0.0f);
    g = gw;

    // dB = s dy^T xa  [out, r]; bf16 dy is widened a row chunk at a time.
    const float* xa_p = static_cast<const float*>(xa.data);
    if (dt == DType::F32) {
      mm(c, dt, out, r, N, Operand{dy.data, out, true}, Operand{xa_p, r, false}, dB.data, dt, r, s, 0.0f);
    } else {
      Scratch acc(c.device, size_t(out * r) * sizeof(float), c.stream);
      const int64_t rows = chunk_rows(limit, out, sizeof(float), N);
      Scratch dy32(c.device, size_t(rows * out) * sizeof(float), c.stream);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        convert(c, es_ptr(dy.data, n0 * out, dt), dt, dy32.get(), DType::F32, nr * out);
        mm(c, DType::F32, out, r, nr, Operand{dy32.get(), out, true}, Operand{xa_p + n0 * r, r, false}, acc.get(),
           DType::F32, r, s, n0 ? 1.0f : 0.0f);
      }
      convert(c, acc.get(), DType::F32, dB.data, dt, out * r);
    }

    // dA = s c g^T (keep * x)  [r, in]; keep * x formed (and widened) a row chunk at a time.
    if (dt == DType::F32 && p == 0.0f) {
      mm(c, dt, r, in, N, Operand{g, r, true}, Operand{x.data, in, false}, dA.data, dt, in, s, 0.0f);
    } else {
      Scratch acc;
      float* target = static_cast<float*>(dA.data);
      if (dt != DType::F32) {
        acc.reset(c.device, size_t(r * in) * sizeof(float), c.stream);
        target = acc.get<float>();
      }
      const int64_t rows = chunk_rows(limit, in, sizeof(float), N);
      Scratch xm(c.device, size_t(rows * in) * sizeof(float), c.stream);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nr = std::min(rows, N - n0);
        convert(c, es_ptr(x.data, n0 * in, dt), dt, xm.get(), DType::F32, nr * in, p, opt.seed, n0 * in);
        mm(c, DType::F32, r, in, nr, Operand{g + n0 * r, r, true}, Operand{xm.get(), in, false}, target, DType::F32,
           in, s * keep_scale, n0 ? 1.0f : 0.0f);
      }
      if (dt != DType::F32) convert(c, target, DType::F32, dA.data, dt, r * in);
    }
  }

  // dx = dy deq(W) + s c keep * (g A): the LoRA term first, dropped elements zeroed, then the
  // chunked base GEMMs accumulate onto it.
  if (dx.data) {
    if (lora) {
      Scratch a32;
      const void* ap = A.data;
      if (dt != DType::F32) {
        a32.reset(c.device, size_t(r * in) * sizeof(float), c.stream);
        convert(c, A.data, dt, a32.get(), DType::F32, r * in);
        ap = a32.get();
      }
      mm(c, DType::F32, N, in, r, Operand{g, r, false}, Operand{ap, in, false}, dx.data, dt, in, s * keep_scale, 0.0f);
      if (p > 0.0f) convert(c, dx.data, dt, dx.data, dt, N * in, p, opt.seed, 0);
    }
    base_backward(c, w, dt, N, dy.data, dx.data, lora ? 1.0f : 0.0f, limit);
  }
}

}  // namespace tk
