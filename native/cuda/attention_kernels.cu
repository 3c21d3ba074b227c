// Fused attention on CUDA, forward and backward (contract: attention_kernels.h, cpu/attention.h).
//
// ================================ design =========================================================
// Two families of kernels serve every shape the CPU accepts:
//
// 1. Tensor-core path (q, k, v bf16, D = 64 or 128; templated on D, nothing else instantiated).
//    FlashAttention-2's algorithm on mma.sync.aligned.m16n8k16 bf16 x bf16 -> fp32, fragments
//    loaded from shared memory with ldmatrix (.trans where the operand is stored k-major), tiles
//    brought in with cp.async (16 bytes a thread, zero-filled past the end of the sequence).
//
//    Forward: one CTA of 4 warps per (64-query block, head, batch); grid (B*H, T/64) with the
//    query blocks issued last-first, so that under the causal mask the longest CTAs start first.
//    Each warp owns 16 query rows: the output accumulator is 16 x D fp32 (D/2 registers a thread),
//    a 16 x 64 score tile 32 more; Q fragments are re-read from shared memory with ldmatrix for
//    every key tile (holding them would cost D/4 more registers and, at D = 128, spills). Key
//    tiles are 64 wide. The online softmax runs in fp32 in the log2 domain (scores times
//    scale * log2(e), ex2.approx); the row max and sum are reduced over the 4 lanes that share a row with two
//    shuffles; P is rounded to bf16 straight from the accumulator registers into the A operand of
//    P V (the C layout of m16n8 is the A layout of m16k16, so P never touches shared memory).
//    Pipeline (FlashAttention-2's single-buffered overlap, not a second K/V buffer): the V tile
//    loads while Q K^T and the softmax run, and the next K tile loads while P V runs; two barriers
//    an iteration. Shared memory: Q, K, V tiles of 64 x (D+8) bf16 (8 bf16 of padding make the
//    row pitch 16 bytes more than a multiple of 128, so the 8 rows of every ldmatrix phase fall in
//    distinct banks) plus 64 key segment ids: 27.3 KiB at D = 64, 51.3 KiB at D = 128. Registers
//    are capped at 168 (__launch_bounds__(128, 3); no spills at either D), so an SM holds 3 CTAs
//    (12 warps) at either D, on A100 (164 KiB of shared memory an SM) as on H100 (register-bound
//    there): enough to cover the load latency, which FlashAttention-2 also leaves to other CTAs.
//    The finished O tile is staged in the Q buffer (each warp only ever reads its own 16 rows of
//    it) and written with 16-byte stores.
//
//    Backward: FlashAttention-2's key-major loop. A pre-pass computes delta = rowsum(dO * O) in
//    double (o as stored, like the CPU) and the lse in the log2 domain (+inf for rows that see no
//    key, so exp2 gives exactly 0), [B, H, T] each. Then one CTA of 4 warps per (64-key block,
//    kv head, batch): K and V stay in shared memory, dK and dV accumulate in registers (16 keys x
//    D per warp, D registers a thread in all) across every query head of the kv head's group and
//    every 64-query tile that can see the block, which is the GQA reduction, done in a fixed order
//    without atomics. Per tile a warp computes S^T = K Q^T and dP^T = V dO^T for its 16 keys,
//    P^T = exp2(S^T - lse) and dS^T = P^T (dP^T - delta) * scale in fp32, rounds both to bf16
//    in registers, and accumulates dV += P^T dO and dK += dS^T Q. dS^T also goes to shared memory,
//    and after a barrier each warp computes 16 rows of dQ = dS K (dS read back with ldmatrix.trans)
//    and adds them with fp32 atomics (red.global.add; two floats at once on sm_90) into an fp32
//    accumulator (dq itself when dq is f32, else scratch, converted at the end). dQ by atomics
//    rather than a separate dQ pass: a second pass would recompute Q K^T and dO V^T (7 products a
//    tile instead of 5); the price is that dq's fp32 summation order, and so its last bits, vary
//    from run to run. dK and dV are deterministic. The next Q/dO tile loads while dQ is computed.
//    Shared memory: K, V, Q, dO tiles of 64 x (D+8) bf16, dS^T 64 x 72 bf16, lse/delta/segment
//    ids of the tile: 46 KiB at D = 64, 78 KiB at D = 128 (2 CTAs an SM on A100 and H100).
//    Registers: dK + dV accumulators D a thread, plus S^T and dP^T tiles 64: 227 at D = 64, the
//    full 255 at D = 128 (with a 16-byte spill); 128 threads x 2 CTAs still fit the register file,
//    so 8 warps an SM: low occupancy, as in FlashAttention-2's backward.
//
// 2. Generic path (f32 storage, any mix of f32/bf16, any D): tiled fp32 CUDA-core kernels with the
//    same structure. 32 x 32 score tiles, 128 threads, each thread 8 scores of one row; scores are
//    accumulated over D in 32-wide chunks, so D is unbounded; the output columns are split over
//    grid.z in chunks of 64 (a CTA recomputes the scores for its chunk: the cost of supporting any
//    D with bounded registers and shared memory; D <= 64 needs one chunk). Exact expf/logf.
//    Shared memory 20.6 KiB (forward), 33.1 KiB (backward). Backward as above (key-major, dk/dv in
//    registers over the group's heads, dq by fp32 atomics). No D is rejected.
//
// Masks: a key tile is skipped only when it is provably empty: beyond the causal diagonal (the
// loop stops at the last key the block's last query sees), or, with segment ids, when the
// [min, max] of the tile's key ids and of the block's query ids do not intersect (a pre-pass
// computes these per tile; any id values work, sorted or not). A tile that is fully visible (no
// segments, inside the sequence, below the diagonal) skips the per-element mask. Masked scores are
// -inf, and a row whose running max is still -inf uses 0 as its offset, so nothing becomes NaN: a
// row that sees no key ends with l = 0 and is written as zeros with lse = -inf.
//
// Not here: a Hopper-specific path (wgmma, TMA, warp specialization). sm_90 runs the sm_80 kernels.
#include "attention_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "../core/error.h"
#include "check.cuh"
#include "internal.cuh"

namespace tk {
namespace {

using bf16 = __nv_bfloat16;

// ---- device primitives: the only inline PTX and intrinsics of this file ----
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char tk_attention_smem[];
  return tk_attention_smem;
}
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ void warp_sync() { __syncwarp(); }
__device__ __forceinline__ float shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
__device__ __forceinline__ double shfl_xor(double x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ void red_add(float* p, float x) { atomicAdd(p, x); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define TK_ATTN_SM80 1
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronous; zero-fills the destination when !valid (src unread).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef TK_ATTN_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}
// 4 bytes global -> shared, asynchronous; zero-fills when !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
#ifdef TK_ATTN_SM80
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef TK_ATTN_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits for every cp.async this thread issued (a barrier must follow before other threads read).
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef TK_ATTN_SM80
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8 and receives, in
// r[i], row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (.trans: the transposed matrix).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef TK_ATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
#ifdef TK_ATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
#else
  __trap();
#endif
}
// c[16x8] += a[16x16] b[16x8], bf16 inputs, fp32 accumulation. Lane l (g = l / 4, t = l % 4) holds
// a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)} as (row, k), low half = lower k;
// b: {(2t..2t+1, g), (2t+8.., g)} as (k, col); c: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TK_ATTN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}
// Two floats rounded to bf16 (nearest even) and packed: lo in bits 0-15, hi in bits 16-31.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  uint32_t r;
#ifdef TK_ATTN_SM80
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
  __trap();
  r = 0;
#endif
  return r;
}
// 2^x, about 2 ulp; -inf gives +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
// p[0] += x, p[1] += y (p 8-byte aligned).
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}
// ---- end of device primitives ----

