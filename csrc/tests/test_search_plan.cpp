// The CPU search plan table (search_plan.h), checked at every vector level whatever CPU runs
// this test: which pass a call takes, and the resident pass's width, vectors and queries.
#include <cstdio>

#include "expect.h"
#include "pyeditor/search_plan.h"

using namespace pe::search;
namespace cpu = pe::cpu;

static SearchCall call(int64_t B, int64_t N, int64_t d, int64_t k = 1, int level = cpu::kIsaAvx2, bool wide = false) {
  SearchCall c;
  c.batch = B, c.count = N, c.dim = d, c.k = k, c.level = level, c.wide = wide;
  return c;
}

int main() {
  const int levels[] = {cpu::kIsaPortable, cpu::kIsaAvx2, cpu::kIsaAvx512};
  for (int level : levels) {
    // float64 inputs and k beyond the fixed lists: float64 keys, whatever the shape
    EXPECT(plan_search(call(65536, 16, 64, 1, level, true)).path == SearchPath::kExact);
    EXPECT(plan_search(call(65536, 256, 64, kMaxK + 1, level)).path == SearchPath::kExact);
    EXPECT(plan_search(call(65536, 256, 64, kMaxK, level)).path != SearchPath::kExact);
    // few queries: the direct pass (no packing); from kDirectMaxBatch on, a packed one
    EXPECT(plan_search(call(kDirectMaxBatch - 1, 16, 64, 1, level)).path == SearchPath::kDirect);
    EXPECT(plan_search(call(kDirectMaxBatch, 16, 64, 1, level)).path == SearchPath::kResident);
    EXPECT(plan_search(call(65536, 16, 0, 1, level)).path == SearchPath::kDirect);
    // k = 1 and few prototypes that fit L1: the resident pass
    EXPECT(plan_search(call(65536, 16, 64, 1, level)).path == SearchPath::kResident);
    EXPECT(plan_search(call(65536, kResidentMaxCount, kResidentMaxFloats / kResidentMaxCount, 1, level)).path ==
           SearchPath::kResident);
    EXPECT(plan_search(call(65536, kResidentMaxCount + 1, 64, 1, level)).path == SearchPath::kBlocked);
    EXPECT(plan_search(call(65536, 16, kResidentMaxFloats / 16 + 1, 1, level)).path == SearchPath::kBlocked);
    EXPECT(plan_search(call(65536, 1, 64, 1, level)).path == SearchPath::kBlocked);  // no second key
    EXPECT(plan_search(call(65536, 16, 64, 2, level)).path == SearchPath::kBlocked);
    EXPECT(plan_search(call(65536, 256, 256, 1, level)).path == SearchPath::kBlocked);
    // the resident pass's shape: every prototype in whole vectors, accumulators within the budget
    for (int64_t N = 2; N <= kResidentMaxCount; ++N) {
      const SearchPlan p = plan_search(call(4096, N, 64, 1, level));
      EXPECT(p.path == SearchPath::kResident);
      EXPECT(p.lanes == resident_lanes(level));
      EXPECT(p.vectors * p.lanes >= N && (p.vectors - 1) * p.lanes < N);
      EXPECT(p.queries >= 1 && p.queries * p.vectors <= resident_accumulators(level));
      EXPECT(16 % p.lanes == 0);  // a vector never straddles two 16-lane panels
    }
  }
  // the widths follow the level: 4 floats baseline, 8 AVX2, 16 AVX-512 (and AMX, which adds nothing)
  EXPECT(plan_search(call(4096, 16, 64, 1, cpu::kIsaPortable)).lanes == 4);
  EXPECT(plan_search(call(4096, 16, 64, 1, cpu::kIsaAvx2)).lanes == 8);
  EXPECT(plan_search(call(4096, 16, 64, 1, cpu::kIsaAvx512)).lanes == 16);
  EXPECT(plan_search(call(4096, 16, 64, 1, cpu::kIsaAmx)).lanes == 16);
  // AVX2 at the bench shape: two vectors per query, six queries in flight (12 accumulators)
  const SearchPlan p = plan_search(call(65536, 16, 64, 1, cpu::kIsaAvx2));
  EXPECT(p.vectors == 2 && p.queries == 6);
  if (failures == 0) std::printf("search plan: all checks passed\n");
  return failures ? 1 : 0;
}
