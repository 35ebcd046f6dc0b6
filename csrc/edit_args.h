// Argument checking and geometry for the edit ops, shared by the CPU and CUDA wrappers.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "pyeditor/edit_math.h"

namespace pyeditor {

struct EditArgs {
  pe::EditGeometry geometry;
  std::vector<int64_t> out_shape;
  at::Tensor threshold;    // accumulation dtype, contiguous, numel 1 or `samples`
  at::Tensor proto_index;  // int64 contiguous, or undefined
};

// Validates theta / delta / threshold / proto_index (see reference.apply_edit) and returns
// the shapes, strides and bounds the kernels need. `out` may be undefined (allocating call).
EditArgs prepare_edit(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                      const c10::optional<at::Tensor>& proto_index);

// Same for the gradient mask: grad is [R, C] or [B, R, C]; delta is grad's shape or one [R, C]
// edit shared by every sample.
EditArgs prepare_edit_grad(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);

// Allocates the result, or checks a caller's out= tensor against the expected shape.
at::Tensor edit_output(const EditArgs& args, const at::Tensor& like, const at::Tensor* out);

// prepare_edit plus the checks on a caller's out= buffer (shape, dtype, device, overlap).
EditArgs prepare_edit_out(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index, const at::Tensor& out);

// Host-side check of threshold values (>= 0 and not NaN); the CPU path calls it always.
void check_threshold_values(const at::Tensor& threshold_cpu);

// Host-side check that every proto_index lies in [0, P).
void check_index_values(const at::Tensor& index_cpu, int64_t num_protos, const char* name = "proto_index");

}  // namespace pyeditor
