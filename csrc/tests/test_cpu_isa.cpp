// The PYEDITOR_CPU_ISA level logic (pyeditor/cpu_isa.h) for kinds of CPU this machine may not
// be: which variant the edit spans and search passes run under each cap, and, for this CPU,
// that the level read at load agrees with the variable (ctest runs it under each cap).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "expect.h"
#include "pyeditor/cpu_isa.h"

using namespace pe::cpu;

int main() {
  EXPECT(parse_isa(nullptr) == kIsaAmx && parse_isa("") == kIsaAmx);  // unset: no cap
  EXPECT(parse_isa("portable") == kIsaPortable && parse_isa("avx2") == kIsaAvx2);
  EXPECT(parse_isa("avx512") == kIsaAvx512 && parse_isa("amx") == kIsaAmx);
  EXPECT(parse_isa("AVX2") == kIsaAmx && parse_isa("avx7") == kIsaAmx);  // (Python refuses these first)

  // CPU kinds: x86-64 baseline (v3 and v4 absent), AVX2 (v3: Haswell, Zen 1-3), AVX-512 (v4:
  // Skylake-SP, Zen 4, Sapphire Rapids with AMX); v4 without v3 does not exist but must not pick AVX-512.
  struct Cpu { const char* name; bool v3, v4; int own; };
  const Cpu cpus[] = {{"baseline", false, false, kIsaPortable}, {"avx2", true, false, kIsaAvx2},
                      {"avx512", true, true, kIsaAvx512}, {"v4 without v3", false, true, kIsaPortable}};
  for (const Cpu& c : cpus) {
    for (int cap = kIsaPortable; cap <= kIsaAmx; ++cap) {
      const int want = cap < c.own ? cap : c.own;  // AMX adds nothing to these kernels
      const int got = vector_level(cap, c.v3, c.v4);
      if (got != want) std::fprintf(stderr, "cpu %s cap %d: level %d, want %d\n", c.name, cap, got, want);
      EXPECT(got == want);
    }
  }
  EXPECT(!std::strcmp(level_name(kIsaPortable), "portable") && !std::strcmp(level_name(kIsaAvx2), "avx2"));
  EXPECT(!std::strcmp(level_name(kIsaAvx512), "avx512") && !std::strcmp(level_name(kIsaAmx), "avx512"));
  static_assert(pick_variant(kIsaPortable, 1, 2, 3) == 1 && pick_variant(kIsaAvx2, 1, 2, 3) == 2, "");
  static_assert(pick_variant(kIsaAvx512, 1, 2, 3) == 3 && pick_variant(kIsaAmx, 1, 2, 3) == 3, "");

  // This CPU: the level read at load is the cap's, or the CPU's own where that is lower.
  int own = kIsaPortable;
#if PE_ISA_VARIANTS
  own = vector_level(kIsaAmx, cpu_has_v3(), cpu_has_v4());
  EXPECT(!cpu_has_v4() || cpu_has_v3());
#endif
  const char* env = std::getenv("PYEDITOR_CPU_ISA");
  const int cap = parse_isa(env);
  EXPECT(isa_cap() == cap);
  EXPECT(vector_level() == (cap < own ? cap : own));
  std::printf("cpu_isa (PYEDITOR_CPU_ISA=%s, this CPU %s): level %s: %s\n", env ? env : "", level_name(own),
              level_name(vector_level()), failures ? "FAILED" : "all checks passed");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
