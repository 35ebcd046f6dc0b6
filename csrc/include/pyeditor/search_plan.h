// Which CPU search pass nearest_prototype runs, decided from the call's shape, k, input width
// and the vector level (cpu_isa.h) alone (no torch, no data): search_cpu.cpp reads the plan,
// ctest (csrc/tests/test_search_plan.cpp) checks it. Data can still move a call off a planned
// float32 pass at run time: a prototype row with inf sends the call to the direct pass, and
// any query the float32 keys cannot settle is rescanned in float64 (search_math.h).
#pragma once
#include <cstdint>

#include "cpu_isa.h"
#include "search_math.h"

namespace pe::search {

enum class SearchPath : uint8_t {
  kExact,     // float64 keys throughout: float64 inputs, or k beyond the fixed lists (kMaxK)
  kDirect,    // float32 keys per pair on the raw rows: few queries (no packing cost)
  kResident,  // k = 1, few prototypes: all of them kept in L1 as [d][lanes] panels, a group of
              // queries in flight against every lane at once, best two kept in registers
  kBlocked,   // packed 16-prototype panels, a register-tiled micro-kernel per panel
};

struct SearchCall {
  int64_t batch = 0, count = 0, dim = 0;  // B queries, N prototypes, d features
  int64_t k = 1;
  bool wide = false;           // a float64 input: float64 keys throughout
  int level = cpu::kIsaPortable;  // cpu::vector_level()
};

struct SearchPlan {
  SearchPath path = SearchPath::kBlocked;
  int lanes = 0;    // kResident: floats per vector at this level
  int vectors = 0;  // kResident: vectors per query (prototypes rounded up to whole vectors)
  int queries = 0;  // kResident: queries in flight (vectors * queries accumulators)
};

constexpr int64_t kDirectMaxBatch = 32;      // below this the packing would cost more than it saves
constexpr int64_t kResidentMaxCount = 32;    // the resident pass up to this many prototypes...
constexpr int64_t kResidentMaxFloats = 8192;  // ...whose panels (count x d floats) stay in L1 (32 KiB)

// The resident pass's vector width and accumulator budget per level: 16 named vector
// registers below AVX-512 (12 accumulators leave room for the prototype vectors and one
// broadcast query element), 32 with it.
constexpr int resident_lanes(int level) { return level >= cpu::kIsaAvx512 ? 16 : level >= cpu::kIsaAvx2 ? 8 : 4; }
constexpr int resident_accumulators(int level) { return level >= cpu::kIsaAvx512 ? 24 : 12; }
// Queries in flight for `vectors` vectors per query: as many as the accumulators allow.
constexpr int resident_queries(int level, int vectors) {
  const int q = resident_accumulators(level) / vectors;
  return q < 1 ? 1 : q;
}

inline SearchPlan plan_search(const SearchCall& c) {
  SearchPlan p;
  if (c.wide || c.k > kMaxK) {
    p.path = SearchPath::kExact;
    return p;
  }
  if (c.batch < kDirectMaxBatch || c.dim == 0) {
    p.path = SearchPath::kDirect;
    return p;
  }
  // one prototype has no second key for the acceptance gap: the blocked pass's list handles it
  if (c.k == 1 && c.count >= 2 && c.count <= kResidentMaxCount && c.count * c.dim <= kResidentMaxFloats) {
    p.path = SearchPath::kResident;
    p.lanes = resident_lanes(c.level);
    p.vectors = static_cast<int>((c.count + p.lanes - 1) / p.lanes);
    p.queries = resident_queries(c.level, p.vectors);
    return p;
  }
  p.path = SearchPath::kBlocked;
  return p;
}

}  // namespace pe::search
