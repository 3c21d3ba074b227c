// CPU GEMM driver: dispatch, packing, cache blocking and threading around the per-ISA
// micro-kernels (gemm_kernels_*.cpp).
//
// Loop nest (Goto / BLIS), per matrix of the batch:
//   jc over N in nc blocks                    B block kc x nc (8 MiB): L3, shared by the team
//     pc over K in kc blocks                  threads pack fixed shares of its NR panels, then one
//                                             barrier (B is double-buffered, so packing the next
//                                             block needs no second barrier)
//       items: row chunk x column group       claimed from a counter; per item the thread packs
//                                             the chunk's A block (<= mc rows x kc) privately
//         jr over the group's NR panels       one B panel (kc x NR) ...
//           ir over the chunk's MR panels     ... meets every A panel: micro-kernel MR x NR
// The K block is deep (1024 fp32, 2048 bf16) because what the big register tiles leave to lose is
// the C traffic, one read and write of each C tile per K block; panels stream from L2 fine (see
// gemm_kernels_avx512.cpp). Blocks are balanced (K = 1025 becomes two blocks of 514, not 1024 + 1).
//
// Threads: row chunks are the unit of work (each rereads the B block from L3, which costs little),
// sized and counted so the threads get equal shares; short M adds column groups, which pack the
// same A rows once per group, so a small cost model picks between them (split_work). Items are
// claimed rather than assigned: a thread that loses its core for a while (the pool shares the
// machine with Node's threads) delays the others by one item, not by its whole share. Small B
// blocks are packed by every thread for itself instead (kPrivateBBytes), and batches of small
// matrices run one whole matrix per thread. Tiny products skip packing altogether.
//
// K blocks after the first accumulate into C with beta = 1, which for an fp32 C is exact. A bf16 C
// would be rounded once per K block, so bf16 output accumulates in fp32 -- a small per-thread slab
// when K is one block, else a buffer spanning the rows of a pass, whose height the buffer budget
// bounds (row super-blocks, each a complete GEMM) -- and is rounded once, slab by slab, at the end.
//
// A GemmBSource (gemm.h) replaces only the B packing call: its panels are what the generic packer
// would write for the dense op(B), so blocking, threading and kernels are the same either way.
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <new>
#include <thread>
#include <vector>

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
// A thread must get at least this many FLOPs to be worth waking: on Zen 4 two threads break even
// with one near 100^3 (~2 MFLOP) and win clearly from 128^3.
constexpr double kMinFlopsPerThread = 1.5e6;
// Matrices below this many FLOPs run whole, one per thread, when the batch has several; below the
// second bound too when the batch divides evenly among the threads (then nothing is lost to
// imbalance, and whole matrices per thread need no barrier and share no cache lines).
constexpr double kBatchParallelFlops = 2.0 * 192 * 192 * 192;
constexpr double kBatchEvenFlops = 2.0 * 512 * 512 * 512;
// The bf16-output fp32 accumulator (K spanning several blocks) may take this much per thread.
// Defining TK_GEMM_ACC_BUDGET_BYTES small at build time drives test-sized problems through the
// multi-pass (row super-block) path.
#ifndef TK_GEMM_ACC_BUDGET_BYTES
#define TK_GEMM_ACC_BUDGET_BYTES (int64_t(4) << 20)
#endif
constexpr int64_t kAccBudgetBytes = TK_GEMM_ACC_BUDGET_BYTES;
// nc for bf16 output with several K blocks: a narrower B block lets a row super-block be taller.
constexpr int64_t kAccNc = 1024;
// B blocks up to this size are packed by every thread for itself instead of once for the team:
// a small shared block costs more in cache-line transfers between cores (each line written by one
// core, read by the other, then invalidated on the next write: ~1.3 ns per element measured at
// 128^3) than packing it twice (~0.1-0.3 ns per element), and it needs no barrier. Measured on
// Zen 4 with 2 threads: private wins at 128^3 and 192^3 (B block 64 and 144 KiB), shared from 256^3.
constexpr int64_t kPrivateBBytes = 192 << 10;
// The smallest row chunk worth scheduling on its own (in MR panels): each chunk streams the whole
// B block once more, so chunks much shorter than this make B traffic visible.
constexpr int64_t kMinChunkPanels = 4;

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

