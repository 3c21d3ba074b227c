// CPU GEMM driver: dispatch, packing, cache blocking and threading around the per-ISA
// micro-kernels (gemm_kernels_*.cpp).
//
// Loop nest (Goto / BLIS), per matrix of the batch:
//   jc over N in nc blocks                      B block kc x nc lives in L3, shared by all threads
//     pc over K in kc blocks                    threads pack disjoint NR panels of it, then one
//                                               barrier (the B buffer is double-buffered, so the
//                                               next block's packing needs no second barrier)
//       ic over this thread's rows in mc blocks A block mc x kc, private, lives in the core's L2
//         jr over this thread's NR panels       B panel kc x NR reused from L1 by ...
//           ir over MR panels                   ... every A panel: micro-kernel MR x NR
// Threads form a tm x tn grid over (rows, NR panels of the nc block). Splitting rows keeps B shared
// and packed once; splitting columns repacks A per thread, so it is chosen only when M is too short
// to balance (small-M GEMMs such as LoRA updates or a few tokens through a big layer).
//
// K blocks after the first accumulate into C with beta = 1, which for an fp32 C is exact. A bf16 C
// would be rounded once per K block, so bf16 output accumulates in a per-thread fp32 buffer and is
// rounded once at the end; when K spans several blocks the buffer must hold all of a thread's rows,
// which bounds the rows handled per pass (row super-blocks, each a complete GEMM).
//
// Small work is not worth a fork: tiny products run a direct loop, batches of small matrices run
// one whole matrix per thread, and the thread count shrinks until each has enough FLOPs.
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "gemm_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TK_GEMM_PAUSE() _mm_pause()
#else
#define TK_GEMM_PAUSE() std::this_thread::yield()
#endif

namespace tk {
namespace gemm_detail {

// ---- generic packers (any ISA, any layout the strides describe) ---------------------------------

namespace {

inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return bf16_to_f32(x); }

// One F32 panel: out[k][j] = src(j, k) for j < w, zero for w <= j < W.
template <typename T>
void pack_one_f32(const T* src, int64_t sw, int64_t sk, int w, int64_t kc, int W, float* out) {
  if (sk == 1 && sw != 1) {  // each panel column is contiguous along k: read rows, write columns
    for (int j = 0; j < w; ++j) {
      const T* col = src + j * sw;
      for (int64_t k = 0; k < kc; ++k) out[k * W + j] = widen(col[k]);
    }
    for (int64_t k = 0; k < kc; ++k)
      for (int j = w; j < W; ++j) out[k * W + j] = 0.0f;
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const T* row = src + k * sk;
      float* o = out + k * W;
      for (int j = 0; j < w; ++j) o[j] = widen(row[j * sw]);
      for (int j = w; j < W; ++j) o[j] = 0.0f;
    }
  }
}

}  // namespace

void pack_panels_f32_generic(const PanelSrc& s, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                             void* dst) {
  float* out = static_cast<float*>(dst);
  for (int64_t p = 0; p < width; p += W) {
    const int w = int(std::min<int64_t>(W, width - p));
    const int64_t off = (w0 + p) * s.sw + k0 * s.sk;
    if (s.dtype == DType::F32)
      pack_one_f32(static_cast<const float*>(s.base) + off, s.sw, s.sk, w, kc, W, out);
    else
      pack_one_f32(static_cast<const uint16_t*>(s.base) + off, s.sw, s.sk, w, kc, W, out);
    out += kc * W;
  }
}

void pack_panels_bf16pairs_generic(const PanelSrc& s, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                                   void* dst) {
  uint32_t* out = static_cast<uint32_t*>(dst);
  const int64_t kp = (kc + 1) / 2;
  const uint16_t* base = static_cast<const uint16_t*>(s.base);
  for (int64_t p = 0; p < width; p += W) {
    const int w = int(std::min<int64_t>(W, width - p));
    const uint16_t* src = base + (w0 + p) * s.sw + k0 * s.sk;
    for (int64_t q = 0; q < kp; ++q) {
      const int64_t k = 2 * q;
      const bool has_hi = k + 1 < kc;
      for (int j = 0; j < w; ++j) {
        const uint16_t* e = src + j * s.sw + k * s.sk;
        const uint32_t lo = e[0], hi = has_hi ? e[s.sk] : 0u;
        out[q * W + j] = lo | hi << 16;
      }
      for (int j = w; j < W; ++j) out[q * W + j] = 0u;
    }
    out += kp * W;
  }
}

