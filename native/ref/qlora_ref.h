// Naive reference of the QLoRA linear layer (cpu/qlora.h): the oracle of the native tests, never
// used for speed. Everything in double; nothing shared with the kernels but the Philox function of
// core/rng.h (the documented generator) and the NF4 constant tables (via ref/nf4_ref).
// - The weight is dequantized by ref/nf4_ref (double-quantized absmaxes decoded in double).
// - The dropout keep decision is the formula of qlora.h written out on its own: the Philox word of
//   element e, its top 24 bits as a uniform u = (w >> 8 + 1) / 2^24 in double, keep when u > p;
//   kept values are scaled by 1 / (1 - p) in double.
// - Products are plain triple loops.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/nf4.h"

namespace tk::ref {

// The dequantized weight [numel] (row-major [out, in]) of NF4 buffers with layout l.
std::vector<double> qlora_weight_ref(const Nf4In& q, const Nf4Layout& l);

// keep(e) of qlora.h for dropout p (p = 0 keeps everything).
bool qlora_keep_ref(uint64_t seed, uint64_t e, double p);

struct QloraRefProblem {
  int64_t N = 0, in = 0, out = 0, r = 0;
  std::vector<double> x;  // [N, in]
  std::vector<double> w;  // [out, in] (the effective weight)
  std::vector<double> A;  // [r, in]
  std::vector<double> B;  // [out, r]
  double scale = 1.0, dropout = 0.0;
  uint64_t seed = 0;
};

struct QloraRefForward {
  std::vector<double> base;  // [N, out] x w^T
  std::vector<double> lora;  // [N, out] s xa B^T
  std::vector<double> y;     // base + lora
  std::vector<double> xa;    // [N, r] drop(x) A^T
};
QloraRefForward qlora_forward_ref(const QloraRefProblem& p);

struct QloraRefGrads {
  std::vector<double> dx_base;  // [N, in] dy w
  std::vector<double> dx_lora;  // [N, in] s drop'((dy B) A)
  std::vector<double> dx;       // dx_base + dx_lora
  std::vector<double> dA;       // [r, in] s (dy B)^T drop(x)
  std::vector<double> dB;       // [out, r] s dy^T xa
};
// dy [N, out].
QloraRefGrads qlora_backward_ref(const QloraRefProblem& p, const std::vector<double>& dy);

}  // namespace tk::ref
