// Packed tiles on Intel AMX, see cpu_quant.h. Two kernels:
// - exact GEMM (bf16 tiles, fp32 accumulators): codes 0..255 are exact in bf16 and a float32
//   activation splits exactly into three bf16 parts (x = hi + mid + lo), so sum_k q x_k is three
//   bf16 tile products accumulated in float32: every product is exact and the adds are float32
//   adds, as on the AVX-512 path, at a fraction of the cost. Each row is first scaled by a power
//   of two (exact) so that no part is a denormal, which AMX would flush to zero.
// - GEMV (int8 tiles, int32 accumulators): the A tile holds fixed-point digits of a few exact
//   rows, or the fast mode's int8 rows; u8 codes are the B tiles.
#include "pyeditor/cpu_isa.h"
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "pyeditor/cpu_quant.h"
#include "quant_block.h"

#ifdef PE_QUANT_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pe::quant::cpu {
namespace {

#ifdef PE_QUANT_X86
#define PE_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-bf16,amx-int8")))

// CPU has AMX-TILE, -BF16 and -INT8 (plus the AVX-512 the decode uses), the OS saves tile state
// (XCR0 bits 17-18), and Linux grants this process the tile data (arch_prctl, once).
bool detect_amx() {
#ifdef PE_QUANT_FORCE_PORTABLE
  return false;
#endif
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)) &&
                      (c & (1u << 11));  // F, DQ, BW, VL, VNNI
  if (!avx512 || !(d & (1u << 24)) || !(d & (1u << 22)) || !(d & (1u << 25))) return false;  // TILE BF16 INT8
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;        // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
const bool kAmx = detect_amx();

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register is 16 rows of 64 bytes: C = 16 rows x 16 float32 channels, A = 16 rows x
// 32 bf16 inputs, B = 16 input pairs x 16 channels x 2 bf16 (the pair layout TDPBF16PS wants).
PE_AMX void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// bf16 bits of each float32 lane, rounded to nearest even; NaN stays NaN.
PE_AMX inline __m512i bf16_rne(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

PE_AMX inline __m512 bf16_to_ps(__m512i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); }

// Parts of one row in tile order: input i of part p at dst[p * part_stride + (i / 32) * 512 +
// i % 32] (one 16 x 32 A tile is 1 KiB contiguous: tile rows 8 KiB apart alias in L1).
PE_AMX void split_row(const float* x, int64_t k, float scale, uint16_t* dst, int64_t part_stride) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 live = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, x + i), s);
    const __m512i h = bf16_rne(v);
    const __m512 r1 = _mm512_sub_ps(v, bf16_to_ps(h));
    const __m512i m = bf16_rne(r1);
    const __m512i l = bf16_rne(_mm512_sub_ps(r1, bf16_to_ps(m)));
    uint16_t* d = dst + (i / 32) * 512 + i % 32;
    _mm512_mask_cvtepi32_storeu_epi16(d, live, h);
    _mm512_mask_cvtepi32_storeu_epi16(d + part_stride, live, m);
    _mm512_mask_cvtepi32_storeu_epi16(d + 2 * part_stride, live, l);
  }
  for (int64_t i = k; i < (k + 31) / 32 * 32; ++i)  // the padding inputs of the last A tile
    for (int p = 0; p < 3; ++p) dst[p * part_stride + (i / 32) * 512 + i % 32] = 0;
}

// max |x| (NaN-blind: a NaN row stays NaN through the parts) and sum_i x_i in float64.
PE_AMX float row_stats(const float* x, int64_t k, double* sum) {
  __m512 amax = _mm512_setzero_ps();
  __m512d s0 = _mm512_setzero_pd(), s1 = s0;
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 live = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  *sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  return _mm512_reduce_max_ps(amax);
}

// Codes of nb blocks as bf16 input pairs: w[(b * 8 + j) * 16 + c] = bf16(q[c][16b + 2j]) |
// bf16(q[c][16b + 2j + 1]) << 16. A code's float32 has zero low half, so bf16 is its top half.
template <int BITS>
PE_AMX void decode_pairs(const uint8_t* tile, int64_t nb, uint32_t* w) {
  for (int64_t b = 0; b < nb; ++b) {
    __m512i v[4];
    load_block<BITS>(tile + b * BITS * 32, v);
    uint32_t* wb = w + b * 8 * 16;
    for (int g = 0; g < 4; ++g) {
      const __m512i f0 = _mm512_castps_si512(byte_ps<0>(v[g])), f1 = _mm512_castps_si512(byte_ps<1>(v[g]));
      const __m512i f2 = _mm512_castps_si512(byte_ps<2>(v[g])), f3 = _mm512_castps_si512(byte_ps<3>(v[g]));
      _mm512_storeu_si512(wb + (2 * g) * 16, _mm512_or_si512(_mm512_srli_epi32(f0, 16), f1));
      _mm512_storeu_si512(wb + (2 * g + 1) * 16, _mm512_or_si512(_mm512_srli_epi32(f2, 16), f3));
    }
  }
}