void store_bf16_generic(const float* acc, int64_t ld_acc, uint16_t* c, int64_t ldc, int64_t m, int64_t n, float alpha,
                        float beta) {
  for (int64_t i = 0; i < m; ++i) {
    const float* a = acc + i * ld_acc;
    uint16_t* row = c + i * ldc;
    if (beta == 0.0f) {
      for (int64_t j = 0; j < n; ++j) row[j] = f32_to_bf16(alpha * a[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] = f32_to_bf16(alpha * a[j] + beta * bf16_to_f32(row[j]));
    }
  }
}

}  // namespace gemm_detail

namespace {

using namespace gemm_detail;

// ---- tuning constants -----------------------------------------------------------------------------
// Below this many multiply-adds the packing and dispatch cost more than a direct loop.
constexpr int64_t kTinyMacs = 4096;
// A thread must get at least this many FLOPs (~5-10 us of kernel time) to be worth waking.
constexpr double kMinFlopsPerThread = 1.0e6;
// Matrices below this many FLOPs run one per thread when the batch can feed every thread.
constexpr double kBatchParallelFlops = 2.0 * 192 * 192 * 192;
// The bf16-output fp32 accumulator may take this much per thread when K spans several blocks.
// Defining TK_GEMM_ACC_BUDGET_BYTES small at build time drives test-sized problems through the
// multi-pass (row super-block) path.
#ifndef TK_GEMM_ACC_BUDGET_BYTES
#define TK_GEMM_ACC_BUDGET_BYTES (int64_t(4) << 20)
#endif
constexpr int64_t kAccBudgetBytes = TK_GEMM_ACC_BUDGET_BYTES;
// nc for bf16 output with several K blocks: a narrower B block lets a row super-block be taller.
constexpr int64_t kAccNc = 1024;

// The block size for `total` items in blocks of at most `block` (a multiple of `unit`) with all
// blocks nearly equal: K = 1025 in blocks of 1024 would otherwise spend a whole pass over C (and a
// B and A packing) on a single k.
int64_t balanced(int64_t total, int64_t block, int64_t unit) {
  const int64_t nblk = (total + block - 1) / block;
  const int64_t b = (total + nblk - 1) / nblk;
  return std::min(block, (b + unit - 1) / unit * unit);
}

// ---- kernel families ------------------------------------------------------------------------------

struct Families {
  KernelSet portable, avx2, avx512, avx512bf16;
  bool has_avx2 = false, has_avx512 = false, has_avx512bf16 = false;
};

const Families& families() {
  static const Families f = [] {
    Families r;
    kernels_portable_f32(&r.portable);
    r.has_avx2 = kernels_avx2_f32(&r.avx2);
    r.has_avx512 = kernels_avx512_f32(&r.avx512);
    r.has_avx512bf16 = kernels_avx512_bf16(&r.avx512bf16);
    return r;
  }();
  return f;
}

const KernelSet& pick_kernels(CpuIsa isa, DType ab) {
  const Families& f = families();
  if (ab == DType::BF16 && isa >= CpuIsa::Avx512Bf16 && f.has_avx512bf16) return f.avx512bf16;
  if (isa >= CpuIsa::Avx512 && f.has_avx512) return f.avx512;
  if (isa >= CpuIsa::Avx2 && f.has_avx2) return f.avx2;
  return f.portable;
}

// ---- scratch memory -------------------------------------------------------------------------------

// A grow-only 64-byte aligned buffer; one per thread and role, so steady-state GEMMs allocate nothing.
class Scratch {
 public:
  ~Scratch() { std::free(p_); }
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(p_);
      cap_ = (bytes + 4095) / 4096 * 4096;
      p_ = std::aligned_alloc(64, cap_);
      if (!p_) {
        cap_ = 0;
        throw std::bad_alloc();
      }
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

thread_local Scratch t_apack, t_acc, t_bpack0, t_bpack1;

// ---- synchronization --------------------------------------------------------------------------------

// Sense-counting spin barrier for the threads of one parallel region. The waits are short (one
// B block's packing), so spinning beats sleeping; after a while it yields in case the pool has
// more threads than cores.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin < 1 << 14)
        TK_GEMM_PAUSE();
      else
        std::this_thread::yield();
    }
  }

 private:
  const int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
};

// ---- the blocked GEMM -----------------------------------------------------------------------------

// One matrix of the batch, as the blocked loops see it.
struct Operands {
  PanelSrc a, b;  // a: (w = row i, k); b: (w = column j, k)
  void* c;
};