constexpr float kInf = INFINITY;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs; one struct for all of them (unused fields stay null/0). Sizes are in
// elements. Positions fit int (checked on the host); element offsets are int64.
struct AttnParams {
  const void* q = nullptr;      // [B, T, H, D]
  const void* k = nullptr;      // [B, S, Hkv, D]
  const void* v = nullptr;      // [B, S, Hkv, D]
  const void* o = nullptr;      // [B, T, H, D]   backward input
  const void* dout = nullptr;   // [B, T, H, D]
  void* out = nullptr;          // [B, T, H, D]   forward output o
  float* lse = nullptr;         // [B, H, T]      forward output
  const float* lse_in = nullptr;   // [B, H, T]   backward input
  float* lse_eff = nullptr;     // [B, H, T]      backward scratch: lse * lse_mult, +inf for keyless rows
  float* delta = nullptr;       // [B, H, T]      backward scratch: rowsum(do * o)
  float* dq_acc = nullptr;      // [B, T, H, D]   fp32 dq accumulator
  void* dk = nullptr;           // [B, S, Hkv, D]
  void* dv = nullptr;           // [B, S, Hkv, D]
  const int32_t* seg_q = nullptr;  // [B, T]
  const int32_t* seg_k = nullptr;  // [B, S]
  int2* q_range = nullptr;      // [B, nqb] (min, max) of seg_q over each query tile
  int2* k_range = nullptr;      // [B, nkb] (min, max) of seg_k over each key tile
  int B = 0, T = 0, S = 0, H = 0, Hkv = 0, D = 0, group = 1;
  int64_t off = 0;              // S - T: query t sees keys s <= t + off under the causal mask
  float scale = 1.0f;           // multiplies q.k
  float scale_log2 = 1.0f;      // scale * log2(e)
  float lse_mult = 1.0f;        // backward pre-pass: log2(e) for the tensor-core path, 1 for generic
  int causal = 0, has_seg = 0;
  int nqb = 0, nkb = 0;         // query / key tiles at the running kernel's tile size
};

// Query tiles [i_begin, nqb) can see keys from s0 on (causal); all of them otherwise.
__device__ __forceinline__ int first_query_tile(const AttnParams& p, int s0, int tile) {
  if (!p.causal) return 0;
  const int64_t t_first = int64_t(s0) - p.off;  // smallest t with t + off >= s0
  if (t_first <= 0) return 0;
  if (t_first >= p.T) return p.nqb;
  return int(t_first / tile);
}
// Number of key tiles a query block [q0, q0 + qn) can see (causal bound; all of them otherwise).
__device__ __forceinline__ int key_tile_count(const AttnParams& p, int q0, int qn, int tile) {
  int64_t kend = p.S;
  if (p.causal) {
    const int64_t last = int64_t(q0) + qn - 1 + p.off + 1;
    if (last < kend) kend = last;
  }
  return kend > 0 ? int((kend + tile - 1) / tile) : 0;
}
__device__ __forceinline__ bool ranges_meet(int2 a, int2 b) { return a.x <= b.y && b.x <= a.y; }

// ================================ pre-passes =====================================================

// (min, max) of the segment ids of each `tile`-long stretch of each batch row.
// seg [B, len] -> out [B, ntiles]; one thread per (b, tile).
__global__ void attn_seg_range_kernel(const int32_t* seg, int B, int len, int tile, int ntiles, int2* out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(B) * ntiles) return;
  const int64_t b = idx / ntiles;
  const int j = int(idx % ntiles);
  int lo = INT_MAX, hi = INT_MIN;
  const int end = min(len, (j + 1) * tile);
  for (int t = j * tile; t < end; ++t) {
    const int s = seg[b * len + t];
    lo = min(lo, s);
    hi = max(hi, s);
  }
  out[idx] = make_int2(lo, hi);
}

// delta[b, h, t] = sum_d dout * o (double accumulation, like the CPU), lse_eff[b, h, t] =
// lse * lse_mult, or +inf where lse = -inf. dout, o [B, T, H, D] (type T_); one warp per (b, t, h)
// row, 8 rows per 256-thread block.
template <typename T_>
__global__ void __launch_bounds__(256) attn_bwd_prep_kernel(const AttnParams p) {
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);  // (b * T + t) * H + h
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(p.B) * p.T * p.H) return;  // whole warps leave together
  const T_* dout = static_cast<const T_*>(p.dout) + row * p.D;
  const T_* o = static_cast<const T_*>(p.o) + row * p.D;
  double acc = 0.0;
  for (int d = lane; d < p.D; d += 32) acc += double(to_f32(dout[d])) * double(to_f32(o[d]));
  for (int m = 16; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
  if (lane == 0) {
    const int64_t h = row % p.H, bt = row / p.H;
    const int64_t t = bt % p.T, b = bt / p.T;
    const int64_t i = (b * p.H + h) * p.T + t;
    p.delta[i] = float(acc);
    const float l = p.lse_in[i];
    p.lse_eff[i] = l == -kInf ? kInf : l * p.lse_mult;
  }
}

// dst[i] = bf16(src[i]) for i < n (the fp32 dq accumulator into a bf16 dq).
__global__ void attn_f32_to_bf16_kernel(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_f32<bf16>(src[i]);
}

// ================================ tensor-core path ===============================================

template <int D>
struct MmaCfg {
  static constexpr int kTile = 64;          // query rows per block = keys per tile
  static constexpr int kThreads = 128;      // 4 warps x 16 rows
  static constexpr int kPitch = D + 8;      // bf16 per shared row (conflict-free ldmatrix)
  static constexpr int kPitchS = 64 + 8;    // dS^T rows
  static constexpr int kTileElems = kTile * kPitch;
  static constexpr int kChunks = D / 8;     // 16-byte pieces per row
  static constexpr size_t kFwdSmem = size_t(3) * kTileElems * sizeof(bf16) + kTile * sizeof(int);
  static constexpr size_t kBwdSmem = size_t(4) * kTileElems * sizeof(bf16) + size_t(kTile) * kPitchS * sizeof(bf16) +
                                     size_t(4) * kTile * sizeof(float);
};

// Issues cp.async for rows [0, 64) of a [64, D] bf16 tile whose row r starts at g + r * ld; rows
// >= nvalid are zero-filled (`base` is a valid address to name instead of reading past the end).
template <int D>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* g, int64_t ld, int nvalid, const bf16* base,
                                                int tid) {
  using Cfg = MmaCfg<D>;
  for (int c = tid; c < Cfg::kTile * Cfg::kChunks; c += Cfg::kThreads) {
    const int r = c / Cfg::kChunks, cc = c % Cfg::kChunks;
    const bool ok = r < nvalid;
    cp_async_16(s + r * Cfg::kPitch + cc * 8, ok ? g + r * ld + cc * 8 : base, ok);
  }
}

// Writes rows [0, 16) of a warp's staged [16, D] bf16 tile (shared, pitch kPitch) to g + r * ld for
// rows r < nvalid, 16 bytes a lane.
template <int D>
__device__ __forceinline__ void store_rows16(const bf16* s, bf16* g, int64_t ld, int nvalid, int lane) {
  using Cfg = MmaCfg<D>;
  for (int c = lane; c < 16 * Cfg::kChunks; c += 32) {
    const int r = c / Cfg::kChunks, cc = c % Cfg::kChunks;
    if (r < nvalid)
      *reinterpret_cast<uint4*>(g + r * ld + cc * 8) = *reinterpret_cast<const uint4*>(s + r * Cfg::kPitch + cc * 8);
  }
}

