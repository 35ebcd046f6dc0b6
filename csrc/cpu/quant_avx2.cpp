// AVX2 + FMA kernels of the packed low-bit matmul (see quant_avx2.h), on the block reads of
// avx2_codes.h (a tile as two independent halves of 8 channels, exactly as the AVX-512 kernels
// see a whole tile).
#include "quant_avx2.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "avx2_codes.h"
#include "avx2_in_place_asm.h"
#include "avx2_rows16.h"
#include "quant_block.h"

#ifdef PE_QUANT_X86
namespace pe::quant::cpu::avx2 {
namespace {

// One tile, one float32 row (IN_PLACE: x scaled by scale_row for READ, sums times unscale). The
// chains restart every kChunk blocks and are added to the total, so none is longer than 32
// products (the AVX-512 row kernel: 128).
constexpr int64_t kChunk = 8;
template <int BITS, bool IN_PLACE, InPlaceRead READ = InPlaceRead::kConvert>
PE_AVX2 void row_f32_tile(const uint8_t* tile, int64_t blocks, const float* x, float* out, float unscale = 1.0f) {
  __m256 total0 = _mm256_setzero_ps(), total1 = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunk) {
    __m256 acc[2 * kChains];  // flat and zeroed in a loop: see rows_f32
#pragma GCC unroll 8
    for (int c = 0; c < 2 * kChains; ++c) acc[c] = _mm256_setzero_ps();
    const int64_t b1 = b0 + kChunk < blocks ? b0 + kChunk : blocks;
    const __m256i masks[4] = {in_place_mask(BITS, 0), in_place_mask(BITS, 1), in_place_mask(BITS, 2), in_place_mask(BITS, 3)};
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = tile + b * BITS * 32;
      const float* xs = x + b * kTileK;
      stream_ahead(blk, BITS * 32);
      if constexpr (IN_PLACE && (BITS == 2 || BITS == 4)) {
        block_in_place_asm<BITS, READ == InPlaceRead::kConvert>(blk, xs, acc, masks);
      } else if constexpr (IN_PLACE) {
        // At 6 bits the masks stay memory operands of vpand: hoisted into registers (GCC's
        // choice) they pushed accumulators onto the stack, and the chains waited on it. 8-bit,
        // 3 masks, keeps constants (faster than through the table).
        const MaskTable* mt = &kMasks<code_width(BITS)>;
        asm("" : "+r"(mt));
        field_fma_in_place<READ, BITS, 0>(blk, xs, acc, mt);
        field_fma_in_place<READ, BITS, 1>(blk, xs, acc, mt);
        field_fma_in_place<READ, BITS, 2>(blk, xs, acc, mt);
        field_fma_in_place<READ, BITS, 3>(blk, xs, acc, mt);
      } else {
        block_fma<BITS>(blk, xs, acc);
      }
    }
    total0 = _mm256_add_ps(total0, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    total1 = _mm256_add_ps(total1, _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])));
  }
  if constexpr (IN_PLACE && READ == InPlaceRead::kDenormal) {  // exact: see code_ps
    total0 = _mm256_mul_ps(total0, _mm256_set1_ps(unscale));
    total1 = _mm256_mul_ps(total1, _mm256_set1_ps(unscale));
  }
  _mm256_storeu_ps(out, total0);
  _mm256_storeu_ps(out + 8, total1);
}

// GEMM: the tile decoded once to floats (w[k * 16 + c], q - z where z is given), then R rows a
// pass over it.
template <int BITS>
PE_AVX2 void decode_tile(const uint8_t* tile, int64_t blocks, float* w, const uint8_t* z = nullptr) {
  __m256 zv[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int h = 0; h < 2 && z; ++h) {
    int64_t z8;
    std::memcpy(&z8, z + 8 * h, 8);
    zv[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8)));
  }
  for (int64_t b = 0; b < blocks; ++b)
    for (int h = 0; h < 2; ++h) {
      float* wb = w + b * kTileK * kTileN + 8 * h;
      for (int g = 0; g < 4; ++g) {
        const __m256i v = field<BITS>(tile + b * BITS * 32 + 32 * h, g);
        _mm256_storeu_ps(wb + (4 * g + 0) * 16, _mm256_sub_ps(byte_ps<0>(v), zv[h]));
        _mm256_storeu_ps(wb + (4 * g + 1) * 16, _mm256_sub_ps(byte_ps<1>(v), zv[h]));
        _mm256_storeu_ps(wb + (4 * g + 2) * 16, _mm256_sub_ps(byte_ps<2>(v), zv[h]));
        _mm256_storeu_ps(wb + (4 * g + 3) * 16, _mm256_sub_ps(byte_ps<3>(v), zv[h]));
      }
    }
}

