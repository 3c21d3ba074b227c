// Shared between gemm.cpp (blocking, packing, threading) and the per-ISA micro-kernel files.
//
// Every kernel family works on packed panels:
//   A panel: MR rows of op(A) x kc columns, stored k-major so one k step reads MR consecutive values
//            (the values a kernel broadcasts).
//   B panel: kc rows of op(B) x NR columns, stored k-major so one k step reads NR consecutive values
//            (whole vectors).
// Panels are zero-padded to MR / NR, so kernels never branch on edges inside the k loop; they only
// mask the final store. Two element formats exist:
//   F32        panel[k][w]             fp32 (bf16 inputs are widened while packing)
//   Bf16Pairs  panel[k/2][w][2]        bf16, each 32-bit word holds (X[k][w], X[k+1][w]) so one
//                                      vdpbf16ps lane consumes a k pair; odd kc pads a zero k.
// The kernel epilogue is C[0:m, 0:n] = alpha * acc + beta * C in fp32, where beta == 0 never reads C
// (so NaN garbage in C is ignored). gemm.cpp passes beta = 1 for the second and later K blocks.
#pragma once
#include <cstdint>

#include "gemm.h"

namespace tk::gemm_detail {

enum class PackFmt : int { F32 = 0, Bf16Pairs = 1 };

// A strided view of a 2-D operand as the packers see it: element (w, k) -- w runs along the panel
// width (M for A, N for B), k along the reduction -- lives at base + w * sw + k * sk (in elements).
struct PanelSrc {
  const void* base;
  DType dtype;     // F32 | BF16
  int64_t sw, sk;  // one of them is 1 for every layout GemmParams can describe
};

// Micro-kernel: C tile (m <= MR rows, n <= NR columns, row stride ldc) from one A and one B panel.
//   Ap [kc][MR] (or [ceil(kc/2)][MR][2] bf16), Bp [kc][NR] (or [ceil(kc/2)][NR][2]).
using MicroKernel = void (*)(int64_t kc, const void* Ap, const void* Bp, float* C, int64_t ldc, int m, int n,
                             float alpha, float beta);

// Packs the columns [w0, w0 + width) x depth [k0, k0 + kc) of src as ceil(width / W) consecutive
// panels of width W (the last one zero-padded), each panel_bytes(fmt, kc, W) long, into dst.
using PanelPacker = void (*)(const PanelSrc& src, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                             void* dst);

// Everything gemm.cpp needs to know about one kernel family.
struct KernelSet {
  const char* name = nullptr;
  int mr = 0, nr = 0;
  PackFmt fmt = PackFmt::F32;
  MicroKernel kernel = nullptr;
  // Packs A and B panels into this family's format (ISA-specific fast paths where they pay, the
  // generic packer for the rest).
  PanelPacker pack = nullptr;
  // bf16 output: C[m][n] = bf16(alpha * acc + beta * C), acc fp32 with row stride ld_acc.
  void (*store_bf16)(const float* acc, int64_t ld_acc, uint16_t* c, int64_t ldc, int64_t m, int64_t n, float alpha,
                     float beta) = nullptr;
  // Cache blocking: kc (multiple of 2), mc (multiple of mr), nc (multiple of nr).
  int kc = 0, mc = 0, nc = 0;
};

// Kernel families; each returns false when the file was compiled for a target without them.
bool kernels_portable_f32(KernelSet* ks);
bool kernels_avx2_f32(KernelSet* ks);
bool kernels_avx512_f32(KernelSet* ks);
bool kernels_avx512_bf16(KernelSet* ks);

// The generic (any-ISA) packers, one per format; ISA packers hand them the layouts they skip.
void pack_panels_f32_generic(const PanelSrc& src, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                             void* dst);
void pack_panels_bf16pairs_generic(const PanelSrc& src, int64_t w0, int64_t width, int64_t k0, int64_t kc, int W,
                                   void* dst);

void store_bf16_generic(const float* acc, int64_t ld_acc, uint16_t* c, int64_t ldc, int64_t m, int64_t n, float alpha,
                        float beta);

// Rows of the packed panel for a given depth: kc for F32, ceil(kc/2) pairs (two u16 each) for bf16.
inline int64_t packed_depth(PackFmt fmt, int64_t kc) { return fmt == PackFmt::F32 ? kc : (kc + 1) / 2; }
// Bytes of one packed panel of width W and depth kc (both formats use 4 bytes per (k-row, w) slot).
inline int64_t panel_bytes(PackFmt fmt, int64_t kc, int W) { return packed_depth(fmt, kc) * W * 4; }

}  // namespace tk::gemm_detail