// The work of one parallel region: every thread runs the same loop nest over its part.
struct Plan {
  const GemmParams* p = nullptr;
  const KernelSet* ks = nullptr;
  int64_t kc = 0, mc = 0, nc = 0;
  int64_t rows_per_pass = 0;  // row super-block height (M unless bf16 output needs an fp32 buffer)
  int nt = 1, tm = 1, tn = 1;
  bool c_bf16 = false;
  size_t bblock_bytes = 0;
  void* bbuf[2] = {nullptr, nullptr};  // shared packed B blocks (double-buffered)
  SpinBarrier* barrier = nullptr;
};

Operands operands(const GemmParams& p, int64_t b) {
  const size_t esz = dtype_size(p.ab_dtype), csz = dtype_size(p.c_dtype);
  Operands o;
  const char* A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * esz;
  const char* B = static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * esz;
  // op(A)(i, k): A[i * lda + k], or A[k * lda + i] when transposed; op(B)(k, j) likewise.
  o.a = PanelSrc{A, p.ab_dtype, p.trans_a ? 1 : p.lda, p.trans_a ? p.lda : 1};
  o.b = PanelSrc{B, p.ab_dtype, p.trans_b ? p.ldb : 1, p.trans_b ? 1 : p.ldb};
  o.c = static_cast<char*>(p.C) + size_t(b * p.batch_stride_c) * csz;
  return o;
}

// Runs one matrix as thread `tid` of the plan's team. `step` counts B blocks (selects the buffer).
void run_blocked(const Plan& pl, const Operands& op, int tid, int64_t& step) {
  const GemmParams& p = *pl.p;
  const KernelSet& ks = *pl.ks;
  const int MR = ks.mr, NR = ks.nr;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int im = tid / pl.tn, in = tid % pl.tn;
  const int64_t npc = (K + pl.kc - 1) / pl.kc;
  const int64_t apanel = panel_bytes(ks.fmt, pl.kc, MR);
  char* abuf = static_cast<char*>(t_apack.get(size_t(apanel * ((pl.mc + MR - 1) / MR))));
  float* const cf32 = pl.c_bf16 ? nullptr : static_cast<float*>(op.c);
  uint16_t* const cb16 = pl.c_bf16 ? static_cast<uint16_t*>(op.c) : nullptr;
  float* acc = nullptr;
  int64_t ld_acc = 0;

  for (int64_t ms = 0; ms < M; ms += pl.rows_per_pass) {
    const int64_t mlen = std::min(pl.rows_per_pass, M - ms), mb = (mlen + MR - 1) / MR;
    const int64_t m0 = ms + MR * (mb * im / pl.tm), m1 = std::min(ms + mlen, ms + MR * (mb * (im + 1) / pl.tm));
    const int64_t mc = m1 > m0 ? balanced(m1 - m0, pl.mc, MR) : pl.mc;
    for (int64_t jc = 0; jc < N; jc += pl.nc) {
      const int64_t ncur = std::min(pl.nc, N - jc), nbp = (ncur + NR - 1) / NR;
      const int64_t jp0 = nbp * in / pl.tn, jp1 = nbp * (in + 1) / pl.tn;  // this thread's B panels
      if (pl.c_bf16) {
        // Multi-block K keeps every row of the pass; a single block needs one mc x panels slab.
        ld_acc = (jp1 - jp0) * NR;
        const int64_t rows = npc > 1 ? std::max<int64_t>(m1 - m0, 0) : mc;
        acc = static_cast<float*>(t_acc.get(size_t(std::max<int64_t>(rows * ld_acc, 1)) * 4));
      }
      for (int64_t pc = 0; pc < K; pc += pl.kc) {
        const int64_t kcur = std::min(pl.kc, K - pc);
        const bool first = pc == 0, last = pc + kcur == K;
        const int64_t bpanel = panel_bytes(ks.fmt, kcur, NR);
        char* bbuf = static_cast<char*>(pl.bbuf[step & 1]);
        ++step;
        // Cooperative packing of the B block: thread t packs panels [nbp t / nt, nbp (t+1) / nt).
        const int64_t q0 = nbp * tid / pl.nt, q1 = nbp * (tid + 1) / pl.nt;
        if (q1 > q0) ks.pack(op.b, jc + q0 * NR, std::min(ncur, q1 * NR) - q0 * NR, pc, kcur, NR, bbuf + q0 * bpanel);
        if (pl.nt > 1) pl.barrier->wait();

        for (int64_t ic = m0; ic < m1; ic += mc) {
          const int64_t mcur = std::min(mc, m1 - ic);
          ks.pack(op.a, ic, mcur, pc, kcur, MR, abuf);
          const int64_t apnl = panel_bytes(ks.fmt, kcur, MR);
          for (int64_t jp = jp0; jp < jp1; ++jp) {
            const int n = int(std::min<int64_t>(NR, ncur - jp * NR));
            const char* bp = bbuf + jp * bpanel;
            float* ct;
            int64_t ldt;
            float al, be;
            if (!pl.c_bf16) {
              ct = cf32 + ic * p.ldc + jc + jp * NR;
              ldt = p.ldc;
              al = p.alpha;
              be = first ? p.beta : 1.0f;
            } else {
              ct = acc + (npc > 1 ? (ic - m0) * ld_acc : 0) + (jp - jp0) * NR;
              ldt = ld_acc;
              al = 1.0f;
              be = first ? 0.0f : 1.0f;
            }
            for (int64_t ir = 0; ir < mcur; ir += MR) {
              const int m = int(std::min<int64_t>(MR, mcur - ir));
              ks.kernel(kcur, abuf + (ir / MR) * apnl, bp, ct + ir * ldt, ldt, m, n, al, be);
            }
            // Round this mc x NR slab while it is still in cache.
            if (pl.c_bf16 && last)
              ks.store_bf16(ct, ldt, cb16 + ic * p.ldc + jc + jp * NR, p.ldc, mcur, n, p.alpha, p.beta);
          }
        }
      }
    }
  }
}

