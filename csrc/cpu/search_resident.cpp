// CPU nearest-prototype search, resident float32 pass (k = 1, few prototypes; search_plan.h):
// the packed prototypes ([d][16] panels, centred / normalised as for the blocked pass) stay in
// L1 while the queries stream past once. A group of Q queries is in flight: per feature, the
// prototype lanes are loaded once and each query's element is broadcast into them (Q x NV
// accumulators of L lanes). The best two keys and the winner's lane are then reduced in
// registers, so no key tile is stored or transposed; the acceptance rule and the float64
// winner key are those of the blocked pass (search_math.h).
//
// One body for every level, built with the level's vector width (cpu_isa.h): 4 floats
// (baseline SSE2), 8 (AVX2) or 16 (AVX-512); search_plan.h sizes Q to the level's registers.
#include "pyeditor/search_plan.h"
#include "search_passes.h"
#include "search_simd.h"

namespace pyeditor::search_cpu {
namespace {

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

template <class V> struct IntOf;
template <> struct IntOf<v4f> { using type = v4i; };
template <> struct IntOf<v8f> { using type = v8i; };
template <> struct IntOf<v16f> { using type = v16i; };
template <> struct IntOf<v4i> { using type = v4i; };
template <> struct IntOf<v8i> { using type = v8i; };
template <> struct IntOf<v16i> { using type = v16i; };

template <class V> inline __attribute__((always_inline)) V vmax_of(V a, V b) { return a < b ? b : a; }
template <class V> inline __attribute__((always_inline)) V vmin_of(V a, V b) { return a < b ? a : b; }

// v with lane j moved to lane j ^ W (one butterfly step of a horizontal reduction)
template <int W, class V> inline __attribute__((always_inline)) V swap_lanes(V v) {
  using I = typename IntOf<V>::type;
  constexpr int L = sizeof(V) / sizeof(float);
  I mask;
  for (int j = 0; j < L; ++j) mask[j] = j ^ W;
  return __builtin_shuffle(v, mask);
}

// (m, s) pairs (smallest, second smallest) of lanes j and j ^ W merged, for W, W / 2, ..., 1
template <int W, class V> inline __attribute__((always_inline)) void merge_pairs(V& m, V& s) {
  if constexpr (W >= 1) {
    const V m2 = swap_lanes<W>(m), s2 = swap_lanes<W>(s);
    s = vmin_of(vmin_of(s, s2), vmax_of(m, m2));
    m = vmin_of(m, m2);
    merge_pairs<W / 2>(m, s);
  }
}

// every lane = the smallest lane of v, by butterflies W, W / 2, ..., 1
template <int W, class I> inline __attribute__((always_inline)) I min_lanes(I v) {
  if constexpr (W >= 1) return min_lanes<W / 2>(vmin_of(v, swap_lanes<W>(v)));
  else return v;
}

// every lane = the sum of v's lanes, by butterflies W, W / 2, ..., 1
template <int W, class V> inline __attribute__((always_inline)) V lane_sum(V v) {
  if constexpr (W >= 1) return lane_sum<W / 2>(v + swap_lanes<W>(v));
  else return v;
}

// The smallest key, the second smallest (equal to the first on a tie) and the lowest lane
// holding the smallest, over NV vectors of keys (lane h * L + l of the query's row). Keys are
// NaN only where float32 overflowed; the acceptance bound rejects those queries whatever the
// reduction made of them.
template <class V, int NV>
inline __attribute__((always_inline)) void best_two(const V (&keys)[NV], float& k1, float& k2, int32_t& lane) {
  using I = typename IntOf<V>::type;
  constexpr int L = sizeof(V) / sizeof(float);
  V m = keys[0], s = V{} + INFINITY;
#pragma GCC unroll 8
  for (int h = 1; h < NV; ++h) {
    s = vmin_of(s, vmax_of(m, keys[h]));
    m = vmin_of(m, keys[h]);
  }
  merge_pairs<L / 2>(m, s);  // every lane ends with the row's best two
  I iota;
  for (int j = 0; j < L; ++j) iota[j] = j;
  I pick = I{} + NV * L;
#pragma GCC unroll 8
  for (int h = 0; h < NV; ++h) pick = vmin_of(pick, keys[h] == m ? iota + h * L : pick);
  pick = min_lanes<L / 2>(pick);
  k1 = m[0], k2 = s[0], lane = pick[0];
}

// Whether the float32 winner of a query is certain (ps::accept_fast for k = 1; the blocked
// pass's accept_top1 per query): centred norm finite, keys and their error bound far from
// overflow, and the second key's lower bound above the winner's upper bound.
struct Acceptance {
  double inflate, g, uf, pmax;
  bool l2;
  bool operator()(float n2, float k1, float k2) const {
    const double xn = std::sqrt(static_cast<double>(n2) * inflate);  // >= ||x'||; NaN / inf stay so
    const double span = l2 ? (xn + pmax) * (xn + pmax) : xn * pmax;
    const double err = g * span + uf;
    return n2 < INFINITY && std::fabs(static_cast<double>(k1)) < ps::kHuge && span < ps::kHuge &&
           static_cast<double>(k2) - err > static_cast<double>(k1) + err;
  }
};

// The group's centred queries are stored in 16-feature chunks, (q, i) at (i / 16) * Q * 16 +
// q * 16 + i % 16, so that the micro-kernel reaches every query's element from one pointer with
// constant offsets (row pointers of their own ran out of general registers and spilled).
// Writes query r's row x - shift (shift null: x; else padded to dpad), zero up to dpad, and
// returns its float32 sum of squares (relative error below gamma32(d + 2)).
template <class V, int Q>
inline __attribute__((always_inline)) float load_query(const float* x, const float* shift, int64_t d, int64_t dpad,
                                                       float* xb, int r) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc{};
  float* dst = xb + r * kLanes;
  const int64_t whole = d / kLanes * kLanes;
  // whole 16-feature chunks: no per-vector tests or index arithmetic in the copy
  for (int64_t c = 0; c < whole; c += kLanes, dst += Q * kLanes) {
#pragma GCC unroll 4
    for (int h = 0; h < kLanes / L; ++h) {
      V v = loadu<V>(x + c + h * L);
      if (shift) v -= loadu<V>(shift + c + h * L);
      storeu(dst + h * L, v);
      acc += v * v;
    }
  }
  for (int64_t c = whole; c < dpad; c += kLanes, dst += Q * kLanes) {  // a partial chunk, zero past d
    for (int h = 0; h < kLanes / L; ++h) {
      V v{};
      for (int l = 0; l < L; ++l) {
        const int64_t i = c + h * L + l;
        if (i < d) v[l] = shift ? x[i] - shift[i] : x[i];
      }
      storeu(dst + h * L, v);
      acc += v * v;
    }
  }
  return lane_sum<L / 2>(acc)[0];
}

// keys = bias - scale * x'_q . p' for the Q centred queries of xb (chunked) against every
// lane, then each query's best two. Vector h covers lanes [h L, h L + L): panel h L / 16.
template <class V, int NV, int Q>
inline __attribute__((always_inline)) void group_best(const float* xb, int64_t dpad, const float* panels,
                                                      int64_t pstride, const float* bias, float scale, float (&k1)[Q],
                                                      float (&k2)[Q], int32_t (&lane)[Q]) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[Q * NV];
#pragma GCC unroll 32
  for (int a = 0; a < Q * NV; ++a) acc[a] = V{};
  for (int64_t c = 0; c < dpad; c += kLanes) {
    const float* xc = xb + c * Q;
    const float* pc = panels + c * kLanes;
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      V b[NV];
#pragma GCC unroll 8
      for (int h = 0; h < NV; ++h) b[h] = loadu<V>(pc + (h * L / kLanes) * pstride + j * kLanes + h * L % kLanes);
#pragma GCC unroll 32
      for (int q = 0; q < Q; ++q) {
        const float a = xc[q * kLanes + j];
#pragma GCC unroll 8
        for (int h = 0; h < NV; ++h) acc[q * NV + h] += a * b[h];
      }
    }
  }
  V bv[NV];
