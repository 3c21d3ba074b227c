// Tests of cuda/gemm_kernels (gemm_cuda through cuBLASLt) against the double reference of native/ref.
//
// - Every combination of operand dtype (f32, bf16, f16) x C dtype (f32, bf16) x transposes (NN, NT,
//   TN, TT) x batch mode (one matrix, a strided batch of 3, A broadcast, B broadcast), each on an
//   M x N x K taken in turn from ten odd shapes built of 1, 7, 33, 65, 97, 130, 257 and 1025, with
//   leading dimensions beyond the minimum, alpha != 1 and beta either 0 or not. Then: C starting
//   as NaN with beta = 0 (must not leak), a broadcast C (batch stride 0: the matrices one after
//   the other, accumulating with beta = 1, as gemm_cpu does), K = 0 (C = beta C), operands at
//   addresses only 2- or 4-byte aligned (cuBLASLt must be told, or it picks vector loads that
//   fault or misread), and sizes that cross cuBLASLt's tiles (1025 x 257 x 1031).
// - Every C sits between guard bytes in device memory and the padding columns of C (ldc > N) must
//   be untouched.
// - Tolerances (nmse against the reference on the same, already rounded, inputs):
//     f32 C: 1e-10. fp32 accumulation sits near 1e-13 here; TF32 (10-bit mantissas) would give
//       ~1e-7, so this also proves TF32 is off by default.
//     bf16 C: 3 x the error of rounding the exact result to bf16 (a naive bf16 kernel's error, the
//       figure every bf16 output carries) + 1e-10: only roundings that the fp32 accumulation flips
//       near a midpoint may differ, and they cost no more than the naive rounding there.
// - Without cuBLASLt in the build, gemm_cuda must throw the tk::Error that says how to get it
//   (checked even without a device: the error comes before any CUDA call).
// - --perf: TFLOP/s of bf16 and fp32 (TF32 off and on) GEMMs, square and transformer-like shapes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/cuda/gemm_kernels.h"
#include "native/ref/gemm_ref.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;
using tk::test::cuda::DeviceBuffer;

