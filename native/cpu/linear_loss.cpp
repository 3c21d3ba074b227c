// CPU fused linear losses (see linear_loss.h for the contracts and where the memory goes).
//
// Design:
// - Rows that count are listed first (targets != ignore_index), and only they are chunked: a
//   chunk is R consecutive entries of that list. When the entries are consecutive rows of hidden
//   the GEMMs read hidden (and write an F32 dhidden) in place; otherwise the chunk's rows are
//   gathered into a R x D buffer first and dhidden rows scattered back after (O(R D) copies against
//   O(R V D) arithmetic). Ignored rows cost nothing but a zeroed dhidden row.
// - Per chunk, from the caller's thread: the logits GEMM(s) into fp32 buffers, then the row work
//   through the existing row kernels on [R, V] views of those buffers -- cross_entropy_fused_cpu
//   (reduction Sum with the global scale as its dloss, so a chunk's rows get exactly the gradient
//   the whole call asks for) and distill_fused_cpu (no targets: every row of a chunk counts; its
//   gradient scale is dloss * T / R, so it is handed dloss * (1 - alpha) * R / #counted to come
//   out as dloss * (1 - alpha) * T / #counted) -- which parallelize over rows on the pool, then
//   the two gradient GEMMs. Per-row losses land in per-row slots; the reductions are summed in
//   double in row order after the last chunk. Nothing is threaded from inside a pool task.
// - Mixed distillation (0 < alpha < 1) with gradients: cross entropy writes its gradient into a
//   third buffer, distillation overwrites the student logits with its own, and the two are added.
// - The GEMM takes one dtype for A and B. Logits are h W^T with both in the head's dtype (bf16
//   GEMMs accumulate in fp32, on AVX512-BF16 with vdpbf16ps). The gradient G stays fp32 (rounding
//   it to bf16 would add an error as large as the output rounding), so with bf16 operands
//   dweight += G^T h reads the chunk's h rows widened to fp32 (R x D), and dhidden = G W runs over
//   blocks of W rows widened to fp32 (<= 8 MiB each, at least 256 rows), accumulating in fp32 with
//   beta = 1 across blocks; dhidden rows are rounded once, dweight once at the very end from a
//   fp32 [V, D] accumulator.
// - Scratch: every buffer is sized once per call from the plan, before any output is written
//   (std::vector-style ownership as in loss.cpp and attention.cpp; an allocation failure is a
//   tk::Error naming the call). The GEMM's packing buffers and the row kernels' per-thread row
//   buffers are theirs and not counted.
#include "linear_loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "../core/error.h"
#include "gemm.h"
#include "isa.h"
#include "simd.h"

namespace tk {
namespace {

constexpr int64_t kCopyGrain = int64_t(1) << 16;        // elements per thread for widen / narrow / add
constexpr int64_t kWideBlockBytes = int64_t(8) << 20;  // fp32 copy of a block of bf16 W rows
constexpr int64_t kMinWideRows = 256;

// ================================ bf16 <-> fp32 ====================================================

enum class Level { Scalar, Avx2, Avx512 };

Level level() {
#if TK_SIMD_X86
  const CpuIsa isa = active_isa();
  if (isa >= CpuIsa::Avx512) return Level::Avx512;
  if (isa >= CpuIsa::Avx2) return Level::Avx2;
#endif
  return Level::Scalar;
}

void widen_scalar(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void narrow_scalar(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}

#if TK_SIMD_X86
// bf16 is the high half of an fp32: zero-extend each 16-bit lane to 32 bits and shift it up.
TK_AVX2 void widen_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), 16);
    const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)), 16);
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(lo));
    _mm256_storeu_ps(d + i + 8, _mm256_castsi256_ps(hi));
  }
  widen_scalar(s + i, d + i, n - i);
}

TK_AVX2 void narrow_avx2(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), simd::bf16_round8(_mm256_loadu_ps(s + i)));
  narrow_scalar(s + i, d + i, n - i);
}

TK_AVX512 void widen_avx512(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, s + i)), 16);
    _mm512_mask_storeu_ps(d + i, k, _mm512_castsi512_ps(w));
  }
}

