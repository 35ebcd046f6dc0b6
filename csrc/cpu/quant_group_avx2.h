// AVX2 + FMA one-row kernels for group-wise scales (pack.h layout, scales [groups][srows]): each
// group's sums stay in registers and take their scale and zero point once, as
//   out[c] = sum_g s[g][c] * (sum_{k in g} q[c, k] x_k - z[g][c] * xsum[g])
// with xsum[g] the sum of the group's activations (precomputed once per call). Internal to
// csrc/cpu: quant_group_cpu.cpp calls them where the plan (quant_plan.h) says grouped_row.
#pragma once
#include <cstdint>

#include "pyeditor/cpu_quant.h"

namespace pe::quant::cpu::avx2 {

// GroupedTile: cpu_quant.h

// Float32 row: out[u * 16 + c] for n <= kRowTiles same-width tiles, float32 sums and epilogue.
// x: the row (zero-padded to 16 * blocks) when read == nullptr, else the row scaled by
// in_place_row for *read (the codes read in place; unscale from in_place_row).
void grouped_f32_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks, int64_t srows,
                     const float* x, const InPlaceRead* read, float unscale, const float* xsum, float* out);

// Int8 row (the fast mode): exact int32 group sums, xsum[g] = sum of the group's int8 x, then
// out = xscale * sum_g s * float(sum - z * xsum).
void grouped_i8_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks, int64_t srows,
                    const int8_t* x, const int32_t* xsum, float xscale, float* out);

}  // namespace pe::quant::cpu::avx2