namespace {

// Device memory with 256 guard bytes on both sides and the payload at a chosen misalignment.
class DeviceGuarded {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  DeviceGuarded(size_t bytes, size_t misalign = 0)
      : bytes_(bytes), off_(kGuard + misalign), buf_(kGuard + misalign + bytes + kGuard, DType::U8) {
    tk::test::cuda::check(cudaMemset(buf_.data(), kPattern, buf_.bytes()), "cudaMemset");
  }
  void* data() const { return static_cast<unsigned char*>(buf_.data()) + off_; }
  void upload(const void* src) {
    tk::test::cuda::check(cudaMemcpy(data(), src, bytes_, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> all = buf_.raw();
    return std::vector<unsigned char>(all.begin() + long(off_), all.begin() + long(off_ + bytes_));
  }
  bool intact() const {
    std::vector<unsigned char> all = buf_.raw();
    for (size_t i = 0; i < off_; ++i)
      if (all[i] != kPattern) return false;
    for (size_t i = off_ + bytes_; i < all.size(); ++i)
      if (all[i] != kPattern) return false;
    return true;
  }

 private:
  size_t bytes_, off_;
  DeviceBuffer buf_;
};

std::vector<double> round_to(const std::vector<double>& v, DType t) {
  std::vector<unsigned char> tmp(v.size() * dtype_size(t));
  from_double(v, tmp.data(), t);
  return to_double(tmp.data(), t, v.size());
}

struct Case {
  int64_t batch = 1, M = 1, N = 1, K = 1;
  DType ab = DType::F32, c = DType::F32;
  bool ta = false, tb = false;
  int64_t pad_a = 0, pad_b = 0, pad_c = 0;
  bool bcast_a = false, bcast_b = false, bcast_c = false;
  float alpha = 1.0f, beta = 0.0f;
  bool nan_c = false;
  size_t misalign = 0;  // bytes added to every operand's address
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "cuda gemm b%lld %lldx%lldx%lld ab=%s c=%s %s%s lda+%lld ldb+%lld ldc+%lld%s%s%s a=%g b=%g%s%s",
                (long long)c.batch, (long long)c.M, (long long)c.N, (long long)c.K, dtype_name(c.ab), dtype_name(c.c),
                c.ta ? "T" : "N", c.tb ? "T" : "N", (long long)c.pad_a, (long long)c.pad_b, (long long)c.pad_c,
                c.bcast_a ? " bcastA" : "", c.bcast_b ? " bcastB" : "", c.bcast_c ? " bcastC" : "", c.alpha, c.beta,
                c.nan_c ? " nanC" : "", c.misalign ? " misaligned" : "");
  return buf;
}

void run_case(Context& ctx, const Case& cs, uint64_t seed) {
  const size_t esz = dtype_size(cs.ab), csz = dtype_size(cs.c);
  GemmParams p;
  p.batch = cs.batch;
  p.M = cs.M;
  p.N = cs.N;
  p.K = cs.K;
  p.ab_dtype = cs.ab;
  p.c_dtype = cs.c;
  p.trans_a = cs.ta;
  p.trans_b = cs.tb;
  p.alpha = cs.alpha;
  p.beta = cs.beta;
  const int64_t ar = cs.ta ? cs.K : cs.M, acol = cs.ta ? cs.M : cs.K;
  const int64_t br = cs.tb ? cs.N : cs.K, bcol = cs.tb ? cs.K : cs.N;
  p.lda = std::max<int64_t>(acol + cs.pad_a, 1);
  p.ldb = std::max<int64_t>(bcol + cs.pad_b, 1);
  p.ldc = cs.N + cs.pad_c;
  p.batch_stride_a = cs.bcast_a ? 0 : ar * p.lda;
  p.batch_stride_b = cs.bcast_b ? 0 : br * p.ldb;
  p.batch_stride_c = cs.bcast_c ? 0 : cs.M * p.ldc;
  const int64_t na = (cs.bcast_a ? 1 : cs.batch) * ar * p.lda, nb = (cs.bcast_b ? 1 : cs.batch) * br * p.ldb;
  const int64_t nc = (cs.bcast_c ? 1 : cs.batch) * cs.M * p.ldc;

  std::vector<unsigned char> a(size_t(na) * esz + 1), b(size_t(nb) * esz + 1), c0(size_t(nc) * csz + 1);
  from_double(randn(size_t(na), seed), a.data(), cs.ab);
  from_double(randn(size_t(nb), seed + 1), b.data(), cs.ab);
  if (cs.nan_c) std::memset(c0.data(), 0xff, c0.size());
  else from_double(randn(size_t(nc), seed + 2), c0.data(), cs.c);

  // The reference reads f16 operands widened to f32 (exact), which gemm_ref's loader expects.
  std::vector<unsigned char> a32, b32;
  GemmParams hp = p;
  hp.A = a.data();
  hp.B = b.data();
  hp.C = c0.data();
  if (cs.ab == DType::F16) {
    a32.resize(size_t(na) * 4 + 4);
    b32.resize(size_t(nb) * 4 + 4);
    from_double(to_double(a.data(), DType::F16, size_t(na)), a32.data(), DType::F32);
    from_double(to_double(b.data(), DType::F16, size_t(nb)), b32.data(), DType::F32);
    hp.A = a32.data();
    hp.B = b32.data();
    hp.ab_dtype = DType::F32;
  }
  std::vector<double> want;
  if (cs.bcast_c) {
    // One matrix after the other: C <- alpha P_b + beta C.
    GemmParams h0 = hp;
    h0.beta = 0.0f;
    h0.batch_stride_c = cs.M * p.ldc;  // the reference needs distinct outputs; it never writes C
    const std::vector<double> prods = ref::gemm(h0);
    std::vector<double> cur(size_t(cs.M * cs.N));
    const std::vector<double> cv = to_double(c0.data(), cs.c, size_t(nc));
    for (int64_t i = 0; i < cs.M; ++i)
      for (int64_t j = 0; j < cs.N; ++j) cur[size_t(i * cs.N + j)] = cv[size_t(i * p.ldc + j)];
    for (int64_t bb = 0; bb < cs.batch; ++bb)
      for (size_t e = 0; e < cur.size(); ++e)
        cur[e] = prods[size_t(bb) * cur.size() + e] + (cs.beta != 0.0f ? double(cs.beta) * cur[e] : 0.0);
    want = cur;
  } else {
    want = ref::gemm(hp);
  }

  DeviceGuarded da(size_t(na) * esz, cs.misalign), db(size_t(nb) * esz, cs.misalign),
      dc(size_t(nc) * csz, cs.misalign);
  da.upload(a.data());
  db.upload(b.data());
  dc.upload(c0.data());
  GemmParams dp = p;
  dp.A = da.data();
  dp.B = db.data();
  dp.C = dc.data();
  const std::string what = describe(cs);
  try {
    gemm_cuda(dp, nullptr);
    tk::test::cuda::check(cudaDeviceSynchronize(), "gemm_cuda");
  } catch (const std::exception& e) {
    ctx.check(false, what + ": threw " + e.what());
    return;
  }
  const std::vector<unsigned char> out = dc.download();
  const std::vector<double> all = to_double(out.data(), cs.c, size_t(nc));
  std::vector<double> got;
  bool pad_ok = true;
  const int64_t mats = cs.bcast_c ? 1 : cs.batch;
  for (int64_t bb = 0; bb < mats; ++bb)
    for (int64_t i = 0; i < cs.M; ++i) {
      for (int64_t j = 0; j < cs.N; ++j) got.push_back(all[size_t((bb * cs.M + i) * p.ldc + j)]);
      const size_t pad0 = size_t((bb * cs.M + i) * p.ldc + cs.N) * csz;
      const size_t pad1 = size_t((bb * cs.M + i + 1) * p.ldc) * csz;
      pad_ok = pad_ok && std::memcmp(out.data() + pad0, c0.data() + pad0, pad1 - pad0) == 0;
    }
  ctx.check(dc.intact() && da.intact() && db.intact(), what + ": guards intact");
  ctx.check(pad_ok, what + ": padding columns of C untouched");
  if (cs.c == DType::F32) {
    ctx.check_nmse(what, got, want, 1e-10);
  } else {
    const double naive = nmse(round_to(want, DType::BF16), want);
    ctx.check_nmse(what, got, want, 3.0 * naive + 1e-10);
  }
}

// Without cuBLASLt: the clear error, before any CUDA call (so this runs without a device too).
TK_TEST(cuda_gemm_without_cublaslt_says_how_to_get_it) {
  if (tk::cuda::has_cublaslt()) return;
  GemmParams p;
  p.M = p.N = p.K = 4;
  std::string msg;
  try {
    gemm_cuda(p, nullptr);
  } catch (const Error& e) {
    msg = e.what();
  }
  ctx.check(msg.find("no cuBLASLt") != std::string::npos && msg.find("cublasLt.h") != std::string::npos &&
                msg.find("libcublas-dev") != std::string::npos,
            "gemm_cuda without cuBLASLt throws a tk::Error naming cublasLt.h and libcublas-dev (got \"" + msg + "\")");
}

TK_TEST(cuda_gemm_matches_ref) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {{1, 1, 1},   {7, 97, 1},   {97, 7, 257}, {1, 257, 97}, {257, 1, 7},
                          {97, 257, 7}, {7, 7, 1025}, {33, 65, 130}, {257, 97, 97}, {1, 1025, 33}};
  const DType abs[] = {DType::F32, DType::BF16, DType::F16};
  const DType cts[] = {DType::F32, DType::BF16};
  size_t next = 0;
  uint64_t seed = 1;
  for (DType ab : abs)
    for (DType ct : cts)
      for (int tr = 0; tr < 4; ++tr)
        for (int mode = 0; mode < 4; ++mode) {  // single, strided batch, broadcast A, broadcast B
          const Shape& s = shapes[next++ % (sizeof shapes / sizeof shapes[0])];
          Case c;
          c.M = s.M;
          c.N = s.N;
          c.K = s.K;
          c.ab = ab;
          c.c = ct;
          c.ta = tr & 1;
          c.tb = (tr >> 1) & 1;
          c.batch = mode == 0 ? 1 : 3;
          c.bcast_a = mode == 2;
          c.bcast_b = mode == 3;
          c.pad_a = int64_t(next % 3);
          c.pad_b = int64_t((next + 1) % 3) * 2;
          c.pad_c = int64_t((next + 2) % 3);
          c.alpha = next % 2 ? 0.75f : 1.0f;
          c.beta = (next / 2) % 2 ? 0.5f : 0.0f;
          run_case(ctx, c, seed);
          seed += 3;
        }
}

TK_TEST(cuda_gemm_edge_cases) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  uint64_t seed = 1000;
  for (DType ab : {DType::F32, DType::BF16})
    for (DType ct : {DType::F32, DType::BF16}) {
      Case c;
      c.ab = ab;
      c.c = ct;
      // C full of NaN, beta = 0: the old contents must not leak in.
      c.M = 97, c.N = 33, c.K = 65, c.pad_c = 3, c.nan_c = true, c.alpha = 1.5f;
      run_case(ctx, c, seed += 3);
      // K = 0: C = beta C, and zeros (not NaN) for beta = 0.
      Case k0 = c;
      k0.K = 0;
      run_case(ctx, k0, seed += 3);
      k0.nan_c = false;
      k0.beta = 0.5f;
      k0.batch = 2;
      run_case(ctx, k0, seed += 3);
      // Addresses aligned to 2 (bf16) or 4 (f32) bytes only.
      Case mis;
      mis.ab = ab;
      mis.c = ct;
      mis.M = 65, mis.N = 130, mis.K = 257, mis.misalign = dtype_size(ab) == 2 && ct == DType::BF16 ? 2 : 4;
      mis.beta = 0.25f;
      mis.batch = 2;
      mis.tb = true;
      run_case(ctx, mis, seed += 3);
      // Larger than any tile in every dimension, odd everywhere.
      Case big;
      big.ab = ab;
      big.c = ct;
      big.M = 1025, big.N = 257, big.K = 1031, big.ta = true, big.pad_c = 1, big.beta = 1.0f;
      run_case(ctx, big, seed += 3);
    }
  // Broadcast C: the batch accumulates into one matrix (beta = 1), or the last product wins (beta = 0).
  for (float beta : {1.0f, 0.0f}) {
    Case c;
    c.batch = 4, c.M = 31, c.N = 17, c.K = 45, c.bcast_c = true, c.beta = beta, c.alpha = 0.5f;
    run_case(ctx, c, seed += 3);
    c.ab = DType::BF16;
    run_case(ctx, c, seed += 3);
  }
}