TK_AVX512 void narrow_avx512(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(d + i, k, simd::bf16_round16(_mm512_maskz_loadu_ps(k, s + i)));
  }
}
#endif  // TK_SIMD_X86

void widen(Level L, const uint16_t* s, float* d, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return widen_avx512(s, d, n);
  if (L == Level::Avx2) return widen_avx2(s, d, n);
#endif
  (void)L;
  widen_scalar(s, d, n);
}

void narrow(Level L, const float* s, uint16_t* d, int64_t n) {
#if TK_SIMD_X86
  if (L == Level::Avx512) return narrow_avx512(s, d, n);
  if (L == Level::Avx2) return narrow_avx2(s, d, n);
#endif
  (void)L;
  narrow_scalar(s, d, n);
}

// Flat element loops on the pool (called from the caller's thread only).
void widen_par(Level L, const uint16_t* s, float* d, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, kCopyGrain, [&](int64_t b, int64_t e) { widen(L, s + b, d + b, e - b); });
}

void narrow_par(Level L, const float* s, uint16_t* d, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, kCopyGrain, [&](int64_t b, int64_t e) { narrow(L, s + b, d + b, e - b); });
}

void add_par(float* y, const float* x, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, kCopyGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] += x[i];
  });
}

// ================================ scratch ===========================================================

// Owns the call's buffers and counts their bytes. Allocation failures become tk::Error (before any
// output is written: the plan allocates everything up front).
class Arena {
 public:
  explicit Arena(const char* op) : op_(op) {}
  template <typename T>
  T* get(int64_t n) {
    if (n <= 0) return nullptr;
    const size_t bytes = size_t(n) * sizeof(T);
    try {
      blocks_.emplace_back(new char[bytes]);
    } catch (const std::bad_alloc&) {
      fail(op_, ": cannot allocate ", bytes, " bytes of scratch (", bytes_,
           " already held); a smaller chunk_rows needs less");
    }
    bytes_ += int64_t(bytes);
    return reinterpret_cast<T*>(blocks_.back().get());
  }
  int64_t bytes() const { return bytes_; }

 private:
  const char* op_;
  std::vector<std::unique_ptr<char[]>> blocks_;
  int64_t bytes_ = 0;
};

// ================================ argument checks ===================================================

void check_tensor(const TensorView& v, const char* op, const char* what) {
  TK_CHECK(v.device.type == DeviceType::CPU, op, ": ", what, " is on ", v.device.name(), ", expected cpu");
  TK_CHECK(v.ndim >= 0 && v.ndim <= kMaxDims, op, ": ", what, " has rank ", v.ndim, " (at most ", kMaxDims, ")");
  TK_CHECK(v.numel() == 0 || v.data != nullptr, op, ": ", what, " has no data");
  TK_CHECK(v.is_contiguous(), op, ": ", what, " ", describe(v), " must be contiguous");
}

void check_f32(const TensorView& v, int64_t numel, const char* op, const char* what) {
  check_tensor(v, op, what);
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

// hidden [..., D] and weight [V, D] of one linear head.
HeadDims check_head(const TensorView& h, const TensorView& w, const char* op, const char* hname, const char* wname) {
  check_tensor(h, op, hname);
  TK_CHECK(h.dtype == DType::F32 || h.dtype == DType::BF16, op, ": ", hname, " ", describe(h), " must be f32 or bf16");
  TK_CHECK(h.ndim >= 1 && h.shape[h.ndim - 1] >= 1, op, ": ", hname, " ", describe(h),
           " must have a last (hidden) dim D >= 1");
  const int64_t D = h.shape[h.ndim - 1];
  check_tensor(w, op, wname);
  TK_CHECK(w.dtype == h.dtype, op, ": ", wname, " ", describe(w), " must have ", hname, "'s dtype ",
           dtype_name(h.dtype));
  TK_CHECK(w.ndim == 2 && w.shape[0] >= 1 && w.shape[1] == D, op, ": ", wname, " ", describe(w),
           " must be [V, ", D, "] (V >= 1) to match ", hname, " ", describe(h));
  return {h.numel() / D, D, w.shape[0]};
}

// targets: N elements I32, each ignore_index or in [0, V).
void check_targets(const TensorView& t, int64_t N, int64_t V, int32_t ignore_index, const char* op) {
  check_tensor(t, op, "targets");
  TK_CHECK(t.dtype == DType::I32, op, ": targets ", describe(t), " must be i32");
  TK_CHECK(t.numel() == N, op, ": targets ", describe(t), " must have ", N, " elements (one per hidden row)");
  const int32_t* y = t.ptr<const int32_t>();
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore_index) continue;
    TK_CHECK(y[i] >= 0 && y[i] < V, op, ": targets[", i, "] = ", y[i], " is out of range for V = ", V,
             " (and is not ignore_index = ", ignore_index, ")");
  }
}

