// AVX2 + FMA kernels of the packed low-bit matmul, for x86 CPUs without AVX-512 (AMD Zen 2/3,
// Intel before Skylake-X): the same sums as the functions of the same names in cpu_quant.h, a
// tile's 16 channels as two vectors of 8. Internal to csrc/cpu: quant_kernels.cpp calls them
// when supported() and the CPU has no AVX-512 VNNI.
#pragma once
#include <cstdint>

#include "pyeditor/cpu_quant.h"

namespace pe::quant::cpu::avx2 {

bool supported();  // AVX2 and FMA, seen by cpuid

// float32 x, float32 sums: one row walks n <= kRowTiles tiles together (n streams from memory);
// several rows decode each tile once into wbuf (256 * blocks floats); with zero points z
// (centred codes, see cpu_quant.h) fewer rows decode each block once in registers for all rows.
void tile_dot_f32(const uint8_t* tile, int bits, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                  float* out, int64_t ldo, float* wbuf, const uint8_t* z);
void tiles_dot_f32_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* x, float* out);
// tile_gemm_grouped_f32 of cpu_quant.h
void tile_gemm_grouped_f32(const uint8_t* tile, int bits, int64_t blocks, const float* s, const uint8_t* z,
                           int64_t srows, int64_t group_blocks, const float* x, int64_t ldx, int64_t m, float* out,
                           int64_t ldo, float* wbuf);
// in_place_read, in_place_row and tiles_dot_in_place_row of cpu_quant.h
InPlaceRead preferred_read();
bool scale_row(int bits, const float* x, int64_t kp, InPlaceRead read, float* xs, float* unscale);
void tiles_dot_in_place_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* xs,
                            InPlaceRead read, float unscale, float* out);

// int8 x, exact int32 sums (vpmaddubsw: u8 codes x s8 x into int16 pairs that cannot saturate,
// see quant_avx2.cpp, then vpmaddwd into int32).
void tile_dot_i8(const uint8_t* tile, int bits, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                 int32_t* out, int64_t ldo);
void tiles_dot_i8_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* x, int32_t* out);

// finish_fast_row and finish_float_row of cpu_quant.h, 4 channels a vector: the same operations in
// the same precisions as the scalar epilogue (no contraction into FMAs), so the same bits.
void finish_fast(const int32_t* ai, double sum, float xscale, const float* s, const uint8_t* z, float* v);
void finish_float(const float* af, double sum, const float* s, const uint8_t* z, float* v);

// quantize_row_i8 of cpu_quant.h, the same values (round half to even, clamp to +-127).
float quantize_row(const float* x, int64_t n, int8_t* out, int64_t* sum);

}  // namespace pe::quant::cpu::avx2