#pragma GCC unroll 8
  for (int h = 0; h < NV; ++h) bv[h] = loadu<V>(bias + h * L);
#pragma GCC unroll 32
  for (int q = 0; q < Q; ++q) {
    V keys[NV];
#pragma GCC unroll 8
    for (int h = 0; h < NV; ++h) keys[h] = bv[h] - scale * acc[q * NV + h];
    best_two<V, NV>(keys, k1[q], k2[q], lane[q]);
  }
}

template <class V, int NV, int Q>
inline __attribute__((always_inline)) void resident_rows(const BlockJob& job) {
  const int64_t d = job.d;
  const Packed& pk = *job.pk;
  const int64_t dpad = pk.dpad;
  static thread_local std::vector<float> xb;  // the group's centred rows, chunked (reused across calls)
  xb.assign(Q * dpad, 0.f);
  const float* shift = job.metric == ps::kL2 ? pk.shift.data() : nullptr;
  const float scale = job.metric == ps::kL2 ? 2.f : 1.f;
  const float* panels = pk.panels.const_data_ptr<float>();
  const Acceptance accept{1.0 + ps::gamma32(d + 2), ps::gamma32(d + 8), ps::underflow_err(d), pk.pmax,
                          job.metric == ps::kL2};
  const int64_t end = job.row0 + job.rows;
  for (int64_t q0 = job.row0; q0 < end; q0 += Q) {
    const int nq = static_cast<int>(std::min<int64_t>(Q, end - q0));
    float n2[Q], k1[Q], k2[Q];
    int32_t lane[Q];
    for (int r = 0; r < nq; ++r) n2[r] = load_query<V, Q>(job.x + (q0 + r) * d, shift, d, dpad, xb.data(), r);
    for (int r = nq; r < Q; ++r) load_query<V, Q>(job.x, nullptr, 0, dpad, xb.data(), r);  // zero rows past the end
    group_best<V, NV, Q>(xb.data(), dpad, panels, pk.dpad * kLanes, pk.bias.data(), scale, k1, k2, lane);
    for (int r = 0; r < nq; ++r) settle_top1(job, q0 + r, accept(n2[r], k1[r], k2[r]), lane[r], n2[r]);
  }
}

