// CPU inner kernels of the packed low-bit matmul: dot products of one 16-channel tile (pack.h
// layout) with M activation rows. The scale is applied by the caller. The zero point either
// enters the float32 kernels of tile_dot_f32 and the GEMMs as centred codes (z given: sums of
// (q - z) x, so a code at its zero point adds nothing, as in the reference), or is applied by the
// caller as y = s * (sum_k q x_k - z * sum_k x_k): the one-row row and lookup-table kernels, the
// integer ones.
#pragma once
#include <cstdint>

#include "pyeditor/quant_plan.h"

namespace pe::quant::cpu {

// What this CPU offers the plan table (quant_plan.h): amx_enabled() and digits_enabled() below.
CpuCaps cpu_caps();

// out[m * ldo + c] = sum_k (q[c, k] - z[c]) * x[m * ldx + k] over `blocks` blocks of 16 inputs,
// in float32 (z: the tile's 16 zero points, or null for the raw codes, z = 0); x rows are
// zero-padded to 16 * blocks. wbuf: scratch of 256 * blocks floats (the decoded tile, used when
// m is large enough to reuse it).
void tile_dot_f32(const uint8_t* tile, int bits, int64_t blocks, const float* x, int64_t ldx, int64_t m,
                  float* out, int64_t ldo, float* wbuf, const uint8_t* z = nullptr);

// Many rows, several tiles of any widths at once (where the plan has tile_gemm): tile u's sums
// land in out + u * m * 16 as [m][16], those of tile_dot_f32 bit for bit, with K walked in
// chunks of kGemmChunkBlocks blocks so that each activation panel serves every tile. The rows
// come packed once per call: pack_gemm_panels writes panels [p0, p1) of kGemmPanelRows rows
// each, k-major (panels[(p * kp + k) * kGemmPanelRows + r] = x[(p * kGemmPanelRows + r) * ldx + k];
// gemm_panel_floats(m, kp) floats in all). wbuf: kGemmTiles * kGemmChunkBlocks * 256 floats.
// false where this CPU has no such kernel (then tile_dot_f32 per tile).
constexpr int kGemmTiles = 16;
constexpr int64_t kGemmChunkBlocks = 16;  // 256 inputs: a tile's decoded chunk is 16 KiB
constexpr int64_t kGemmPanelRows = 12;    // 12 rows x 2 tiles: 24 accumulators
inline int64_t gemm_panels(int64_t m) { return (m + kGemmPanelRows - 1) / kGemmPanelRows; }
inline int64_t gemm_panel_floats(int64_t m, int64_t kp) { return gemm_panels(m) * kGemmPanelRows * kp; }
void pack_gemm_panels(const float* x, int64_t ldx, int64_t m, int64_t kp, int64_t p0, int64_t p1, float* panels);
// z: tile u's zero points at z[u] (centred codes, as tile_dot_f32), or null.
bool tiles_gemm_f32(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const float* panels,
                    int64_t m, float* out, float* wbuf, const uint8_t* const* z = nullptr);
// ... with group-wise scales: the tiles' weights dequantized per chunk as (q - z) * s (tile u's
// scales and zero points of group 0 at s[u], z[u], group g at + g * srows), so out holds the
// finished sums sum_k x[r, k] w[k][c], tile_gemm_grouped_f32's weights in the same GEMM.
bool tiles_gemm_grouped_f32(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks,
                            const float* const* s, const uint8_t* const* z, int64_t srows, int64_t group_blocks,
                            const float* panels, int64_t m, float* out, float* wbuf);
// The same for int8 rows (fast mode): int32 sums, those of tile_dot_i8 (exact). Panels of
// 4-input words (pack_gemm_panels_i8: panels[(p * kp / 4 + j) * kGemmPanelRows + r] holds x row
// p * kGemmPanelRows + r, inputs 4j..4j+3; gemm_panel_floats(m, kp) / 4 words in all); wbuf:
// kGemmTiles * kGemmChunkBlocksI8 * 256 bytes.
constexpr int64_t kGemmChunkBlocksI8 = 64;  // 1024 inputs: a tile's decoded chunk is 16 KiB
void pack_gemm_panels_i8(const int8_t* x, int64_t ldx, int64_t m, int64_t kp, int64_t p0, int64_t p1,
                         int32_t* panels);
bool tiles_gemm_i8(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const int32_t* panels,
                   int64_t m, int32_t* out, uint8_t* wbuf);

// Group-wise scales, many rows: the tile dequantized once into wbuf (256 * blocks floats) as
// w[k][c] = (q - z[g][c]) * s[g][c], with s, z at the tile's first row of [groups][srows] arrays and
// g = block / group_blocks, then out[r * ldo + c] = sum_k x[r, k] w[k][c] for m rows: the
// reference's weight values in one float32 GEMM. grouped_gemm_f32() is false where this CPU (or
// the PYEDITOR_CPU_ISA cap) has no such kernel: then the per-group sums of tile_dot_f32.
bool grouped_gemm_f32();
void tile_gemm_grouped_f32(const uint8_t* tile, int bits, int64_t blocks, const float* s, const uint8_t* z,
                           int64_t srows, int64_t group_blocks, const float* x, int64_t ldx, int64_t m, float* out,
                           int64_t ldo, float* wbuf);

// Exact-mode GEMV through x-scaled lookup tables (few rows): lut_floats(bits, kp) floats of
// table per activation row, 0 when this width or CPU has no table path (then use tile_dot_f32).
// Only 2 bits has one (AVX-512): a 16-entry table per input pair, entry i = (i & 3) x_a +
// (i >> 2) x_b, so a table lookup (vpermps) replaces decode + multiply for two inputs at once.
int64_t lut_floats(int bits, int64_t kp);
void build_lut(int bits, const float* x, int64_t kp, float* lut);
// out[c] += sum_k q[c, k] x_k over blocks [b0, b1) for one activation row given by its tables.
// Callers walk K in lut_chunk_blocks(bits) blocks across several tiles, so that chunk's tables
// stay in L1 (a whole row's tables, 128 KiB at K = 4096, would be re-read from L2 per tile).
void tile_dot_lut(const uint8_t* tile, int bits, int64_t b0, int64_t b1, const float* lut, float* out);
int64_t lut_chunk_blocks(int bits);

// Exact-mode GEMM on Intel AMX-BF16 (many rows): amx_enabled() is false on other CPUs, when the
// OS refuses tile state, or when the environment sets PYEDITOR_CPU_AMX=0. Activation rows are
// split into three bf16 parts (x = hi + mid + lo) stored in A-tile order in `parts`
// (3 * m16 * kp32 values; m16 = rows rounded up to 16, kp32 = amx_padded_k(k)). split_row_bf16
// writes row r's parts (zeros past k), sets *sum = sum_i x_i (float64) and returns the power of
// two that row's sums must be multiplied by (it is scaled so that no part is a denormal, which
// AMX flushes); zero_row_bf16 writes zeros to a padding row, so `parts` needs no
// initialisation. tiles_dot_amx: out[(g * m16 + r) * 16 + c] = sum_k q_g[c, k] x[r, k] (before
// that factor) for n <= kAmxGroup tiles and rows r in
// [r_begin, r_end) (r_begin a multiple of 16, r_end <= m16); wbuf holds
// kAmxGroup * kAmxChunkBlocks * 128 uint32.
constexpr int kAmxGroup = 8;
constexpr int64_t kAmxChunkBlocks = 64;  // K chunk (1024 inputs) whose decoded pairs stay in L2
bool amx_enabled();
int64_t amx_padded_k(int64_t k);
double split_row_bf16(const float* x, int64_t k, int64_t r, int64_t m16, int64_t kp32, uint16_t* parts,
                      double* sum);
void zero_row_bf16(int64_t r, int64_t m16, int64_t kp32, uint16_t* parts);
void tiles_dot_amx(const uint8_t* const* tiles, const int* bits, int n, int64_t blocks, const uint16_t* planes,
                   int64_t m16, int64_t kp32, int64_t r_begin, int64_t r_end, float* out, uint32_t* wbuf);
// Its epilogue for one tile, rows [r0, r1), in place: acc[r * 16 + c] becomes
// s[c] * float(acc * unscale[r] - z[c] * sum[r]) + b[c] with the same operations in the same
// precisions as the scalar epilogue of the other paths in quant_linear_cpu.cpp (16 channels a
// vector: measured bit-identical to it, and 5-10% off an M = 256, 384 x 1536 call). s, z and b
// hold 16 entries each (scale and zero point have one per packed row, padding rows included).
void finish_tile_amx(float* acc, int64_t r0, int64_t r1, const double* unscale, const double* sum, const float* s,
                     const uint8_t* z, const float* b);

// Exact GEMV (few rows) on integer dot products: each row becomes kDigits signed base-256 digits
// of a 46-bit fixed-point copy X = round(x * 2^(45 - e)), e = ilogb(max |x|) (an element below
// 2^(e - 46) in magnitude is rounded: far under float32 rounding of the sum), so sum_k q X_k is
// an exact integer until one final rounding. digits_enabled(): this CPU has the AVX-512
// (F, BW, DQ, VL, VNNI) the split and the one-row kernel need. digits: digit_bytes(m, k) bytes,
// zero-initialised, in AMX A-tile order (step s of 64 inputs holds rows * 64 bytes; digit d of
// row r is A-tile row j = r * kDigits + d); split_digits writes row r (of m), sets *e,
// *sx = sum_k X_k and, if given, *used = the digits in use (1..kDigits: digits d >= *used are
// zero for every input, as the low digits of a row of few significant bits, such as bf16 or
// fp16 activations, are), and returns false for a row with inf or NaN (use another path). Then
// sum_k q x = 2^(e - 45) * sum_d 256^(kDigits - 1 - d) out_d, with out_d the sums below.
// - tiles_dot_digits (AMX-INT8, amx_enabled()): out[(u * rows + j) * 16 + c] = sum_k q_u[c, k]
//   a[j, k] for tiles u < n and A-tile rows j < rows <= 16: one TDPBSUD takes 64 inputs x 16
//   channels of u8 codes for every digit of every row (the 8-bit layout is the B tile as
//   stored). The fast (int8) mode passes its quantized rows the same way, 16 at a time.
// - tiles_dot_digits_row (AVX-512 VNNI, one row, rows = kDigits): the same sums for n <=
//   kDigitRowTiles tiles of one width walked together (n streams from memory), one vpdpbusd per
//   digit per 4 inputs x 16 channels. Six times the fast mode's integer work, but it keeps up
//   with memory where the AMX kernel does not (see run_linear). `used` (split_digits) skips the
//   products of digits known to be zero; their sums are written as zeros.
constexpr int kDigits = 6;
constexpr int kDigitTiles = 2;  // tiles per pass over the digits
constexpr int64_t kDigitRowsMax = 2;  // rows per A tile: kDigits * rows <= 16
constexpr int kDigitRowTiles = 4;  // 6 accumulators each: 24 of the 32 vector registers
bool digits_enabled();
int64_t digit_bytes(int64_t m, int64_t k);
bool split_digits(const float* x, int64_t k, int64_t r, int64_t m, int8_t* digits, int* e, int64_t* sx,
                  int* used = nullptr, int64_t group_size = 0, int64_t* group_sx = nullptr);
void tiles_dot_digits(const uint8_t* const* tiles, const int* bits, int64_t n, int64_t blocks, const int8_t* a,
                      int64_t rows, int32_t* out);
void tiles_dot_digits_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* digits,
                          int32_t* out, int used = kDigits);