// ---- direct paths ---------------------------------------------------------------------------------

inline float load_ab(const void* base, DType t, int64_t idx) {
  return t == DType::F32 ? static_cast<const float*>(base)[idx] : bf16_to_f32(static_cast<const uint16_t*>(base)[idx]);
}

inline void store_c(void* c, DType t, int64_t idx, float v, float beta) {
  if (t == DType::F32) {
    float* d = static_cast<float*>(c) + idx;
    *d = beta == 0.0f ? v : v + beta * *d;
  } else {
    uint16_t* d = static_cast<uint16_t*>(c) + idx;
    *d = f32_to_bf16(beta == 0.0f ? v : v + beta * bf16_to_f32(*d));
  }
}

// Tiny products (and K == 0): a dot product per element of C, fp32 accumulation.
void run_direct(const GemmParams& p, int64_t b) {
  const size_t esz = dtype_size(p.ab_dtype), csz = dtype_size(p.c_dtype);
  const void* A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * esz;
  const void* B = static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * esz;
  void* C = static_cast<char*>(p.C) + size_t(b * p.batch_stride_c) * csz;
  const int64_t ais = p.trans_a ? 1 : p.lda, aks = p.trans_a ? p.lda : 1;
  const int64_t bks = p.trans_b ? 1 : p.ldb, bjs = p.trans_b ? p.ldb : 1;
  for (int64_t i = 0; i < p.M; ++i)
    for (int64_t j = 0; j < p.N; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) s += load_ab(A, p.ab_dtype, i * ais + k * aks) * load_ab(B, p.ab_dtype, k * bks + j * bjs);
      store_c(C, p.c_dtype, i * p.ldc + j, p.alpha * s, p.beta);
    }
}

// ---- planning -------------------------------------------------------------------------------------

// Picks the tm x tn thread grid (tm * tn == nt) that leaves the fewest idle MR / NR units,
// preferring row splits (B stays shared) on ties.
void choose_grid(int nt, int64_t mb, int64_t nbp, int* tm, int* tn) {
  double best = -1;
  for (int r = nt; r >= 1; --r) {
    if (nt % r) continue;
    const int c = nt / r;
    const double er = double(mb) / double(r * ((mb + r - 1) / r));
    const double ec = double(nbp) / double(c * ((nbp + c - 1) / c));
    // Column splits repack A once per thread: a small handicap breaks near-ties toward rows.
    const double e = er * ec * (c > 1 ? 0.97 : 1.0);
    if (e > best + 1e-9) {
      best = e;
      *tm = r;
      *tn = c;
    }
  }
}