// C tiles of MB row blocks x NB channel tiles += (hi + mid + lo)[rows, steps * 32] x B over
// `steps` steps of 32 inputs. A tiles: 1 KiB each, `part` apart per part, `rb` apart per row
// block. Registers: C in 0-3, A (one row block, one part) in 4-5, B in 6-7.
template <int MB, int NB>
PE_AMX void tile_block(const uint16_t* a, int64_t part, int64_t rb, const uint32_t* b0, const uint32_t* b1,
                       int64_t steps, float* c00, float* c01, float* c10, float* c11) {
  _tile_loadd(0, c00, 64);
  if constexpr (NB == 2) _tile_loadd(1, c01, 64);
  if constexpr (MB == 2) _tile_loadd(2, c10, 64);
  if constexpr (MB == 2 && NB == 2) _tile_loadd(3, c11, 64);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, b0 + s * 256, 64);
    if constexpr (NB == 2) _tile_loadd(7, b1 + s * 256, 64);
    // both A loads first, then the products in an order that reads B0 twice before B1: measured
    // up to 2x faster than load, use, load, use (a load waits for the products reading its register)
    for (int p = 0; p < 3; ++p) {
      const uint16_t* ap = a + p * part + s * 512;
      _tile_loadd(4, ap, 64);
      if constexpr (MB == 2) _tile_loadd(5, ap + rb, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (MB == 2) _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MB == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c00, 64);
  if constexpr (NB == 2) _tile_stored(1, c01, 64);
  if constexpr (MB == 2) _tile_stored(2, c10, 64);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, c11, 64);
}

PE_AMX void dot_amx(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const uint16_t* planes,
                    int64_t m16, int64_t kp32, int64_t r_begin, int64_t r_end, float* out, uint32_t* wbuf) {
  configure_tiles();
  for (int g = 0; g < n; ++g) std::memset(out + (g * m16 + r_begin) * kTileN, 0, sizeof(float) * (r_end - r_begin) * kTileN);
  const int64_t plane = m16 * kp32, per_tile = kAmxChunkBlocks * 128, steps_all = kp32 / 32;
  for (int64_t b0 = 0; b0 < blocks; b0 += kAmxChunkBlocks) {
    const int64_t nb = std::min<int64_t>(kAmxChunkBlocks, blocks - b0), steps = (nb + 1) / 2;
    for (int g = 0; g < n; ++g) {
      uint32_t* w = wbuf + g * per_tile;
      PE_BITS_SWITCH(bits[g], decode_pairs, tiles[g] + b0 * block_bytes(bits[g]), nb, w)
      if (nb % 2) std::memset(w + nb * 128, 0, 128 * sizeof(uint32_t));  // pairs with zero inputs
    }
    for (int64_t r = r_begin; r < r_end; r += 32) {
      const bool two_m = r + 16 < r_end;
      const uint16_t* a = planes + ((r / 16) * steps_all + b0 / 2) * 512;
      for (int g = 0; g < n; g += 2) {
        const bool two_n = g + 1 < n;
        float* c00 = out + (g * m16 + r) * kTileN;
        float* c01 = c00 + m16 * kTileN;
        float* c10 = c00 + 16 * kTileN;
        float* c11 = c01 + 16 * kTileN;
        const uint32_t* w0 = wbuf + g * per_tile;
        const uint32_t* w1 = w0 + per_tile;
        if (two_m && two_n) tile_block<2, 2>(a, plane, steps_all * 512, w0, w1, steps, c00, c01, c10, c11);
        else if (two_m) tile_block<2, 1>(a, plane, steps_all * 512, w0, w1, steps, c00, c01, c10, c11);
        else if (two_n) tile_block<1, 2>(a, plane, steps_all * 512, w0, w1, steps, c00, c01, c10, c11);
        else tile_block<1, 1>(a, plane, steps_all * 512, w0, w1, steps, c00, c01, c10, c11);
      }
    }
  }
  _tile_release();
}

