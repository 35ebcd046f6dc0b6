// CPU (ATen) wrappers of the packed low-bit ops: checks, activation preparation (fp32
// zero-padded rows, or int8 rows with a per-row scale for the fast mode), then a parallel
// loop over 16-channel tiles whose epilogue applies y = s * acc + bias (acc: the sums of centred
// codes, (q - z) x, from tile_dot_f32 and the float GEMMs) or y = s * (acc - z * sum x) + bias
// (the one-row, table, digit, int8 and AMX sums) and writes each channel to its original column.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "../quant_args.h"
#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "pyeditor/quant_plan.h"
#include "parallel_claim.h"
#include "quant_group_cpu.h"
#include "quant_tiles.h"

namespace pyeditor {
namespace {
namespace q = pe::quant;

using Tile = QuantTile;
std::vector<Tile> tiles_of(const PackedArgs& a, const uint8_t* data) { return quant_tiles(a, data); }

constexpr int kChunksPerThread = 8;
constexpr int64_t kLutGroup = 8;  // tiles sharing one L1-resident chunk of lookup tables

// Tile boundaries [starts[i], starts[i+1]) of chunks holding about equal bytes of codes, or {}
// to split by tile count (chunks_per_thread == 0, or too few tiles for it to matter).
std::vector<int64_t> balanced_chunks(const std::vector<Tile>& tiles, int64_t k, int chunks_per_thread) {
  const int64_t n = static_cast<int64_t>(tiles.size());
  const int64_t chunks = std::min<int64_t>(n, int64_t(chunks_per_thread) * at::get_num_threads());
  if (chunks_per_thread == 0 || chunks < 2) return {};
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + q::tile_bytes(tiles[t].bits, k);
  std::vector<int64_t> starts{0};
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = prefix[n] * c / chunks;
    const int64_t t = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    if (t > starts.back() && t < n) starts.push_back(t);
  }
  starts.push_back(n);
  return starts;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pyeditor: ", name, " must be a CPU tensor here, got ", t.device());
}

// Rows of activations as the kernels want them.
struct Activations {
  std::unique_ptr<float[]> xf;  // fp32 [M, Kp] (exact mode; each row writes its own padding)
  const float* xrows = nullptr;  // exact mode: xf, or x itself when it is float32 with K = Kp
  std::unique_ptr<uint16_t[]> parts;  // AMX exact mode: bf16 [3][m16][kp32], x = hi + mid + lo
                                     // (not zeroed here: every row is written, padding included)
  std::vector<double> unscale;  // AMX exact mode: per row, the power of two sums are scaled by
  int64_t m16 = 0, kp32 = 0;
  std::vector<int8_t> digits;   // integer GEMV, A-tile order (exact: fixed-point digits of each row,
                                // AMX or one row on VNNI; AMX fast: xq)
  int64_t a_rows = 0;           // A-tile rows in all (the result rows per channel)
  struct Group {
    int64_t offset, rows, first;  // A tiles at digits + offset, `rows` of them from result row `first`
  };
  std::vector<Group> groups;    // AMX GEMV: one pass over the codes each (at most 16 A rows)
  std::vector<double> pow2;     // exact digit GEMV: 2^(e - 45) per row
  std::vector<int64_t> sx;      // exact digit GEMV: sum of the fixed-point row
  int digits_used = q::cpu::kDigits;  // exact digit GEMV: the most digits any row needs
  std::vector<int8_t> xq;     // int8 [M, Kp] (fast mode)
  std::vector<double> sum;    // sum_k x (exact) or sum_k xq (fast), per row
  std::vector<float> xscale;  // fast mode: x ~= xq * xscale
};

// Row r of x [m, k] as float32: x itself for float, else converted into buf.
template <class T>
const float* row_as_float(const T* x, int64_t r, int64_t k, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x + r * k;
  } else {
    buf.resize(k);
    for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(x[r * k + i]);
    return buf.data();
  }
}