// R rows x 16 channels of the decoded tile (R <= 6). Splitting K into L1-sized chunks measured
// slower, the smaller the chunk the slower (bench: packed_linear/cache/M256 rows).
template <int R>  // (avx2_rows16.h)
PE_AVX2 void rows_f32(const float* w, int64_t kp, const float* x, int64_t ldx, float* out, int64_t ldo) {
  pe::cpu_avx2::rows16<R, false>(x, ldx, w, kTileN, 0, kp, out, ldo);
}

// m rows against a decoded (or dequantized) tile w [kp][16]
void rows_all_f32(const float* w, int64_t kp, const float* x, int64_t ldx, int64_t m, float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) rows_f32<6>(w, kp, x + r * ldx, ldx, out + r * ldo, ldo);
  // the last m % 6 rows in one pass (a row at a time would leave two latency-bound FMA chains)
  const float* xr = x + r * ldx;
  float* o = out + r * ldo;
  switch (m - r) {
    case 5: rows_f32<5>(w, kp, xr, ldx, o, ldo); break;
    case 4: rows_f32<4>(w, kp, xr, ldx, o, ldo); break;
    case 3: rows_f32<3>(w, kp, xr, ldx, o, ldo); break;
    case 2: rows_f32<2>(w, kp, xr, ldx, o, ldo); break;
    case 1: rows_f32<1>(w, kp, xr, ldx, o, ldo); break;
    default: break;
  }
}

template <int BITS>
void dot_f32_gemm(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, int64_t m, float* out,
                  int64_t ldo, float* w, const uint8_t* z) {
  decode_tile<BITS>(tile, blocks, w, z);
  rows_all_f32(w, blocks * kTileK, x, ldx, m, out, ldo);
}

// A few rows (R <= 3) against centred codes, q - z: each block decoded once in registers and
// used by every row (a decode buffer cost more than the few rows' multiply-adds), two FMA
// chains per row and tile half where the 16 registers allow it (R <= 2), one for R = 3.
// byte T of a field pair (the two tile halves), centred, into every row's chain T % C
template <int T, int R, int C>
PE_AVX2 inline void centred_step(__m256i v0, __m256i v1, const __m256 zv[2], const float* xs, int64_t ldx,
                                 __m256* acc) {
  const __m256 w0 = _mm256_sub_ps(byte_ps<T>(v0), zv[0]), w1 = _mm256_sub_ps(byte_ps<T>(v1), zv[1]);
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r) {
    const __m256 xb = _mm256_broadcast_ss(xs + r * ldx + T);
    acc[(r * 2 + 0) * C + T % C] = _mm256_fmadd_ps(w0, xb, acc[(r * 2 + 0) * C + T % C]);
    acc[(r * 2 + 1) * C + T % C] = _mm256_fmadd_ps(w1, xb, acc[(r * 2 + 1) * C + T % C]);
  }
}

template <int BITS, int R>
PE_AVX2 void rows_centred(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, float* out, int64_t ldo,
                          const uint8_t* z) {
  constexpr int C = R <= 2 ? 2 : 1;  // chains per row and half
  __m256 zv[2];
  for (int h = 0; h < 2; ++h) {
    int64_t z8;
    std::memcpy(&z8, z + 8 * h, 8);
    zv[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8)));
  }
  __m256 acc[R * 2 * C];  // [row][half][chain], flat (see rows16)
