// Naive references for the optimizer kernels (cpu/optim.h): the oracle of the native tests, never
// used for speed. Everything is computed in double, element by element, straight from the
// formulas in torch's documentation, with no folding of constants and no SIMD. State is kept as
// doubles; after each step the reference rounds what a kernel stores (p to its dtype, m and v to
// fp32), so it models "the exact update, rounded once to storage". Rounding to bf16 is done here
// independently of core/dtype.h (nearest even at the bf16 quantum, in double).
#pragma once
#include <cstdint>
#include <vector>

#include "../core/dtype.h"
#include "../cpu/optim.h"

namespace tk::ref {

// v rounded as a tensor of dtype t (F32 or BF16) holds it: nearest even, overflow to infinity.
double store_param(DType t, double v);

// One AdamW step on p, m, v ([n] each, updated in place) with gradient g ([n], the values the
// kernel reads). p is stored through param_dtype, m and v through fp32.
void adamw_step_ref(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v,
                    const std::vector<double>& g, DType param_dtype, const AdamWParams& hp);

// Sum over every list of x^2, in order, in double.
double grad_norm_sq_ref(const std::vector<std::vector<double>>& grads);

// min(1, max_norm / (total_norm + 1e-6)) in double.
double clip_coefficient_ref(double total_norm, double max_norm);

// g * coef stored as dtype (the fp32 product, then bf16 for BF16).
std::vector<double> scale_ref(const std::vector<double>& g, double coef, DType dtype);

}  // namespace tk::ref
