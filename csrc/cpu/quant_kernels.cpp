// CPU inner kernels of the packed low-bit matmul (see cpu_quant.h): an AVX-512 (+VNNI) path
// picked at load time, and a portable path on the shared codec in pack.h.
#include "pyeditor/cpu_isa.h"
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "quant_avx2.h"
#include "quant_block.h"

namespace pe::quant::cpu {
namespace {

// ---------------------------------------------------------------- portable path
// One loop for both activation types: fp32 x with fp32 sums (added up in float64: one float32
// chain per channel lost the small result of a long sum that cancels, such as a constant x
// against codes around their zero point, where the SIMD kernels' several partial sums keep it),
// int8 x with int32 sums. z (fp32 only; may be null): the tile's zero points, subtracted from the
// codes (cpu_quant.h tile_dot_f32).
template <class X, class Acc>
void dot_scalar(const uint8_t* tile, int bits, int64_t blocks, const X* x, int64_t ldx, int64_t m, Acc* out,
                int64_t ldo, const uint8_t* z = nullptr) {
  using Wide = std::conditional_t<std::is_same_v<Acc, float>, double, Acc>;
  for (int64_t r = 0; r < m; ++r) {
    Wide acc[kTileN] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = tile + b * block_bytes(bits);
      const X* xr = x + r * ldx + b * kTileK;
      for (int kk = 0; kk < kTileK; ++kk)
        for (int c = 0; c < kTileN; ++c)
          acc[c] += static_cast<Wide>(static_cast<int>(get_code(blk, bits, c, kk)) - (z ? z[c] : 0)) *
                    static_cast<Wide>(xr[kk]);
    }
    for (int c = 0; c < kTileN; ++c) out[r * ldo + c] = static_cast<Acc>(acc[c]);
  }
}

void dot_f32_scalar(const uint8_t* tile, int bits, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                    float* out, int64_t ldo, const uint8_t* z) {
  dot_scalar(tile, bits, blocks, x, ldx, m, out, ldo, z);
}

void dot_i8_scalar(const uint8_t* tile, int bits, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                   int32_t* out, int64_t ldo) {
  dot_scalar(tile, bits, blocks, x, ldx, m, out, ldo);
}

#ifdef PE_QUANT_X86
// A few rows (R <= 3): each block decoded once in registers (centred where z is given) and used
// by every row, four FMA chains per row. A 2-bit code becomes a float by vpermps from a table
// mapping i to i & 3 (it reads only the low 4 bits of each lane), so one shift replaces shift +
// mask + convert and the fields need no mask.
template <int BITS, int R>
PE_AVX512 void rows_direct(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, float* out, int64_t ldo,
                           const uint8_t* z) {
  const __m512 zv = zero_points_ps(z);
  const __m512 table = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  __m512 acc[R * 4];
  for (int i = 0; i < R * 4; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    stream_ahead(tile + b * BITS * 32, BITS * 32);
    __m512i v[4];
    if constexpr (BITS == 2) {
      const __m512i c = _mm512_loadu_si512(tile + b * 64);
      for (int g = 0; g < 4; ++g) v[g] = _mm512_srli_epi32(c, 2 * g);  // field g at bits 8t..8t+1
    } else {
      load_block<BITS>(tile + b * BITS * 32, v);
    }
    const float* xs = x + b * kTileK;
    for (int g = 0; g < 4; ++g) {
      __m512 w[4];
      if constexpr (BITS == 2) {
        w[0] = _mm512_sub_ps(_mm512_permutexvar_ps(v[g], table), zv);
        w[1] = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v[g], 8), table), zv);
        w[2] = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v[g], 16), table), zv);
        w[3] = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v[g], 24), table), zv);
      } else {
        w[0] = _mm512_sub_ps(byte_ps<0>(v[g]), zv), w[1] = _mm512_sub_ps(byte_ps<1>(v[g]), zv);
        w[2] = _mm512_sub_ps(byte_ps<2>(v[g]), zv), w[3] = _mm512_sub_ps(byte_ps<3>(v[g]), zv);
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < 4; ++t)
          acc[r * 4 + t] = _mm512_fmadd_ps(w[t], _mm512_set1_ps(xs[r * ldx + 4 * g + t]), acc[r * 4 + t]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(out + r * ldo, _mm512_add_ps(_mm512_add_ps(acc[r * 4], acc[r * 4 + 1]),
                                                  _mm512_add_ps(acc[r * 4 + 2], acc[r * 4 + 3])));
}

template <int BITS>
PE_AVX512 void dot_f32_few(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, int64_t m, float* out,
                           int64_t ldo, const uint8_t* z) {
  switch (m) {
    case 1: return rows_direct<BITS, 1>(tile, blocks, x, ldx, out, ldo, z);
    case 2: return rows_direct<BITS, 2>(tile, blocks, x, ldx, out, ldo, z);
    case 3: return rows_direct<BITS, 3>(tile, blocks, x, ldx, out, ldo, z);
    default: std::abort();
  }
}

// GEMM path: the tile is decoded once to floats (w[k * 16 + c], q - z where z is given) and
// reused by every row.
template <int BITS>
PE_AVX512 void decode_tile(const uint8_t* tile, int64_t blocks, float* w, const uint8_t* z = nullptr) {
  const __m512 zv = zero_points_ps(z);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i v[4];
    load_block<BITS>(tile + b * BITS * 32, v);
    float* wb = w + b * kTileK * kTileN;
    for (int g = 0; g < 4; ++g) {
      _mm512_storeu_ps(wb + (4 * g + 0) * 16, _mm512_sub_ps(byte_ps<0>(v[g]), zv));
      _mm512_storeu_ps(wb + (4 * g + 1) * 16, _mm512_sub_ps(byte_ps<1>(v[g]), zv));
      _mm512_storeu_ps(wb + (4 * g + 2) * 16, _mm512_sub_ps(byte_ps<2>(v[g]), zv));
      _mm512_storeu_ps(wb + (4 * g + 3) * 16, _mm512_sub_ps(byte_ps<3>(v[g]), zv));
    }
  }
}

