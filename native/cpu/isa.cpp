#include "isa.h"

#include <atomic>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace tk {

namespace {

CpuIsa detect() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return CpuIsa::Portable;
  // The AVX2 level also uses FMA and F16C (half-precision conversions).
  bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return CpuIsa::Portable;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  bool ymm_state = (xlo & 0x6) == 0x6;
  bool zmm_state = (xlo & 0xe6) == 0xe6;
  if (!ymm_state) return CpuIsa::Portable;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return CpuIsa::Portable;
  bool avx2 = b & (1u << 5);
  bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  if (!avx2) return CpuIsa::Portable;
  if (!(zmm_state && avx512f && avx512dq && avx512bw && avx512vl)) return CpuIsa::Avx2;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  bool bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
  return bf16 ? CpuIsa::Avx512Bf16 : CpuIsa::Avx512;
#else
  return CpuIsa::Portable;
#endif
}

CpuIsa initial_active() {
  CpuIsa best = detected_isa();
  if (const char* env = std::getenv("TUNEKIT_ISA")) {
    CpuIsa want;
    if (parse_isa(env, &want)) return want < best ? want : best;
  }
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{int(initial_active())};
  return slot;
}

}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Portable: return "portable";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx512Bf16: return "avx512bf16";
  }
  return "portable";
}

bool parse_isa(const std::string& s, CpuIsa* out) {
  for (int i = 0; i <= int(CpuIsa::Avx512Bf16); ++i)
    if (s == isa_name(CpuIsa(i))) { *out = CpuIsa(i); return true; }
  return false;
}

CpuIsa detected_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa active_isa() { return CpuIsa(active_slot().load(std::memory_order_relaxed)); }

CpuIsa set_active_isa(CpuIsa isa) {
  CpuIsa best = detected_isa();
  CpuIsa set = isa < best ? isa : best;
  active_slot().store(int(set));
  return set;
}

}  // namespace tk
