// What the CPU kernels share: integer and dtype names, and the 16-bit float conversions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// The vectorized paths use AVX-512 F, BW, DQ and VL (every AVX-512 x86 core since Skylake-SP has all four).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define HSR_AVX512 1
#else
#define HSR_AVX512 0
#endif

namespace hsr {

using i64 = int64_t;

enum DType : i64 { F32 = 0, BF16 = 1, F16 = 2 };   // kernels/cpu_decode.py and cpu_summary.py use these codes

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {                        // zero or subnormal: exact as a float
    float value = std::ldexp(float(mantissa), -24);
    return sign ? -value : value;
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline i64 dtype_size(i64 dtype) { return dtype == F32 ? 4 : 2; }

// element `at` of a flat array of `dtype` as fp32
inline float load_float(const void* base, i64 at, i64 dtype) {
  if (dtype == F32) return static_cast<const float*>(base)[at];
  const uint16_t h = static_cast<const uint16_t*>(base)[at];
  return dtype == BF16 ? bf16_to_float(h) : half_to_float(h);
}

}  // namespace hsr
