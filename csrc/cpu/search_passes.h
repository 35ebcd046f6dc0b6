// The CPU search passes' shared types and entry points (search_cpu.cpp drives them):
// the packed prototypes of the blocked pass, one block of queries, and the blocked and direct
// passes (each built per vector level, cpu_isa.h, one picked at load). Internal to csrc/cpu.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace pyeditor::search_cpu {

constexpr int kMC = 64;  // queries per blocked work item

// Prototypes prepared for the blocked pass (float32 mode).
struct Packed {
  at::Tensor panels;           // [panels, dpad, 16] float32 (64-byte aligned), zero rows past d
  std::vector<float> bias;     // per packed lane: ||p'||^2 (l2) or 0
  std::vector<int64_t> orig;   // packed lane -> original prototype index
  std::vector<float> shift;    // the centre subtracted from queries (l2; dpad long), else empty
  double pmax = 0.0;           // max ||p'|| over packed prototypes
  int64_t count = 0, num_panels = 0;
  int64_t dpad = 0;            // d rounded up to 16: the top-1 tile reads whole 16-dim chunks
};

struct BlockJob {
  const float* x;        // [B, d] float32, contiguous
  const float* P;        // [N, d] original prototypes, float32
  const Packed* pk;
  int64_t N, d, row0, rows, B;
  int k, metric;
  float* dist;           // [B, k]
  int64_t* idx;          // [B, k]
};


// Centres (l2) / normalises (cosine) the prototypes listed in `valid` and packs them in
// 16-wide panels for the blocked pass.
Packed pack_prototypes(const float* P, int64_t N, int64_t d, int metric, const std::vector<int64_t>& valid);

// Blocked pass over job.rows queries with a top-(k+1) list of capacity cap (k = 1 with at
// least two packed prototypes: the 16-query transposed tile).
void blocked_job(const BlockJob& job, int cap);

// Resident pass (k = 1, few prototypes: search_plan.h) over job.rows queries, `vectors`
// vectors of the level's width per query (the packed prototypes rounded up).
void resident_job(const BlockJob& job, int vectors);

// Direct pass over queries [q0, q1) against the raw prototypes (small batches).
void direct_job(const float* x, const float* P, int64_t N, int64_t d, int k, int metric, int64_t q0, int64_t q1,
                float* dist, int64_t* idx, int cap);

// The build_info name of the level both passes run at: "avx512", "avx2" or "portable".
const char* search_level();

}  // namespace pyeditor::search_cpu