template <class T>
// digits: exact rows as fixed-point digits (with the float row too when float_row: one row whose
// 2-bit tiles take the lookup tables); amx: bf16 parts; fast_tiles: the int8 rows as A tiles;
// sums: exact float rows also need sum_k x (kernels that leave z * sum x to the epilogue).
Activations prepare(const at::Tensor& x2, int64_t kp, bool fast, bool amx, bool digits, bool float_row,
                    bool fast_tiles, bool sums) {
  const int64_t m = x2.size(0), k = x2.size(1);
  const T* x = x2.const_data_ptr<T>();
  Activations act;
  act.sum.assign(m, 0.0);
  if (digits) {  // rows in groups of kDigitRowsMax, each group one A tile per step
    const int64_t per_group = q::cpu::digit_bytes(std::min(m, q::cpu::kDigitRowsMax), k);
    act.digits.assign(per_group * ((m + q::cpu::kDigitRowsMax - 1) / q::cpu::kDigitRowsMax), 0);
    act.pow2.assign(m, 1.0);
    act.sx.assign(m, 0);
    std::vector<float> row;
    bool ok = true;
    act.digits_used = 1;
    for (int64_t g0 = 0; g0 < m && ok; g0 += q::cpu::kDigitRowsMax) {
      const int64_t rows = std::min<int64_t>(q::cpu::kDigitRowsMax, m - g0), off = g0 / q::cpu::kDigitRowsMax * per_group;
      act.groups.push_back({off, rows * q::cpu::kDigits, g0 * q::cpu::kDigits});
      for (int64_t r = g0; r < g0 + rows && ok; ++r) {
        int e = 0, used = q::cpu::kDigits;
        ok = q::cpu::split_digits(row_as_float(x, r, k, row), k, r - g0, rows, act.digits.data() + off, &e,
                                  &act.sx[r], &used);
        act.pow2[r] = std::ldexp(1.0, e - 45);
        act.digits_used = std::max(act.digits_used, used);
      }
    }
    if (ok) {
      act.a_rows = m * q::cpu::kDigits;
      if (!float_row) return act;
    } else {
      act.digits.clear();  // a row with inf or NaN: the float path below
      act.groups.clear();
    }
  }
  if (amx) {
    act.m16 = (m + 15) / 16 * 16;
    act.kp32 = q::cpu::amx_padded_k(k);
    // uninitialised: zeroing 3 * m16 * kp32 values first was a visible part of a many-row call
    act.parts.reset(new uint16_t[3 * act.m16 * act.kp32]);
    act.unscale.assign(m, 1.0);
    at::parallel_for(0, act.m16, 16, [&](int64_t b, int64_t e) {
      std::vector<float> row;
      for (int64_t r = b; r < e; ++r) {
        if (r >= m) {
          q::cpu::zero_row_bf16(r, act.m16, act.kp32, act.parts.get());
          continue;
        }
        act.unscale[r] = q::cpu::split_row_bf16(row_as_float(x, r, k, row), k, r, act.m16, act.kp32,
                                                act.parts.get(), &act.sum[r]);
      }
    });
    return act;
  }
  if (!fast) {
    // not zero-filled first, and four partial sums: the zeroing and the one float64 add chain
    // were a fifth of what a many-row call spent outside the kernel (perf); and x itself where
    // it already is float32 rows of Kp, not a copy (bench: packed_linear/*/M256/384x1536 rows)
    constexpr bool is_float = std::is_same_v<T, float>;
    if (!is_float || k != kp) act.xf.reset(new float[m * kp]);
    act.xrows = act.xf ? act.xf.get() : reinterpret_cast<const float*>(x);
    if (!act.xf && !sums) return act;  // x as it is, and centred kernels only
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        float* d = act.xf ? act.xf.get() + r * kp : nullptr;
        const T* xr = x + r * k;
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t i = 0;
        if (d) {
          for (; i + 4 <= k; i += 4)
            for (int j = 0; j < 4; ++j) {
              d[i + j] = static_cast<float>(xr[i + j]);
              s[j] += d[i + j];
            }
          for (; i < k; ++i) {
            d[i] = static_cast<float>(xr[i]);
            s[0] += d[i];
          }
          std::fill(d + k, d + kp, 0.0f);
        } else {  // (k = kp: a multiple of 4)
          for (; i + 4 <= k; i += 4)
            for (int j = 0; j < 4; ++j) s[j] += static_cast<float>(xr[i + j]);
        }
        act.sum[r] = (s[0] + s[1]) + (s[2] + s[3]);
      }
    });
    return act;
  }
  act.xq.assign(m * kp, 0);
  act.xscale.assign(m, 1.0f);
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row;
    for (int64_t r = b; r < e; ++r) {
      int64_t s = 0;
      act.xscale[r] = q::cpu::quantize_row_i8(row_as_float(x, r, k, row), k, act.xq.data() + r * kp, &s);
      act.sum[r] = static_cast<double>(s);
    }
  });
  if (fast_tiles) {  // the int8 rows as AMX A tiles, 16 rows a group: step s holds its rows x 64 bytes
    const int64_t steps = (kp / q::kTileK + 3) / 4;
    act.digits.assign(steps * ((m + 15) / 16 * 16) * 64, 0);
    for (int64_t g0 = 0; g0 < m; g0 += 16) {
      const int64_t rows = std::min<int64_t>(16, m - g0), off = g0 * steps * 64;
      act.groups.push_back({off, rows, g0});
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < kp; ++i)
          act.digits[off + (i / 64) * rows * 64 + r * 64 + i % 64] = act.xq[(g0 + r) * kp + i];
    }
    act.a_rows = m;
  }
  return act;
}