// A grow-only 64-byte aligned buffer, so steady-state GEMMs allocate nothing. (malloc plus manual
// alignment rather than std::aligned_alloc, which MSVC lacks.)
class Scratch {
 public:
  Scratch() = default;
  Scratch(Scratch&& o) noexcept : raw_(o.raw_), p_(o.p_), cap_(o.cap_) { o.raw_ = o.p_ = nullptr, o.cap_ = 0; }
  Scratch(const Scratch&) = delete;
  ~Scratch() { std::free(raw_); }
  void* get(size_t bytes) {
    if (bytes > cap_ || !p_) {
      std::free(raw_);
      raw_ = p_ = nullptr;
      cap_ = 0;
      const size_t want = (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096;
      raw_ = std::malloc(want + 64);
      if (!raw_) throw std::bad_alloc();
      p_ = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw_) + 63) / 64 * 64);
      cap_ = want;
    }
    return p_;
  }

 private:
  void* raw_ = nullptr;
  void* p_ = nullptr;
  size_t cap_ = 0;
};

// Every buffer a parallel region uses, owned by the thread that calls gemm_cpu and allocated
// before the region starts: an allocation failure then throws in the caller, never in a pool
// worker, and buffers are reused across calls from the same caller.
struct TeamScratch {
  std::vector<Scratch> apack, acc, bpack0, bpack1;  // per thread index
  Scratch acc_shared;
  void size_for(int nt) {
    if (int(apack.size()) < nt) {
      apack.resize(size_t(nt));
      acc.resize(size_t(nt));
      bpack0.resize(size_t(nt));
      bpack1.resize(size_t(nt));
    }
  }
};
thread_local TeamScratch t_team;

// ---- synchronization --------------------------------------------------------------------------------

// Counting spin barrier for the threads of one parallel region; the last thread to arrive runs
// `on_release` before letting the others go. The waits are short (the end of one B block's
// packing), so spinning beats sleeping; after a while it yields in case the cores are shared.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  template <typename F>
  void wait(F&& on_release) {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      on_release();
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin < 1 << 12)
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

// Work counters of a parallel region, one per B buffer parity. Compute items are claimed, not
// assigned: a thread that loses its core for a while (the pool shares the machine with Node's own
// threads) delays the others by one item at most instead of by its whole share.
struct Counters {
  alignas(64) std::atomic<int64_t> work[2] = {{0}, {0}};
};

// ---- the blocked GEMM -----------------------------------------------------------------------------

// One matrix of the batch, as the blocked loops see it.
struct Operands {
  PanelSrc a, b;  // a: (w = row i, k); b: (w = column j, k)
  const GemmBSource* bsrc;  // when set, packs B instead of b
  void* c;
};

// The work of one parallel region: every thread runs the same loop nest and claims its items.
struct Plan {
  const GemmParams* p = nullptr;
  const KernelSet* ks = nullptr;
  CpuIsa isa = CpuIsa::Portable;  // the level the kernels run at (passed to a B source)
  int64_t kc = 0, mc = 0, nc = 0;
  int64_t rows_per_pass = 0;  // row super-block height (M unless bf16 output needs the fp32 buffer)
  int nt = 1;
  bool c_bf16 = false;
  bool private_b = false;  // each thread packs the whole B block itself (small blocks, see below)
  // Shared state (cooperative mode): B blocks (double-buffered), the bf16-output accumulator for
  // multi-block K (rows_per_pass x nc, row stride nc), the barrier and the work counters.
  void* bbuf[2] = {nullptr, nullptr};
  float* acc_shared = nullptr;
  SpinBarrier* barrier = nullptr;
  Counters* counters = nullptr;
  TeamScratch* scratch = nullptr;  // the caller's buffers, indexed by thread
};

Operands operands(const GemmParams& p, int64_t b) {
  const size_t esz = dtype_size(p.ab_dtype), csz = dtype_size(p.c_dtype);
  Operands o;
  const char* A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * esz;
  const char* B = p.b_source ? nullptr : static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * esz;
  // op(A)(i, k): A[i * lda + k], or A[k * lda + i] when transposed; op(B)(k, j) likewise.
  o.a = PanelSrc{A, p.ab_dtype, p.trans_a ? 1 : p.lda, p.trans_a ? p.lda : 1};
  o.b = PanelSrc{B, p.ab_dtype, p.trans_b ? p.ldb : 1, p.trans_b ? 1 : p.ldb};
  o.bsrc = p.b_source;
  o.c = static_cast<char*>(p.C) + size_t(b * p.batch_stride_c) * csz;
  return o;
}

int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

