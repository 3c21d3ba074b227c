// CUDA loss kernels: cross entropy, sequence log-probabilities, DPO, distillation, and the row
// engine of the fused linear losses (see loss_kernels.h for the contracts and the design).
//
// Layout of this file:
// - element access: fp32 / bf16 loads of 1 or 4 elements, bf16 rounding to nearest even (the
//   same bit arithmetic as core/dtype.h, so a bf16 gradient rounds exactly as on the CPU);
// - Group<kThreads>: the thread group that owns one row (a warp, or a whole block) and its
//   deterministic reductions;
// - rows_kernel: the row engine, one template for every row-wise loss. Its template arguments
//   are the element types (student / logits, teacher, gradient), the group size, which terms it
//   computes (cross entropy, distillation) and whether the gradient narrows fp32 logits to bf16 in
//   place (the linear losses' chunk buffers). Runtime fields of RowArgs select forward, backward
//   or fused behaviour, so the fused and split calls run the very same code;
// - small kernels: counting rows that count, fixed-order reductions over rows, DPO;
// - host entry points: checks, scratch (cudaMallocAsync / cudaFreeAsync on the stream), launches.
#include "loss_kernels.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../core/error.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {
namespace {

constexpr int kWarpMaxV = 2048;  // rows up to this length are owned by one warp
constexpr int kWarpBlock = 256;  // threads per block in warp-per-row mode (8 rows per block)
constexpr int kRowBlock = 512;   // threads per block in block-per-row mode
constexpr int kReduceBlock = 256;

// ================================ element access ===================================================

__device__ __forceinline__ float ld1(const float* p, int64_t j) { return p[j]; }
__device__ __forceinline__ float ld1(const uint16_t* p, int64_t j) { return __uint_as_float(uint32_t(p[j]) << 16); }

// 4 elements from p + j, which is aligned to 4 elements (16 B fp32, 8 B bf16).
__device__ __forceinline__ void ld4(const float* p, int64_t j, float (&v)[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p + j);
  v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}
__device__ __forceinline__ void ld4(const uint16_t* p, int64_t j, float (&v)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p + j);
  v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
  v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
}

// Round to nearest even; NaN stays a quiet NaN (core/dtype.h's f32_to_bf16, bit for bit).
__device__ __forceinline__ uint32_t f2bf(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ void st1(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void st1(uint16_t* p, int64_t j, float v) { p[j] = uint16_t(f2bf(v)); }
__device__ __forceinline__ void st4(float* p, int64_t j, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p + j) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void st4(uint16_t* p, int64_t j, const float (&v)[4]) {
  *reinterpret_cast<uint2*>(p + j) = make_uint2(f2bf(v[0]) | (f2bf(v[1]) << 16), f2bf(v[2]) | (f2bf(v[3]) << 16));
}

// Elements of T before p reaches 4-element (vector) alignment.
template <typename T>
__device__ __forceinline__ int head4(const T* p) {
  constexpr unsigned kVec = 4 * sizeof(T);
  const unsigned mis = unsigned(reinterpret_cast<uintptr_t>(p) % kVec);
  return mis ? int((kVec - mis) / sizeof(T)) : 0;
}

// ================================ online softmax statistics ========================================

// The loss passes spell out their fused multiply-adds (__fmaf_rn) instead of leaving contraction
// to the compiler, so every instantiation of the row engine (forward-only, fused, narrowing)
// computes the same loss bits.

// Folds one value (finite or -inf) into a running (max m, sum s of exp(x - m)).
__device__ __forceinline__ void online1(float& m, float& s, float v) {
  if (v > m) {
    s = __fmaf_rn(s, expf(m - v), 1.0f);  // m = -inf on the first finite value: exp(-inf) = 0
    m = v;
  } else if (v > -INFINITY) {
    s += expf(v - m);
  }
}

// Four values (finite or -inf): one rescale at most, then four exps.
__device__ __forceinline__ void online4(float& m, float& s, const float (&v)[4]) {
  const float mv = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3]));
  if (mv > m) {
    s *= expf(m - mv);
    m = mv;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (v[k] > -INFINITY) s += expf(v[k] - m);
}

// NaN and +inf are kept out of the statistics (the caller flags the row instead).
__device__ __forceinline__ float finite_or_ninf(float v) { return v < INFINITY ? v : -INFINITY; }

// (m, s) <- merge of (m, s) and (m2, s2). Symmetric in its two operands bit for bit (the products
// are rounded before the add: no FMA contraction), so both partners of a butterfly step agree.
__device__ __forceinline__ void merge_ms(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) {
    m = M;
    s = 0.0f;
    return;
  }
  s = __fmul_rn(s, expf(m - M)) + __fmul_rn(s2, expf(m2 - M));
  m = M;
}

// ================================ the thread group of a row ========================================

// kThreads == 32: a warp owns a row; otherwise the whole block (kThreads threads) does. Every
// reduction leaves the same value in every thread of the group, from a fixed combination order.
template <int kThreads>
struct Group {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kSmem = kWarps > 1 ? 6 * kWarps : 1;  // floats of shared scratch

  __device__ static void sync() {
    if constexpr (kThreads == 32)
      __syncwarp();
    else
      __syncthreads();
  }

  template <int n>
  __device__ static void sum(float (&v)[n], float* sm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int k = 0; k < n; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if constexpr (kWarps > 1) {
      const int w = int(threadIdx.x) >> 5;
      if ((threadIdx.x & 31) == 0)
        for (int k = 0; k < n; ++k) sm[k * kWarps + w] = v[k];
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        float t = sm[k * kWarps];
        for (int i = 1; i < kWarps; ++i) t += sm[k * kWarps + i];
        v[k] = t;
      }
      __syncthreads();
    }
  }

  template <int n>
  __device__ static void merge(float (&m)[n], float (&s)[n], float* sm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int k = 0; k < n; ++k) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[k], o), s2 = __shfl_xor_sync(0xffffffffu, s[k], o);
        merge_ms(m[k], s[k], m2, s2);
      }
    if constexpr (kWarps > 1) {
      const int w = int(threadIdx.x) >> 5;
      if ((threadIdx.x & 31) == 0)
        for (int k = 0; k < n; ++k) {
          sm[(2 * k) * kWarps + w] = m[k];
          sm[(2 * k + 1) * kWarps + w] = s[k];
        }
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        float mm = sm[(2 * k) * kWarps], ss = sm[(2 * k + 1) * kWarps];
        for (int i = 1; i < kWarps; ++i) merge_ms(mm, ss, sm[(2 * k) * kWarps + i], sm[(2 * k + 1) * kWarps + i]);
        m[k] = mm;
        s[k] = ss;
      }
      __syncthreads();
    }
  }
};

