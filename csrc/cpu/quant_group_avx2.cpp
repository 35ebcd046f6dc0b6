// Group-wise one-row kernels on AVX2 + FMA (see quant_group_avx2.h). A tile is walked over its
// whole K as the per-channel one-row kernels walk it (quant_avx2.cpp), with the block reads of
// avx2_codes.h; the FMA chains restart at every group and, at its end, the group's sums are
// reduced and take its scale and zero point in registers:
//   tot += s_g * (acc_g - z_g * xsum_g)
// so a group costs a few vector operations instead of a call, a store of its sums and a float64
// epilogue in memory. The float rows use float32 here: acc_g itself is a float32 sum whose
// rounding error (of the size of z_g * xsum_g where the two nearly cancel) float64 after the fact
// would not remove; this form adds one rounding of that size per group.
#include "quant_group_avx2.h"

#include <cstdlib>

#include "quant_block.h"

#ifdef PE_QUANT_X86
#include "avx2_codes.h"
#include "avx2_in_place_asm.h"

namespace pe::quant::cpu::avx2 {
namespace {

// A tile's groups lie srows entries apart, a stride the hardware prefetchers do not follow: the
// kernels ask for the scales and zero points of a group `ahead` tiles on (one tile walked at a
// time: the rows after these) or of a group further on (tiles walked together).
PE_AVX2 inline void fetch_scales(const GroupedTile& t, int64_t g, int64_t srows, int ahead = 0) {
  _mm_prefetch(reinterpret_cast<const char*>(t.s + g * srows + ahead * kTileN), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(t.z + g * srows + ahead * kTileN), _MM_HINT_T0);
}
constexpr int kTilesAhead = 2;       // float rows: the same group two tiles on
constexpr int64_t kGroupsAhead = 8;  // int8 rows (tiles walked together): eight groups on

// zero points z[0..7] as floats
PE_AVX2 inline __m256 zero8_ps(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}

// acc += block b of the tile at codes against the row x (the per-channel kernel's block reads)
template <int BITS, bool IN_PLACE, InPlaceRead READ>
PE_AVX2 __attribute__((always_inline)) inline void block_f32(const uint8_t* codes, const float* x, int64_t b,
                                                             __m256 acc[2 * kChains], const __m256i masks[4]) {
  const uint8_t* blk = codes + b * BITS * 32;
  const float* xs = x + b * kTileK;
  stream_ahead(blk, BITS * 32);
  if constexpr (IN_PLACE && (BITS == 2 || BITS == 4)) {
    block_in_place_asm<BITS, READ == InPlaceRead::kConvert>(blk, xs, acc, masks);
  } else if constexpr (IN_PLACE) {
    const MaskTable* mt = &kMasks<code_width(BITS)>;
    asm("" : "+r"(mt));  // a memory operand of vpand, not a register (see avx2_codes.h)
    field_fma_in_place<READ, BITS, 0>(blk, xs, acc, mt);
    field_fma_in_place<READ, BITS, 1>(blk, xs, acc, mt);
    field_fma_in_place<READ, BITS, 2>(blk, xs, acc, mt);
    field_fma_in_place<READ, BITS, 3>(blk, xs, acc, mt);
  } else {
    block_fma<BITS>(blk, xs, acc);
  }
}

// One tile, one float32 row: each group's blocks (the last group may hold fewer) into eight
// chains, then tot += s * (acc - z * xsum) per half.
template <int BITS, bool IN_PLACE, InPlaceRead READ>
PE_AVX2 void f32_tile(const GroupedTile& t, int64_t blocks, int64_t group_blocks, int64_t srows, const float* x,
                      float unscale, const float* xsum, float* out) {
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  const __m256i masks[4] = {in_place_mask(BITS, 0), in_place_mask(BITS, 1), in_place_mask(BITS, 2),
                            in_place_mask(BITS, 3)};
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    __m256 acc[2 * kChains];  // flat and zeroed in a loop, as the per-channel kernels keep them
#pragma GCC unroll 8
    for (int c = 0; c < 2 * kChains; ++c) acc[c] = _mm256_setzero_ps();
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    for (int64_t b = b0; b < b1; ++b) block_f32<BITS, IN_PLACE, READ>(t.codes, x, b, acc, masks);
    fetch_scales(t, g, srows, kTilesAhead);
    __m256 a0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m256 a1 = _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]));
    if constexpr (IN_PLACE && READ == InPlaceRead::kDenormal) {  // a power of two: exact
      a0 = _mm256_mul_ps(a0, _mm256_set1_ps(unscale));
      a1 = _mm256_mul_ps(a1, _mm256_set1_ps(unscale));
    }
    const float* sg = t.s + g * srows;
    const uint8_t* zg = t.z + g * srows;
    const __m256 xg = _mm256_broadcast_ss(xsum + g);
    tot0 = _mm256_fmadd_ps(_mm256_loadu_ps(sg), _mm256_fnmadd_ps(zero8_ps(zg), xg, a0), tot0);
    tot1 = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 8), _mm256_fnmadd_ps(zero8_ps(zg + 8), xg, a1), tot1);
  }
  _mm256_storeu_ps(out, tot0);
  _mm256_storeu_ps(out + 8, tot1);
}

template <int BITS, bool IN_PLACE, InPlaceRead READ = InPlaceRead::kConvert>
void f32_tiles(const GroupedTile* tiles, int n, int64_t blocks, int64_t group_blocks, int64_t srows, const float* x,
               float unscale, const float* xsum, float* out) {
  for (int u = 0; u < n; ++u)
    f32_tile<BITS, IN_PLACE, READ>(tiles[u], blocks, group_blocks, srows, x, unscale, xsum, out + u * kTileN);
}

