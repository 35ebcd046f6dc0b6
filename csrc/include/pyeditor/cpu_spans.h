// CPU entry points for the edit's contiguous inner loops, built once per vector level
// (portable, AVX2, AVX-512; cpu_isa.h) and picked once, at load, by the CPU and PYEDITOR_CPU_ISA.
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

template <class T> struct SpanFns {
  void (*add)(const T* theta, const T* delta, T* out, int64_t n, acc_t<T> t);
  void (*grad)(const T* grad, const T* delta, T* out, int64_t n, acc_t<T> t);
};

// The spans clip_add_span / clip_grad_span run (those of vector_level()), for callers that
// call them per element and so fetch them once. T: float, double, bf16 or f16.
template <class T> SpanFns<T> spans();

// The spans of one vector level (kIsaPortable, kIsaAvx2, kIsaAvx512; a level this build has
// no variant for gives the next lower one). Only levels up to vector_level() may run here;
// tests check each of them.
template <class T> SpanFns<T> span_variant(int level);

// The build_info name of the level the spans run at: "avx512", "avx2" or "portable".
const char* edit_level();

}  // namespace pe::cpu