// ================================ the row engine ===================================================

struct RowArgs {
  const void* s = nullptr;  // logits / student rows: row r at s + r * lds elements
  int64_t lds = 0;
  const void* t = nullptr;  // teacher rows (distillation)
  int64_t ldt = 0;
  void* g = nullptr;        // gradient rows (null: none); may alias s
  int64_t ldg = 0;
  int64_t rows = 0, V = 0;
  // targets[idx ? idx[r] : r]: the target (cross entropy) or the ignore mask (distillation only)
  const int32_t* targets = nullptr;
  const int32_t* idx = nullptr;
  int32_t ignore_index = 0;
  // cross entropy outputs (any may be null) and the saved lse of a backward
  const float* lse_in = nullptr;
  float* lse_out = nullptr;
  float* ce_loss = nullptr;
  // cross entropy gradient scale: dl = ce_host * (ce_dev ? ce_dev[0] : 1), divided by the count
  // for a mean, times vec_sign * ce_vec[r / vec_div] per row when ce_vec is set
  float ce_host = 1.0f;
  const float* ce_dev = nullptr;
  bool ce_mean = false;
  const float* ce_vec = nullptr;
  int64_t vec_div = 1;
  float vec_sign = 1.0f;
  // distillation
  int kind = 0;  // DistillKind, jsd with beta 0 / 1 already mapped
  float inv_t = 1.0f, t2 = 1.0f, temperature = 1.0f, beta = 0.5f, log_beta = 0.0f, log_1mbeta = 0.0f;
  float* kd_loss = nullptr;  // T^2 D per row
  // distillation gradient scale c: kd_direct ? dl : dl * T / count, dl = kd_host * (kd_dev ? kd_dev[0] : 1)
  float kd_host = 1.0f;
  const float* kd_dev = nullptr;
  bool kd_direct = false;
  // rows that count (mean and distillation scales): count_dev ? *count_dev : count_host
  const int64_t* count_dev = nullptr;
  int64_t count_host = 0;
};

constexpr int kFkl = int(DistillKind::ForwardKl), kRkl = int(DistillKind::ReverseKl), kJsd = int(DistillKind::Jsd);

// The per-row constants of the distillation terms, after pass 1.
struct KdRow {
  float inv_t, ms, mt, ls, lt, is, it, beta, log_beta, log_1mbeta;
  int kind;
};

// One element's divergence term and the (A, B) of its gradient c (A - B K) (cpu/distill.h).
__device__ __forceinline__ void kd_elem(const KdRow& k, float x, float tv, float& term, float& A, float& B) {
  const float zs = x * k.inv_t, zt = tv * k.inv_t;
  const float lq = (zs - k.ms) - k.ls, lp = (zt - k.mt) - k.lt;
  const float q = expf(zs - k.ms) * k.is;
  if (k.kind == kRkl) {
    term = q * (lq - lp);
    A = term;
    B = q;
    return;
  }
  const float p = expf(zt - k.mt) * k.it;
  if (k.kind == kFkl) {
    term = p * (lp - lq);
    A = q;
    B = p;
    return;
  }
  // jsd: log m = logaddexp(log beta + log p, log(1 - beta) + log q)
  const float a = lp + k.log_beta, b = lq + k.log_1mbeta;
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  const float lm = hi + log1pf(expf(lo - hi));
  const float gq = ((1.0f - k.beta) * q) * (lq - lm);
  term = __fmaf_rn(k.beta * p, lp - lm, gq);
  A = gq;
  B = q;
}

