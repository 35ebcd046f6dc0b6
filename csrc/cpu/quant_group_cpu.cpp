// CPU packed matmul with group-wise scales. The codes layout is the per-channel one (pack.h) and
// a group is a whole number of 16-input blocks. One row, where the plan has grouped_row (AVX2):
// the group-aware row kernels of quant_group_avx2.cpp keep each group's sums in registers and
// apply its scale and zero point there, against per-group activation sums computed once per
// call. Otherwise the per-channel inner kernels (cpu_quant.h) run unchanged on each group's
// block range, and this file adds, per group,
//   y += s_g * (sum_{k in g} q x_k - z_g * sum_{k in g} x_k)
// in float64 (the one-row kernels use float32 there: see quant_group_avx2.cpp); exact rows of a
// many-row call come centred from the kernels (sums of (q - z_g) x), so only s_g is applied.
// Exact mode: float32 activation rows and the float kernels; fast mode: int8 rows (one scale
// per row, as the per-channel fast mode) and exact int32 group sums.
#include "quant_group_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "pyeditor/cpu_isa.h"
#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "parallel_claim.h"
#include "quant_avx2.h"
#include "quant_group_avx2.h"
#include "quant_tiles.h"

namespace pyeditor {
namespace {
namespace q = pe::quant;
namespace qc = pe::quant::cpu;

// One group's sums into a tile row's float64 totals: tot[c] += s[c] * (acc[c] - z[c] * xs) * unit
// for the 16 channels c (unit: the fast mode's activation scale, 1 in exact mode). Every
// operation is float64 (with acc exact in float64), so both forms give the same bits.
inline void add_group_scalar(double* tot, const float* acc, const int32_t* acci, const float* s,
                             const uint8_t* z, double xs, double unit) {
  for (int c = 0; c < q::kTileN; ++c) {
    const double a = acc ? static_cast<double>(acc[c]) : static_cast<double>(acci[c]);
    tot[c] += static_cast<double>(s[c]) * unit * (a - static_cast<double>(z[c]) * xs);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"), optimize("fp-contract=off"))) void add_group_avx2(
    double* tot, const float* acc, const int32_t* acci, const float* s, const uint8_t* z, double xs, double unit) {
  const __m256d vxs = _mm256_set1_pd(xs), vunit = _mm256_set1_pd(unit);
  for (int c = 0; c < q::kTileN; c += 4) {
    const __m256d a = acc ? _mm256_cvtps_pd(_mm_loadu_ps(acc + c))
                          : _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(acci + c)));
    int32_t z4;
    std::memcpy(&z4, z + c, 4);
    const __m256d zc = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4)));
    const __m256d d = _mm256_sub_pd(a, _mm256_mul_pd(zc, vxs));
    const __m256d sc = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(s + c)), vunit);
    _mm256_storeu_pd(tot + c, _mm256_add_pd(_mm256_loadu_pd(tot + c), _mm256_mul_pd(sc, d)));
  }
}
const bool kAvx2Epilogue = pe::cpu::isa_allows(pe::cpu::kIsaAvx2) && __builtin_cpu_supports("avx2") &&
                           __builtin_cpu_supports("fma");
#else
const bool kAvx2Epilogue = false;
inline void add_group_avx2(double*, const float*, const int32_t*, const float*, const uint8_t*, double, double) {}
#endif

inline void add_group(double* tot, const float* acc, const int32_t* acci, const float* s, const uint8_t* z,
                      double xs, double unit) {
  if (kAvx2Epilogue) add_group_avx2(tot, acc, acci, s, z, xs, unit);
  else add_group_scalar(tot, acc, acci, s, z, xs, unit);
}

// gs[g] = sum of v over group g's inputs (k of them in all, the last group ragged)
template <class V>
void group_sums(const V* v, int64_t k, int64_t group_size, double* gs) {
  for (int64_t g0 = 0; g0 < k; g0 += group_size) {
    const int64_t g1 = std::min(k, g0 + group_size);
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = g0;
    for (; i + 4 <= g1; i += 4)
      for (int j = 0; j < 4; ++j) s[j] += static_cast<double>(v[i + j]);
    for (; i < g1; ++i) s[0] += static_cast<double>(v[i]);
    gs[g0 / group_size] = (s[0] + s[1]) + (s[2] + s[3]);
  }
}