// Lookup-table GEMV (2 bits). In a 2-bit block byte t of a lane holds inputs t, 4+t (low nibble)
// and 8+t, 12+t (high nibble); vpermps reads the low 4 bits of each lane, so the lane shifted
// right by 8t (+4) indexes the pair table of those two inputs directly: 8 lookups and 8 adds per
// 256 weights instead of 16 shift + lookup + FMA groups. Tables are stored in reading order.
// (A 16-entry q * x_k table per input for 4 bits measured no faster than convert + FMA.)
PE_AVX512 void build_lut_2bit(const float* x, int64_t kp, float* lut) {
  const __m512 lo = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  const __m512 hi = _mm512_set_ps(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t b = 0; b < kp / kTileK; ++b) {
    const float* xs = x + b * kTileK;
    for (int t = 0; t < 4; ++t)
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(lo, _mm512_set1_ps(xs[8 * h + t])),
                                       _mm512_mul_ps(hi, _mm512_set1_ps(xs[8 * h + 4 + t])));
        _mm512_storeu_ps(lut + ((b * 4 + t) * 2 + h) * 16, v);
      }
  }
}

PE_AVX512 void dot_lut_2bit(const uint8_t* tile, int64_t b0, int64_t b1, const float* lut, float* out) {
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    stream_ahead(tile + b * 64, 64);
    const __m512i c = _mm512_loadu_si512(tile + b * 64);
    const float* tb = lut + b * 8 * 16;
    for (int t = 0; t < 4; ++t) {
      const __m512i v = t ? _mm512_srli_epi32(c, 8 * t) : c;
      acc[2 * t] = _mm512_add_ps(acc[2 * t], _mm512_permutexvar_ps(v, _mm512_loadu_ps(tb + 2 * t * 16)));
      acc[2 * t + 1] = _mm512_add_ps(acc[2 * t + 1], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4),
                                                                            _mm512_loadu_ps(tb + (2 * t + 1) * 16)));
    }
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])),
                                 _mm512_add_ps(_mm512_add_ps(acc[4], acc[5]), _mm512_add_ps(acc[6], acc[7])));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), s));
}

template <int R>
PE_AVX512 void rows_f32(const float* w, int64_t kp, const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    const __m512 wv = _mm512_loadu_ps(w + k * 16);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

template <int BITS>
PE_AVX512 void dot_f32_gemm(const uint8_t* tile, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                            float* out, int64_t ldo, float* w, const uint8_t* z) {
  decode_tile<BITS>(tile, blocks, w, z);
  const int64_t kp = blocks * kTileK;
  constexpr int R = 8;
  int64_t r = 0;
  for (; r + R <= m; r += R) rows_f32<R>(w, kp, x + r * ldx, ldx, out + r * ldo, ldo);
  for (; r < m; ++r) rows_f32<1>(w, kp, x + r * ldx, ldx, out + r * ldo, ldo);
}

// Several tiles, many rows (tiles_gemm_f32): K in chunks of kGemmChunkBlocks blocks; each
// tile's chunk is decoded once and every panel of kGemmPanelRows rows (packed once per call, see
// pack_gemm_panels) runs over all the tiles' chunks. One tile at a time (dot_f32_gemm) re-reads
// every x row per 16 channels from beyond L2; two tiles side by side (24 accumulators) need 14
// loads per 24 FMAs instead of 9 per 8. Each output is still one FMA chain over k in order (sums
// carried between chunks in out): dot_f32_gemm's sums, bit for bit.
constexpr int kPanelRows = kGemmPanelRows;

// o_t[r * 16 + c] (+)= sum_k xp[k * kPanelRows + r] * w_t[k * 16 + c] for R rows and T tiles
template <int R, int T>
PE_AVX512 void panel_rows(const float* xp, int64_t kc, const float* w0, const float* w1, float* o0, float* o1,
                          bool first) {
  __m512 acc[T][R];
  float* o[2] = {o0, o1};
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o[t] + r * 16);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 a = _mm512_loadu_ps(w0 + k * 16);
    const __m512 b = T == 2 ? _mm512_loadu_ps(w1 + k * 16) : a;
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(xp[k * kPanelRows + r]);
      acc[0][r] = _mm512_fmadd_ps(xv, a, acc[0][r]);
      if constexpr (T == 2) acc[1][r] = _mm512_fmadd_ps(xv, b, acc[1][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(o[t] + r * 16, acc[t][r]);
}

// f(std::integral_constant<int, R>{}, xp, r0) for every run of R rows [r0, r0 + R) of m, S at a
// time (the last run shorter): xp is row r0's place in its panel (S divides kPanelRows, so a run
// may start inside a panel). The float and int8 GEMMs walk their panels with it.
template <class F, int... Rs>
inline void with_rows(int rows, F& f, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? f(std::integral_constant<int, Rs + 1>{}) : void()), ...);
}

template <int S, class X, class F>
inline void walk_panels(const X* panels, int64_t panel_stride, int64_t m, F&& f) {
  static_assert(kPanelRows % S == 0, "a run never straddles two panels");
  for (int64_t r0 = 0; r0 < m; r0 += S) {
    const X* xp = panels + (r0 / kPanelRows) * panel_stride + r0 % kPanelRows;
    auto run = [&](auto rows) { f(rows, xp, r0); };
    with_rows(static_cast<int>(m - r0 < S ? m - r0 : S), run, std::make_integer_sequence<int, S>{});
  }
}

// one or two tiles' chunks (w1 null: one) against every panel: the chunks stay in L1 while the
// panels stream from L2
template <int T>
void tiles_panels(const float* panels, int64_t panel_stride, int64_t m, int64_t kc, const float* w0, const float* w1,
                  float* o0, float* o1, bool first) {
  walk_panels<kPanelRows>(panels, panel_stride, m, [&](auto rows, const float* xp, int64_t r0) {
    panel_rows<decltype(rows)::value, T>(xp, kc, w0, w1, o0 + r0 * kTileN, o1 ? o1 + r0 * kTileN : nullptr, first);
  });
}