// rows_kernel: one group (warp or block) per row of a.rows rows of a.V elements.
//   s: [rows, V] TS (pitch lds)   t: [rows, V] TT (pitch ldt, kKd)   g: [rows, V] TG (pitch ldg)
//   targets / idx: [rows] I32     lse_in, lse_out, ce_loss, kd_loss: [rows] F32
// kNarrow: TS = float, TG = uint16_t, g == s with ldg = 2 lds, rows 16-byte aligned (the linear
// losses' chunk buffers): the gradient pass stores a tile only after the whole group has read it.
template <typename TS, typename TT, typename TG, int kThreads, bool kCe, bool kKd, bool kNarrow>
__global__ void __launch_bounds__(kThreads == 32 ? kWarpBlock : kThreads) rows_kernel(const RowArgs a) {
  using G = Group<kThreads>;
  __shared__ float sm[G::kSmem];
  const int lane = kThreads == 32 ? int(threadIdx.x & 31) : int(threadIdx.x);
  const int64_t r = kThreads == 32 ? int64_t(blockIdx.x) * (kWarpBlock / 32) + int64_t(threadIdx.x >> 5)
                                   : int64_t(blockIdx.x);
  if (r >= a.rows) return;  // whole warps only (warp mode); never in block mode
  const int64_t V = a.V;
  const TS* srow = static_cast<const TS*>(a.s) + r * a.lds;
  const TT* trow = kKd ? static_cast<const TT*>(a.t) + r * a.ldt : nullptr;
  TG* grow = a.g ? static_cast<TG*>(a.g) + r * a.ldg : nullptr;

  int32_t tgt = -1;
  bool ignored = false, invalid = false;
  if (a.targets) {
    tgt = a.targets[a.idx ? a.idx[r] : r];
    ignored = tgt == a.ignore_index;
    if (kCe && !ignored) invalid = tgt < 0 || int64_t(tgt) >= V;
  }
  if (ignored) {
    if (lane == 0) {
      if (kCe && a.lse_out) a.lse_out[r] = 0.0f;
      if (kCe && a.ce_loss) a.ce_loss[r] = 0.0f;
      if (kKd && a.kd_loss) a.kd_loss[r] = 0.0f;
    }
    if (grow)
      for (int64_t j = lane; j < V; j += kThreads) st1(grow, j, 0.0f);
    return;
  }

  // The row's split: [0, head) element by element (unaligned start), [head, tail0) in 4-element
  // vectors, [tail0, V) element by element. Streams whose alignments differ are read element by
  // element throughout; the gradient is stored by vectors only when it shares the alignment.
  const int hs = head4(srow);
  const bool vin = !kKd || head4(trow) == hs;
  const int64_t head = vin ? (hs < V ? int64_t(hs) : V) : V;
  const int64_t nvec = (V - head) / 4, tail0 = head + 4 * nvec;
  const bool vout = grow && vin && head4(grow) == hs;

  // ---- pass 1: log-sum-exps (cross entropy: of x; distillation: of x / T and t / T) ----
  const bool ce_stats = kCe && a.lse_in == nullptr;
  // The target logit, for the loss only: read before pass 1, whose group reductions order it
  // before any in-place gradient store of pass 3. (The backward has no pass 1 and no loss: there
  // the target element's gradient uses the value its own thread reads.)
  const float kNaN = __int_as_float(0x7fc00000);
  float xt = 0.0f;
  if (kCe && ce_stats && a.ce_loss) xt = invalid ? kNaN : ld1(srow, tgt);
  float m[3] = {-INFINITY, -INFINITY, -INFINITY}, sums[3] = {0.0f, 0.0f, 0.0f};
  float bad[1] = {0.0f};
  const float inv_t = a.inv_t;
  if (ce_stats || kKd) {
    for (int64_t i = lane; i < nvec; i += kThreads) {
      const int64_t j = head + 4 * i;
      float x[4];
      ld4(srow, j, x);
      if (ce_stats) {
        float w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          w[k] = finite_or_ninf(x[k]);
          if (!(x[k] < INFINITY)) bad[0] = 1.0f;
        }
        online4(m[0], sums[0], w);
      }
      if (kKd) {
        float tv[4], z[4];
        ld4(trow, j, tv);
#pragma unroll
        for (int k = 0; k < 4; ++k) z[k] = finite_or_ninf(x[k] * inv_t);
        online4(m[1], sums[1], z);
#pragma unroll
        for (int k = 0; k < 4; ++k) z[k] = finite_or_ninf(tv[k] * inv_t);
        online4(m[2], sums[2], z);
      }
    }
    auto one = [&](int64_t j) {
      const float x = ld1(srow, j);
      if (ce_stats) {
        if (!(x < INFINITY)) bad[0] = 1.0f;
        online1(m[0], sums[0], finite_or_ninf(x));
      }
      if (kKd) {
        online1(m[1], sums[1], finite_or_ninf(x * inv_t));
        online1(m[2], sums[2], finite_or_ninf(ld1(trow, j) * inv_t));
      }
    };
    for (int64_t j = lane; j < head; j += kThreads) one(j);
    for (int64_t j = tail0 + lane; j < V; j += kThreads) one(j);
    G::template merge<3>(m, sums, sm);
    if (ce_stats) G::template sum<1>(bad, sm);
  }

  float lse = 0.0f;
  if (kCe) {
    if (invalid)
      lse = kNaN;
    else if (!ce_stats)
      lse = a.lse_in[r];
    else if (bad[0] != 0.0f)
      lse = kNaN;
    else
      lse = m[0] == -INFINITY ? -INFINITY : m[0] + logf(sums[0]);
  }

  KdRow kr{};
  float D = 0.0f, K = 1.0f;
  if (kKd) {
    kr.inv_t = inv_t;
    kr.ms = m[1];
    kr.mt = m[2];
    kr.ls = logf(sums[1]);
    kr.lt = logf(sums[2]);
    kr.is = 1.0f / sums[1];
    kr.it = 1.0f / sums[2];
    kr.beta = a.beta;
    kr.log_beta = a.log_beta;
    kr.log_1mbeta = a.log_1mbeta;
    kr.kind = a.kind;
    // ---- pass 2: the divergence D and the gradient constant K ----
    float acc[2] = {0.0f, 0.0f};
    auto one = [&](float x, float tv) {
      float term, A, B;
      kd_elem(kr, x, tv, term, A, B);
      acc[0] = __fadd_rn(acc[0], term);  // no contraction with the product in term
      if (kr.kind == kJsd) acc[1] = __fadd_rn(acc[1], A);
    };
    for (int64_t i = lane; i < nvec; i += kThreads) {
      const int64_t j = head + 4 * i;
      float x[4], tv[4];
      ld4(srow, j, x);
      ld4(trow, j, tv);
#pragma unroll
      for (int k = 0; k < 4; ++k) one(x[k], tv[k]);
    }
    for (int64_t j = lane; j < head; j += kThreads) one(ld1(srow, j), ld1(trow, j));
    for (int64_t j = tail0 + lane; j < V; j += kThreads) one(ld1(srow, j), ld1(trow, j));
    G::template sum<2>(acc, sm);
    D = acc[0];
    K = kr.kind == kFkl ? 1.0f : (kr.kind == kRkl ? D : acc[1]);
  }

  // ---- pass 3: the gradient ----
  if (grow) {
    // Every read of passes 1-2 (xt included) is ordered before the in-place stores below; shuffles
    // alone do not order memory between lanes.
    G::sync();
    const int64_t count = a.count_dev ? *a.count_dev : a.count_host;
    float ce_s = 0.0f, c = 0.0f;
    if (kCe) {
      float dl = a.ce_host * (a.ce_dev ? a.ce_dev[0] : 1.0f);
      if (a.ce_mean) dl = count > 0 ? float(double(dl) / double(count)) : 0.0f;
      ce_s = a.ce_vec ? (a.vec_sign * a.ce_vec[r / a.vec_div]) * dl : dl;
    }
    if (kKd) {
      const float dl = a.kd_host * (a.kd_dev ? a.kd_dev[0] : 1.0f);
      c = a.kd_direct ? dl : (count > 0 ? float(double(dl) * double(a.temperature) / double(count)) : 0.0f);
    }
    auto grad = [&](int64_t j, float x, float tv) -> float {
      float gsum = 0.0f;
      if (kCe) {
        gsum = j == tgt ? expf(x - lse) * ce_s - ce_s : expf(x - lse) * ce_s;
      }
      if (kKd) {
        float term, A, B;
        kd_elem(kr, x, tv, term, A, B);
        const float gk = c * (A - B * K);
        gsum = kCe ? gk + gsum : gk;
      }
      return gsum;
    };
    if constexpr (!kNarrow) {
      for (int64_t i = lane; i < nvec; i += kThreads) {
        const int64_t j = head + 4 * i;
        float x[4], tv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o[4];
        ld4(srow, j, x);
        if (kKd) ld4(trow, j, tv);
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = grad(j + k, x[k], tv[k]);
        if (vout) {
          st4(grow, j, o);
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) st1(grow, j + k, o[k]);
        }
      }
      auto one = [&](int64_t j) { st1(grow, j, grad(j, ld1(srow, j), kKd ? ld1(trow, j) : 0.0f)); };
      for (int64_t j = lane; j < head; j += kThreads) one(j);
      for (int64_t j = tail0 + lane; j < V; j += kThreads) one(j);
    } else {
      // bf16 over the fp32 row (head == 0: the caller's rows are aligned). A tile's bf16 bytes
      // cover fp32 elements of this tile and earlier ones only, all read before the sync.
      for (int64_t base = 0; base < nvec; base += kThreads) {
        const int64_t i = base + lane, j = 4 * i;
        const bool act = i < nvec;
        float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (act) {
          float x[4], tv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          ld4(srow, j, x);
          if (kKd) ld4(trow, j, tv);
#pragma unroll
          for (int k = 0; k < 4; ++k) o[k] = grad(j + k, x[k], tv[k]);
        }
        G::sync();
        if (act) st4(grow, j, o);
      }
      const int64_t j = tail0 + lane;
      const bool act = j < V;
      float o = 0.0f;
      if (act) o = grad(j, ld1(srow, j), kKd ? ld1(trow, j) : 0.0f);
      G::sync();
      if (act) st1(grow, j, o);
    }
  }

  if (lane == 0) {
    if (kCe && a.lse_out) a.lse_out[r] = lse;
    if (kCe && a.ce_loss) a.ce_loss[r] = lse - xt;
    if (kKd && a.kd_loss) a.kd_loss[r] = a.t2 * D;
  }
}