// Splits a pass of mb MR panels x nbp NR panels into R row chunks x G column groups for nt threads.
// At least ceil(mb / mc_panels) chunks (an A block must fit the mc buffer). Candidates: more row
// chunks (a multiple of nt, if chunks stay kMinChunkPanels tall), or column groups so that the
// item count is a multiple of nt. The estimate is the busy fraction of the most loaded thread,
// charged for packing: an element packed costs about 20 kernel flops (~0.2 ns vs ~0.01 ns per flop
// per core), i.e. a share 10 G / ncols of an item whose A rows are packed once per column group.
void split_work(int64_t mb, int64_t nbp, int NR, int64_t mc_panels, int nt, int64_t* R, int64_t* G) {
  const int64_t r = (mb + mc_panels - 1) / mc_panels;
  *R = r;
  *G = 1;
  if (nt == 1) return;
  const double ncols = double(nbp * NR);
  auto eff = [&](int64_t rr, int64_t gg) {
    const double er = double(mb) / double(rr * ((mb + rr - 1) / rr));
    const double eg = double(nbp) / double(gg * ((nbp + gg - 1) / gg));
    const double ei = double(rr * gg) / double(nt * ((rr * gg + nt - 1) / nt));
    return er * eg * ei * (1.0 + 10.0 / ncols) / (1.0 + 10.0 * double(gg) / ncols);
  };
  double best = eff(r, 1);
  const int64_t up = std::min(mb, (r + nt - 1) / nt * nt);
  if (up > r && up * kMinChunkPanels <= mb && eff(up, 1) > best) best = eff(up, 1), *R = up;
  const int64_t g = nt / gcd(r, nt);
  if (g > 1 && eff(r, g) > best) *R = r, *G = g;
}

// Runs one matrix as thread `tid` of the plan's team (tid < pl.nt), with the scratch buffers of
// pool thread `slot`. `step` counts B blocks (buffer parity).
void run_blocked(const Plan& pl, const Operands& op, int tid, int slot, int64_t& step) {
  const GemmParams& p = *pl.p;
  const KernelSet& ks = *pl.ks;
  const int MR = ks.mr, NR = ks.nr;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t npc = (K + pl.kc - 1) / pl.kc;
  char* const abuf = static_cast<char*>(pl.scratch->apack[size_t(slot)].get(0));
  float* const cf32 = pl.c_bf16 ? nullptr : static_cast<float*>(op.c);
  uint16_t* const cb16 = pl.c_bf16 ? static_cast<uint16_t*>(op.c) : nullptr;
  float* const acc_local = pl.c_bf16 ? static_cast<float*>(pl.scratch->acc[size_t(slot)].get(0)) : nullptr;

  for (int64_t ms = 0; ms < M; ms += pl.rows_per_pass) {
    const int64_t mlen = std::min(pl.rows_per_pass, M - ms), mb = (mlen + MR - 1) / MR;
    for (int64_t jc = 0; jc < N; jc += pl.nc) {
      const int64_t ncur = std::min(pl.nc, N - jc), nbp = (ncur + NR - 1) / NR;
      int64_t R, G;
      split_work(mb, nbp, NR, pl.mc / MR, pl.nt, &R, &G);
      for (int64_t pc = 0; pc < K; pc += pl.kc) {
        const int64_t kcur = std::min(pl.kc, K - pc);
        const bool first = pc == 0, last = pc + kcur == K;
        const int64_t bpanel = panel_bytes(ks.fmt, kcur, NR), apanel = panel_bytes(ks.fmt, kcur, MR);
        void* const bblock = pl.private_b ? pl.scratch->bpack0[size_t(slot)].get(0) : pl.bbuf[step & 1];
        char* const bbuf = static_cast<char*>(bblock);
        const int par = int(step & 1);
        ++step;

        // Pack the B block. Shared: thread t packs panels [nbp t / nt, nbp (t+1) / nt) -- a fixed
        // share, so it rewrites buffer lines it wrote last time rather than the other core's --
        // and every thread waits for the whole block. Private: each thread packs all of it.
        const int64_t q0 = pl.private_b ? 0 : nbp * tid / pl.nt, q1 = pl.private_b ? nbp : nbp * (tid + 1) / pl.nt;
        if (q1 > q0) {
          const int64_t w0 = jc + q0 * NR, width = std::min(ncur, q1 * NR) - q0 * NR;
          if (op.bsrc)
            op.bsrc->pack(op.bsrc->ctx, ks.fmt, pl.isa, w0, width, pc, kcur, NR, bbuf + q0 * bpanel);
          else
            ks.pack(op.b, w0, width, pc, kcur, NR, bbuf + q0 * bpanel);
        }
        if (pl.nt > 1 && !pl.private_b) {
          // Everyone is past the previous step's work, so the other parity's counter is free.
          pl.barrier->wait([&] { pl.counters->work[par ^ 1].store(0, std::memory_order_relaxed); });
        }

        // Items (row chunk r, column group g), r-major so one thread often keeps its packed A.
        // Without a barrier (one thread, or private B) the items are dealt round-robin instead.
        int64_t packed_r = -1, local = tid;
        for (;;) {
          int64_t item;
          if (pl.nt == 1 || pl.private_b) {
            item = local;
            local += pl.nt;
          } else {
            item = pl.counters->work[par].fetch_add(1, std::memory_order_relaxed);
          }
          if (item >= R * G) break;
          const int64_t r = item / G, g = item % G;
          const int64_t i0 = ms + MR * (mb * r / R), i1 = std::min(ms + mlen, ms + MR * (mb * (r + 1) / R));
          const int64_t jp0 = nbp * g / G, jp1 = nbp * (g + 1) / G;
          if (i1 <= i0 || jp1 <= jp0) continue;
          const int64_t rows = i1 - i0;
          if (r != packed_r) {
            ks.pack(op.a, i0, rows, pc, kcur, MR, abuf);
            packed_r = r;
          }
          for (int64_t jp = jp0; jp < jp1; ++jp) {
            const int n = int(std::min<int64_t>(NR, ncur - jp * NR));
            const char* bp = bbuf + jp * bpanel;
            float* ct;
            int64_t ldt;
            float al, be;
            if (!pl.c_bf16) {
              ct = cf32 + i0 * p.ldc + jc + jp * NR;
              ldt = p.ldc;
              al = p.alpha;
              be = first ? p.beta : 1.0f;
            } else {
              // bf16 C: accumulate in fp32 -- a slab of this item for single-block K, else the shared
              // buffer, which other threads may continue in later K blocks.
              if (npc > 1) {
                ldt = pl.nc;
                ct = pl.acc_shared + (i0 - ms) * ldt + jp * NR;
              } else {
                ldt = NR;
                ct = acc_local;
              }
              al = 1.0f;
              be = first ? 0.0f : 1.0f;
            }
            for (int64_t ir = 0; ir < rows; ir += MR) {
              const int m = int(std::min<int64_t>(MR, rows - ir));
              ks.kernel(kcur, abuf + (ir / MR) * apanel, bp, ct + ir * ldt, ldt, m, n, al, be);
            }
            // Round this rows x NR slab while it is still in cache.
            if (pl.c_bf16 && last)
              ks.store_bf16(ct, ldt, cb16 + i0 * p.ldc + jc + jp * NR, p.ldc, rows, n, p.alpha, p.beta);
          }
        }
      }
    }
  }
}