template <int BITS>
void f32_any(const GroupedTile* tiles, int n, int64_t blocks, int64_t group_blocks, int64_t srows, const float* x,
             const InPlaceRead* read, float unscale, const float* xsum, float* out) {
  if (!read) f32_tiles<BITS, false>(tiles, n, blocks, group_blocks, srows, x, unscale, xsum, out);
  else if (*read == InPlaceRead::kDenormal)
    f32_tiles<BITS, true, InPlaceRead::kDenormal>(tiles, n, blocks, group_blocks, srows, x, unscale, xsum, out);
  else f32_tiles<BITS, true, InPlaceRead::kConvert>(tiles, n, blocks, group_blocks, srows, x, unscale, xsum, out);
}

// NT tiles, one int8 row, walked together block by block (NT streams from memory, as the
// per-channel int8 row kernel walks them); per group, exact int32 sums acc - z * xsum, then
// tot += s * float(that).
template <int BITS, int NT>
PE_AVX2 void i8_tiles(const GroupedTile* tiles, int64_t blocks, int64_t group_blocks, int64_t srows, const int8_t* x,
                      const int32_t* xsum, float xscale, float* out) {
  __m256 tot[2 * NT];
#pragma GCC unroll 8
  for (int i = 0; i < 2 * NT; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < kGroupsAhead; ++g)
    for (int u = 0; u < NT; ++u) fetch_scales(tiles[u], g, srows);
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    __m256i acc[2 * NT];
#pragma GCC unroll 8
    for (int i = 0; i < 2 * NT; ++i) acc[i] = _mm256_setzero_si256();
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    for (int64_t b = b0; b < b1; ++b)
      for (int u = 0; u < NT; ++u) {
        const uint8_t* blk = tiles[u].codes + b * BITS * 32;
        stream_ahead(blk, BITS * 32, kStreamAheadMulti);
        half_rows_i8<BITS, 1>(blk, x + b * kTileK, 0, acc + 2 * u);
        half_rows_i8<BITS, 1>(blk + 32, x + b * kTileK, 0, acc + 2 * u + 1);
      }
    const __m256i xg = _mm256_set1_epi32(xsum[g]);
#pragma GCC unroll 8
    for (int u = 0; u < NT; ++u) {
      const float* sg = tiles[u].s + g * srows;
      const uint8_t* zg = tiles[u].z + g * srows;
      for (int h = 0; h < 2; ++h) {
        const __m256i zh = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zg + 8 * h)));
        const __m256i d = _mm256_sub_epi32(acc[2 * u + h], _mm256_mullo_epi32(zh, xg));  // |d| < 2^31
        tot[2 * u + h] = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 8 * h), _mm256_cvtepi32_ps(d), tot[2 * u + h]);
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < NT; ++u) fetch_scales(tiles[u], g + kGroupsAhead, srows);
  }
  const __m256 xs = _mm256_set1_ps(xscale);
#pragma GCC unroll 8
  for (int i = 0; i < 2 * NT; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(tot[i], xs));
}

template <int BITS>
void i8_any(const GroupedTile* tiles, int n, int64_t blocks, int64_t group_blocks, int64_t srows, const int8_t* x,
            const int32_t* xsum, float xscale, float* out) {
  for (int u = 0; u < n; u += 4) {  // at most 4 tiles together: 8 int32 sums and 8 totals
    const GroupedTile* t = tiles + u;
    float* o = out + u * kTileN;
    switch (n - u < 4 ? n - u : 4) {
      case 1: i8_tiles<BITS, 1>(t, blocks, group_blocks, srows, x, xsum, xscale, o); break;
      case 2: i8_tiles<BITS, 2>(t, blocks, group_blocks, srows, x, xsum, xscale, o); break;
      case 3: i8_tiles<BITS, 3>(t, blocks, group_blocks, srows, x, xsum, xscale, o); break;
      default: i8_tiles<BITS, 4>(t, blocks, group_blocks, srows, x, xsum, xscale, o); break;
    }
  }
}

}  // namespace

void grouped_f32_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks, int64_t srows,
                     const float* x, const InPlaceRead* read, float unscale, const float* xsum, float* out) {
  if (n < 1 || n > kRowTiles || group_blocks < 1) std::abort();
  // denormals-are-zero (MXCSR bit 6, per thread) would read every kDenormal code as 0: off meanwhile
  const unsigned csr = _mm_getcsr(), daz = read && *read == InPlaceRead::kDenormal ? csr & 0x40u : 0u;
  if (daz) _mm_setcsr(csr & ~daz);
  PE_BITS_SWITCH(bits, f32_any, tiles, n, blocks, group_blocks, srows, x, read, unscale, xsum, out)
  if (daz) _mm_setcsr(csr);
}

void grouped_i8_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks, int64_t srows,
                    const int8_t* x, const int32_t* xsum, float xscale, float* out) {
  if (n < 1 || n > kRowTiles || group_blocks < 1) std::abort();
  PE_BITS_SWITCH(bits, i8_any, tiles, n, blocks, group_blocks, srows, x, xsum, xscale, out)
}

}  // namespace pe::quant::cpu::avx2

#else  // not x86: the plan never picks these

namespace pe::quant::cpu::avx2 {
void grouped_f32_row(const GroupedTile*, int, int, int64_t, int64_t, int64_t, const float*, const InPlaceRead*, float,
                     const float*, float*) {
  std::abort();
}
void grouped_i8_row(const GroupedTile*, int, int, int64_t, int64_t, int64_t, const int8_t*, const int32_t*, float,
                    float*) {
  std::abort();
}
}  // namespace pe::quant::cpu::avx2
#endif