#pragma GCC unroll 12
  for (int i = 0; i < R * 2 * C; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = tile + b * BITS * 32;
    stream_ahead(blk, BITS * 32);
    const float* xs = x + b * kTileK;
    for (int g = 0; g < 4; ++g) {
      const __m256i v0 = field<BITS>(blk, g), v1 = field<BITS>(blk + 32, g);
      centred_step<0, R, C>(v0, v1, zv, xs + 4 * g, ldx, acc);
      centred_step<1, R, C>(v0, v1, zv, xs + 4 * g, ldx, acc);
      centred_step<2, R, C>(v0, v1, zv, xs + 4 * g, ldx, acc);
      centred_step<3, R, C>(v0, v1, zv, xs + 4 * g, ldx, acc);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 v = acc[(r * 2 + h) * C];
      if constexpr (C == 2) v = _mm256_add_ps(v, acc[(r * 2 + h) * C + 1]);
      _mm256_storeu_ps(out + r * ldo + 8 * h, v);
    }
}

template <int BITS>
void dot_f32_centred_few(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, int64_t m, float* out,
                         int64_t ldo, const uint8_t* z) {
  switch (m) {
    case 1: rows_centred<BITS, 1>(tile, blocks, x, ldx, out, ldo, z); break;
    case 2: rows_centred<BITS, 2>(tile, blocks, x, ldx, out, ldo, z); break;
    case 3: rows_centred<BITS, 3>(tile, blocks, x, ldx, out, ldo, z); break;
    default: std::abort();
  }
}

// The tile decoded and dequantized with group-wise scales: w[k][c] = (q - z[g][c]) * s[g][c]
// (g = k / group, the reference's one float32 multiply), so the GEMM needs no epilogue per group.
template <int BITS>
PE_AVX2 void dequant_tile(const uint8_t* tile, int64_t blocks, const float* s, const uint8_t* z, int64_t srows,
                          int64_t group_blocks, float* w) {
  decode_tile<BITS>(tile, blocks, w);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = b / group_blocks;
    const float* sg = s + g * srows;
    const uint8_t* zg = z + g * srows;
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_loadu_ps(sg + 8 * h);
      int64_t z8;
      std::memcpy(&z8, zg + 8 * h, 8);
      const __m256 zv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8)));
      float* wb = w + b * kTileK * kTileN + 8 * h;
      for (int kk = 0; kk < kTileK; ++kk)
        _mm256_storeu_ps(wb + kk * kTileN, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(wb + kk * kTileN), zv), sv));
    }
  }
}


// NT tiles, one row (NT streams from memory)
template <int BITS, int NT>
PE_AVX2 void row_i8_tiles(const uint8_t* const* tiles, int64_t blocks, const int8_t* x, int32_t* out) {
  __m256i acc[2 * NT];  // flat and zeroed in a loop: see rows_f32
#pragma GCC unroll 8
  for (int i = 0; i < 2 * NT; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < NT; ++t) {
      const uint8_t* blk = tiles[t] + b * BITS * 32;
      stream_ahead(blk, BITS * 32, kStreamAheadMulti);
      half_rows_i8<BITS, 1>(blk, x + b * kTileK, 0, acc + 2 * t);
      half_rows_i8<BITS, 1>(blk + 32, x + b * kTileK, 0, acc + 2 * t + 1);
    }
#pragma GCC unroll 8
  for (int i = 0; i < 2 * NT; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * i), acc[i]);
}

// R rows of one tile
template <int BITS, int R>
PE_AVX2 void rows_i8(const uint8_t* tile, int64_t blocks, const int8_t* x, int64_t ldx, int32_t* out, int64_t ldo) {
  __m256i acc[2 * R];  // rows of half 0, then of half 1
#pragma GCC unroll 8
  for (int i = 0; i < 2 * R; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = tile + b * BITS * 32;
    half_rows_i8<BITS, R>(blk, x + b * kTileK, ldx, acc);
    half_rows_i8<BITS, R>(blk + 32, x + b * kTileK, ldx, acc + R);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo), acc[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 8), acc[R + r]);
  }
}

