// Rotary position embedding (RoPE) on the CPU, forward and backward, with the Hugging Face
// `rope_scaling` types (linear, dynamic NTK, YaRN, llama3), so that loaded checkpoints see the
// rotation they were trained with.
//
// Convention (transformers' `rotate_half` / `apply_rotary_pos_emb`): x is [B, T, H, D] with D
// even; for i < D/2 and angle = pos * inv_freq[i],
//   out[i]       = x[i]       * cos - x[i + D/2] * sin
//   out[i + D/2] = x[i + D/2] * cos + x[i]       * sin
// where cos and sin are multiplied by the attention factor (YaRN's mscale; 1 for the others).
// The backward pass is the transpose: the same rotation by -angle, times the same factor.
//
// Frequencies are computed once per call site by rope_inv_freq() (in double, rounded to fp32 like
// transformers' fp32 buffer) and handed to the kernels, so the kernels know nothing of scaling.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"
#include "../core/thread_pool.h"

namespace tk {

// A Hugging Face `rope_scaling` (or `rope_parameters`) block, plus the config fields it reads.
// Fields a type does not use are ignored. "<= 0 means default" mirrors HF's `x.get(key) or default`.
struct RopeScaling {
  // `rope_type` (older configs: `type`): "default" | "linear" | "dynamic" | "yarn" | "llama3".
  enum Type { None, Linear, Dynamic, Yarn, Llama3 } type = None;
  // `factor`: the context extension ratio. Linear divides inv_freq by it; dynamic uses it in the
  // NTK base formula; YaRN interpolates low frequencies by it and derives the attention factor
  // from it; llama3 divides low frequencies by it. Must be > 0 for every type but None.
  float factor = 1.0f;
  // `original_max_position_embeddings`: the pre-training context. YaRN sets its correction range
  // from it, llama3 its wavelength thresholds (old_context_len). <= 0: fall back to
  // max_position_embeddings (what HF does for YaRN, and what its config standardization fills in).
  int original_max_position_embeddings = 0;
  // `low_freq_factor` / `high_freq_factor` (llama3): wavelengths above
  // original_max_position_embeddings / low_freq_factor are divided by factor, those below
  // original_max_position_embeddings / high_freq_factor are kept, those between are blended.
  // high_freq_factor must exceed low_freq_factor.
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  // `beta_fast` / `beta_slow` (YaRN): rotation counts that bound the ramp between extrapolated and
  // interpolated dimensions. <= 0: HF's defaults, 32 and 1.
  float beta_fast = 0.0f;
  float beta_slow = 0.0f;
  // `mscale` / `mscale_all_dim` (YaRN, DeepSeek style): when both are non-zero the attention factor
  // is get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim); otherwise both are
  // ignored (as in HF, a lone mscale has no effect). 0 = absent.
  float mscale = 0.0f;
  float mscale_all_dim = 0.0f;
  // `attention_factor` (YaRN): multiplies cos and sin. <= 0: derived as above, which without
  // mscale is 0.1 * ln(factor) + 1 for factor > 1 and 1 otherwise. Ignored by the other types.
  float attention_factor = 0.0f;
  // `truncate` (YaRN): round the correction range outward to whole dimensions (HF default true).
  bool truncate = true;
  // The config's `max_position_embeddings`: the dynamic NTK threshold, and the YaRN/llama3
  // fallback for original_max_position_embeddings.
  int max_position_embeddings = 0;
};

struct RopeFrequencies {
  std::vector<float> inv_freq;  // D/2 entries
  float attention_factor = 1.0f;
};

// The inverse frequencies (and the attention factor) of head dim D (even, >= 2), base `theta`
// (`rope_theta`) and `scaling`, following transformers' _compute_*_rope_parameters. seq_len is
// what dynamic NTK adapts to: the largest position in use + 1 (HF: max(position_ids) + 1). It is
// ignored by the other types. Computed in double and rounded once to fp32. Throws tk::Error on
// invalid parameters (odd D, theta <= 1, factor <= 0, missing context lengths, ...).
RopeFrequencies rope_inv_freq(int64_t D, double theta, const RopeScaling& scaling, int64_t seq_len);

// out = rope(x). x and out: contiguous [B, T, H, D], one dtype, F32 or BF16 (computed in fp32,
// rounded to nearest even on store); out may be x itself (in place). positions: contiguous I32,
// [T] shared by every batch row when positions_per_batch is false, or [B, T] (positions that
// restart per packed document) when it is true; any int32 value is allowed. inv_freq has D/2
// entries. cos/sin of pos * inv_freq are evaluated in double and rounded to fp32, so large
// positions lose no accuracy to an fp32 angle.
void rope_forward_cpu(const TensorView& x, const TensorView& positions, bool positions_per_batch,
                      const std::vector<float>& inv_freq, float attention_factor, const TensorView& out,
                      ThreadPool& pool);

// dx = rope^T(dy): rotation by -angle times attention_factor, the gradient of rope_forward_cpu.
// Same contract as rope_forward_cpu (dx may be dy itself).
void rope_backward_cpu(const TensorView& dy, const TensorView& positions, bool positions_per_batch,
                       const std::vector<float>& inv_freq, float attention_factor, const TensorView& dx,
                       ThreadPool& pool);

}  // namespace tk
