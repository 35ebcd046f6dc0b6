// CPU nearest-prototype search, blocked float32 pass (large batches): prototypes centred (l2)
// / normalised (cosine) and packed in 16-wide panels, a register-tiled GEMM micro-kernel whose
// epilogue keeps a running top-(k+1) per query; the B x N distance matrix is never written.
// Accepted lists get float64 winner keys; the rest are rescanned (search_math.h).
#include "search_passes.h"
#include "search_simd.h"

namespace pyeditor::search_cpu {

Packed pack_prototypes(const float* P, int64_t N, int64_t d, int metric, const std::vector<int64_t>& valid) {
  Packed pk;
  pk.orig = valid;
  pk.count = static_cast<int64_t>(valid.size());
  pk.num_panels = (pk.count + kLanes - 1) / kLanes;
  pk.dpad = (d + kLanes - 1) / kLanes * kLanes;
  pk.panels = at::zeros({std::max<int64_t>(pk.num_panels, 1), pk.dpad, kLanes}, at::kFloat);
  // padding lanes rank last (+inf) so the vector epilogue needs no lane mask
  pk.bias.assign(pk.num_panels * kLanes, INFINITY);
  std::vector<double> centre(d, 0.0);
  if (metric == ps::kL2 && pk.count > 0) {
    for (int64_t j : valid)
      for (int64_t i = 0; i < d; ++i) centre[i] += P[j * d + i];
    pk.shift.assign(pk.dpad, 0.f);  // zero past d: the top-1 tile subtracts whole chunks
    for (int64_t i = 0; i < d; ++i) pk.shift[i] = static_cast<float>(centre[i] / pk.count);
  }
  float* out = pk.panels.data_ptr<float>();
  double pmax2 = 0.0;
  for (int64_t c = 0; c < pk.count; ++c) {
    const float* p = P + valid[c] * d;
    float* dst = out + (c / kLanes) * pk.dpad * kLanes + (c % kLanes);
    const double inv = metric == ps::kCosine ? ps::norm64(p, d) : 1.0;
    double n2 = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      float v = p[i];
      if (metric == ps::kL2) v = p[i] - pk.shift[i];
      else if (metric == ps::kCosine) v = inv == 0.0 ? 0.f : static_cast<float>(p[i] / inv);
      dst[i * kLanes] = v;
      n2 += static_cast<double>(v) * v;
    }
    pk.bias[c] = metric == ps::kL2 ? static_cast<float>(n2) : 0.f;
    pmax2 = std::max(pmax2, n2);
  }
  pk.pmax = std::sqrt(pmax2);
  return pk;
}

namespace {

constexpr int kMR = 8;  // queries per micro-tile of the top-k pass

// acc[r][h] += a[r * a_stride] * b[h]: one rank-1 step of an RG x H block of V accumulators
template <class V, int RG, int H>
inline __attribute__((always_inline)) void rank1_step(V (&acc)[RG * H], const V (&b)[H], const float* a,
                                                      int64_t a_stride) {
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r) {
    const float ar = a[r * a_stride];
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) acc[r * H + h] += ar * b[h];
  }
}

// keys + r * key_stride <- bias - scale * acc[r] (H vectors of L lanes per row)
template <class V, int RG, int H>
inline __attribute__((always_inline)) void store_keys(float* keys, int64_t key_stride, const float* bias, float scale,
                                                      const V (&acc)[RG * H]) {
  constexpr int L = sizeof(V) / sizeof(float);
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) storeu(keys + r * key_stride + h * L, loadu<V>(bias + h * L) - scale * acc[r * H + h]);
}

