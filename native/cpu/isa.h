// Run-time CPU feature detection and the ISA level kernels dispatch on.
// Kernels for each level are compiled with function-level target attributes, so one binary built
// for baseline x86-64 carries AVX2 and AVX-512 paths and picks one at run time. TUNEKIT_ISA
// (portable | avx2 | avx512 | avx512bf16) forces a level at load time, capped at what the CPU has;
// tests use set_active_isa() to run every path present on the machine in one process.
#pragma once
#include <string>

namespace tk {

enum class CpuIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

const char* isa_name(CpuIsa isa);       // "portable" | "avx2" | "avx512" | "avx512bf16"
bool parse_isa(const std::string& s, CpuIsa* out);
CpuIsa detected_isa();                  // the best level this CPU supports
CpuIsa active_isa();                    // what kernels use now
// Sets the level kernels use; returns the level actually set (capped at detected_isa()).
CpuIsa set_active_isa(CpuIsa isa);

}  // namespace tk
