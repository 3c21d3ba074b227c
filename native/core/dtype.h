// Element types and the scalar conversions every kernel shares.
// bf16 and f16 are storage formats: kernels widen to fp32 (or double in ref/) to compute.
// Rounding from fp32 is round-to-nearest-even; NaN stays NaN (a quiet bit is forced so a NaN
// payload cannot round into infinity).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace tk {

enum class DType : uint8_t { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, U8 = 4 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::U8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
    case DType::U8: return "u8";
  }
  return "?";
}

inline bool parse_dtype(const std::string& s, DType* out) {
  static const DType all[] = {DType::F32, DType::BF16, DType::F16, DType::I32, DType::U8};
  for (DType t : all)
    if (s == dtype_name(t)) { *out = t; return true; }
  return false;
}

inline bool is_floating(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN: keep it quiet
  u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
  return uint16_t(u >> 16);
}

// IEEE half <-> single, exact for all finite values, subnormals included.
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  return bits_to_f32(u);
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);           // NaN
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);          // rounds to >= 65520: inf
  if (absu < 0x38800000u) {                                          // below the smallest normal half
    if (absu < 0x33000000u) return uint16_t(sign);                   // < half the smallest subnormal
    uint32_t e = absu >> 23;
    uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                                        // subnormal half = value / 2^-24
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = absu - 0x38000000u;                                   // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

}  // namespace tk
