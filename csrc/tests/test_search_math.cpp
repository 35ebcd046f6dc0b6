// Framework-free tests of the shared search math (no torch): the top-k's deterministic order,
// the float32 fast pass + acceptance rule against a brute-force float64 scan far from the
// origin, and the NaN rules.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "pyeditor/search_math.h"

namespace ps = pe::search;
#include "expect.h"

static void test_topk_order() {
  ps::TopK<float, 4> t;
  t.reset(3);
  const float keys[] = {5, 1, 3, 1, NAN, 0.5f, 1};
  const int64_t ids[] = {0, 9, 2, 4, 7, 8, 1};
  for (int i = 0; i < 7; ++i) t.push(keys[i], ids[i]);
  EXPECT(t.n == 3);
  EXPECT(t.idx[0] == 8 && t.idx[1] == 1 && t.idx[2] == 4);  // ties by lowest index, NaN never in
}

// fast pass + acceptance (or exact rescan) must equal the float64 scan exactly
static void test_fast_equals_exact() {
  std::mt19937 rng(3);
  std::normal_distribution<double> nd;
  for (int metric = 0; metric < 3; ++metric) {
    for (double offset : {0.0, 30.0, 300.0, 1e4}) {
      for (int d : {3, 64, 257}) {
        const int N = 40, B = 60, k = 2;
        std::vector<double> centres(8 * d);
        for (auto& v : centres) v = 3 * nd(rng);
        std::vector<float> P(N * d), X(B * d);
        for (int j = 0; j < N; ++j)
          for (int i = 0; i < d; ++i) P[j * d + i] = float(centres[(j % 8) * d + i] + 0.5 * nd(rng) + offset);
        for (int i = 0; i < d; ++i) P[17 * d + i] = P[3 * d + i];  // duplicate prototype
        for (int q = 0; q < B; ++q)
          for (int i = 0; i < d; ++i) X[q * d + i] = float(centres[(q % 8) * d + i] + 0.5 * nd(rng) + offset);
        for (int i = 0; i < d; ++i) X[i] = P[3 * d + i];
        for (int q = 0; q < B; ++q) {
          const float* x = X.data() + q * d;
          float want_d[k], got_d[k];
          int64_t want_i[k], got_i[k];
          ps::exact_query<3>(x, P.data(), d, N, d, k, metric, want_d, want_i);
          ps::TopK<float, 3> top;
          const ps::Bound b = ps::direct_fast<3>(x, P.data(), d, N, d, k, metric, top);
          const double xn = metric == ps::kCosine ? ps::norm64(x, d) : 0.0;
          auto exact = [&](int64_t j) { return ps::exact_key(x, P.data() + j * d, d, metric, xn); };
          if (!ps::accept_fast(top, k, b, metric, exact, got_d, got_i))
            ps::exact_query<3>(x, P.data(), d, N, d, k, metric, got_d, got_i);
          for (int i = 0; i < k; ++i) EXPECT(got_i[i] == want_i[i] && got_d[i] == want_d[i]);
        }
        // the duplicated prototype: query 0 sits on it; rank 1 is index 3, rank 2 index 17
        float dd[k];
        int64_t ii[k];
        ps::exact_query<3>(X.data(), P.data(), d, N, d, k, ps::kL2, dd, ii);
        EXPECT(ii[0] == 3 && ii[1] == 17 && dd[0] == 0.f && dd[1] == 0.f);
      }
    }
  }
}

static void test_nan_rules() {
  const float P[] = {NAN, 0, 1, 1, 2, 2};
  const float x[] = {1.1f, 1.2f};
  float dist[3];
  int64_t idx[3];
  ps::exact_query<4>(x, P, 2, 3, 2, 3, ps::kL2, dist, idx);
  EXPECT(idx[0] == 1 && idx[1] == 2 && idx[2] == -1 && std::isinf(dist[2]));
  const float xn[] = {NAN, 0};
  ps::exact_query<4>(xn, P, 2, 3, 2, 2, ps::kL2, dist, idx);
  EXPECT(idx[0] == -1 && std::isnan(dist[0]));
}

int main() {
  test_topk_order();
  test_fast_equals_exact();
  test_nan_rules();
  if (failures) std::fprintf(stderr, "%d failures\n", failures);
  return failures ? 1 : 0;
}
