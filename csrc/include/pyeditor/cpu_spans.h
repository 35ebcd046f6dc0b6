// CPU entry points for the contiguous inner loops, compiled once per SIMD level
// (AVX-512, AVX2, baseline) and picked at load time by the CPU's features.
#pragma once
#include <cstdint>

#include "numeric.h"

namespace pe::cpu {

#define PE_DECLARE_SPANS(T)                                                                   \
  void clip_add_span(const T* theta, const T* delta, T* out, int64_t n, acc_t<T> t);          \
  void clip_grad_span(const T* grad, const T* delta, T* out, int64_t n, acc_t<T> t);
PE_DECLARE_SPANS(float)
PE_DECLARE_SPANS(double)
PE_DECLARE_SPANS(bf16)
PE_DECLARE_SPANS(f16)
#undef PE_DECLARE_SPANS

// Name of the SIMD level the loops run at on this CPU ("avx512", "avx2" or "baseline").
const char* simd_level();

}  // namespace pe::cpu
