// PYEDITOR_CPU_ISA caps the instruction sets the CPU kernels may pick at load: "portable" <
// "avx2" < "avx512" < "amx" (unset: no cap, every path the CPU has). So an AVX-512 or AMX host
// can run the paths of smaller CPUs, and the tests run each one (tests/test_isa_paths.py).
// The Python package refuses a cap above what the CPU has, or an unknown name, on import
// (pyeditor/_ext.py); here an unknown value caps nothing. Every kernel family decides through
// the cap: the quant kernels and the tile GEMM by their own feature tests, the edit spans and
// the search passes by vector_level() below (their portable / AVX2 / AVX-512 builds of one body).
#pragma once
#include <cstdlib>
#include <cstring>

namespace pe::cpu {

enum IsaLevel : int { kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };

inline int parse_isa(const char* name) {
  if (!name || !*name) return kIsaAmx;
  if (!std::strcmp(name, "portable")) return kIsaPortable;
  if (!std::strcmp(name, "avx2")) return kIsaAvx2;
  if (!std::strcmp(name, "avx512")) return kIsaAvx512;
  return kIsaAmx;
}

// The cap, read once (the kernels decide at load; the variable is read before the first call).
inline int isa_cap() {
  static const int cap = parse_isa(std::getenv("PYEDITOR_CPU_ISA"));
  return cap;
}

inline bool isa_allows(int level) { return isa_cap() >= level; }

// Whether this compiler builds the per-level variants of the edit spans and the search passes
// (GCC on x86-64: target attributes on functions that inline the shared bodies); elsewhere
// only their portable build exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_ISA_VARIANTS 1
#define PE_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define PE_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define PE_ISA_VARIANTS 0
#endif

// The variant a family built for kIsaPortable, kIsaAvx2 (x86-64-v3: AVX2, FMA, F16C, BMI2...)
// and kIsaAvx512 (x86-64-v4: AVX-512 F/BW/CD/DQ/VL) runs on a CPU with those feature sets
// under a cap: the highest the CPU has and the cap allows. AMX adds nothing to these kernels.
constexpr int vector_level(int cap, bool cpu_v3, bool cpu_v4) {
  if (cap >= kIsaAvx512 && cpu_v3 && cpu_v4) return kIsaAvx512;
  if (cap >= kIsaAvx2 && cpu_v3) return kIsaAvx2;
  return kIsaPortable;
}

#if PE_ISA_VARIANTS
// Whether this CPU (and its OS) runs x86-64-v3 / v4 code. GCC 11 knows the levels as target
// names but not as __builtin_cpu_supports names: there, their distinctive features.
inline bool cpu_has_v3() {
  __builtin_cpu_init();
#if __GNUC__ >= 12
  return __builtin_cpu_supports("x86-64-v3");
#else
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2");
#endif
}
inline bool cpu_has_v4() {
  __builtin_cpu_init();
#if __GNUC__ >= 12
  return __builtin_cpu_supports("x86-64-v4");
#else
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
}
#endif

// vector_level for this CPU and PYEDITOR_CPU_ISA, read once.
inline int vector_level() {
#if PE_ISA_VARIANTS
  static const int level = vector_level(isa_cap(), cpu_has_v3(), cpu_has_v4());
  return level;
#else
  return kIsaPortable;
#endif
}

// The build_info name of a vector_level.
constexpr const char* level_name(int level) {
  return level >= kIsaAvx512 ? "avx512" : level >= kIsaAvx2 ? "avx2" : "portable";
}

// The one of three variants (portable, AVX2, AVX-512) that `level` runs.
template <class F> constexpr F pick_variant(int level, F portable, F avx2, F avx512) {
  return level >= kIsaAvx512 ? avx512 : level >= kIsaAvx2 ? avx2 : portable;
}

}  // namespace pe::cpu
