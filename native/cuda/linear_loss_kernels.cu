// CUDA fused linear losses (see linear_loss_kernels.h for the contracts, the chunk pipeline and
// where the memory goes). This file holds the host orchestration -- checks, the row list, the plan,
// the scratch layout, the GEMMs -- and the small data-movement kernels around them; the row
// arithmetic is loss_kernels.cu's row engine (cuda_detail::linear_rows_cuda).
#include "linear_loss_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/error.h"
#include "check.cuh"
#include "device.h"
#include "gemm_kernels.h"
#include "internal.cuh"
#include "loss_kernels.h"

namespace tk {
namespace {

constexpr int kScanBlock = 1024;  // the row-list kernel: one block, 32 warps
constexpr int kCopyBlock = 256;
constexpr size_t kAlign = 256;    // scratch sub-buffers start on 256-byte boundaries

// ================================ kernels ===========================================================

// Lists the rows that count, in order, and finds the first bad target. One block of kScanBlock
// threads walks the targets in tiles; an ordered block-wide prefix sum places each counted row.
//   y: [N] I32   idx: [N] I32 (the first info[0] entries written)
//   info: [3] I64 = {#counted, first n with a target neither ignore_index nor in [0, V) (-1: none),
//                    that target}
__global__ void __launch_bounds__(kScanBlock) scan_targets_kernel(const int32_t* y, int64_t N, int64_t V,
                                                                  int32_t ignore_index, int32_t* idx, int64_t* info) {
  __shared__ int wsum[32], wpre[32];
  __shared__ int tile_total;
  __shared__ long long bad_w[32];
  const int tid = int(threadIdx.x), lane = tid & 31, w = tid >> 5;
  long long first_bad = LLONG_MAX;
  int64_t base = 0;
  for (int64_t t0 = 0; t0 < N; t0 += kScanBlock) {
    const int64_t n = t0 + tid;
    int flag = 0;
    if (n < N) {
      const int32_t v = y[n];
      if (v != ignore_index) {
        flag = 1;
        if ((v < 0 || int64_t(v) >= V) && n < first_bad) first_bad = n;
      }
    }
    int incl = flag;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) wsum[w] = incl;
    __syncthreads();
    if (w == 0) {
      const int s = wsum[lane];
      int inc2 = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, inc2, o);
        if (lane >= o) inc2 += t;
      }
      wpre[lane] = inc2 - s;
      if (lane == 31) tile_total = inc2;
    }
    __syncthreads();
    if (flag) idx[base + (incl - flag) + wpre[w]] = int32_t(n);
    base += tile_total;
    __syncthreads();  // wsum / wpre / tile_total are rewritten by the next tile
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long other = __shfl_xor_sync(0xffffffffu, first_bad, o);
    first_bad = other < first_bad ? other : first_bad;
  }
  if (lane == 0) bad_w[w] = first_bad;
  __syncthreads();
  if (tid == 0) {
    long long b = LLONG_MAX;
    for (int i = 0; i < kScanBlock / 32; ++i) b = bad_w[i] < b ? bad_w[i] : b;
    info[0] = base;
    info[1] = b == LLONG_MAX ? -1 : b;
    info[2] = b == LLONG_MAX ? 0 : y[b];
  }
}

// out[i, :] = h[idx[i], :] for i < rows (one block per row).   h: [N, D]  out: [rows, D]
template <typename T>
__global__ void gather_rows_kernel(const T* h, const int32_t* idx, int64_t D, T* out) {
  const T* src = h + int64_t(idx[blockIdx.x]) * D;
  T* dst = out + int64_t(blockIdx.x) * D;
  for (int64_t j = threadIdx.x; j < D; j += kCopyBlock) dst[j] = src[j];
}

// dh[idx[i], :] = src[i, :] for i < rows (one block per row).   src: [rows, D]  dh: [N, D]
template <typename T>
__global__ void scatter_rows_kernel(const T* src, const int32_t* idx, int64_t D, T* dh) {
  const T* s = src + int64_t(blockIdx.x) * D;
  T* d = dh + int64_t(idx[blockIdx.x]) * D;
  for (int64_t j = threadIdx.x; j < D; j += kCopyBlock) d[j] = s[j];
}

