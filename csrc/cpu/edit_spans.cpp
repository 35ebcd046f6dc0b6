// SIMD clones of the edit's inner loops. The math is pe::clip_add_span / clip_grad_span from
// edit_math.h; this file only asks the compiler for one copy per instruction set.
#include "pyeditor/cpu_isa.h"
#include "pyeditor/cpu_spans.h"

#include "pyeditor/edit_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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
#if defined(__x86_64__) && defined(__GNUC__)
// fp16: GCC does not vectorize half <-> float conversions, so the span converts blocks with
// the F16C / AVX-512 instructions (round to nearest even, like pe::to_f16; test_cpu_spans
// checks they agree bit for bit), runs the float span on them, and converts the result back.
namespace {

__attribute__((target("avx512f"))) void f16_to_f32_avx512(const f16* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
  for (; i < n; ++i) d[i] = pe::to_float(s[i]);
}
__attribute__((target("avx512f"))) void f32_to_f16_avx512(const float* s, f16* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = pe::to_f16(s[i]);
}
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const f16* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = pe::to_float(s[i]);
}
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* s, f16* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = pe::to_f16(s[i]);
}
void f16_to_f32_portable(const f16* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = pe::to_float(s[i]);
}
void f32_to_f16_portable(const float* s, f16* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = pe::to_f16(s[i]);
}

struct HalfConverters {
  void (*up)(const f16*, float*, int64_t);
  void (*down)(const float*, f16*, int64_t);
};

HalfConverters pick_half_converters() {
  __builtin_cpu_init();
  using pe::cpu::isa_allows;
  if (isa_allows(pe::cpu::kIsaAvx512) && __builtin_cpu_supports("avx512f")) return {f16_to_f32_avx512, f32_to_f16_avx512};
  if (isa_allows(pe::cpu::kIsaAvx2) && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx"))
    return {f16_to_f32_f16c, f32_to_f16_f16c};
  return {f16_to_f32_portable, f32_to_f16_portable};
}

const HalfConverters kHalf = pick_half_converters();

template <bool kGrad>
void f16_span(const f16* a, const f16* delta, f16* out, int64_t n, float t) {
  constexpr int64_t kBlock = 2048;
  alignas(64) float fa[kBlock], fd[kBlock], fo[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = n - i < kBlock ? n - i : kBlock;
    kHalf.up(a + i, fa, m);
    kHalf.up(delta + i, fd, m);
    if (kGrad) clip_grad_span(fa, fd, fo, m, t);
    else clip_add_span(fa, fd, fo, m, t);
    kHalf.down(fo, out + i, m);
  }
}

}  // namespace

void clip_add_span(const f16* theta, const f16* delta, f16* out, int64_t n, float t) {
  f16_span<false>(theta, delta, out, n, t);
}
void clip_grad_span(const f16* grad, const f16* delta, f16* out, int64_t n, float t) {
  f16_span<true>(grad, delta, out, n, t);
}
#else
PE_DEFINE_SPANS(f16)
#endif
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
