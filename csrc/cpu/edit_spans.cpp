// SIMD clones of the edit's inner loops. The math is pe::clip_add_span / clip_grad_span from
// edit_math.h; this file only asks the compiler for one copy per instruction set.
#include "pyeditor/cpu_spans.h"

#include "pyeditor/edit_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PE_SIMD_CLONES
#endif

namespace pe::cpu {

#define PE_DEFINE_SPANS(T)                                                                         \
  PE_SIMD_CLONES void clip_add_span(const T* theta, const T* delta, T* out, int64_t n, acc_t<T> t) { \
    pe::clip_add_span(theta, delta, out, n, t);                                                    \
  }                                                                                                \
  PE_SIMD_CLONES void clip_grad_span(const T* grad, const T* delta, T* out, int64_t n, acc_t<T> t) { \
    pe::clip_grad_span(grad, delta, out, n, t);                                                    \
  }
PE_DEFINE_SPANS(float)
PE_DEFINE_SPANS(double)
PE_DEFINE_SPANS(bf16)
PE_DEFINE_SPANS(f16)
#undef PE_DEFINE_SPANS

const char* simd_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bw")) return "avx512";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "baseline";
}

}  // namespace pe::cpu