// keys[r][lane] = bias[lane] - scale * x'_r . p'_lane for queries [R0, R0 + RG) of the kMR and
// NP panels, in vectors V of L lanes (v16f, or v8f halves where a v16f is two registers: see
// kOneRegisterV16): RG x NP x 16 / L accumulators.
template <class V, int NP, int RG>
inline __attribute__((always_inline)) void micro_rows(const float* xb, int64_t d, const float* panel0,
                                                      int64_t panel_stride, const float* bias, float scale,
                                                      float* keys, int r0) {
  constexpr int L = sizeof(V) / sizeof(float), H = NP * (kLanes / L);  // vectors per query
  V acc[RG * H];
#pragma GCC unroll 16
  for (int a = 0; a < RG * H; ++a) acc[a] = V{};
  for (int64_t i = 0; i < d; ++i) {
    V b[H];
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) b[h] = loadu<V>(panel0 + (h * L / kLanes) * panel_stride + i * kLanes + h * L % kLanes);
    rank1_step<V, RG, H>(acc, b, xb + r0 * d + i, d);
  }
  store_keys<V, RG, H>(keys + r0 * NP * kLanes, NP * kLanes, bias, scale, acc);
}

// keys[r][lane] for all kMR queries: one pass over the panels with 16-float registers (kMR x NP
// accumulators), else passes of 4 / NP queries in halves (8 ymm accumulators on AVX2).
template <int NP>
inline __attribute__((always_inline)) void micro_tile(const float* xb, int64_t d, const float* panel0,
                                                      int64_t panel_stride, const float* bias, float scale,
                                                      float* keys /* [kMR][NP*16] */) {
  if (kOneRegisterV16) return micro_rows<v16f, NP, kMR>(xb, d, panel0, panel_stride, bias, scale, keys, 0);
  constexpr int rg = 4 / NP;
  static_assert(kMR % rg == 0, "whole passes");
#pragma GCC unroll 1
  for (int r0 = 0; r0 < kMR; r0 += rg) micro_rows<v8f, NP, rg>(xb, d, panel0, panel_stride, bias, scale, keys, r0);
}

