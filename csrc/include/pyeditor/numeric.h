// Storage types and their conversion to the accumulation type, shared by CPU and CUDA.
// bf16 and fp16 are plain 16-bit patterns (layout-compatible with c10::BFloat16 / c10::Half),
// converted with round-to-nearest-even so every backend rounds exactly like torch.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace pe {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

PE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PE_HD float to_float(bf16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

PE_HD bf16 to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

PE_HD float to_float(f16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
    return bits_float(sign | float_bits(static_cast<float>(mant) * 5.9604644775390625e-8f));
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

PE_HD f16 to_f16(float f) {
  uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (u >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (u < 0x38800000u) {
    // Below fp16's smallest normal: adding 0.5 lines the float's last mantissa bit up with
    // 2^-24, so the hardware's own round-to-nearest-even produces the subnormal code.
    const float shifted = bits_float(u) + 0.5f;
    return f16{static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias exponent (127 -> 15) and round to nearest even
  return f16{static_cast<uint16_t>(sign | (u >> 13))};
}

// Accumulation type per storage type: float for 16/32-bit storage, double for double.
template <class T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };
template <class T> using acc_t = typename acc_of<T>::type;

template <class T> PE_HD acc_t<T> load(const T* p) { return static_cast<acc_t<T>>(*p); }
template <> PE_HD float load<bf16>(const bf16* p) { return to_float(*p); }
template <> PE_HD float load<f16>(const f16* p) { return to_float(*p); }

template <class T> PE_HD void store(T* p, acc_t<T> v) { *p = static_cast<T>(v); }
template <> PE_HD void store<bf16>(bf16* p, float v) { *p = to_bf16(v); }
template <> PE_HD void store<f16>(f16* p, float v) { *p = to_f16(v); }

}  // namespace pe
