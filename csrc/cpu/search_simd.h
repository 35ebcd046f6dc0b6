// Vector helpers shared by the CPU search passes (search_blocked.cpp, search_direct.cpp):
// GCC vector extensions, so that each pass's per-level variants (cpu_isa.h) compile them for
// AVX-512, AVX2 or baseline x86-64. Internal to csrc/cpu.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pyeditor/cpu_isa.h"
#include "pyeditor/search_math.h"
#include "search_passes.h"

namespace pyeditor::search_cpu {

namespace ps = pe::search;

// Whether 16-float vectors are one register here (AVX-512: the passes run their kIsaAvx512
// variant). Elsewhere a v16f is two (AVX2) or four registers: micro-kernels holding 16 of them
// spilled on every FMA (the AVX2 variant of the blocked pass: ~4x the stack traffic of the
// AVX-512 one), and GCC moved even a few v16f accumulators through general registers at every
// loop edge; there the micro-kernels keep 8-float halves (v8f) for fewer queries per pass
// instead. A load-time value, not a template parameter: each variant then compiles both
// paths, and so the register allocation of the hot loops stays what it was under
// target_clones (a compile-time split spilled the AVX2 top-1 tile's accumulators).
inline const bool kOneRegisterV16 = pe::cpu::vector_level() >= pe::cpu::kIsaAvx512;

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));  // the halves the narrow micro-kernels keep
typedef float v8fu __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v16fu __attribute__((vector_size(64), aligned(4)));  // unaligned loads
typedef int32_t v16i __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));
constexpr int kLanes = 16;  // floats per vector: prototypes per packed panel, queries per tile

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

typedef double v8d __attribute__((vector_size(64)));

// Unaligned vector load / store of V (v16f or v8f) at p.
template <class V> inline __attribute__((always_inline)) V loadu(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V> inline __attribute__((always_inline)) void storeu(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }

// The float64 direct-difference key of one float32 pair (l2), or exact_key for the other
// metrics. Four 4-lane float64 partial sums reduced by halving: the generic reduction's
// epilogue spilled to the stack and cost as much as the whole distance tile row, and 8-lane
// ones went through general registers where a vector of 8 doubles is two (AVX2).
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
// x[0:4] - p[0:4] widened to float64, lane by lane: GCC 12 then emits one memory-operand
// vcvtps2pd (__builtin_convertvector went through 128-bit halves and inserts)
inline __attribute__((always_inline)) v4d diff_f64x4(const float* x, const float* p) {
  v4d t;
  for (int l = 0; l < 4; ++l) t[l] = static_cast<double>(x[l]) - static_cast<double>(p[l]);
  return t;
}
inline __attribute__((always_inline)) double exact_key_f32(const float* x, const float* p, int64_t d, int metric,
                                                           double xn) {
  if (metric != ps::kL2) return ps::exact_key(x, p, d, metric, xn);
  v4d acc[4] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)  // four independent sums
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const v4d t = diff_f64x4(x + i + 4 * a, p + i + 4 * a);
      acc[a] += t * t;
    }
  for (; i + 4 <= d; i += 4) {
    const v4d t = diff_f64x4(x + i, p + i);
    acc[0] += t * t;
  }
  v4d sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  sum += __builtin_shuffle(sum, v4l{2, 3, 0, 1});
  double s = sum[0] + sum[1];
  for (; i < d; ++i) {
    const double t = static_cast<double>(x[i]) - static_cast<double>(p[i]);
    s += t * t;
  }
  return s;
}

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

template <int BIT> inline __attribute__((always_inline)) void swap_index_bit(v16f (&m)[kLanes]) {
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i)
    if (!(i & BIT)) swap_index_bit<BIT>(m[i], m[i | BIT]);
}

// The best two (key, packed lane) per query lane; ties keep the lower lane, as the packed
// order is the prototypes' index order. NaN keys never enter.
struct Best2 {
  v16f k1, k2;
  v16i i1, i2;
};

// The running best two of each lane offered v (lane indices `lane`): one rule for 16- and
// 8-lane vectors (F, I = v16f, v16i or v8f, v8i).
template <class F, class I>
inline __attribute__((always_inline)) void offer_lanes(F& k1, F& k2, I& i1, I& i2, F v, I lane) {
  const I m1 = v < k1, m2 = v < k2;
  k2 = m1 ? k1 : (m2 ? v : k2);
  i2 = m1 ? i1 : (m2 ? lane : i2);
  k1 = m1 ? v : k1;
  i1 = m1 ? lane : i1;
}

