// The small dense GEMM the fused CPU kernels run on packed tiles:
//   acc[r][0:kTileN] += sum_k a[r][k] * tile[k][0:kTileN]
// a: [rows][kc] row-major (ld = kc), tile: [kc][kTileN], acc: [rows][kTileN].
// The callers build `tile` (an edited weight block, or a plain weight block) in a thread-local
// buffer, so no matrix larger than a tile is ever written.
#pragma once
#include <cstdint>

namespace pyeditor::cpu {

constexpr int64_t kTileN = 64;   // tile width; the AVX-512 kernel holds 6 x 64 accumulators
constexpr int64_t kTileK = 256;  // tile depth
constexpr int64_t kTileM = 128;  // rows per accumulator block
constexpr int64_t kSumChunk = 32;  // k steps summed from zero before each add into acc (accuracy)

void tile_gemm(const float* a, int64_t rows, int64_t kc, const float* tile, float* acc);
// The float kernel tile_gemm runs here: "avx512", "avx2" or "portable".
const char* tile_gemm_level();
void tile_gemm(const double* a, int64_t rows, int64_t kc, const double* tile, double* acc);

}  // namespace pyeditor::cpu