// Returns whether any output is not finite (the caller then looks for rows to redo).
template <class T>
bool run_linear(const PackedArgs& a, const at::Tensor& x2, const at::Tensor& data, const at::Tensor& scale,
                const at::Tensor& zero, const at::Tensor& perm, const float* bias, bool fast, at::Tensor& out) {
  const int64_t m = x2.size(0), kp = q::padded_k(a.k), blocks = kp / q::kTileK, n = a.n;
  // the kernels this call takes: quant_plan.h (the table ctest checks), from shape, mode and CPU
  bool wide_tiles = false;
  for (const auto& b : a.buckets) wide_tiles = wide_tiles || (b.bits != 2 && b.rows > 0);
  q::LinearCall call;
  call.m = m, call.k = a.k, call.fast = fast, call.group_size = a.group_size, call.wide_tiles = wide_tiles;
  for (const auto& b : a.buckets) call.code_bytes += b.rows / q::kTileN * q::tile_bytes(b.bits, a.k);
  call.threads = at::get_num_threads();
  if (!fast && m < q::kLutRows) {  // few exact rows: is one dominated by a few inputs?
    std::vector<float> buf;
    for (int64_t r = 0; r < m && !call.spiky; ++r)
      call.spiky = q::spiky_row(row_as_float(x2.const_data_ptr<T>(), r, a.k, buf), a.k);
  }
  const q::CpuCaps caps = q::cpu::cpu_caps();
  const q::LinearPlan plan = q::plan_linear(caps, call);
  if (plan.path == q::LinearPath::kGrouped)
    return run_linear_grouped_cpu(a, plan, x2, data, scale, zero, perm, bias, fast, out);
  const bool amx = plan.path == q::LinearPath::kAmxGemm;
  const bool gemv_amx = caps.amx;
  // exact float rows need sum x only where tables or one-row kernels run (the rest is centred)
  const Activations act =
      prepare<T>(x2, kp, fast, amx, plan.digits, plan.digit_float_row, plan.fast_tiles, plan.lut || m == 1);
  const bool tiles_a = !act.groups.empty();     // digits or fast A tiles run (a row with inf or NaN
                                                // cannot take the digits: the float kernels then)
  const bool digits = tiles_a && !fast;          // the exact one
  const bool one_row = digits && m == 1;         // width by width, see the work loop
  // GEMV (few rows, exact mode): x-scaled lookup tables, built once per call for each width
  // that has a table path; lut[bits] holds m rows of lut_floats(bits, kp) floats.
  std::vector<float> lut[9];
  if (plan.lut && (!digits || plan.digit_float_row)) {
    for (const auto& b : a.buckets) {
      const int bits = static_cast<int>(b.bits);
      const int64_t per_row = q::cpu::lut_floats(bits, kp);
      if (per_row == 0 || !lut[bits].empty() || b.rows == 0) continue;
      lut[bits].resize(m * per_row);
      for (int64_t r = 0; r < m; ++r) q::cpu::build_lut(bits, act.xrows + r * kp, kp, lut[bits].data() + r * per_row);
    }
  }
  // One exact float row (AVX2): x scaled for the in-place code reads, once per call and width;
  // empty where that kernel does not apply (then tiles_dot_f32_row on x, the same sums)
  // (read as denormals where the CPU prefers it and x is in that range, else converted)
  std::vector<float> in_place[9];
  q::cpu::InPlaceRead in_place_read[9];
  float in_place_unscale[9];
  if (plan.in_place_row && !digits) {
    for (const auto& b : a.buckets) {
      const int bits = static_cast<int>(b.bits);
      if (b.rows == 0 || !in_place[bits].empty() || !q::cpu::one_row_f32_tiles(bits)) continue;
      in_place[bits].resize(kp);
      auto& read = in_place_read[bits];
      read = q::cpu::in_place_read();
      float* xs = in_place[bits].data();
      if (q::cpu::in_place_row(bits, act.xrows, kp, read, xs, &in_place_unscale[bits])) continue;
      if (read == q::cpu::InPlaceRead::kDenormal) {
        read = q::cpu::InPlaceRead::kConvert;
        if (q::cpu::in_place_row(bits, act.xrows, kp, read, xs, &in_place_unscale[bits])) continue;
      }
      in_place[bits].clear();
    }
  }
  const std::vector<Tile> tiles = tiles_of(a, data.const_data_ptr<uint8_t>());
  const float* s = scale.const_data_ptr<float>();
  const uint8_t* z = zero.const_data_ptr<uint8_t>();
  const q::PermView p = perm_view(perm);
  T* y = out.mutable_data_ptr<T>();
  // set where a written output is inf or NaN: in the common all-finite case the caller skips its
  // scan of the output (a visible part of a cold M = 1 call)
  std::atomic<bool> nonfinite{false};
  auto flag_if_nonfinite = [&](bool any) {
    if (any) nonfinite.store(true, std::memory_order_relaxed);
  };
  // y = s * acc + bias (centred: af holds sums of (q - z) x, from tile_dot_f32 and the float
  // GEMMs) or y = s * (acc - z * sum x) + bias for the m rows of one tile, into original columns:
  // float sums in af, or integer ones in ai (fixed-point digits, or the fast mode's)
  // (integer sums: 16 channels a vector where the CPU has AVX-512, the same bits as the scalar
  // code below, which was a visible part of an M = 1 call in both modes)
  auto epilogue = [&](const Tile& tile, const float* af, const int32_t* ai, bool centred = false) {
    bool any = false;
    // float32 out, the tile's channels in 16 consecutive columns (uniform widths: the identity
    // permutation): whole rows stored at once, no per-value scatter (that loop was a visible
    // part of a many-row call)
    const int32_t col0 = p[tile.row];
    bool contiguous = std::is_same_v<T, float> && col0 >= 0 && col0 <= n - q::kTileN;
    for (int c = 1; contiguous && c < q::kTileN; ++c) contiguous = p[tile.row + c] == col0 + c;
    float b16[q::kTileN];
    for (int c = 0; contiguous && c < q::kTileN; ++c) b16[c] = bias ? bias[col0 + c] : 0.0f;
    for (int64_t r = 0; r < m; ++r) {
      float vec[q::kTileN];
      const bool done =
          af ? q::cpu::finish_float_row(af + r * q::kTileN, centred ? 0.0 : act.sum[r], s + tile.row, z + tile.row, vec)
             : (digits ? q::cpu::finish_digits_row(ai + r * q::cpu::kDigits * q::kTileN, act.sx[r], act.pow2[r],
                                                   s + tile.row, z + tile.row, vec)
                       : q::cpu::finish_fast_row(ai + r * q::kTileN, act.sum[r], act.xscale[r], s + tile.row,
                                                 z + tile.row, vec));
      if (done && contiguous) {  // the values of the loop below, for float32 out
        float* dst = reinterpret_cast<float*>(y) + r * n + col0;
        int bad = 0;
        for (int c = 0; c < q::kTileN; ++c) {
          dst[c] = vec[c] + b16[c];
          bad |= !(std::fabs(dst[c]) <= FLT_MAX);
        }
        any |= bad != 0;
        continue;
      }
      for (int c = 0; c < q::kTileN; ++c) {
        const int64_t row = tile.row + c;
        const int32_t col = p[row];
        if (col < 0) continue;  // padding row
        const double zr = z[row];
        const float sr = s[row], b = bias ? bias[col] : 0.0f;
        float v;
        if (done) {
          v = vec[c];
        } else if (!af && digits) {  // exact in 128 bits, then one rounding to double
          __int128 acc = 0;
          for (int d = 0; d < q::cpu::kDigits; ++d)
            acc += static_cast<__int128>(ai[(r * q::cpu::kDigits + d) * q::kTileN + c]) << (8 * (q::cpu::kDigits - 1 - d));
          acc -= static_cast<__int128>(z[row]) * act.sx[r];
          v = sr * static_cast<float>(static_cast<double>(acc) * act.pow2[r]);
        } else if (!af) {  // fast
          const double acc = static_cast<double>(ai[r * q::kTileN + c]) - zr * act.sum[r];
          v = static_cast<float>(acc) * (sr * act.xscale[r]);
        } else {
          const double acc = static_cast<double>(af[r * q::kTileN + c]);  // (AMX: finish_tile_amx)
          v = sr * static_cast<float>(acc - zr * (centred ? 0.0 : act.sum[r]));
        }
        const T out_v = static_cast<T>(v + b);
        y[r * n + col] = out_v;
        any |= !(std::fabs(static_cast<float>(out_v)) <= FLT_MAX);
      }
    }
    flag_if_nonfinite(any);
  };
  if (amx) {
    // work items: groups of kAmxGroup tiles (each decodes its codes once per K chunk for its rows)
    // times row ranges of at most 64 rows, whose three bf16 parts of a K chunk (384 KiB) stay in
    // L2 (all rows at once measured slower, most on narrow layers), and enough ranges to keep
    // every thread busy when there are few tiles
    const int64_t n_tiles = static_cast<int64_t>(tiles.size());
    const int64_t groups = (n_tiles + q::cpu::kAmxGroup - 1) / q::cpu::kAmxGroup;
    const int64_t pairs32 = (act.m16 + 31) / 32;  // the kernel walks rows in pairs of 16
    const int64_t busy = (4 * at::get_num_threads() + groups - 1) / groups;
    const int64_t splits = std::min<int64_t>(pairs32, std::max<int64_t>(busy, (pairs32 + 1) / 2));
    const int64_t rows_per = (pairs32 + splits - 1) / splits * 32;
    parallel_claim(groups * splits, plan.threads, [&](int64_t ib, int64_t ie) {
      static thread_local std::vector<float> acc;
      static thread_local std::vector<uint32_t> pairs;
      acc.resize(q::cpu::kAmxGroup * act.m16 * q::kTileN);
      pairs.resize(q::cpu::kAmxGroup * q::cpu::kAmxChunkBlocks * 128);
      for (int64_t i = ib; i < ie; ++i) {
        const int64_t g = i / splits, r0 = (i % splits) * rows_per, r1 = std::min(act.m16, r0 + rows_per);
        if (r0 >= r1) continue;
        const int64_t t0 = g * q::cpu::kAmxGroup, cnt = std::min<int64_t>(q::cpu::kAmxGroup, n_tiles - t0);
        const uint8_t* ptrs[q::cpu::kAmxGroup];
        int bits[q::cpu::kAmxGroup];
        for (int64_t u = 0; u < cnt; ++u) ptrs[u] = tiles[t0 + u].ptr, bits[u] = tiles[t0 + u].bits;
        q::cpu::tiles_dot_amx(ptrs, bits, static_cast<int>(cnt), blocks, act.parts.get(), act.m16, act.kp32, r0, r1,
                              acc.data(), pairs.data());
        for (int64_t u = 0; u < cnt; ++u) {  // the epilogue 16 channels a vector, then the scatter
          const Tile& tile = tiles[t0 + u];
          float* au = acc.data() + u * act.m16 * q::kTileN;
          int32_t cols[q::kTileN];
          float b16[q::kTileN];
          for (int c = 0; c < q::kTileN; ++c) {
            cols[c] = p[tile.row + c];
            b16[c] = bias && cols[c] >= 0 ? bias[cols[c]] : 0.0f;
          }
          const int64_t re = std::min(r1, m);
          q::cpu::finish_tile_amx(au, r0, re, act.unscale.data(), act.sum.data(), s + tile.row, z + tile.row, b16);
          bool any = false;
          for (int64_t r = r0; r < re; ++r)
            for (int c = 0; c < q::kTileN; ++c) {
              if (cols[c] < 0) continue;
              const T out_v = static_cast<T>(au[r * q::kTileN + c]);
              y[r * n + cols[c]] = out_v;
              any |= !(std::fabs(static_cast<float>(out_v)) <= FLT_MAX);
            }
          flag_if_nonfinite(any);
        }
      }
    });
    return nonfinite.load();
  }
  // many rows (plan.tile_gemm): the rows packed once into the GEMM's panels
  std::vector<float> panels;
  std::vector<int32_t> panels_i8;
  if (plan.tile_gemm) {
    if (fast) panels_i8.resize(q::cpu::gemm_panel_floats(m, kp) / 4);
    else panels.resize(q::cpu::gemm_panel_floats(m, kp));
    at::parallel_for(0, q::cpu::gemm_panels(m), 1, [&](int64_t p0, int64_t p1) {
      if (fast) q::cpu::pack_gemm_panels_i8(act.xq.data(), kp, m, kp, p0, p1, panels_i8.data());
      else q::cpu::pack_gemm_panels(act.xrows, kp, m, kp, p0, p1, panels.data());
    });
  }
  // Work items of equal cost: bytes of codes for few rows (a 2-bit tile streams a quarter of an
  // 8-bit one), tiles for many rows (the multiply-adds dominate).
  std::vector<int64_t> starts = balanced_chunks(tiles, a.k, m < 4 || tiles_a ? kChunksPerThread : 0);
  if (plan.tile_gemm && starts.empty()) {  // runs of up to kGemmTiles tiles, at least two a thread
    const int64_t n_tiles = static_cast<int64_t>(tiles.size()), threads = std::max(1, plan.threads);
    const int64_t run = std::clamp<int64_t>((n_tiles + 2 * threads - 1) / (2 * threads), 1, q::cpu::kGemmTiles);
    for (int64_t t = 0; t < n_tiles; t += run) starts.push_back(t);
    starts.push_back(n_tiles);
  }
  const int64_t work = std::max<int64_t>(1, kp * q::kTileN * std::max<int64_t>(m, 1));
  const int64_t grain = starts.empty() ? std::max<int64_t>(1, (int64_t(1) << 16) / work) : 1;
  const int64_t items = starts.empty() ? static_cast<int64_t>(tiles.size()) : static_cast<int64_t>(starts.size()) - 1;
  auto body = [&](int64_t ibegin, int64_t iend) {
    const int64_t begin = starts.empty() ? ibegin : starts[ibegin];
    const int64_t end = starts.empty() ? iend : starts[iend];
    // per-thread scratch, grown when needed and never cleared (the kernels write before they
    // read): a fresh zeroed 256 KiB decode buffer per work item cost a quarter of a 2-bit GEMV
    static thread_local std::vector<float> accf, wbuf;
    static thread_local std::vector<int32_t> acci;
    const int64_t acc_tiles = std::max<int64_t>(kLutGroup, plan.tile_gemm ? q::cpu::kGemmTiles : 0);
    if (!fast && accf.size() < static_cast<size_t>(acc_tiles * m * q::kTileN)) accf.resize(acc_tiles * m * q::kTileN);
    if (!fast && wbuf.size() < static_cast<size_t>(kp * q::kTileN)) wbuf.resize(kp * q::kTileN);
    if (fast && acci.size() < static_cast<size_t>(m * q::kTileN)) acci.resize(m * q::kTileN);
    // end of the run of at most `cap` tiles from t that share t's width (walked together below)
    auto same_width_end = [&](int64_t t, int64_t t_end, int64_t cap) {
      int64_t e = t + 1;
      while (e < t_end && e - t < cap && tiles[e].bits == tiles[t].bits) ++e;
      return e;
    };
    // One row: same-width tiles from t walked together, as many sequential streams from memory
    // (faster than a tile at a time from DRAM: bench packed_linear/dram/M1 rows). Fast: int8
    // sums, up to kRowTiles. Exact with digits (one_row): integer digit sums, up to
    // kDigitRowTiles. Exact without them (K > 65536, inf or NaN in x, no AVX-512 VNNI): float
    // sums, up to kRowTiles (8 bits gains; 4 bits loses).
    static_assert(q::cpu::kDigitRowTiles <= q::cpu::kRowTiles, "one pointer array for both");
    auto row_group = [&](int64_t t, int64_t t_end) {
      const int bits = tiles[t].bits;
      const int64_t g_end = same_width_end(t, t_end, one_row ? q::cpu::kDigitRowTiles : q::cpu::kRowTiles);
      const uint8_t* ptrs[q::cpu::kRowTiles];
      for (int64_t u = t; u < g_end; ++u) ptrs[u - t] = tiles[u].ptr;
      const int nt = static_cast<int>(g_end - t);
      const int64_t per_tile = (one_row ? q::cpu::kDigits : 1) * q::kTileN;
      const size_t need = q::cpu::kRowTiles * per_tile;
      const bool integer = fast || one_row;
      if (integer && acci.size() < need) acci.resize(need);
      if (!integer && accf.size() < need) accf.resize(need);
      if (one_row) q::cpu::tiles_dot_digits_row(ptrs, nt, bits, blocks, act.digits.data(), acci.data(), act.digits_used);
      else if (fast) q::cpu::tiles_dot_i8_row(ptrs, nt, bits, blocks, act.xq.data(), acci.data());
      else if (!in_place[bits].empty())
        q::cpu::tiles_dot_in_place_row(ptrs, nt, bits, blocks, in_place[bits].data(), in_place_read[bits],
                                       in_place_unscale[bits], accf.data());
      else q::cpu::tiles_dot_f32_row(ptrs, nt, bits, blocks, act.xrows, accf.data());
      for (int64_t u = t; u < g_end; ++u) {
        const int64_t off = (u - t) * per_tile;
        epilogue(tiles[u], integer ? nullptr : accf.data() + off, integer ? acci.data() + off : nullptr);
      }
      return g_end;
    };
    // up to kLutGroup same-width tiles walked together, K chunk by chunk
    auto lut_group = [&](int64_t t, int64_t t_end) {
      const int bits = tiles[t].bits;
      const int64_t g_end = same_width_end(t, t_end, kLutGroup);
      const int64_t per_row = static_cast<int64_t>(lut[bits].size()) / m;
      const int64_t chunk = q::cpu::lut_chunk_blocks(bits);
      std::fill(accf.begin(), accf.begin() + (g_end - t) * m * q::kTileN, 0.0f);
      for (int64_t b0 = 0; b0 < blocks; b0 += chunk)
        for (int64_t u = t; u < g_end; ++u)
          for (int64_t r = 0; r < m; ++r)
            q::cpu::tile_dot_lut(tiles[u].ptr, bits, b0, std::min(blocks, b0 + chunk),
                                 lut[bits].data() + r * per_row, accf.data() + ((u - t) * m + r) * q::kTileN);
      for (int64_t u = t; u < g_end; ++u) epilogue(tiles[u], accf.data() + (u - t) * m * q::kTileN, nullptr);
      return g_end;
    };
    // One exact row picks a kernel per width (measured A/B, interleaved, on the bench's
    // packed_linear/dram/M1/4096x4096 rows where AMX is present): 4, 6 and 8 bits take the VNNI
    // digit rows, faster than the AMX digits and (8 bits) the float rows: four tiles stream
    // together, while the AMX kernel's tile loads and unpacking stores leave DRAM idle. 2 bits has
    // 4 codes a byte, too much integer work for six digits: AMX digits where present, else the
    // lookup tables.
    auto row_kernel = [&](int64_t t, int64_t t_end) {
      if (tiles[t].bits != 2) return row_group(t, t_end);
      return gemv_amx ? t + 1 : lut_group(t, t_end);  // (AMX: done in the batch before)
    };
    if (tiles_a) {  // the work item's tiles in one call (one tile configuration)
      static thread_local std::vector<const uint8_t*> ptrs;
      static thread_local std::vector<int> bits;
      static thread_local std::vector<int64_t> index;
      ptrs.clear(), bits.clear(), index.clear();
      for (int64_t t = begin; t < end; ++t) {
        if (one_row && !(gemv_amx && tiles[t].bits == 2)) continue;  // row_kernel below
        ptrs.push_back(tiles[t].ptr), bits.push_back(tiles[t].bits), index.push_back(t);
      }
      const int64_t per_tile = act.a_rows * q::kTileN, n_tiles = static_cast<int64_t>(index.size());
      if (acci.size() < static_cast<size_t>(n_tiles * per_tile)) acci.resize(n_tiles * per_tile);
      if (n_tiles > 0 && act.groups.size() == 1) {
        q::cpu::tiles_dot_digits(ptrs.data(), bits.data(), n_tiles, blocks, act.digits.data(), act.a_rows,
                                 acci.data());
      } else if (n_tiles > 0) {  // one pass per group, its rows copied into place
        static thread_local std::vector<int32_t> part;
        for (const auto& g : act.groups) {
          if (part.size() < static_cast<size_t>(n_tiles * g.rows * q::kTileN)) part.resize(n_tiles * g.rows * q::kTileN);
          q::cpu::tiles_dot_digits(ptrs.data(), bits.data(), n_tiles, blocks, act.digits.data() + g.offset, g.rows,
                                   part.data());
          for (int64_t u = 0; u < n_tiles; ++u)
            std::memcpy(acci.data() + u * per_tile + g.first * q::kTileN, part.data() + u * g.rows * q::kTileN,
                        sizeof(int32_t) * g.rows * q::kTileN);
        }
      }
      for (int64_t u = 0; u < n_tiles; ++u) epilogue(tiles[index[u]], nullptr, acci.data() + u * per_tile);
      if (one_row)
        for (int64_t t = begin; t < end;) t = row_kernel(t, end);
      return;
    }
    // many rows: up to kGemmTiles tiles of any widths, K chunk by chunk (cpu_quant.h)
    auto gemm_group = [&](int64_t t, int64_t t_end) {
      static thread_local std::vector<float> chunks;
      static thread_local std::vector<uint8_t> chunks_i8;
      const int64_t g_end = std::min<int64_t>(t_end, t + q::cpu::kGemmTiles), nt = g_end - t;
      const uint8_t* ptrs[q::cpu::kGemmTiles];
      const uint8_t* zeros[q::cpu::kGemmTiles];
      int widths[q::cpu::kGemmTiles];
      for (int64_t u = t; u < g_end; ++u)
        ptrs[u - t] = tiles[u].ptr, zeros[u - t] = z + tiles[u].row, widths[u - t] = tiles[u].bits;
      bool ran;
      if (fast) {
        const int64_t need = q::cpu::kGemmTiles * q::cpu::kGemmChunkBlocksI8 * q::kTileK * q::kTileN;
        if (chunks_i8.size() < static_cast<size_t>(need)) chunks_i8.resize(need);
        if (acci.size() < static_cast<size_t>(nt * m * q::kTileN)) acci.resize(nt * m * q::kTileN);
        ran = q::cpu::tiles_gemm_i8(ptrs, widths, static_cast<int>(nt), blocks, panels_i8.data(), m, acci.data(),
                                    chunks_i8.data());
      } else {
        const int64_t need = q::cpu::kGemmTiles * q::cpu::kGemmChunkBlocks * q::kTileK * q::kTileN;
        if (chunks.size() < static_cast<size_t>(need)) chunks.resize(need);
        ran = q::cpu::tiles_gemm_f32(ptrs, widths, static_cast<int>(nt), blocks, panels.data(), m, accf.data(),
                                     chunks.data(), zeros);
      }
      if (!ran) std::abort();  // the plan has tile_gemm only where the kernels exist
      for (int64_t u = t; u < g_end; ++u) {
        const int64_t off = (u - t) * m * q::kTileN;
        epilogue(tiles[u], fast ? nullptr : accf.data() + off, fast ? acci.data() + off : nullptr, !fast);
      }
      return g_end;
    };
    for (int64_t t = begin; t < end;) {
      const Tile& tile = tiles[t];
      if (plan.tile_gemm) {
        t = gemm_group(t, end);
        continue;
      }
      if (!fast && !lut[tile.bits].empty()) {
        t = lut_group(t, end);
        continue;
      }
      if (m == 1 && (fast || q::cpu::one_row_f32_tiles(tile.bits)) && !plan.centred_rows) {
        t = row_group(t, end);
        continue;
      }
      if (fast)
        q::cpu::tile_dot_i8(tile.ptr, tile.bits, blocks, act.xq.data(), kp, m, acci.data(), q::kTileN);
      else
        q::cpu::tile_dot_f32(tile.ptr, tile.bits, blocks, act.xrows, kp, m, accf.data(), q::kTileN,
                             wbuf.data(), z + tile.row);
      epilogue(tile, fast ? nullptr : accf.data(), fast ? acci.data() : nullptr, !fast);
      ++t;
    }
  };
  if (starts.empty()) at::parallel_for(0, items, std::max(grain, (items + plan.threads - 1) / plan.threads), body);
  else parallel_claim(items, plan.threads, body);  // byte-balanced GEMV chunks, or GEMM tile runs
  return nonfinite.load();
}

}  // namespace