// Launches rows_kernel for a.rows rows: warp per row for short rows (when allowed), else block.
template <typename TS, typename TT, typename TG, bool kCe, bool kKd, bool kNarrow, bool kAllowWarp>
void launch_rows(const RowArgs& a, cudaStream_t st) {
  if (a.rows == 0) return;
  if (kAllowWarp && a.V <= kWarpMaxV) {
    const int64_t blocks = (a.rows + kWarpBlock / 32 - 1) / (kWarpBlock / 32);
    rows_kernel<TS, TT, TG, 32, kCe, kKd, kNarrow><<<unsigned(blocks), kWarpBlock, 0, st>>>(a);
  } else {
    rows_kernel<TS, TT, TG, kRowBlock, kCe, kKd, kNarrow><<<unsigned(a.rows), kRowBlock, 0, st>>>(a);
  }
  CUDA_CHECK(cudaGetLastError());
}

// ================================ small kernels ====================================================

// Sum of a double over a block of kReduceBlock threads; thread 0 gets the result.
__device__ double block_sum_double(double v, double* sm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = int(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) sm[w] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kReduceBlock / 32; ++i) t += sm[i];
  __syncthreads();
  return t;
}

// count[0] = #{n < N : targets[n] != ignore_index}. One block of kReduceBlock threads.
//   targets: [N] I32   count: [1] I64
__global__ void __launch_bounds__(kReduceBlock) count_kernel(const int32_t* targets, int64_t N, int32_t ignore_index,
                                                             int64_t* count) {
  __shared__ double sm[kReduceBlock / 32];
  int64_t c = 0;
  for (int64_t n = threadIdx.x; n < N; n += kReduceBlock) c += targets[n] != ignore_index;
  const double t = block_sum_double(double(c), sm);  // exact: counts are far below 2^53
  if (threadIdx.x == 0) count[0] = int64_t(t);
}

// One block per segment b of `len` values x[b len, (b + 1) len): their sum in double in a fixed
// order, then out[b] = mean ? sum / count (0 when count is 0) : sum * mul, rounded to fp32.
//   x: [segments * len] F32   out: [segments] F32
__global__ void __launch_bounds__(kReduceBlock) reduce_rows_kernel(const float* x, int64_t len, float* out, double mul,
                                                                   bool mean, const int64_t* count_dev,
                                                                   int64_t count_host) {
  __shared__ double sm[kReduceBlock / 32];
  const float* seg = x + int64_t(blockIdx.x) * len;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < len; i += kReduceBlock) s += double(seg[i]);
  const double t = block_sum_double(s, sm);
  if (threadIdx.x == 0) {
    double v = t * mul;
    if (mean) {
      const int64_t c = count_dev ? *count_dev : count_host;
      v = c > 0 ? t / double(c) : 0.0;
    }
    out[blockIdx.x] = float(v);
  }
}

__device__ double log_sigmoid_d(double x) { return fmin(x, 0.0) - log1p(exp(-fabs(x))); }
__device__ double sigmoid_d(double x) {
  const double e = exp(-fabs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

// DPO per pair b < B (TRL's dpo_loss, in double). Forward when losses is set, else backward.
//   pc, pr, rc, rr, losses, cr, rj, dout, gc, gr: [B] F32
__global__ void dpo_kernel(const float* pc, const float* pr, const float* rc, const float* rr, int64_t B, double beta,
                           int kind, double ls, float* losses, float* cr, float* rj, const float* dout, float* gc,
                           float* gr) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const double z = (double(pc[b]) - pr[b]) - (double(rc[b]) - rr[b]);
  if (losses) {
    double l = 0;
    switch (kind) {
      case int(DpoKind::Sigmoid): l = -log_sigmoid_d(beta * z) * (1 - ls) - log_sigmoid_d(-beta * z) * ls; break;
      case int(DpoKind::Ipo): l = (z - 1 / (2 * beta)) * (z - 1 / (2 * beta)); break;
      default: l = fmax(0.0, 1 - beta * z); break;
    }
    losses[b] = float(l);
    cr[b] = float(beta * (double(pc[b]) - rc[b]));
    rj[b] = float(beta * (double(pr[b]) - rr[b]));
  } else {
    double dz = 0;
    switch (kind) {
      case int(DpoKind::Sigmoid): dz = beta * (sigmoid_d(beta * z) * ls - sigmoid_d(-beta * z) * (1 - ls)); break;
      case int(DpoKind::Ipo): dz = 2 * (z - 1 / (2 * beta)); break;
      default: dz = 1 - beta * z > 0 ? -beta : 0.0; break;
    }
    const double g = double(dout[b]) * dz;
    gc[b] = float(g);
    gr[b] = float(-g);
  }
}

// ================================ host: checks and scratch =========================================

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CUDA, op, ": ", what, " is on ", v.device.name(), ", expected a cuda device");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_f32(const TensorView& v, int64_t numel, const char* op, const char* what) {
  check_tensor(v, op, what);
  TK_CHECK(v.dtype == DType::F32, op, ": ", what, " ", describe(v), " must be f32");
  TK_CHECK(v.numel() == numel, op, ": ", what, " ", describe(v), " must have ", numel, " elements");
}