// ---------------------------------------------------------------- GEMV: fixed-point digits
// B tile of one 64-input step of a tile (16 rows of 64 bytes: input group g of block j at row
// 4j + g, byte c * 4 + t = code of channel c, input 4g + t): the 8-bit layout itself; other
// widths are unpacked into buf. Blocks past the tile's end are zero.
template <int BITS>
PE_AMX const uint8_t* b_tile(const uint8_t* tile, int64_t b0, int64_t blocks, uint8_t* buf) {
  if (BITS == 8 && b0 + 4 <= blocks) return tile + b0 * 256;
  for (int j = 0; j < 4; ++j) {
    __m512i v[4];
    if (b0 + j < blocks) {
      load_block<BITS>(tile + (b0 + j) * BITS * 32, v);
    } else {
      for (int g = 0; g < 4; ++g) v[g] = _mm512_setzero_si512();
    }
    for (int g = 0; g < 4; ++g) _mm512_storeu_si512(buf + (4 * j + g) * 64, v[g]);
  }
  return buf;
}

PE_AMX const uint8_t* b_tile_any(int bits, const uint8_t* tile, int64_t b0, int64_t blocks, uint8_t* buf) {
  switch (bits) {
    case 2: return b_tile<2>(tile, b0, blocks, buf);
    case 4: return b_tile<4>(tile, b0, blocks, buf);
    case 6: return b_tile<6>(tile, b0, blocks, buf);
    default: return b_tile<8>(tile, b0, blocks, buf);
  }
}

// C tiles 0..n-1 (n <= kDigitTiles channel tiles) = digits x codes over all steps. Two kinds of
// waiting are kept off the critical path, each measured to cost several times the products:
// a tile load into a register still read by an unfinished product (registers alternate by step
// parity: A in 2 / 3, B of tile u in 4 + u / 6 + u), and a tile load of bytes just written by
// vector stores (B tiles are unpacked kAhead steps before they are loaded, into a ring of
// buffers).
constexpr int kAhead = 2, kRing = 4;

// one step into registers A, B0, B1 (the _tile_* intrinsics take register numbers as tokens)
#define PE_DIGIT_STEP(A, B0, B1, s)                               \
  do {                                                            \
    _tile_loadd(A, digits + (s) * rows * 64, 64);                 \
    _tile_loadd(B0, src[(s) % kRing][0], 64);                     \
    if (n > 1) _tile_loadd(B1, src[(s) % kRing][1], 64);          \
    _tile_dpbsud(0, A, B0);                                       \
    if (n > 1) _tile_dpbsud(1, A, B1);                            \
  } while (0)

// n channel tiles, two at a time, under one tile configuration (loading it costs about as much
// as a 16-channel x 1024-input pair of tiles). While one pair is multiplied, the next pair's
// codes at the same K position are prefetched into L2: a few sequential streams per core read
// more than one or two (bench/cases_quant.py, read-sum against read-streams), and the packed_linear
// dram M=1 rows measure the gain.
PE_AMX void dot_digits(const uint8_t* const* all_tiles, const int* all_bits, int64_t n_all, int64_t blocks,
                       const int8_t* digits, int64_t rows, int32_t* all_out) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(rows), cfg.colsb[t] = 64;
  for (int t = 4; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) uint8_t buf[kRing][kDigitTiles][1024];
  const int64_t steps = (blocks + 3) / 4;
  for (int64_t t0 = 0; t0 < n_all; t0 += kDigitTiles) {
    const uint8_t* const* tiles = all_tiles + t0;
    const int* bits = all_bits + t0;
    const int n = static_cast<int>(std::min<int64_t>(kDigitTiles, n_all - t0));
    int32_t* out = all_out + t0 * rows * 16;
    const uint8_t* src[kRing][kDigitTiles] = {};
    for (int64_t s = 0; s < std::min<int64_t>(kAhead, steps); ++s)
      for (int u = 0; u < n; ++u) src[s % kRing][u] = b_tile_any(bits[u], tiles[u], 4 * s, blocks, buf[s % kRing][u]);
    _tile_zero(0);
    _tile_zero(1);
    // the next pass's tiles, same K position, into L2: four streams from DRAM instead of two
    const int64_t pf_first = t0 + kDigitTiles, pf_end = std::min<int64_t>(n_all, pf_first + kDigitTiles);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t ahead = s + kAhead;
      if (ahead < steps)
        for (int u = 0; u < n; ++u)
          src[ahead % kRing][u] = b_tile_any(bits[u], tiles[u], 4 * ahead, blocks, buf[ahead % kRing][u]);
      for (int64_t v = pf_first; v < pf_end; ++v) {
        const int64_t bb = block_bytes(all_bits[v]), lo = 4 * s * bb, hi = std::min<int64_t>(blocks, 4 * s + 4) * bb;
        for (int64_t off = lo; off < hi; off += 64) _mm_prefetch(reinterpret_cast<const char*>(all_tiles[v] + off), _MM_HINT_T1);
      }
      if (s % 2 == 0) PE_DIGIT_STEP(2, 4, 5, s);
      else PE_DIGIT_STEP(3, 6, 7, s);
    }
    _tile_stored(0, out, 64);
    if (n > 1) _tile_stored(1, out + rows * 16, 64);
  }
  _tile_release();
}
#else
const bool kAmx = false;
#endif

}  // namespace

