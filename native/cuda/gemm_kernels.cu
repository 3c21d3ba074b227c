// cuBLASLt GEMM (see gemm_kernels.h for the contract and the design).
#include "gemm_kernels.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/error.h"
#include "check.cuh"

#ifdef TUNEKIT_WITH_CUBLASLT
#include <cublasLt.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "internal.cuh"
#endif

namespace tk {

namespace {

// -1: not decided yet (the environment is read at the first query).
std::atomic<int> g_tf32{-1};

}  // namespace

void gemm_cuda_allow_tf32(bool allow) { g_tf32.store(allow ? 1 : 0); }

bool gemm_cuda_tf32_allowed() {
  int v = g_tf32.load();
  if (v < 0) {
    const char* env = std::getenv("TUNEKIT_CUDA_TF32");
    const int want = env && std::strcmp(env, "1") == 0 ? 1 : 0;
    g_tf32.compare_exchange_strong(v, want);  // loses only to an explicit gemm_cuda_allow_tf32
    v = g_tf32.load();
  }
  return v == 1;
}

#ifndef TUNEKIT_WITH_CUBLASLT

void gemm_cuda(const GemmParams&, void*) {
  fail("gemm_cuda: this build of tunekit has no cuBLASLt: rebuild with a CUDA toolkit that has cublasLt.h (the "
       "libcublas-dev package, e.g. libcublas-dev-12-x from NVIDIA's apt repository, or the full CUDA toolkit "
       "installer), so that CMake finds cublasLt.h and the cublasLt library and compiles the GEMM path "
       "(tk.info().cuda.cublas tells whether a build has it)");
}

#else  // TUNEKIT_WITH_CUBLASLT

namespace {

constexpr size_t kMaxWorkspace = size_t(32) << 20;
constexpr size_t kMaxPlans = 4096;
constexpr int kHeuristicResults = 8;

// ---- small helpers -------------------------------------------------------------------------------

std::string shape_text(const GemmParams& p) {
  std::ostringstream os;
  os << "[batch " << p.batch << ", M " << p.M << ", N " << p.N << ", K " << p.K << "] A " << dtype_name(p.ab_dtype)
     << (p.trans_a ? " (transposed)" : "") << " lda " << p.lda << ", B " << dtype_name(p.ab_dtype)
     << (p.trans_b ? " (transposed)" : "") << " ldb " << p.ldb << ", C " << dtype_name(p.c_dtype) << " ldc " << p.ldc;
  return os.str();
}

std::string status_text(cublasStatus_t s) {
  return std::string(cublasLtGetStatusName(s)) + " (" + cublasLtGetStatusString(s) + ")";
}

void lt_check(cublasStatus_t s, const char* call, const GemmParams& p) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  // A failed launch inside cuBLASLt may also be latched as the CUDA runtime's last error; clear it
  // so the queue does not report it a second time (a sticky error stays and is reported anyway).
  cudaGetLastError();
  fail("gemm_cuda: ", call, " failed: ", status_text(s), " for ", shape_text(p));
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// The largest power of two (<= 256) that divides the pointer and every row and batch offset from
// it: what cuBLASLt may assume about the alignment of every row it loads.
uint32_t alignment(const void* ptr, int64_t ld, int64_t stride, int64_t batch, size_t es) {
  uint64_t bits = uint64_t(reinterpret_cast<uintptr_t>(ptr)) | 256u | (uint64_t(ld) * es);
  if (batch > 1 && stride != 0) bits |= uint64_t(stride) * es;
  return uint32_t(bits & (~bits + 1));
}

// Scratch device memory for work on `stream`, from the caching allocator; returned to it (for
// later work on the same stream, which the stream orders after this call's kernels) on scope exit.
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

// ---- the small kernels of the paths cuBLASLt does not cover --------------------------------------

// fp32 -> bf16, round to nearest even, NaN kept quiet: core/dtype.h's f32_to_bf16.
__device__ __forceinline__ uint16_t bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ float bf16_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// The matrices of C: rows = batch * M rows of N elements, row r at (r / M) * stride + (r % M) * ld.
// Grid: x over columns, y over rows, both grid-strided.
struct CView {
  int64_t M, N, rows, ld, stride;
  __device__ __forceinline__ int64_t at(int64_t r, int64_t j) const { return (r / M) * stride + (r % M) * ld + j; }
};

// tmp [rows, N] dense fp32 <- C (bf16)    (C's old contents, for beta != 0)
__global__ void widen_c_kernel(const uint16_t* c, CView v, float* tmp) {
  for (int64_t r = blockIdx.y; r < v.rows; r += gridDim.y)
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < v.N; j += int64_t(gridDim.x) * blockDim.x)
      tmp[r * v.N + j] = bf16_f32(c[v.at(r, j)]);
}

// C (bf16) <- tmp [rows, N] dense fp32, rounded to nearest even
__global__ void narrow_c_kernel(const float* tmp, CView v, uint16_t* c) {
  for (int64_t r = blockIdx.y; r < v.rows; r += gridDim.y)
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < v.N; j += int64_t(gridDim.x) * blockDim.x)
      c[v.at(r, j)] = bf16_rne(tmp[r * v.N + j]);
}