// Forward, tensor cores. q [B, T, H, D], k, v [B, S, Hkv, D] bf16 -> out [B, T, H, D] bf16,
// lse [B, H, T] f32. Grid (B * H, ceil(T / 64)), 128 threads, MmaCfg<D>::kFwdSmem dynamic shared
// bytes. q_range [B, nqb] / k_range [B, nkb] (64-row tiles) when has_seg.
template <int D>
__global__ void __launch_bounds__(128, 3) attn_fwd_mma_kernel(const AttnParams p) {
  using Cfg = MmaCfg<D>;
  constexpr int P = Cfg::kPitch;
  constexpr int NT = D / 8;  // 8-column n-tiles of the output
  bf16* sQ = reinterpret_cast<bf16*>(dyn_smem());
  bf16* sK = sQ + Cfg::kTileElems;
  bf16* sV = sK + Cfg::kTileElems;
  int* sSeg = reinterpret_cast<int*>(sV + Cfg::kTileElems);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.group;
  const int qb = p.nqb - 1 - int(blockIdx.y);
  const int q0 = qb * 64, qn = min(64, p.T - q0);
  const int64_t qld = int64_t(p.H) * D, kld = int64_t(p.Hkv) * D;
  const bf16* Q = static_cast<const bf16*>(p.q);
  const bf16* K = static_cast<const bf16*>(p.k);
  const bf16* V = static_cast<const bf16*>(p.v);
  const bf16* qg = Q + (int64_t(b) * p.T + q0) * qld + int64_t(h) * D;
  const bf16* kg = K + int64_t(b) * p.S * kld + int64_t(g) * D;
  const bf16* vg = V + int64_t(b) * p.S * kld + int64_t(g) * D;
  const int32_t* segk = p.has_seg ? p.seg_k + int64_t(b) * p.S : nullptr;

  const int ntiles = key_tile_count(p, q0, qn, 64);
  const int2 qr = p.has_seg ? p.q_range[int64_t(b) * p.nqb + qb] : make_int2(0, 0);
  auto next_live = [&](int j) {
    if (p.has_seg)
      while (j < ntiles && !ranges_meet(qr, p.k_range[int64_t(b) * p.nkb + j])) ++j;
    return j;
  };
  auto load_k = [&](int j) {
    const int s0 = j * 64;
    load_tile_async<D>(sK, kg + s0 * kld, kld, min(64, p.S - s0), K, tid);
    if (p.has_seg && tid < 64) cp_async_4(sSeg + tid, s0 + tid < p.S ? segk + s0 + tid : p.seg_k, s0 + tid < p.S);
  };

  // This thread's two query rows (gq and gq + 8 of the warp's 16).
  const int row0 = q0 + warp * 16 + gq, row1 = row0 + 8;
  int sq0 = 0, sq1 = 0;
  if (p.has_seg) {
    if (row0 < p.T) sq0 = p.seg_q[int64_t(b) * p.T + row0];
    if (row1 < p.T) sq1 = p.seg_q[int64_t(b) * p.T + row1];
  }

  load_tile_async<D>(sQ, qg, qld, qn, Q, tid);
  int j = next_live(0);
  if (j < ntiles) load_k(j);
  cp_async_commit();

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  float m[2] = {-kInf, -kInf}, l[2] = {0.0f, 0.0f};

  while (j < ntiles) {
    const int s0 = j * 64;
    cp_async_wait_all();
    block_sync();  // K(j) (and Q) landed; every warp is done with V(j-1)
    load_tile_async<D>(sV, vg + s0 * kld, kld, min(64, p.S - s0), V, tid);
    cp_async_commit();

    // S = Q K^T for this warp's 16 rows x 64 keys (Q fragments re-read from shared memory each
    // tile: keeping them in registers would cost D / 4 registers and push D = 128 into spills).
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qf[4];
      ldsm_x4(qf, sQ + (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * P + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4];
        ldsm_x4(bk, sK + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * P + kk * 16 + ((lane >> 3) & 1) * 8);
        mma_bf16(s[2 * np], qf, bk[0], bk[1]);
        mma_bf16(s[2 * np + 1], qf, bk[2], bk[3]);
      }
    }

    // Scale into the log2 domain and mask.
    const bool full = !p.has_seg && s0 + 64 <= p.S && (!p.causal || int64_t(s0) + 63 <= q0 + p.off);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (!full) {
          const int kl = nt * 8 + tq * 2 + (e & 1);
          const int key = s0 + kl;
          const int row = e < 2 ? row0 : row1;
          const bool vis = key < p.S && (!p.causal || key <= row + p.off) &&
                           (!p.has_seg || (e < 2 ? sq0 : sq1) == sSeg[kl]);
          if (!vis) x = -kInf;
        }
        s[nt][e] = x;
      }
    }

    // Online softmax; P rounded to bf16 into the A fragments of P V.
    uint32_t pa[4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float mnew = fmaxf(m[i], mx);
      const float mu = mnew == -kInf ? 0.0f : mnew;  // fully masked so far: keep exponents at -inf
      const float alpha = fast_exp2(m[i] - mu);
      m[i] = mnew;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float a = fast_exp2(s[nt][2 * i] - mu), c = fast_exp2(s[nt][2 * i + 1] - mu);
        sum += a + c;
        s[nt][2 * i] = a;
        s[nt][2 * i + 1] = c;
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[nt][2 * i] *= alpha;
        acc[nt][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    cp_async_wait_all();
    block_sync();  // V(j) landed; every warp is done with K(j) and sSeg
    const int jn = next_live(j + 1);
    if (jn < ntiles) load_k(jn);
    cp_async_commit();

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bv[4];
        ldsm_x4_t(bv, sV + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * P + np * 16 + (lane >> 4) * 8);
        mma_bf16(acc[2 * np], pa[kk], bv[0], bv[1]);
        mma_bf16(acc[2 * np + 1], pa[kk], bv[2], bv[3]);
      }
    }
    j = jn;
  }
  cp_async_wait_all();
  block_sync();  // nothing in flight may land in sQ after this

  // Normalize, write lse, stage O (bf16) in the warp's own rows of sQ and store it.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lt = l[i];
    lt += shfl_xor(lt, 1);
    lt += shfl_xor(lt, 2);
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    const int row = i ? row1 : row0;
    if (tq == 0 && row < p.T)
      p.lse[(int64_t(b) * p.H + h) * p.T + row] = lt > 0.0f ? (m[i] + log2f(lt)) * kLn2 : -kInf;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[nt][2 * i] *= inv;
      acc[nt][2 * i + 1] *= inv;
    }
  }
  bf16* sO = sQ + warp * 16 * P;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(sO + gq * P + nt * 8 + tq * 2) = pack_bf16(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<uint32_t*>(sO + (gq + 8) * P + nt * 8 + tq * 2) = pack_bf16(acc[nt][2], acc[nt][3]);
  }
  warp_sync();
  bf16* og = static_cast<bf16*>(p.out) + (int64_t(b) * p.T + q0 + warp * 16) * qld + int64_t(h) * D;
  store_rows16<D>(sO, og, qld, qn - warp * 16, lane);
}

