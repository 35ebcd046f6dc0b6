// Group-wise scales, one exact row on AVX-512 VNNI (cpu_quant.h tiles_grouped_digits_row): the
// per-channel digit row (quant_kernels.cpp row_digits_tiles) with its sums restarted at every
// group. A group's kDigits int32 sums (16 channels each) are paired in int32 (digit d and d + 1:
// 256 * S_d + S_{d+1}, |.| < 2^30) and the three pairs joined in float64, then
//   tot += s_g * (V_g - z_g * group_sx[g])
// in float64 registers: a few vector operations a group instead of a store and an epilogue.
#include <cstdlib>
#include <cstring>

#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "quant_block.h"

namespace pe::quant::cpu {

#ifdef PE_QUANT_X86
namespace {

// A tile's groups lie srows entries apart, a stride the hardware prefetchers do not follow.
constexpr int64_t kScalesAhead = 8;  // groups
// Codes asked for this far ahead of each tile's stream: farther than the per-channel rows'
// kStreamAheadMulti, as the group epilogues leave longer gaps between a stream's reads (bench: the
// realmodel generate row, whose layers come from the last-level cache, and the dram g64 row).
constexpr int64_t kGroupAhead = kStreamAhead;
PE_DIGITS inline void fetch_group(const GroupedTile& t, int64_t g, int64_t srows) {
  _mm_prefetch(reinterpret_cast<const char*>(t.s + g * srows), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(t.z + g * srows), _MM_HINT_T0);
}

// 256 * a + b in each int32 lane (digit d and d + 1 of one group: |result| < 2^30)
PE_DIGITS inline __m512i pair(__m512i a, __m512i b) { return _mm512_add_epi32(_mm512_slli_epi32(a, 8), b); }

// float64 of the 8 int32 lanes of half h
template <int H>
PE_DIGITS inline __m512d half_pd(__m512i v) {
  if constexpr (H == 0) return _mm512_cvtepi32_pd(_mm512_castsi512_si256(v));
  return _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1));
}

// tot[h] += s * (V - z * xs) for one tile's group: acc its ND digit sums
template <int ND, int H>
PE_DIGITS inline __m512d add_group(__m512d tot, const __m512i* acc, const float* s, const uint8_t* z, __m512d xs) {
  const __m512i hi = pair(acc[0], ND > 1 ? acc[1] : _mm512_setzero_si512());  // weight 2^32
  __m512d v = _mm512_mul_pd(half_pd<H>(hi), _mm512_set1_pd(0x1p32));
  if constexpr (ND > 2) {  // digits 2, 3: weight 2^16; then 4, 5: weight 1 (exact: below 2^47)
    __m512d lo = _mm512_mul_pd(half_pd<H>(pair(acc[2], ND > 3 ? acc[3] : _mm512_setzero_si512())),
                               _mm512_set1_pd(0x1p16));
    if constexpr (ND > 4) lo = _mm512_add_pd(lo, half_pd<H>(pair(acc[4], ND > 5 ? acc[5] : _mm512_setzero_si512())));
    v = _mm512_add_pd(v, lo);
  }
  const __m512d zd = _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * H))));
  const __m512d sd = _mm512_cvtps_pd(_mm256_loadu_ps(s + 8 * H));
  return _mm512_fmadd_pd(sd, _mm512_fnmadd_pd(zd, xs, v), tot);
}

