// Compute probe for the benchmark suite's compute roofline: y = x after `rounds` fused
// multiply-adds v = fma(v, a, b), elementwise (one rounding per step, as std::fma).
// The SIMD variants hold a block of independent accumulators in registers for every round, so
// with enough elements per thread the FMA pipes, not latency or memory, bound the time: the
// fp32 peak this host reaches at the vector level the kernels run (cpu_isa.h).
#include "pyeditor/cpu_isa.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../ops.h"

namespace pyeditor {
namespace {

// A block is what one thread keeps in registers: its size is a multiple of every variant's
// (12 x 8 floats for AVX2, 16 x 16 for AVX-512), so the variants split a tensor the same way.
constexpr int64_t kBlock = 768;

void block_portable(float* v, int64_t n, float a, float b, int64_t rounds) {
  for (int64_t i = 0; i < n; ++i) {
    float x = v[i];
    for (int64_t r = 0; r < rounds; ++r) x = std::fma(x, a, b);
    v[i] = x;
  }
}

#if PE_ISA_VARIANTS
// kAcc independent chains: enough to cover the FMA latency times the pipes of either vendor
PE_TARGET_AVX2 void block_avx2(float* v, int64_t n, float a, float b, int64_t rounds) {
  constexpr int kAcc = 12, kLanes = 8;
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t i = 0;
  for (; i + kAcc * kLanes <= n; i += kAcc * kLanes) {
    __m256 acc[kAcc];
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_loadu_ps(v + i + j * kLanes);
    for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
      for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_fmadd_ps(acc[j], va, vb);
    }
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) _mm256_storeu_ps(v + i + j * kLanes, acc[j]);
  }
  block_portable(v + i, n - i, a, b, rounds);
}

PE_TARGET_AVX512 void block_avx512(float* v, int64_t n, float a, float b, int64_t rounds) {
  constexpr int kAcc = 16, kLanes = 16;
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  int64_t i = 0;
  for (; i + kAcc * kLanes <= n; i += kAcc * kLanes) {
    __m512 acc[kAcc];
#pragma GCC unroll 16
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_loadu_ps(v + i + j * kLanes);
    for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 16
      for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_fmadd_ps(acc[j], va, vb);
    }
#pragma GCC unroll 16
    for (int j = 0; j < kAcc; ++j) _mm512_storeu_ps(v + i + j * kLanes, acc[j]);
  }
  block_portable(v + i, n - i, a, b, rounds);
}
#endif

using BlockFn = void (*)(float*, int64_t, float, float, int64_t);

BlockFn active_block() {
#if PE_ISA_VARIANTS
  return pe::cpu::pick_variant<BlockFn>(pe::cpu::vector_level(), block_portable, block_avx2, block_avx512);
#else
  return block_portable;
#endif
}

}  // namespace

const char* compute_probe_level() { return pe::cpu::level_name(pe::cpu::vector_level()); }

at::Tensor fma_probe_cpu(const at::Tensor& x, double a, double b, int64_t rounds) {
  TORCH_CHECK(x.device().is_cpu(), "pyeditor.fma_probe: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pyeditor.fma_probe: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(rounds >= 0, "pyeditor.fma_probe: rounds must be >= 0, got ", rounds);
  at::Tensor y = x.contiguous().clone();
  const int64_t n = y.numel();
  if (n == 0 || rounds == 0) return y;
  float* v = y.mutable_data_ptr<float>();
  static const BlockFn run = active_block();
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t off = blk * kBlock;
      run(v + off, std::min(kBlock, n - off), fa, fb, rounds);
    }
  });
  return y;
}

}  // namespace pyeditor