// Backward, tensor cores. dout, q [B, T, H, D], k, v [B, S, Hkv, D] bf16, lse_eff (log2 domain)
// and delta [B, H, T] f32 -> dk, dv [B, S, Hkv, D] bf16 (overwritten), dq_acc [B, T, H, D] f32
// (added to). Grid (B * Hkv, ceil(S / 64)), 128 threads, MmaCfg<D>::kBwdSmem dynamic shared bytes.
template <int D>
__global__ void __launch_bounds__(128) attn_bwd_mma_kernel(const AttnParams p) {
  using Cfg = MmaCfg<D>;
  constexpr int P = Cfg::kPitch, PS = Cfg::kPitchS;
  constexpr int NT = D / 8;
  bf16* sK = reinterpret_cast<bf16*>(dyn_smem());
  bf16* sV = sK + Cfg::kTileElems;
  bf16* sQ = sV + Cfg::kTileElems;
  bf16* sdO = sQ + Cfg::kTileElems;
  bf16* sdS = sdO + Cfg::kTileElems;  // [64 keys][PS]: dS^T
  float* sL = reinterpret_cast<float*>(sdS + 64 * PS);
  float* sDl = sL + 64;
  int* sSegK = reinterpret_cast<int*>(sDl + 64);
  int* sSegQ = sSegK + 64;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int b = blockIdx.x / p.Hkv, g = blockIdx.x % p.Hkv;
  const int kb = blockIdx.y, s0 = kb * 64, kn = min(64, p.S - s0);
  const int64_t qld = int64_t(p.H) * D, kld = int64_t(p.Hkv) * D;
  const bf16* Q = static_cast<const bf16*>(p.q);
  const bf16* K = static_cast<const bf16*>(p.k);
  const bf16* V = static_cast<const bf16*>(p.v);
  const bf16* dO = static_cast<const bf16*>(p.dout);
  const int64_t kv_off = (int64_t(b) * p.S + s0) * kld + int64_t(g) * D;

  const int i_begin = first_query_tile(p, s0, 64);
  const int2 kr = p.has_seg ? p.k_range[int64_t(b) * p.nkb + kb] : make_int2(0, 0);
  // The (head of the group, query tile) pairs this block visits, in order: heads outer.
  auto next_item = [&](int hh, int i, int* ohh, int* oi) {
    for (; hh < p.group; ++hh, i = i_begin)
      for (; i < p.nqb; ++i)
        if (!p.has_seg || ranges_meet(kr, p.q_range[int64_t(b) * p.nqb + i])) {
          *ohh = hh;
          *oi = i;
          return true;
        }
    return false;
  };
  auto load_q = [&](int hh, int i) {
    const int h = g * p.group + hh, q0 = i * 64, qn = min(64, p.T - q0);
    const int64_t qo = (int64_t(b) * p.T + q0) * qld + int64_t(h) * D;
    load_tile_async<D>(sQ, Q + qo, qld, qn, Q, tid);
    load_tile_async<D>(sdO, dO + qo, qld, qn, dO, tid);
    if (tid < 64) {
      const bool ok = tid < qn;
      const int64_t li = (int64_t(b) * p.H + h) * p.T + q0 + tid;
      cp_async_4(sL + tid, ok ? p.lse_eff + li : p.lse_eff, ok);
      cp_async_4(sDl + tid, ok ? p.delta + li : p.delta, ok);
      if (p.has_seg) cp_async_4(sSegQ + tid, ok ? p.seg_q + int64_t(b) * p.T + q0 + tid : p.seg_q, ok);
    }
  };

  load_tile_async<D>(sK, K + kv_off, kld, kn, K, tid);
  load_tile_async<D>(sV, V + kv_off, kld, kn, V, tid);
  if (p.has_seg && tid < 64)
    cp_async_4(sSegK + tid, tid < kn ? p.seg_k + int64_t(b) * p.S + s0 + tid : p.seg_k, tid < kn);
  int hh = 0, i = 0;
  bool have = next_item(0, i_begin, &hh, &i);
  if (have) load_q(hh, i);
  cp_async_commit();

  float dk[NT][4], dv[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.0f;
  const int kl0 = warp * 16 + gq;  // this thread's key rows kl0, kl0 + 8 (of the block)
  const int key0 = s0 + kl0, key1 = key0 + 8;

  while (have) {
    const int h = g * p.group + hh, q0 = i * 64;
    cp_async_wait_all();
    block_sync();  // Q, dO, lse, delta of this tile landed; every warp is done reading sdS

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float st[8][4], dpt[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      const int arow = (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * P + kk * 16 + (lane >> 4) * 8;
      ldsm_x4(ak, sK + arow);
      ldsm_x4(av, sV + arow);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int brow = (np * 16 + (lane >> 4) * 8 + (lane & 7)) * P + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, sQ + brow);
        ldsm_x4(bo, sdO + brow);
        mma_bf16(st[2 * np], ak, bq[0], bq[1]);
        mma_bf16(st[2 * np + 1], ak, bq[2], bq[3]);
        mma_bf16(dpt[2 * np], av, bo[0], bo[1]);
        mma_bf16(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P^T = exp2(S^T scale log2e - lse), dS^T = P^T (dP^T - delta) scale; both rounded to bf16
    // straight into A fragments (rows = keys, k = queries).
    const bool full = !p.has_seg && s0 + 64 <= p.S && q0 + 64 <= p.T && (!p.causal || int64_t(s0) + 63 <= q0 + p.off);
    const int sk0 = p.has_seg ? sSegK[kl0] : 0, sk1 = p.has_seg ? sSegK[kl0 + 8] : 0;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + tq * 2 + (e & 1);
        float pv = fast_exp2(st[nt][e] * p.scale_log2 - sL[ql]);
        if (!full) {
          const int key = e < 2 ? key0 : key1, t = q0 + ql;
          const bool vis = t < p.T && key < p.S && (!p.causal || key <= t + p.off) &&
                           (!p.has_seg || sSegQ[ql] == (e < 2 ? sk0 : sk1));
          if (!vis) pv = 0.0f;
        }
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - sDl[ql]) * p.scale;
      }
    }
    uint32_t pp[4][4], pd[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pp[kk][0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
      pp[kk][1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
      pp[kk][2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pp[kk][3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      pd[kk][0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      pd[kk][1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      pd[kk][2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      pd[kk][3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
    }

    // dV += P^T dO, dK += dS^T Q (dO and Q read k-major: ldmatrix.trans).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        const int brow = (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * P + np * 16 + (lane >> 4) * 8;
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, sdO + brow);
        ldsm_x4_t(bq, sQ + brow);
        mma_bf16(dv[2 * np], pp[kk], bo[0], bo[1]);
        mma_bf16(dv[2 * np + 1], pp[kk], bo[2], bo[3]);
        mma_bf16(dk[2 * np], pd[kk], bq[0], bq[1]);
        mma_bf16(dk[2 * np + 1], pd[kk], bq[2], bq[3]);
      }
    }
    // dS^T to shared memory for dQ: fragment (row g / g+8, k 2t / 2t+8) -> sdS[key][query].
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      *reinterpret_cast<uint32_t*>(sdS + kl0 * PS + kk * 16 + tq * 2) = pd[kk][0];
      *reinterpret_cast<uint32_t*>(sdS + (kl0 + 8) * PS + kk * 16 + tq * 2) = pd[kk][1];
      *reinterpret_cast<uint32_t*>(sdS + kl0 * PS + kk * 16 + 8 + tq * 2) = pd[kk][2];
      *reinterpret_cast<uint32_t*>(sdS + (kl0 + 8) * PS + kk * 16 + 8 + tq * 2) = pd[kk][3];
    }
    block_sync();  // dS^T complete; every warp is done with sQ, sdO, sL, sDl, sSegQ

    int nhh = 0, ni = 0;
    const bool nhave = next_item(hh, i + 1, &nhh, &ni);
    if (nhave) load_q(nhh, ni);
    cp_async_commit();

    // dQ rows [16 warp, 16 warp + 16) of this tile += dS K, 64 columns at a time.
    const int qr0 = warp * 16 + gq;
    float* dqg = p.dq_acc + (int64_t(b) * p.T + q0) * qld + int64_t(h) * D;
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      float a[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) a[nt][0] = a[nt][1] = a[nt][2] = a[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t as[4];
        ldsm_x4_t(as, sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * PS + warp * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t bk[4];
          ldsm_x4_t(bk, sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * P + c * 64 + np * 16 + (lane >> 4) * 8);
          mma_bf16(a[2 * np], as, bk[0], bk[1]);
          mma_bf16(a[2 * np + 1], as, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = c * 64 + nt * 8 + tq * 2;
        if (q0 + qr0 < p.T) red_add2(dqg + qr0 * qld + col, a[nt][0], a[nt][1]);
        if (q0 + qr0 + 8 < p.T) red_add2(dqg + (qr0 + 8) * qld + col, a[nt][2], a[nt][3]);
      }
    }
    hh = nhh;
    i = ni;
    have = nhave;
  }
  cp_async_wait_all();
  block_sync();  // nothing in flight may land in sQ / sdO after this

  // Stage dK (in sQ) and dV (in sdO), the warp's own 16 rows, and store them.
  bf16* sdK = sQ + warp * 16 * P;
  bf16* sdV = sdO + warp * 16 * P;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(sdK + gq * P + nt * 8 + tq * 2) = pack_bf16(dk[nt][0], dk[nt][1]);
    *reinterpret_cast<uint32_t*>(sdK + (gq + 8) * P + nt * 8 + tq * 2) = pack_bf16(dk[nt][2], dk[nt][3]);
    *reinterpret_cast<uint32_t*>(sdV + gq * P + nt * 8 + tq * 2) = pack_bf16(dv[nt][0], dv[nt][1]);
    *reinterpret_cast<uint32_t*>(sdV + (gq + 8) * P + nt * 8 + tq * 2) = pack_bf16(dv[nt][2], dv[nt][3]);
  }
  warp_sync();
  const int64_t out_off = kv_off + int64_t(warp) * 16 * kld;
  store_rows16<D>(sdK, static_cast<bf16*>(p.dk) + out_off, kld, kn - warp * 16, lane);
  store_rows16<D>(sdV, static_cast<bf16*>(p.dv) + out_off, kld, kn - warp * 16, lane);
}

// ================================ generic path (CUDA cores) ======================================

struct GenCfg {
  static constexpr int kTile = 32;       // queries per block, keys per tile
  static constexpr int kThreads = 128;   // thread = (row tid / 4, columns tid % 4 + 4 j)
  static constexpr int kDc = 32;         // D chunk of the score products
  static constexpr int kDo = 64;         // output columns per CTA (grid.z)
  static constexpr int kLp = 33;         // pitch of 32-wide float tiles
  static constexpr int kOp = 65;         // pitch of 64-wide float tiles
  static constexpr int kChunkElems = kTile * kLp;
  static constexpr size_t kFwdSmem = (size_t(3) * kChunkElems + size_t(kTile) * kDo + kTile) * 4;
  static constexpr int kUnion = 3 * kTile * kOp > 4 * kChunkElems ? 3 * kTile * kOp : 4 * kChunkElems;
  static constexpr size_t kBwdSmem = (size_t(kUnion) + 2 * kChunkElems + 4 * kTile) * 4;
};

// Rows [0, 32) x columns [c0, c0 + width) of a [rows, D] tensor whose row r starts at g + r * ld,
// into s (pitch `pitch`) as fp32; rows >= nvalid and columns >= D read as 0.
template <typename T_, int W>
__device__ __forceinline__ void load_f32_tile(float* s, int pitch, const T_* g, int64_t ld, int nvalid, int c0, int D,
                                              int tid) {
  for (int e = tid; e < GenCfg::kTile * W; e += GenCfg::kThreads) {
    const int r = e / W, c = e % W;
    s[r * pitch + c] = (r < nvalid && c0 + c < D) ? to_f32(g[r * ld + c0 + c]) : 0.0f;
  }
}

// Forward, CUDA cores. q [B, T, H, D] (TQ), k, v [B, S, Hkv, D] (TK) -> out [B, T, H, D] (TQ),
// lse [B, H, T] f32 (written by the grid.z == 0 blocks). Grid (B * H, ceil(T / 32), ceil(D / 64)),
// 128 threads, GenCfg::kFwdSmem dynamic shared bytes. q_range / k_range over 32-row tiles.
template <typename TQ, typename TK>
__global__ void __launch_bounds__(128) attn_fwd_generic_kernel(const AttnParams p) {
  using C = GenCfg;
  float* sQc = reinterpret_cast<float*>(dyn_smem());  // [32][33] queries x D chunk
  float* sKc = sQc + C::kChunkElems;                  // [32][33] keys x D chunk
  float* sP = sKc + C::kChunkElems;                   // [32][33] queries x keys
  float* sV = sP + C::kChunkElems;                    // [32][64] keys x output columns
  int* sSeg = reinterpret_cast<int*>(sV + C::kTile * C::kDo);

  const int tid = threadIdx.x, r = tid >> 2, c = tid & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.group;
  const int qb = p.nqb - 1 - int(blockIdx.y);
  const int q0 = qb * 32, qn = min(32, p.T - q0), d0o = blockIdx.z * C::kDo;
  const int row = q0 + r;
  const int64_t qld = int64_t(p.H) * p.D, kld = int64_t(p.Hkv) * p.D;
  const TQ* qg = static_cast<const TQ*>(p.q) + (int64_t(b) * p.T + q0) * qld + int64_t(h) * p.D;
  const TK* kg = static_cast<const TK*>(p.k) + int64_t(b) * p.S * kld + int64_t(g) * p.D;
  const TK* vg = static_cast<const TK*>(p.v) + int64_t(b) * p.S * kld + int64_t(g) * p.D;

  const int ntiles = key_tile_count(p, q0, qn, 32);
  const int2 qr = p.has_seg ? p.q_range[int64_t(b) * p.nqb + qb] : make_int2(0, 0);
  auto next_live = [&](int j) {
    if (p.has_seg)
      while (j < ntiles && !ranges_meet(qr, p.k_range[int64_t(b) * p.nkb + j])) ++j;
    return j;
  };
  const int sqr = p.has_seg && row < p.T ? p.seg_q[int64_t(b) * p.T + row] : 0;

  float o[16];
#pragma unroll
  for (int jj = 0; jj < 16; ++jj) o[jj] = 0.0f;
  float m = -kInf, l = 0.0f;

  for (int j = next_live(0); j < ntiles; j = next_live(j + 1)) {
    const int s0 = j * 32, kn = min(32, p.S - s0);
    float s[8];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) s[jj] = 0.0f;
    for (int d0 = 0; d0 < p.D; d0 += C::kDc) {
      block_sync();  // every thread is done with the previous chunk, P and V
      load_f32_tile<TQ, C::kDc>(sQc, C::kLp, qg, qld, qn, d0, p.D, tid);
      load_f32_tile<TK, C::kDc>(sKc, C::kLp, kg + s0 * kld, kld, kn, d0, p.D, tid);
      if (d0 == 0 && p.has_seg && tid < 32) sSeg[tid] = tid < kn ? p.seg_k[int64_t(b) * p.S + s0 + tid] : 0;
      block_sync();
#pragma unroll 8
      for (int dd = 0; dd < C::kDc; ++dd) {
        const float qv = sQc[r * C::kLp + dd];
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) s[jj] += qv * sKc[(c + 4 * jj) * C::kLp + dd];
      }
    }
    float mx = -kInf;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int key = s0 + c + 4 * jj;
      const bool vis = key < p.S && (!p.causal || key <= row + p.off) && (!p.has_seg || sqr == sSeg[c + 4 * jj]);
      s[jj] = vis ? s[jj] * p.scale : -kInf;
      mx = fmaxf(mx, s[jj]);
    }
    mx = fmaxf(mx, shfl_xor(mx, 1));
    mx = fmaxf(mx, shfl_xor(mx, 2));
    const float mnew = fmaxf(m, mx);
    const float mu = mnew == -kInf ? 0.0f : mnew;
    const float alpha = expf(m - mu);
    m = mnew;
    float sum = 0.0f;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      s[jj] = expf(s[jj] - mu);
      sum += s[jj];
      sP[r * C::kLp + c + 4 * jj] = s[jj];
    }
    l = l * alpha + sum;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) o[jj] *= alpha;
    load_f32_tile<TK, C::kDo>(sV, C::kDo, vg + s0 * kld, kld, kn, d0o, p.D, tid);
    block_sync();
#pragma unroll 4
    for (int kk = 0; kk < 32; ++kk) {
      const float pv = sP[r * C::kLp + kk];
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) o[jj] += pv * sV[kk * C::kDo + c + 4 * jj];
    }
  }

  float lt = l;
  lt += shfl_xor(lt, 1);
  lt += shfl_xor(lt, 2);
  const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
  if (row < p.T) {
    if (blockIdx.z == 0 && c == 0) p.lse[(int64_t(b) * p.H + h) * p.T + row] = lt > 0.0f ? m + logf(lt) : -kInf;
    TQ* og = static_cast<TQ*>(p.out) + (int64_t(b) * p.T + row) * qld + int64_t(h) * p.D;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const int d = d0o + c + 4 * jj;
      if (d < p.D) og[d] = from_f32<TQ>(o[jj] * inv);
    }
  }
}