bool amx_enabled() {
  const char* env = std::getenv("PYEDITOR_CPU_AMX");
  return kAmx && !(env && env[0] == '0') && pe::cpu::isa_allows(pe::cpu::kIsaAmx);
}

int64_t amx_padded_k(int64_t k) { return (k + 31) / 32 * 32; }

double split_row_bf16(const float* x, int64_t k, int64_t r, int64_t m16, int64_t kp32, uint16_t* parts,
                      double* sum) {
#ifdef PE_QUANT_X86
  if (!kAmx) std::abort();  // callers check amx_enabled() first (this needs AVX-512)
  const float amax = row_stats(x, k, sum);
  int e = 0;
  if (amax > 0.0f && std::isfinite(amax)) e = std::min(126, std::max(-126, std::ilogb(amax)));
  split_row(x, k, std::ldexp(1.0f, -e), parts + ((r / 16) * (kp32 / 32)) * 512 + (r % 16) * 32, m16 * kp32);
  return std::ldexp(1.0, e);
#else
  (void)x, (void)k, (void)r, (void)m16, (void)kp32, (void)parts, (void)sum;
  std::abort();  // callers check amx_enabled() first
#endif
}

void zero_row_bf16(int64_t r, int64_t m16, int64_t kp32, uint16_t* parts) {
  for (int p = 0; p < 3; ++p)
    for (int64_t b = 0; b < kp32 / 32; ++b)
      std::memset(parts + p * m16 * kp32 + ((r / 16) * (kp32 / 32) + b) * 512 + (r % 16) * 32, 0, 32 * sizeof(uint16_t));
}

void tiles_dot_amx(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const uint16_t* planes,
                   int64_t m16, int64_t kp32, int64_t r_begin, int64_t r_end, float* out, uint32_t* wbuf) {
#ifdef PE_QUANT_X86
  if (kAmx && r_begin % 16 == 0 && r_begin <= r_end && r_end <= m16)
    return dot_amx(tiles, bits, n, blocks, planes, m16, kp32, r_begin, r_end, out, wbuf);
#endif
  (void)tiles, (void)bits, (void)n, (void)blocks, (void)planes, (void)m16, (void)kp32, (void)r_begin, (void)r_end;
  (void)out, (void)wbuf;
  std::abort();  // callers check amx_enabled() first; never return sums that were not computed
}

#ifdef PE_QUANT_X86
namespace {
// (fp-contract=off: an FMA would round z * sum differently from the scalar epilogue)
PE_AMX __attribute__((optimize("fp-contract=off"))) void finish_tile(float* acc, int64_t r0, int64_t r1, const double* unscale, const double* sum, const float* s,
                        const uint8_t* z, const float* b) {
  const __m512i zi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
  const __m512d z0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(zi)), z1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(zi, 1));
  const __m512 sv = _mm512_loadu_ps(s), bv = _mm512_loadu_ps(b);
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 a = _mm512_loadu_ps(acc + r * 16);
    const __m512d u = _mm512_set1_pd(unscale[r]), sr = _mm512_set1_pd(sum[r]);
    const __m512d lo = _mm512_sub_pd(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)), u), _mm512_mul_pd(z0, sr));
    const __m512d hi = _mm512_sub_pd(
        _mm512_mul_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))), u),
        _mm512_mul_pd(z1, sr));
    const __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
    _mm512_storeu_ps(acc + r * 16, _mm512_add_ps(_mm512_mul_ps(sv, f), bv));
  }
}
}  // namespace
#endif

void finish_tile_amx(float* acc, int64_t r0, int64_t r1, const double* unscale, const double* sum, const float* s,
                     const uint8_t* z, const float* b) {
#ifdef PE_QUANT_X86
  if (kAmx) return finish_tile(acc, r0, r1, unscale, sum, s, z, b);
#endif
  (void)acc, (void)r0, (void)r1, (void)unscale, (void)sum, (void)s, (void)z, (void)b;
  std::abort();  // callers check amx_enabled() first
}

void tiles_dot_digits(const uint8_t* const* tiles, const int* bits, int64_t n, int64_t blocks, const int8_t* a,
                      int64_t rows, int32_t* out) {
#ifdef PE_QUANT_X86
  if (kAmx && rows >= 1 && rows <= 16) return dot_digits(tiles, bits, n, blocks, a, rows, out);
#endif
  (void)tiles, (void)bits, (void)n, (void)blocks, (void)a, (void)rows, (void)out;
  std::abort();  // callers check amx_enabled() first
}

}  // namespace pe::quant::cpu