struct GroupedRows {
  std::unique_ptr<float[]> xf;  // exact: float32 [m, kp], zero-padded (unless x is that already)
  const float* x = nullptr;
  std::vector<int8_t> xq;      // fast: int8 [m, kp]
  std::vector<float> xscale;   // fast: x ~= xq * xscale, per row
  std::vector<double> gsum;    // [m, groups]: per-group sum of what the kernels multiply (x or xq)
};

template <class T>
GroupedRows prepare_rows(const at::Tensor& x2, int64_t kp, int64_t group_size, int64_t groups, bool fast) {
  const int64_t m = x2.size(0), k = x2.size(1);
  const T* x = x2.const_data_ptr<T>();
  GroupedRows rows;
  rows.gsum.assign(m * groups, 0.0);
  constexpr bool is_float = std::is_same_v<T, float>;
  if (fast) {
    rows.xq.assign(m * kp, 0);
    rows.xscale.assign(m, 1.0f);
  } else if (!is_float || k != kp) {
    rows.xf.reset(new float[m * kp]);
  }
  rows.x = rows.xf ? rows.xf.get() : reinterpret_cast<const float*>(x);
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    std::vector<float> buf(is_float ? 0 : k);
    for (int64_t r = b; r < e; ++r) {
      const float* xr = reinterpret_cast<const float*>(x + r * k);
      if constexpr (!is_float) {
        for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(x[r * k + i]);
        xr = buf.data();
      }
      double* gs = rows.gsum.data() + r * groups;
      if (fast) {
        int8_t* xq = rows.xq.data() + r * kp;
        int64_t total = 0;
        rows.xscale[r] = qc::quantize_row_i8(xr, k, xq, &total);
        group_sums(xq, k, group_size, gs);
        continue;
      }
      if (rows.xf) {
        float* d = rows.xf.get() + r * kp;
        std::copy(xr, xr + k, d);
        std::fill(d + k, d + kp, 0.0f);
      }
      group_sums(xr, k, group_size, gs);
    }
  });
  return rows;
}