// ---- direct path ----------------------------------------------------------------------------------

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

// Tiny products (and K == 0): a dot product per element of C, fp32 accumulation. A B source has
// op(B) unpacked to the dense fp32 K x N array b_dense (row stride N) by the caller.
void run_direct(const GemmParams& p, int64_t b, const float* b_dense) {
  const size_t esz = dtype_size(p.ab_dtype), csz = dtype_size(p.c_dtype);
  const void* A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * esz;
  const void* B = b_dense ? static_cast<const void*>(b_dense)
                          : static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * esz;
  const DType bt = b_dense ? DType::F32 : p.ab_dtype;
  void* C = static_cast<char*>(p.C) + size_t(b * p.batch_stride_c) * csz;
  const int64_t ais = p.trans_a ? 1 : p.lda, aks = p.trans_a ? p.lda : 1;
  const int64_t bks = b_dense ? p.N : p.trans_b ? 1 : p.ldb, bjs = b_dense ? 1 : p.trans_b ? p.ldb : 1;
  for (int64_t i = 0; i < p.M; ++i)
    for (int64_t j = 0; j < p.N; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.K; ++k)
        s += load_ab(A, p.ab_dtype, i * ais + k * aks) * load_ab(B, bt, k * bks + j * bjs);
      store_c(C, p.c_dtype, i * p.ldc + j, p.alpha * s, p.beta);
    }
}

// ---- planning -------------------------------------------------------------------------------------