void check_same_device(const TensorView& v, const TensorView& ref, const char* op, const char* what) {
  TK_CHECK(v.device == ref.device, op, ": ", what, " is on ", v.device.name(), ", the other operands on ",
           ref.device.name());
}

bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  return true;
}

// logits [..., V], V >= 1, F32 | BF16; returns V.
int64_t check_logits(const TensorView& x, const char* op, const char* what) {
  check_tensor(x, op, what);
  TK_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, op, ": ", what, " ", describe(x), " must be f32 or bf16");
  TK_CHECK(x.ndim >= 1 && x.shape[x.ndim - 1] >= 1, op, ": ", what, " ", describe(x),
           " must have a last (vocabulary) dim V >= 1");
  return x.shape[x.ndim - 1];
}

void check_targets(const TensorView& t, int64_t N, const TensorView& ref, const char* op) {
  check_tensor(t, op, "targets");
  check_same_device(t, ref, op, "targets");
  TK_CHECK(t.dtype == DType::I32, op, ": targets ", describe(t), " must be i32");
  TK_CHECK(t.numel() == N, op, ": targets ", describe(t), " must have ", N, " elements (one per logits row)");
}

void check_out_f32(const TensorView& v, int64_t numel, const TensorView& ref, const char* op, const char* what) {
  check_f32(v, numel, op, what);
  check_same_device(v, ref, op, what);
}

void check_grad_like(const TensorView& d, const TensorView& like, const char* op, const char* what,
                     const char* lname) {
  check_tensor(d, op, what);
  check_same_device(d, like, op, what);
  TK_CHECK(same_shape(d, like) && d.dtype == like.dtype, op, ": ", what, " ", describe(d), " must match ", lname, " ",
           describe(like));
}

void check_reduction(LossReduction r, const char* op) {
  TK_CHECK(r == LossReduction::None || r == LossReduction::Sum || r == LossReduction::Mean, op,
           ": unknown reduction ", int(r));
}

// One stream-ordered scratch block from tunekit's caching allocator, tagged with the stream and
// released on it when the call returns (or throws): the block is handed out again only to work
// issued after this call's kernels. Through the allocator it counts in tk.memory() and its peak.
class AsyncScratch {
 public:
  // Out of memory is the allocator's error, which names the size and the free memory.
  AsyncScratch(size_t bytes, cudaStream_t st) : st_(st) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaGetDevice(&device_));
    p_ = cuda::detail::allocate_on(device_, bytes, st);
  }
  ~AsyncScratch() {
    if (p_) cuda::detail::release_on(device_, p_, st_);
  }
  AsyncScratch(const AsyncScratch&) = delete;
  AsyncScratch& operator=(const AsyncScratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
  cudaStream_t st_;
  int device_ = 0;
};

cudaStream_t to_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Cross-entropy rows on logits of dtype dt.
void launch_ce(const RowArgs& a, DType dt, cudaStream_t st) {
  if (dt == DType::F32)
    launch_rows<float, float, float, true, false, false, true>(a, st);
  else
    launch_rows<uint16_t, uint16_t, uint16_t, true, false, false, true>(a, st);
}

// Distillation rows on student dtype sdt (and gradient of that dtype) and teacher dtype tdt.
void launch_kd(const RowArgs& a, DType sdt, DType tdt, cudaStream_t st) {
  if (sdt == DType::F32 && tdt == DType::F32)
    launch_rows<float, float, float, false, true, false, true>(a, st);
  else if (sdt == DType::F32)
    launch_rows<float, uint16_t, float, false, true, false, true>(a, st);
  else if (tdt == DType::F32)
    launch_rows<uint16_t, float, uint16_t, false, true, false, true>(a, st);
  else
    launch_rows<uint16_t, uint16_t, uint16_t, false, true, false, true>(a, st);
}

void launch_count(const TensorView& targets, int64_t N, int32_t ignore_index, int64_t* count, cudaStream_t st) {
  count_kernel<<<1, kReduceBlock, 0, st>>>(targets.ptr<const int32_t>(), N, ignore_index, count);
  CUDA_CHECK(cudaGetLastError());
}

void launch_reduce(const float* x, int64_t segments, int64_t len, float* out, double mul, bool mean,
                   const int64_t* count_dev, int64_t count_host, cudaStream_t st) {
  if (segments == 0) return;
  reduce_rows_kernel<<<unsigned(segments), kReduceBlock, 0, st>>>(x, len, out, mul, mean, count_dev, count_host);
  CUDA_CHECK(cudaGetLastError());
}

// ---- cross entropy checks ----
struct CeDims {
  int64_t N, V;
};

CeDims check_ce(const TensorView& logits, const TensorView& targets, LossReduction r, const char* op) {
  check_reduction(r, op);
  const int64_t V = check_logits(logits, op, "logits");
  const int64_t N = logits.numel() / V;
  check_targets(targets, N, logits, op);
  return {N, V};
}

// ---- distillation checks ----
struct KdDims {
  int64_t N, V;
  bool masked;
};