template <class T>
bool run_grouped(const PackedArgs& a, const q::LinearPlan& plan, const at::Tensor& x2, const at::Tensor& data,
                 const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& perm, const float* bias, bool fast,
                 at::Tensor& out) {
  const int64_t m = x2.size(0), kp = q::padded_k(a.k), blocks = kp / q::kTileK, n = a.n;
  const int64_t groups = a.groups, group_blocks = a.group_size / q::kTileK;
  const GroupedRows act = prepare_rows<T>(x2, kp, a.group_size, groups, fast);
  const std::vector<QuantTile> tiles = quant_tiles(a, data.const_data_ptr<uint8_t>());
  // One exact row where the CPU has the in-place code reads (AVX2): x scaled once per width, as
  // the per-channel GEMV does; each group reads its block range of it. Empty: tiles_dot_f32_row.
  std::vector<float> in_place[9];
  qc::InPlaceRead read[9];
  float unscale[9];
  // The group-aware row kernels are AVX2 ones on every CPU that has them: their in-place reads
  // (quant_avx2.h) come with them, also where AVX-512 runs the per-channel kernels.
  const bool avx2_row = plan.grouped_row;
  // One exact row as fixed-point digits where the plan has grouped_digits (AVX-512 VNNI), tiles
  // of every width (2-bit ones too: unlike the per-channel row, whose 2-bit tiles have the
  // lookup tables, the float group rows were slower there); a row with inf or NaN cannot (the
  // float row kernels then). The digit sums also keep a code equal to its zero point from
  // cancelling against a huge input in float32 (sum q x - z sum x), which the float rows do not.
  std::vector<int8_t> digits;
  std::vector<int64_t> group_sx;
  int digits_used = qc::kDigits;
  double pow2 = 0.0;
  if (plan.grouped_digits) {
    digits.assign(qc::digit_bytes(1, a.k), 0);
    group_sx.assign(groups, 0);
    int64_t sx = 0;
    int e = 0;
    if (qc::split_digits(act.x, a.k, 0, 1, digits.data(), &e, &sx, &digits_used, a.group_size, group_sx.data()))
      pow2 = std::ldexp(1.0, e - 45);
    else
      digits.clear();
  }
  auto scale_row = [&](int bits, qc::InPlaceRead r) {
    return avx2_row ? qc::avx2::scale_row(bits, act.x, kp, r, in_place[bits].data(), &unscale[bits])
                    : qc::in_place_row(bits, act.x, kp, r, in_place[bits].data(), &unscale[bits]);
  };
  if (plan.in_place_row) {
    for (const auto& b : a.buckets) {
      const int bits = static_cast<int>(b.bits);
      if (b.rows == 0 || !in_place[bits].empty() || !digits.empty() || !(avx2_row || qc::one_row_f32_tiles(bits)))
        continue;
      in_place[bits].resize(kp);
      read[bits] = avx2_row ? qc::avx2::preferred_read() : qc::in_place_read();
      if (scale_row(bits, read[bits])) continue;
      read[bits] = qc::InPlaceRead::kConvert;  // x out of the denormal read's range: try converting
      if (scale_row(bits, read[bits])) continue;
      in_place[bits].clear();
    }
  }
  // Work items: one row walks up to kRowTiles same-width tiles together (as many streams from
  // memory, as the per-channel GEMV does); more rows take one tile each.
  // (the multi-tile GEMM: at most kGemmTiles a call, fewer where a thread would get under two runs;
  // threads claim the items as they finish, see parallel_claim.h)
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()), threads = std::max(1, plan.threads);
  const int64_t cap = plan.tile_gemm ? std::clamp<int64_t>((n_tiles + 2 * threads - 1) / (2 * threads), 1, qc::kGemmTiles)
                      : m == 1 && !plan.dequant_gemm && !plan.centred_rows ? qc::kRowTiles : 1;
  std::vector<int64_t> starts{0};
  for (int64_t t = 0; t < static_cast<int64_t>(tiles.size());) {
    int64_t e = t + 1;
    while (e < static_cast<int64_t>(tiles.size()) && e - t < cap && tiles[e].bits == tiles[t].bits) ++e;
    starts.push_back(t = e);
  }
  const int64_t items = static_cast<int64_t>(starts.size()) - 1;
  // at most plan.threads threads wake (quant_plan.h: one for the few rows of a small layer)
  const float* s = scale.const_data_ptr<float>();
  const uint8_t* z = zero.const_data_ptr<uint8_t>();
  const q::PermView p = perm_view(perm);
  T* y = out.mutable_data_ptr<T>();
  std::atomic<bool> nonfinite{false};
  if (plan.grouped_row) {  // one row: the group-aware row kernels, a run of same-width tiles a call
    std::vector<float> xsum(fast ? 0 : groups);
    std::vector<int32_t> xsum_i(fast ? groups : 0);  // exact: sums of at most 128 int8 values
    for (int64_t g = 0; g < groups; ++g) {
      if (fast) xsum_i[g] = static_cast<int32_t>(act.gsum[g]);
      else xsum[g] = static_cast<float>(act.gsum[g]);
    }
    parallel_claim(items, plan.threads, [&](int64_t ib, int64_t ie) {
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t t0 = starts[item];
        const int nt = static_cast<int>(starts[item + 1] - t0), bits = tiles[t0].bits;
        qc::GroupedTile run[qc::kRowTiles];
        for (int u = 0; u < nt; ++u) run[u] = {tiles[t0 + u].ptr, s + tiles[t0 + u].row, z + tiles[t0 + u].row};
        float sums[qc::kRowTiles * q::kTileN];
        if (!digits.empty()) {
          qc::tiles_grouped_digits_row(run, nt, bits, blocks, group_blocks, a.rows, digits.data(), digits_used,
                                       group_sx.data(), pow2, sums);
        } else if (fast) {
          qc::avx2::grouped_i8_row(run, nt, bits, blocks, group_blocks, a.rows, act.xq.data(), xsum_i.data(),
                                   act.xscale[0], sums);
        } else if (!in_place[bits].empty()) {
          qc::avx2::grouped_f32_row(run, nt, bits, blocks, group_blocks, a.rows, in_place[bits].data(), &read[bits],
                                    unscale[bits], xsum.data(), sums);
        } else {
          qc::avx2::grouped_f32_row(run, nt, bits, blocks, group_blocks, a.rows, act.x, nullptr, 1.0f, xsum.data(),
                                    sums);
        }
        bool any = false;
        for (int u = 0; u < nt; ++u)
          for (int c = 0; c < q::kTileN; ++c) {
            const int32_t col = p[tiles[t0 + u].row + c];
            if (col < 0) continue;  // padding row
            const T v = static_cast<T>(sums[u * q::kTileN + c] + (bias ? bias[col] : 0.0f));
            y[col] = v;
            any |= !(std::fabs(static_cast<float>(v)) <= FLT_MAX);
          }
        if (any) nonfinite.store(true, std::memory_order_relaxed);
      }
    });
    return nonfinite.load();
  }
  // many exact rows through the multi-tile GEMM: the rows packed once into its panels
  std::vector<float> panels(plan.tile_gemm ? qc::gemm_panel_floats(m, kp) : 0);
  if (plan.tile_gemm)
    at::parallel_for(0, qc::gemm_panels(m), 1, [&](int64_t p0, int64_t p1) {
      qc::pack_gemm_panels(act.x, kp, m, kp, p0, p1, panels.data());
    });
  parallel_claim(items, plan.threads, [&](int64_t ib, int64_t ie) {
    // per-thread scratch, grown when needed (the kernels write before they read)
    static thread_local std::vector<float> accf, wbuf;
    static thread_local std::vector<int32_t> acci;
    static thread_local std::vector<double> tot;
    const size_t per_item = static_cast<size_t>(cap * m * q::kTileN);
    if (accf.size() < per_item) accf.resize(per_item);
    if (acci.size() < per_item) acci.resize(per_item);
    if (tot.size() < per_item) tot.resize(per_item);
    const int64_t wfloats = plan.tile_gemm ? qc::kGemmTiles * qc::kGemmChunkBlocks * 256
                                           : 256 * (plan.dequant_gemm ? blocks : group_blocks);
    if (wbuf.size() < static_cast<size_t>(wfloats)) wbuf.resize(wfloats);
    for (int64_t item = ib; item < ie; ++item) {
      const int64_t t0 = starts[item], nt = starts[item + 1] - t0;
      const int bits = tiles[t0].bits;
      std::fill(tot.begin(), tot.begin() + nt * m * q::kTileN, 0.0);
      if (plan.tile_gemm) {  // up to kGemmTiles tiles, the reference's weights, one GEMM
        const uint8_t* ptrs[qc::kGemmTiles];
        const float* sp[qc::kGemmTiles];
        const uint8_t* zp[qc::kGemmTiles];
        int widths[qc::kGemmTiles];
        for (int64_t u = 0; u < nt; ++u) {
          const QuantTile& tile = tiles[t0 + u];
          ptrs[u] = tile.ptr, sp[u] = s + tile.row, zp[u] = z + tile.row, widths[u] = tile.bits;
        }
        if (!qc::tiles_gemm_grouped_f32(ptrs, widths, static_cast<int>(nt), blocks, sp, zp, a.rows, group_blocks,
                                        panels.data(), m, accf.data(), wbuf.data()))
          std::abort();  // the plan has tile_gemm only where the kernel exists
        for (int64_t i = 0; i < nt * m * q::kTileN; ++i) tot[i] = accf[i];
      } else if (plan.dequant_gemm) {  // (one tile: nt == 1) the reference's weights, one GEMM
        const int64_t row0 = tiles[t0].row;
        qc::tile_gemm_grouped_f32(tiles[t0].ptr, bits, blocks, s + row0, z + row0, a.rows, group_blocks, act.x, kp,
                                  m, accf.data(), q::kTileN, wbuf.data());
        for (int64_t i = 0; i < m * q::kTileN; ++i) tot[i] = accf[i];
      }
      for (int64_t g = 0; g < (plan.dequant_gemm ? 0 : groups); ++g) {
        const int64_t b0 = g * group_blocks, nb = std::min(group_blocks, blocks - b0);
        const int64_t skip = b0 * q::block_bytes(bits);
        if (m == 1 && !plan.centred_rows) {
          const uint8_t* ptrs[qc::kRowTiles];
          for (int64_t u = 0; u < nt; ++u) ptrs[u] = tiles[t0 + u].ptr + skip;
          const int count = static_cast<int>(nt);
          if (fast) qc::tiles_dot_i8_row(ptrs, count, bits, nb, act.xq.data() + b0 * q::kTileK, acci.data());
          else if (!in_place[bits].empty())
            qc::tiles_dot_in_place_row(ptrs, count, bits, nb, in_place[bits].data() + b0 * q::kTileK, read[bits],
                                       unscale[bits], accf.data());
          else qc::tiles_dot_f32_row(ptrs, count, bits, nb, act.x + b0 * q::kTileK, accf.data());
        } else if (fast) {
          qc::tile_dot_i8(tiles[t0].ptr + skip, bits, nb, act.xq.data() + b0 * q::kTileK, kp, m, acci.data(), q::kTileN);
        } else {
          qc::tile_dot_f32(tiles[t0].ptr + skip, bits, nb, act.x + b0 * q::kTileK, kp, m, accf.data(), q::kTileN,
                           wbuf.data(), z + g * a.rows + tiles[t0].row);  // centred: see below
        }
        // sums laid out [tile u][row r][16]: one of nt and m is 1; exact rows of a many-row call
        // (or a spiky row: plan.centred_rows) are centred (tile_dot_f32 with the group's zero
        // points), so no z * sum x to subtract
        const bool centred = (m > 1 || plan.centred_rows) && !fast;
        for (int64_t u = 0; u < nt; ++u) {
          const int64_t row0 = tiles[t0 + u].row;
          const float* sg = s + g * a.rows + row0;
          const uint8_t* zg = z + g * a.rows + row0;
          for (int64_t r = 0; r < m; ++r) {
            const int64_t base = (u * m + r) * q::kTileN;
            add_group(tot.data() + base, fast ? nullptr : accf.data() + base, fast ? acci.data() + base : nullptr, sg,
                      zg, centred ? 0.0 : act.gsum[r * groups + g], fast ? static_cast<double>(act.xscale[r]) : 1.0);
          }
        }
      }
      // the item's output columns and biases once, then y row by row (a column walk missed per row)
      static_assert(qc::kRowTiles <= qc::kGemmTiles, "an item holds at most kGemmTiles tiles");
      int32_t cols[qc::kGemmTiles * q::kTileN];
      float bv[qc::kGemmTiles * q::kTileN];
      for (int64_t i = 0; i < nt * q::kTileN; ++i) {
        cols[i] = p[tiles[t0 + i / q::kTileN].row + i % q::kTileN];  // -1: a padding row
        bv[i] = bias && cols[i] >= 0 ? bias[cols[i]] : 0.0f;
      }
      bool any = false;
      const double* sums = tot.data();
      for (int64_t r = 0; r < m; ++r) {
        T* yr = y + r * n;
        for (int64_t i = 0; i < nt * q::kTileN; ++i) {
          if (cols[i] < 0) continue;
          const T v = static_cast<T>(static_cast<float>(sums[((i / q::kTileN) * m + r) * q::kTileN + i % q::kTileN]) + bv[i]);
          yr[cols[i]] = v;
          any |= !(std::fabs(static_cast<float>(v)) <= FLT_MAX);
        }
      }
      if (any) nonfinite.store(true, std::memory_order_relaxed);
    }
  });
  return nonfinite.load();
}

}  // namespace

bool run_linear_grouped_cpu(const PackedArgs& a, const pe::quant::LinearPlan& plan, const at::Tensor& x2,
                            const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                            const at::Tensor& perm, const float* bias, bool fast, at::Tensor& out) {
  bool nonfinite = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "pyeditor_quant_linear_grouped", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "pyeditor: internal: float64 x takes the dequantized path");
    } else {
      nonfinite = run_grouped<scalar_t>(a, plan, x2, data, scale, zero, perm, bias, fast, out);
    }
  });
  return nonfinite;
}

}  // namespace pyeditor
