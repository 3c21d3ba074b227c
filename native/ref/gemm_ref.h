// Reference GEMM: the oracle the optimized kernels are tested against. Double accumulation, every
// operand read element by element through its dtype, no blocking, no threads.
#pragma once
#include <vector>

#include "../cpu/gemm.h"

namespace tk::ref {

// Dense C [batch][M][N] = alpha * op(A) op(B) + beta * C_old, in double. C_old is read from p.C
// (through p.c_dtype, p.ldc, p.batch_stride_c) only when beta != 0; p.C is not written.
std::vector<double> gemm(const GemmParams& p);

}  // namespace tk::ref