// ---------------------------------------------------------------- vector top-k epilogue (k > 1)
// Feeds one query's keys for NV panels (NV*16 lanes in prototype order; lanes >= live are
// padding) into its running top list, smallest first, stopping at the first key that cannot
// enter. With random keys the branchy scalar scan mispredicted on most lanes; this costs a
// few vector reductions per extracted candidate, and one when the panel holds nothing better.
// NaN keys (only from float32 overflow, whose rows the acceptance bound always rejects) are
// taken as +inf, so they rank last but still fill the list as the scalar scan did.
template <int NV, class Top>
inline __attribute__((always_inline)) void take_smallest(const float* keys, int64_t live, const int64_t* orig,
                                                         Top& top) {
  const v16i iota{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16f inf = v16f{} + INFINITY;
  v16f kv[NV];
  for (int v = 0; v < NV; ++v) {
    kv[v] = *reinterpret_cast<const v16f*>(keys + v * kLanes);
    kv[v] = kv[v] == kv[v] ? kv[v] : inf;
  }
  uint32_t taken = 0;  // lanes already fed (they then read +inf)
  for (int t = 0; t < top.limit; ++t) {
    v16f m = kv[0];
    for (int v = 1; v < NV; ++v) m = vmin(m, kv[v]);
    m = spread_min(m);  // every lane holds the minimum
    const float key = m[0];
    if (key == INFINITY) {
      // what is left is +inf (overflowed keys, or padding): index order decides, as in a scan
      for (int64_t l = 0; l < live && !top.full(); ++l)
        if (!(taken >> l & 1u)) top.push(INFINITY, orig[l]);
      return;
    }
    v16i pick = v16i{} + NV * kLanes;
    for (int v = 0; v < NV; ++v) pick = vmin(pick, kv[v] == m ? iota + v * kLanes : pick);
    const int lane = spread_min(pick)[0];  // the lowest lane holding it (a live one: key < inf)
    if (top.full() && !pe::search::before(key, orig[lane], top.worst(), top.idx[top.n - 1])) return;
    top.push(key, orig[lane]);
    kv[lane / kLanes][lane % kLanes] = INFINITY;
    taken |= 1u << lane;
  }
}

// Accepts one query's fast top list (exact winner keys) or rescans it exactly. n2 is the
// float32 sum of squares of the centred query (inf / NaN: not finite, always rescanned).
template <int CAP>
inline __attribute__((always_inline)) void finish_query(const BlockJob& job, int64_t q, float n2,
                                                        const ps::TopK<float, CAP>& top) {
  const int64_t d = job.d;
  const int metric = job.metric, k = job.k;
  const float* xr = job.x + q * d;
  float* dist = job.dist + q * k;
  int64_t* idx = job.idx + q * k;
  if (n2 < INFINITY) {
    const double pmax = job.pk->pmax;
    const double xnorm = std::sqrt(static_cast<double>(n2) * (1.0 + ps::gamma32(d + 2)));  // >= ||x'||
    const double span = metric == ps::kL2 ? (xnorm + pmax) * (xnorm + pmax) : xnorm * pmax;
    ps::Bound b{span < ps::kHuge ? ps::gamma32(d + 8) * span + ps::underflow_err(d) : INFINITY, 0.0};
    const double xn = metric == ps::kCosine ? ps::norm64(xr, d) : 0.0;
    auto exact = [&](int64_t j) { return exact_key_f32(xr, job.P + j * d, d, metric, xn); };
    if (ps::accept_fast(top, k, b, metric, exact, dist, idx)) return;
  }
  ps::exact_query<CAP>(xr, job.P, d, job.N, d, k, metric, dist, idx);
}

template <int CAP>
inline __attribute__((always_inline)) void blocked_rows(const BlockJob& job) {
  const int64_t d = job.d, rows = job.rows;
  const Packed& pk = *job.pk;
  alignas(64) float keys[kMR * 2 * kLanes];
  // centred copies of the block's queries, zero rows up to a multiple of kMR
  std::vector<float> xb((rows + kMR - 1) / kMR * kMR * d, 0.f);
  std::vector<float> n2(rows);
  std::vector<ps::TopK<float, CAP>> tops(rows);
  // the next block is usually this thread's next item: start its DRAM reads now
  const float* next = job.x + (job.row0 + rows) * d;
  const int64_t ahead = std::min<int64_t>(rows, job.B - job.row0 - rows) * d;
  for (int64_t i = 0; i < ahead; i += 16) __builtin_prefetch(next + i);
  const float* shift = job.metric == ps::kL2 ? pk.shift.data() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    n2[r] = shifted_sumsq(job.x + (job.row0 + r) * d, shift, xb.data() + r * d, d);
    tops[r].reset(job.k + 1);
  }
  const float scale = job.metric == ps::kL2 ? 2.f : 1.f;
  const float* panels = pk.panels.const_data_ptr<float>();
  const int64_t pstride = pk.dpad * kLanes;
  for (int64_t pn = 0; pn < pk.num_panels; pn += 2) {
    const int np = pk.num_panels - pn >= 2 ? 2 : 1;
    const int width = np * kLanes;
    const int64_t base = pn * kLanes;
    const int64_t lanes = std::min<int64_t>(width, pk.count - base);
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const float* bias = pk.bias.data() + base;
      if (np == 2) micro_tile<2>(xb.data() + r0 * d, d, panels + pn * pstride, pstride, bias, scale, keys);
      else micro_tile<1>(xb.data() + r0 * d, d, panels + pn * pstride, pstride, bias, scale, keys);
      const int64_t rend = std::min<int64_t>(kMR, rows - r0);
      const int64_t* orig = pk.orig.data() + base;
      for (int64_t r = 0; r < rend; ++r) {
        if (np == 2) take_smallest<2>(keys + r * width, lanes, orig, tops[r0 + r]);
        else take_smallest<1>(keys + r * width, lanes, orig, tops[r0 + r]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) finish_query<CAP>(job, job.row0 + r, n2[r], tops[r]);
}

// ---------------------------------------------------------------- top-1 pass (k = 1)
// For k = 1 only the best two keys per query matter (the second for the acceptance gap).
// Queries go 16 at a time: their centred rows are stored in 16-dim chunks, (r, i) at
// (i / 16) * 256 + r * 16 + i % 16, so the micro-kernel addresses all 16 rows from one
// pointer with constant offsets. The 16 x 16 key tile (lanes = prototypes) is transposed in
// registers so that lanes = queries: the running best two are then vector compares and
// blends, with no horizontal reductions or branches per query.
constexpr int kMR2 = 16;               // queries per top-1 tile
constexpr int kChunk = kMR2 * kLanes;  // floats per 16-dim chunk of a tile

// Writes queries x[0, nr) (nr <= 16; the rest of the tile is zero), minus shift (padded to
// dpad, or null), into tile form and n2[r] = row r's float32 sum of squares. V (v16f, or v8f
// where that is not one register: see kOneRegisterV16) is the width of the row's partial sums;
// one butterfly (row_sums) per L rows adds them up.
template <class V>
inline __attribute__((always_inline)) void load_tile(const float* x, int64_t d, int64_t nr, const float* shift,
                                                     float* tile, float* n2) {
  constexpr int L = sizeof(V) / sizeof(float);
  const int64_t chunks = (d + kLanes - 1) / kLanes;
  V sq[kMR2];
  for (int r = 0; r < kMR2; ++r) {
    V acc{};
    float* dst = tile + r * kLanes;
    if (r < nr) {
      const float* xr = x + r * d;
      for (int64_t c = 0; c < chunks; ++c)
#pragma GCC unroll 2
        for (int h = 0; h < kLanes / L; ++h) {
          const int64_t i = c * kLanes + L * h;
          V v{};
          if (i + L <= d) {
            v = loadu<V>(xr + i);
            if (shift) v -= loadu<V>(shift + i);  // (shift is padded to dpad)
          } else {
            for (int64_t l = 0; l < L && i + l < d; ++l) v[l] = shift ? xr[i + l] - shift[i + l] : xr[i + l];
          }
          storeu(dst + c * kChunk + L * h, v);
          acc += v * v;
        }
    } else {
      for (int64_t c = 0; c < chunks; ++c) storeu(dst + c * kChunk, v16f{});
    }
    sq[r] = acc;
  }
  for (int h = 0; h < kMR2 / L; ++h) {
    V group[L];
    for (int r = 0; r < L; ++r) group[r] = sq[L * h + r];
    storeu(n2 + L * h, row_sums(group));
  }
}

// The 16 x 16 key tile transposed in 8-lane halves (the butterflies of swap_index_bit: bits 1,
// 2 and 4 swap within halves, bit 8 swaps halves between rows).
inline __attribute__((always_inline)) void transpose16_v8(v16f (&keys)[kMR2]) {
  v8f lo[kMR2], hi[kMR2];
  for (int i = 0; i < kMR2; ++i) {
    lo[i] = *reinterpret_cast<const v8f*>(reinterpret_cast<const float*>(&keys[i]));
    hi[i] = *reinterpret_cast<const v8f*>(reinterpret_cast<const float*>(&keys[i]) + 8);
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR2; ++i)
    if (!(i & 1)) swap_index_bit<1>(lo[i], lo[i | 1]), swap_index_bit<1>(hi[i], hi[i | 1]);
#pragma GCC unroll 16
  for (int i = 0; i < kMR2; ++i)
    if (!(i & 2)) swap_index_bit<2>(lo[i], lo[i | 2]), swap_index_bit<2>(hi[i], hi[i | 2]);
#pragma GCC unroll 16
  for (int i = 0; i < kMR2; ++i)
    if (!(i & 4)) swap_index_bit<4>(lo[i], lo[i | 4]), swap_index_bit<4>(hi[i], hi[i | 4]);
  for (int i = 0; i < 8; ++i) {  // bit 8: row i's upper half <-> row i + 8's lower half
    float* a = reinterpret_cast<float*>(&keys[i]);
    float* b = reinterpret_cast<float*>(&keys[i + 8]);
    *reinterpret_cast<v8f*>(a) = lo[i];
    *reinterpret_cast<v8f*>(a + 8) = lo[i + 8];
    *reinterpret_cast<v8f*>(b) = hi[i];
    *reinterpret_cast<v8f*>(b + 8) = hi[i + 8];
  }
}

// keys[R0 + r] = bias - scale * x'_r . p' for queries [R0, R0 + RG) of the tile and one panel
// (lanes = prototypes), in vectors V of L lanes (v16f, or v8f halves: see kOneRegisterV16).
template <class V, int RG>
inline __attribute__((always_inline)) void tile_rows(const float* tile, int64_t dpad, const float* panel,
                                                     const float* bias, float scale, v16f (&keys)[kMR2], int r0) {
  constexpr int L = sizeof(V) / sizeof(float), H = kLanes / L;  // vectors per query
  V acc[RG * H];
#pragma GCC unroll 16
  for (int a = 0; a < RG * H; ++a) acc[a] = V{};
  for (int64_t c = 0; c < dpad; c += kLanes) {
    const float* xc = tile + c * kMR2 + r0 * kLanes;
    const float* pc = panel + c * kLanes;
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      V b[H];
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) b[h] = loadu<V>(pc + j * kLanes + h * L);
      rank1_step<V, RG, H>(acc, b, xc + j, kLanes);
    }
  }
  store_keys<V, RG, H>(reinterpret_cast<float*>(&keys[r0]), kLanes, bias, scale, acc);
}