// Backward, CUDA cores. dout, q [B, T, H, D] (TQ), k, v [B, S, Hkv, D] (TK), lse_eff (natural
// log) and delta [B, H, T] f32 -> dk, dv [B, S, Hkv, D] (TK, columns of this grid.z chunk,
// overwritten), dq_acc [B, T, H, D] f32 (added to). Grid (B * Hkv, ceil(S / 32), ceil(D / 64)),
// 128 threads, GenCfg::kBwdSmem dynamic shared bytes.
template <typename TQ, typename TK>
__global__ void __launch_bounds__(128) attn_bwd_generic_kernel(const AttnParams p) {
  using C = GenCfg;
  float* sU = reinterpret_cast<float*>(dyn_smem());
  // Score phase: four [32][33] chunks. Output phase (same memory): three [32][65] tiles.
  float* sKc = sU;
  float* sQc = sKc + C::kChunkElems;
  float* sVc = sQc + C::kChunkElems;
  float* sdOc = sVc + C::kChunkElems;
  float* sQo = sU;
  float* sdOo = sQo + C::kTile * C::kOp;
  float* sKo = sdOo + C::kTile * C::kOp;
  float* sP = sU + C::kUnion;          // [32 keys][33] P^T
  float* sdS = sP + C::kChunkElems;    // [32 keys][33] dS^T
  float* sL = sdS + C::kChunkElems;    // [32]
  float* sDl = sL + C::kTile;          // [32]
  int* sSegQ = reinterpret_cast<int*>(sDl + C::kTile);
  int* sSegK = sSegQ + C::kTile;

  const int tid = threadIdx.x, r = tid >> 2, c = tid & 3;
  const int b = blockIdx.x / p.Hkv, g = blockIdx.x % p.Hkv;
  const int s0 = blockIdx.y * 32, kn = min(32, p.S - s0), d0o = blockIdx.z * C::kDo;
  const int key = s0 + r;
  const int64_t qld = int64_t(p.H) * p.D, kld = int64_t(p.Hkv) * p.D;
  const TQ* Q = static_cast<const TQ*>(p.q);
  const TQ* dO = static_cast<const TQ*>(p.dout);
  const int64_t kv_off = (int64_t(b) * p.S + s0) * kld + int64_t(g) * p.D;
  const TK* kg = static_cast<const TK*>(p.k) + kv_off;
  const TK* vg = static_cast<const TK*>(p.v) + kv_off;

  const int i_begin = first_query_tile(p, s0, 32);
  const int2 kr = p.has_seg ? p.k_range[int64_t(b) * p.nkb + blockIdx.y] : make_int2(0, 0);

  float dk[16], dv[16];
#pragma unroll
  for (int jj = 0; jj < 16; ++jj) dk[jj] = dv[jj] = 0.0f;

  for (int hh = 0; hh < p.group; ++hh) {
    const int h = g * p.group + hh;
    for (int i = i_begin; i < p.nqb; ++i) {
      if (p.has_seg && !ranges_meet(kr, p.q_range[int64_t(b) * p.nqb + i])) continue;
      const int q0 = i * 32, qn = min(32, p.T - q0);
      const int64_t q_off = (int64_t(b) * p.T + q0) * qld + int64_t(h) * p.D;
      float st[8], dpt[8];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) st[jj] = dpt[jj] = 0.0f;
      for (int d0 = 0; d0 < p.D; d0 += C::kDc) {
        block_sync();  // every thread is done with the previous chunk / output phase
        load_f32_tile<TK, C::kDc>(sKc, C::kLp, kg, kld, kn, d0, p.D, tid);
        load_f32_tile<TK, C::kDc>(sVc, C::kLp, vg, kld, kn, d0, p.D, tid);
        load_f32_tile<TQ, C::kDc>(sQc, C::kLp, Q + q_off, qld, qn, d0, p.D, tid);
        load_f32_tile<TQ, C::kDc>(sdOc, C::kLp, dO + q_off, qld, qn, d0, p.D, tid);
        if (d0 == 0 && tid < 32) {
          const int64_t li = (int64_t(b) * p.H + h) * p.T + q0 + tid;
          sL[tid] = tid < qn ? p.lse_eff[li] : kInf;
          sDl[tid] = tid < qn ? p.delta[li] : 0.0f;
          if (p.has_seg) {
            sSegQ[tid] = tid < qn ? p.seg_q[int64_t(b) * p.T + q0 + tid] : 0;
            sSegK[tid] = tid < kn ? p.seg_k[int64_t(b) * p.S + s0 + tid] : 0;
          }
        }
        block_sync();
#pragma unroll 8
        for (int dd = 0; dd < C::kDc; ++dd) {
          const float kv = sKc[r * C::kLp + dd], vv = sVc[r * C::kLp + dd];
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            st[jj] += kv * sQc[(c + 4 * jj) * C::kLp + dd];
            dpt[jj] += vv * sdOc[(c + 4 * jj) * C::kLp + dd];
          }
        }
      }
      // P^T and dS^T for key `key`, queries q0 + c + 4 jj.
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int ql = c + 4 * jj, t = q0 + ql;
        const bool vis = t < p.T && key < p.S && (!p.causal || key <= t + p.off) &&
                         (!p.has_seg || sSegK[r] == sSegQ[ql]);
        st[jj] = vis ? expf(st[jj] * p.scale - sL[ql]) : 0.0f;
        dpt[jj] = st[jj] * (dpt[jj] - sDl[ql]) * p.scale;
      }
      block_sync();  // the chunk buffers become the output-phase tiles
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        sP[r * C::kLp + c + 4 * jj] = st[jj];
        sdS[r * C::kLp + c + 4 * jj] = dpt[jj];
      }
      load_f32_tile<TQ, C::kDo>(sQo, C::kOp, Q + q_off, qld, qn, d0o, p.D, tid);
      load_f32_tile<TQ, C::kDo>(sdOo, C::kOp, dO + q_off, qld, qn, d0o, p.D, tid);
      load_f32_tile<TK, C::kDo>(sKo, C::kOp, kg, kld, kn, d0o, p.D, tid);
      block_sync();
      // dV += P^T dO, dK += dS^T Q for key row r, columns d0o + c + 4 jj.
