// Argument checking for the Persona serving ops (edited_linear, hyper_matmul, edit_sumsq),
// shared by the CPU and CUDA wrappers. Every shape the kernels index with is checked here, so
// the kernels never read outside their operands.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace pyeditor {

struct LinearArgs {
  int64_t batch, rows, in, out, slots;  // slots: theta matrices (1 for a 2-D theta)
  bool per_sample;                      // no proto_index and a [P == B, in, out] theta
  int64_t theta_ss, bias_ss, bias_cs;   // theta sample stride (0 for 2-D), bias strides
  int64_t thr_stride;                   // 0: one T for all samples
  at::Tensor threshold;                 // accumulation dtype, contiguous
  at::Tensor index;                     // int64 contiguous, or undefined
};

// x [B, S, in], theta [in, out] or [P, in, out], delta [B, in, out], threshold (acc dtype) 0-d
// or [B], bias None / [out] / [P, out], proto_index None or int64 [B].
LinearArgs prepare_edited_linear(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,
                                 const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& proto_index);

struct HyperArgs {
  int64_t batch, dim, width, protos;
  at::Tensor index;  // int64 contiguous, or undefined (all-prototype form)
  // heads concatenated along n: head l owns columns [heads[l], heads[l+1]) and reads e[l];
  // {0, width} for a single head
  std::vector<int64_t> heads;
};

// e [B, d], weight [P, d, n], bias None or [P, n], index None or int64 [B].
HyperArgs prepare_hyper(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& index);

// hyper_matmul_heads: e [L, B, d], weight [P, d, N], sizes L ints >= 0 summing to N, bias None or
// [P, N], index None or int64 [B].
HyperArgs prepare_hyper_heads(const at::Tensor& e, const at::Tensor& weight, at::IntArrayRef sizes,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index);

// hyper_weight_grad: e [L, B, d], grad [B, N], sizes as above, index int64 [B] in [0, protos).
HyperArgs prepare_weight_grad(const at::Tensor& e, const at::Tensor& grad, at::IntArrayRef sizes,
                              const at::Tensor& index, int64_t protos);

// threshold for edit_sumsq: undefined, or acc dtype 0-d / [B]; returns it contiguous.
at::Tensor prepare_sumsq_threshold(const c10::optional<at::Tensor>& threshold, const at::Tensor& e, int64_t batch);

}  // namespace pyeditor
