// Which CPU kernels the packed matmul runs, decided from the call's shape, mode, group size and
// this CPU's capabilities alone (no torch, no data): quant_linear_cpu.cpp reads the plan, ctest
// (csrc/tests/test_quant_plan.cpp) checks it. Data can still move a call off a planned path at
// run time: a row with inf or NaN cannot take the fixed-point digits, nor x out of range the
// in-place reads; those fallbacks are the float kernels, with the same sums.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace pe::quant {

// What this CPU offers the packed kernels (after PYEDITOR_CPU_AMX=0 and the ISA cap).
struct CpuCaps {
  bool amx = false;     // AMX-INT8 and AMX-BF16 with the OS's tile state
  bool digits = false;  // AVX-512 F/BW/DQ/VL/VNNI: fixed-point digit GEMV
  bool grouped_gemm = false;  // the dequantized-tile GEMM for group-wise scales (AVX2 + FMA)
  bool grouped_row = false;   // the group-aware one-row kernels (AVX2 + FMA)
  bool tile_gemm = false;     // the multi-tile float and int8 GEMMs over K chunks (AVX-512)
};

struct LinearCall {
  int64_t m = 1;           // activation rows
  int64_t k = 0;           // in_features
  bool fast = false;       // int8 activations
  int64_t group_size = 0;  // 0: one scale per channel
  bool wide_tiles = false; // any 4-, 6- or 8-bit tile
  int64_t code_bytes = 0;  // packed codes the call streams
  int threads = 1;         // threads available (at::get_num_threads)
  bool spiky = false;      // a row of x dominated by a few inputs (spiky_row below)
};

enum class LinearPath : uint8_t {
  kGrouped,  // group-wise scales (quant_group_cpu.cpp): see grouped_row and dequant_gemm below
  kAmxGemm,  // exact GEMM on AMX-BF16
  kTiles,    // the tile kernels of quant_kernels.cpp / quant_avx2.cpp, chosen per tile below
};

struct LinearPlan {
  LinearPath path = LinearPath::kTiles;
  bool digits = false;       // exact rows as fixed-point digits (AMX GEMV or one VNNI row)
  bool digit_float_row = false;  // ... and the float row too (its 2-bit tiles take the tables)
  bool fast_tiles = false;   // int8 rows as AMX A tiles
  bool lut = false;          // lookup tables for few rows, where the digits do not run or beside
                             // digit_float_row
  bool in_place_row = false; // one exact float row: codes read in place, where the digits do not run
  bool dequant_gemm = false;  // grouped, exact, many rows: tiles dequantized with their group scales,
                              // one GEMM each
  bool grouped_row = false;   // grouped, one row, both modes: group sums kept in registers, each
                              // group's scale applied there (else, and for other row counts, the
                              // float / int8 tile kernels per group with an epilogue per group)
  bool grouped_digits = false; // ... and the exact row as fixed-point digits, group sums exact (AVX-512
                               // VNNI, groups of at most kMaxDigitGroup inputs)
  bool tile_gemm = false;     // many rows, float or int8 kernels: several tiles a call, K chunk by
                              // chunk (cpu_quant.h tiles_gemm_f32 / _i8), else a tile at a time
  int threads = 1;            // threads to wake (see plan_threads)
  bool centred_rows = false;  // few exact rows, one of them spiky: the centred float kernels
                              // (tile_dot_f32 with the zero points) and none of the others
};

