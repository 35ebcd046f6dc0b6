// The SIMD-cloned CPU span loops (cpu/edit_spans.cpp) against the scalar shared math, for
// every storage type and for lengths around the vector widths.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "pyeditor/cpu_spans.h"
#include "pyeditor/edit_math.h"

template <class S>
static int check_type(const char* name) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  int failures = 0;
  for (int64_t n : {0, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 1000}) {
    std::vector<S> a(n), d(n), out(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      pe::store(&a[i], static_cast<pe::acc_t<S>>(normal(rng)));
      pe::store(&d[i], static_cast<pe::acc_t<S>>(i % 11 == 3 ? std::numeric_limits<float>::quiet_NaN() : normal(rng)));
    }
    for (int grad = 0; grad < 2; ++grad) {
      const pe::acc_t<S> t = 0.75;
      if (grad) {
        pe::cpu::clip_grad_span(a.data(), d.data(), out.data(), n, t);
      } else {
        pe::cpu::clip_add_span(a.data(), d.data(), out.data(), n, t);
      }
      for (int64_t i = 0; i < n; ++i) {
        const auto av = pe::load(&a[i]), dv = pe::load(&d[i]);
        const auto expect = grad ? pe::clip_grad(av, dv, t) : pe::clip_add(dv, av, t);
        pe::store(&want[i], expect);
        const auto got = pe::load(&out[i]), exp = pe::load(&want[i]);
        if (!(got == exp || (std::isnan(got) && std::isnan(exp)))) {
          std::fprintf(stderr, "%s n=%lld grad=%d i=%lld: got %g want %g\n", name, (long long)n, grad, (long long)i,
                       (double)got, (double)exp);
          ++failures;
        }
      }
    }
  }
  return failures;
}

int main() {
  int failures = check_type<float>("float") + check_type<double>("double") + check_type<pe::bf16>("bf16") +
                 check_type<pe::f16>("f16");
  std::printf("test_cpu_spans (SIMD level %s): %s\n", pe::cpu::simd_level(), failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