at::Tensor quant_dequantize_cpu(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                                const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                                int64_t out_features, int64_t group_size) {
  check_cpu(data, "packed data");
  const PackedArgs a = check_packed(data, scale, zero, perm, buckets, in_features, out_features, group_size);
  check_perm_values(perm, a.n);
  at::Tensor out = at::empty({a.n, a.k}, data.options().dtype(at::kFloat));
  const std::vector<Tile> tiles = tiles_of(a, data.const_data_ptr<uint8_t>());
  const float* s = scale.const_data_ptr<float>();
  const uint8_t* z = zero.const_data_ptr<uint8_t>();
  const q::PermView p = perm_view(perm);
  float* w = out.mutable_data_ptr<float>();
  const int64_t k = a.k, gs = a.group_size > 0 ? a.group_size : std::max<int64_t>(k, 1);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile& tile = tiles[t];
      for (int c = 0; c < q::kTileN; ++c) {
        const int64_t row = tile.row + c;
        if (p[row] < 0) continue;
        float* wr = w + static_cast<int64_t>(p[row]) * k;
        for (int64_t i = 0; i < k; ++i) {
          const uint8_t* blk = tile.ptr + (i / q::kTileK) * q::block_bytes(tile.bits);
          const int64_t at = (i / gs) * a.rows + row;  // group-major scales (one group per channel: row)
          wr[i] = q::dequant(q::get_code(blk, tile.bits, c, static_cast<int>(i % q::kTileK)), z[at], s[at]);
        }
      }
    }
  });
  return out;
}