// Group-wise scales (scales and zero points [groups][srows], a group a whole number of blocks, the
// last one ragged), one exact row on the digits (digits_enabled()): split_digits with group_size
// also writes group_sx[g] = sum of X over group g's inputs. For n <= kRowTiles same-width tiles,
//   out[u * 16 + c] = float(2^(e - 45) * sum_g s_g[c] * (sum_{k in g} q_u[c, k] X_k - z_g[c] group_sx[g]))
// with exact int32 digit sums per group and the rest in float64 (a few roundings of about 2^-53 of
// the group's terms, then one to float32). `used` as for tiles_dot_digits_row.
struct GroupedTile {  // a tile's codes and its group-0 scales and zero points (group g at + g * srows)
  const uint8_t* codes;
  const float* s;
  const uint8_t* z;
};
void tiles_grouped_digits_row(const GroupedTile* tiles, int n, int bits, int64_t blocks, int64_t group_blocks,
                              int64_t srows, const int8_t* digits, int used, const int64_t* group_sx, double pow2,
                              float* out);

// Epilogues of one activation row of one tile, 16 channels at a time, with the same operations
// in the same precisions as the scalar epilogue in quant_linear_cpu.cpp (so the same bits);
// s and z hold the tile's 16 scales and zero points. finish_digits_row: ai = the row's kDigits x
// 16 digit sums; v[c] = s[c] * float(double(sum_d 256^(kDigits-1-d) ai[d][c] - z[c] sx) * pow2).
// finish_fast_row: ai = 16 int8-mode sums; v[c] = float(double(ai[c]) - z[c] sum) * (s[c] * xscale).
// They return false (v untouched) where the caller must use its scalar epilogue: a CPU without
// AVX-512 DQ/VL or AVX2 (fast, float), or (digits) a sum that may not fit 63 bits.
bool finish_digits_row(const int32_t* ai, int64_t sx, double pow2, const float* s, const uint8_t* z, float* v);
bool finish_fast_row(const int32_t* ai, double sum, float xscale, const float* s, const uint8_t* z, float* v);
// finish_float_row: af = 16 float sums; v[c] = s[c] * float(double(af[c]) - z[c] * sum) (AVX2 only:
// the AVX-512 float paths are rarely taken there).
bool finish_float_row(const float* af, double sum, const float* s, const uint8_t* z, float* v);