// rows a pass: 4 spilled; 3 is the fastest at 8 bits, 2 below (bench: packed_linear/cache/M256 rows)
template <int BITS>
void dot_i8(const uint8_t* tile, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m, int32_t* out, int64_t ldo) {
  constexpr int R = BITS == 8 ? 3 : 2;
  int64_t r = 0;
  for (; r + R <= m; r += R) rows_i8<BITS, R>(tile, blocks, x + r * ldx, ldx, out + r * ldo, ldo);
  for (; r < m; ++r) rows_i8<BITS, 1>(tile, blocks, x + r * ldx, ldx, out + r * ldo, ldo);
}

// n tiles in groups of at most 4 (8 accumulators; more would spill on 16 registers)
template <class F>
void in_groups_of_4(int n, const F& f) {
  for (int u = 0; u < n; u += 4) {
    switch (n - u < 4 ? n - u : 4) {
      case 1: f(std::integral_constant<int, 1>{}, u); break;
      case 2: f(std::integral_constant<int, 2>{}, u); break;
      case 3: f(std::integral_constant<int, 3>{}, u); break;
      default: f(std::integral_constant<int, 4>{}, u); break;
    }
  }
}

template <int BITS, bool IN_PLACE = false, InPlaceRead READ = InPlaceRead::kConvert>
void row_f32_any(const uint8_t* const* tiles, int n, int64_t blocks, const float* x, float* out, float unscale = 1.0f) {
  for (int u = 0; u < n; ++u) row_f32_tile<BITS, IN_PLACE, READ>(tiles[u], blocks, x, out + u * kTileN, unscale);
}

template <int BITS>
void row_in_place_any(const uint8_t* const* tiles, int n, int64_t blocks, const float* xs, InPlaceRead read,
                      float unscale, float* out) {
  if (read == InPlaceRead::kDenormal) row_f32_any<BITS, true, InPlaceRead::kDenormal>(tiles, n, blocks, xs, out, unscale);
  else row_f32_any<BITS, true, InPlaceRead::kConvert>(tiles, n, blocks, xs, out);
}

template <int BITS>
void row_i8_any(const uint8_t* const* tiles, int n, int64_t blocks, const int8_t* x, int32_t* out) {
  in_groups_of_4(n, [&](auto nt, int u) {
    row_i8_tiles<BITS, decltype(nt)::value>(tiles + u, blocks, x, out + u * kTileN);
  });
}

// below this many rows, each row streams the tile itself (cache-resident after the first)
constexpr int64_t kGemmRows = 4;

}  // namespace

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void tile_dot_f32(const uint8_t* tile, int bits, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                  float* out, int64_t ldo, float* wbuf, const uint8_t* z) {
  if (m < kGemmRows && z) {
    PE_BITS_SWITCH(bits, dot_f32_centred_few, tile, blocks, x, ldx, m, out, ldo, z)
  } else if (m < kGemmRows) {
    for (int64_t r = 0; r < m; ++r) PE_BITS_SWITCH(bits, row_f32_any, &tile, 1, blocks, x + r * ldx, out + r * ldo)
  } else {
    PE_BITS_SWITCH(bits, dot_f32_gemm, tile, blocks, x, ldx, m, out, ldo, wbuf, z)
  }
}

void tiles_dot_f32_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* x, float* out) {
  PE_BITS_SWITCH(bits, row_f32_any, tiles, n, blocks, x, out)
}

void tile_gemm_grouped_f32(const uint8_t* tile, int bits, int64_t blocks, const float* s, const uint8_t* z,
                           int64_t srows, int64_t group_blocks, const float* x, int64_t ldx, int64_t m, float* out,
                           int64_t ldo, float* wbuf) {
  PE_BITS_SWITCH(bits, dequant_tile, tile, blocks, s, z, srows, group_blocks, wbuf)
  rows_all_f32(wbuf, blocks * kTileK, x, ldx, m, out, ldo);
}

InPlaceRead preferred_read() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd ? InPlaceRead::kDenormal : InPlaceRead::kConvert;
}