TK_TEST(cuda_gemm_rejects_bad_arguments) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  DeviceBuffer a(64, DType::F32), b(64, DType::F32), c(64, DType::F32);
  auto throws = [](const GemmParams& p) {
    try {
      gemm_cuda(p, nullptr);
    } catch (const Error&) {
      return true;
    }
    return false;
  };
  GemmParams p;
  p.M = p.N = p.K = 4;
  p.A = a.data();
  p.B = b.data();
  p.C = c.data();
  p.lda = p.ldb = p.ldc = 4;
  ctx.check(!throws(p), "cuda gemm accepts a valid 4x4x4 product");
  GemmParams q = p;
  q.lda = 3;
  ctx.check(throws(q), "cuda gemm rejects lda < K");
  q = p;
  q.trans_b = true;
  q.ldb = 3;
  ctx.check(throws(q), "cuda gemm rejects ldb < K for a transposed B");
  q = p;
  q.ldc = 3;
  ctx.check(throws(q), "cuda gemm rejects ldc < N");
  q = p;
  q.c_dtype = DType::F16;
  ctx.check(throws(q), "cuda gemm rejects an f16 C");
  q = p;
  q.ab_dtype = DType::I32;
  ctx.check(throws(q), "cuda gemm rejects i32 operands");
  q = p;
  q.batch = 2;
  q.batch_stride_c = 8;
  ctx.check(throws(q), "cuda gemm rejects overlapping C matrices");
  q = p;
  q.M = -1;
  ctx.check(throws(q), "cuda gemm rejects a negative size");
  GemmBSource src;
  q = p;
  q.b_source = &src;
  ctx.check(throws(q), "cuda gemm rejects a packing B source");
  q = p;
  q.M = 0;
  q.A = q.B = q.C = nullptr;
  ctx.check(!throws(q), "cuda gemm with M = 0 does nothing");
}