// An optional gradient output: absent (data == nullptr) or like its input.
bool check_grad(const TensorView& g, const TensorView& like, const char* op, const char* what, const char* lname) {
  if (g.data == nullptr) return false;
  check_tensor(g, op, what);
  TK_CHECK(same_shape(g, like) && g.dtype == like.dtype, op, ": ", what, " ", describe(g), " must match ", lname, " ",
           describe(like));
  return true;
}

// ================================ the chunk machinery ================================================

// One linear head (logits = h W^T) and the chunk rows it reads.
struct Head {
  const char* h = nullptr;  // [N, D]
  const void* w = nullptr;  // [V, D]
  DType dt = DType::F32;
  int64_t D = 0, V = 0;
  size_t esz = 4;
  char* gather = nullptr;  // R x D in dt (only when some rows are ignored)
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

// The chunk's rows of h (row indices idx[0, r)): in place when consecutive, else gathered.
const void* chunk_input(const Head& hd, const int64_t* idx, int64_t r, bool consecutive) {
  const size_t row = size_t(hd.D) * hd.esz;
  if (consecutive) return hd.h + size_t(idx[0]) * row;
  for (int64_t i = 0; i < r; ++i) std::memcpy(hd.gather + size_t(i) * row, hd.h + size_t(idx[i]) * row, row);
  return hd.gather;
}

// out [r, V] fp32 = a [r, D] W^T.
void logits_gemm(const Head& hd, const void* a, int64_t r, float* out, ThreadPool& pool) {
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
  p.ldc = hd.V;
  gemm_cpu(p, pool);
}

// The trainable head's gradient outputs and their fp32 staging.
struct Grads {
  char* dh = nullptr;  // dhidden [N, D] (null: not wanted)
  void* dw = nullptr;  // dweight [V, D] (null: not wanted)
  float* h32 = nullptr;   // R x D: the chunk's bf16 h rows widened (for dweight)
  float* dh32 = nullptr;  // R x D: dhidden rows before the scatter / rounding
  float* wblk = nullptr;  // vb x D: a block of bf16 W rows widened (for dhidden)
  int64_t vb = 0;
  float* dw32 = nullptr;  // V x D: fp32 accumulator of a bf16 dweight
  bool any() const { return dh || dw; }
};

// Plans the staging buffers for the head's gradients (R rows per chunk, `gathered`: some rows are
// ignored, so chunks may not be consecutive rows).
Grads plan_grads(const Head& hd, void* dh, void* dw, int64_t R, bool gathered, Arena& arena) {
  Grads g;
  g.dh = static_cast<char*>(dh);
  g.dw = dw;
  const bool bf16 = hd.dt == DType::BF16;
  if (bf16 && dw) {
    g.h32 = arena.get<float>(R * hd.D);
    g.dw32 = arena.get<float>(hd.V * hd.D);
  }
  if (dh && (bf16 || gathered)) g.dh32 = arena.get<float>(R * hd.D);
  if (bf16 && dh) {
    const int64_t cap = std::max(kMinWideRows, kWideBlockBytes / (4 * hd.D));
    const int64_t nblk = (hd.V + cap - 1) / cap;
    g.vb = (hd.V + nblk - 1) / nblk;  // evened out
    g.wblk = arena.get<float>(g.vb * hd.D);
  }
  return g;
}

// With G [r, V] the chunk's logit gradient and a its h rows (in the head's dtype):
//   dweight (+)= G^T a  (overwrite on the first chunk),  dhidden[idx] = G W.
void chunk_backward(const Head& hd, const Grads& g, const float* G, const void* a, const int64_t* idx, int64_t r,
                    bool consecutive, bool first, Level L, ThreadPool& pool) {
  const int64_t D = hd.D, V = hd.V;
  const bool bf16 = hd.dt == DType::BF16;
  if (g.dw) {
    const float* b = static_cast<const float*>(a);
    if (bf16) {
      widen_par(L, static_cast<const uint16_t*>(a), g.h32, r * D, pool);
      b = g.h32;
    }
    GemmParams p;
    p.M = V;
    p.N = D;
    p.K = r;
    p.A = G;
    p.lda = V;
    p.trans_a = true;
    p.B = b;
    p.ldb = D;
    p.C = bf16 ? static_cast<void*>(g.dw32) : g.dw;
    p.ldc = D;
    p.beta = first ? 0.0f : 1.0f;
    gemm_cpu(p, pool);
  }
  if (g.dh) {
    const bool direct = !bf16 && consecutive;  // F32 rows written in place
    float* out = direct ? reinterpret_cast<float*>(g.dh) + idx[0] * D : g.dh32;
    if (!bf16) {
      GemmParams p;
      p.M = r;
      p.N = D;
      p.K = V;
      p.A = G;
      p.lda = V;
      p.B = hd.w;
      p.ldb = D;
      p.C = out;
      p.ldc = D;
      gemm_cpu(p, pool);
    } else {
      const uint16_t* w = static_cast<const uint16_t*>(hd.w);
      for (int64_t v0 = 0; v0 < V; v0 += g.vb) {
        const int64_t n = std::min(g.vb, V - v0);
        widen_par(L, w + v0 * D, g.wblk, n * D, pool);
        GemmParams p;
        p.M = r;
        p.N = D;
        p.K = n;
        p.A = G + v0;
        p.lda = V;
        p.B = g.wblk;
        p.ldb = D;
        p.C = out;
        p.ldc = D;
        p.beta = v0 == 0 ? 0.0f : 1.0f;
        gemm_cpu(p, pool);
      }
    }
    if (!direct) {
      for (int64_t i = 0; i < r; ++i) {
        const float* s = g.dh32 + i * D;
        if (bf16)
          narrow(L, s, reinterpret_cast<uint16_t*>(g.dh) + idx[i] * D, D);
        else
          std::memcpy(reinterpret_cast<float*>(g.dh) + idx[i] * D, s, size_t(D) * 4);
      }
    }
  }
}

// Before the chunks: zero the dhidden rows of ignored rows (y == nullptr: none are ignored).
void zero_ignored_rows(const Head& hd, const Grads& g, const int32_t* y, int32_t ignore, int64_t N) {
  if (!g.dh || !y) return;
  const size_t row = size_t(hd.D) * hd.esz;
  for (int64_t n = 0; n < N; ++n)
    if (y[n] == ignore) std::memset(g.dh + size_t(n) * row, 0, row);
}

// After the chunks: a bf16 dweight is rounded from its accumulator; with no chunk at all (no row
// counts) dweight is zero.
void finish_grads(const Head& hd, const Grads& g, bool any_chunk, Level L, ThreadPool& pool) {
  if (!g.dw) return;
  if (!any_chunk) {
    std::memset(g.dw, 0, size_t(hd.V * hd.D) * hd.esz);
  } else if (hd.dt == DType::BF16) {
    narrow_par(L, g.dw32, static_cast<uint16_t*>(g.dw), hd.V * hd.D, pool);
  }
}

// Rows that count, in order (y == nullptr: all of them).
int64_t list_rows(const int32_t* y, int32_t ignore, int64_t N, int64_t* idx) {
  int64_t c = 0;
  for (int64_t n = 0; n < N; ++n)
    if (!y || y[n] != ignore) idx[c++] = n;
  return c;
}

int64_t count_rows(const int32_t* y, int32_t ignore, int64_t N) {
  if (!y) return N;
  int64_t c = 0;
  for (int64_t n = 0; n < N; ++n) c += y[n] != ignore;
  return c;
}

// Chunk height for `counted` rows and `buffers` fp32 [R, V] buffers.
int64_t plan_rows(int64_t counted, int64_t V, int buffers, int64_t requested) {
  if (counted == 0) return 0;
  if (requested > 0) return std::min(requested, counted);
  int64_t rows = std::max(kLinearLossMinChunkRows, kLinearLossChunkBytes / (int64_t(buffers) * V * 4));
  rows = std::min(rows, counted);
  const int64_t chunks = (counted + rows - 1) / rows;
  return (counted + chunks - 1) / chunks;  // the same chunk count, without a short last chunk
}

TensorView f32_view(float* p, std::vector<int64_t> shape) { return make_view(p, DType::F32, Device{}, shape); }

void fill_stats(LinearLossStats* s, int64_t counted, int64_t R, const Arena& arena) {
  if (!s) return;
  s->counted_rows = counted;
  s->chunk_rows = R;
  s->chunks = R > 0 ? (counted + R - 1) / R : 0;
  s->scratch_bytes = arena.bytes();
}

}  // namespace