// C = beta * C (K == 0); beta == 0 writes zeros whatever C held.   C: [rows, N] of T (float | bf16 bits)
template <class T>
__global__ void scale_c_kernel(T* c, CView v, float beta) {
  for (int64_t r = blockIdx.y; r < v.rows; r += gridDim.y)
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < v.N; j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t i = v.at(r, j);
      if constexpr (sizeof(T) == 4) {
        c[i] = beta == 0.0f ? 0.0f : beta * c[i];
      } else {
        c[i] = beta == 0.0f ? uint16_t(0) : bf16_rne(beta * bf16_f32(c[i]));
      }
    }
}

dim3 grid_for(const CView& v) {
  const int64_t x = std::min<int64_t>((v.N + 255) / 256, 64);
  const int64_t y = std::min<int64_t>(v.rows, 65535);
  return dim3(unsigned(std::max<int64_t>(x, 1)), unsigned(std::max<int64_t>(y, 1)));
}

// ---- cuBLASLt state ------------------------------------------------------------------------------

// One handle per device, created on first use, kept for the life of the process (destroying it at
// exit could run after the CUDA runtime has shut down).
cublasLtHandle_t handle_for(int device) {
  static std::mutex* mu = new std::mutex();
  static std::vector<cublasLtHandle_t>* handles = new std::vector<cublasLtHandle_t>();
  std::lock_guard<std::mutex> lk(*mu);
  if (size_t(device) >= handles->size()) handles->resize(size_t(device) + 1, nullptr);
  cublasLtHandle_t& h = (*handles)[size_t(device)];
  if (!h) {
    cublasStatus_t s = cublasLtCreate(&h);
    if (s != CUBLAS_STATUS_SUCCESS) {
      h = nullptr;
      cudaGetLastError();
      fail("gemm_cuda: cublasLtCreate failed on cuda:", device, ": ", status_text(s));
    }
  }
  return h;
}

// The problem in cuBLASLt's column-major terms: D (m x n) = op(A) (m x k) op(B) (k x n), where A
// is our B and B is our A (see the header).
struct LtProblem {
  int device = 0;
  cudaDataType_t ab = CUDA_R_32F, c = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  bool trans_a = false, trans_b = false;
  uint64_t a_rows = 0, a_cols = 0, b_rows = 0, b_cols = 0, m = 0, n = 0;
  int64_t lda = 0, ldb = 0, ldc = 0, stride_a = 0, stride_b = 0, stride_c = 0;
  int32_t batch = 1;
  uint32_t align_a = 256, align_b = 256, align_c = 256;
  uint32_t reduction_mask = 0;

  using Key = std::array<int64_t, 24>;
  Key key() const {
    return Key{device,        int64_t(ab),      int64_t(c),       int64_t(compute), trans_a,
               trans_b,       int64_t(a_rows),  int64_t(a_cols),  int64_t(b_rows),  int64_t(b_cols),
               int64_t(m),    int64_t(n),       lda,              ldb,              ldc,
               stride_a,      stride_b,         stride_c,         batch,            align_a,
               align_b,       align_c,          reduction_mask,   0};
  }
};

