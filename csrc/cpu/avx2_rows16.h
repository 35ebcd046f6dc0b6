// The AVX2 + FMA register block shared by the packed GEMM (quant_avx2.cpp) and tile_gemm
// (tile_gemm.cpp): R rows x 16 float32 columns, 2R accumulators + 2 column vectors + a
// broadcast in the 16 ymm registers (R <= 6). Internal to csrc/cpu.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace pe::cpu_avx2 {

// out[r * ldo + 0..15] (+)= sum over k in [k0, k1) of a[r * lda + k] * b[k * ldb + 0..15] for
// r < R: stored, or added to out when ADD. (The accumulators are one flat local array zeroed in a
// loop: with a [R][2] array GCC kept them in memory, a store per FMA, 2.6x slower.)
template <int R, bool ADD>
__attribute__((target("avx2,fma"), always_inline)) inline void rows16(const float* a, int64_t lda, const float* b,
                                                                     int64_t ldb, int64_t k0, int64_t k1, float* out,
                                                                     int64_t ldo) {
  static_assert(R >= 1 && R <= 6, "2R accumulators + 3 vectors fit 16 ymm registers");
  __m256 c[2 * R];
#pragma GCC unroll 12
  for (int i = 0; i < 2 * R; ++i) c[i] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_broadcast_ss(a + r * lda + k);
      c[2 * r] = _mm256_fmadd_ps(s, b0, c[2 * r]);
      c[2 * r + 1] = _mm256_fmadd_ps(s, b1, c[2 * r + 1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* o = out + r * ldo;
    _mm256_storeu_ps(o, ADD ? _mm256_add_ps(_mm256_loadu_ps(o), c[2 * r]) : c[2 * r]);
    _mm256_storeu_ps(o + 8, ADD ? _mm256_add_ps(_mm256_loadu_ps(o + 8), c[2 * r + 1]) : c[2 * r + 1]);
  }
}

}  // namespace pe::cpu_avx2
#endif