void gemm_impl(const GemmParams& p, ThreadPool& pool, CpuIsa isa) {
  if (p.batch <= 0 || p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0 || p.M * p.N * p.K <= kTinyMacs) {
    for (int64_t b = 0; b < p.batch; ++b) run_direct(p, b);
    return;
  }
  const KernelSet& ks = pick_kernels(isa, p.ab_dtype);
  const double flops = 2.0 * double(p.M) * double(p.N) * double(p.K);
  const int pool_threads = std::max(1, pool.size());

  Plan pl;
  pl.p = &p;
  pl.ks = &ks;
  int64_t kc = ks.kc, nc = ks.nc;
  pl.mc = ks.mc;
  if (getenv("TKKC")) kc = atoi(getenv("TKKC"));  // TUNING-ONLY
  if (getenv("TKMC")) pl.mc = atoi(getenv("TKMC"));  // TUNING-ONLY
  if (getenv("TKNC")) nc = atoi(getenv("TKNC"));  // TUNING-ONLY
  pl.kc = balanced(p.K, kc, 2);  // even: bf16 pairs never straddle two K blocks
  pl.nc = balanced(p.N, nc, ks.nr);
  pl.c_bf16 = p.c_dtype == DType::BF16;
  pl.rows_per_pass = p.M;

  // Batch-parallel: whole small matrices per thread, no barriers, private B buffers. C must not be
  // broadcast (batch stride 0) or threads would race on it.
  const bool batch_parallel = p.batch > 1 && p.batch_stride_c != 0 && flops < kBatchParallelFlops;
  if (batch_parallel) {
    const int nt = int(std::min<double>({double(pool_threads), double(p.batch),
                                         std::max(1.0, flops * double(p.batch) / kMinFlopsPerThread)}));
    if (pl.c_bf16 && p.K > pl.kc) pl.rows_per_pass = std::max<int64_t>(ks.mr, kAccBudgetBytes / (4 * std::min(pl.nc, p.N)) / ks.mr * ks.mr);
    pl.bblock_bytes = size_t(panel_bytes(ks.fmt, pl.kc, ks.nr) * ((std::min(pl.nc, p.N) + ks.nr - 1) / ks.nr));
    auto body = [&](int tid, int nthreads) {
      Plan mine = pl;  // a team of one
      mine.bbuf[0] = t_bpack0.get(mine.bblock_bytes);
      mine.bbuf[1] = mine.bbuf[0];
      int64_t step = 0;
      for (int64_t b = p.batch * tid / nthreads; b < p.batch * (tid + 1) / nthreads; ++b)
        run_blocked(mine, operands(p, b), 0, step);
    };
    if (nt <= 1)
      body(0, 1);
    else
      pool.parallel(body, nt);
    return;
  }

  int nt = int(std::min<double>(pool_threads, std::max(1.0, flops / kMinFlopsPerThread)));
  const int64_t mb = (p.M + ks.mr - 1) / ks.mr;
  if (pl.c_bf16 && p.K > pl.kc) pl.nc = balanced(p.N, std::min<int64_t>(nc, kAccNc), ks.nr);
  const int64_t nbp = (std::min(pl.nc, p.N) + ks.nr - 1) / ks.nr;
  nt = int(std::min<int64_t>(nt, mb * nbp));
  choose_grid(nt, mb, nbp, &pl.tm, &pl.tn);
  pl.nt = nt;
  if (pl.c_bf16 && p.K > pl.kc) {
    // Each thread's fp32 accumulator holds rows_per_pass / tm rows of nc / tn columns.
    const int64_t cols = (nbp + pl.tn - 1) / pl.tn * ks.nr;
    const int64_t rows = std::max<int64_t>(ks.mr, kAccBudgetBytes / (4 * cols) / ks.mr * ks.mr);
    pl.rows_per_pass = std::min<int64_t>(p.M, rows * pl.tm);
  }
  pl.bblock_bytes = size_t(panel_bytes(ks.fmt, pl.kc, ks.nr) * nbp);
  pl.bbuf[0] = t_bpack0.get(pl.bblock_bytes);
  pl.bbuf[1] = nt > 1 ? t_bpack1.get(pl.bblock_bytes) : pl.bbuf[0];
  SpinBarrier barrier(nt);
  pl.barrier = &barrier;
  auto body = [&](int tid, int) {
    int64_t step = 0;
    for (int64_t b = 0; b < p.batch; ++b) run_blocked(pl, operands(p, b), tid, step);
  };
  if (nt <= 1)
    body(0, 1);
  else
    pool.parallel(body, nt);
}

}  // namespace

void gemm_cpu_isa(const GemmParams& p, ThreadPool& pool, CpuIsa isa) {
  gemm_impl(p, pool, isa <= detected_isa() ? isa : detected_isa());
}

void gemm_cpu(const GemmParams& p, ThreadPool& pool) { gemm_impl(p, pool, active_isa()); }

}  // namespace tk