KdDims check_kd(const TensorView& s, const TensorView& t, const TensorView& targets, const DistillParams& p,
                const char* op) {
  const int64_t V = check_logits(s, op, "student");
  check_tensor(t, op, "teacher");
  check_same_device(t, s, op, "teacher");
  TK_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16, op, ": teacher ", describe(t), " must be f32 or bf16");
  TK_CHECK(same_shape(s, t), op, ": teacher ", describe(t), " must have the student's shape ", describe(s));
  TK_CHECK(p.kind == DistillKind::ForwardKl || p.kind == DistillKind::ReverseKl || p.kind == DistillKind::Jsd, op,
           ": unknown distillation kind ", int(p.kind));
  TK_CHECK(std::isfinite(p.temperature) && p.temperature > 0, op, ": temperature ", p.temperature,
           " must be finite and > 0");
  if (p.kind == DistillKind::Jsd)
    TK_CHECK(p.beta >= 0.0f && p.beta <= 1.0f, op, ": jsd beta ", p.beta, " must be in [0, 1]");
  const int64_t N = s.numel() / V;
  const bool masked = targets.data != nullptr;
  if (masked) check_targets(targets, N, s, op);
  return {N, V, masked};
}

// The distillation fields of RowArgs (jsd beta 0 / 1 mapped to the KLs, as Liger and the CPU).
void set_kd(RowArgs& a, const DistillParams& p) {
  DistillKind kind = p.kind;
  if (kind == DistillKind::Jsd && p.beta == 0.0f) kind = DistillKind::ForwardKl;
  if (kind == DistillKind::Jsd && p.beta == 1.0f) kind = DistillKind::ReverseKl;
  a.kind = int(kind);
  a.inv_t = 1.0f / p.temperature;
  a.t2 = p.temperature * p.temperature;
  a.temperature = p.temperature;
  a.beta = p.beta;
  a.log_beta = std::log(p.beta);
  a.log_1mbeta = std::log1p(-p.beta);
}

// The row engine's arguments for a distillation call: student and teacher rows, the targets'
// mask and the distillation fields. Callers add the outputs (per-row losses, the gradient).
RowArgs kd_rows(const TensorView& student, const TensorView& teacher, const TensorView& targets, const KdDims& d,
                const DistillParams& p) {
  RowArgs a;
  a.s = student.data;
  a.lds = d.V;
  a.t = teacher.data;
  a.ldt = d.V;
  a.rows = d.N;
  a.V = d.V;
  a.targets = d.masked ? targets.ptr<const int32_t>() : nullptr;
  a.ignore_index = p.ignore_index;
  set_kd(a, p);
  return a;
}

// ---- DPO checks ----
void check_dpo(const TensorView& pc, const TensorView& pr, const TensorView& rc, const TensorView& rr,
               const DpoParams& p, const char* op) {
  check_tensor(pc, op, "policy_chosen");
  TK_CHECK(pc.dtype == DType::F32, op, ": policy_chosen ", describe(pc), " must be f32");
  const int64_t B = pc.numel();
  check_out_f32(pr, B, pc, op, "policy_rejected");
  check_out_f32(rc, B, pc, op, "ref_chosen");
  check_out_f32(rr, B, pc, op, "ref_rejected");
  TK_CHECK(std::isfinite(p.beta) && p.beta > 0, op, ": beta = ", p.beta, " must be finite and > 0");
  TK_CHECK(p.kind == DpoKind::Sigmoid || p.kind == DpoKind::Ipo || p.kind == DpoKind::Hinge, op,
           ": unknown kind ", int(p.kind));
  TK_CHECK(p.label_smoothing >= 0 && p.label_smoothing <= 0.5f, op, ": label_smoothing = ", p.label_smoothing,
           " must be in [0, 0.5]");
}

void launch_dpo(const TensorView& pc, const TensorView& pr, const TensorView& rc, const TensorView& rr,
                const DpoParams& p, float* losses, float* cr, float* rj, const float* dout, float* gc, float* gr,
                cudaStream_t st) {
  const int64_t B = pc.numel();
  if (B == 0) return;
  const int threads = 128;
  dpo_kernel<<<unsigned((B + threads - 1) / threads), threads, 0, st>>>(
      pc.ptr<const float>(), pr.ptr<const float>(), rc.ptr<const float>(), rr.ptr<const float>(), B,
      double(p.beta), int(p.kind), double(p.label_smoothing), losses, cr, rj, dout, gc, gr);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ================================ cross entropy ====================================================

void cross_entropy_forward_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                LossReduction reduction, const TensorView& losses, const TensorView& lse,
                                const TensorView& loss, void* stream) {
  const char* op = "cross_entropy_forward_cuda";
  const CeDims d = check_ce(logits, targets, reduction, op);
  check_out_f32(losses, d.N, logits, op, "losses");
  check_out_f32(lse, d.N, logits, op, "lse");
  if (reduction != LossReduction::None) check_out_f32(loss, 1, logits, op, "loss");
  const cudaStream_t st = to_stream(stream);
  const bool mean = reduction == LossReduction::Mean;
  AsyncScratch count(mean ? sizeof(int64_t) : 0, st);
  if (mean) launch_count(targets, d.N, ignore_index, count.as<int64_t>(), st);
  RowArgs a;
  a.s = logits.data;
  a.lds = d.V;
  a.rows = d.N;
  a.V = d.V;
  a.targets = targets.ptr<const int32_t>();
  a.ignore_index = ignore_index;
  a.lse_out = lse.ptr<float>();
  a.ce_loss = losses.ptr<float>();
  launch_ce(a, logits.dtype, st);
  if (reduction != LossReduction::None)
    launch_reduce(losses.ptr<const float>(), 1, d.N, loss.ptr<float>(), 1.0, mean, count.as<int64_t>(), 0, st);
}

void cross_entropy_backward_cuda(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                 const TensorView& dloss, int32_t ignore_index, LossReduction reduction,
                                 const TensorView& dlogits, void* stream) {
  const char* op = "cross_entropy_backward_cuda";
  const CeDims d = check_ce(logits, targets, reduction, op);
  check_out_f32(lse, d.N, logits, op, "lse");
  check_out_f32(dloss, reduction == LossReduction::None ? d.N : 1, logits, op, "dloss");
  check_grad_like(dlogits, logits, op, "dlogits", "logits");
  const cudaStream_t st = to_stream(stream);
  const bool mean = reduction == LossReduction::Mean;
  AsyncScratch count(mean ? sizeof(int64_t) : 0, st);
  if (mean) launch_count(targets, d.N, ignore_index, count.as<int64_t>(), st);
  RowArgs a;
  a.s = logits.data;
  a.lds = d.V;
  a.g = dlogits.data;
  a.ldg = d.V;
  a.rows = d.N;
  a.V = d.V;
  a.targets = targets.ptr<const int32_t>();
  a.ignore_index = ignore_index;
  a.lse_in = lse.ptr<const float>();
  if (reduction == LossReduction::None) {
    a.ce_vec = dloss.ptr<const float>();
  } else {
    a.ce_dev = dloss.ptr<const float>();
    a.ce_mean = mean;
    a.count_dev = count.as<int64_t>();
  }
  launch_ce(a, logits.dtype, st);
}