#pragma unroll 4
      for (int qq = 0; qq < 32; ++qq) {
        const float pv = sP[r * C::kLp + qq], dsv = sdS[r * C::kLp + qq];
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          dv[jj] += pv * sdOo[qq * C::kOp + c + 4 * jj];
          dk[jj] += dsv * sQo[qq * C::kOp + c + 4 * jj];
        }
      }
      // dQ row q0 + r += dS K over this block's 32 keys.
      if (r < qn) {
        float a[16];
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) a[jj] = 0.0f;
#pragma unroll 4
        for (int kk = 0; kk < 32; ++kk) {
          const float dsv = sdS[kk * C::kLp + r];
#pragma unroll
          for (int jj = 0; jj < 16; ++jj) a[jj] += dsv * sKo[kk * C::kOp + c + 4 * jj];
        }
        float* dqg = p.dq_acc + q_off + int64_t(r) * qld;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const int d = d0o + c + 4 * jj;
          if (d < p.D) red_add(dqg + d, a[jj]);
        }
      }
    }
  }
  if (key < p.S) {
    TK* dkg = static_cast<TK*>(p.dk) + kv_off + int64_t(r) * kld;
    TK* dvg = static_cast<TK*>(p.dv) + kv_off + int64_t(r) * kld;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const int d = d0o + c + 4 * jj;
      if (d < p.D) {
        dkg[d] = from_f32<TK>(dk[jj]);
        dvg[d] = from_f32<TK>(dv[jj]);
      }
    }
  }
}

// ================================ host side ======================================================

bool is_float_storage(DType t) { return t == DType::F32 || t == DType::BF16; }

void check_device(const char* op, const char* name, const TensorView& t, int device) {
  TK_CHECK(t.device.type == DeviceType::CUDA && t.device.index == device, op, ": ", name, " must be on cuda:", device,
           ", got ", t.device.name());
}