constexpr int64_t kDigitGemvRows = 8;  // AMX digit GEMV up to this many rows, the bf16 GEMM above
constexpr int64_t kFastTileRows = 2;   // the fast mode's AMX tiles from this many rows
constexpr int64_t kMaxDigitK = 65536;  // int32 digit sums stay exact up to this many inputs
// An exact row dominated by a few inputs: at most max(1, k / 64) of them within 2^8 of its largest
// |x| (inf and NaN rows are not: they have their own fallback). The kernels of few rows that
// leave z * sum(x) to the epilogue (float one-row kernels, 2-bit tables) lose the rest of such a
// row against a code at its zero point, and the one-row digits' 46-bit copy rounds inputs under
// 2^-46 of the largest: such calls take the centred float kernels (plan: centred_rows).
inline bool spiky_row(const float* x, int64_t k) {
  float a = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::fabs(x[i]);
    a = v > a ? v : a;  // (NaN never larger)
  }
  if (!(a > 0.0f) || !(a <= FLT_MAX)) return false;
  const float t = a * 0x1p-8f;
  int64_t big = 0;
  for (int64_t i = 0; i < k; ++i) big += std::fabs(x[i]) >= t;
  return big <= (k / 64 > 1 ? k / 64 : 1);
}

constexpr int64_t kLutRows = 3;        // 2-bit lookup tables below this many rows (from 3 rows, the
                                       // few-row kernels of centred codes: faster, and no z * sum x)
constexpr int64_t kFewRows = 4;        // below this many rows, threads by bytes (plan_threads)
constexpr int64_t kTileGemmRows = 4;   // the multi-tile GEMM from this many rows
constexpr int64_t kDequantGemmRows = 4; // grouped: the dequantized-tile GEMM from this many rows
constexpr int64_t kMaxDigitGroup = 128;  // grouped digit sums pair two digits in int32 up to this size

// Few rows stream the codes once: a thread that gets less than this to read costs more to wake
// (a parallel region's start) than it saves. Set from a decoder LM's layers read in turn, as a
// decode step reads them (from the last-level cache or DRAM, not from a core's L2 as one layer
// called in a loop is): the realmodel generate row and the packed_linear/module rows of the bench.
constexpr int64_t kMinBytesPerThread = int64_t(64) << 10;

inline int plan_threads(const LinearCall& c) {
  const int avail = c.threads < 1 ? 1 : c.threads;
  if (c.m >= kFewRows) return avail;
  const int64_t by_bytes = c.code_bytes / kMinBytesPerThread;
  return by_bytes < 1 ? 1 : by_bytes < avail ? static_cast<int>(by_bytes) : avail;
}

inline LinearPlan plan_linear(const CpuCaps& cpu, const LinearCall& c) {
  LinearPlan p;
  p.threads = plan_threads(c);
  if (!c.fast && c.spiky && c.m < kLutRows) {  // every other flag off
    p.path = c.group_size > 0 ? LinearPath::kGrouped : LinearPath::kTiles;
    p.centred_rows = true;
    return p;
  }
  if (c.group_size > 0) {
    p.path = LinearPath::kGrouped;
    p.dequant_gemm = !c.fast && c.m >= kDequantGemmRows && cpu.grouped_gemm;
    p.tile_gemm = p.dequant_gemm && cpu.tile_gemm;  // ... those tiles through the multi-tile GEMM
    p.in_place_row = !c.fast && c.m == 1;
    p.grouped_row = c.m == 1 && cpu.grouped_row;
    p.grouped_digits = p.grouped_row && !c.fast && cpu.digits && c.group_size <= kMaxDigitGroup && c.k <= kMaxDigitK;
    return p;
  }
  if (!c.fast && c.m > kDigitGemvRows && cpu.amx) {
    p.path = LinearPath::kAmxGemm;
    return p;
  }
  // one exact row: digits on VNNI for 4/6/8-bit tiles (2-bit ones take the tables), on AMX for all
  const bool digit_row = !c.fast && c.m == 1 && cpu.digits && (cpu.amx || c.wide_tiles);
  p.digits = !c.fast && c.k <= kMaxDigitK && ((cpu.amx && c.m <= kDigitGemvRows) || digit_row);
  p.digit_float_row = p.digits && digit_row && !cpu.amx;
  p.fast_tiles = cpu.amx && c.fast && c.m >= kFastTileRows;
  p.lut = !c.fast && c.m < kLutRows;
  p.in_place_row = !c.fast && c.m == 1;
  p.tile_gemm = !p.digits && !p.fast_tiles && c.m >= kTileGemmRows && cpu.tile_gemm;
  return p;
}

}  // namespace pe::quant
