// Naive references for cpu/rope: the oracle of the native tests, never used for speed.
//
// The inverse frequencies are recomputed here in double, independently of tk::rope_inv_freq,
// straight from the formulas of transformers' modeling_rope_utils (_compute_default_/linear_/
// dynamic_ntk_/yarn_/llama3_ parameters), written in log space where that reads naturally, so that
// a slip in either implementation shows up as a disagreement. The rotation is evaluated element by
// element in double from the tensor's values (read through its strides), for whatever fp32
// frequencies the kernel under test was given.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"
#include "../cpu/rope.h"

namespace tk::ref {

struct RopeFrequencies {
  std::vector<double> inv_freq;  // D/2 entries
  double attention_factor = 1.0;
};

// Same meaning as tk::rope_inv_freq, in double, with no validation beyond what the formulas need.
RopeFrequencies rope_inv_freq(int64_t D, double theta, const RopeScaling& scaling, int64_t seq_len);

// rope(x) for x [B, T, H, D] (any strides, F32/BF16), positions [T] or [B, T] (I32), in double:
// angle = pos * double(inv_freq[i]); cos and sin times attention_factor. Row-major output.
std::vector<double> rope_forward(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                                 const std::vector<float>& inv_freq, double attention_factor);
// The transpose: rotation by -angle, times attention_factor.
std::vector<double> rope_backward(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                                  const std::vector<float>& inv_freq, double attention_factor);

}  // namespace tk::ref