// Group-wise scales (gs non-null): each block's weights as the reference's, (q - z) * s with its
// group's s and z (the AVX2 dequant_tile's formula, so the same floats).
struct ChunkScales {
  const float* s;    // the tile's group-0 scales, group g at + g * srows
  const uint8_t* z;  // its zero points, likewise
  int64_t srows, group_blocks;
};

// Per-channel (gs null): q - z, z the tile's zero points where given.
template <int BITS>
PE_AVX512 void decode_chunk(const uint8_t* tile, int64_t b0, int64_t nb, float* w, const ChunkScales* gs,
                            const uint8_t* z) {
  decode_tile<BITS>(tile + b0 * BITS * 32, nb, w, gs ? nullptr : z);
  if (!gs) return;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = (b0 + b) / gs->group_blocks;
    const __m512 sv = _mm512_loadu_ps(gs->s + g * gs->srows);
    const __m512 zv = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gs->z + g * gs->srows))));
    float* wb = w + b * kTileK * kTileN;
    for (int kk = 0; kk < kTileK; ++kk)
      _mm512_storeu_ps(wb + kk * kTileN, _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(wb + kk * kTileN), zv), sv));
  }
}

PE_AVX512 void gemm_tiles_avx512(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks,
                                 const ChunkScales* gs, const uint8_t* const* z, const float* panels, int64_t m,
                                 float* out, float* wbuf) {
  const int64_t kp = blocks * kTileK;
  for (int64_t b0 = 0; b0 < blocks; b0 += kGemmChunkBlocks) {
    const int64_t nb = blocks - b0 < kGemmChunkBlocks ? blocks - b0 : kGemmChunkBlocks, kc = nb * kTileK;
    for (int u = 0; u < n; ++u)
      PE_BITS_SWITCH(bits[u], decode_chunk, tiles[u], b0, nb, wbuf + u * kGemmChunkBlocks * kTileK * kTileN,
                     gs ? gs + u : nullptr, z ? z[u] : nullptr)
    const float* xp = panels + b0 * kTileK * kPanelRows;
    const int64_t wstride = kGemmChunkBlocks * kTileK * kTileN, ostride = m * kTileN, pstride = kp * kPanelRows;
    int u = 0;
    for (; u + 2 <= n; u += 2)
      tiles_panels<2>(xp, pstride, m, kc, wbuf + u * wstride, wbuf + (u + 1) * wstride, out + u * ostride,
                      out + (u + 1) * ostride, b0 == 0);
    if (u < n) tiles_panels<1>(xp, pstride, m, kc, wbuf + u * wstride, nullptr, out + u * ostride, nullptr, b0 == 0);
  }
}

// The same for int8 rows (tiles_gemm_i8): a tile's chunk decoded once to one code a byte (the
// 64-byte field vectors of load_block, 16 channels x 4 inputs each), every panel of rows packed
// as 4-input words, one vpdpbusd per row and tile per 4 inputs. Integer sums: exact in any order.
template <int R, int T>
PE_AVX512 void panel_rows_i8(const int32_t* xp, int64_t words, const uint8_t* w0, const uint8_t* w1, int32_t* o0,
                             int32_t* o1, bool first) {
  __m512i acc[T][R];
  int32_t* o[2] = {o0, o1};
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o[t] + r * 16);
  for (int64_t j = 0; j < words; ++j) {
    const __m512i a = _mm512_loadu_si512(w0 + j * 64);
    const __m512i b = T == 2 ? _mm512_loadu_si512(w1 + j * 64) : a;
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_set1_epi32(xp[j * kPanelRows + r]);
      acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], a, xv);
      if constexpr (T == 2) acc[1][r] = _mm512_dpbusd_epi32(acc[1][r], b, xv);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(o[t] + r * 16, acc[t][r]);
}

// int8: runs of at most half a panel, 12 accumulators a call (GCC spills vpdpbusd's
// accumulators beyond that)
template <int T>
void tiles_panels_i8(const int32_t* panels, int64_t panel_stride, int64_t m, int64_t words, const uint8_t* w0,
                     const uint8_t* w1, int32_t* o0, int32_t* o1, bool first) {
  walk_panels<kPanelRows / 2>(panels, panel_stride, m, [&](auto rows, const int32_t* xp, int64_t r0) {
    panel_rows_i8<decltype(rows)::value, T>(xp, words, w0, w1, o0 + r0 * kTileN, o1 ? o1 + r0 * kTileN : nullptr,
                                            first);
  });
}

template <int BITS>
PE_AVX512 void decode_chunk_u8(const uint8_t* tile, int64_t b0, int64_t nb, uint8_t* w) {
  for (int64_t b = 0; b < nb; ++b) {
    __m512i v[4];
    load_block<BITS>(tile + (b0 + b) * BITS * 32, v);
    for (int g = 0; g < 4; ++g) _mm512_storeu_si512(w + (4 * b + g) * 64, v[g]);
  }
}

PE_AVX512 void gemm_tiles_i8_avx512(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks,
                                    const int32_t* panels, int64_t m, int32_t* out, uint8_t* wbuf) {
  const int64_t words_all = blocks * (kTileK / 4), wstride = kGemmChunkBlocksI8 * kTileK * kTileN;
  for (int64_t b0 = 0; b0 < blocks; b0 += kGemmChunkBlocksI8) {
    const int64_t nb = blocks - b0 < kGemmChunkBlocksI8 ? blocks - b0 : kGemmChunkBlocksI8;
    for (int u = 0; u < n; ++u) PE_BITS_SWITCH(bits[u], decode_chunk_u8, tiles[u], b0, nb, wbuf + u * wstride)
    const int32_t* xp = panels + b0 * (kTileK / 4) * kPanelRows;
    const int64_t ostride = m * kTileN, pstride = words_all * kPanelRows, words = nb * (kTileK / 4);
    int u = 0;
    for (; u + 2 <= n; u += 2)
      tiles_panels_i8<2>(xp, pstride, m, words, wbuf + u * wstride, wbuf + (u + 1) * wstride, out + u * ostride,
                         out + (u + 1) * ostride, b0 == 0);
    if (u < n)
      tiles_panels_i8<1>(xp, pstride, m, words, wbuf + u * wstride, nullptr, out + u * ostride, nullptr, b0 == 0);
  }
}