inline __attribute__((always_inline)) void offer(Best2& b, v16f v, v16i lane) {
  offer_lanes(b.k1, b.k2, b.i1, b.i2, v, lane);
}

// Half h of a 16-lane vector as 8 lanes (the narrow kernels' view, see kOneRegisterV16)
template <class H, class V> inline __attribute__((always_inline)) H& half_of(V& v, int h) {
  return *reinterpret_cast<H*>(reinterpret_cast<char*>(&v) + 32 * h);
}

// offer() of the 16 rows of one panel's transposed key tile (row c: prototype base + c, lanes =
// queries), in 8-lane halves held in registers (see kOneRegisterV16).
inline __attribute__((always_inline)) void offer_panel_v8(Best2& b, v16f (&keys)[kLanes], int base) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    v8f k1 = half_of<v8f>(b.k1, h), k2 = half_of<v8f>(b.k2, h);
    v8i i1 = half_of<v8i>(b.i1, h), i2 = half_of<v8i>(b.i2, h);
#pragma GCC unroll 16
    for (int c = 0; c < kLanes; ++c) offer_lanes(k1, k2, i1, i2, half_of<v8f>(keys[c], h), v8i{} + (base + c));
    half_of<v8f>(b.k1, h) = k1, half_of<v8f>(b.k2, h) = k2;
    half_of<v8i>(b.i1, h) = i1, half_of<v8i>(b.i2, h) = i2;
  }
}

// offer() in 8-lane halves (see kOneRegisterV16)
inline __attribute__((always_inline)) void offer_v8(Best2& b, v16f keys, v16i lanes) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
    offer_lanes(half_of<v8f>(b.k1, h), half_of<v8f>(b.k2, h), half_of<v8i>(b.i1, h), half_of<v8i>(b.i2, h),
                half_of<v8f>(keys, h), half_of<v8i>(lanes, h));
}

// swap_index_bit on 8-lane vectors (BIT = 1, 2, 4), for the narrow kernels (kOneRegisterV16)
template <int BIT> inline __attribute__((always_inline)) void swap_index_bit(v8f& a, v8f& b) {
  v8i lo, hi;
  for (int j = 0; j < 8; ++j) {
    lo[j] = (j & BIT) ? 8 + (j ^ BIT) : j;
    hi[j] = (j & BIT) ? 8 + j : (j | BIT);
  }
  const v8f x = a, y = b;
  a = __builtin_shuffle(x, y, lo);
  b = __builtin_shuffle(x, y, hi);
}

// Lane r of the result = the sum of m[r]'s lanes, for N vectors of N lanes (v16f or v8f): the
// transpose's butterflies, adding each pair.
template <class V, int N> inline __attribute__((always_inline)) V row_sums(V (&m)[N]) {
  static_assert(N == 16 || N == 8, "v16f or v8f");
  if constexpr (N == 16) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) swap_index_bit<8>(m[i], m[i + 8]), m[i] += m[i + 8];
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) swap_index_bit<4>(m[i], m[i + 4]), m[i] += m[i + 4];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) swap_index_bit<2>(m[i], m[i + 2]), m[i] += m[i + 2];
  swap_index_bit<1>(m[0], m[1]);
  return m[0] + m[1];
}

// Float32 sum of (x - p_r)^2 over d for the `live` (<= 16) prototype rows of g (lane r; lanes
// >= live read +inf). Rows go L at a time (L = the lanes of V: v16f where that is one register,
// else v8f, see kOneRegisterV16) so that one butterfly (row_sums) reduces a group's L sums. Its
// error is below gamma32(d + 3) of the sum, whatever the order, plus underflow_err(d).
template <class V>
inline __attribute__((always_inline)) v16f group_sums_l2(const float* x, const float* g, int64_t live, int64_t d) {
  constexpr int L = sizeof(V) / sizeof(float);
  const int64_t dv = d / L * L;
  alignas(64) float out[kLanes];
#pragma GCC unroll 1
  for (int h = 0; h < kLanes / L; ++h) {
    const int64_t rows = std::min<int64_t>(L, std::max<int64_t>(0, live - L * h));
    const float* gh = rows > 0 ? g + L * h * d : g;  // (no pointer past a short group)
    V acc[L];
#pragma GCC unroll 16
    for (int r = 0; r < L; ++r) acc[r] = V{};
    if (rows == L) {  // full groups: no per-row test in the hot loop
      for (int64_t i = 0; i < dv; i += L) {
        const V xv = loadu<V>(x + i);
#pragma GCC unroll 16
        for (int r = 0; r < L; ++r) {
          const V t = xv - loadu<V>(gh + r * d + i);
          acc[r] += t * t;
        }
      }
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < dv; i += L) {
          const V t = loadu<V>(x + i) - loadu<V>(gh + r * d + i);
          acc[r] += t * t;
        }
    }
    storeu(out + L * h, row_sums(acc));
    for (int64_t r = 0; r < L; ++r) {
      if (r >= rows) {
        out[L * h + r] = INFINITY;  // missing prototypes never enter
        continue;
      }
      for (int64_t i = dv; i < d; ++i) {
        const float t = x[i] - gh[r * d + i];
        out[L * h + r] += t * t;
      }
    }
  }
  return loadu<v16f>(out);
}