void cross_entropy_fused_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                              LossReduction reduction, float dloss, const TensorView& losses, const TensorView& lse,
                              const TensorView& loss, const TensorView& dlogits, void* stream) {
  const char* op = "cross_entropy_fused_cuda";
  const CeDims d = check_ce(logits, targets, reduction, op);
  check_out_f32(losses, d.N, logits, op, "losses");
  check_out_f32(lse, d.N, logits, op, "lse");
  if (reduction != LossReduction::None) check_out_f32(loss, 1, logits, op, "loss");
  check_grad_like(dlogits, logits, op, "dlogits", "logits");
  const cudaStream_t st = to_stream(stream);
  const bool mean = reduction == LossReduction::Mean;
  AsyncScratch count(mean ? sizeof(int64_t) : 0, st);
  if (mean) launch_count(targets, d.N, ignore_index, count.as<int64_t>(), st);
  RowArgs a;
  a.s = logits.data;
  a.lds = d.V;
  a.g = dlogits.data;
  a.ldg = d.V;
  a.rows = d.N;
  a.V = d.V;
  a.targets = targets.ptr<const int32_t>();
  a.ignore_index = ignore_index;
  a.lse_out = lse.ptr<float>();
  a.ce_loss = losses.ptr<float>();
  a.ce_host = dloss;
  a.ce_mean = mean;
  a.count_dev = count.as<int64_t>();
  launch_ce(a, logits.dtype, st);
  if (reduction != LossReduction::None)
    launch_reduce(losses.ptr<const float>(), 1, d.N, loss.ptr<float>(), 1.0, mean, count.as<int64_t>(), 0, st);
}

// ================================ sequence log-probabilities =======================================

namespace {
struct SeqDims {
  int64_t B, T, V;
};
SeqDims check_seq(const TensorView& logits, const TensorView& targets, const char* op) {
  const int64_t V = check_logits(logits, op, "logits");
  TK_CHECK(logits.ndim == 3, op, ": logits ", describe(logits), " must be [B, T, V]");
  const int64_t B = logits.shape[0], T = logits.shape[1];
  check_tensor(targets, op, "targets");
  check_same_device(targets, logits, op, "targets");
  TK_CHECK(targets.dtype == DType::I32, op, ": targets ", describe(targets), " must be i32");
  TK_CHECK(targets.ndim == 2 && targets.shape[0] == B && targets.shape[1] == T, op, ": targets ", describe(targets),
           " must be [", B, ", ", T, "] to match logits ", describe(logits));
  return {B, T, V};
}
}  // namespace

void sequence_logprobs_forward_cuda(const TensorView& logits, const TensorView& targets, int32_t ignore_index,
                                    const TensorView& out, const TensorView& lse, void* stream) {
  const char* op = "sequence_logprobs_forward_cuda";
  const SeqDims d = check_seq(logits, targets, op);
  check_out_f32(out, d.B, logits, op, "out");
  check_out_f32(lse, d.B * d.T, logits, op, "lse");
  const cudaStream_t st = to_stream(stream);
  AsyncScratch row_loss(size_t(d.B * d.T) * sizeof(float), st);
  RowArgs a;
  a.s = logits.data;
  a.lds = d.V;
  a.rows = d.B * d.T;
  a.V = d.V;
  a.targets = targets.ptr<const int32_t>();
  a.ignore_index = ignore_index;
  a.lse_out = lse.ptr<float>();
  a.ce_loss = row_loss.as<float>();
  launch_ce(a, logits.dtype, st);
  // out[b] = -(sum of the row losses of sequence b): log p = -(cross entropy)
  launch_reduce(row_loss.as<float>(), d.B, d.T, out.ptr<float>(), -1.0, false, nullptr, 0, st);
}

void sequence_logprobs_backward_cuda(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                                     const TensorView& dout, int32_t ignore_index, const TensorView& dlogits,
                                     void* stream) {
  const char* op = "sequence_logprobs_backward_cuda";
  const SeqDims d = check_seq(logits, targets, op);
  check_out_f32(lse, d.B * d.T, logits, op, "lse");
  check_out_f32(dout, d.B, logits, op, "dout");
  check_grad_like(dlogits, logits, op, "dlogits", "logits");
  RowArgs a;
  a.s = logits.data;
  a.lds = d.V;
  a.g = dlogits.data;
  a.ldg = d.V;
  a.rows = d.B * d.T;
  a.V = d.V;
  a.targets = targets.ptr<const int32_t>();
  a.ignore_index = ignore_index;
  a.lse_in = lse.ptr<const float>();
  a.ce_vec = dout.ptr<const float>();  // the row's upstream gradient is -dout[b]
  a.vec_div = d.T > 0 ? d.T : 1;
  a.vec_sign = -1.0f;
  launch_ce(a, logits.dtype, to_stream(stream));
}

// ================================ DPO ==============================================================

void dpo_loss_forward_cuda(const TensorView& policy_chosen, const TensorView& policy_rejected,
                           const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                           const TensorView& losses, const TensorView& chosen_rewards,
                           const TensorView& rejected_rewards, void* stream) {
  const char* op = "dpo_loss_forward_cuda";
  check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, op);
  const int64_t B = policy_chosen.numel();
  check_out_f32(losses, B, policy_chosen, op, "losses");
  check_out_f32(chosen_rewards, B, policy_chosen, op, "chosen_rewards");
  check_out_f32(rejected_rewards, B, policy_chosen, op, "rejected_rewards");
  launch_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, losses.ptr<float>(),
             chosen_rewards.ptr<float>(), rejected_rewards.ptr<float>(), nullptr, nullptr, nullptr,
             to_stream(stream));
}

