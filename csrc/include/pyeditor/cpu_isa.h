// PYEDITOR_CPU_ISA caps the instruction sets the CPU kernels may pick at load: "portable" <
// "avx2" < "avx512" < "amx" (unset: no cap, every path the CPU has). So an AVX-512 or AMX host
// can run the paths of smaller CPUs, and the tests run each one (tests/test_isa_paths.py).
// The Python package refuses a cap above what the CPU has, or an unknown name, on import
// (pyeditor/_ext.py); here an unknown value caps nothing. Functions built with GCC
// target_clones (the edit spans and the search passes) pick their clone by the CPU alone.
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

}  // namespace pe::cpu