inline __attribute__((always_inline)) v16f group_sums_l2_any(const float* x, const float* g, int64_t live, int64_t d) {
  return kOneRegisterV16 ? group_sums_l2<v16f>(x, g, live, d) : group_sums_l2<v8f>(x, g, live, d);
}

// k = 1, l2: a finite query the blocked pass could not settle (a near-tie under its bound,
// which scales with ||x'|| + max ||p'||). Float32 direct-difference keys err by at most
// uf + rel * key (relative, plus underflow), so prototype j can only win if
// key_j (1 - rel) - uf <= min key (1 + rel) + uf; only those few get float64 keys. Falls back to
// the full float64 scan when no key is finite or the bound is not.
inline __attribute__((always_inline)) void refine_l2_top1(const float* x, const float* P, int64_t N, int64_t d,
                                                          float* dist, int64_t* idx) {
  static thread_local std::vector<float> keys;
  keys.resize((N + kLanes - 1) / kLanes * kLanes);
  v16f lo = v16f{} + INFINITY;
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    const v16f s = group_sums_l2_any(x, P + j0 * d, std::min<int64_t>(kLanes, N - j0), d);
    *reinterpret_cast<v16fu*>(keys.data() + j0) = s;
    lo = vmin(lo, s == s ? s : lo);  // NaN (a NaN prototype) never wins
  }
  const double best = spread_min(lo)[0];
  const double rel = ps::rel_of(ps::gamma32(d + 3)), uf = ps::underflow_err(d);
  if (!(best < ps::kHuge) || !(rel < 1.0)) return ps::exact_query<2>(x, P, d, N, d, 1, ps::kL2, dist, idx);
  const double cut = best * (1.0 + rel) + 2.0 * uf;
  double be = INFINITY;
  int64_t bj = -1;
  for (int64_t j = 0; j < N; ++j) {
    if (!(keys[j] * (1.0 - rel) <= cut)) continue;  // NaN keys too
    const double e = exact_key_f32(x, P + j * d, d, ps::kL2, 0.0);
    if (e == e && (bj < 0 || ps::before(e, j, be, bj))) be = e, bj = j;
  }
  if (bj < 0) return ps::exact_query<2>(x, P, d, N, d, 1, ps::kL2, dist, idx);
  dist[0] = static_cast<float>(be);
  idx[0] = bj;
}

// The result of query q for k = 1: when the fast pass accepted packed lane `lane` as its winner,
// that prototype with its float64 key; else (or when the pair turns out not to be eligible)
// the l2 refinement for a finite centred norm n2, or the float64 scan.
inline __attribute__((always_inline)) void settle_top1(const BlockJob& job, int64_t q, bool ok, int32_t lane,
                                                       float n2) {
  const int64_t d = job.d;
  const float* xr = job.x + q * d;
  if (ok) {
    const int64_t j = job.pk->orig[lane];
    const double xn = job.metric == ps::kCosine ? ps::norm64(xr, d) : 0.0;
    const double e = exact_key_f32(xr, job.P + j * d, d, job.metric, xn);
    if (e == e) {  // NaN: the pair is not eligible after all
      job.dist[q] = static_cast<float>(ps::key_to_distance(e, job.metric));
      job.idx[q] = j;
      return;
    }
  }
  if (job.metric == ps::kL2 && n2 < INFINITY) refine_l2_top1(xr, job.P, job.N, d, job.dist + q, job.idx + q);
  else ps::exact_query<2>(xr, job.P, d, job.N, d, 1, job.metric, job.dist + q, job.idx + q);
}

}  // namespace pyeditor::search_cpu