// Descriptors and the chosen algorithm of one problem. Immutable once built, so threads share it.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct PreferenceGuard {
  cublasLtMatmulPreference_t pref = nullptr;
  ~PreferenceGuard() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
  }
};

cublasLtMatrixLayout_t make_layout(cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld, int32_t batch,
                                   int64_t stride, const GemmParams& p) {
  cublasLtMatrixLayout_t l = nullptr;
  lt_check(cublasLtMatrixLayoutCreate(&l, t, rows, cols, ld), "cublasLtMatrixLayoutCreate", p);
  if (batch > 1) {
    cublasStatus_t s = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch);
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride);
    if (s != CUBLAS_STATUS_SUCCESS) {
      cublasLtMatrixLayoutDestroy(l);
      lt_check(s, "cublasLtMatrixLayoutSetAttribute", p);
    }
  }
  return l;
}

std::shared_ptr<const Plan> make_plan(cublasLtHandle_t h, const LtProblem& q, const GemmParams& p) {
  auto plan = std::make_shared<Plan>();
  lt_check(cublasLtMatmulDescCreate(&plan->op, q.compute, CUDA_R_32F), "cublasLtMatmulDescCreate", p);
  const int32_t op_a = q.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = q.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a),
           "cublasLtMatmulDescSetAttribute(TRANSA)", p);
  lt_check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b),
           "cublasLtMatmulDescSetAttribute(TRANSB)", p);
  plan->a = make_layout(q.ab, q.a_rows, q.a_cols, q.lda, q.batch, q.stride_a, p);
  plan->b = make_layout(q.ab, q.b_rows, q.b_cols, q.ldb, q.batch, q.stride_b, p);
  plan->c = make_layout(q.c, q.m, q.n, q.ldc, q.batch, q.stride_c, p);

  PreferenceGuard g;
  lt_check(cublasLtMatmulPreferenceCreate(&g.pref), "cublasLtMatmulPreferenceCreate", p);
  const uint64_t ws = kMaxWorkspace;
  lt_check(cublasLtMatmulPreferenceSetAttribute(g.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
           "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)", p);
  lt_check(cublasLtMatmulPreferenceSetAttribute(g.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &q.reduction_mask,
                                                sizeof q.reduction_mask),
           "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)", p);
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, q.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, q.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, q.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, q.align_c}};
  for (const auto& al : aligns)
    lt_check(cublasLtMatmulPreferenceSetAttribute(g.pref, al.first, &al.second, sizeof al.second),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)", p);

  cublasLtMatmulHeuristicResult_t results[kHeuristicResults];
  std::memset(results, 0, sizeof results);
  int found = 0;
  lt_check(cublasLtMatmulAlgoGetHeuristic(h, plan->op, plan->a, plan->b, plan->c, plan->c, g.pref, kHeuristicResults,
                                          results, &found),
           "cublasLtMatmulAlgoGetHeuristic", p);
  for (int i = 0; i < found; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > kMaxWorkspace) continue;
    plan->algo = results[i].algo;
    plan->workspace = results[i].workspaceSize;
    return plan;
  }
  fail("gemm_cuda: cuBLASLt has no algorithm for ", shape_text(p), " (alignments A ", q.align_b, " B ", q.align_a,
       " C ", q.align_c, " bytes) on cuda:", q.device);
}