namespace {
// Rows of out holding inf or NaN while their x row has no NaN, recomputed as x @ W.T on the
// dequantized weight (a plain scan: the ATen isfinite / nonzero chain was a visible part of a
// one-row call).
void redo_nonfinite_rows(const at::Tensor& x2, at::Tensor& out, const at::Tensor& data, const at::Tensor& scale,
                         const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                         const PackedArgs& a, const at::Tensor& b) {
  // (a.group_size: the dequantized weight below is group-wise too)
  std::vector<uint8_t> bad(out.size(0), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pyeditor_quant_finite", [&] {
    const scalar_t* o = out.const_data_ptr<scalar_t>();
    const scalar_t* xs = x2.const_data_ptr<scalar_t>();
    at::parallel_for(0, out.size(0), 64, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        bool inf = false;
        for (int64_t c = 0; c < a.n; ++c) inf |= !(std::fabs(static_cast<float>(o[r * a.n + c])) <= FLT_MAX);
        if (!inf) continue;
        bool nan_input = false;
        for (int64_t i = 0; i < a.k; ++i) nan_input |= std::isnan(static_cast<float>(xs[r * a.k + i]));
        bad[r] = !nan_input;
      }
    });
  });
  std::vector<int64_t> redo;
  for (int64_t r = 0; r < out.size(0); ++r)
    if (bad[r]) redo.push_back(r);
  if (redo.empty()) return;
  const at::Tensor inf_rows = at::tensor(redo, x2.options().dtype(at::kLong));
  const at::Tensor w = quant_dequantize_cpu(data, scale, zero, perm, buckets, a.k, a.n, a.group_size);
  at::Tensor y = at::matmul(x2.index_select(0, inf_rows).to(at::kFloat), w.t());
  if (b.defined()) y = y + b;
  out.index_copy_(0, inf_rows, y.to(out.scalar_type()));
}

}  // namespace

