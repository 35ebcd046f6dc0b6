// tile_gemm (the CPU hyper kernels' micro-kernel) against a double-precision loop, for every row
// count a register block can end on and depths from 0 up; built three times by CMake so the
// AVX-512, AVX2 and portable kernels are each checked on a CPU that has them.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cpu/tile_gemm.h"
#include "expect.h"

using pyeditor::cpu::kTileN;

int main() {
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t rows = 1; rows <= 14; ++rows) {
    for (int64_t kc : {0, 1, 3, 17, 33, 64, 257}) {
      std::vector<float> a(rows * kc), tile(kc * kTileN), acc(rows * kTileN);
      for (auto& v : a) v = u(gen);
      for (auto& v : tile) v = u(gen);
      for (auto& v : acc) v = u(gen);  // accumulates into what is there
      std::vector<double> want(acc.begin(), acc.end());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < kc; ++k)
          for (int64_t j = 0; j < kTileN; ++j) want[r * kTileN + j] += double(a[r * kc + k]) * tile[k * kTileN + j];
      pyeditor::cpu::tile_gemm(a.data(), rows, kc, tile.data(), acc.data());
      for (size_t i = 0; i < acc.size(); ++i) EXPECT(std::fabs(acc[i] - want[i]) <= 1e-5 * (kc + 1));
    }
  }
  // Long sums are added in chunks of kSumChunk: 256 copies of 0.1f stay within 2 ulps-scale
  // (relative 1e-6) of the exact sum, where one sequential float32 chain drifts to 2.4e-6.
  {
    const int64_t kc = 256;
    std::vector<float> a(kc, 1.0f), tile(kc * kTileN, 0.1f), acc(kTileN, 0.0f);
    pyeditor::cpu::tile_gemm(a.data(), 1, kc, tile.data(), acc.data());
    const double exact = double(0.1f) * kc;
    for (int64_t j = 0; j < kTileN; ++j) EXPECT(std::fabs(acc[j] - exact) <= 1e-6 * exact);
  }
  std::printf("tile_gemm (%s): %s\n", pyeditor::cpu::tile_gemm_level(), failures ? "FAILED" : "all checks passed");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