void dpo_loss_backward_cuda(const TensorView& policy_chosen, const TensorView& policy_rejected,
                            const TensorView& ref_chosen, const TensorView& ref_rejected, const DpoParams& params,
                            const TensorView& dout, const TensorView& d_policy_chosen,
                            const TensorView& d_policy_rejected, void* stream) {
  const char* op = "dpo_loss_backward_cuda";
  check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, op);
  const int64_t B = policy_chosen.numel();
  check_out_f32(dout, B, policy_chosen, op, "dout");
  check_out_f32(d_policy_chosen, B, policy_chosen, op, "d_policy_chosen");
  check_out_f32(d_policy_rejected, B, policy_chosen, op, "d_policy_rejected");
  launch_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, params, nullptr, nullptr, nullptr,
             dout.ptr<const float>(), d_policy_chosen.ptr<float>(), d_policy_rejected.ptr<float>(),
             to_stream(stream));
}

// ================================ distillation =====================================================

void distill_forward_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                          const DistillParams& params, const TensorView& losses, const TensorView& loss,
                          void* stream) {
  const char* op = "distill_forward_cuda";
  const KdDims d = check_kd(student, teacher, targets, params, op);
  check_out_f32(losses, d.N, student, op, "losses");
  check_out_f32(loss, 1, student, op, "loss");
  const cudaStream_t st = to_stream(stream);
  AsyncScratch count(d.masked ? sizeof(int64_t) : 0, st);
  if (d.masked) launch_count(targets, d.N, params.ignore_index, count.as<int64_t>(), st);
  RowArgs a = kd_rows(student, teacher, targets, d, params);
  a.kd_loss = losses.ptr<float>();
  launch_kd(a, student.dtype, teacher.dtype, st);
  launch_reduce(losses.ptr<const float>(), 1, d.N, loss.ptr<float>(), 1.0, true, count.as<int64_t>(), d.N, st);
}

void distill_backward_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                           const DistillParams& params, const TensorView& dloss, const TensorView& dstudent,
                           void* stream) {
  const char* op = "distill_backward_cuda";
  const KdDims d = check_kd(student, teacher, targets, params, op);
  check_out_f32(dloss, 1, student, op, "dloss");
  check_grad_like(dstudent, student, op, "dstudent", "student");
  const cudaStream_t st = to_stream(stream);
  AsyncScratch count(d.masked ? sizeof(int64_t) : 0, st);
  if (d.masked) launch_count(targets, d.N, params.ignore_index, count.as<int64_t>(), st);
  RowArgs a = kd_rows(student, teacher, targets, d, params);
  a.g = dstudent.data;
  a.ldg = d.V;
  a.kd_dev = dloss.ptr<const float>();
  a.count_dev = count.as<int64_t>();
  a.count_host = d.N;
  launch_kd(a, student.dtype, teacher.dtype, st);
}

void distill_fused_cuda(const TensorView& student, const TensorView& teacher, const TensorView& targets,
                        const DistillParams& params, float dloss, const TensorView& losses, const TensorView& loss,
                        const TensorView& dstudent, void* stream) {
  const char* op = "distill_fused_cuda";
  const KdDims d = check_kd(student, teacher, targets, params, op);
  check_out_f32(losses, d.N, student, op, "losses");
  check_out_f32(loss, 1, student, op, "loss");
  check_grad_like(dstudent, student, op, "dstudent", "student");
  const cudaStream_t st = to_stream(stream);
  AsyncScratch count(d.masked ? sizeof(int64_t) : 0, st);
  if (d.masked) launch_count(targets, d.N, params.ignore_index, count.as<int64_t>(), st);
  RowArgs a = kd_rows(student, teacher, targets, d, params);
  a.g = dstudent.data;
  a.ldg = d.V;
  a.kd_loss = losses.ptr<float>();
  a.kd_host = dloss;
  a.count_dev = count.as<int64_t>();
  a.count_host = d.N;
  launch_kd(a, student.dtype, teacher.dtype, st);
  launch_reduce(losses.ptr<const float>(), 1, d.N, loss.ptr<float>(), 1.0, true, count.as<int64_t>(), d.N, st);
}

// ================================ the linear losses' row engine ====================================

namespace cuda_detail {

void linear_rows_cuda(const LinearRowsArgs& in, void* stream) {
  const char* op = "linear_rows_cuda";
  TK_CHECK(in.ce || in.kd, op, ": neither a cross entropy nor a distillation term");
  TK_CHECK(reinterpret_cast<uintptr_t>(in.S) % 16 == 0 && in.ldS % 4 == 0 && in.ldS >= in.V, op,
           ": logits chunk must be 16-byte aligned with a row pitch that is a multiple of 4 floats");
  if (in.kd)
    TK_CHECK(reinterpret_cast<uintptr_t>(in.Tl) % 16 == 0 && in.ldT % 4 == 0 && in.ldT >= in.V, op,
             ": teacher logits chunk must be 16-byte aligned with a row pitch that is a multiple of 4 floats");
  RowArgs a;
  a.s = in.S;
  a.lds = in.ldS;
  a.t = in.Tl;
  a.ldt = in.ldT;
  a.rows = in.rows;
  a.V = in.V;
  if (in.ce) {
    a.targets = in.targets;
    a.idx = in.idx;
    a.ignore_index = std::numeric_limits<int32_t>::min();  // every row counts (never matched: checked)
    a.ce_host = in.ce_scale;
    a.ce_loss = in.ce_loss;
  }
  if (in.kd) {
    DistillParams p;
    p.kind = in.kind;
    p.temperature = in.temperature;
    p.beta = in.beta;
    set_kd(a, p);
    a.kd_loss = in.kd_loss;
    a.kd_host = in.kd_scale;
    a.kd_direct = true;
  }
  const bool narrow = in.grad && in.gdt == DType::BF16;
  if (in.grad) {
    a.g = in.S;
    a.ldg = narrow ? 2 * in.ldS : in.ldS;
  }
  const cudaStream_t st = to_stream(stream);
  if (narrow) {
    if (in.ce && in.kd)
      launch_rows<float, float, uint16_t, true, true, true, false>(a, st);
    else if (in.ce)
      launch_rows<float, float, uint16_t, true, false, true, false>(a, st);
    else
      launch_rows<float, float, uint16_t, false, true, true, false>(a, st);
  } else {
    if (in.ce && in.kd)
      launch_rows<float, float, float, true, true, false, false>(a, st);
    else if (in.ce)
      launch_rows<float, float, float, true, false, false, false>(a, st);
    else
      launch_rows<float, float, float, false, true, false, false>(a, st);
  }
}

}  // namespace cuda_detail
}  // namespace tk
