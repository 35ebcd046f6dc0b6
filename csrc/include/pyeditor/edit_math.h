// The clip-and-add edit of Persona (K = clamp(delta, -T, T) + theta) and its gradient mask:
// the element math and the index geometry, shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "macros.h"
#include "numeric.h"

namespace pe {

// clamp written with comparisons so that NaN falls through unchanged (torch.clamp semantics).
template <class A> PE_HD A clip(A d, A t) { return d < -t ? -t : (d > t ? t : d); }

template <class A> PE_HD A clip_add(A d, A theta, A t) { return clip(d, t) + theta; }

// d/d delta of clip: the incoming gradient where |delta| <= T (boundaries included), else 0.
template <class A> PE_HD A clip_grad(A g, A d, A t) { return (d >= -t && d <= t) ? g : A(0); }

// Element strides of one [rows, cols] matrix operand plus the stride between samples.
struct MatrixStrides {
  int64_t sample, row, col;
};

// Where every operand of a batched edit lives. Sample b reads theta slice `theta_slot(b)`,
// delta slice b (or the single delta when delta.sample == 0) and threshold[b * thr_stride].
struct EditGeometry {
  int64_t samples, rows, cols;
  int64_t num_protos;     // theta slices that exist (bounds for proto_index)
  bool theta_per_sample;  // without proto_index: sample b uses theta slice b
  MatrixStrides theta, delta, out;
  int64_t thr_stride;     // 0: one threshold for all samples
};

PE_HD int64_t theta_slot(const EditGeometry& g, const int64_t* proto_index, int64_t b) {
  if (proto_index) return proto_index[b];
  return g.theta_per_sample ? b : 0;
}

PE_HD bool slot_in_range(const EditGeometry& g, int64_t slot) { return slot >= 0 && slot < g.num_protos; }

// Work is cut into items of at most `col_block` elements along one row of one sample;
// item -> (sample, row, first column, length). Shared by the CPU loop and the CUDA grid.
struct SpanItem {
  int64_t sample, row, col0, len;
};

PE_HD int64_t col_blocks(const EditGeometry& g, int64_t col_block) { return (g.cols + col_block - 1) / col_block; }

PE_HD int64_t span_items(const EditGeometry& g, int64_t col_block) {
  return g.samples * g.rows * col_blocks(g, col_block);
}

PE_HD SpanItem span_item(const EditGeometry& g, int64_t item, int64_t col_block) {
  const int64_t nb = col_blocks(g, col_block);
  const int64_t cb = item % nb, row = (item / nb) % g.rows, sample = item / (nb * g.rows);
  const int64_t col0 = cb * col_block;
  const int64_t rest = g.cols - col0;
  return {sample, row, col0, rest < col_block ? rest : col_block};
}

// Merges each sample's rows into one long row when every operand stores them densely.
PE_HD EditGeometry flatten_dense(EditGeometry g) {
  const bool dense = g.theta.col == 1 && g.delta.col == 1 && g.out.col == 1 && g.theta.row == g.cols &&
                     g.delta.row == g.cols && g.out.row == g.cols;
  if (dense) {
    g.cols *= g.rows;
    g.rows = 1;
  }
  return g;
}

// One contiguous run of `n` elements: the vectorizable inner loop of every backend's edit.
template <class T>
PE_HD void clip_add_span(const T* theta, const T* delta, T* out, int64_t n, acc_t<T> t) {
  for (int64_t i = 0; i < n; ++i) store(out + i, clip_add(load(delta + i), load(theta + i), t));
}

template <class T>
PE_HD void clip_grad_span(const T* grad, const T* delta, T* out, int64_t n, acc_t<T> t) {
  for (int64_t i = 0; i < n; ++i) store(out + i, clip_grad(load(grad + i), load(delta + i), t));
}

}  // namespace pe