// int8 activations: one vpdpbusd per field feeds 16 channels x 4 inputs. G accumulators per
// row break the dependency chain when there are few rows. `ahead`: this pass is the first over
// the tile (the one that streams it from memory), so it prefetches.
template <int BITS, int R, int G>
PE_AVX512 void rows_i8(const uint8_t* tile, int64_t blocks, const int8_t* x, int64_t ldx, int32_t* out,
                       int64_t ldo, bool ahead) {
  __m512i acc[R * G];
  for (int i = 0; i < R * G; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    if (ahead) stream_ahead(tile + b * BITS * 32, BITS * 32);
    __m512i v[4];
    load_block<BITS>(tile + b * BITS * 32, v);
    for (int g = 0; g < 4; ++g)
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, x + r * ldx + b * kTileK + 4 * g, 4);
        __m512i& a = acc[r * G + g % G];
        a = _mm512_dpbusd_epi32(a, v[g], _mm512_set1_epi32(x4));
      }
  }
  for (int r = 0; r < R; ++r) {
    __m512i s = acc[r * G];
    for (int i = 1; i < G; ++i) s = _mm512_add_epi32(s, acc[r * G + i]);
    _mm512_storeu_si512(out + r * ldo, s);
  }
}

// For 2 and 4 bits, fields 1 and 3 left in place: v[1], v[3] hold codes << kFieldShift<BITS>
// (still u8), which saves vector shifts (measured faster in fast mode on the bench's
// packed_linear/dram/M1 rows); their sums are exact multiples of 2^kFieldShift (int32 still
// exact: codes << shift stay <= 255), shifted back once at the end.
template <int BITS>
constexpr int kFieldShift = BITS == 2 ? 2 : (BITS == 4 ? 4 : 0);
template <int BITS>
PE_AVX512 inline void load_block_shifted(const uint8_t* b, __m512i v[4]) {
  if constexpr (BITS == 2) {
    const __m512i c = _mm512_loadu_si512(b), c4 = _mm512_srli_epi32(c, 4);
    const __m512i lo = _mm512_set1_epi8(0x03), hi = _mm512_set1_epi8(0x0C);
    v[0] = _mm512_and_si512(c, lo), v[1] = _mm512_and_si512(c, hi);
    v[2] = _mm512_and_si512(c4, lo), v[3] = _mm512_and_si512(c4, hi);
  } else if constexpr (BITS == 4) {
    const __m512i c0 = _mm512_loadu_si512(b), c1 = _mm512_loadu_si512(b + 64);
    const __m512i lo = _mm512_set1_epi8(0x0F), hi = _mm512_set1_epi8(char(0xF0));
    v[0] = _mm512_and_si512(c0, lo), v[1] = _mm512_and_si512(c0, hi);
    v[2] = _mm512_and_si512(c1, lo), v[3] = _mm512_and_si512(c1, hi);
  } else {
    load_block<BITS>(b, v);
  }
}

// NT tiles, one row: two accumulators per tile (16 in all) keep the vpdpbusd chains short;
// accumulator 1 takes fields 1 and 3 (shifted for 2 and 4 bits, see load_block_shifted).
template <int BITS, int NT>
PE_AVX512 void row_i8_tiles(const uint8_t* const* tiles, int64_t blocks, const int8_t* x, int32_t* out) {
  __m512i acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i xg[4];
    for (int g = 0; g < 4; ++g) {
      int32_t x4;
      std::memcpy(&x4, x + b * kTileK + 4 * g, 4);
      xg[g] = _mm512_set1_epi32(x4);
    }
    for (int t = 0; t < NT; ++t) {
      const uint8_t* blk = tiles[t] + b * BITS * 32;
      stream_ahead(blk, BITS * 32, kStreamAheadMulti);
      __m512i v[4];
      load_block_shifted<BITS>(blk, v);
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], v[0], xg[0]);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], v[1], xg[1]);
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], v[2], xg[2]);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], v[3], xg[3]);
    }
  }
  for (int t = 0; t < NT; ++t)
    _mm512_storeu_si512(out + t * 16, _mm512_add_epi32(acc[t][0], _mm512_srai_epi32(acc[t][1], kFieldShift<BITS>)));
}

// NT tiles, one float32 row: two accumulators per tile (even and odd inputs), restarted from zero
// every kRowChunk blocks and added to the tile's total, so no float32 chain is longer than 128
// products (two chains over K = 70000: 3x the error of the four-chain GEMV kernel; chunked: 0.2x,
// below torch's float32 GEMV in the same check).
constexpr int64_t kRowChunk = 16;
template <int BITS, int NT>
PE_AVX512 void row_f32_tiles(const uint8_t* const* tiles, int64_t blocks, const float* x, float* out) {
  __m512 acc[NT][2], total[NT];
  for (int t = 0; t < NT; ++t) total[t] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < blocks; b0 += kRowChunk) {
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t b = b0; b < std::min(blocks, b0 + kRowChunk); ++b) {
      const float* xs = x + b * kTileK;
      for (int t = 0; t < NT; ++t) {
        const uint8_t* blk = tiles[t] + b * BITS * 32;
        stream_ahead(blk, BITS * 32, kStreamAheadMulti);
        __m512i v[4];
        load_block<BITS>(blk, v);
        for (int g = 0; g < 4; ++g) {
          acc[t][0] = _mm512_fmadd_ps(byte_ps<0>(v[g]), _mm512_set1_ps(xs[4 * g]), acc[t][0]);
          acc[t][1] = _mm512_fmadd_ps(byte_ps<1>(v[g]), _mm512_set1_ps(xs[4 * g + 1]), acc[t][1]);
          acc[t][0] = _mm512_fmadd_ps(byte_ps<2>(v[g]), _mm512_set1_ps(xs[4 * g + 2]), acc[t][0]);
          acc[t][1] = _mm512_fmadd_ps(byte_ps<3>(v[g]), _mm512_set1_ps(xs[4 * g + 3]), acc[t][1]);
        }
      }
    }
    for (int t = 0; t < NT; ++t) total[t] = _mm512_add_ps(total[t], _mm512_add_ps(acc[t][0], acc[t][1]));
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * 16, total[t]);
}

