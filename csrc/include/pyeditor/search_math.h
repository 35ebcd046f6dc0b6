// Nearest-prototype search math shared by the CPU and CUDA kernels (framework-free).
//
// Every candidate is ranked by a key, smaller = better: l2 -> squared distance, ip -> -x.p,
// cosine -> -cos. A fast pass ranks with float32 keys and an error bound per query; the top-k
// set is accepted when the (k+1)-th candidate's lower bound lies above the k-th candidate's
// upper bound, and the k winners' keys are then recomputed exactly in float64 (direct
// difference) and sorted by (key, index). Otherwise the query is rescanned exactly in float64.
// So results never depend on float32 rounding, tiling or thread count.
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"
#include "topk.h"

#if defined(_OPENMP) && !defined(__CUDACC__)
// vectorised reductions: the float32 error bounds below hold for any summation order, and
// each float64 key is always computed by the same code, so equal inputs give equal keys
#define PE_SIMD_SUM_S _Pragma("omp simd reduction(+ : s)")
#define PE_SIMD_SUM_XN _Pragma("omp simd reduction(+ : xn2)")
#define PE_SIMD_SUM_S_PN _Pragma("omp simd reduction(+ : s, pn2)")
#define PE_SIMD_SUM_4 _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")
#else
#define PE_SIMD_SUM_4
#define PE_SIMD_SUM_S
#define PE_SIMD_SUM_XN
#define PE_SIMD_SUM_S_PN
#endif

