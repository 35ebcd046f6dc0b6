// Argument checks for the packed-weight ops, shared by the CPU and CUDA wrappers: after these,
// no kernel can read outside data / scale / zero / perm.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "pyeditor/pack.h"

namespace pyeditor {

struct PackedArgs {
  std::vector<pe::quant::Bucket> buckets;
  int64_t k = 0;          // in_features
  int64_t n = 0;          // out_features
  int64_t rows = 0;       // packed rows (sum of the buckets, padded to tiles)
  int64_t group_size = 0; // 0: one scale per packed row; else inputs per scale (32, 64, 128)
  int64_t groups = 1;     // scales per packed row: ceil(k / group_size), or 1
};

// data uint8 [bytes], scale float32 [rows] (group_size 0) or [groups, rows] (group_size 32, 64,
// 128: group-major), zero uint8 of scale's shape, perm int16 (out_features <=
// kPermInt16Channels) or int32 [rows];
// buckets = (bits, row_start, rows, byte_offset) * B, contiguous and in order.
PackedArgs check_packed(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                        const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                        int64_t out_features, int64_t group_size);

// perm's entries, either width (after check_packed).
pe::quant::PermView perm_view(const at::Tensor& perm);

// Host check that perm maps the packed rows onto [0, n) exactly once (padding rows: -1).
void check_perm_values(const at::Tensor& perm_cpu, int64_t n);

// x [..., in] floating with in == args.k; bias None or [n] floating on x's device.
void check_linear_inputs(const PackedArgs& args, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& data);

// The mode flags exclude each other (fast: int8 activations; bf16: activations rounded to
// bfloat16); returns the activations the kernels then multiply exactly: x, or with bf16 x rounded
// to bfloat16 (to nearest even; float64 by way of float32, as torch casts) and back to its own
// dtype, except float16, which comes back as float32 (bfloat16 reaches past float16's range:
// 65408 rounds to 65536), so the caller casts the result back to x's dtype.
at::Tensor mode_activations(const at::Tensor& x, bool fast, bool bf16);

// Output shape [..., n] of x [..., k].
std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n);

}  // namespace pyeditor