void check_qkv(const char* op, const TensorView& q, const TensorView& k, const TensorView& v) {
  TK_CHECK(q.ndim == 4 && k.ndim == 4 && v.ndim == 4, op,
           ": q, k, v must be 4-D ([B, T, H, D], [B, S, Hkv, D]), got q ",
           describe(q), ", k ", describe(k), ", v ", describe(v));
  TK_CHECK(q.device.type == DeviceType::CUDA, op, ": q must be a CUDA tensor, got ", q.device.name());
  check_device(op, "k", k, q.device.index);
  check_device(op, "v", v, q.device.index);
  TK_CHECK(is_float_storage(q.dtype) && is_float_storage(k.dtype), op, ": q, k, v must be f32 or bf16, got q ",
           describe(q), ", k ", describe(k));
  TK_CHECK(v.dtype == k.dtype, op, ": k and v must share a dtype, got k ", describe(k), ", v ", describe(v));
  TK_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), op, ": q, k, v must be contiguous");
  for (int i = 0; i < 4; ++i)
    TK_CHECK(k.shape[i] == v.shape[i], op, ": k and v shapes differ: ", describe(k), " vs ", describe(v));
  TK_CHECK(q.shape[0] == k.shape[0] && q.shape[3] == k.shape[3], op,
           ": q [B, T, H, D] and k [B, S, Hkv, D] must agree on B and D, got q ", describe(q), ", k ", describe(k));
  TK_CHECK(q.shape[3] >= 1 && k.shape[2] >= 1 && q.shape[2] % k.shape[2] == 0, op,
           ": need D >= 1, Hkv >= 1 and H % Hkv == 0, got q ", describe(q), ", k ", describe(k));
}

void check_like(const char* op, const char* name, const TensorView& t, const TensorView& like, DType dtype,
                int device) {
  bool same = t.ndim == like.ndim && t.dtype == dtype && t.device.type == DeviceType::CUDA &&
              t.device.index == device && t.is_contiguous();
  for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == like.shape[i];
  TK_CHECK(same, op, ": ", name, " must be a contiguous tensor on cuda:", device, " of shape ", describe(like),
           " with dtype ", dtype_name(dtype), ", got ", describe(t), " on ", t.device.name());
}