// Row r of m as kDigits signed base-256 digits of X = round(x * 2^(45 - e)), e = ilogb(max |x|)
// (|X| < 2^46), in A-tile order (cpu_quant.h).
PE_DIGITS bool digits_row(const float* x, int64_t k, int64_t r, int64_t m, int64_t steps, int8_t* digits,
                          int* e_out, int64_t* sx, int* used, int64_t group_size, int64_t* group_sx) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 live = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(live, x + i));
    bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
    amax = _mm512_max_ps(amax, v);
  }
  if (bad) return false;
  const float mx = _mm512_reduce_max_ps(amax);
  const int e = mx > 0.0f ? std::ilogb(mx) : 0;
  const __m512d scale = _mm512_set1_pd(std::ldexp(1.0, 45 - e));
  const int64_t rows = m * kDigits;
  // X + C, C = 128 in each digit's byte, lies in [0, 2^48): its bytes are the digits + 128, so
  // byte d of (X + C) ^ C is digit d as an int8 (no carries to propagate digit by digit)
  static_assert(kDigits == 6, "C has six digit bytes");
  const __m512i C = _mm512_set1_epi64(0x808080808080LL);
  __m512i total = _mm512_setzero_si512(), any = _mm512_setzero_si512(), in_group = _mm512_setzero_si512();
  for (int64_t i = 0; i < steps * 64; i += 8) {
    const __mmask8 live = i >= k ? __mmask8(0) : (k - i >= 8 ? __mmask8(0xFF) : __mmask8((1u << (k - i)) - 1u));
    const __m512i X = _mm512_cvtpd_epi64(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(live, x + i)), scale));
    total = _mm512_add_epi64(total, X);
    if (group_sx && i < k) {  // a group is a multiple of 16 inputs: it ends at an 8-input step
      in_group = _mm512_add_epi64(in_group, X);
      if ((i + 8) % group_size == 0 || i + 8 >= k) {
        group_sx[i / group_size] = _mm512_reduce_add_epi64(in_group);
        in_group = _mm512_setzero_si512();
      }
    }
    const __m512i Z = _mm512_xor_si512(_mm512_add_epi64(X, C), C);
    any = _mm512_or_si512(any, Z);
    int8_t* dst = digits + (i / 64) * rows * 64 + r * kDigits * 64 + i % 64;
    for (int d = 0; d < kDigits; ++d)  // d = 0 is the top digit
      _mm512_mask_cvtepi64_storeu_epi8(dst + d * 64, 0xFF, _mm512_srli_epi64(Z, 8 * (kDigits - 1 - d)));
  }
  *sx = _mm512_reduce_add_epi64(total);
  *e_out = e;
  // byte j of `any` is nonzero iff digit kDigits - 1 - j is nonzero somewhere in the row: the
  // digits below the lowest such byte are all zero (x of few significant bits, as bf16 or fp16
  // activations are: 3-4 digits of 6), and their products need not be computed
  uint64_t live = static_cast<uint64_t>(_mm512_reduce_or_epi64(any));
  int zero_low = 0;
  while (zero_low < kDigits - 1 && (live & 0xFF) == 0) live >>= 8, ++zero_low;
  *used = kDigits - zero_low;
  return true;
}

// NT tiles, one row given as kDigits signed base-256 digits (the AMX A-tile layout of
// split_digits, rows = kDigits): out[(t * kDigits + d) * 16 + c] = sum_k q_t[c, k] digit_d[k],
// exact int32 sums. One vpdpbusd per digit per 4 inputs x 16 channels, for the first ND digits;
// the caller knows the others are zero, so are their sums.
template <int BITS, int NT, int ND>
PE_DIGITS void row_digits_tiles(const uint8_t* const* tiles, int64_t blocks, const int8_t* digits, int32_t* out) {
  static_assert(ND >= 1 && ND <= kDigits, "digits in use");
  __m512i acc[NT][ND];
  for (int t = 0; t < NT; ++t)
    for (int d = 0; d < ND; ++d) acc[t][d] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* xb = digits + (b / 4) * kDigits * 64 + (b % 4) * 16;
    for (int t = 0; t < NT; ++t) {
      const uint8_t* blk = tiles[t] + b * BITS * 32;
      stream_ahead(blk, BITS * 32, kStreamAheadMulti);
      block_digits<BITS, ND>(blk, xb, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int d = 0; d < ND; ++d) _mm512_storeu_si512(out + (t * kDigits + d) * 16, acc[t][d]);
    for (int d = ND; d < kDigits; ++d) _mm512_storeu_si512(out + (t * kDigits + d) * 16, _mm512_setzero_si512());
  }
}

// (at least 3 digits: fewer is rare, and each count is another 16 kernels)
template <int BITS, int NT>
void row_digits_used(const uint8_t* const* tiles, int64_t blocks, const int8_t* digits, int32_t* out, int used) {
  static_assert(kDigits == 6, "one case per digit count");
  switch (used) {
    case 6: return row_digits_tiles<BITS, NT, 6>(tiles, blocks, digits, out);
    case 5: return row_digits_tiles<BITS, NT, 5>(tiles, blocks, digits, out);
    case 4: return row_digits_tiles<BITS, NT, 4>(tiles, blocks, digits, out);
    default: return row_digits_tiles<BITS, NT, 3>(tiles, blocks, digits, out);
  }
}

template <int BITS>
void row_digits_any(const uint8_t* const* tiles, int n, int64_t blocks, const int8_t* digits, int32_t* out,
                    int used) {
  switch (n) {
    case 1: return row_digits_used<BITS, 1>(tiles, blocks, digits, out, used);
    case 2: return row_digits_used<BITS, 2>(tiles, blocks, digits, out, used);
    case 3: return row_digits_used<BITS, 3>(tiles, blocks, digits, out, used);
    default: return row_digits_used<BITS, 4>(tiles, blocks, digits, out, used);
  }
}