// ================================ linear cross entropy ================================================

void linear_cross_entropy_cpu(const TensorView& hidden, const TensorView& weight, const TensorView& targets,
                              const LinearCrossEntropyParams& params, const TensorView& loss,
                              const TensorView& losses, const TensorView& dhidden, const TensorView& dweight,
                              ThreadPool& pool) {
  const char* op = "linear_cross_entropy_cpu";
  const HeadDims d = check_head(hidden, weight, op, "hidden", "weight");
  TK_CHECK(params.reduction == LossReduction::Sum || params.reduction == LossReduction::Mean, op, ": reduction ",
           int(params.reduction), " must be sum or mean");
  TK_CHECK(params.chunk_rows >= 0, op, ": chunk_rows = ", params.chunk_rows, " must be >= 0 (0: automatic)");
  check_targets(targets, d.N, d.V, params.ignore_index, op);
  check_f32(loss, 1, op, "loss");
  check_f32(losses, d.N, op, "losses");
  const bool want_dh = check_grad(dhidden, hidden, op, "dhidden", "hidden");
  const bool want_dw = check_grad(dweight, weight, op, "dweight", "weight");

  // ---- plan and scratch (nothing written yet) ----
  const int32_t* y = targets.ptr<const int32_t>();
  const int32_t ignore = params.ignore_index;
  const int64_t N = d.N, V = d.V, counted = count_rows(y, ignore, N);
  const int64_t R = plan_rows(counted, V, 1, params.chunk_rows);
  const bool gathered = counted < N;
  Arena arena(op);
  int64_t* idx = arena.get<int64_t>(counted);
  list_rows(y, ignore, N, idx);
  float* S = arena.get<float>(R * V);
  float* row_loss = arena.get<float>(R);
  float* row_lse = arena.get<float>(R);
  int32_t* row_y = arena.get<int32_t>(R);
  float* tmp = arena.get<float>(1);
  Head hd = make_head(hidden, weight, d);
  if (gathered) hd.gather = arena.get<char>(R * d.D * int64_t(hd.esz));
  const Grads g = plan_grads(hd, want_dh ? dhidden.data : nullptr, want_dw ? dweight.data : nullptr, R, gathered,
                             arena);
  fill_stats(params.stats, counted, R, arena);

  // ---- the chunks ----
  const Level L = level();
  float* lo = losses.ptr<float>();
  std::fill(lo, lo + N, 0.0f);
  zero_ignored_rows(hd, g, y, ignore, N);
  const float scale = params.reduction == LossReduction::Sum
                          ? params.dloss
                          : (counted > 0 ? float(double(params.dloss) / double(counted)) : 0.0f);
  for (int64_t c0 = 0; c0 < counted; c0 += R) {
    const int64_t r = std::min(R, counted - c0);
    const int64_t* ix = idx + c0;
    const bool consecutive = ix[r - 1] - ix[0] == r - 1;
    const void* a = chunk_input(hd, ix, r, consecutive);
    logits_gemm(hd, a, r, S, pool);
    for (int64_t i = 0; i < r; ++i) row_y[i] = y[ix[i]];
    const TensorView sv = f32_view(S, {r, V}), lv = f32_view(row_loss, {r}), ev = f32_view(row_lse, {r});
    const TensorView yv = make_view(row_y, DType::I32, Device{}, {r}), tv = f32_view(tmp, {1});
    if (g.any()) {
      cross_entropy_fused_cpu(sv, yv, ignore, LossReduction::Sum, scale, lv, ev, tv, sv, pool);
      chunk_backward(hd, g, S, a, ix, r, consecutive, c0 == 0, L, pool);
    } else {
      cross_entropy_forward_cpu(sv, yv, ignore, LossReduction::Sum, lv, ev, tv, pool);
    }
    for (int64_t i = 0; i < r; ++i) lo[ix[i]] = row_loss[i];
  }
  finish_grads(hd, g, counted > 0, L, pool);

  double sum = 0;
  for (int64_t n = 0; n < N; ++n) sum += lo[n];
  if (params.reduction == LossReduction::Mean) sum = counted > 0 ? sum / double(counted) : 0.0;
  loss.ptr<float>()[0] = float(sum);
}