// The cached plan of a problem, built on first use. Building happens outside the lock (heuristics
// take tens of microseconds); two threads racing on a new problem both build, one plan is kept.
std::shared_ptr<const Plan> plan_for(cublasLtHandle_t h, const LtProblem& q, const GemmParams& p) {
  static std::mutex* mu = new std::mutex();
  static auto* cache = new std::map<LtProblem::Key, std::shared_ptr<const Plan>>();
  const LtProblem::Key key = q.key();
  {
    std::lock_guard<std::mutex> lk(*mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  std::shared_ptr<const Plan> plan = make_plan(h, q, p);
  std::lock_guard<std::mutex> lk(*mu);
  if (cache->size() >= kMaxPlans) cache->clear();
  return cache->emplace(key, plan).first->second;
}

// ---- the GEMM ------------------------------------------------------------------------------------

bool native_combination(DType ab, DType c) { return c == DType::F32 || (c == DType::BF16 && ab == DType::BF16); }

// One cublasLtMatmul of p with the output at C (c_dtype, ldc, stride_c), which is p.C or the fp32
// temporary.
void run_matmul(const GemmParams& p, void* C, DType c_dtype, int64_t ldc, int64_t stride_c, cudaStream_t stream,
                int device) {
  const size_t es = dtype_size(p.ab_dtype), cs = dtype_size(c_dtype);
  LtProblem q;
  q.device = device;
  q.ab = cuda_type(p.ab_dtype);
  q.c = cuda_type(c_dtype);
  q.compute = p.ab_dtype == DType::F32 && gemm_cuda_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // cuBLASLt's A is our B: op(A) = op(B)^T is N x K.
  q.trans_a = p.trans_b;
  q.a_rows = uint64_t(p.trans_b ? p.K : p.N);
  q.a_cols = uint64_t(p.trans_b ? p.N : p.K);
  q.lda = p.ldb;
  q.stride_a = p.batch_stride_b;
  // cuBLASLt's B is our A: op(B) = op(A)^T is K x M.
  q.trans_b = p.trans_a;
  q.b_rows = uint64_t(p.trans_a ? p.M : p.K);
  q.b_cols = uint64_t(p.trans_a ? p.K : p.M);
  q.ldb = p.lda;
  q.stride_b = p.batch_stride_a;
  // D = C^T: N x M.
  q.m = uint64_t(p.N);
  q.n = uint64_t(p.M);
  q.ldc = ldc;
  q.stride_c = stride_c;
  q.batch = int32_t(p.batch);
  q.align_a = alignment(p.B, p.ldb, p.batch_stride_b, p.batch, es);
  q.align_b = alignment(p.A, p.lda, p.batch_stride_a, p.batch, es);
  q.align_c = alignment(C, ldc, stride_c, p.batch, cs);
  // Split-K only with partial sums staged in the workspace and reduced in a fixed order, in fp32:
  // the in-place scheme accumulates through the output buffer (in the output's type: every partial
  // sum rounded for a bf16 C) and is not reproducible run to run; the output-type scheme would
  // round partials to bf16. No-split algorithms (scheme NONE) are always allowed.
  q.reduction_mask = c_dtype == DType::F32
                         ? uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE)
                         : uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE);

  cublasLtHandle_t h = handle_for(device);
  std::shared_ptr<const Plan> plan = plan_for(h, q, p);
  Scratch ws(device, plan->workspace, stream);
  const float alpha = p.alpha, beta = p.beta;
  lt_check(cublasLtMatmul(h, plan->op, &alpha, p.B, plan->a, p.A, plan->b, &beta, C, plan->c, C, plan->c,
                          &plan->algo, ws.get(), plan->workspace, stream),
           "cublasLtMatmul", p);
}

