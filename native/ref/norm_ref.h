// Naive references for the RMSNorm, SwiGLU and embedding kernels (cpu/norm.h): the oracle of the
// native tests, never used for speed. Inputs and outputs are row-major vectors of double, every
// value is computed from its defining formula in double, one element at a time, with no blocking
// and no SIMD, so the code is obviously right rather than fast. Tests widen kernel inputs (after
// any bf16 rounding) to double, so both sides see exactly the same input values.
#pragma once
#include <cstdint>
#include <vector>

namespace tk::ref {

struct RmsNormForward {
  std::vector<double> y;     // [N, D]
  std::vector<double> rstd;  // [N]
};
// y[n, d] = x[n, d] * rstd[n] * w[d], rstd[n] = 1 / sqrt(mean_d x[n, d]^2 + eps).
// x [N, D], w [D].
RmsNormForward rms_norm_forward(const std::vector<double>& x, const std::vector<double>& w, int64_t N, int64_t D,
                                double eps);

struct RmsNormBackward {
  std::vector<double> dx;       // [N, D]
  std::vector<double> dweight;  // [D]
};
// Gradients of L = sum(dy * y) for y = rms_norm_forward(x, w).y; rstd is recomputed from x.
// dy, x [N, D], w [D].
RmsNormBackward rms_norm_backward(const std::vector<double>& dy, const std::vector<double>& x,
                                  const std::vector<double>& w, int64_t N, int64_t D, double eps);

// sigmoid(g) = 1 / (1 + exp(-g)), evaluated without overflow for any finite g.
double sigmoid(double g);

// out[i] = gate[i] * sigmoid(gate[i]) * up[i]. gate, up [n].
std::vector<double> swiglu_forward(const std::vector<double>& gate, const std::vector<double>& up);

struct SwigluBackward {
  std::vector<double> dgate, dup;  // [n] each
};
// Gradients of L = sum(dout * out) for out = swiglu_forward(gate, up). dout, gate, up [n].
SwigluBackward swiglu_backward(const std::vector<double>& dout, const std::vector<double>& gate,
                               const std::vector<double>& up);

// out[n, :] = table[ids[n], :]. ids [N], table [V, D] -> out [N, D]. Throws tk::Error on an id
// outside [0, V).
std::vector<double> embedding_forward(const std::vector<int32_t>& ids, const std::vector<double>& table, int64_t V,
                                      int64_t D);

// dtable[v, :] = sum of dout[n, :] over n with ids[n] == v. dout [N, D], ids [N] -> dtable [V, D].
std::vector<double> embedding_backward(const std::vector<double>& dout, const std::vector<int32_t>& ids, int64_t V,
                                       int64_t D);

}  // namespace tk::ref