at::Tensor quant_linear_cpu(const at::Tensor& x_in, const at::Tensor& data, const at::Tensor& scale,
                            const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                            int64_t in_features, int64_t out_features, const c10::optional<at::Tensor>& bias,
                            bool fast, int64_t group_size, bool bf16) {
  check_cpu(x_in, "x");
  check_cpu(data, "packed data");
  const PackedArgs a = check_packed(data, scale, zero, perm, buckets, in_features, out_features, group_size);
  check_linear_inputs(a, x_in, bias, data);
  check_perm_values(perm, a.n);
  const at::Tensor x = mode_activations(x_in, fast, bf16);
  TORCH_CHECK(!fast || a.k <= 65536, "pyeditor: fast (int8) mode sums in int32 and supports at most 65536 "
              "input features, got ", a.k);
  const auto shape = linear_out_shape(x, a.n);
  if (x.scalar_type() == at::kDouble) {
    // float64 (gradcheck, tests): the float32 weight exactly, in a float64 matmul
    at::Tensor w = quant_dequantize_cpu(data, scale, zero, perm, buckets, a.k, a.n, a.group_size).to(at::kDouble);
    at::Tensor y = at::matmul(x, w.t());
    if (bias.has_value() && bias->defined()) y = y + bias->to(at::kDouble);
    return y.reshape(shape).contiguous();
  }
  // (a 2-D x as it is: each ATen view is a visible part of a cold M = 1 call)
  const at::Tensor x2 =
      (x.dim() == 2 ? x : x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), a.k})).contiguous();
  at::Tensor out = at::empty({x2.size(0), a.n}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  bool nonfinite = false;
  if (out.numel()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyeditor_quant_linear_cpu", [&] {
      nonfinite = run_linear<scalar_t>(a, x2, data, scale, zero, perm, b.defined() ? b.const_data_ptr<float>() : nullptr,
                           fast, out);
    });
  }
  // s * (sum q x - z * sum x) turns an inf input (or a sum that overflows) into inf - inf = NaN,
  // and a centred sum may overflow, where the reference's sum of ((q - z) * s) * x gives +-inf
  // or a finite value: rows with a
  // non-finite result and no NaN input are redone on the dequantized weight (rare: only when
  // the kernels wrote a non-finite output is the output scanned for them)
  if (nonfinite) redo_nonfinite_rows(x2, out, data, scale, zero, perm, buckets, a, b);
  if (x.scalar_type() != x_in.scalar_type()) out = out.to(x_in.scalar_type());  // bf16 mode, float16 x
  return x.dim() == 2 ? out : out.reshape(shape);
}

}  // namespace pyeditor
