// CPU nearest-prototype search: argument checks, then one of three exact paths (see
// search_math.h for the acceptance rule that makes the float32 passes exact):
//  * blocked: prototypes centred (l2) / normalised (cosine) and packed in 16-wide panels, a
//    register-tiled float32 GEMM micro-kernel whose epilogue feeds a running top-(k+1) per
//    query; the B x N distance matrix is never written. Used for large batches.
//  * direct: float32 (x - p)^2 / x.p per pair on the raw rows; small batches (no packing cost).
//  * exact: float64 direct difference; float64 inputs, k > kMaxK, and rejected queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "pyeditor/search_math.h"

namespace pyeditor {
namespace {

namespace ps = pe::search;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_SEARCH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PE_SEARCH_CLONES
#endif

typedef float v16f __attribute__((vector_size(64)));
constexpr int kLanes = 16;   // prototypes per packed panel
constexpr int kMR = 8;       // queries per micro-tile
constexpr int kMC = 64;      // queries per work item
constexpr int64_t kDirectMaxBatch = 32;  // below this the packing would cost more than it saves

int parse_metric(c10::string_view m) {
  if (m == "l2") return ps::kL2;
  if (m == "ip") return ps::kIP;
  if (m == "cosine") return ps::kCosine;
  TORCH_CHECK(false, "pyeditor: metric must be 'l2', 'ip' or 'cosine', got '", std::string(m), "'");
}

// Prototypes prepared for the blocked pass (float32 mode).
struct Packed {
  at::Tensor panels;           // [panels, dpad, 16] float32 (64-byte aligned), zero rows past d
  std::vector<float> bias;     // per packed lane: ||p'||^2 (l2) or 0
  std::vector<int64_t> orig;   // packed lane -> original prototype index
  std::vector<float> shift;    // the centre subtracted from queries (l2; dpad long), else empty
  double pmax = 0.0;           // max ||p'|| over packed prototypes
  int64_t count = 0, num_panels = 0;
  int64_t dpad = 0;            // d rounded up to 16: the top-1 tile reads whole 16-dim chunks
};

// Exact scan for any k (k > kMaxK): float64 keys of every prototype, partial sort.
template <class T, class O>
void exact_query_any_k(const T* x, const T* P, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  if (ps::row_has_nan(x, d)) return ps::write_nan_row(dist, idx, k);
  const double xn = metric == ps::kCosine ? ps::norm64(x, d) : 0.0;
  std::vector<std::pair<double, int64_t>> all;
  all.reserve(N);
  for (int64_t j = 0; j < N; ++j) {
    const double e = ps::exact_key(x, P + j * d, d, metric, xn);
    if (e == e) all.emplace_back(e, j);
  }
  const size_t m = std::min<size_t>(k, all.size());
  std::partial_sort(all.begin(), all.begin() + m, all.end(),
                    [](const auto& a, const auto& b) { return ps::before(a.first, a.second, b.first, b.second); });
  std::vector<double> keys(m);
  std::vector<int64_t> ids(m);
  for (size_t i = 0; i < m; ++i) keys[i] = all[i].first, ids[i] = all[i].second;
  ps::write_row(dist, idx, k, keys.data(), ids.data(), static_cast<int>(m), metric);
}

template <int CAP, class T, class O>
void exact_query_cap(const T* x, const T* P, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  if (k > ps::kMaxK) return exact_query_any_k(x, P, N, d, k, metric, dist, idx);
  ps::exact_query<CAP>(x, P, d, N, d, k, metric, dist, idx);
}

// ---------------------------------------------------------------- packing (float32 mode)
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

// ---------------------------------------------------------------- blocked float32 pass
typedef float v16fu __attribute__((vector_size(64), aligned(4)));  // unaligned loads

// keys[r][lane] = bias[lane] - scale * x'_r . p'_lane for kMR queries and NP panels.
template <int NP>
inline __attribute__((always_inline)) void micro_tile(const float* xb, int64_t d, const float* panel0,
                                                      int64_t panel_stride, const float* bias, float scale,
                                                      float* keys /* [kMR][NP*16] */) {
  v16f acc[kMR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) acc[r][p] = v16f{};
  for (int64_t i = 0; i < d; ++i) {
    v16f b[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) b[p] = *reinterpret_cast<const v16f*>(panel0 + p * panel_stride + i * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const float a = xb[r * d + i];
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[r][p] += a * b[p];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p)
      *reinterpret_cast<v16f*>(keys + (r * NP + p) * kLanes) =
          *reinterpret_cast<const v16fu*>(bias + p * kLanes) - scale * acc[r][p];
}

// ---------------------------------------------------------------- vector top-k epilogue
typedef int32_t v16i __attribute__((vector_size(64)));

inline __attribute__((always_inline)) v16f vmin(v16f a, v16f b) { return a < b ? a : b; }
inline __attribute__((always_inline)) v16i vmin(v16i a, v16i b) { return a < b ? a : b; }

// Smallest element of a vector (NaN-free input), by halving: four shuffles instead of 15
// dependent scalar compares.
template <class V> inline __attribute__((always_inline)) V spread_min(V a) {
  a = vmin(a, __builtin_shuffle(a, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  a = vmin(a, __builtin_shuffle(a, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  a = vmin(a, __builtin_shuffle(a, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  return vmin(a, __builtin_shuffle(a, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
}

template <class V> inline __attribute__((always_inline)) V spread_sum(V a) {
  a += __builtin_shuffle(a, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a += __builtin_shuffle(a, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  a += __builtin_shuffle(a, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return a + __builtin_shuffle(a, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
}

// out = x - shift (or x when shift is null); returns the float32 sum of squares of out, whose
// relative error is below gamma32(d + 2) (callers inflate by it). Vector partial sums: a
// float64 reduction per row cost more than the row's share of the distance tile.
inline __attribute__((always_inline)) float shifted_sumsq(const float* x, const float* shift, float* out,
                                                          int64_t d) {
  v16f acc{};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    v16f v = *reinterpret_cast<const v16fu*>(x + i);
    if (shift) v -= *reinterpret_cast<const v16fu*>(shift + i);
    *reinterpret_cast<v16fu*>(out + i) = v;
    acc += v * v;
  }
  float s = spread_sum(acc)[0];
  for (; i < d; ++i) {
    const float v = shift ? x[i] - shift[i] : x[i];
    out[i] = v;
    s += v * v;
  }
  return s;
}

// x[0:8] - p[0:8] widened to float64. Written lane by lane because GCC 12 then emits one
// memory-operand vcvtps2pd per row; __builtin_convertvector on 8-float vectors went through
// 128-bit halves and inserts.
typedef double v8d __attribute__((vector_size(64)));
inline __attribute__((always_inline)) v8d diff_f64(const float* x, const float* p) {
  v8d t;
  for (int l = 0; l < 8; ++l) t[l] = static_cast<double>(x[l]) - static_cast<double>(p[l]);
  return t;
}

// The float64 direct-difference key of one float32 pair (l2), or exact_key for the other
// metrics. Float64 partial sums reduced by halving: the generic reduction's epilogue
// spilled to the stack and cost as much as the whole distance tile row.
typedef int64_t v8l __attribute__((vector_size(64)));
inline __attribute__((always_inline)) double exact_key_f32(const float* x, const float* p, int64_t d, int metric,
                                                           double xn) {
  if (metric != ps::kL2) return ps::exact_key(x, p, d, metric, xn);
  v8d acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {  // two independent sums
    const v8d t0 = diff_f64(x + i, p + i), t1 = diff_f64(x + i + 8, p + i + 8);
    acc0 += t0 * t0;
    acc1 += t1 * t1;
  }
  if (i + 8 <= d) {
    const v8d t = diff_f64(x + i, p + i);
    acc0 += t * t;
    i += 8;
  }
  v8d acc = acc0 + acc1;
  acc += __builtin_shuffle(acc, v8l{4, 5, 6, 7, 0, 1, 2, 3});
  double s = acc[0] + acc[1] + acc[2] + acc[3];
  for (; i < d; ++i) {
    const double t = static_cast<double>(x[i]) - static_cast<double>(p[i]);
    s += t * t;
  }
  return s;
}

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

struct BlockJob {
  const float* x;        // [B, d] float32, contiguous
  const float* P;        // [N, d] original prototypes, float32
  const Packed* pk;
  int64_t N, d, row0, rows, B;
  int k, metric;
  float* dist;           // [B, k]
  int64_t* idx;          // [B, k]
};

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
    ps::Bound b{span < ps::kHuge ? ps::gamma32(d + 8) * span : INFINITY, 0.0};
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

// One butterfly stage on 16 vectors: swaps bit BIT of the row index with the same bit of the
// lane index (BIT = 1, 2, 4, 8 in turn give the 16 x 16 transpose).
template <int BIT> inline __attribute__((always_inline)) void swap_index_bit(v16f& a, v16f& b) {
  v16i lo, hi;  // two-source shuffle indices (16 + j picks lane j of b)
  for (int j = 0; j < kLanes; ++j) {
    lo[j] = (j & BIT) ? kLanes + (j ^ BIT) : j;
    hi[j] = (j & BIT) ? kLanes + j : (j | BIT);
  }
  const v16f x = a, y = b;
  a = __builtin_shuffle(x, y, lo);
  b = __builtin_shuffle(x, y, hi);
}

template <int BIT> inline __attribute__((always_inline)) void swap_index_bit(v16f (&m)[kMR2]) {
#pragma GCC unroll 16
  for (int i = 0; i < kMR2; ++i)
    if (!(i & BIT)) swap_index_bit<BIT>(m[i], m[i | BIT]);
}

// Lane r of the result = the sum of m[r]'s lanes: the same butterflies, adding each pair.
inline __attribute__((always_inline)) v16f row_sums(v16f (&m)[kMR2]) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) swap_index_bit<8>(m[i], m[i + 8]), m[i] += m[i + 8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) swap_index_bit<4>(m[i], m[i + 4]), m[i] += m[i + 4];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) swap_index_bit<2>(m[i], m[i + 2]), m[i] += m[i + 2];
  swap_index_bit<1>(m[0], m[1]);
  return m[0] + m[1];
}

// Writes queries x[0, nr) (nr <= 16; the rest of the tile is zero), minus shift (padded to
// dpad, or null), into tile form and returns their float32 sums of squares (lanes = rows).
inline __attribute__((always_inline)) v16f load_tile(const float* x, int64_t d, int64_t nr, const float* shift,
                                                     float* tile) {
  const int64_t full = d / kLanes, rem = d - full * kLanes, chunks = (d + kLanes - 1) / kLanes;
  v16f sq[kMR2];
  for (int r = 0; r < kMR2; ++r) {
    v16f acc{};
    float* dst = tile + r * kLanes;
    if (r < nr) {
      const float* xr = x + r * d;
      for (int64_t c = 0; c < full; ++c) {
        v16f v = *reinterpret_cast<const v16fu*>(xr + c * kLanes);
        if (shift) v -= *reinterpret_cast<const v16fu*>(shift + c * kLanes);
        *reinterpret_cast<v16fu*>(dst + c * kChunk) = v;
        acc += v * v;
      }
      if (rem) {
        v16f v{};
        for (int64_t i = 0; i < rem; ++i) v[i] = shift ? xr[full * kLanes + i] - shift[full * kLanes + i] : xr[full * kLanes + i];
        *reinterpret_cast<v16fu*>(dst + full * kChunk) = v;
        acc += v * v;
      }
    } else {
      for (int64_t c = 0; c < chunks; ++c) *reinterpret_cast<v16fu*>(dst + c * kChunk) = v16f{};
    }
    sq[r] = acc;
  }
  return row_sums(sq);
}

// keys[r] = bias - scale * x'_r . p' for the tile's 16 queries and one panel (lanes = prototypes).
inline __attribute__((always_inline)) void tile16(const float* tile, int64_t dpad, const float* panel,
                                                  const float* bias, float scale, v16f (&keys)[kMR2]) {
  v16f acc[kMR2];
#pragma GCC unroll 16
  for (int r = 0; r < kMR2; ++r) acc[r] = v16f{};
  for (int64_t c = 0; c < dpad; c += kLanes) {
    const float* xc = tile + c * kMR2;
    const float* pc = panel + c * kLanes;
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      const v16f b = *reinterpret_cast<const v16f*>(pc + j * kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < kMR2; ++r) acc[r] += xc[r * kLanes + j] * b;
    }
  }
  const v16f bv = *reinterpret_cast<const v16fu*>(bias);
#pragma GCC unroll 16
  for (int r = 0; r < kMR2; ++r) keys[r] = bv - scale * acc[r];
}

// The best two (key, packed lane) per query lane; ties keep the lower lane, as the packed
// order is the prototypes' index order. NaN keys never enter.
struct Best2 {
  v16f k1, k2;
  v16i i1, i2;
};

inline __attribute__((always_inline)) void offer(Best2& b, v16f v, v16i lane) {
  const v16i m1 = v < b.k1, m2 = v < b.k2;
  b.k2 = m1 ? b.k1 : (m2 ? v : b.k2);
  b.i2 = m1 ? b.i1 : (m2 ? lane : b.i2);
  b.k1 = m1 ? v : b.k1;
  b.i1 = m1 ? lane : b.i1;
}

// ps::accept_fast for k = 1 on 16 queries at once (float64 lanes, two halves): a query's
// winner is accepted when its centred norm is finite, its key is below kHuge and the second
// key's lower bound lies above the winner's upper bound. All-ones lanes are accepted.
// Float32 sum of (x - p_r)^2 over d for the `live` (<= 16) prototype rows of g (lane r; lanes
// >= live read +inf), 16 rows at a time so that one butterfly (row_sums) reduces all 16 sums.
// Its error is relative: below gamma32(d + 3) of the sum, whatever the order.
inline __attribute__((always_inline)) v16f group_sums_l2(const float* x, const float* g, int64_t live, int64_t d) {
  const int64_t dv = d / kLanes * kLanes;
  v16f acc[kLanes];
  alignas(64) float tail[kLanes] = {};
#pragma GCC unroll 16
  for (int r = 0; r < kLanes; ++r) acc[r] = v16f{};
  if (live == kLanes) {  // full groups: no per-row test in the hot loop
    for (int64_t i = 0; i < dv; i += kLanes) {
      const v16f xv = *reinterpret_cast<const v16fu*>(x + i);
#pragma GCC unroll 16
      for (int r = 0; r < kLanes; ++r) {
        const v16f t = xv - *reinterpret_cast<const v16fu*>(g + r * d + i);
        acc[r] += t * t;
      }
    }
  } else {
    for (int64_t r = 0; r < live; ++r)
      for (int64_t i = 0; i < dv; i += kLanes) {
        const v16f t = *reinterpret_cast<const v16fu*>(x + i) - *reinterpret_cast<const v16fu*>(g + r * d + i);
        acc[r] += t * t;
      }
  }
  for (int64_t r = 0; r < live; ++r)
    for (int64_t i = dv; i < d; ++i) {
      const float t = x[i] - g[r * d + i];
      tail[r] += t * t;
    }
  for (int64_t r = live; r < kLanes; ++r) tail[r] = INFINITY;  // missing prototypes never enter
  return row_sums(acc) + *reinterpret_cast<const v16f*>(tail);
}

// k = 1, l2: a finite query the blocked pass could not settle (a near-tie under its bound,
// which scales with ||x'|| + max ||p'||). Float32 direct-difference keys have a relative error
// below rel, so prototype j can only win if key_j (1 - rel) <= min key (1 + rel); only those
// few get float64 keys. Falls back to the full float64 scan when no key is finite.
inline __attribute__((always_inline)) void refine_l2_top1(const float* x, const float* P, int64_t N, int64_t d,
                                                          float* dist, int64_t* idx) {
  static thread_local std::vector<float> keys;
  keys.resize((N + kLanes - 1) / kLanes * kLanes);
  v16f lo = v16f{} + INFINITY;
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    const v16f s = group_sums_l2(x, P + j0 * d, std::min<int64_t>(kLanes, N - j0), d);
    *reinterpret_cast<v16fu*>(keys.data() + j0) = s;
    lo = vmin(lo, s == s ? s : lo);  // NaN (a NaN prototype) never wins
  }
  const double best = spread_min(lo)[0];
  if (!(best < ps::kHuge)) return ps::exact_query<2>(x, P, d, N, d, 1, ps::kL2, dist, idx);
  const double beta = ps::gamma32(d + 3), rel = beta / (1.0 - beta), cut = best * (1.0 + rel);
  double be = INFINITY;
  int64_t bj = -1;
  for (int64_t j = 0; j < N; ++j) {
    if (!(keys[j] * (1.0 - rel) <= cut)) continue;
    const double e = exact_key_f32(x, P + j * d, d, ps::kL2, 0.0);
    if (e == e && (bj < 0 || ps::before(e, j, be, bj))) be = e, bj = j;
  }
  if (bj < 0) return ps::exact_query<2>(x, P, d, N, d, 1, ps::kL2, dist, idx);
  dist[0] = static_cast<float>(be);
  idx[0] = bj;
}

template <int H> inline __attribute__((always_inline)) v8d half_f64(v16f v) {
  return __builtin_convertvector(__builtin_shufflevector(v, v, 8 * H, 8 * H + 1, 8 * H + 2, 8 * H + 3, 8 * H + 4,
                                                         8 * H + 5, 8 * H + 6, 8 * H + 7),
                                 v8d);
}

template <int H>
inline __attribute__((always_inline)) v8l accept_half(const Best2& best, v16f n2, double inflate, double g,
                                                      double pmax, bool l2) {
  const v8d n2d = half_f64<H>(n2), k1 = half_f64<H>(best.k1), k2 = half_f64<H>(best.k2);
  v8d xn;
  for (int l = 0; l < 8; ++l) xn[l] = std::sqrt(n2d[l] * inflate);  // >= ||x'||; NaN / inf stay so
  const v8d span = l2 ? (xn + pmax) * (xn + pmax) : xn * pmax;
  const v8d abs_err = g * span;
  const v8d ak = k1 < 0 ? -k1 : k1;
  return (n2d < INFINITY) & (ak < ps::kHuge) & (span < ps::kHuge) & (k2 - abs_err > k1 + abs_err);
}

inline __attribute__((always_inline)) v16i accept_top1(const Best2& best, v16f n2, const BlockJob& job) {
  const double inflate = 1.0 + ps::gamma32(job.d + 2), g = ps::gamma32(job.d + 8), pmax = job.pk->pmax;
  const bool l2 = job.metric == ps::kL2;
  const v8l lo = accept_half<0>(best, n2, inflate, g, pmax, l2), hi = accept_half<1>(best, n2, inflate, g, pmax, l2);
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
    *reinterpret_cast<v16f*>(n2) = load_tile(job.x + q0 * d, d, nr, shift, tile.data());
    Best2 best{v16f{} + INFINITY, v16f{} + INFINITY, v16i{} - 1, v16i{} - 1};
    for (int64_t pn = 0; pn < pk.num_panels; ++pn) {
      v16f keys[kMR2];
      tile16(tile.data(), pk.dpad, panels + pn * pk.dpad * kLanes, pk.bias.data() + pn * kLanes, scale, keys);
      swap_index_bit<1>(keys);
      swap_index_bit<2>(keys);
      swap_index_bit<4>(keys);
      swap_index_bit<8>(keys);
      const int base = static_cast<int>(pn * kLanes);
#pragma GCC unroll 16
      for (int c = 0; c < kLanes; ++c) offer(best, keys[c], v16i{} + (base + c));
    }
    alignas(64) int32_t ok[kMR2], i1[kMR2];
    *reinterpret_cast<v16i*>(ok) = accept_top1(best, *reinterpret_cast<const v16f*>(n2), job);
    *reinterpret_cast<v16i*>(i1) = best.i1;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t q = q0 + r;
      const float* xr = job.x + q * d;
      if (ok[r]) {
        const int64_t j = pk.orig[i1[r]];
        const double xn = job.metric == ps::kCosine ? ps::norm64(xr, d) : 0.0;
        const double e = exact_key_f32(xr, job.P + j * d, d, job.metric, xn);
        if (e == e) {  // NaN: the pair is not eligible after all
          job.dist[q] = static_cast<float>(ps::key_to_distance(e, job.metric));
          job.idx[q] = j;
          continue;
        }
      }
      if (job.metric == ps::kL2 && n2[r] < INFINITY) refine_l2_top1(xr, job.P, job.N, d, job.dist + q, job.idx + q);
      else ps::exact_query<2>(xr, job.P, d, job.N, d, 1, job.metric, job.dist + q, job.idx + q);
    }
  }
}

PE_SEARCH_CLONES void blocked_job(const BlockJob& job, int cap) {
  switch (cap) {
    case 2: return job.pk->count >= 2 ? blocked_rows_top1(job) : blocked_rows<2>(job);
    case 4: return blocked_rows<4>(job);
    case 8: return blocked_rows<8>(job);
    case 16: return blocked_rows<16>(job);
    default: return blocked_rows<ps::kMaxK + 1>(job);
  }
}

// ps::direct_fast for l2 with explicit vector sums: four prototypes at a time, each sum
// reduced by halving (the generic reduction's epilogue spilled to the stack). Same keys up to
// float32 summation order, hence the same relative bound.
template <int CAP>
inline __attribute__((always_inline)) ps::Bound direct_l2(const float* x, const float* P, int64_t N, int64_t d, int k,
                                                          ps::TopK<float, CAP>& top) {
  top.reset(k + 1);
  const int64_t dv = d / kLanes * kLanes;
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    const float* p = P + j * d;
    v16f a0{}, a1{}, a2{}, a3{};
    for (int64_t i = 0; i < dv; i += kLanes) {
      const v16f xv = *reinterpret_cast<const v16fu*>(x + i);
      const v16f t0 = xv - *reinterpret_cast<const v16fu*>(p + i);
      const v16f t1 = xv - *reinterpret_cast<const v16fu*>(p + d + i);
      const v16f t2 = xv - *reinterpret_cast<const v16fu*>(p + 2 * d + i);
      const v16f t3 = xv - *reinterpret_cast<const v16fu*>(p + 3 * d + i);
      a0 += t0 * t0;
      a1 += t1 * t1;
      a2 += t2 * t2;
      a3 += t3 * t3;
    }
    float s[4] = {spread_sum(a0)[0], spread_sum(a1)[0], spread_sum(a2)[0], spread_sum(a3)[0]};
    for (int64_t i = dv; i < d; ++i)
      for (int q = 0; q < 4; ++q) {
        const float t = x[i] - p[q * d + i];
        s[q] += t * t;
      }
    for (int q = 0; q < 4; ++q) top.push(s[q], j + q);
  }
  for (; j < N; ++j) {
    const float* p = P + j * d;
    v16f a{};
    for (int64_t i = 0; i < dv; i += kLanes) {
      const v16f t = *reinterpret_cast<const v16fu*>(x + i) - *reinterpret_cast<const v16fu*>(p + i);
      a += t * t;
    }
    float s = spread_sum(a)[0];
    for (int64_t i = dv; i < d; ++i) s += (x[i] - p[i]) * (x[i] - p[i]);
    top.push(s, j);
  }
  const double beta = ps::gamma32(d + 3);
  return {0.0, beta / (1.0 - beta)};
}

// direct_l2 for k = 1: the group sums kept as the best two per lane; the 32 lane candidates
// are merged once at the end. Per-prototype horizontal sums and list inserts cost more than
// the distances for one device's query. Same keys up to summation order, same bound as
// direct_l2.
inline __attribute__((always_inline)) ps::Bound direct_l2_top1(const float* x, const float* P, int64_t N, int64_t d,
                                                               ps::TopK<float, 2>& top) {
  const v16i iota{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  Best2 best{v16f{} + INFINITY, v16f{} + INFINITY, v16i{} - 1, v16i{} - 1};
  for (int64_t j0 = 0; j0 < N; j0 += kLanes)
    offer(best, group_sums_l2(x, P + j0 * d, std::min<int64_t>(kLanes, N - j0), d), iota + static_cast<int>(j0));
  top.reset(2);
  for (int l = 0; l < kLanes; ++l) {
    if (best.i1[l] >= 0) top.push(best.k1[l], best.i1[l]);
    if (best.i2[l] >= 0) top.push(best.k2[l], best.i2[l]);
  }
  const double beta = ps::gamma32(d + 3);
  return {0.0, beta / (1.0 - beta)};
}

template <int CAP>
inline __attribute__((always_inline)) void direct_rows(const float* x, const float* P, int64_t N, int64_t d, int k,
                                                       int metric, int64_t q0, int64_t q1, float* dist, int64_t* idx) {
  ps::TopK<float, CAP> top;
  for (int64_t q = q0; q < q1; ++q) {
    const float* xr = x + q * d;
    if (ps::row_finite(xr, d)) {
      ps::Bound b;
      if constexpr (CAP == 2) {
        if (metric == ps::kL2) {
          b = direct_l2_top1(xr, P, N, d, top);
          // +inf keys (float32 overflow) never enter the lanes: a short list is rescanned
          if (top.n < std::min<int64_t>(N, 2)) {
            ps::exact_query<CAP>(xr, P, d, N, d, k, metric, dist + q * k, idx + q * k);
            continue;
          }
        } else {
          b = ps::direct_fast<CAP>(xr, P, d, N, d, k, metric, top);
        }
      } else {
        b = metric == ps::kL2 ? direct_l2<CAP>(xr, P, N, d, k, top)
                              : ps::direct_fast<CAP>(xr, P, d, N, d, k, metric, top);
      }
      const double xn = metric == ps::kCosine ? ps::norm64(xr, d) : 0.0;
      auto exact = [&](int64_t j) { return exact_key_f32(xr, P + j * d, d, metric, xn); };
      if (ps::accept_fast(top, k, b, metric, exact, dist + q * k, idx + q * k)) continue;
    }
    ps::exact_query<CAP>(xr, P, d, N, d, k, metric, dist + q * k, idx + q * k);
  }
}

PE_SEARCH_CLONES void direct_job(const float* x, const float* P, int64_t N, int64_t d, int k, int metric, int64_t q0,
                                 int64_t q1, float* dist, int64_t* idx, int cap) {
  switch (cap) {
    case 2: return direct_rows<2>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 4: return direct_rows<4>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 8: return direct_rows<8>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 16: return direct_rows<16>(x, P, N, d, k, metric, q0, q1, dist, idx);
    default: return direct_rows<ps::kMaxK + 1>(x, P, N, d, k, metric, q0, q1, dist, idx);
  }
}

int capacity_for(int k) {
  const int need = k + 1;
  return need <= 2 ? 2 : need <= 4 ? 4 : need <= 8 ? 8 : need <= 16 ? 16 : ps::kMaxK + 1;
}

// at least ~2^18 multiply-adds per task: smaller batches run inline, without waking threads
int64_t grain_for(int64_t N, int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, N * d)); }

// float64 keys everywhere (float64 inputs, or k beyond the fixed lists).
template <class T, class O>
void exact_all(const T* x, const T* P, int64_t B, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  at::parallel_for(0, B, grain_for(N, d), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      exact_query_cap<ps::kMaxK + 1>(x + q * d, P, N, d, k, metric, dist + q * k, idx + q * k);
  });
}

void fast_all(const float* x, const float* P, int64_t B, int64_t N, int64_t d, int k, int metric, float* dist,
              int64_t* idx) {
  const int cap = capacity_for(k);
  auto direct = [&] {
    at::parallel_for(0, B, grain_for(N, d), [&](int64_t q0, int64_t q1) {
      direct_job(x, P, N, d, k, metric, q0, q1, dist, idx, cap);
    });
  };
  if (B < kDirectMaxBatch || d == 0) return direct();
  std::vector<int64_t> valid;
  bool has_inf = false;
  for (int64_t j = 0; j < N; ++j) {
    if (ps::row_finite(P + j * d, d)) valid.push_back(j);
    else if (!ps::row_has_nan(P + j * d, d)) has_inf = true;
  }
  // inf prototypes can still win (at distance inf): the direct pass keeps every row
  if (has_inf || valid.empty()) return direct();
  const Packed pk = pack_prototypes(P, N, d, metric, valid);
  const int64_t blocks = (B + kMC - 1) / kMC;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kMC;
      BlockJob job{x, P, &pk, N, d, row0, std::min<int64_t>(kMC, B - row0), B, k, metric, dist, idx};
      blocked_job(job, cap);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                        c10::string_view metric_name) {
  TORCH_CHECK(x.device().is_cpu() && prototypes.device().is_cpu(), "pyeditor: x and prototypes must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "pyeditor: x must be [B, d], got shape ", x.sizes());
  TORCH_CHECK(prototypes.dim() == 2, "pyeditor: prototypes must be [N, d], got shape ", prototypes.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(prototypes.scalar_type()),
              "pyeditor: x and prototypes must be floating, got ", x.scalar_type(), " and ", prototypes.scalar_type());
  TORCH_CHECK(x.size(1) == prototypes.size(1), "pyeditor: x has ", x.size(1), " features but prototypes have ",
              prototypes.size(1));
  const int64_t B = x.size(0), N = prototypes.size(0), d = x.size(1);
  TORCH_CHECK(k >= 1 && k <= N, "pyeditor: k must be in [1, N = ", N, "], got ", k);
  const int metric = parse_metric(metric_name);
  at::Tensor idx = at::empty({B, k}, x.options().dtype(at::kLong));
  const bool wide = x.scalar_type() == at::kDouble || prototypes.scalar_type() == at::kDouble;
  if (B == 0) return {at::empty({0, k}, x.options()), idx};
  const int kk = static_cast<int>(k);
  if (wide) {
    at::Tensor xd = x.to(at::kDouble).contiguous(), pd = prototypes.to(at::kDouble).contiguous();
    at::Tensor dist = at::empty({B, k}, x.options().dtype(at::kDouble));
    exact_all(xd.const_data_ptr<double>(), pd.const_data_ptr<double>(), B, N, d, kk, metric,
              dist.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>());
    return {dist.to(x.scalar_type()), idx};
  }
  // skip the no-op conversions' dispatcher round trips: one device's search is a few us
  auto as_f32 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor xf = as_f32(x), pf = as_f32(prototypes);
  at::Tensor dist = at::empty({B, k}, x.options().dtype(at::kFloat));
  const float* xp = xf.const_data_ptr<float>();
  const float* pp = pf.const_data_ptr<float>();
  if (k > ps::kMaxK) {
    exact_all(xp, pp, B, N, d, kk, metric, dist.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>());
  } else {
    fast_all(xp, pp, B, N, d, kk, metric, dist.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>());
  }
  if (x.scalar_type() == at::kFloat) return {dist, idx};
  return {dist.to(x.scalar_type()), idx};
}

}  // namespace pyeditor
