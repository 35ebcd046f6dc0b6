// Shared by the CPU packed-layer kernels (quant_kernels.cpp, quant_avx2.cpp, quant_amx.cpp): the
// fast mode's activation-quantization rule, the prefetch helper, and the decoding of one packed
// 16x16 block into AVX-512 registers. Internal to csrc/cpu.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyeditor/pack.h"

namespace pe::quant::cpu {
// The fast mode's activation rule, shared by every quantize_row_i8 path (the SIMD ones do the bulk
// of a row, these its tail; the portable one all of it): scale = max|x| / 127 (1 for a zero row),
// q = clamp(round half to even(x / scale), -127, 127).
// max |x[i..n)| folded into *m; false on inf or NaN
inline bool absmax_tail(const float* x, int64_t i, int64_t n, float* m) {
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (!(a < INFINITY)) return false;
    *m = a > *m ? a : *m;
  }
  return true;
}
inline float i8_scale(float absmax) { return absmax > 0.0f ? absmax / 127.0f : 1.0f; }
// out[i..n) quantized with 1 / scale = inv; returns their sum
inline int64_t quantize_tail(const float* x, int64_t i, int64_t n, float inv, int8_t* out) {
  int64_t s = 0;
  for (; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    out[i] = static_cast<int8_t>(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    s += out[i];
  }
  return s;
}
}  // namespace pe::quant::cpu

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PE_QUANT_X86 1
#endif

#ifdef PE_QUANT_X86
// F<bits>(args...) for a runtime width in {2, 4, 6, 8}
#define PE_BITS_SWITCH(bits, F, ...)  \
  switch (bits) {                     \
    case 2: F<2>(__VA_ARGS__); break;  \
    case 4: F<4>(__VA_ARGS__); break;  \
    case 6: F<6>(__VA_ARGS__); break;  \
    default: F<8>(__VA_ARGS__); break; \
  }

namespace pe::quant::cpu {

#define PE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
// the digit kernels also convert float64 <-> int64 in vectors
#define PE_DIGITS __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// GEMV kernels stream a tile once; the hardware prefetchers alone leave most of each DRAM
// miss exposed. Asking for the line kStreamAhead bytes ahead of each block read (the codes are
// contiguous within a bucket, so this also runs into the next tile) measured 9-26% faster at
// M = 1, 4096 x 4096 from DRAM on the AVX-512 paths (1 KiB: about half that; 4-16 KiB alike).
// A prefetch past the end of the buffer is harmless: prefetches never fault. The kernels that
// walk several tiles together (one stream each; the last group may hold one) ask for less: 2 KiB
// ahead there measured faster than 4 KiB or 8 KiB (bench: the packed_linear dram M=1 rows).
constexpr int64_t kStreamAhead = 4096, kStreamAheadMulti = 2048;
inline void stream_ahead(const uint8_t* block, int bytes, int64_t ahead = kStreamAhead) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(block + ahead + l), _MM_HINT_T0);
}

// One 16x16 block as four vectors: v[g] lane c holds the u8 codes of inputs 4g..4g+3 of
// channel c (byte t = input 4g + t). Each field costs one shift and one mask.
template <int BITS>
PE_AVX512 inline void load_block(const uint8_t* b, __m512i v[4]) {
  if constexpr (BITS == 8) {
    for (int g = 0; g < 4; ++g) v[g] = _mm512_loadu_si512(b + 64 * g);
  } else if constexpr (BITS == 2) {
    const __m512i m2 = _mm512_set1_epi8(0x03);
    const __m512i c = _mm512_loadu_si512(b);
    v[0] = _mm512_and_si512(c, m2);
    v[1] = _mm512_and_si512(_mm512_srli_epi32(c, 2), m2);
    v[2] = _mm512_and_si512(_mm512_srli_epi32(c, 4), m2);
    v[3] = _mm512_and_si512(_mm512_srli_epi32(c, 6), m2);
  } else {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i c0 = _mm512_loadu_si512(b), c1 = _mm512_loadu_si512(b + 64);
    v[0] = _mm512_and_si512(c0, m4);
    v[1] = _mm512_and_si512(_mm512_srli_epi32(c0, 4), m4);
    v[2] = _mm512_and_si512(c1, m4);
    v[3] = _mm512_and_si512(_mm512_srli_epi32(c1, 4), m4);
    if constexpr (BITS == 6) {  // the 2-bit plane of high bits, moved to bits 4-5
      const __m512i m30 = _mm512_set1_epi8(0x30);
      const __m512i h = _mm512_loadu_si512(b + 128);
      v[0] = _mm512_or_si512(v[0], _mm512_and_si512(_mm512_slli_epi32(h, 4), m30));
      v[1] = _mm512_or_si512(v[1], _mm512_and_si512(_mm512_slli_epi32(h, 2), m30));
      v[2] = _mm512_or_si512(v[2], _mm512_and_si512(h, m30));
      v[3] = _mm512_or_si512(v[3], _mm512_and_si512(_mm512_srli_epi32(h, 2), m30));
    }
  }
}

// One block of a tile against one row's ND fixed-point digits (cpu_quant.h split_digits: xb the
// block's 16 inputs of digit 0, digit d at + d * 64): acc[d] += the block's u8 codes x digit d,
// one vpdpbusd per digit per 4 inputs. The inner step of the per-channel and group-wise digit rows.
template <int BITS, int ND>
PE_DIGITS __attribute__((always_inline)) inline void block_digits(const uint8_t* blk, const int8_t* xb, __m512i* acc) {
  __m512i v[4];
  load_block<BITS>(blk, v);
  for (int q4 = 0; q4 < 4; ++q4)
    for (int d = 0; d < ND; ++d) {
      int32_t x4;
      std::memcpy(&x4, xb + d * 64 + 4 * q4, 4);
      acc[d] = _mm512_dpbusd_epi32(acc[d], v[q4], _mm512_set1_epi32(x4));
    }
}

// a tile's 16 zero points as floats (zeros where z is null: the raw codes)
PE_AVX512 inline __m512 zero_points_ps(const uint8_t* z) {
  if (!z) return _mm512_setzero_ps();
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
}

// byte t of every lane as 16 floats
template <int T>
PE_AVX512 inline __m512 byte_ps(__m512i v) {
  if constexpr (T == 3) return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 24));
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * T), _mm512_set1_epi32(0xFF)));
}

}  // namespace pe::quant::cpu
#endif
