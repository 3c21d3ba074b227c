// Portable GEMM micro-kernel: plain C++ the compiler vectorizes for whatever baseline it targets
// (SSE2 on x86-64, NEON on arm64). Always available; the dispatcher falls back to it.
//
// Register tile 4 x 8: 8 accumulator vectors of 4 floats + 2 of B + a broadcast + a product
// temporary (SSE2 has no FMA) = 12 of SSE2's 16 registers. A 6 x 8 tile needs 16 and GCC spills
// accumulators to the stack every k step (checked in the generated code), which costs more than
// the extra B loads of the smaller tile. The accumulators are a fixed-size local array with
// compile-time trip counts, so after full unrolling they live in registers.
#include "gemm_internal.h"

namespace tk::gemm_detail {
namespace {

constexpr int kMR = 4, kNR = 8;

// Ap [kc][4] packed, Bp [kc][8] packed, C [m][n] (row stride ldc) written as alpha*acc + beta*C.
void kernel_f32(int64_t kc, const void* ap, const void* bp, float* c, int64_t ldc, int m, int n, float alpha,
                float beta) {
  const float* __restrict a = static_cast<const float*>(ap);
  const float* __restrict b = static_cast<const float*>(bp);
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    float bk[kNR];
    for (int j = 0; j < kNR; ++j) bk[j] = b[j];
    for (int i = 0; i < kMR; ++i) {
      const float ai = a[i];
      for (int j = 0; j < kNR; ++j) acc[i][j] += ai * bk[j];
    }
    a += kMR;
    b += kNR;
  }
  for (int i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < n; ++j) row[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < n; ++j) row[j] = alpha * acc[i][j] + beta * row[j];
    }
  }
}

}  // namespace

bool kernels_portable_f32(KernelSet* ks) {
  ks->name = "portable-f32-4x8";
  ks->mr = kMR;
  ks->nr = kNR;
  ks->fmt = PackFmt::F32;
  ks->kernel = &kernel_f32;
  ks->pack = &pack_panels_f32_generic;
  ks->store_bf16 = &store_bf16_generic;
  // A 4-row panel and an 8-wide B panel at kc = 256 are 4 KiB + 8 KiB (L1); the A block mc x kc
  // = 256 KiB sits in L2 on any core of the last decade; the B block kc x nc = 2 MiB in L3.
  ks->kc = 256;
  ks->mc = 4 * 64;
  ks->nc = 2048;
  return true;
}

}  // namespace tk::gemm_detail