namespace pe::search {

enum Metric : int { kL2 = 0, kIP = 1, kCosine = 2 };

constexpr int kMaxK = 32;          // largest k the fixed-capacity lists serve (CAP = k + 1)
constexpr double kUnit = 5.9604644775390625e-8;  // float32 unit roundoff 2^-24
constexpr double kHuge = 1e36;     // above this a float32 key might have overflowed

// gamma_n = n u / (1 - n u): the classic bound on n float32 roundings, doubled for slack;
// infinite once it would reach 1 (n > ~5.6M), where rel_of below would turn negative.
PE_HD double gamma32(int64_t n) {
  const double nu = static_cast<double>(n) * kUnit;
  return nu < 1.0 / 3.0 ? 2.0 * nu / (1.0 - nu) : INFINITY;
}

// The Bound::rel of a result whose error is at most beta times its exact value.
PE_HD double rel_of(double beta) { return beta < 1.0 ? beta / (1.0 - beta) : INFINITY; }

// Absolute error from underflow, which no relative bound covers: each of n float32 products or
// squares below the normal range is off by up to half the smallest subnormal (2^-150). Doubled,
// plus slack for the few other roundings of a key.
PE_HD double underflow_err(int64_t n) { return static_cast<double>(n + 4) * 0x1p-148; }

// ---------------------------------------------------------------- exact float64 keys
template <class T> PE_HD double norm64(const T* v, int64_t d) {
  double s = 0.0;
  PE_SIMD_SUM_S
  for (int64_t i = 0; i < d; ++i) {
    const double a = static_cast<double>(v[i]);
    s += a * a;
  }
  return sqrt(s);
}

// The exact key of one pair in float64 (NaN when the pair is not eligible). xnorm is ||x||
// (cosine only). Same semantics as pyeditor.reference: a zero vector has cosine 0.
template <class T> PE_HD double exact_key(const T* x, const T* p, int64_t d, int metric, double xnorm) {
  double s = 0.0;
  if (metric == kL2) {
    PE_SIMD_SUM_S
    for (int64_t i = 0; i < d; ++i) {
      const double t = static_cast<double>(x[i]) - static_cast<double>(p[i]);
      s += t * t;
    }
    return s;
  }
  if (metric == kIP) {
    PE_SIMD_SUM_S
    for (int64_t i = 0; i < d; ++i) s += static_cast<double>(x[i]) * static_cast<double>(p[i]);
    return -s;
  }
  const double pn = norm64(p, d);
  if (xnorm == 0.0 || pn == 0.0) {
    // a zero vector scores 0 against any vector with a direction; one with an inf entry has none
    // (its unit vector is inf / inf = NaN, as in the reference), so that pair is not eligible
    const T* other = xnorm == 0.0 ? p : x;
    PE_SIMD_SUM_S
    for (int64_t i = 0; i < d; ++i) s += static_cast<double>(other[i]) * 0.0;
    return s == 0.0 ? -0.0 : NAN;
  }
  for (int64_t i = 0; i < d; ++i) s += (static_cast<double>(x[i]) / xnorm) * (static_cast<double>(p[i]) / pn);
  return -s;
}

// Distance reported to the user for a key.
PE_HD double key_to_distance(double key, int metric) { return metric == kL2 ? key : -key; }
PE_HD double empty_distance(int metric) { return metric == kL2 ? INFINITY : -INFINITY; }

template <class T> PE_HD bool row_has_nan(const T* x, int64_t d) {
  for (int64_t i = 0; i < d; ++i)
    if (!(x[i] == x[i])) return true;
  return false;
}
// inf * 0 and NaN * 0 are NaN: one vectorisable sum answers "all finite?"
template <class T> PE_HD bool row_finite(const T* x, int64_t d) {
  T s = T(0);
  PE_SIMD_SUM_S
  for (int64_t i = 0; i < d; ++i) s += x[i] * T(0);
  return s == T(0);
}

template <class T> PE_HD bool row_is_zero(const T* x, int64_t d) {
  for (int64_t i = 0; i < d; ++i)
    if (x[i] != T(0)) return false;
  return true;
}

// Writes k results of one query: distances (as O) and indices.
template <class O> PE_HD void write_row(O* dist, int64_t* idx, int k, const double* keys, const int64_t* ids, int n,
                                        int metric) {
  for (int i = 0; i < k; ++i) {
    if (i < n) {
      dist[i] = static_cast<O>(key_to_distance(keys[i], metric));
      idx[i] = ids[i];
    } else {
      dist[i] = static_cast<O>(empty_distance(metric));
      idx[i] = -1;
    }
  }
}

template <class O> PE_HD void write_nan_row(O* dist, int64_t* idx, int k) {
  for (int i = 0; i < k; ++i) {
    dist[i] = static_cast<O>(NAN);
    idx[i] = -1;
  }
}

// Exact float64 scan of one query against every prototype (rows of P with stride ldp).
template <int CAP, class T, class O>
PE_HD void exact_query(const T* x, const T* P, int64_t ldp, int64_t N, int64_t d, int k, int metric, O* dist,
                       int64_t* idx) {
  if (row_has_nan(x, d)) return write_nan_row(dist, idx, k);
  const double xn = metric == kCosine ? norm64(x, d) : 0.0;
  TopK<double, CAP> top;
  top.reset(k);
  for (int64_t j = 0; j < N; ++j) top.push(exact_key(x, P + j * ldp, d, metric, xn), j);
  write_row(dist, idx, k, top.key, top.idx, top.n, metric);
}

// Error model of a fast pass: |approx - exact| <= abs_err + rel * |approx| for every key.
struct Bound {
  double abs_err, rel;
};

// Accepts or rejects the fast pass's top-(k+1) list for one query. On acceptance writes the
// k winners with exact keys (sorted by (key, index)) and returns true; exact(j) -> float64 key.
template <int CAP, class O, class Exact>
PE_HD bool accept_fast(const TopK<float, CAP>& top, int k, Bound b, int metric, Exact exact, O* dist, int64_t* idx) {
  const int n = top.n;
  // an unbounded pass (float32 overflow) proves nothing, also when it kept k or fewer keys: the
  // keys it dropped as NaN may be overflowed pairs, not NaN prototypes
  if (!(b.abs_err < kHuge)) return false;
  if (n > k) {
    const double ak = top.key[k - 1], ak1 = top.key[k];
    if (!(fabs(ak) < kHuge)) return false;
    const double hi_k = ak + b.abs_err + b.rel * fabs(ak);
    const double lo_k1 = ak1 - b.abs_err - b.rel * fabs(ak1);
    if (!(lo_k1 > hi_k)) return false;
  }
  const int m = n < k ? n : k;
  double keys[CAP];
  int64_t ids[CAP];
  for (int i = 0; i < m; ++i) {
    double e = exact(top.idx[i]);
    if (!(e == e)) return false;  // an approximate key was finite but the pair is not eligible
    int pos = i;
    while (pos > 0 && before(e, top.idx[i], keys[pos - 1], ids[pos - 1])) {
      keys[pos] = keys[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    keys[pos] = e;
    ids[pos] = top.idx[i];
  }
  write_row(dist, idx, k, keys, ids, m, metric);
  return true;
}

// Direct float32 fast pass of one (finite) query over raw prototypes: l2 sums (x - p)^2, whose
// error is relative (all terms >= 0); ip / cosine sum x.p and bound by ||x|| max ||p||.
template <int CAP>
PE_HD Bound direct_fast(const float* x, const float* P, int64_t ldp, int64_t N, int64_t d, int k, int metric,
                        TopK<float, CAP>& top) {
  top.reset(k + 1);
  if (metric == kL2) {
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {  // four independent sums: the adds do not wait on each other
      const float *p0 = P + j * ldp, *p1 = p0 + ldp, *p2 = p1 + ldp, *p3 = p2 + ldp;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      PE_SIMD_SUM_4
      for (int64_t i = 0; i < d; ++i) {
        const float t0 = x[i] - p0[i], t1 = x[i] - p1[i], t2 = x[i] - p2[i], t3 = x[i] - p3[i];
        s0 += t0 * t0;
        s1 += t1 * t1;
        s2 += t2 * t2;
        s3 += t3 * t3;
      }
      top.push(s0, j);
      top.push(s1, j + 1);
      top.push(s2, j + 2);
      top.push(s3, j + 3);
    }
    for (; j < N; ++j) {
      const float* p = P + j * ldp;
      float s = 0.f;
      PE_SIMD_SUM_S
      for (int64_t i = 0; i < d; ++i) {
        const float t = x[i] - p[i];
        s += t * t;
      }
      top.push(s, j);
    }
    return {underflow_err(d), rel_of(gamma32(d + 3))};
  }
  float xn2 = 0.f;
  PE_SIMD_SUM_XN
  for (int64_t i = 0; i < d; ++i) xn2 += x[i] * x[i];
  double pmax = 0.0, raw_max = 0.0;
  bool tiny = false;  // cosine: a nonzero prototype whose float32 norm is unreliable
  for (int64_t j = 0; j < N; ++j) {
    const float* p = P + j * ldp;
    float s = 0.f, pn2 = 0.f;
    PE_SIMD_SUM_S_PN
    for (int64_t i = 0; i < d; ++i) {
      s += x[i] * p[i];
      pn2 += p[i] * p[i];
    }
    if (pn2 > raw_max) raw_max = pn2;  // NaN rows are skipped by the comparison
    // ||p||^2 below 2^-60 (or underflowed to 0 from nonzero entries): dividing by it would
    // blow the underflow error of x.p up without bound
    if (metric == kCosine && pn2 < 0x1p-60f && (pn2 > 0.f || !row_is_zero(p, d))) tiny = true;
    top.push(metric == kCosine ? (pn2 == 0.f ? -0.f : -s / sqrtf(pn2)) : -s, j);
  }
  pmax = metric == kCosine ? 1.0 : raw_max;
  // sums of squares carry their own rounding: inflate the norms slightly
  const double xn = sqrt(static_cast<double>(xn2) * (1.0 + gamma32(d)));
  const double pn = sqrt(pmax * (1.0 + gamma32(d)));
  // products near float32's range may have overflowed: then nothing is certain
  if (!(xn * sqrt(raw_max) < kHuge) || tiny) return {INFINITY, 0.0};
  // cosine keys divide x.p (and its underflow error) by ||p|| >= 2^-30
  return {gamma32(d + 8) * xn * pn + underflow_err(d) * (metric == kCosine ? 0x1p30 : 1.0), 0.0};
}

}  // namespace pe::search
