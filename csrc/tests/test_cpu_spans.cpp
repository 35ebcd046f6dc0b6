// The CPU span loops (cpu/edit_spans.cpp) against the scalar shared math, for every storage
// type, for lengths around the vector widths, and for each vector level's variant this CPU runs
// (portable and AVX2 on an AVX2 CPU; AVX-512 too where it has it).
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "pyeditor/cpu_isa.h"
#include "pyeditor/cpu_spans.h"
#include "pyeditor/edit_math.h"

template <class S>
static int check_fns(const char* name, int level, pe::cpu::SpanFns<S> fns) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  int failures = 0;
  for (int64_t n : {0, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 1000, 4200}) {
    std::vector<S> a(n), d(n), out(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      pe::store(&a[i], static_cast<pe::acc_t<S>>(normal(rng)));
      pe::store(&d[i], static_cast<pe::acc_t<S>>(i % 11 == 3 ? std::numeric_limits<float>::quiet_NaN() : normal(rng)));
    }
    for (int grad = 0; grad < 2; ++grad) {
      const pe::acc_t<S> t = 0.75;
      (grad ? fns.grad : fns.add)(a.data(), d.data(), out.data(), n, t);
      for (int64_t i = 0; i < n; ++i) {
        const auto av = pe::load(&a[i]), dv = pe::load(&d[i]);
        const auto expect = grad ? pe::clip_grad(av, dv, t) : pe::clip_add(dv, av, t);
        pe::store(&want[i], expect);
        const auto got = pe::load(&out[i]), exp = pe::load(&want[i]);
        if (!(got == exp || (std::isnan(got) && std::isnan(exp)))) {
          std::fprintf(stderr, "%s level %s n=%lld grad=%d i=%lld: got %g want %g\n", name,
                       pe::cpu::level_name(level), (long long)n, grad, (long long)i, (double)got, (double)exp);
          ++failures;
        }
      }
    }
  }
  return failures;
}

template <class S>
static int check_type(const char* name) {
  int failures = 0;
  for (int level = pe::cpu::kIsaPortable; level <= pe::cpu::vector_level(); ++level)
    failures += check_fns<S>(name, level, pe::cpu::span_variant<S>(level));
  // the public entry points run the variant of vector_level()
  const pe::cpu::SpanFns<S> active = pe::cpu::spans<S>(), want = pe::cpu::span_variant<S>(pe::cpu::vector_level());
  if (active.add != want.add || active.grad != want.grad) {
    std::fprintf(stderr, "%s: the active spans are not those of level %s\n", name, pe::cpu::edit_level());
    ++failures;
  }
  return failures + check_fns<S>(name, pe::cpu::vector_level(), {pe::cpu::clip_add_span, pe::cpu::clip_grad_span});
}

int main() {
  int failures = check_type<float>("float") + check_type<double>("double") + check_type<pe::bf16>("bf16") +
                 check_type<pe::f16>("f16");
  std::printf("test_cpu_spans (levels portable up to %s): %s\n", pe::cpu::edit_level(),
              failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