// dw[i] = bf16(dw32[i]) for i < n, rounded to nearest even (core/dtype.h's f32_to_bf16).
//   dw32: [n] F32 (the [V, D] accumulator)   dw: [n] BF16
__global__ void round_bf16_kernel(const float* dw32, uint16_t* dw, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t u = __float_as_uint(dw32[i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      dw[i] = uint16_t((u >> 16) | 0x40u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      dw[i] = uint16_t(u >> 16);
    }
  }
}

// The reductions after the last chunk, one block of kCopyBlock threads:
//   loss[0] = wce * (sum ce / counted | sum ce) + wkd * sum kd / counted   (sums in double, fixed
//             order; 0 when a mean has no row)
//   losses[idx ? idx[i] : i] = wce ce[i] + wkd kd[i]   for i < counted (when losses is set)
// ce, kd: [counted] F32 or null (term absent); idx: [counted] I32 or null (identity);
// loss: [1] F32; losses: [N] F32 or null.
__global__ void __launch_bounds__(kCopyBlock) finish_kernel(const float* ce, const float* kd, int64_t counted,
                                                            const int32_t* idx, double wce, double wkd, bool mean,
                                                            float* loss, float* losses) {
  __shared__ double sm[2][kCopyBlock / 32];
  double sce = 0.0, skd = 0.0;
  for (int64_t i = threadIdx.x; i < counted; i += kCopyBlock) {
    if (ce) sce += double(ce[i]);
    if (kd) skd += double(kd[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sce += __shfl_xor_sync(0xffffffffu, sce, o);
    skd += __shfl_xor_sync(0xffffffffu, skd, o);
  }
  if ((threadIdx.x & 31) == 0) {
    sm[0][threadIdx.x >> 5] = sce;
    sm[1][threadIdx.x >> 5] = skd;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double a = 0.0, b = 0.0;
    for (int i = 0; i < kCopyBlock / 32; ++i) a += sm[0][i], b += sm[1][i];
    double total = 0.0;
    if (mean) {
      if (counted > 0) {
        if (ce) total += wce * (a / double(counted));
        if (kd) total += wkd * (b / double(counted));
      }
    } else {
      if (ce) total += wce * a;
      if (kd) total += wkd * b;
    }
    loss[0] = float(total);
  }
  if (losses)
    for (int64_t i = threadIdx.x; i < counted; i += kCopyBlock) {
      double v = 0.0;
      if (ce) v += wce * double(ce[i]);
      if (kd) v += wkd * double(kd[i]);
      losses[idx ? idx[i] : i] = float(v);
    }
}

// ================================ host: checks ======================================================

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CUDA, op, ": ", what, " is on ", v.device.name(), ", expected a cuda device");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_device(const TensorView& v, const Device& dev, const char* op, const char* what) {
  TK_CHECK(v.device == dev, op, ": ", what, " is on ", v.device.name(), ", the other operands on ", dev.name());
}

void check_f32(const TensorView& v, int64_t numel, const Device& dev, const char* op, const char* what) {
  check_tensor(v, op, what);
  check_device(v, dev, op, what);
  TK_CHECK(v.dtype == DType::F32, op, ": ", what, " ", describe(v), " must be f32");
  TK_CHECK(v.numel() == numel, op, ": ", what, " ", describe(v), " must have ", numel, " elements");
}

bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  return true;
}

struct HeadDims {
  int64_t N, D, V;
};

HeadDims check_head(const TensorView& h, const TensorView& w, const Device& dev, const char* op, const char* hname,
                    const char* wname) {
  check_tensor(h, op, hname);
  check_device(h, dev, op, hname);
  TK_CHECK(h.dtype == DType::F32 || h.dtype == DType::BF16, op, ": ", hname, " ", describe(h), " must be f32 or bf16");
  TK_CHECK(h.ndim >= 1 && h.shape[h.ndim - 1] >= 1, op, ": ", hname, " ", describe(h),
           " must have a last (hidden) dim D >= 1");
  const int64_t D = h.shape[h.ndim - 1];
  check_tensor(w, op, wname);
  check_device(w, dev, op, wname);
  TK_CHECK(w.dtype == h.dtype, op, ": ", wname, " ", describe(w), " must have ", hname, "'s dtype ",
           dtype_name(h.dtype));
  TK_CHECK(w.ndim == 2 && w.shape[0] >= 1 && w.shape[1] == D, op, ": ", wname, " ", describe(w),
           " must be [V, ", D, "] (V >= 1) to match ", hname, " ", describe(h));
  return {h.numel() / D, D, w.shape[0]};
}

void check_targets(const TensorView& t, int64_t N, const Device& dev, const char* op) {
  check_tensor(t, op, "targets");
  check_device(t, dev, op, "targets");
  TK_CHECK(t.dtype == DType::I32, op, ": targets ", describe(t), " must be i32");
  TK_CHECK(t.numel() == N, op, ": targets ", describe(t), " must have ", N, " elements (one per hidden row)");
}

bool check_grad(const TensorView& g, const TensorView& like, const char* op, const char* what, const char* lname) {
  if (g.data == nullptr) return false;
  check_tensor(g, op, what);
  check_device(g, like.device, op, what);
  TK_CHECK(same_shape(g, like) && g.dtype == like.dtype, op, ": ", what, " ", describe(g), " must match ", lname, " ",
           describe(like));
  return true;
}

void require_cublaslt(const char* op) {
  TK_CHECK(cuda::has_cublaslt(), op,
           ": this build of tunekit has no cuBLASLt, which the LM-head GEMMs of the fused linear losses need: "
           "rebuild with a CUDA toolkit that has cublasLt.h and the cublasLt library (see gemm_cuda), or run the "
           "loss on the CPU");
}

// ================================ host: scratch =====================================================

// A scratch block carved into 256-byte-aligned sub-buffers: reserve() sizes on the host,
// allocate() takes one block from tunekit's caching allocator tagged with the stream, and the
// destructor releases it on the same stream (reusable only by work issued after this call's
// kernels). Through the allocator, the scratch counts in tk.memory() and its peak.
class Arena {
 public:
  Arena(cudaStream_t st, const char* op) : st_(st), op_(op) { CUDA_CHECK(cudaGetDevice(&device_)); }
  ~Arena() {
    if (base_) cuda::detail::release_on(device_, base_, st_);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Returns the offset of a new sub-buffer of `bytes` (0 bytes: none, offset SIZE_MAX).
  size_t reserve(size_t bytes) {
    if (bytes == 0) return SIZE_MAX;
    const size_t off = size_;
    size_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return off;
  }
  void allocate() {
    if (size_ == 0) return;
    // + kAlign: the pool's pointer is aligned to at least 256 bytes in practice; the slack makes
    // the sub-buffers' alignment independent of that.
    const size_t bytes = size_ + kAlign;
    base_ = cuda::detail::allocate_on(device_, bytes, st_);
    const uintptr_t p = reinterpret_cast<uintptr_t>(base_);
    aligned_ = reinterpret_cast<char*>((p + kAlign - 1) / kAlign * kAlign);
    bytes_ = int64_t(bytes);
  }
  template <typename T>
  T* at(size_t off) const {
    return off == SIZE_MAX ? nullptr : reinterpret_cast<T*>(aligned_ + off);
  }
  int64_t bytes() const { return bytes_; }

 private:
  cudaStream_t st_;
  int device_ = 0;
  const char* op_;
  size_t size_ = 0;
  void* base_ = nullptr;
  char* aligned_ = nullptr;
  int64_t bytes_ = 0;
};

// ================================ host: the plan ====================================================

// Rows that count: listed on the device, the count (and the first bad target) read back.
struct RowList {
  int64_t counted = 0;
  const int32_t* idx = nullptr;  // null when every row counts (idx = identity)
};

RowList list_rows(const TensorView& targets, int64_t N, int64_t V, int32_t ignore_index, Arena& arena,
                  size_t idx_off, size_t info_off, cudaStream_t st, const char* op) {
  RowList rl;
  if (N == 0) return rl;
  int32_t* idx = arena.at<int32_t>(idx_off);
  int64_t* info = arena.at<int64_t>(info_off);
  scan_targets_kernel<<<1, kScanBlock, 0, st>>>(targets.ptr<const int32_t>(), N, V, ignore_index, idx, info);
  CUDA_CHECK(cudaGetLastError());
  int64_t host[3] = {0, -1, 0};
  CUDA_CHECK(cudaMemcpyAsync(host, info, sizeof host, cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  TK_CHECK(host[1] < 0, op, ": targets[", host[1], "] = ", host[2], " is out of range for V = ", V,
           " (and is not ignore_index = ", ignore_index, ")");
  rl.counted = host[0];
  rl.idx = rl.counted < N ? idx : nullptr;
  return rl;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Chunk height for `counted` rows and `buffers` fp32 [R, P] buffers.
int64_t plan_rows(int64_t counted, int64_t P, int buffers, int64_t requested) {
  if (counted == 0) return 0;
  if (requested > 0) return std::min(requested, counted);
  int64_t rows = std::max(kLinearLossMinChunkRowsCuda, kLinearLossChunkBytesCuda / (int64_t(buffers) * P * 4));
  rows = std::min(rows, counted);
  const int64_t chunks = (counted + rows - 1) / rows;
  return (counted + chunks - 1) / chunks;  // the same chunk count, without a short last chunk
}

// One linear head (logits = h W^T) and its per-chunk buffers.
struct Head {
  const char* h = nullptr;  // [N, D]
  const void* w = nullptr;  // [V, D]
  DType dt = DType::F32;
  int64_t D = 0, V = 0;
  size_t esz = 4;
  char* gather = nullptr;   // [R, D] in dt (when some rows are ignored)
};

Head make_head(const TensorView& h, const TensorView& w, const HeadDims& d) {
  Head hd;
  hd.h = static_cast<const char*>(h.data);
  hd.w = w.data;
  hd.dt = h.dtype;
  hd.D = d.D;
  hd.V = d.V;
  hd.esz = dtype_size(h.dtype);
  return hd;
}

// The chunk's rows of h (counted rows c0 .. c0 + r): in place when every row counts, else gathered.
const void* chunk_input(const Head& hd, const RowList& rl, int64_t c0, int64_t r, cudaStream_t st) {
  if (!rl.idx) return hd.h + size_t(c0) * size_t(hd.D) * hd.esz;
  if (hd.dt == DType::F32)
    gather_rows_kernel<float><<<unsigned(r), kCopyBlock, 0, st>>>(reinterpret_cast<const float*>(hd.h), rl.idx + c0,
                                                                  hd.D, reinterpret_cast<float*>(hd.gather));
  else
    gather_rows_kernel<uint16_t><<<unsigned(r), kCopyBlock, 0, st>>>(
        reinterpret_cast<const uint16_t*>(hd.h), rl.idx + c0, hd.D, reinterpret_cast<uint16_t*>(hd.gather));
  CUDA_CHECK(cudaGetLastError());
  return hd.gather;
}

// out [r, V] fp32 (row pitch P) = a [r, D] W^T.
void logits_gemm(const Head& hd, const void* a, int64_t r, float* out, int64_t P, cudaStream_t st) {
  GemmParams p;
  p.M = r;
  p.N = hd.V;
  p.K = hd.D;
  p.ab_dtype = hd.dt;
  p.c_dtype = DType::F32;
  p.A = a;
  p.lda = hd.D;
  p.B = hd.w;
  p.ldb = hd.D;
  p.trans_b = true;
  p.C = out;
  p.ldc = P;
  gemm_cuda(p, st);
}

// The trainable head's gradient outputs and their staging.
struct Grads {
  char* dh = nullptr;     // dhidden [N, D] (null: not wanted)
  void* dw = nullptr;     // dweight [V, D] (null: not wanted)
  char* dhc = nullptr;    // [R, D] dhidden rows before the scatter (some rows ignored)
  float* dw32 = nullptr;  // [V, D] fp32 accumulator of a bf16 dweight over several chunks
};

// With G [r, V] the chunk's logit gradient in the head's dtype (row pitch ldG elements) and a its
// h rows: dweight (+)= G^T a (overwrite on the first chunk), dhidden rows = G W.
void chunk_backward(const Head& hd, const Grads& g, const void* G, int64_t ldG, const void* a, const RowList& rl,
                    int64_t c0, int64_t r, cudaStream_t st) {
  if (g.dw) {
    GemmParams p;
    p.M = hd.V;
    p.N = hd.D;
    p.K = r;
    p.ab_dtype = hd.dt;
    p.c_dtype = g.dw32 ? DType::F32 : hd.dt;
    p.A = G;
    p.lda = ldG;
    p.trans_a = true;
    p.B = a;
    p.ldb = hd.D;
    p.C = g.dw32 ? static_cast<void*>(g.dw32) : g.dw;
    p.ldc = hd.D;
    p.beta = c0 == 0 ? 0.0f : 1.0f;
    gemm_cuda(p, st);
  }
  if (g.dh) {
    GemmParams p;
    p.M = r;
    p.N = hd.D;
    p.K = hd.V;
    p.ab_dtype = hd.dt;
    p.c_dtype = hd.dt;
    p.A = G;
    p.lda = ldG;
    p.B = hd.w;
    p.ldb = hd.D;
    p.C = rl.idx ? static_cast<void*>(g.dhc) : static_cast<void*>(g.dh + size_t(c0) * size_t(hd.D) * hd.esz);
    p.ldc = hd.D;
    gemm_cuda(p, st);
    if (rl.idx) {
      if (hd.dt == DType::F32)
        scatter_rows_kernel<float><<<unsigned(r), kCopyBlock, 0, st>>>(
            reinterpret_cast<const float*>(g.dhc), rl.idx + c0, hd.D, reinterpret_cast<float*>(g.dh));
      else
        scatter_rows_kernel<uint16_t><<<unsigned(r), kCopyBlock, 0, st>>>(
            reinterpret_cast<const uint16_t*>(g.dhc), rl.idx + c0, hd.D, reinterpret_cast<uint16_t*>(g.dh));
      CUDA_CHECK(cudaGetLastError());
    }
  }
}

// Before the chunks: dhidden rows of ignored rows are zero (the scatter writes the counted ones).
void zero_ignored_rows(const Head& hd, const Grads& g, const RowList& rl, int64_t N, cudaStream_t st) {
  if (g.dh && rl.idx) CUDA_CHECK(cudaMemsetAsync(g.dh, 0, size_t(N) * size_t(hd.D) * hd.esz, st));
}

// After the chunks: a bf16 dweight accumulated in fp32 is rounded once; with no chunk at all (no row
// counts) dweight is zero.
void finish_grads(const Head& hd, const Grads& g, bool any_chunk, cudaStream_t st) {
  if (!g.dw) return;
  const int64_t n = hd.V * hd.D;
  if (!any_chunk) {
    CUDA_CHECK(cudaMemsetAsync(g.dw, 0, size_t(n) * hd.esz, st));
  } else if (g.dw32) {
    const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65536);
    round_bf16_kernel<<<unsigned(blocks), 256, 0, st>>>(g.dw32, static_cast<uint16_t*>(g.dw), n);
    CUDA_CHECK(cudaGetLastError());
  }
}

void launch_finish(const float* ce, const float* kd, int64_t counted, const int32_t* idx, double wce, double wkd,
                   bool mean, float* loss, float* losses, cudaStream_t st) {
  finish_kernel<<<1, kCopyBlock, 0, st>>>(ce, kd, counted, idx, wce, wkd, mean, loss, losses);
  CUDA_CHECK(cudaGetLastError());
}

void fill_stats(LinearLossStats* s, int64_t counted, int64_t R, int64_t bytes) {
  if (!s) return;
  s->counted_rows = counted;
  s->chunk_rows = R;
  s->chunks = R > 0 ? (counted + R - 1) / R : 0;
  s->scratch_bytes = bytes;
}

}  // namespace

// ================================ linear cross entropy ==============================================

void linear_cross_entropy_cuda(const TensorView& hidden, const TensorView& weight, const TensorView& targets,
                               const LinearCrossEntropyParams& params, const TensorView& loss,
                               const TensorView& losses, const TensorView& dhidden, const TensorView& dweight,
                               void* stream) {
  const char* op = "linear_cross_entropy_cuda";
  check_tensor(hidden, op, "hidden");
  const Device dev = hidden.device;
  const HeadDims d = check_head(hidden, weight, dev, op, "hidden", "weight");
  TK_CHECK(params.reduction == LossReduction::Sum || params.reduction == LossReduction::Mean, op, ": reduction ",
           int(params.reduction), " must be sum or mean");
  TK_CHECK(params.chunk_rows >= 0, op, ": chunk_rows = ", params.chunk_rows, " must be >= 0 (0: automatic)");
  check_targets(targets, d.N, dev, op);
  check_f32(loss, 1, dev, op, "loss");
  check_f32(losses, d.N, dev, op, "losses");
  const bool want_dh = check_grad(dhidden, hidden, op, "dhidden", "hidden");
  const bool want_dw = check_grad(dweight, weight, op, "dweight", "weight");
  TK_CHECK(d.N <= INT32_MAX && d.V <= INT32_MAX, op, ": ", d.N, " rows of V = ", d.V, " exceed 2^31 - 1");
  require_cublaslt(op);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);

  // ---- which rows count (the one host wait), then the plan and the scratch (nothing written yet) ----
  const int32_t ignore = params.ignore_index;
  const int64_t N = d.N, D = d.D, V = d.V, P = round_up(V, 8);
  Arena list(st, op);
  const size_t idx_off = list.reserve(size_t(N) * 4), info_off = list.reserve(3 * sizeof(int64_t));
  list.allocate();
  const RowList rl = list_rows(targets, N, V, ignore, list, idx_off, info_off, st, op);
  const int64_t counted = rl.counted;
  const int64_t R = plan_rows(counted, P, 1, params.chunk_rows);
  const int64_t chunks = R > 0 ? (counted + R - 1) / R : 0;
  const bool grads = want_dh || want_dw;
  Head hd = make_head(hidden, weight, d);
  Arena arena(st, op);
  const size_t s_off = arena.reserve(size_t(R) * size_t(P) * 4);
  const size_t loss_off = arena.reserve(size_t(counted) * 4);
  const size_t gather_off = rl.idx ? arena.reserve(size_t(R) * size_t(D) * hd.esz) : SIZE_MAX;
  const size_t dhc_off = rl.idx && want_dh ? arena.reserve(size_t(R) * size_t(D) * hd.esz) : SIZE_MAX;
  const bool acc32 = want_dw && hd.dt == DType::BF16 && chunks > 1;
  const size_t dw32_off = acc32 ? arena.reserve(size_t(V) * size_t(D) * 4) : SIZE_MAX;
  arena.allocate();
  float* S = arena.at<float>(s_off);
  float* row_loss = arena.at<float>(loss_off);
  hd.gather = arena.at<char>(gather_off);
  Grads g;
  g.dh = want_dh ? static_cast<char*>(dhidden.data) : nullptr;
  g.dw = want_dw ? dweight.data : nullptr;
  g.dhc = arena.at<char>(dhc_off);
  g.dw32 = arena.at<float>(dw32_off);
  fill_stats(params.stats, counted, R, list.bytes() + arena.bytes());

  // ---- the chunks ----
  CUDA_CHECK(cudaMemsetAsync(losses.data, 0, size_t(N) * 4, st));
  zero_ignored_rows(hd, g, rl, N, st);
  const float scale = params.reduction == LossReduction::Sum
                          ? params.dloss
                          : (counted > 0 ? float(double(params.dloss) / double(counted)) : 0.0f);
  const int32_t* y = targets.ptr<const int32_t>();
  for (int64_t c0 = 0; c0 < counted; c0 += R) {
    const int64_t r = std::min(R, counted - c0);
    const void* a = chunk_input(hd, rl, c0, r, st);
    logits_gemm(hd, a, r, S, P, st);
    cuda_detail::LinearRowsArgs ra;
    ra.S = S;
    ra.ldS = P;
    ra.rows = r;
    ra.V = V;
    ra.ce = true;
    ra.targets = rl.idx ? y : y + c0;
    ra.idx = rl.idx ? rl.idx + c0 : nullptr;
    ra.ce_scale = scale;
    ra.ce_loss = row_loss + c0;
    ra.grad = grads;
    ra.gdt = hd.dt;
    cuda_detail::linear_rows_cuda(ra, st);
    if (grads) chunk_backward(hd, g, S, hd.dt == DType::BF16 ? 2 * P : P, a, rl, c0, r, st);
  }
  finish_grads(hd, g, counted > 0, st);
  launch_finish(row_loss, nullptr, counted, rl.idx, 1.0, 0.0, params.reduction == LossReduction::Mean,
                loss.ptr<float>(), losses.ptr<float>(), st);
}

// ================================ fused linear distillation =========================================

void linear_distill_cuda(const TensorView& student_hidden, const TensorView& student_weight,
                         const TensorView& teacher_hidden, const TensorView& teacher_weight,
                         const TensorView& targets, const LinearDistillParams& params, const TensorView& loss,
                         const TensorView& losses, const TensorView& dstudent_hidden,
                         const TensorView& dstudent_weight, void* stream) {
  const char* op = "linear_distill_cuda";
  check_tensor(student_hidden, op, "student_hidden");
  const Device dev = student_hidden.device;
  const HeadDims ds = check_head(student_hidden, student_weight, dev, op, "student_hidden", "student_weight");
  const HeadDims dt = check_head(teacher_hidden, teacher_weight, dev, op, "teacher_hidden", "teacher_weight");
  TK_CHECK(dt.N == ds.N, op, ": teacher_hidden ", describe(teacher_hidden), " must have ", ds.N,
           " rows like student_hidden ", describe(student_hidden));
  TK_CHECK(dt.V == ds.V, op, ": teacher_weight ", describe(teacher_weight), " must have V = ", ds.V,
           " rows like student_weight ", describe(student_weight));
  const DistillParams& dp = params.distill;
  TK_CHECK(dp.kind == DistillKind::ForwardKl || dp.kind == DistillKind::ReverseKl || dp.kind == DistillKind::Jsd, op,
           ": unknown distillation kind ", int(dp.kind));
  TK_CHECK(std::isfinite(dp.temperature) && dp.temperature > 0, op, ": temperature ", dp.temperature,
           " must be finite and > 0");
  if (dp.kind == DistillKind::Jsd)
    TK_CHECK(dp.beta >= 0.0f && dp.beta <= 1.0f, op, ": jsd beta ", dp.beta, " must be in [0, 1]");
  TK_CHECK(params.alpha >= 0.0f && params.alpha <= 1.0f, op, ": alpha ", params.alpha, " must be in [0, 1]");
  TK_CHECK(params.chunk_rows >= 0, op, ": chunk_rows = ", params.chunk_rows, " must be >= 0 (0: automatic)");
  const bool has_targets = targets.data != nullptr;
  if (has_targets)
    check_targets(targets, ds.N, dev, op);
  else
    TK_CHECK(params.alpha == 0.0f, op, ": alpha = ", params.alpha, " > 0 needs targets for its cross entropy");
  check_f32(loss, 1, dev, op, "loss");
  const bool want_losses = losses.data != nullptr;
  if (want_losses) check_f32(losses, ds.N, dev, op, "losses");
  const bool want_dh = check_grad(dstudent_hidden, student_hidden, op, "dstudent_hidden", "student_hidden");
  const bool want_dw = check_grad(dstudent_weight, student_weight, op, "dstudent_weight", "student_weight");
  TK_CHECK(ds.N <= INT32_MAX && ds.V <= INT32_MAX, op, ": ", ds.N, " rows of V = ", ds.V, " exceed 2^31 - 1");
  require_cublaslt(op);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);

  // ---- which rows count, the plan, the scratch ----
  const double alpha = params.alpha;
  const bool ce = alpha > 0, kd = alpha < 1, grads = want_dh || want_dw;
  const int32_t ignore = dp.ignore_index;
  const int64_t N = ds.N, V = ds.V, P = round_up(V, 8);
  Arena list(st, op);
  RowList rl;
  rl.counted = N;
  if (has_targets) {
    const size_t idx_off = list.reserve(size_t(N) * 4), info_off = list.reserve(3 * sizeof(int64_t));
    list.allocate();
    rl = list_rows(targets, N, V, ignore, list, idx_off, info_off, st, op);
  }
  const int64_t counted = rl.counted;
  const int buffers = kd ? 2 : 1;
  const int64_t R = plan_rows(counted, P, buffers, params.chunk_rows);
  const int64_t chunks = R > 0 ? (counted + R - 1) / R : 0;
  Head hs = make_head(student_hidden, student_weight, ds), ht = make_head(teacher_hidden, teacher_weight, dt);
  Arena arena(st, op);
  const size_t s_off = arena.reserve(size_t(R) * size_t(P) * 4);
  const size_t t_off = kd ? arena.reserve(size_t(R) * size_t(P) * 4) : SIZE_MAX;
  const size_t ce_off = ce ? arena.reserve(size_t(counted) * 4) : SIZE_MAX;
  const size_t kd_off = kd ? arena.reserve(size_t(counted) * 4) : SIZE_MAX;
  size_t sg_off = SIZE_MAX, tg_off = SIZE_MAX, dhc_off = SIZE_MAX;
  if (rl.idx) {
    sg_off = arena.reserve(size_t(R) * size_t(ds.D) * hs.esz);
    if (kd) tg_off = arena.reserve(size_t(R) * size_t(dt.D) * ht.esz);
    if (want_dh) dhc_off = arena.reserve(size_t(R) * size_t(ds.D) * hs.esz);
  }
  const bool acc32 = want_dw && hs.dt == DType::BF16 && chunks > 1;
  const size_t dw32_off = acc32 ? arena.reserve(size_t(V) * size_t(ds.D) * 4) : SIZE_MAX;
  arena.allocate();
  float* S = arena.at<float>(s_off);
  float* Tl = arena.at<float>(t_off);
  float* ce_all = arena.at<float>(ce_off);
  float* kd_all = arena.at<float>(kd_off);
  hs.gather = arena.at<char>(sg_off);
  ht.gather = arena.at<char>(tg_off);
  Grads g;
  g.dh = want_dh ? static_cast<char*>(dstudent_hidden.data) : nullptr;
  g.dw = want_dw ? dstudent_weight.data : nullptr;
  g.dhc = arena.at<char>(dhc_off);
  g.dw32 = arena.at<float>(dw32_off);
  fill_stats(params.stats, counted, R, list.bytes() + arena.bytes());

  // ---- the chunks ----
  if (want_losses) CUDA_CHECK(cudaMemsetAsync(losses.data, 0, size_t(N) * 4, st));
  zero_ignored_rows(hs, g, rl, N, st);
  const int32_t* y = has_targets ? targets.ptr<const int32_t>() : nullptr;
  const float ce_scale = counted > 0 ? float(double(params.dloss) * alpha / double(counted)) : 0.0f;
  const float kd_scale =
      counted > 0 ? float(double(params.dloss) * (1.0 - alpha) * double(dp.temperature) / double(counted)) : 0.0f;
  for (int64_t c0 = 0; c0 < counted; c0 += R) {
    const int64_t r = std::min(R, counted - c0);
    const void* a = chunk_input(hs, rl, c0, r, st);
    logits_gemm(hs, a, r, S, P, st);
    if (kd) logits_gemm(ht, chunk_input(ht, rl, c0, r, st), r, Tl, P, st);
    cuda_detail::LinearRowsArgs ra;
    ra.S = S;
    ra.ldS = P;
    ra.Tl = Tl;
    ra.ldT = P;
    ra.rows = r;
    ra.V = V;
    ra.ce = ce;
    if (ce) {
      ra.targets = rl.idx ? y : y + c0;
      ra.idx = rl.idx ? rl.idx + c0 : nullptr;
      ra.ce_scale = ce_scale;
      ra.ce_loss = ce_all + c0;
    }
    ra.kd = kd;
    if (kd) {
      ra.kind = dp.kind;
      ra.temperature = dp.temperature;
      ra.beta = dp.beta;
      ra.kd_scale = kd_scale;
      ra.kd_loss = kd_all + c0;
    }
    ra.grad = grads;
    ra.gdt = hs.dt;
    cuda_detail::linear_rows_cuda(ra, st);
    if (grads) chunk_backward(hs, g, S, hs.dt == DType::BF16 ? 2 * P : P, a, rl, c0, r, st);
  }
  finish_grads(hs, g, counted > 0, st);
  launch_finish(ce_all, kd_all, counted, rl.idx, alpha, 1.0 - alpha, true, loss.ptr<float>(),
                want_losses ? losses.ptr<float>() : nullptr, st);
}

}  // namespace tk