// The tile's 16 queries against one panel: one pass with 16-float registers, else passes of
// 6 or 4 queries in halves (12 ymm accumulators on AVX2).
inline __attribute__((always_inline)) void tile16(const float* tile, int64_t dpad, const float* panel,
                                                  const float* bias, float scale, v16f (&keys)[kMR2]) {
  if (kOneRegisterV16) return tile_rows<v16f, kMR2>(tile, dpad, panel, bias, scale, keys, 0);
  tile_rows<v8f, 6>(tile, dpad, panel, bias, scale, keys, 0);
  tile_rows<v8f, 6>(tile, dpad, panel, bias, scale, keys, 6);
  tile_rows<v8f, 4>(tile, dpad, panel, bias, scale, keys, 12);
}

// ps::accept_fast for k = 1 on 16 queries at once (float64 lanes, two halves): a query's
// winner is accepted when its centred norm is finite, its key is below kHuge and the second
// key's lower bound lies above the winner's upper bound. All-ones lanes are accepted.
template <int H> inline __attribute__((always_inline)) v8d half_f64(v16f v) {
  return __builtin_convertvector(__builtin_shufflevector(v, v, 8 * H, 8 * H + 1, 8 * H + 2, 8 * H + 3, 8 * H + 4,
                                                         8 * H + 5, 8 * H + 6, 8 * H + 7),
                                 v8d);
}

