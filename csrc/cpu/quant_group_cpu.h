// The CPU packed matmul for group-wise scales (group_size 32, 64 or 128). Internal to csrc/cpu.
#pragma once
#include <ATen/ATen.h>

#include "../quant_args.h"
#include "pyeditor/quant_plan.h"

namespace pyeditor {

// out[M, n] = x2[M, k] @ W.T (+ bias, float32 [n] or null) for a grouped packed W (checked by
// check_packed), by the kernels `plan` (quant_plan.h) names; x2 contiguous float32/float16/bfloat16.
// Returns whether an output is not finite.
bool run_linear_grouped_cpu(const PackedArgs& a, const pe::quant::LinearPlan& plan, const at::Tensor& x2,
                            const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                            const at::Tensor& perm, const float* bias, bool fast, at::Tensor& out);

}  // namespace pyeditor
