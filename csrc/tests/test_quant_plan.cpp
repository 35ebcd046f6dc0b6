// The packed matmul's CPU plan table (quant_plan.h), checked for every kind of CPU the project
// runs on, whatever CPU runs this test: AVX2 only, AVX-512 VNNI, and AMX.
#include <cmath>
#include <initializer_list>

#include "expect.h"
#include "pyeditor/quant_plan.h"

using namespace pe::quant;

int main() {
  // fields: amx, digits, grouped_gemm, grouped_row, tile_gemm
  const CpuCaps avx2{false, false, true, true, false}, vnni{false, true, true, true, true},
      amx{true, true, true, true, true}, portable{};
  auto call = [](int64_t m, bool fast = false, int64_t group = 0, bool wide = true, int64_t k = 4096) {
    LinearCall c;
    c.m = m, c.k = k, c.fast = fast, c.group_size = group, c.wide_tiles = wide;
    return c;
  };
  // group-wise scales take their own path on every CPU, in both modes
  for (const CpuCaps& cpu : {avx2, vnni, amx})
    for (int64_t m : {1, 7, 256})
      for (bool fast : {false, true}) EXPECT(plan_linear(cpu, call(m, fast, 64)).path == LinearPath::kGrouped);
  // grouped, exact: the dequantized-tile GEMM from kDequantGemmRows rows where the CPU has it
  EXPECT(!plan_linear(avx2, call(kDequantGemmRows - 1, false, 64)).dequant_gemm);
  EXPECT(plan_linear(avx2, call(kDequantGemmRows, false, 64)).dequant_gemm);
  EXPECT(!plan_linear(avx2, call(256, true, 64)).dequant_gemm);  // int8 rows: per-group integer sums
  EXPECT(!plan_linear(portable, call(256, false, 64)).dequant_gemm);
  EXPECT(plan_linear(avx2, call(1, false, 128)).in_place_row && !plan_linear(avx2, call(1, true, 128)).in_place_row);
  // grouped, one row: the group-aware row kernels in both modes where the CPU has AVX2 (AVX-512
  // CPUs too: the AVX2 kernels run there)
  for (const CpuCaps& cpu : {avx2, vnni, amx}) {
    EXPECT(plan_linear(cpu, call(1, false, 64)).grouped_row && plan_linear(cpu, call(1, true, 32)).grouped_row);
    EXPECT(!plan_linear(cpu, call(2, false, 64)).grouped_row && !plan_linear(cpu, call(2, true, 64)).grouped_row);
  }
  EXPECT(!plan_linear(portable, call(1, false, 64)).grouped_row);
  EXPECT(!plan_linear(avx2, call(1)).grouped_row);  // one scale per channel: the tile paths
  // AVX2: tiles, never digits or AMX; tables and in-place reads for one exact row
  LinearPlan p = plan_linear(avx2, call(1));
  EXPECT(p.path == LinearPath::kTiles && !p.digits && !p.fast_tiles && p.lut && p.in_place_row);
  p = plan_linear(avx2, call(256));
  EXPECT(p.path == LinearPath::kTiles && !p.digits && !p.lut && !p.in_place_row);
  EXPECT(!plan_linear(avx2, call(1, true)).lut && !plan_linear(avx2, call(1, true)).in_place_row);
  // VNNI: one exact row with 4/6/8-bit tiles takes the digits (and the float row for 2-bit tiles)
  p = plan_linear(vnni, call(1));
  EXPECT(p.digits && p.digit_float_row && p.lut);
  p = plan_linear(vnni, call(1, false, 0, /*wide=*/false));  // 2-bit tiles only: tables, no digits
  EXPECT(!p.digits && p.lut);
  EXPECT(!plan_linear(vnni, call(2)).digits);  // digits are for one row without AMX
  // 2-bit lookup tables for one or two exact rows; from kLutRows the few-row kernels (centred codes)
  EXPECT(plan_linear(vnni, call(kLutRows - 1)).lut && !plan_linear(vnni, call(kLutRows)).lut);
  EXPECT(!plan_linear(vnni, call(1, false, 0, true, 65537)).digits);  // int32 digit sums would not be exact
  EXPECT(plan_linear(vnni, call(256)).path == LinearPath::kTiles);
  // many rows on AVX-512, float or int8: the multi-tile GEMM (not for few rows, or without it)
  EXPECT(plan_linear(vnni, call(kTileGemmRows)).tile_gemm && plan_linear(vnni, call(256)).tile_gemm);
  EXPECT(plan_linear(vnni, call(256, false, 0, true, 65537)).tile_gemm);
  EXPECT(!plan_linear(vnni, call(kTileGemmRows - 1)).tile_gemm && plan_linear(vnni, call(256, true)).tile_gemm);
  EXPECT(!plan_linear(amx, call(256, true)).tile_gemm);  // int8 rows as AMX tiles there
  EXPECT(!plan_linear(avx2, call(256)).tile_gemm && !plan_linear(portable, call(256)).tile_gemm);
  // group-wise, many exact rows: the dequantized tiles through the same GEMM where it exists
  EXPECT(plan_linear(vnni, call(256, false, 64)).tile_gemm && plan_linear(vnni, call(256, false, 64)).dequant_gemm);
  EXPECT(!plan_linear(vnni, call(256, true, 64)).tile_gemm && !plan_linear(avx2, call(256, false, 64)).tile_gemm);
  EXPECT(!plan_linear(vnni, call(kDequantGemmRows - 1, false, 64)).tile_gemm);
  // group-wise, one exact row: the digits on VNNI for groups up to kMaxDigitGroup, else (and in
  // the fast mode, and without VNNI) the float / int8 group-aware row kernels
  for (int64_t g : {32, 64, 128}) {
    EXPECT(plan_linear(vnni, call(1, false, g)).grouped_digits && plan_linear(vnni, call(1, false, g)).grouped_row);
    EXPECT(!plan_linear(vnni, call(1, true, g)).grouped_digits && !plan_linear(avx2, call(1, false, g)).grouped_digits);
    EXPECT(!plan_linear(vnni, call(2, false, g)).grouped_digits && !plan_linear(portable, call(1, false, g)).grouped_row);
  }
  EXPECT(!plan_linear(vnni, call(1, false, 2 * kMaxDigitGroup)).grouped_digits);
  // AMX: digit GEMV up to kDigitGemvRows rows, the bf16 GEMM above; fast mode's A tiles from 2 rows
  for (int64_t m = 1; m <= kDigitGemvRows; ++m) {
    p = plan_linear(amx, call(m));
    EXPECT(p.path == LinearPath::kTiles && p.digits && !p.digit_float_row && !p.tile_gemm);
  }
  EXPECT(plan_linear(amx, call(kDigitGemvRows + 1)).path == LinearPath::kAmxGemm);
  EXPECT(plan_linear(amx, call(kDigitGemvRows + 1, true)).path == LinearPath::kTiles);  // fast: int8 tiles
  EXPECT(!plan_linear(amx, call(1, true)).fast_tiles && plan_linear(amx, call(2, true)).fast_tiles);
  // threads: few rows wake one per kMinBytesPerThread of codes (at least one, at most those there
  // are); many rows wake every thread whatever the size
  auto sized = [&](int64_t m, int64_t bytes, int threads, int64_t group = 0) {
    LinearCall c = call(m, false, group);
    c.code_bytes = bytes, c.threads = threads;
    return plan_linear(avx2, c).threads;
  };
  EXPECT(sized(1, 192 * 576 / 2, 2) == 1 && sized(1, 192 * 576 / 2, 2, 64) == 1);  // a small LM layer
  EXPECT(sized(1, 576 * 576 / 2, 2) == 2 && sized(1, 576 * 576 / 2, 8, 64) == 2);
  EXPECT(sized(1, 4096 * 4096 / 2, 2) == 2 && sized(1, 4096 * 4096 / 2, 64) == 64);
  EXPECT(sized(1, 2 * kMinBytesPerThread - 1, 8) == 1 && sized(1, 2 * kMinBytesPerThread, 8) == 2);
  EXPECT(sized(kFewRows - 1, 0, 4) == 1 && sized(kFewRows, 0, 4) == 4 && sized(256, 1, 16) == 16);
  EXPECT(sized(1, 4096 * 4096, 0) == 1);  // threads unset: one
  // a spiky row (few inputs within 2^8 of its largest) at 1-2 exact rows: the centred float
  // kernels on every CPU, nothing else; from kLutRows rows, or in int8 mode, the plan as usual
  for (const CpuCaps& cpu : {portable, avx2, vnni, amx})
    for (int64_t group : {int64_t(0), int64_t(64)})
      for (int64_t m : {int64_t(1), kLutRows - 1}) {
        LinearCall c = call(m, false, group);
        c.spiky = true;
        p = plan_linear(cpu, c);
        EXPECT(p.centred_rows && !p.digits && !p.digit_float_row && !p.lut && !p.in_place_row && !p.grouped_row &&
               !p.grouped_digits && !p.dequant_gemm && !p.tile_gemm);
        EXPECT(p.path == (group ? LinearPath::kGrouped : LinearPath::kTiles));
        c.fast = true;
        EXPECT(!plan_linear(cpu, c).centred_rows);
      }
  {
    LinearCall c = call(kLutRows);
    c.spiky = true;
    EXPECT(!plan_linear(vnni, c).centred_rows);
  }
  // spiky_row: one or a few inputs within 2^8 of the largest
  {
    float x[256];
    for (int i = 0; i < 256; ++i) x[i] = 1.0f + float(i % 7) * 0.25f;
    EXPECT(!spiky_row(x, 256));  // a flat row
    x[9] = 1000.0f;  // 1000 / 2.5 > 2^8: everything else is below 2^-8 of it
    EXPECT(spiky_row(x, 256));
    x[9] = 200.0f;  // within 2^8 of the rest
    EXPECT(!spiky_row(x, 256));
    x[9] = 1e12f, x[100] = -1e11f, x[200] = 4e9f, x[201] = 5e9f;  // 4 <= 256 / 64 big inputs
    EXPECT(spiky_row(x, 256));
    x[202] = 6e9f;  // 5 > 4
    EXPECT(!spiky_row(x, 256));
    for (int i = 0; i < 256; ++i) x[i] = 0.0f;
    EXPECT(!spiky_row(x, 256));  // all zero
    x[3] = INFINITY;
    EXPECT(!spiky_row(x, 256));  // inf rows have their own fallback
    x[3] = 1.0f;
    EXPECT(spiky_row(x, 256) && spiky_row(x, 4));  // one-hot; a short row holds one big input at most
    EXPECT(!spiky_row(x, 0));
  }
  if (failures == 0) std::printf("quant plan: all checks passed\n");
  return failures ? 1 : 0;
}
