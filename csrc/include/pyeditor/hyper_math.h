// Element math and work geometry of the Persona serving ops (edited_linear, hyper_matmul,
// edit_sumsq), shared by the CPU tiles and the CUDA kernels. Framework-free.
#pragma once
#include <cstdint>

#include "edit_math.h"

namespace pe {

// One element of an edited weight tile: K = clip(delta, -T, T) + theta (edit_math.h's clip_add),
// so the fused matmul forms exactly the value apply_edit would have written.
template <class S, class A> PE_HD A edited_weight(const S* delta, const S* theta, A t) {
  return clip_add<A>(static_cast<A>(load(delta)), static_cast<A>(load(theta)), t);
}

// One element's contribution to an edit's squared norm: clip(g, -T, T)^2 (no clip when !clipped),
// accumulated in double whatever the input dtype, as the reference does. An element that
// overflowed the accumulator type (inf) stays non-finite through the clip (g - g is NaN, else 0;
// no branch, so the loops still vectorize): the caller redoes that pair in float64 instead of
// taking T for a value that may lie below it.
template <class A> PE_HD double clipped_square(A g, bool clipped, A t) {
  const double v = static_cast<double>(clipped ? clip(g, t) : g);
  return clipped ? v * v + static_cast<double>(g - g) : v * v;
}

// Which matrix (prototype) a sample reads: proto_index[b] if given, else b when every sample has
// its own matrix, else the single shared one. Same rule as apply_edit's theta_slot.
PE_HD int64_t sample_slot(const int64_t* proto_index, bool per_sample, int64_t b) {
  if (proto_index) return proto_index[b];
  return per_sample ? b : 0;
}

PE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Segments of a gathered batch (multi-adapter style): rows sorted stably by their index; the
// rows of group p are rows[offsets[p] .. offsets[p+1]). Built by counting sort, O(B + P).
inline void counting_segments(const int64_t* index, int64_t rows, int64_t groups, int64_t* offsets,
                              int64_t* sorted_rows) {
  for (int64_t p = 0; p <= groups; ++p) offsets[p] = 0;
  for (int64_t r = 0; r < rows; ++r) ++offsets[index[r] + 1];
  for (int64_t p = 0; p < groups; ++p) offsets[p + 1] += offsets[p];
  // fill with a running cursor per group (stable: rows visited in order)
  for (int64_t r = 0; r < rows; ++r) sorted_rows[offsets[index[r]]++] = r;
  for (int64_t p = groups; p > 0; --p) offsets[p] = offsets[p - 1];
  offsets[0] = 0;
}

// Column tiles of heads concatenated along n (grouped matmul, one launch for every head): head l
// owns columns [heads[l], heads[l+1]); tile i is (head, first column, end column), lies inside one
// head and is at most `width` wide. Writes the table when `table` (3 per tile) is given; returns
// the number of tiles. Empty heads own no tile.
inline int64_t head_tiles(const int64_t* heads, int64_t count, int64_t width, int64_t* table) {
  int64_t n = 0;
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t c = heads[l]; c < heads[l + 1]; c += width, ++n) {
      if (!table) continue;
      table[3 * n] = l;
      table[3 * n + 1] = c;
      table[3 * n + 2] = c + width < heads[l + 1] ? c + width : heads[l + 1];
    }
  }
  return n;
}

}  // namespace pe