// ==== --perf ==========================================================================================

// Best time (seconds) of fn over `reps` runs after two warm-ups, timed with events on the legacy
// stream (the GEMMs run there).
double gpu_best(const std::function<void()>& fn, int reps = 10) {
  cudaEvent_t e0, e1;
  tk::test::cuda::check(cudaEventCreate(&e0), "cudaEventCreate");
  tk::test::cuda::check(cudaEventCreate(&e1), "cudaEventCreate");
  fn();
  fn();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0, nullptr);
    fn();
    cudaEventRecord(e1, nullptr);
    tk::test::cuda::check(cudaEventSynchronize(e1), "gemm");
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    best = std::min(best, double(ms) * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best;
}

TK_TEST(cuda_gemm_perf) {
  if (!tk::test::cuda::available() || !tk::cuda::has_cublaslt()) return;
  struct Shape { int64_t M, N, K; bool tb; const char* what; };
  const Shape shapes[] = {{4096, 4096, 4096, false, "square"},
                          {8192, 8192, 8192, false, "square"},
                          {4096, 11008, 4096, true, "x W^T (MLP up)"},
                          {4096, 4096, 11008, false, "dy W (MLP down grad)"},
                          {16, 4096, 4096, true, "decode-like"}};
  struct Kind { DType ab, c; bool tf32; };
  const Kind kinds[] = {{DType::BF16, DType::BF16, false}, {DType::BF16, DType::F32, false},
                        {DType::F32, DType::F32, false},   {DType::F32, DType::F32, true}};
  const tk::cuda::DeviceProps props = tk::cuda::device_props(0);
  std::printf("  perf cuda gemm on %s (best of 10, cuBLASLt):\n", props.name.c_str());
  const bool saved = gemm_cuda_tf32_allowed();
  for (const Shape& s : shapes)
    for (const Kind& k : kinds) {
      if (k.ab == DType::F32 && s.M == 8192) continue;  // the f32 figure does not change with size
      DeviceBuffer a(size_t(s.M * s.K), k.ab), b(size_t(s.K * s.N), k.ab), c(size_t(s.M * s.N), k.c);
      a.set(randn(size_t(s.M * s.K), 1));
      b.set(randn(size_t(s.K * s.N), 2));
      GemmParams p;
      p.M = s.M, p.N = s.N, p.K = s.K, p.ab_dtype = k.ab, p.c_dtype = k.c;
      p.A = a.data(), p.lda = s.K;
      p.B = b.data(), p.trans_b = s.tb, p.ldb = s.tb ? s.K : s.N;
      p.C = c.data(), p.ldc = s.N;
      gemm_cuda_allow_tf32(k.tf32);
      const double t = gpu_best([&] { gemm_cuda(p, nullptr); });
      const double flops = 2.0 * double(s.M) * double(s.N) * double(s.K);
      std::printf("    %5lld x %5lld x %5lld %-22s %-4s -> %-4s%s %9.3f ms %8.1f TFLOP/s\n", (long long)s.M,
                  (long long)s.N, (long long)s.K, s.what, dtype_name(k.ab), dtype_name(k.c), k.tf32 ? " tf32" : "     ",
                  t * 1e3, flops / t * 1e-12);
    }
  gemm_cuda_allow_tf32(saved);
}

}  // namespace