void gemm_impl(const GemmParams& p, ThreadPool& pool, CpuIsa isa) {
  if (p.batch <= 0 || p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0 || p.M * p.N * p.K <= kTinyMacs) {
    // A B source unpacks op(B) (at most kTinyMacs elements) once for the whole batch.
    std::vector<float> b_dense;
    if (p.b_source && p.K > 0) {
      b_dense.resize(size_t(p.K * p.N));
      p.b_source->pack(p.b_source->ctx, PackFmt::F32, isa, 0, p.N, 0, p.K, int(p.N), b_dense.data());
    }
    for (int64_t b = 0; b < p.batch; ++b) run_direct(p, b, p.b_source ? b_dense.data() : nullptr);
    return;
  }
  const KernelSet& ks = pick_kernels(isa, p.ab_dtype);
  const int MR = ks.mr, NR = ks.nr;
  const double flops = 2.0 * double(p.M) * double(p.N) * double(p.K);
  const int pool_threads = std::max(1, pool.size());

  Plan pl;
  pl.p = &p;
  pl.ks = &ks;
  pl.isa = isa;
  pl.c_bf16 = p.c_dtype == DType::BF16;
  int64_t kc = ks.kc, nc = ks.nc;
  pl.mc = ks.mc;
  pl.kc = balanced(p.K, kc, 2);  // even: bf16 pairs never straddle two K blocks
  const bool multi_k = p.K > pl.kc;
  pl.nc = balanced(p.N, pl.c_bf16 && multi_k ? std::min<int64_t>(nc, kAccNc) : nc, NR);
  pl.rows_per_pass = p.M;

  // Whole small matrices per thread when the batch can feed the pool: no barriers, no shared B.
  // C must not be broadcast (batch stride 0) or threads would race on it.
  const bool batch_parallel = p.batch > 1 && p.batch_stride_c != 0 &&
                              (flops < kBatchParallelFlops || (p.batch % pool_threads == 0 && flops < kBatchEvenFlops));
  int nt = int(std::min<double>(pool_threads, std::max(1.0, flops * (batch_parallel ? double(p.batch) : 1.0) /
                                                                 kMinFlopsPerThread)));
  if (batch_parallel) nt = int(std::min<int64_t>(nt, p.batch));
  const int team = batch_parallel ? 1 : nt;  // threads cooperating on one matrix
  if (pl.c_bf16 && multi_k) {
    // The shared accumulator holds rows_per_pass x nc floats within the team's budget.
    const int64_t rows = kAccBudgetBytes * team / (4 * pl.nc) / MR * MR;
    pl.rows_per_pass = std::min<int64_t>(p.M, std::max<int64_t>(MR, rows));
  }
  pl.nt = team;

  // Scratch for every thread, allocated here in the caller. The bf16-output accumulator is a
  // rows x NR slab per thread for single-block K; for multi-block K it spans the pass (rows_per_pass
  // x nc), shared by the team or, in batch mode, one per thread.
  const int64_t bblock = panel_bytes(ks.fmt, pl.kc, NR) * ((pl.nc + NR - 1) / NR);
  const int64_t ablock = panel_bytes(ks.fmt, pl.kc, MR) * (pl.mc / MR);
  const int64_t acc_pass = pl.rows_per_pass * pl.nc * 4;
  TeamScratch& ts = t_team;
  ts.size_for(nt);
  pl.scratch = &ts;
  // Not with the shared accumulator: without the barrier a thread could start on rows of it that
  // another thread has yet to round out of the previous pass or column block.
  pl.private_b = team > 1 && bblock <= kPrivateBBytes && !(pl.c_bf16 && multi_k);
  for (int t = 0; t < nt; ++t) {
    ts.apack[size_t(t)].get(size_t(ablock));
    if (pl.c_bf16) ts.acc[size_t(t)].get(size_t(multi_k && batch_parallel ? acc_pass : pl.mc * NR * 4));
    if (batch_parallel || pl.private_b || t == 0) ts.bpack0[size_t(t)].get(size_t(bblock));
  }
  if (pl.c_bf16 && multi_k && !batch_parallel) pl.acc_shared = static_cast<float*>(ts.acc_shared.get(size_t(acc_pass)));

  if (batch_parallel) {
    // Matrices are claimed one at a time, each run by a team of one.
    std::atomic<int64_t> next{0};
    auto body = [&](int tid, int) {
      Plan mine = pl;
      mine.bbuf[0] = mine.bbuf[1] = ts.bpack0[size_t(tid)].get(0);
      if (pl.c_bf16 && multi_k) mine.acc_shared = static_cast<float*>(ts.acc[size_t(tid)].get(0));
      int64_t step = 0;
      for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < p.batch;)
        run_blocked(mine, operands(p, b), 0, tid, step);
    };
    if (nt <= 1)
      body(0, 1);
    else
      pool.parallel(body, nt);
    return;
  }

  pl.bbuf[0] = ts.bpack0[0].get(0);
  pl.bbuf[1] = nt > 1 && !pl.private_b ? ts.bpack1[0].get(size_t(bblock)) : pl.bbuf[0];
  SpinBarrier barrier(nt);
  Counters counters;
  pl.barrier = &barrier;
  pl.counters = &counters;
  auto body = [&](int tid, int) {
    int64_t step = 0;
    for (int64_t b = 0; b < p.batch; ++b) run_blocked(pl, operands(p, b), tid, tid, step);
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
