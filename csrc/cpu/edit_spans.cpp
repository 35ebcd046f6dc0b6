// The edit's inner loops once per vector level. The math is pe::clip_add_span / clip_grad_span
// from edit_math.h (always inlined); this file compiles it for each level and picks one.
#include "pyeditor/cpu_spans.h"

#include "pyeditor/cpu_isa.h"
#include "pyeditor/edit_math.h"

#if PE_ISA_VARIANTS
#include <immintrin.h>
#endif

namespace pe::cpu {
namespace {

template <class T, bool kGrad>
inline __attribute__((always_inline)) void span_body(const T* a, const T* delta, T* out, int64_t n, acc_t<T> t) {
  if constexpr (kGrad) pe::clip_grad_span(a, delta, out, n, t);
  else pe::clip_add_span(a, delta, out, n, t);
}

template <class T, bool kGrad> void span_portable(const T* a, const T* delta, T* out, int64_t n, acc_t<T> t) {
  span_body<T, kGrad>(a, delta, out, n, t);
}

template <class T> SpanFns<T> portable_fns() { return {span_portable<T, false>, span_portable<T, true>}; }

#if PE_ISA_VARIANTS
template <class T, bool kGrad>
PE_TARGET_AVX2 void span_avx2(const T* a, const T* delta, T* out, int64_t n, acc_t<T> t) {
  span_body<T, kGrad>(a, delta, out, n, t);
}
template <class T, bool kGrad>
PE_TARGET_AVX512 void span_avx512(const T* a, const T* delta, T* out, int64_t n, acc_t<T> t) {
  span_body<T, kGrad>(a, delta, out, n, t);
}

template <class T> SpanFns<T> generic_variant(int level) {
  return pick_variant<SpanFns<T>>(level, portable_fns<T>(), {span_avx2<T, false>, span_avx2<T, true>},
                                  {span_avx512<T, false>, span_avx512<T, true>});
}

// fp16: GCC does not vectorize half <-> float conversions, so the span converts blocks with
// the F16C / AVX-512 instructions (round to nearest even, like pe::to_f16; test_cpu_spans
// checks they agree bit for bit), runs the float span of the same level on them, and
// converts the result back. (Each converter needs only its conversion instructions.)
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

template <int kLevel, bool kGrad> void f16_span(const f16* a, const f16* delta, f16* out, int64_t n, float t) {
  constexpr auto up = pick_variant(kLevel, f16_to_f32_portable, f16_to_f32_f16c, f16_to_f32_avx512);
  constexpr auto down = pick_variant(kLevel, f32_to_f16_portable, f32_to_f16_f16c, f32_to_f16_avx512);
  constexpr auto span = pick_variant(kLevel, span_portable<float, kGrad>, span_avx2<float, kGrad>,
                                     span_avx512<float, kGrad>);
  constexpr int64_t kBlock = 2048;
  alignas(64) float fa[kBlock], fd[kBlock], fo[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = n - i < kBlock ? n - i : kBlock;
    up(a + i, fa, m);
    up(delta + i, fd, m);
    span(fa, fd, fo, m, t);
    down(fo, out + i, m);
  }
}
#endif

}  // namespace

template <class T> SpanFns<T> span_variant(int level) {
#if PE_ISA_VARIANTS
  return generic_variant<T>(level);
#else
  (void)level;
  return portable_fns<T>();
#endif
}
#if PE_ISA_VARIANTS
template <> SpanFns<f16> span_variant<f16>(int level) {
  return pick_variant<SpanFns<f16>>(level, {f16_span<kIsaPortable, false>, f16_span<kIsaPortable, true>},
                                    {f16_span<kIsaAvx2, false>, f16_span<kIsaAvx2, true>},
                                    {f16_span<kIsaAvx512, false>, f16_span<kIsaAvx512, true>});
}
#endif

namespace {
// picked at load: every later call is one indirect call, as through an ifunc
template <class T> const SpanFns<T> kActive = span_variant<T>(vector_level());
}  // namespace

template <class T> SpanFns<T> spans() { return kActive<T>; }

#define PE_DEFINE_SPANS(T)                                                                          \
  template SpanFns<T> span_variant<T>(int);                                                         \
  template SpanFns<T> spans<T>();                                                                   \
  void clip_add_span(const T* theta, const T* delta, T* out, int64_t n, acc_t<T> t) {               \
    kActive<T>.add(theta, delta, out, n, t);                                                        \
  }                                                                                                 \
  void clip_grad_span(const T* grad, const T* delta, T* out, int64_t n, acc_t<T> t) {               \
    kActive<T>.grad(grad, delta, out, n, t);                                                        \
  }
PE_DEFINE_SPANS(float)
PE_DEFINE_SPANS(double)
PE_DEFINE_SPANS(bf16)
PE_DEFINE_SPANS(f16)
#undef PE_DEFINE_SPANS

const char* edit_level() { return level_name(vector_level()); }

}  // namespace pe::cpu