template <int BITS, int NT, int ND>
PE_DIGITS void grouped_tiles(const GroupedTile* t, int64_t blocks, int64_t group_blocks, int64_t srows,
                             const int8_t* digits, const int64_t* group_sx, double pow2, float* out) {
  static_assert(ND >= 1 && ND <= kDigits, "digits in use");
  __m512d tot[NT][2];
  for (int u = 0; u < NT; ++u) tot[u][0] = tot[u][1] = _mm512_setzero_pd();
  for (int64_t g = 0; g < kScalesAhead; ++g)
    for (int u = 0; u < NT; ++u) fetch_group(t[u], g, srows);
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    __m512i acc[NT][ND];
    for (int u = 0; u < NT; ++u)
      for (int d = 0; d < ND; ++d) acc[u][d] = _mm512_setzero_si512();
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* xb = digits + (b / 4) * kDigits * 64 + (b % 4) * 16;
      for (int u = 0; u < NT; ++u) {
        const uint8_t* blk = t[u].codes + b * BITS * 32;
        stream_ahead(blk, BITS * 32, kGroupAhead);
        block_digits<BITS, ND>(blk, xb, acc[u]);
      }
    }
    const __m512d xs = _mm512_set1_pd(static_cast<double>(group_sx[g]));
    for (int u = 0; u < NT; ++u) {
      const float* s = t[u].s + g * srows;
      const uint8_t* z = t[u].z + g * srows;
      tot[u][0] = add_group<ND, 0>(tot[u][0], acc[u], s, z, xs);
      tot[u][1] = add_group<ND, 1>(tot[u][1], acc[u], s, z, xs);
      fetch_group(t[u], g + kScalesAhead, srows);
    }
  }
  const __m512d p = _mm512_set1_pd(pow2);
  for (int u = 0; u < NT; ++u)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + u * kTileN + 8 * h, _mm512_cvtpd_ps(_mm512_mul_pd(tot[u][h], p)));
}

// (at least 3 digits, as the per-channel row: fewer is rare)
template <int BITS, int NT>
void grouped_used(const GroupedTile* t, int64_t blocks, int64_t group_blocks, int64_t srows, const int8_t* digits,
                  int used, const int64_t* group_sx, double pow2, float* out) {
  static_assert(kDigits == 6, "one case per digit count");
  switch (used) {
    case 6: return grouped_tiles<BITS, NT, 6>(t, blocks, group_blocks, srows, digits, group_sx, pow2, out);
    case 5: return grouped_tiles<BITS, NT, 5>(t, blocks, group_blocks, srows, digits, group_sx, pow2, out);
    case 4: return grouped_tiles<BITS, NT, 4>(t, blocks, group_blocks, srows, digits, group_sx, pow2, out);
    default: return grouped_tiles<BITS, NT, 3>(t, blocks, group_blocks, srows, digits, group_sx, pow2, out);
  }
}

// up to kDigitRowTiles tiles a pass (as many streams from memory, as the per-channel digit row):
// with 6 digits their sums take 24 registers and the compiler keeps some totals in L1
template <int BITS>
void grouped_any(const GroupedTile* t, int n, int64_t blocks, int64_t group_blocks, int64_t srows,
                 const int8_t* digits, int used, const int64_t* group_sx, double pow2, float* out) {
  static_assert(kDigitRowTiles == 4, "one case per tile count");
  for (int u = 0; u < n; u += kDigitRowTiles) {
    switch (n - u < kDigitRowTiles ? n - u : kDigitRowTiles) {
      case 1: grouped_used<BITS, 1>(t + u, blocks, group_blocks, srows, digits, used, group_sx, pow2, out + u * kTileN); break;
      case 2: grouped_used<BITS, 2>(t + u, blocks, group_blocks, srows, digits, used, group_sx, pow2, out + u * kTileN); break;
      case 3: grouped_used<BITS, 3>(t + u, blocks, group_blocks, srows, digits, used, group_sx, pow2, out + u * kTileN); break;
      default: grouped_used<BITS, 4>(t + u, blocks, group_blocks, srows, digits, used, group_sx, pow2, out + u * kTileN); break;
    }
  }
}

}  // namespace
#endif

void tiles_grouped_digits_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks,
                              int64_t srows, const int8_t* digits, int used, const int64_t* group_sx, double pow2,
                              float* out) {
#ifdef PE_QUANT_X86
  if (digits_enabled() && n >= 1 && n <= kRowTiles && group_blocks >= 1 && group_blocks * kTileK <= kMaxDigitGroup &&
      used >= 1 && used <= kDigits) {
    PE_BITS_SWITCH(bits, grouped_any, tiles, n, blocks, group_blocks, srows, digits, used, group_sx, pow2, out)
    return;
  }
#endif
  (void)tiles, (void)n, (void)bits, (void)blocks, (void)group_blocks, (void)srows, (void)digits, (void)used;
  (void)group_sx, (void)pow2, (void)out;
  std::abort();  // callers check digits_enabled() first; never return sums that were not computed
}

}  // namespace pe::quant::cpu