// Epilogues of one row of a tile, 16 channels in vectors, with the scalar epilogue's operations in
// its precisions and order (no contraction into FMAs, which would round differently).
#define PE_EPI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), optimize("fp-contract=off")))

PE_EPI bool finish_digits(const int32_t* ai, int64_t sx, double pow2, const float* s, const uint8_t* z, float* v) {
  for (int h = 0; h < 2; ++h) {  // 8 channels a half, int64 lanes
    __m512i acc = _mm512_setzero_si512();
    __m512d est = _mm512_setzero_pd();  // the same sum in float64: is the int64 one exact?
    for (int d = 0; d < kDigits; ++d) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + d * 16 + 8 * h));
      acc = _mm512_add_epi64(acc, _mm512_slli_epi64(_mm512_cvtepi32_epi64(a), 8 * (kDigits - 1 - d)));
      est = _mm512_add_pd(est, _mm512_mul_pd(_mm512_cvtepi32_pd(a), _mm512_set1_pd(std::ldexp(1.0, 8 * (kDigits - 1 - d)))));
    }
    const __m512i zi = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * h)));
    acc = _mm512_sub_epi64(acc, _mm512_mullo_epi64(zi, _mm512_set1_epi64(sx)));
    est = _mm512_sub_pd(est, _mm512_mul_pd(_mm512_cvtepi64_pd(zi), _mm512_set1_pd(static_cast<double>(sx))));
    // |est - exact| < 2^23, so below 2^62 the exact value fits int64 and the wrapped int64 sum is it
    if (_mm512_cmp_pd_mask(_mm512_abs_pd(est), _mm512_set1_pd(0x1p62), _CMP_NLT_UQ)) return false;
    const __m256 f = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi64_pd(acc), _mm512_set1_pd(pow2)));
    _mm256_storeu_ps(v + 8 * h, _mm256_mul_ps(_mm256_loadu_ps(s + 8 * h), f));
  }
  return true;
}

PE_EPI void finish_fast(const int32_t* ai, double sum, float xscale, const float* s, const uint8_t* z, float* v) {
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + 8 * h));
    const __m512d zd = _mm512_cvtepi64_pd(_mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * h))));
    const __m512d acc = _mm512_sub_pd(_mm512_cvtepi32_pd(a), _mm512_mul_pd(zd, _mm512_set1_pd(sum)));
    const __m256 sx = _mm256_mul_ps(_mm256_loadu_ps(s + 8 * h), _mm256_set1_ps(xscale));
    _mm256_storeu_ps(v + 8 * h, _mm256_mul_ps(_mm512_cvtpd_ps(acc), sx));
  }
}

// f(std::integral_constant<int, n>) for a run-time tile count n in 1..kRowTiles
template <class F>
void with_tile_count(int n, F&& f) {
  static_assert(kRowTiles == 8, "one case per tile count");
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <int BITS>
void row_f32_any(const uint8_t* const* tiles, int n, int64_t blocks, const float* x, float* out) {
  with_tile_count(n, [&](auto nt) { row_f32_tiles<BITS, decltype(nt)::value>(tiles, blocks, x, out); });
}

template <int BITS>
void row_i8_any(const uint8_t* const* tiles, int n, int64_t blocks, const int8_t* x, int32_t* out) {
  with_tile_count(n, [&](auto nt) { row_i8_tiles<BITS, decltype(nt)::value>(tiles, blocks, x, out); });
}

template <int BITS>
PE_AVX512 void dot_i8_vnni(const uint8_t* tile, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                           int32_t* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) rows_i8<BITS, 4, 1>(tile, blocks, x + r * ldx, ldx, out + r * ldo, ldo, r == 0);
  for (; r < m; ++r) rows_i8<BITS, 1, 4>(tile, blocks, x + r * ldx, ldx, out + r * ldo, ldo, r == 0);
}

PE_AVX512 float quantize_row_avx512(const float* x, int64_t n, int8_t* out, int64_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf, NaN
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  float m = _mm512_reduce_max_ps(amax);
  if (bad || !absmax_tail(x, i, n, &m)) return NAN;
  const float scale = i8_scale(m), inv = 1.0f / scale;
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i acc = _mm512_setzero_si512();
  i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv));  // round half to even
    q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    acc = _mm512_add_epi32(acc, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(q));
  }
  *sum = _mm512_reduce_add_epi32(acc) + quantize_tail(x, i, n, inv, out);
  return scale;
}

bool detect_vnni() {
#if defined(PE_QUANT_FORCE_PORTABLE) || defined(PE_QUANT_FORCE_AVX2)  // test builds: run the other
  return false;                                                        // paths on a VNNI machine too
#endif
  __builtin_cpu_init();
  return pe::cpu::isa_allows(pe::cpu::kIsaAvx512) && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
const bool kVnni = detect_vnni();
// the digit split also converts float64 <-> int64 in vectors
const bool kDigitsSimd = kVnni && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");

#else
const bool kVnni = false;
const bool kDigitsSimd = false;
#endif

// x86 without AVX-512 VNNI (AMD Zen 2/3, older Intel): the AVX2 + FMA kernels (quant_avx2.cpp)
bool detect_avx2() {
#ifdef PE_QUANT_FORCE_PORTABLE
  return false;
#endif
  return !kVnni && pe::cpu::isa_allows(pe::cpu::kIsaAvx2) && avx2::supported();
}
const bool kAvx2 = detect_avx2();

// below this many rows, decoding in registers per row beats decoding the tile to a buffer
constexpr int64_t kGemmRows = 4;

}  // namespace

