// Naive references for NF4 quantization (cpu/nf4.h): the oracle of the native tests, never used
// for speed. Nothing here shares code with the kernels except the constant tables of nf4.h, which
// the tests check separately (against hand-typed values and against the QLoRA construction).
// - The code table is rebuilt from its definition: quantiles of N(0, 1) in double.
// - Quantize finds each element's code by brute force: argmin_k |n - kNf4Code[k]| in double,
//   ties to the lower code, where n = w * (1/absmax) is formed in fp32 the way bitsandbytes forms
//   it. bitsandbytes compares n against its decimal midpoints compiled as fp32 literals, so one
//   extra rule models it: n equal to that fp32 literal below the chosen code takes the lower code
//   (it differs from the nearest code only where the literal rounded above the exact midpoint).
// - Dequantize and the double-quant absmax decode are computed in double.
#pragma once
#include <cstdint>
#include <vector>

namespace tk::ref {

// The 16 NF4 values by QLoRA's construction (bitsandbytes create_normal_map(offset=0.9677083,
// use_extra_value=True)) in double: 8 positive quantiles of N(0,1) at linspace(offset, 0.5, 9)[:-1],
// 7 negative at linspace(offset, 0.5, 8)[:-1], and 0, sorted and divided by the largest.
std::vector<double> nf4_code_from_quantiles();

// Brute-force NF4 code of a normalized fp32 value (see above).
uint8_t nf4_nearest_ref(float n);

struct Nf4RefQuant {
  std::vector<uint8_t> packed;  // [ceil(numel / 2)], element 2j in the high nibble
  std::vector<float> absmax;    // [nblocks]
};
// w: [numel] the values the kernel reads (fp32-representable). Zero (absmax < FLT_MIN) blocks
// get code 7 everywhere; an odd numel pads the last low nibble with 7.
Nf4RefQuant nf4_quantize_ref(const std::vector<double>& w, int64_t block_size);

// out[i] = code(i) * absmax[i / block_size] in double. absmax: [nblocks].
std::vector<double> nf4_dequantize_ref(const std::vector<uint8_t>& packed, const std::vector<double>& absmax,
                                       int64_t numel, int64_t block_size);

// Double-quant decode in double: absmax[b] = kDynamicMap8[qabsmax[b]] * scale2[b / 256] + offset.
std::vector<double> nf4_absmax_dq_ref(const std::vector<uint8_t>& qabsmax, const std::vector<float>& scale2,
                                      float offset);

// Brute-force nearest entry of the dynamic 8-bit map (ties to the lower index) for x in [-1, 1].
uint8_t dyn8_nearest_ref(double x);

}  // namespace tk::ref