// Shape checks shared by both passes; fills sizes, scale, mask and segment fields of p.
AttnParams make_params(const char* op, const TensorView& q, const TensorView& k, const TensorView* seg_q,
                       const TensorView* seg_k, const AttentionOptions& opt) {
  AttnParams p;
  const int64_t B = q.shape[0], T = q.shape[1], H = q.shape[2], D = q.shape[3], S = k.shape[1], Hkv = k.shape[2];
  // Positions are ints in the kernels, and grid.y counts 32-row tiles (at most 65535).
  const int64_t kMaxLen = int64_t(65535) * 32;
  TK_CHECK(T <= kMaxLen && S <= kMaxLen && D <= (int64_t(1) << 20) && B <= INT_MAX && H <= INT_MAX &&
               B * H <= INT_MAX && B * Hkv <= INT_MAX,
           op, ": sizes out of range for the CUDA kernels (T, S <= ", kMaxLen, ", D <= 1048576): q ", describe(q),
           ", k ", describe(k));
  TK_CHECK(std::isfinite(opt.scale), op, ": scale must be finite, got ", opt.scale);
  p.B = int(B), p.T = int(T), p.S = int(S), p.H = int(H), p.Hkv = int(Hkv), p.D = int(D);
  p.group = int(H / Hkv);
  p.off = S - T;
  p.causal = opt.causal ? 1 : 0;
  p.scale = opt.scale == 0.0f ? float(1.0 / std::sqrt(double(D))) : opt.scale;
  p.scale_log2 = p.scale * kLog2e;
  const int device = q.device.index;
  auto check_seg = [&](const TensorView& s, int64_t len, const char* name) {
    TK_CHECK(s.data != nullptr && s.ndim == 2 && s.shape[0] == B && s.shape[1] == len && s.dtype == DType::I32 &&
                 s.is_contiguous() && s.device.type == DeviceType::CUDA && s.device.index == device,
             op, ": ", name, " must be a contiguous i32 tensor [", B, ", ", len, "] on cuda:", device, ", got ",
             describe(s), " on ", s.device.name());
  };
  if (seg_q) {
    check_seg(*seg_q, T, "segment ids of the queries");
    p.seg_q = seg_q->ptr<const int32_t>();
    if (seg_k) {
      check_seg(*seg_k, S, "segment ids of the keys");
      p.seg_k = seg_k->ptr<const int32_t>();
    } else {
      TK_CHECK(S == T, op, ": one set of segment ids [B, T] needs S == T, got T = ", T, ", S = ", S,
               "; pass key segment ids [B, S] as well");
      p.seg_k = p.seg_q;
    }
    p.has_seg = 1;
  } else {
    TK_CHECK(!seg_k, op, ": key segment ids given without query segment ids");
  }
  return p;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// The tensor-core kernels need compute capability 8.0 (bf16 mma, ldmatrix, cp.async).
bool device_has_mma(int device) {
  int major = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

void check_launch(const char* op, const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    fail(op, ": launching ", kernel, " failed: ", cuda::error_text(e), cuda::sticky_hint(e));
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// Scratch from tunekit's caching allocator, tagged with the stream of the work that uses it, and
// released (into the cache, reusable only by later work on that stream) when this goes out of
// scope. Pieces are carved at 256-byte boundaries.
class Scratch {
 public:
  Scratch(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~Scratch() { cuda::detail::release_on(device_, base_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // Reserves `bytes`; returns the offset of the piece (call take() after allocate()).
  size_t reserve(size_t bytes) {
    const size_t at = size_;
    size_ += (bytes + 255) / 256 * 256;
    return at;
  }
  void allocate() {
    if (size_) base_ = cuda::detail::allocate_on(device_, size_, stream_);
  }
  template <typename T>
  T* take(size_t offset) const { return reinterpret_cast<T*>(static_cast<unsigned char*>(base_) + offset); }

 private:
  int device_;
  cudaStream_t stream_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

// Segment ranges for tiles of `tile` rows: p.q_range [B, nqb], p.k_range [B, nkb].
void launch_seg_ranges(const char* op, AttnParams& p, Scratch& scratch, size_t q_at, size_t k_at, int tile,
                       cudaStream_t st) {
  p.q_range = scratch.take<int2>(q_at);
  p.k_range = scratch.take<int2>(k_at);
  const int threads = 256;
  if (p.nqb > 0) {
    attn_seg_range_kernel<<<blocks_for(int64_t(p.B) * p.nqb, threads), threads, 0, st>>>(p.seg_q, p.B, p.T, tile,
                                                                                          p.nqb, p.q_range);
    check_launch(op, "attn_seg_range_kernel");
  }
  if (p.nkb > 0) {
    attn_seg_range_kernel<<<blocks_for(int64_t(p.B) * p.nkb, threads), threads, 0, st>>>(p.seg_k, p.B, p.S, tile,
                                                                                          p.nkb, p.k_range);
    check_launch(op, "attn_seg_range_kernel");
  }
}

template <typename Kernel>
void launch(const char* op, const char* name, Kernel kernel, dim3 grid, size_t smem, cudaStream_t st,
            const AttnParams& p) {
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, 128, smem, st>>>(p);
  check_launch(op, name);
}

template <typename TQ, typename TK>
void launch_fwd_generic(const char* op, const AttnParams& p, cudaStream_t st) {
  const dim3 grid(unsigned(p.B) * unsigned(p.H), unsigned(p.nqb), unsigned((p.D + GenCfg::kDo - 1) / GenCfg::kDo));
  launch(op, "attn_fwd_generic_kernel", &attn_fwd_generic_kernel<TQ, TK>, grid, GenCfg::kFwdSmem, st, p);
}

template <typename TQ, typename TK>
void launch_bwd_generic(const char* op, const AttnParams& p, cudaStream_t st) {
  const dim3 grid(unsigned(p.B) * unsigned(p.Hkv), unsigned(p.nkb), unsigned((p.D + GenCfg::kDo - 1) / GenCfg::kDo));
  launch(op, "attn_bwd_generic_kernel", &attn_bwd_generic_kernel<TQ, TK>, grid, GenCfg::kBwdSmem, st, p);
}

}  // namespace

// ================================ entry points ===================================================

void attention_forward_cuda(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* seg_q,
                            const TensorView* seg_k, const AttentionOptions& opt, const TensorView& o,
                            const TensorView& lse, void* stream) {
  const char* op = "attention_forward_cuda";
  check_qkv(op, q, k, v);
  const int device = q.device.index;
  check_like(op, "o", o, q, q.dtype, device);
  const TensorView lse_shape = make_view(nullptr, DType::F32, q.device, {q.shape[0], q.shape[2], q.shape[1]});
  check_like(op, "lse", lse, lse_shape, DType::F32, device);
  AttnParams p = make_params(op, q, k, seg_q, seg_k, opt);
  if (int64_t(p.B) * p.H * p.T == 0) return;  // nothing to write
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = o.data;
  p.lse = lse.ptr<float>();

  cuda::make_current(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool mma = q.dtype == DType::BF16 && k.dtype == DType::BF16 && (p.D == 64 || p.D == 128) &&
                   aligned16(q.data) && aligned16(k.data) && aligned16(v.data) && aligned16(o.data) &&
                   device_has_mma(device);
  const int tile = mma ? MmaCfg<64>::kTile : GenCfg::kTile;
  p.nqb = (p.T + tile - 1) / tile;
  p.nkb = (p.S + tile - 1) / tile;

  Scratch scratch(device, st);
  size_t q_at = 0, k_at = 0;
  if (p.has_seg) {
    q_at = scratch.reserve(size_t(p.B) * p.nqb * sizeof(int2));
    k_at = scratch.reserve(size_t(p.B) * p.nkb * sizeof(int2));
  }
  scratch.allocate();
  if (p.has_seg) launch_seg_ranges(op, p, scratch, q_at, k_at, tile, st);

  if (mma) {
    const dim3 grid(unsigned(p.B) * unsigned(p.H), unsigned(p.nqb));
    if (p.D == 64)
      launch(op, "attn_fwd_mma_kernel<64>", &attn_fwd_mma_kernel<64>, grid, MmaCfg<64>::kFwdSmem, st, p);
    else
      launch(op, "attn_fwd_mma_kernel<128>", &attn_fwd_mma_kernel<128>, grid, MmaCfg<128>::kFwdSmem, st, p);
  } else if (q.dtype == DType::F32) {
    if (k.dtype == DType::F32)
      launch_fwd_generic<float, float>(op, p, st);
    else
      launch_fwd_generic<float, bf16>(op, p, st);
  } else {
    if (k.dtype == DType::F32)
      launch_fwd_generic<bf16, float>(op, p, st);
    else
      launch_fwd_generic<bf16, bf16>(op, p, st);
  }
}

void attention_backward_cuda(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView& lse, const TensorView* seg_q,
                             const TensorView* seg_k, const AttentionOptions& opt, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, void* stream) {
  const char* op = "attention_backward_cuda";
  check_qkv(op, q, k, v);
  const int device = q.device.index;
  check_like(op, "do (the output gradient)", dout, q, q.dtype, device);
  check_like(op, "o", o, q, q.dtype, device);
  const TensorView lse_shape = make_view(nullptr, DType::F32, q.device, {q.shape[0], q.shape[2], q.shape[1]});
  check_like(op, "lse", lse, lse_shape, DType::F32, device);
  check_like(op, "dq", dq, q, q.dtype, device);
  check_like(op, "dk", dk, k, k.dtype, device);
  check_like(op, "dv", dv, k, k.dtype, device);
  AttnParams p = make_params(op, q, k, seg_q, seg_k, opt);

  cuda::make_current(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // No query: dk = dv = 0. No key: dq = 0.
  if (int64_t(p.B) * p.H * p.T == 0 || p.S == 0) {
    if (dq.nbytes()) CUDA_CHECK(cudaMemsetAsync(dq.data, 0, dq.nbytes(), st));
    if (dk.nbytes()) CUDA_CHECK(cudaMemsetAsync(dk.data, 0, dk.nbytes(), st));
    if (dv.nbytes()) CUDA_CHECK(cudaMemsetAsync(dv.data, 0, dv.nbytes(), st));
    return;
  }
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.o = o.data;
  p.dout = dout.data;
  p.lse_in = lse.ptr<const float>();
  p.dk = dk.data;
  p.dv = dv.data;

  const bool mma = q.dtype == DType::BF16 && k.dtype == DType::BF16 && (p.D == 64 || p.D == 128) &&
                   aligned16(q.data) && aligned16(k.data) && aligned16(v.data) && aligned16(dout.data) &&
                   aligned16(dk.data) && aligned16(dv.data) && device_has_mma(device);
  const int tile = mma ? MmaCfg<64>::kTile : GenCfg::kTile;
  p.nqb = (p.T + tile - 1) / tile;
  p.nkb = (p.S + tile - 1) / tile;
  p.lse_mult = mma ? kLog2e : 1.0f;

  const size_t rows = size_t(p.B) * p.H * p.T;
  const bool dq_direct = dq.dtype == DType::F32;  // accumulate straight into dq
  Scratch scratch(device, st);
  const size_t lse_at = scratch.reserve(rows * sizeof(float));
  const size_t delta_at = scratch.reserve(rows * sizeof(float));
  const size_t dq_at = dq_direct ? 0 : scratch.reserve(dq.numel() * sizeof(float));
  size_t q_at = 0, k_at = 0;
  if (p.has_seg) {
    q_at = scratch.reserve(size_t(p.B) * p.nqb * sizeof(int2));
    k_at = scratch.reserve(size_t(p.B) * p.nkb * sizeof(int2));
  }
  scratch.allocate();
  p.lse_eff = scratch.take<float>(lse_at);
  p.delta = scratch.take<float>(delta_at);
  p.dq_acc = dq_direct ? dq.ptr<float>() : scratch.take<float>(dq_at);
  if (p.has_seg) launch_seg_ranges(op, p, scratch, q_at, k_at, tile, st);

  const unsigned prep_blocks = unsigned((rows + 7) / 8);
  if (q.dtype == DType::F32)
    attn_bwd_prep_kernel<float><<<prep_blocks, 256, 0, st>>>(p);
  else
    attn_bwd_prep_kernel<bf16><<<prep_blocks, 256, 0, st>>>(p);
  check_launch(op, "attn_bwd_prep_kernel");
  CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, dq.numel() * sizeof(float), st));

  if (mma) {
    const dim3 grid(unsigned(p.B) * unsigned(p.Hkv), unsigned(p.nkb));
    if (p.D == 64)
      launch(op, "attn_bwd_mma_kernel<64>", &attn_bwd_mma_kernel<64>, grid, MmaCfg<64>::kBwdSmem, st, p);
    else
      launch(op, "attn_bwd_mma_kernel<128>", &attn_bwd_mma_kernel<128>, grid, MmaCfg<128>::kBwdSmem, st, p);
  } else if (q.dtype == DType::F32) {
    if (k.dtype == DType::F32)
      launch_bwd_generic<float, float>(op, p, st);
    else
      launch_bwd_generic<float, bf16>(op, p, st);
  } else {
    if (k.dtype == DType::F32)
      launch_bwd_generic<bf16, float>(op, p, st);
    else
      launch_bwd_generic<bf16, bf16>(op, p, st);
  }

  if (!dq_direct) {
    const int64_t n = dq.numel();
    const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 65536));
    attn_f32_to_bf16_kernel<<<blocks, 256, 0, st>>>(p.dq_acc, dq.ptr<bf16>(), n);
    check_launch(op, "attn_f32_to_bf16_kernel");
  }
}

}  // namespace tk