namespace {
// kConvert: xs = x * 2^-p per position (a product by a power of two: exact, or rounded below the
// normal floats, which the product back detects; std::ldexp per value was a visible part of a
// one-row call).
PE_AVX2 bool scale_convert(int bits, const float* x, int64_t kp, float* xs) {
  float down[kTileK], up[kTileK];
  for (int i = 0; i < kTileK; ++i) {
    const int p = in_place_bit(InPlaceRead::kConvert, bits, i / 4, i % 4);
    down[i] = std::ldexp(1.0f, -p), up[i] = std::ldexp(1.0f, p);
  }
  int lost = 0;
  for (int64_t b = 0; b < kp; b += kTileK)
    for (int i = 0; i < kTileK; ++i) {
      xs[b + i] = x[b + i] * down[i];
      lost |= xs[b + i] * up[i] != x[b + i];  // NaN too
    }
  return lost == 0;
}

// kDenormal: xs = (x * 2^-e) * 2^(127 - p), e = x's largest exponent, so the products are
// q * x * 2^-(22 + e) (*unscale = 2^(22 + e)). Bit for bit the sums of block_fma where every
// nonzero value either side is a normal float: nonzero |x| >= 2^-103 and >= 2^(e - 81) (every sum
// is then a multiple of 2^-126 either side), and 255 * kp * 2^(e + 1) < 2^127 (no overflow).
PE_AVX2 bool scale_denormal(int bits, const float* x, int64_t kp, float* xs, float* unscale) {
  uint32_t hi = 0, lo = 0x7F800000u;  // largest |x| and smallest nonzero |x|, as bits
  for (int64_t i = 0; i < kp; ++i) {
    uint32_t a;
    std::memcpy(&a, x + i, 4);
    a &= 0x7FFFFFFFu;
    hi = a > hi ? a : hi;
    lo = a != 0 && a < lo ? a : lo;
  }
  if (hi >= 0x7F800000u) return false;  // inf or NaN
  const int e = hi == 0 ? 0 : static_cast<int>(hi >> 23) - 127, e_lo = hi == 0 ? 0 : static_cast<int>(lo >> 23) - 127;
  int log2_kp = 0;
  while ((int64_t{1} << log2_kp) < kp) ++log2_kp;
  if (e_lo < -103 || e_lo < e - 81 || e + 9 + log2_kp > 126 || e > 100) return false;
  float up[kTileK];
  for (int i = 0; i < kTileK; ++i) up[i] = std::ldexp(1.0f, 127 - in_place_bit(InPlaceRead::kDenormal, bits, i / 4, i % 4));
  const float down = std::ldexp(1.0f, -e);
  for (int64_t b = 0; b < kp; b += kTileK)
    for (int i = 0; i < kTileK; ++i) xs[b + i] = x[b + i] * down * up[i];
  *unscale = std::ldexp(1.0f, 22 + e);
  return true;
}
}  // namespace

bool scale_row(int bits, const float* x, int64_t kp, InPlaceRead read, float* xs, float* unscale) {
  *unscale = 1.0f;
  return read == InPlaceRead::kDenormal ? scale_denormal(bits, x, kp, xs, unscale) : scale_convert(bits, x, kp, xs);
}

void tiles_dot_in_place_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* xs,
                            InPlaceRead read, float unscale, float* out) {
  // denormals-are-zero (MXCSR bit 6, per thread) would read every kDenormal code as 0: off meanwhile
  const unsigned csr = _mm_getcsr(), daz = read == InPlaceRead::kDenormal ? csr & 0x40u : 0u;
  if (daz) _mm_setcsr(csr & ~daz);
  PE_BITS_SWITCH(bits, row_in_place_any, tiles, n, blocks, xs, read, unscale, out)
  if (daz) _mm_setcsr(csr);
}

void tile_dot_i8(const uint8_t* tile, int bits, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                 int32_t* out, int64_t ldo) {
  PE_BITS_SWITCH(bits, dot_i8, tile, blocks, x, ldx, m, out, ldo)
}