void tile_dot_f32(const uint8_t* tile, int bits, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                  float* out, int64_t ldo, float* wbuf, const uint8_t* z) {
#ifdef PE_QUANT_X86
  if (kVnni) {
    if (m < kGemmRows) {
      PE_BITS_SWITCH(bits, dot_f32_few, tile, blocks, x, ldx, m, out, ldo, z)
    } else {
      PE_BITS_SWITCH(bits, dot_f32_gemm, tile, blocks, x, ldx, m, out, ldo, wbuf, z)
    }
    return;
  }
#endif
  if (kAvx2) return avx2::tile_dot_f32(tile, bits, blocks, x, ldx, m, out, ldo, wbuf, z);
  (void)wbuf;
  dot_f32_scalar(tile, bits, blocks, x, ldx, m, out, ldo, z);
}

void pack_gemm_panels(const float* x, int64_t ldx, int64_t m, int64_t kp, int64_t p0, int64_t p1, float* panels) {
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = panels + p * kp * kGemmPanelRows;
    const int64_t rows = m - p * kGemmPanelRows < kGemmPanelRows ? m - p * kGemmPanelRows : kGemmPanelRows;
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x + (p * kGemmPanelRows + r) * ldx;
      for (int64_t k = 0; k < kp; ++k) dst[k * kGemmPanelRows + r] = src[k];
    }
  }
}

void pack_gemm_panels_i8(const int8_t* x, int64_t ldx, int64_t m, int64_t kp, int64_t p0, int64_t p1,
                         int32_t* panels) {
  const int64_t words = kp / 4;
  for (int64_t p = p0; p < p1; ++p) {
    int32_t* dst = panels + p * words * kGemmPanelRows;
    const int64_t rows = m - p * kGemmPanelRows < kGemmPanelRows ? m - p * kGemmPanelRows : kGemmPanelRows;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* src = x + (p * kGemmPanelRows + r) * ldx;
      for (int64_t j = 0; j < words; ++j) std::memcpy(dst + j * kGemmPanelRows + r, src + 4 * j, 4);
    }
  }
}

bool tiles_gemm_i8(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const int32_t* panels,
                   int64_t m, int32_t* out, uint8_t* wbuf) {
  if (n < 1 || n > kGemmTiles) std::abort();  // callers group at most kGemmTiles tiles
#ifdef PE_QUANT_X86
  if (kVnni) {
    gemm_tiles_i8_avx512(tiles, bits, n, blocks, panels, m, out, wbuf);
    return true;
  }
#endif
  (void)tiles, (void)bits, (void)blocks, (void)panels, (void)m, (void)out, (void)wbuf;
  return false;
}

bool tiles_gemm_f32(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const float* panels,
                    int64_t m, float* out, float* wbuf, const uint8_t* const* z) {
  if (n < 1 || n > kGemmTiles) std::abort();  // callers group at most kGemmTiles tiles
#ifdef PE_QUANT_X86
  if (kVnni) {
    gemm_tiles_avx512(tiles, bits, n, blocks, nullptr, z, panels, m, out, wbuf);
    return true;
  }
#endif
  (void)tiles, (void)bits, (void)blocks, (void)panels, (void)m, (void)out, (void)wbuf, (void)z;
  return false;
}

bool tiles_gemm_grouped_f32(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks,
                            const float* const* s, const uint8_t* const* z, int64_t srows, int64_t group_blocks,
                            const float* panels, int64_t m, float* out, float* wbuf) {
  if (n < 1 || n > kGemmTiles || group_blocks < 1) std::abort();
#ifdef PE_QUANT_X86
  if (kVnni) {
    ChunkScales gs[kGemmTiles];
    for (int u = 0; u < n; ++u) gs[u] = {s[u], z[u], srows, group_blocks};
    gemm_tiles_avx512(tiles, bits, n, blocks, gs, nullptr, panels, m, out, wbuf);
    return true;
  }
#endif
  (void)tiles, (void)bits, (void)blocks, (void)s, (void)z, (void)srows, (void)panels, (void)m, (void)out, (void)wbuf;
  return false;
}

int64_t lut_floats(int bits, int64_t kp) { return kVnni && bits == 2 ? kp * 8 : 0; }

void build_lut(int bits, const float* x, int64_t kp, float* lut) {
#ifdef PE_QUANT_X86
  if (kVnni && bits == 2) return build_lut_2bit(x, kp, lut);
#endif
  (void)bits, (void)x, (void)kp, (void)lut;
}

int64_t lut_chunk_blocks(int bits) { return bits == 2 ? 32 : 0; }  // 32 blocks: 16 KiB of tables

void tile_dot_lut(const uint8_t* tile, int bits, int64_t b0, int64_t b1, const float* lut, float* out) {
#ifdef PE_QUANT_X86
  if (kVnni && bits == 2) return dot_lut_2bit(tile, b0, b1, lut, out);
#endif
  (void)tile, (void)bits, (void)b0, (void)b1, (void)lut, (void)out;
}

void tile_dot_i8(const uint8_t* tile, int bits, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                 int32_t* out, int64_t ldo) {
#ifdef PE_QUANT_X86
  if (kVnni) {
    PE_BITS_SWITCH(bits, dot_i8_vnni, tile, blocks, x, ldx, m, out, ldo)
    return;
  }
#endif
  if (kAvx2) return avx2::tile_dot_i8(tile, bits, blocks, x, ldx, m, out, ldo);
  dot_i8_scalar(tile, bits, blocks, x, ldx, m, out, ldo);
}

namespace {
// both one-row entry points: float rows with float sums, int8 rows with int32 sums
template <class X, class Acc>
void tiles_dot_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const X* x, Acc* out) {
  if (n < 1 || n > kRowTiles) std::abort();  // callers group at most kRowTiles tiles
#ifdef PE_QUANT_X86
  if (kVnni) {
    if constexpr (std::is_same_v<X, float>) {
      PE_BITS_SWITCH(bits, row_f32_any, tiles, n, blocks, x, out)
    } else {
      PE_BITS_SWITCH(bits, row_i8_any, tiles, n, blocks, x, out)
    }
    return;
  }
#endif
  if (kAvx2) {
    if constexpr (std::is_same_v<X, float>) return avx2::tiles_dot_f32_row(tiles, n, bits, blocks, x, out);
    else return avx2::tiles_dot_i8_row(tiles, n, bits, blocks, x, out);
  }
  for (int u = 0; u < n; ++u) dot_scalar(tiles[u], bits, blocks, x, 0, 1, out + u * kTileN, kTileN);
}
}  // namespace

