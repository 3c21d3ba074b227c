// Reference GEMM (see gemm_ref.h). Each matrix's op(A) and op(B)^T are first widened into dense
// double arrays so the product itself is a plain dot product per element of C.
#include "gemm_ref.h"

#include <cstddef>

namespace tk::ref {

namespace {

double load(const void* base, DType t, int64_t idx) {
  if (t == DType::F32) return static_cast<const float*>(base)[idx];
  return bf16_to_f32(static_cast<const uint16_t*>(base)[idx]);
}

}  // namespace

std::vector<double> gemm(const GemmParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  std::vector<double> out(size_t(p.batch * M * N), 0.0);
  std::vector<double> a(size_t(M * K)), bt(size_t(N * K));  // op(A) [M][K], op(B)^T [N][K]
  const size_t esz = dtype_size(p.ab_dtype), csz = dtype_size(p.c_dtype);
  for (int64_t b = 0; b < p.batch; ++b) {
    const char* A = static_cast<const char*>(p.A) + size_t(b * p.batch_stride_a) * esz;
    const char* B = static_cast<const char*>(p.B) + size_t(b * p.batch_stride_b) * esz;
    const char* C = static_cast<const char*>(p.C) + size_t(b * p.batch_stride_c) * csz;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) a[i * K + k] = load(A, p.ab_dtype, p.trans_a ? k * p.lda + i : i * p.lda + k);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) bt[j * K + k] = load(B, p.ab_dtype, p.trans_b ? j * p.ldb + k : k * p.ldb + j);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k) s += a[i * K + k] * bt[j * K + k];
        double c = double(p.alpha) * s;
        // beta == 0 means "C is not an input": its old contents (NaN included) must not leak in.
        if (p.beta != 0.0f) c += double(p.beta) * load(C, p.c_dtype, i * p.ldc + j);
        out[size_t((b * M + i) * N + j)] = c;
      }
  }
  return out;
}

}  // namespace tk::ref
