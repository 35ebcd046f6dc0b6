// CPU nearest-prototype search, direct float32 pass (small batches: no packing cost):
// (x - p)^2 / x.p per pair on the raw rows, whose float32 error is relative for l2.
#include "search_passes.h"
#include "search_simd.h"

namespace pyeditor::search_cpu {
namespace {

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
  return {ps::underflow_err(d), ps::rel_of(ps::gamma32(d + 3))};
}

// direct_l2 for k = 1: the group sums kept as the best two per lane; the 32 lane candidates
// are merged once at the end. Per-prototype horizontal sums and list inserts cost more than
// the distances for one device's query. Same keys up to summation order, same bound as
// direct_l2.
inline __attribute__((always_inline)) ps::Bound direct_l2_top1(const float* x, const float* P, int64_t N, int64_t d,
                                                               ps::TopK<float, 2>& top) {
  const v16i iota{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  Best2 best{v16f{} + INFINITY, v16f{} + INFINITY, v16i{} - 1, v16i{} - 1};
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    const v16f keys = group_sums_l2_any(x, P + j0 * d, std::min<int64_t>(kLanes, N - j0), d);
    if (kOneRegisterV16) offer(best, keys, iota + static_cast<int>(j0));
    else offer_v8(best, keys, iota + static_cast<int>(j0));
  }
  top.reset(2);
  for (int l = 0; l < kLanes; ++l) {
    if (best.i1[l] >= 0) top.push(best.k1[l], best.i1[l]);
    if (best.i2[l] >= 0) top.push(best.k2[l], best.i2[l]);
  }
  return {ps::underflow_err(d), ps::rel_of(ps::gamma32(d + 3))};
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

inline __attribute__((always_inline)) void direct_any(const float* x, const float* P, int64_t N, int64_t d, int k,
                                                      int metric, int64_t q0, int64_t q1, float* dist, int64_t* idx,
                                                      int cap) {
  switch (cap) {
    case 2: return direct_rows<2>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 4: return direct_rows<4>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 8: return direct_rows<8>(x, P, N, d, k, metric, q0, q1, dist, idx);
    case 16: return direct_rows<16>(x, P, N, d, k, metric, q0, q1, dist, idx);
    default: return direct_rows<ps::kMaxK + 1>(x, P, N, d, k, metric, q0, q1, dist, idx);
  }
}

// The pass once per vector level (cpu_isa.h), one picked at load.
#define PE_DIRECT_VARIANT(NAME, TARGET)                                                                          \
  TARGET void NAME(const float* x, const float* P, int64_t N, int64_t d, int k, int metric, int64_t q0, int64_t q1, \
                   float* dist, int64_t* idx, int cap) {                                                         \
    direct_any(x, P, N, d, k, metric, q0, q1, dist, idx, cap);                                                   \
  }
using DirectFn = void (*)(const float*, const float*, int64_t, int64_t, int, int, int64_t, int64_t, float*, int64_t*,
                          int);
PE_DIRECT_VARIANT(direct_portable, )
#if PE_ISA_VARIANTS
PE_DIRECT_VARIANT(direct_avx2, PE_TARGET_AVX2)
PE_DIRECT_VARIANT(direct_avx512, PE_TARGET_AVX512)
const DirectFn kDirect =
    pe::cpu::pick_variant<DirectFn>(pe::cpu::vector_level(), direct_portable, direct_avx2, direct_avx512);
#else
const DirectFn kDirect = direct_portable;
#endif
#undef PE_DIRECT_VARIANT

}  // namespace

void direct_job(const float* x, const float* P, int64_t N, int64_t d, int k, int metric, int64_t q0, int64_t q1,
                float* dist, int64_t* idx, int cap) {
  kDirect(x, P, N, d, k, metric, q0, q1, dist, idx, cap);
}

const char* search_level() { return pe::cpu::level_name(pe::cpu::vector_level()); }

}  // namespace pyeditor::search_cpu