template <int H>
inline __attribute__((always_inline)) v8l accept_half(const Best2& best, v16f n2, double inflate, double g,
                                                      double uf, double pmax, bool l2) {
  const v8d n2d = half_f64<H>(n2), k1 = half_f64<H>(best.k1), k2 = half_f64<H>(best.k2);
  v8d xn;
  for (int l = 0; l < 8; ++l) xn[l] = std::sqrt(n2d[l] * inflate);  // >= ||x'||; NaN / inf stay so
  const v8d span = l2 ? (xn + pmax) * (xn + pmax) : xn * pmax;
  const v8d abs_err = g * span + uf;
  const v8d ak = k1 < 0 ? -k1 : k1;
  return (n2d < INFINITY) & (ak < ps::kHuge) & (span < ps::kHuge) & (k2 - abs_err > k1 + abs_err);
}

inline __attribute__((always_inline)) v16i accept_top1(const Best2& best, v16f n2, const BlockJob& job) {
  const double inflate = 1.0 + ps::gamma32(job.d + 2), g = ps::gamma32(job.d + 8), pmax = job.pk->pmax;
  const double uf = ps::underflow_err(job.d);
  const bool l2 = job.metric == ps::kL2;
  const v8l lo = accept_half<0>(best, n2, inflate, g, uf, pmax, l2);
  const v8l hi = accept_half<1>(best, n2, inflate, g, uf, pmax, l2);
  v16i ok;
  for (int l = 0; l < 8; ++l) ok[l] = static_cast<int32_t>(lo[l]), ok[8 + l] = static_cast<int32_t>(hi[l]);
  return ok;
}