// The same with int8 activations and exact int32 sums (u8 x s8 dot products, VNNI where present).
void tile_dot_i8(const uint8_t* tile, int bits, int64_t blocks, const int8_t* x, int64_t ldx, int64_t m,
                 int32_t* out, int64_t ldo);

// One int8 row against n <= kRowTiles tiles of one width walked together block by block (so n
// sequential streams from memory instead of one): out[u * 16 + c] = sum_k q_u[c, k] x[k].
constexpr int kRowTiles = 8;
void tiles_dot_i8_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const int8_t* x, int32_t* out);
// The same for one float32 row (x zero-padded to 16 * blocks), float32 sums.
void tiles_dot_f32_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* x, float* out);

// One float32 row with the codes read in place (AVX2; see quant_avx2.cpp): in_place_row writes
// x scaled per position in the block (kp floats, padding included) for tiles_dot_in_place_row,
// whose sums are those of tiles_dot_f32_row on x, bit for bit. A masked code is either converted
// to float (kConvert) or read as the float32 denormal its bits are (kDenormal: one operation in
// three less; on AMD, whose FMA takes denormal inputs at full speed). in_place_row returns false
// where this CPU has no such kernel or x is out of the read's range (kConvert: x near the
// smallest normal floats; kDenormal: also |x| over more than 81 binades or above 2^100; NaN and
// inf for both): then use tiles_dot_f32_row. It sets *unscale for tiles_dot_in_place_row.
enum class InPlaceRead : uint8_t { kConvert, kDenormal };
InPlaceRead in_place_read();  // this CPU's choice
bool in_place_row(int bits, const float* x, int64_t kp, InPlaceRead read, float* xs, float* unscale);
void tiles_dot_in_place_row(const uint8_t* const* tiles, int n, int bits, int64_t blocks, const float* xs,
                            InPlaceRead read, float unscale, float* out);

// Quantizes one activation row for tile_dot_i8: out[i] = clamp(round(x[i] / scale), -127, 127) with
// scale = max|x| / 127 (1 when x is all zero); returns scale and sets *sum = sum_i out[i]. A row
// with NaN or inf returns NaN (its outputs become NaN). out must hold n values.
float quantize_row_i8(const float* x, int64_t n, int8_t* out, int64_t* sum);

// "avx512-vnni", "avx2" or "scalar": the path these functions take on this CPU.
const char* quant_simd_level();

// Whether one exact float32 row should walk same-width tiles together through tiles_dot_f32_row
// (several streams from memory) rather than tile_dot_f32 a tile at a time: 8-bit tiles on
// AVX-512 (4 and 6 bits lost there against the digits and the 2-bit tables), every width on AVX2.
bool one_row_f32_tiles(int bits);

}  // namespace pe::quant::cpu