void tiles_dot_i8_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* x, int32_t* out) {
  PE_BITS_SWITCH(bits, row_i8_any, tiles, n, blocks, x, out)
}

#define PE_AVX2_EPI __attribute__((target("avx2,fma"), optimize("fp-contract=off")))

// zero points of 4 channels as doubles
PE_AVX2_EPI inline __m256d zero4(const uint8_t* z) {
  int32_t z4;
  std::memcpy(&z4, z, 4);
  return _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4)));
}

PE_AVX2_EPI void finish_fast(const int32_t* ai, double sum, float xscale, const float* s, const uint8_t* z, float* v) {
  for (int c = 0; c < kTileN; c += 4) {
    const __m256d a = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ai + c)));
    const __m256d acc = _mm256_sub_pd(a, _mm256_mul_pd(zero4(z + c), _mm256_set1_pd(sum)));
    const __m128 sx = _mm_mul_ps(_mm_loadu_ps(s + c), _mm_set1_ps(xscale));
    _mm_storeu_ps(v + c, _mm_mul_ps(_mm256_cvtpd_ps(acc), sx));
  }
}

PE_AVX2_EPI void finish_float(const float* af, double sum, const float* s, const uint8_t* z, float* v) {
  for (int c = 0; c < kTileN; c += 4) {
    const __m256d acc = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(af + c)),
                                      _mm256_mul_pd(zero4(z + c), _mm256_set1_pd(sum)));
    _mm_storeu_ps(v + c, _mm_mul_ps(_mm_loadu_ps(s + c), _mm256_cvtpd_ps(acc)));
  }
}

PE_AVX2 float quantize_row(const float* x, int64_t n, int8_t* out, int64_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ));  // inf, NaN
    amax = _mm256_max_ps(amax, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, amax);
  float m = 0.0f;
  for (float v : lanes) m = v > m ? v : m;
  if (_mm256_movemask_ps(bad) != 0 || !absmax_tail(x, i, n, &m)) return NAN;
  const float scale = i8_scale(m), inv = 1.0f / scale;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i acc = _mm256_setzero_si256();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));  // round half to even
    q = _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    acc = _mm256_add_epi32(acc, q);
    int32_t qs[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), q);
    for (int j = 0; j < 8; ++j) out[i + j] = static_cast<int8_t>(qs[j]);
  }
  int32_t accs[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(accs), acc);
  int64_t s = quantize_tail(x, i, n, inv, out);
  for (int32_t v : accs) s += v;
  *sum = s;
  return scale;
}

}  // namespace pe::quant::cpu::avx2

#else  // not x86: never supported, never called

namespace pe::quant::cpu::avx2 {
bool supported() { return false; }
void tile_dot_f32(const uint8_t*, int, int64_t, const float*, int64_t, int64_t, float*, int64_t, float*,
                  const uint8_t*) {
  std::abort();
}
void tiles_dot_f32_row(const uint8_t* const*, int, int, int64_t, const float*, float*) { std::abort(); }
void tile_gemm_grouped_f32(const uint8_t*, int, int64_t, const float*, const uint8_t*, int64_t, int64_t, const float*,
                           int64_t, int64_t, float*, int64_t, float*) {
  std::abort();
}
InPlaceRead preferred_read() { return InPlaceRead::kConvert; }
bool scale_row(int, const float*, int64_t, InPlaceRead, float*, float*) { std::abort(); }
void tiles_dot_in_place_row(const uint8_t* const*, int, int, int64_t, const float*, InPlaceRead, float, float*) {
  std::abort();
}
void tile_dot_i8(const uint8_t*, int, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t) { std::abort(); }
void tiles_dot_i8_row(const uint8_t* const*, int, int, int64_t, const int8_t*, int32_t*) { std::abort(); }
void finish_fast(const int32_t*, double, float, const float*, const uint8_t*, float*) { std::abort(); }
void finish_float(const float*, double, const float*, const uint8_t*, float*) { std::abort(); }
float quantize_row(const float*, int64_t, int8_t*, int64_t*) { std::abort(); }
}  // namespace pe::quant::cpu::avx2
#endif