inline __attribute__((always_inline)) void blocked_rows_top1(const BlockJob& job) {
  const int64_t d = job.d, rows = job.rows;
  const Packed& pk = *job.pk;
  static thread_local std::vector<float> tile;  // reused: no allocation per block
  tile.resize(pk.dpad * kMR2);
  const float* shift = job.metric == ps::kL2 ? pk.shift.data() : nullptr;
  const float scale = job.metric == ps::kL2 ? 2.f : 1.f;
  const float* panels = pk.panels.const_data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kMR2) {
    const int64_t nr = std::min<int64_t>(kMR2, rows - r0);
    const int64_t q0 = job.row0 + r0;
    // the next tile (maybe the next block's): start its DRAM reads now
    const float* next = job.x + (q0 + kMR2) * d;
    const int64_t ahead = std::max<int64_t>(0, std::min<int64_t>(kMR2, job.B - q0 - kMR2)) * d;
    for (int64_t i = 0; i < ahead; i += 16) __builtin_prefetch(next + i);
    alignas(64) float n2[kMR2];
    if (kOneRegisterV16) load_tile<v16f>(job.x + q0 * d, d, nr, shift, tile.data(), n2);
    else load_tile<v8f>(job.x + q0 * d, d, nr, shift, tile.data(), n2);
    Best2 best{v16f{} + INFINITY, v16f{} + INFINITY, v16i{} - 1, v16i{} - 1};
    for (int64_t pn = 0; pn < pk.num_panels; ++pn) {
      v16f keys[kMR2];
      tile16(tile.data(), pk.dpad, panels + pn * pk.dpad * kLanes, pk.bias.data() + pn * kLanes, scale, keys);
      const int base = static_cast<int>(pn * kLanes);
      if (!kOneRegisterV16) {
        transpose16_v8(keys);
        offer_panel_v8(best, keys, base);
        continue;
      }
      swap_index_bit<1>(keys);
      swap_index_bit<2>(keys);
      swap_index_bit<4>(keys);
      swap_index_bit<8>(keys);
#pragma GCC unroll 16
      for (int c = 0; c < kLanes; ++c) offer(best, keys[c], v16i{} + (base + c));
    }
    alignas(64) int32_t ok[kMR2], i1[kMR2];
    *reinterpret_cast<v16i*>(ok) = accept_top1(best, *reinterpret_cast<const v16f*>(n2), job);
    *reinterpret_cast<v16i*>(i1) = best.i1;
    for (int64_t r = 0; r < nr; ++r) settle_top1(job, q0 + r, ok[r] != 0, i1[r], n2[r]);
  }
}

inline __attribute__((always_inline)) void blocked_any(const BlockJob& job, int cap) {
  switch (cap) {
    case 2: return job.pk->count >= 2 ? blocked_rows_top1(job) : blocked_rows<2>(job);
    case 4: return blocked_rows<4>(job);
    case 8: return blocked_rows<8>(job);
    case 16: return blocked_rows<16>(job);
    default: return blocked_rows<ps::kMaxK + 1>(job);
  }
}

// The pass once per vector level (cpu_isa.h), one picked at load.
using BlockedFn = void (*)(const BlockJob&, int);
void blocked_portable(const BlockJob& job, int cap) { blocked_any(job, cap); }
#if PE_ISA_VARIANTS
PE_TARGET_AVX2 void blocked_avx2(const BlockJob& job, int cap) { blocked_any(job, cap); }
PE_TARGET_AVX512 void blocked_avx512(const BlockJob& job, int cap) { blocked_any(job, cap); }
const BlockedFn kBlocked =
    pe::cpu::pick_variant<BlockedFn>(pe::cpu::vector_level(), blocked_portable, blocked_avx2, blocked_avx512);
#else
const BlockedFn kBlocked = blocked_portable;
#endif

}  // namespace

void blocked_job(const BlockJob& job, int cap) { kBlocked(job, cap); }

}  // namespace pyeditor::search_cpu
