// Micro-kernels behind tile_gemm, picked at load time: an AVX-512 register-blocked kernel (6 rows
// x 64 columns of accumulators, one broadcast + 4 FMAs per row and k), an AVX2 one (6 rows x 16
// columns, each quarter of the tile in turn: 12 accumulators + 2 tile vectors + a broadcast in
// the 16 ymm registers), and a portable loop the compiler vectorizes for every other case (and for double).
// PE_TILE_FORCE_PORTABLE / PE_TILE_FORCE_AVX2 pin the choice (the ctests run each variant).
#include "pyeditor/cpu_isa.h"
#include "tile_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "avx2_rows16.h"
#define PE_HAVE_X86 1
#endif

namespace pyeditor::cpu {
namespace {

// The same chunked summation as the SIMD kernels (a zeroed partial per kSumChunk steps of k).
template <class A>
void tile_gemm_portable(const A* a, int64_t rows, int64_t kc, const A* tile, A* acc) {
  A part[kTileN];
  for (int64_t r = 0; r < rows; ++r) {
    A* out = acc + r * kTileN;
    const A* ar = a + r * kc;
    for (int64_t k0 = 0; k0 < kc; k0 += kSumChunk) {
      const int64_t k1 = k0 + kSumChunk < kc ? k0 + kSumChunk : kc;
      for (int64_t j = 0; j < kTileN; ++j) part[j] = A(0);
      for (int64_t k = k0; k < k1; ++k) {
        const A s = ar[k];
        const A* t = tile + k * kTileN;
        for (int64_t j = 0; j < kTileN; ++j) part[j] += s * t[j];
      }
      for (int64_t j = 0; j < kTileN; ++j) out[j] += part[j];
    }
  }
}

#ifdef PE_HAVE_X86
// R rows (1..6) of the 64-wide tile: 4R accumulators stay in zmm registers for kSumChunk steps of k,
// starting from zero, and each chunk's sum is then added to acc. Summing in chunks keeps the float32
// rounding error of long reductions (d x in the edited_linear backward sums over n_out) close to
// that of a blocked BLAS instead of one sequential chain over all of K, for ~3% more adds.
template <int R>
__attribute__((target("avx512f"))) inline void block_avx512(const float* a, int64_t kc, const float* tile,
                                                            float* acc) {
  for (int64_t k0 = 0; k0 < kc; k0 += kSumChunk) {
    const int64_t k1 = k0 + kSumChunk < kc ? k0 + kSumChunk : kc;
    __m512 c[R][4];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const float* t = tile + k * kTileN;
      const __m512 b0 = _mm512_loadu_ps(t), b1 = _mm512_loadu_ps(t + 16), b2 = _mm512_loadu_ps(t + 32),
                   b3 = _mm512_loadu_ps(t + 48);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(a[r * kc + k]);
        c[r][0] = _mm512_fmadd_ps(s, b0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(s, b1, c[r][1]);
        c[r][2] = _mm512_fmadd_ps(s, b2, c[r][2]);
        c[r][3] = _mm512_fmadd_ps(s, b3, c[r][3]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) {
        float* o = acc + r * kTileN + 16 * v;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c[r][v]));
      }
  }
}

__attribute__((target("avx512f"))) void tile_gemm_avx512(const float* a, int64_t rows, int64_t kc,
                                                         const float* tile, float* acc) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) block_avx512<6>(a + r * kc, kc, tile, acc + r * kTileN);
  const float* ar = a + r * kc;
  float* cr = acc + r * kTileN;
  switch (rows - r) {
    case 5: block_avx512<5>(ar, kc, tile, cr); break;
    case 4: block_avx512<4>(ar, kc, tile, cr); break;
    case 3: block_avx512<3>(ar, kc, tile, cr); break;
    case 2: block_avx512<2>(ar, kc, tile, cr); break;
    case 1: block_avx512<1>(ar, kc, tile, cr); break;
    default: break;
  }
}

// R rows (1..6) of one 16-column quarter of the tile (`tile` and `acc` point at the quarter),
// summed in chunks of kSumChunk steps of k like the AVX-512 kernel: 2R accumulators, 2 tile
// vectors and a broadcast fit the 16 ymm registers. (3 rows x 32 columns needed 12 + 4 + 1
// registers, so every FMA re-read its tile vector, and it broadcast a value per 4 FMAs instead
// of per 2; bench: the assign_prototypes rows.)
template <int R>
__attribute__((target("avx2,fma"))) inline void block_avx2(const float* a, int64_t kc, const float* tile,
                                                           float* acc) {
  for (int64_t k0 = 0; k0 < kc; k0 += kSumChunk) {
    const int64_t k1 = k0 + kSumChunk < kc ? k0 + kSumChunk : kc;
    pe::cpu_avx2::rows16<R, true>(a, kc, tile, kTileN, k0, k1, acc, kTileN);
  }
}

__attribute__((target("avx2,fma"))) void tile_gemm_avx2(const float* a, int64_t rows, int64_t kc,
                                                        const float* tile, float* acc) {
  static_assert(kTileN == 64, "the AVX2 kernel covers the tile as four 16-column quarters");
  for (int64_t q = 0; q < kTileN; q += 16) {
    int64_t r = 0;
    for (; r + 6 <= rows; r += 6) block_avx2<6>(a + r * kc, kc, tile + q, acc + r * kTileN + q);
    const float* ar = a + r * kc;
    float* cr = acc + r * kTileN + q;
    switch (rows - r) {
      case 5: block_avx2<5>(ar, kc, tile + q, cr); break;
      case 4: block_avx2<4>(ar, kc, tile + q, cr); break;
      case 3: block_avx2<3>(ar, kc, tile + q, cr); break;
      case 2: block_avx2<2>(ar, kc, tile + q, cr); break;
      case 1: block_avx2<1>(ar, kc, tile + q, cr); break;
      default: break;
    }
  }
}

using FloatKernel = void (*)(const float*, int64_t, int64_t, const float*, float*);

struct Picked {
  FloatKernel fn;
  const char* level;
};

Picked pick_float_kernel() {
  __builtin_cpu_init();
  const bool avx2 = pe::cpu::isa_allows(pe::cpu::kIsaAvx2) && __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma");
#if defined(PE_TILE_FORCE_PORTABLE)
  return {tile_gemm_portable<float>, "portable"};
#elif defined(PE_TILE_FORCE_AVX2)
  if (avx2) return {tile_gemm_avx2, "avx2"};
  return {tile_gemm_portable<float>, "portable"};
#else
  if (pe::cpu::isa_allows(pe::cpu::kIsaAvx512) && __builtin_cpu_supports("avx512f")) return {tile_gemm_avx512, "avx512"};
  if (avx2) return {tile_gemm_avx2, "avx2"};
  return {tile_gemm_portable<float>, "portable"};
#endif
}
const Picked kFloatKernel = pick_float_kernel();
#endif

}  // namespace

const char* tile_gemm_level() {
#ifdef PE_HAVE_X86
  return kFloatKernel.level;
#else
  return "portable";
#endif
}

void tile_gemm(const float* a, int64_t rows, int64_t kc, const float* tile, float* acc) {
#ifdef PE_HAVE_X86
  kFloatKernel.fn(a, rows, kc, tile, acc);
#else
  tile_gemm_portable(a, rows, kc, tile, acc);
#endif
}

void tile_gemm(const double* a, int64_t rows, int64_t kc, const double* tile, double* acc) {
  tile_gemm_portable(a, rows, kc, tile, acc);
}

}  // namespace pyeditor::cpu