void tiles_dot_i8_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* x, int32_t* out) {
  tiles_dot_row(tiles, n, bits, blocks, x, out);
}

void tiles_dot_f32_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* x, float* out) {
  tiles_dot_row(tiles, n, bits, blocks, x, out);
}

InPlaceRead in_place_read() {
  return kAvx2 ? avx2::preferred_read() : InPlaceRead::kConvert;
}

bool in_place_row(int bits, const float* x, int64_t kp, InPlaceRead read, float* xs, float* unscale) {
  return kAvx2 && avx2::scale_row(bits, x, kp, read, xs, unscale);
}

void tiles_dot_in_place_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* xs,
                            InPlaceRead read, float unscale, float* out) {
  if (!kAvx2 || n < 1 || n > kRowTiles) std::abort();  // callers check in_place_row first
  avx2::tiles_dot_in_place_row(tiles, n, bits, blocks, xs, read, unscale, out);
}

bool digits_enabled() { return kDigitsSimd; }

bool grouped_gemm_f32() {
#if defined(PE_QUANT_X86) && !defined(PE_QUANT_FORCE_PORTABLE)
  static const bool ok = pe::cpu::isa_allows(pe::cpu::kIsaAvx2) && avx2::supported();
  return ok;
#else
  return false;
#endif
}

void tile_gemm_grouped_f32(const uint8_t* tile, int bits, int64_t blocks, const float* s, const uint8_t* z,
                           int64_t srows, int64_t group_blocks, const float* x, int64_t ldx, int64_t m, float* out,
                           int64_t ldo, float* wbuf) {
#if defined(PE_QUANT_X86)
  if (grouped_gemm_f32())
    return avx2::tile_gemm_grouped_f32(tile, bits, blocks, s, z, srows, group_blocks, x, ldx, m, out, ldo, wbuf);
#endif
  (void)tile, (void)bits, (void)blocks, (void)s, (void)z, (void)srows, (void)group_blocks, (void)x, (void)ldx;
  (void)m, (void)out, (void)ldo, (void)wbuf;
  std::abort();  // callers check grouped_gemm_f32() first
}

CpuCaps cpu_caps() {
  CpuCaps caps;
  caps.amx = amx_enabled();
  caps.digits = digits_enabled();
  caps.grouped_gemm = grouped_gemm_f32();
  caps.grouped_row = grouped_gemm_f32();  // quant_group_avx2.cpp: AVX2 + FMA, also on AVX-512 CPUs
  caps.tile_gemm = kVnni;                  // tiles_gemm_f32's AVX-512 kernel
  return caps;
}

int64_t digit_bytes(int64_t m, int64_t k) { return (k + 63) / 64 * 64 * m * kDigits; }

bool split_digits(const float* x, int64_t k, int64_t r, int64_t m, int8_t* digits, int* e, int64_t* sx, int* used,
                  int64_t group_size, int64_t* group_sx) {
#ifdef PE_QUANT_X86
  int ignored = 0;
  if (group_sx && (group_size < kTileK || group_size % kTileK != 0)) std::abort();
  if (kDigitsSimd)
    return digits_row(x, k, r, m, (k + 63) / 64, digits, e, sx, used ? used : &ignored, group_size, group_sx);
#endif
  (void)x, (void)k, (void)r, (void)m, (void)digits, (void)e, (void)sx, (void)used, (void)group_size, (void)group_sx;
  std::abort();  // callers check digits_enabled() first
}

bool finish_digits_row(const int32_t* ai, int64_t sx, double pow2, const float* s, const uint8_t* z, float* v) {
#ifdef PE_QUANT_X86
  if (kDigitsSimd) return finish_digits(ai, sx, pow2, s, z, v);
#endif
  (void)ai, (void)sx, (void)pow2, (void)s, (void)z, (void)v;
  return false;  // the caller's scalar epilogue
}

bool finish_fast_row(const int32_t* ai, double sum, float xscale, const float* s, const uint8_t* z, float* v) {
#ifdef PE_QUANT_X86
  if (kDigitsSimd) return finish_fast(ai, sum, xscale, s, z, v), true;
#endif
  if (kAvx2) return avx2::finish_fast(ai, sum, xscale, s, z, v), true;
  (void)ai, (void)sum, (void)xscale, (void)s, (void)z, (void)v;
  return false;
}

bool finish_float_row(const float* af, double sum, const float* s, const uint8_t* z, float* v) {
  if (kAvx2) return avx2::finish_float(af, sum, s, z, v), true;
  (void)af, (void)sum, (void)s, (void)z, (void)v;
  return false;
}

void tiles_dot_digits_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* digits,
                          int32_t* out, int used) {
#ifdef PE_QUANT_X86
  if (kDigitsSimd && n >= 1 && n <= kDigitRowTiles && used >= 1 && used <= kDigits) {
    PE_BITS_SWITCH(bits, row_digits_any, tiles, n, blocks, digits, out, used)
    return;
  }
#endif
  (void)tiles, (void)n, (void)bits, (void)blocks, (void)digits, (void)out, (void)used;
  std::abort();  // callers check digits_enabled() first; never return sums that were not computed
}

float quantize_row_i8(const float* x, int64_t n, int8_t* out, int64_t* sum) {
#ifdef PE_QUANT_X86
  if (kVnni) return quantize_row_avx512(x, n, out, sum);
#endif
  if (kAvx2) return avx2::quantize_row(x, n, out, sum);
  float m = 0.0f;
  if (!absmax_tail(x, 0, n, &m)) return NAN;
  const float scale = i8_scale(m);
  *sum = quantize_tail(x, 0, n, 1.0f / scale, out);
  return scale;
}

const char* quant_simd_level() { return kVnni ? "avx512-vnni" : (kAvx2 ? "avx2" : "scalar"); }

bool one_row_f32_tiles(int bits) { return kAvx2 || bits == 8; }

}  // namespace pe::quant::cpu