// The pass at one level: vectors of V (LEVEL's width), Q from the plan for `vectors`.
template <class V, int LEVEL> inline __attribute__((always_inline)) void resident_any(const BlockJob& job, int vectors) {
  constexpr int L = sizeof(V) / sizeof(float);
  static_assert(L == ps::resident_lanes(LEVEL), "the plan's width at this level");
  constexpr int kMaxVectors = ps::kResidentMaxCount / L;
  switch (vectors) {
#define PE_RESIDENT_CASE(NV)                                                             \
  case NV:                                                                               \
    if constexpr (NV <= kMaxVectors) return resident_rows<V, NV, ps::resident_queries(LEVEL, NV)>(job); \
    break;
    PE_RESIDENT_CASE(1)
    PE_RESIDENT_CASE(2)
    PE_RESIDENT_CASE(3)
    PE_RESIDENT_CASE(4)
    PE_RESIDENT_CASE(5)
    PE_RESIDENT_CASE(6)
    PE_RESIDENT_CASE(7)
    PE_RESIDENT_CASE(8)
#undef PE_RESIDENT_CASE
  }
  TORCH_CHECK(false, "pyeditor: resident search pass with ", vectors, " vectors per query");
}

using ResidentFn = void (*)(const BlockJob&, int);
void resident_portable(const BlockJob& job, int vectors) { resident_any<v4f, pe::cpu::kIsaPortable>(job, vectors); }
#if PE_ISA_VARIANTS
PE_TARGET_AVX2 void resident_avx2(const BlockJob& job, int vectors) { resident_any<v8f, pe::cpu::kIsaAvx2>(job, vectors); }
PE_TARGET_AVX512 void resident_avx512(const BlockJob& job, int vectors) {
  resident_any<v16f, pe::cpu::kIsaAvx512>(job, vectors);
}
const ResidentFn kResident =
    pe::cpu::pick_variant<ResidentFn>(pe::cpu::vector_level(), resident_portable, resident_avx2, resident_avx512);
#else
const ResidentFn kResident = resident_portable;
#endif

}  // namespace

void resident_job(const BlockJob& job, int vectors) { kResident(job, vectors); }

}  // namespace pyeditor::search_cpu
