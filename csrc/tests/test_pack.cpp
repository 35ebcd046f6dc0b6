// Framework-free tests of the packed layout (pack.h) and the CPU tile kernels (cpu_quant.h):
// every code written with put_code reads back with get_code, and the SIMD kernels' dot products
// equal a direct sum over get_code for every width and row count (AMX GEMM and GEMV, and the
// one-row kernels over several tiles, the digit row kernel included).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"

namespace q = pe::quant;

static int failures = 0;
#define EXPECT(cond, ...)                  \
  do {                                     \
    if (!(cond)) {                         \
      std::printf("FAIL %s:%d ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);            \
      std::printf("\n");                   \
      ++failures;                          \
    }                                      \
  } while (0)

// n tiles of random codes over k inputs, tile g of width width_of(g); codes[(g * 16 + c) * k + i].
struct RandomTiles {
  std::vector<std::vector<uint8_t>> tiles;
  std::vector<int> bits;
  std::vector<unsigned> codes;
};
template <class Width>
RandomTiles random_tiles(std::mt19937& rng, int64_t n, int64_t k, Width width_of) {
  RandomTiles t{std::vector<std::vector<uint8_t>>(n), std::vector<int>(n), std::vector<unsigned>(n * q::kTileN * k)};
  for (int64_t g = 0; g < n; ++g) {
    const int bits = t.bits[g] = width_of(g);
    t.tiles[g].assign(q::tile_bytes(bits, k), 0);
    for (int c = 0; c < q::kTileN; ++c)
      for (int64_t i = 0; i < k; ++i) {
        const unsigned v = rng() & ((1u << bits) - 1u);
        t.codes[(g * q::kTileN + c) * k + i] = v;
        q::put_code(t.tiles[g].data() + (i / q::kTileK) * q::block_bytes(bits), bits, c, static_cast<int>(i % q::kTileK), v);
      }
  }
  return t;
}

// Group-wise digit row (tiles_grouped_digits_row): split_digits' group sums are those of the
// fixed-point row, and every output is the exact group-wise sum rounded (float64 inside the kernel:
// a few roundings of 2^-53 of the terms' magnitudes, then the float32 one), for groups of 32, 64
// and 128 inputs, a ragged last group and a ragged last block, 1..kRowTiles tiles, every width,
// scales and zero points at a stride of more than the tiles' rows. Rows:
// - low_zero < 0: x[0] = 1 against codes 0 and zero points 0, the other x near 2^-30 (X below
//   2^16): every output comes from the three low digits alone, far above its float32 rounding;
// - low_zero = L >= 0: x of a few bits above 2^(8L - 45) and x[0] = 1 (L = 0: any x), so the low
//   L digits are zero; the kernel told only 6 - L digits are in use writes the same bits.
void check_grouped_digits(std::mt19937& rng, const int* widths, int n_widths) {
  for (int64_t blocks : {int64_t(1), int64_t(7), int64_t(12)})
    for (int64_t group_blocks : {int64_t(2), int64_t(4), int64_t(8)}) {
      const int64_t kp = blocks * q::kTileK, k = kp - 5, gs = group_blocks * q::kTileK;
      const int64_t groups = (k + gs - 1) / gs;
      for (int low_zero : {-1, 0, 3, 4, 5}) {
        std::vector<float> x(k);
        for (auto& v : x)
          v = std::ldexp(static_cast<float>(static_cast<int>(rng() % 2000001) - 1000000), static_cast<int>(rng() % 20) - 20);
        if (low_zero < 0) {
          for (auto& v : x) v = std::ldexp(static_cast<float>(static_cast<int>(rng() % 65535) - 32767), -45);
        } else if (low_zero > 0) {
          const int abits = std::min(20, 45 - 8 * low_zero);
          for (auto& v : x)
            v = std::ldexp(static_cast<float>(static_cast<int>(rng() % (1u << abits)) - (1 << (abits - 1))), 8 * low_zero - 45);
        }
        if (low_zero != 0) x[0] = 1.0f;
        std::vector<int8_t> digits(q::cpu::digit_bytes(1, k), 0);
        std::vector<int64_t> gsx(groups, -1);
        int e = 0, used = 0;
        int64_t sx = 0;
        EXPECT(q::cpu::split_digits(x.data(), k, 0, 1, digits.data(), &e, &sx, &used, gs, gsx.data()), "digit row");
        EXPECT(low_zero <= 0 || used == q::cpu::kDigits - low_zero, "digits in use %d", used);
        std::vector<int64_t> X(kp, 0);
        for (int64_t i = 0; i < k; ++i) {
          X[i] = std::llrint(std::ldexp(double(x[i]), 45 - e));
          EXPECT(gsx[i / gs] != -1, "group %ld sum", long(i / gs));
        }
        for (int64_t g = 0; g < groups; ++g) {
          int64_t want = 0;
          for (int64_t i = g * gs; i < std::min(k, (g + 1) * gs); ++i) want += X[i];
          EXPECT(gsx[g] == want, "group sum %ld: %lld, want %lld", long(g), (long long)gsx[g], (long long)want);
        }
        const double pow2 = std::ldexp(1.0, e - 45);
        for (int wi = 0; wi < n_widths; ++wi)
          for (int n = 1; n <= q::cpu::kRowTiles; n += (n < 5 ? 1 : 3)) {
            const int bits = widths[wi];
            RandomTiles rt = random_tiles(rng, n, kp, [&](int64_t) { return bits; });
            const int64_t srows = n * q::kTileN + 32;
            std::vector<float> s(groups * srows);
            std::vector<uint8_t> z(groups * srows);
            for (auto& v : s) v = std::ldexp(static_cast<float>(rng() % 100000 + 1), -20);
            for (auto& v : z) v = low_zero < 0 ? 0 : static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
            if (low_zero < 0)  // input 0 (x = 1) meets only codes 0: the tiles packed again
              for (int u = 0; u < n; ++u) {
                std::fill(rt.tiles[u].begin(), rt.tiles[u].end(), uint8_t(0));
                for (int c = 0; c < q::kTileN; ++c)
                  for (int64_t i = 0; i < kp; ++i) {
                    unsigned& code = rt.codes[(u * q::kTileN + c) * kp + i];
                    if (i == 0) code = 0;
                    q::put_code(rt.tiles[u].data() + (i / q::kTileK) * q::block_bytes(bits), bits, c,
                                static_cast<int>(i % q::kTileK), code);
                  }
              }
            std::vector<q::cpu::GroupedTile> tiles(n);
            for (int u = 0; u < n; ++u) tiles[u] = {rt.tiles[u].data(), s.data() + u * q::kTileN, z.data() + u * q::kTileN};
            std::vector<float> out(n * q::kTileN), all(n * q::kTileN);
            q::cpu::tiles_grouped_digits_row(tiles.data(), n, bits, blocks, group_blocks, srows, digits.data(), used,
                                             gsx.data(), pow2, out.data());
            q::cpu::tiles_grouped_digits_row(tiles.data(), n, bits, blocks, group_blocks, srows, digits.data(),
                                             q::cpu::kDigits, gsx.data(), pow2, all.data());
            EXPECT(out == all, "grouped digit row with %d digits in use: bits=%d n=%d", used, bits, n);
            for (int u = 0; u < n; ++u)
              for (int c = 0; c < q::kTileN; ++c) {
                long double want = 0.0L, mag = 0.0L;
                for (int64_t g = 0; g < groups; ++g) {
                  int64_t v = 0;
                  for (int64_t i = g * gs; i < std::min(k, (g + 1) * gs); ++i)
                    v += int64_t(rt.codes[(u * q::kTileN + c) * kp + i]) * X[i];
                  const int64_t zg = z[g * srows + u * q::kTileN + c];
                  const long double sg = s[g * srows + u * q::kTileN + c];
                  want += sg * static_cast<long double>(v - zg * gsx[g]);
                  mag += sg * (std::fabs(static_cast<long double>(v)) + std::fabs(static_cast<long double>(zg * gsx[g])));
                }
                want *= pow2, mag *= pow2;
                const float got = out[u * q::kTileN + c], w = static_cast<float>(want);
                const double tol = std::ldexp(std::fabs(double(w)), -24) + std::ldexp(double(mag), -49);
                EXPECT(std::fabs(double(got) - double(want)) <= tol, "grouped digit row bits=%d n=%d blocks=%ld g=%ld "
                       "tile=%d c=%d: %.9g, want %.9g", bits, n, long(blocks), long(gs), u, c, double(got), double(w));
              }
          }
      }
    }
}

int main() {
  std::mt19937 rng(7);
  const int widths[] = {2, 4, 6, 8};
  for (int bits : widths) {
    const int64_t blocks = 5, k = blocks * q::kTileK;
    std::vector<uint8_t> tile(q::tile_bytes(bits, k), 0);
    std::vector<unsigned> codes(q::kTileN * k);
    for (int c = 0; c < q::kTileN; ++c)
      for (int64_t i = 0; i < k; ++i) {
        const unsigned v = rng() & ((1u << bits) - 1u);
        codes[c * k + i] = v;
        q::put_code(tile.data() + (i / q::kTileK) * q::block_bytes(bits), bits, c, static_cast<int>(i % q::kTileK), v);
      }
    for (int c = 0; c < q::kTileN; ++c)
      for (int64_t i = 0; i < k; ++i) {
        const unsigned got = q::get_code(tile.data() + (i / q::kTileK) * q::block_bytes(bits), bits, c,
                                         static_cast<int>(i % q::kTileK));
        EXPECT(got == codes[c * k + i], "bits=%d c=%d k=%ld got %u want %u", bits, c, long(i), got, codes[c * k + i]);
      }
    for (int64_t m : {1, 2, 3, 4, 7, 8, 9, 11}) {  // the few-row kernels, GEMM row groups and every remainder
      std::vector<float> x(m * k), outf(m * q::kTileN), wbuf(k * q::kTileN);
      std::vector<int8_t> xq(m * k);
      std::vector<int32_t> outi(m * q::kTileN);
      for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 200) - 100) / 8.0f;  // exact sums
      for (auto& v : xq) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      q::cpu::tile_dot_f32(tile.data(), bits, blocks, x.data(), k, m, outf.data(), q::kTileN, wbuf.data());
      q::cpu::tile_dot_i8(tile.data(), bits, blocks, xq.data(), k, m, outi.data(), q::kTileN);
      for (int64_t r = 0; r < m; ++r)
        for (int c = 0; c < q::kTileN; ++c) {
          double wf = 0;
          int64_t wi = 0;
          for (int64_t i = 0; i < k; ++i) {
            wf += double(codes[c * k + i]) * x[r * k + i];
            wi += int64_t(codes[c * k + i]) * xq[r * k + i];
          }
          EXPECT(outf[r * q::kTileN + c] == static_cast<float>(wf), "f32 bits=%d m=%ld", bits, long(m));
          EXPECT(outi[r * q::kTileN + c] == wi, "i8 bits=%d m=%ld", bits, long(m));
        }
      // centred codes (zero points given): the sums of (q - z) x, exactly, on every path m takes
      {
        std::vector<uint8_t> zp(q::kTileN);
        for (auto& v : zp) v = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
        std::vector<float> outc(m * q::kTileN, NAN);
        q::cpu::tile_dot_f32(tile.data(), bits, blocks, x.data(), k, m, outc.data(), q::kTileN, wbuf.data(), zp.data());
        for (int64_t r = 0; r < m; ++r)
          for (int c = 0; c < q::kTileN; ++c) {
            double want = 0;
            for (int64_t i = 0; i < k; ++i) want += (double(codes[c * k + i]) - zp[c]) * x[r * k + i];
            EXPECT(outc[r * q::kTileN + c] == static_cast<float>(want), "centred f32 bits=%d m=%ld c=%d got %g want %g",
                   bits, long(m), c, outc[r * q::kTileN + c], want);
          }
      }
      // the lookup-table GEMV (where this CPU and width have one), walked in two K ranges
      const int64_t per_row = q::cpu::lut_floats(bits, k);
      if (per_row > 0 && m == 1) {
        std::vector<float> lut(per_row), outl(q::kTileN, 0.0f);
        q::cpu::build_lut(bits, x.data(), k, lut.data());
        q::cpu::tile_dot_lut(tile.data(), bits, 0, 2, lut.data(), outl.data());
        q::cpu::tile_dot_lut(tile.data(), bits, 2, blocks, lut.data(), outl.data());
        for (int c = 0; c < q::kTileN; ++c) {
          double want = 0;
          for (int64_t i = 0; i < k; ++i) want += double(codes[c * k + i]) * x[i];
          EXPECT(outl[c] == static_cast<float>(want), "lut bits=%d c=%d got %g want %g", bits, c, outl[c], want);
        }
      }
    }
  }
  std::printf("lookup-table GEMV widths on this CPU:%s\n", q::cpu::lut_floats(2, 16) ? " 2" : " none");
  // the AMX GEMM: 9 tiles of mixed widths (a group of 8 and one), row counts off the 16 grid, K
  // with an odd number of blocks and past one chunk; x in multiples of 1/8 so sums are exact
  if (q::cpu::amx_enabled()) {
    for (int64_t blocks : {int64_t(5), q::cpu::kAmxChunkBlocks + 1}) {
      const int64_t k = blocks * q::kTileK, kp32 = q::cpu::amx_padded_k(k), n_tiles = 9;
      const RandomTiles rt = random_tiles(rng, n_tiles, k, [&](int64_t g) { return widths[g % 4]; });
      const auto& tiles = rt.tiles;
      const auto& bits = rt.bits;
      const auto& codes = rt.codes;
      for (int64_t m : {1, 17, 33}) {
        const int64_t m16 = (m + 15) / 16 * 16;
        std::vector<float> x(m * k);
        for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 9) - 4) / 8.0f;
        // bf16 NaN everywhere first: a value the helpers leave unwritten would poison the sums
        std::vector<uint16_t> parts(3 * m16 * kp32, 0x7FC0);
        std::vector<double> unscale(m), sum(m);
        for (int64_t r = 0; r < m; ++r)
          unscale[r] = q::cpu::split_row_bf16(x.data() + r * k, k, r, m16, kp32, parts.data(), &sum[r]);
        for (int64_t r = m; r < m16; ++r) q::cpu::zero_row_bf16(r, m16, kp32, parts.data());
        std::vector<float> out(q::cpu::kAmxGroup * m16 * q::kTileN);
        std::vector<uint32_t> wbuf(q::cpu::kAmxGroup * q::cpu::kAmxChunkBlocks * 128);
        for (int64_t g0 = 0; g0 < n_tiles; g0 += q::cpu::kAmxGroup) {
          const int n = static_cast<int>(std::min<int64_t>(q::cpu::kAmxGroup, n_tiles - g0));
          const uint8_t* ptrs[q::cpu::kAmxGroup];
          for (int u = 0; u < n; ++u) ptrs[u] = tiles[g0 + u].data();
          // rows in two ranges (the second starting past a 32-row pair when m16 allows)
          const int64_t split = m16 > 32 ? 32 : m16;
          q::cpu::tiles_dot_amx(ptrs, bits.data() + g0, n, blocks, parts.data(), m16, kp32, 0, split, out.data(),
                                wbuf.data());
          q::cpu::tiles_dot_amx(ptrs, bits.data() + g0, n, blocks, parts.data(), m16, kp32, split, m16, out.data(),
                                wbuf.data());
          for (int u = 0; u < n; ++u)
            for (int64_t r = 0; r < m; ++r)
              for (int c = 0; c < q::kTileN; ++c) {
                double want = 0, xs = 0;
                for (int64_t i = 0; i < k; ++i) {
                  want += double(codes[((g0 + u) * q::kTileN + c) * k + i]) * x[r * k + i];
                  xs += x[r * k + i];
                }
                const double got = out[(u * m16 + r) * q::kTileN + c] * unscale[r];
                EXPECT(got == want, "amx k=%ld m=%ld tile=%ld c=%d got %g want %g", long(k), long(m), long(g0 + u), c,
                       got, want);
                EXPECT(sum[r] == xs, "amx row sum m=%ld r=%ld", long(m), long(r));
              }
          for (int u = 0; u < n; ++u)  // padding rows: zero_row_bf16 left zeros, not NaN
            for (int64_t r = m; r < m16; ++r)
              for (int c = 0; c < q::kTileN; ++c)
                EXPECT(out[(u * m16 + r) * q::kTileN + c] == 0.0f, "amx padding row m=%ld r=%ld", long(m), long(r));
        }
      }
    }
  }
  // many rows against 1..kGemmTiles tiles of mixed widths at once (37 blocks: two whole K chunks
  // and a partial one; row counts around the 12-row panel): tile_dot_f32's sums bit for bit, on
  // arbitrary floats, where this CPU has the kernel
  {
    const int64_t blocks = 37, k = blocks * q::kTileK;
    const RandomTiles rt = random_tiles(rng, q::cpu::kGemmTiles, k, [&](int64_t u) { return widths[(u * 3) % 4]; });
    std::vector<const uint8_t*> ptrs(q::cpu::kGemmTiles);
    for (int u = 0; u < q::cpu::kGemmTiles; ++u) ptrs[u] = rt.tiles[u].data();
    std::vector<float> chunks(q::cpu::kGemmTiles * q::cpu::kGemmChunkBlocks * q::kTileK * q::kTileN);
    std::vector<float> wbuf(k * q::kTileN);
    bool ran = false;
    for (int64_t m : {4, 5, 12, 13, 25}) {
      std::vector<float> x(m * k);
      for (auto& v : x) v = static_cast<float>(rng()) / 4294967296.0f * 8.0f - 4.0f;
      std::vector<float> panels(q::cpu::gemm_panel_floats(m, k), NAN);  // packed in two calls
      q::cpu::pack_gemm_panels(x.data(), k, m, k, 0, 1, panels.data());
      q::cpu::pack_gemm_panels(x.data(), k, m, k, 1, q::cpu::gemm_panels(m), panels.data());
      // raw codes, and centred ones (each tile's own zero points)
      std::vector<uint8_t> zp(q::cpu::kGemmTiles * q::kTileN);
      std::vector<const uint8_t*> zs(q::cpu::kGemmTiles);
      for (int u = 0; u < q::cpu::kGemmTiles; ++u) {
        for (int c = 0; c < q::kTileN; ++c) zp[u * q::kTileN + c] = static_cast<uint8_t>(rng() & ((1u << rt.bits[u]) - 1u));
        zs[u] = zp.data() + u * q::kTileN;
      }
      for (int n = 1; n <= q::cpu::kGemmTiles; ++n)
        for (bool centred : {false, true}) {
          std::vector<float> got(n * m * q::kTileN, NAN), want(m * q::kTileN);
          if (!q::cpu::tiles_gemm_f32(ptrs.data(), rt.bits.data(), n, blocks, panels.data(), m, got.data(),
                                      chunks.data(), centred ? zs.data() : nullptr))
            break;
          ran = true;
          for (int u = 0; u < n; ++u) {
            q::cpu::tile_dot_f32(ptrs[u], rt.bits[u], blocks, x.data(), k, m, want.data(), q::kTileN, wbuf.data(),
                                 centred ? zs[u] : nullptr);
            for (int64_t i = 0; i < m * q::kTileN; ++i)
              EXPECT(got[u * m * q::kTileN + i] == want[i], "gemm tiles n=%d u=%d m=%ld centred=%d i=%ld got %g want %g",
                     n, u, long(m), int(centred), long(i), got[u * m * q::kTileN + i], want[i]);
          }
        }
    }
    // group-wise scales (groups of 2 blocks, the last ragged): the sums of (q - z) * s against x,
    // exact here (s in {1, 1/2}, x in multiples of 1/8 within +-2: every partial sum fits float32)
    {
      const int64_t group_blocks = 2, groups = (blocks + group_blocks - 1) / group_blocks;
      const int64_t srows = q::cpu::kGemmTiles * q::kTileN, m = 13;
      std::vector<float> sc(groups * srows);
      std::vector<uint8_t> zc(groups * srows);
      for (auto& v : sc) v = (rng() & 1) ? 1.0f : 0.5f;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t c = 0; c < srows; ++c) zc[g * srows + c] = static_cast<uint8_t>(rng() & ((1u << rt.bits[c / q::kTileN]) - 1));
      std::vector<float> x(m * k);
      for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 33) - 16) / 8.0f;
      std::vector<float> panels(q::cpu::gemm_panel_floats(m, k));
      q::cpu::pack_gemm_panels(x.data(), k, m, k, 0, q::cpu::gemm_panels(m), panels.data());
      std::vector<const float*> sp(q::cpu::kGemmTiles);
      std::vector<const uint8_t*> zp(q::cpu::kGemmTiles);
      for (int u = 0; u < q::cpu::kGemmTiles; ++u) sp[u] = sc.data() + u * q::kTileN, zp[u] = zc.data() + u * q::kTileN;
      const int n = q::cpu::kGemmTiles - 3;
      std::vector<float> got(n * m * q::kTileN, NAN);
      if (q::cpu::tiles_gemm_grouped_f32(ptrs.data(), rt.bits.data(), n, blocks, sp.data(), zp.data(), srows,
                                         group_blocks, panels.data(), m, got.data(), chunks.data())) {
        for (int u = 0; u < n; ++u)
          for (int64_t r = 0; r < m; ++r)
            for (int c = 0; c < q::kTileN; ++c) {
              const int64_t ch = u * q::kTileN + c;
              double want = 0;
              for (int64_t i = 0; i < k; ++i) {
                const int64_t g = i / (group_blocks * q::kTileK);
                want += (double(rt.codes[ch * k + i]) - zc[g * srows + ch]) * sc[g * srows + ch] * x[r * k + i];
              }
              EXPECT(got[(u * m + r) * q::kTileN + c] == static_cast<float>(want), "grouped gemm u=%d r=%ld c=%d", u,
                     long(r), c);
            }
      }
    }
    // int8 rows: 70 blocks (one whole int8 chunk and a partial one), exact int32 sums
    const int64_t blocks8 = 70, k8 = blocks8 * q::kTileK;
    const RandomTiles r8 = random_tiles(rng, q::cpu::kGemmTiles, k8, [&](int64_t u) { return widths[(u * 5) % 4]; });
    std::vector<const uint8_t*> p8(q::cpu::kGemmTiles);
    for (int u = 0; u < q::cpu::kGemmTiles; ++u) p8[u] = r8.tiles[u].data();
    std::vector<uint8_t> chunks8(q::cpu::kGemmTiles * q::cpu::kGemmChunkBlocksI8 * q::kTileK * q::kTileN);
    for (int64_t m : {4, 13, 25}) {
      std::vector<int8_t> xq(m * k8);
      for (auto& v : xq) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      std::vector<int32_t> panels(q::cpu::gemm_panel_floats(m, k8) / 4, -1);
      q::cpu::pack_gemm_panels_i8(xq.data(), k8, m, k8, 0, q::cpu::gemm_panels(m), panels.data());
      for (int n : {1, 2, 5, q::cpu::kGemmTiles}) {
        std::vector<int32_t> got(n * m * q::kTileN, -1), want(m * q::kTileN);
        if (!q::cpu::tiles_gemm_i8(p8.data(), r8.bits.data(), n, blocks8, panels.data(), m, got.data(), chunks8.data()))
          break;
        for (int u = 0; u < n; ++u) {
          q::cpu::tile_dot_i8(p8[u], r8.bits[u], blocks8, xq.data(), k8, m, want.data(), q::kTileN);
          for (int64_t i = 0; i < m * q::kTileN; ++i)
            EXPECT(got[u * m * q::kTileN + i] == want[i], "gemm i8 tiles n=%d u=%d m=%ld i=%ld", n, u, long(m), long(i));
        }
      }
    }
    std::printf("multi-tile GEMM on this CPU: %s\n", ran ? "checked" : "none");
  }
  // one row against 1..kRowTiles tiles of one width at once (float and int8 rows; 37 blocks: two
  // whole float chunks and a partial one); x in multiples of 1/8 so the float sums are exact
  for (int bits : widths) {
    const int64_t blocks = 37, k = blocks * q::kTileK;
    const RandomTiles rt = random_tiles(rng, q::cpu::kRowTiles, k, [&](int64_t) { return bits; });
    std::vector<float> x(k);
    std::vector<int8_t> xq(k);
    for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 201) - 100) / 8.0f;
    for (auto& v : xq) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    std::vector<const uint8_t*> ptrs(q::cpu::kRowTiles);
    for (int u = 0; u < q::cpu::kRowTiles; ++u) ptrs[u] = rt.tiles[u].data();
    for (int n = 1; n <= q::cpu::kRowTiles; ++n) {
      std::vector<float> outf(n * q::kTileN, NAN);
      std::vector<int32_t> outi(n * q::kTileN, -1);
      q::cpu::tiles_dot_f32_row(ptrs.data(), n, bits, blocks, x.data(), outf.data());
      q::cpu::tiles_dot_i8_row(ptrs.data(), n, bits, blocks, xq.data(), outi.data());
      for (int u = 0; u < n; ++u)
        for (int c = 0; c < q::kTileN; ++c) {
          double wf = 0;
          int64_t wi = 0;
          for (int64_t i = 0; i < k; ++i) {
            wf += double(rt.codes[(u * q::kTileN + c) * k + i]) * x[i];
            wi += int64_t(rt.codes[(u * q::kTileN + c) * k + i]) * xq[i];
          }
          EXPECT(outf[u * q::kTileN + c] == static_cast<float>(wf), "f32 row bits=%d n=%d tile=%d c=%d", bits, n, u, c);
          EXPECT(outi[u * q::kTileN + c] == wi, "i8 row bits=%d n=%d tile=%d c=%d", bits, n, u, c);
        }
    }
  }
  // one row with the codes read in place (AVX2): the same sums as tiles_dot_f32_row, bit for bit,
  // for full-mantissa x over 60 binades (kConvert) or 57 (kDenormal: its scaled sums must stay
  // normal; also under denormals-are-zero, which the kernel turns off meanwhile); x near the
  // smallest normal floats, over too many binades, or NaN, is refused (the caller then takes
  // tiles_dot_f32_row)
  const bool in_place_path = std::strcmp(q::cpu::quant_simd_level(), "avx2") == 0;
  for (q::cpu::InPlaceRead read : {q::cpu::InPlaceRead::kConvert, q::cpu::InPlaceRead::kDenormal})
    for (int bits : widths) {
      const bool denormal = read == q::cpu::InPlaceRead::kDenormal;
      const int64_t blocks = 37, k = blocks * q::kTileK;
      const RandomTiles rt = random_tiles(rng, q::cpu::kRowTiles, k, [&](int64_t) { return bits; });
      std::vector<float> x(k), xs(k);
      const int binades = denormal ? 57 : 60;
      for (auto& v : x)
        v = std::ldexp(static_cast<float>(static_cast<int32_t>(rng()) % (1 << 24)), static_cast<int>(rng() % binades) - 50);
      float unscale = 0.0f;
      const bool ok = q::cpu::in_place_row(bits, x.data(), k, read, xs.data(), &unscale);
      EXPECT(ok == in_place_path, "in-place row read=%d bits=%d: %d on %s", int(read), bits, int(ok), q::cpu::quant_simd_level());
      if (!ok) continue;
      std::vector<const uint8_t*> ptrs(q::cpu::kRowTiles);
      for (int u = 0; u < q::cpu::kRowTiles; ++u) ptrs[u] = rt.tiles[u].data();
      for (int daz = 0; daz <= (denormal ? 1 : 0); ++daz)
        for (int n : {1, 3, q::cpu::kRowTiles}) {
          std::vector<float> want(n * q::kTileN, NAN), got(n * q::kTileN, -1.0f);
          q::cpu::tiles_dot_f32_row(ptrs.data(), n, bits, blocks, x.data(), want.data());
#if defined(__x86_64__)
          const unsigned csr = _mm_getcsr();
          if (daz) _mm_setcsr(csr | 0x40u);
#endif
          q::cpu::tiles_dot_in_place_row(ptrs.data(), n, bits, blocks, xs.data(), read, unscale, got.data());
#if defined(__x86_64__)
          const bool daz_kept = (_mm_getcsr() & 0x40u) == (daz ? 0x40u : 0u);
          _mm_setcsr(csr);
          EXPECT(daz_kept, "in-place row read=%d changed the caller's denormals-are-zero flag", int(read));
#endif
          EXPECT(std::memcmp(want.data(), got.data(), sizeof(float) * want.size()) == 0,
                 "in-place row read=%d bits=%d n=%d daz=%d", int(read), bits, n, daz);
        }
      std::vector<float> bad = x;
      bad[16 * 10 + 6] = 0x1.000002p-125f;  // input 6 of a block (scaled by 2^-2 or less): its low bit lost
      EXPECT(!q::cpu::in_place_row(bits, bad.data(), k, read, xs.data(), &unscale), "in-place row took a value it cannot scale");
      bad[16 * 10 + 6] = NAN;
      EXPECT(!q::cpu::in_place_row(bits, bad.data(), k, read, xs.data(), &unscale), "in-place row took NaN");
      if (denormal) {
        bad[0] = 0x1p28f, bad[16 * 10 + 6] = 0x1p-60f;  // 89 binades
        EXPECT(!q::cpu::in_place_row(bits, bad.data(), k, read, xs.data(), &unscale), "denormal read took 89 binades");
        bad[16 * 10 + 6] = 0x1p101f;
        EXPECT(!q::cpu::in_place_row(bits, bad.data(), k, read, xs.data(), &unscale), "denormal read took 2^101");
      }
    }
  // the AMX fixed-point GEMV: 1-2 rows, tiles of every width in pairs and alone, K with a
  // partial 64-input step (8-bit unpacked there) and not; x in multiples of 1/8 so sums are exact
  if (q::cpu::amx_enabled()) {
    for (int64_t blocks : {int64_t(5), int64_t(12)}) {
      const int64_t k = blocks * q::kTileK, n_tiles = 5;
      const RandomTiles rt = random_tiles(rng, n_tiles, k, [&](int64_t g) { return widths[(g + 3) % 4]; });
      const auto& tiles = rt.tiles;
      const auto& bits = rt.bits;
      const auto& codes = rt.codes;
      for (int64_t m = 1; m <= q::cpu::kDigitRowsMax; ++m) {
        std::vector<float> x(m * k);
        for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 201) - 100) / 8.0f;
        std::vector<int8_t> digits(q::cpu::digit_bytes(m, k), 0);
        std::vector<int> e(m);
        std::vector<int64_t> sx(m);
        for (int64_t r = 0; r < m; ++r)
          EXPECT(q::cpu::split_digits(x.data() + r * k, k, r, m, digits.data(), &e[r], &sx[r]), "digits row %ld", long(r));
        std::vector<int32_t> out(n_tiles * m * q::cpu::kDigits * q::kTileN);
        std::vector<const uint8_t*> ptrs(n_tiles);
        for (int64_t u = 0; u < n_tiles; ++u) ptrs[u] = tiles[u].data();
        q::cpu::tiles_dot_digits(ptrs.data(), bits.data(), n_tiles, blocks, digits.data(), m * q::cpu::kDigits,
                                 out.data());
        for (int64_t u = 0; u < n_tiles; ++u)
          for (int64_t r = 0; r < m; ++r) {
            double xs = 0;
            for (int64_t i = 0; i < k; ++i) xs += x[r * k + i];
            EXPECT(std::ldexp(static_cast<double>(sx[r]), e[r] - 45) == xs, "digits sum m=%ld r=%ld", long(m), long(r));
            for (int c = 0; c < q::kTileN; ++c) {
              double want = 0, got = 0;
              for (int64_t i = 0; i < k; ++i) want += double(codes[(u * q::kTileN + c) * k + i]) * x[r * k + i];
              for (int d = 0; d < q::cpu::kDigits; ++d)
                got += std::ldexp(double(out[((u * m + r) * q::cpu::kDigits + d) * q::kTileN + c]),
                                  8 * (q::cpu::kDigits - 1 - d) + e[r] - 45);
              EXPECT(got == want, "digits k=%ld m=%ld tile=%ld c=%d got %g want %g", long(k), long(m), long(u), c,
                     got, want);
            }
          }
      }
      std::vector<float> bad(k, 1.0f);
      std::vector<int8_t> digits(q::cpu::digit_bytes(1, k), 0);
      int e0;
      int64_t sx0;
      bad[k / 2] = INFINITY;
      EXPECT(!q::cpu::split_digits(bad.data(), k, 0, 1, digits.data(), &e0, &sx0), "inf row accepted");
      bad[k / 2] = NAN;
      EXPECT(!q::cpu::split_digits(bad.data(), k, 0, 1, digits.data(), &e0, &sx0), "NaN row accepted");
    }
  }
  std::printf("AMX GEMM and GEMV on this CPU: %s\n", q::cpu::amx_enabled() ? "yes (checked)" : "no");
  // the one-row digit kernel (AVX-512 VNNI): 1..4 tiles of each width, K with partial 64-input
  // steps and not, x over 40 binades (every digit in use, -128 included); the digits must
  // rebuild the fixed-point row, and each digit's sum is checked as an integer against them
  if (q::cpu::digits_enabled()) {
    for (int64_t blocks : {int64_t(1), int64_t(5), int64_t(12), int64_t(37)}) {
      const int64_t k = blocks * q::kTileK;
      std::vector<float> x(k);
      for (auto& v : x)
        v = std::ldexp(static_cast<float>(static_cast<int>(rng() % 2000001) - 1000000), static_cast<int>(rng() % 40) - 40);
      // the largest |x| among the entries kept (x[0], x[1] are overwritten below: were it one of
      // them, the row's exponent would move and X would not be 128)
      float mx = 0.0f;
      for (size_t i = 2; i < x.size(); ++i) mx = std::max(mx, std::fabs(x[i]));
      // X = 128 (= 1 * 256 - 128) and X = -128: the lowest digit at -128 both ways
      x[0] = std::ldexp(1.0f, std::ilogb(mx) - 38);
      if (k > 1) x[1] = -x[0];
      std::vector<int8_t> digits(q::cpu::digit_bytes(1, k), 0);
      int e = 0;
      int64_t sx = 0;
      EXPECT(q::cpu::split_digits(x.data(), k, 0, 1, digits.data(), &e, &sx), "digit row");
      EXPECT(digits[(q::cpu::kDigits - 1) * 64] == -128 && digits[(q::cpu::kDigits - 2) * 64] == 1, "digits of 128");
      // the digits rebuild the fixed-point row: X_i = sum_d 256^(kDigits - 1 - d) digit_d, sum X = sx
      int64_t xsum = 0;
      for (int64_t i = 0; i < k; ++i) {
        int64_t X = 0;
        for (int d = 0; d < q::cpu::kDigits; ++d) X = X * 256 + digits[(i / 64) * q::cpu::kDigits * 64 + d * 64 + i % 64];
        EXPECT(X == std::llrint(std::ldexp(double(x[i]), 45 - e)), "digits of x[%ld]", long(i));
        xsum += X;
      }
      EXPECT(xsum == sx, "digit row sum");
      for (int bits : widths)
        for (int n = 1; n <= q::cpu::kDigitRowTiles; ++n) {
          const RandomTiles rt = random_tiles(rng, n, k, [&](int64_t) { return bits; });
          std::vector<const uint8_t*> ptrs(n);
          for (int u = 0; u < n; ++u) ptrs[u] = rt.tiles[u].data();
          std::vector<int32_t> out(n * q::cpu::kDigits * q::kTileN);
          q::cpu::tiles_dot_digits_row(ptrs.data(), n, bits, blocks, digits.data(), out.data());
          for (int u = 0; u < n; ++u)
            for (int d = 0; d < q::cpu::kDigits; ++d)
              for (int c = 0; c < q::kTileN; ++c) {
                int64_t want = 0;
                for (int64_t i = 0; i < k; ++i)
                  want += int64_t(rt.codes[(u * q::kTileN + c) * k + i]) *
                          digits[(i / 64) * q::cpu::kDigits * 64 + d * 64 + i % 64];
                EXPECT(out[(u * q::cpu::kDigits + d) * q::kTileN + c] == want,
                       "digit row bits=%d n=%d blocks=%ld tile=%d digit=%d c=%d", bits, n, long(blocks), u, d, c);
              }
        }
      // rows whose low digits are all zero: x = a * 2^(8 (6 - want) - 45) with integers |a| below
      // 2^(8 want - 2) (of at most 20 bits), one x of 1 (so e = 0) and one of a = 1, so exactly
      // `want` digits are in use; the kernel given that count writes the same sums as with all six
      for (int want = 1; want <= q::cpu::kDigits; ++want) {
        const int lsb = 8 * (q::cpu::kDigits - want) - 45, abits = std::min(20, 8 * want - 2);
        std::vector<float> xw(k);
        for (auto& v : xw)
          v = std::ldexp(static_cast<float>(static_cast<int64_t>(rng() % (1u << abits)) - (1 << (abits - 1))), lsb);
        xw[0] = 1.0f;
        if (k > 1) xw[k - 1] = std::ldexp(1.0f, lsb);
        std::vector<int8_t> dw(q::cpu::digit_bytes(1, k), 0);
        int ew = 0, used = 0;
        int64_t sxw = 0;
        EXPECT(q::cpu::split_digits(xw.data(), k, 0, 1, dw.data(), &ew, &sxw, &used), "digit row");
        EXPECT(used == (k > 1 ? want : 1), "digits in use: %d, want %d (k=%ld)", used, want, long(k));
        for (int64_t i = 0; i < k; ++i)
          for (int d = used; d < q::cpu::kDigits; ++d)
            EXPECT(dw[(i / 64) * q::cpu::kDigits * 64 + d * 64 + i % 64] == 0, "digit %d of x[%ld] not zero", d, long(i));
        for (int bits : widths)
          for (int n = 1; n <= q::cpu::kDigitRowTiles; ++n) {
            const RandomTiles rt = random_tiles(rng, n, k, [&](int64_t) { return bits; });
            std::vector<const uint8_t*> ptrs(n);
            for (int u = 0; u < n; ++u) ptrs[u] = rt.tiles[u].data();
            std::vector<int32_t> all(n * q::cpu::kDigits * q::kTileN), some(all.size(), 0x5A5A5A5A);
            q::cpu::tiles_dot_digits_row(ptrs.data(), n, bits, blocks, dw.data(), all.data());
            q::cpu::tiles_dot_digits_row(ptrs.data(), n, bits, blocks, dw.data(), some.data(), used);
            EXPECT(all == some, "digit row with %d digits in use: bits=%d n=%d blocks=%ld", used, bits, n, long(blocks));
          }
      }
    }
  }
  if (q::cpu::digits_enabled()) check_grouped_digits(rng, widths, 4);
  std::printf("digit GEMV row kernel on this CPU: %s\n", q::cpu::digits_enabled() ? "yes (checked)" : "no");
  // the vector epilogues against the scalar formulas of quant_linear_cpu.cpp, bit for bit; digit
  // sums from small to int32-extreme, so some rows leave the int64 path (return false)
  {
    int vector_rows = 0, fallback_rows = 0, float_rows = 0;
    for (int trial = 0; trial < 400; ++trial) {
      float s[16], v[16];
      uint8_t z[16];
      int32_t ai[q::cpu::kDigits * 16];
      const int shift = trial % 32;  // magnitude of the digit sums: up to 2^31
      for (int c = 0; c < 16; ++c) {
        s[c] = std::ldexp(static_cast<float>(rng() % 100000 + 1), -20 - static_cast<int>(rng() % 10));
        z[c] = static_cast<uint8_t>(rng() % 256);
      }
      for (auto& a : ai) a = static_cast<int32_t>(static_cast<int64_t>(rng()) - 2147483648LL) >> (31 - shift);
      const int64_t sx = (static_cast<int64_t>(rng()) - 2147483648LL) << (trial % 31);
      const double pow2 = std::ldexp(1.0, static_cast<int>(rng() % 60) - 100);
      if (q::cpu::finish_digits_row(ai, sx, pow2, s, z, v)) {
        ++vector_rows;
        for (int c = 0; c < 16; ++c) {
          __int128 acc = 0;
          for (int d = 0; d < q::cpu::kDigits; ++d)
            acc += static_cast<__int128>(ai[d * 16 + c]) << (8 * (q::cpu::kDigits - 1 - d));
          acc -= static_cast<__int128>(z[c]) * sx;
          const float want = s[c] * static_cast<float>(static_cast<double>(acc) * pow2);
          EXPECT(v[c] == want, "digit epilogue trial=%d c=%d: %a vs %a", trial, c, v[c], want);
        }
      } else {
        ++fallback_rows;
      }
      const double sum = static_cast<double>(sx) * 1e-3;
      const float xscale = std::ldexp(static_cast<float>(rng() % 1000 + 1), -12);
      if (q::cpu::finish_fast_row(ai, sum, xscale, s, z, v))
        for (int c = 0; c < 16; ++c) {
          const double acc = static_cast<double>(ai[c]) - static_cast<double>(z[c]) * sum;
          const float want = static_cast<float>(acc) * (s[c] * xscale);
          EXPECT(v[c] == want, "fast epilogue trial=%d c=%d: %a vs %a", trial, c, v[c], want);
        }
      float af[16];
      for (int c = 0; c < 16; ++c) af[c] = static_cast<float>(ai[c]) * std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
      if (q::cpu::finish_float_row(af, sum, s, z, v) && ++float_rows)
        for (int c = 0; c < 16; ++c) {
          const double acc = static_cast<double>(af[c]);
          const float want = s[c] * static_cast<float>(acc - static_cast<double>(z[c]) * sum);
          EXPECT(v[c] == want, "float epilogue trial=%d c=%d: %a vs %a", trial, c, v[c], want);
        }
    }
    EXPECT(!q::cpu::digits_enabled() || (vector_rows > 100 && fallback_rows > 10), "epilogue paths %d / %d",
           vector_rows, fallback_rows);
    // the AVX2 float epilogue has no fallback: where it is the path, every trial must have run it
    EXPECT(std::strcmp(q::cpu::quant_simd_level(), "avx2") != 0 || float_rows == 400, "float epilogue rows %d",
           float_rows);
  }
  // activation quantization: every element within half a step, sum consistent, NaN/inf refused
  for (int64_t n : {1, 15, 16, 33, 300}) {
    std::vector<float> x(n);
    std::vector<int8_t> xq(n);
    for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 37.0f;
    int64_t sum = 0, want = 0;
    const float scale = q::cpu::quantize_row_i8(x.data(), n, xq.data(), &sum);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT(std::fabs(xq[i] * scale - x[i]) <= 0.5001f * scale, "quantize n=%ld i=%ld", long(n), long(i));
      want += xq[i];
    }
    EXPECT(sum == want, "quantize sum n=%ld", long(n));
    x[n / 2] = NAN;
    EXPECT(std::isnan(q::cpu::quantize_row_i8(x.data(), n, xq.data(), &sum)), "NaN row n=%ld", long(n));
    x[n / 2] = INFINITY;
    EXPECT(std::isnan(q::cpu::quantize_row_i8(x.data(), n, xq.data(), &sum)), "inf row n=%ld", long(n));
  }
  std::printf("pack/cpu_quant (%s): %s\n", q::cpu::quant_simd_level(), failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