// ================================ fused linear distillation ===========================================

void linear_distill_cpu(const TensorView& student_hidden, const TensorView& student_weight,
                        const TensorView& teacher_hidden, const TensorView& teacher_weight,
                        const TensorView& targets, const LinearDistillParams& params, const TensorView& loss,
                        const TensorView& losses, const TensorView& dstudent_hidden,
                        const TensorView& dstudent_weight, ThreadPool& pool) {
  const char* op = "linear_distill_cpu";
  const HeadDims ds = check_head(student_hidden, student_weight, op, "student_hidden", "student_weight");
  const HeadDims dt = check_head(teacher_hidden, teacher_weight, op, "teacher_hidden", "teacher_weight");
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
    check_targets(targets, ds.N, ds.V, dp.ignore_index, op);
  else
    TK_CHECK(params.alpha == 0.0f, op, ": alpha = ", params.alpha, " > 0 needs targets for its cross entropy");
  check_f32(loss, 1, op, "loss");
  const bool want_losses = losses.data != nullptr;
  if (want_losses) check_f32(losses, ds.N, op, "losses");
  const bool want_dh = check_grad(dstudent_hidden, student_hidden, op, "dstudent_hidden", "student_hidden");
  const bool want_dw = check_grad(dstudent_weight, student_weight, op, "dstudent_weight", "student_weight");

  // ---- plan and scratch ----
  const double alpha = params.alpha;
  const bool ce = alpha > 0, kd = alpha < 1, grads = want_dh || want_dw;
  const int32_t* y = has_targets ? targets.ptr<const int32_t>() : nullptr;
  const int32_t ignore = dp.ignore_index;
  const int64_t N = ds.N, V = ds.V, counted = count_rows(y, ignore, N);
  const int buffers = 1 + (kd ? 1 : 0) + (ce && kd && grads ? 1 : 0);
  const int64_t R = plan_rows(counted, V, buffers, params.chunk_rows);
  const bool gathered = counted < N;
  Arena arena(op);
  int64_t* idx = arena.get<int64_t>(counted);
  list_rows(y, ignore, N, idx);
  float* S = arena.get<float>(R * V);
  float* Tl = kd ? arena.get<float>(R * V) : nullptr;
  float* C = ce && kd && grads ? arena.get<float>(R * V) : nullptr;
  float* ce_all = ce ? arena.get<float>(counted) : nullptr;  // per counted row, in order
  float* kd_all = kd ? arena.get<float>(counted) : nullptr;
  float* row_lse = ce ? arena.get<float>(R) : nullptr;
  int32_t* row_y = ce ? arena.get<int32_t>(R) : nullptr;
  float* tmp = arena.get<float>(1);
  Head hs = make_head(student_hidden, student_weight, ds), ht = make_head(teacher_hidden, teacher_weight, dt);
  if (gathered) {
    hs.gather = arena.get<char>(R * ds.D * int64_t(hs.esz));
    if (kd) ht.gather = arena.get<char>(R * dt.D * int64_t(ht.esz));
  }
  const Grads g = plan_grads(hs, want_dh ? dstudent_hidden.data : nullptr,
                             want_dw ? dstudent_weight.data : nullptr, R, gathered, arena);
  fill_stats(params.stats, counted, R, arena);

  // ---- the chunks ----
  const Level L = level();
  zero_ignored_rows(hs, g, y, ignore, N);
  const float ce_scale = counted > 0 ? float(double(params.dloss) * alpha / double(counted)) : 0.0f;
  for (int64_t c0 = 0; c0 < counted; c0 += R) {
    const int64_t r = std::min(R, counted - c0);
    const int64_t* ix = idx + c0;
    const bool consecutive = ix[r - 1] - ix[0] == r - 1;
    const void* a = chunk_input(hs, ix, r, consecutive);
    logits_gemm(hs, a, r, S, pool);
    const TensorView sv = f32_view(S, {r, V}), tv = f32_view(tmp, {1});
    if (ce) {
      for (int64_t i = 0; i < r; ++i) row_y[i] = y[ix[i]];
      const TensorView yv = make_view(row_y, DType::I32, Device{}, {r});
      const TensorView lv = f32_view(ce_all + c0, {r}), ev = f32_view(row_lse, {r});
      if (grads)  // into C while the KD gradient overwrites S, or into S when there is no KD term
        cross_entropy_fused_cpu(sv, yv, ignore, LossReduction::Sum, ce_scale, lv, ev, tv,
                                kd ? f32_view(C, {r, V}) : sv, pool);
      else
        cross_entropy_forward_cpu(sv, yv, ignore, LossReduction::Sum, lv, ev, tv, pool);
    }
    if (kd) {
      logits_gemm(ht, chunk_input(ht, ix, r, consecutive), r, Tl, pool);
      const TensorView tlv = f32_view(Tl, {r, V}), lv = f32_view(kd_all + c0, {r});
      if (grads) {
        // distill_fused_cpu scales by dloss * T / r (every row of the chunk counts): hand it the
        // share that makes that dloss * (1 - alpha) * T / #counted.
        const float kd_dloss = float(double(params.dloss) * (1.0 - alpha) * double(r) / double(counted));
        distill_fused_cpu(sv, tlv, TensorView{}, dp, kd_dloss, lv, tv, sv, pool);
      } else {
        distill_forward_cpu(sv, tlv, TensorView{}, dp, lv, tv, pool);
      }
    }
    if (grads) {
      if (ce && kd) add_par(S, C, r * V, pool);
      chunk_backward(hs, g, S, a, ix, r, consecutive, c0 == 0, L, pool);
    }
  }
  finish_grads(hs, g, counted > 0, L, pool);

  double ce_sum = 0, kd_sum = 0;
  for (int64_t i = 0; i < counted; ++i) {
    if (ce) ce_sum += ce_all[i];
    if (kd) kd_sum += kd_all[i];
  }
  double total = 0;
  if (counted > 0) {
    if (ce) total += alpha * (ce_sum / double(counted));
    if (kd) total += (1.0 - alpha) * (kd_sum / double(counted));
  }
  loss.ptr<float>()[0] = float(total);
  if (want_losses) {
    float* lo = losses.ptr<float>();
    std::fill(lo, lo + N, 0.0f);
    for (int64_t i = 0; i < counted; ++i) {
      double v = 0;
      if (ce) v += alpha * double(ce_all[i]);
      if (kd) v += (1.0 - alpha) * double(kd_all[i]);
      lo[idx[i]] = float(v);
    }
  }
}

}  // namespace tk