// p with a C that is not broadcast (or a batch of one).
void run_one(const GemmParams& p, cudaStream_t stream, int device) {
  const CView cv{p.M, p.N, p.batch * p.M, p.ldc, p.batch_stride_c};
  if (p.K == 0) {
    if (p.c_dtype == DType::F32)
      scale_c_kernel<float><<<grid_for(cv), 256, 0, stream>>>(static_cast<float*>(p.C), cv, p.beta);
    else
      scale_c_kernel<uint16_t><<<grid_for(cv), 256, 0, stream>>>(static_cast<uint16_t*>(p.C), cv, p.beta);
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (native_combination(p.ab_dtype, p.c_dtype)) {
    run_matmul(p, p.C, p.c_dtype, p.ldc, p.batch_stride_c, stream, device);
    return;
  }
  // bf16 C from f32 / f16 operands: fp32 C in a dense temporary, then rounded into C.
  Scratch tmp(device, size_t(p.batch * p.M * p.N) * 4, stream);
  float* t = static_cast<float*>(tmp.get());
  if (p.beta != 0.0f) {
    widen_c_kernel<<<grid_for(cv), 256, 0, stream>>>(static_cast<const uint16_t*>(p.C), cv, t);
    CUDA_CHECK(cudaGetLastError());
  }
  run_matmul(p, t, DType::F32, p.N, p.M * p.N, stream, device);
  narrow_c_kernel<<<grid_for(cv), 256, 0, stream>>>(t, cv, static_cast<uint16_t*>(p.C));
  CUDA_CHECK(cudaGetLastError());
}

void validate(const GemmParams& p) {
  TK_CHECK(p.b_source == nullptr,
           "gemm_cuda: GemmParams::b_source (a B operand that packs itself) is a CPU feature; pass B as a device "
           "matrix");
  TK_CHECK(p.batch >= 0 && p.M >= 0 && p.N >= 0 && p.K >= 0, "gemm_cuda: sizes must be >= 0, got ", shape_text(p));
  TK_CHECK(p.ab_dtype == DType::F32 || p.ab_dtype == DType::BF16 || p.ab_dtype == DType::F16,
           "gemm_cuda: A and B must be f32, bf16 or f16, got ", dtype_name(p.ab_dtype));
  TK_CHECK(p.c_dtype == DType::F32 || p.c_dtype == DType::BF16, "gemm_cuda: C must be f32 or bf16, got ",
           dtype_name(p.c_dtype));
  TK_CHECK(p.batch <= INT_MAX, "gemm_cuda: batch ", p.batch, " exceeds cuBLASLt's limit of ", INT_MAX);
  if (p.batch == 0 || p.M == 0 || p.N == 0) return;
  TK_CHECK(p.C != nullptr, "gemm_cuda: C is null for ", shape_text(p));
  TK_CHECK(p.ldc >= p.N, "gemm_cuda: ldc must be >= N for ", shape_text(p));
  TK_CHECK(p.batch_stride_c >= 0, "gemm_cuda: batch strides must be >= 0 for ", shape_text(p));
  TK_CHECK(p.batch == 1 || p.batch_stride_c == 0 || p.batch_stride_c >= (p.M - 1) * p.ldc + p.N,
           "gemm_cuda: the matrices of C overlap (batch_stride_c ", p.batch_stride_c, ") for ", shape_text(p));
  if (p.K == 0) return;
  TK_CHECK(p.A != nullptr && p.B != nullptr, "gemm_cuda: A or B is null for ", shape_text(p));
  TK_CHECK(p.lda >= (p.trans_a ? p.M : p.K), "gemm_cuda: lda must be >= ", p.trans_a ? "M" : "K", " for ",
           shape_text(p));
  TK_CHECK(p.ldb >= (p.trans_b ? p.K : p.N), "gemm_cuda: ldb must be >= ", p.trans_b ? "K" : "N", " for ",
           shape_text(p));
  TK_CHECK(p.batch_stride_a >= 0 && p.batch_stride_b >= 0, "gemm_cuda: batch strides must be >= 0 for ",
           shape_text(p));
}

}  // namespace

void gemm_cuda(const GemmParams& p, void* stream) {
  validate(p);
  if (p.batch == 0 || p.M == 0 || p.N == 0) return;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.batch == 1 || p.batch_stride_c != 0) {
    run_one(p, st, device);
    return;
  }
  // Broadcast C: the matrices one after the other, in batch order, as gemm_cpu does.
  const size_t es = dtype_size(p.ab_dtype);
  for (int64_t b = 0; b < p.batch; ++b) {
    GemmParams q = p;
    q.batch = 1;
    if (p.K > 0) {
      q.A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * es;
      q.B = static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * es;
    }
    q.batch_stride_a = q.batch_stride_b = q.batch_stride_c = 0;
    run_one(q, st, device);
  }
}

#endif  // TUNEKIT_WITH_CUBLASLT

}  // namespace tk
