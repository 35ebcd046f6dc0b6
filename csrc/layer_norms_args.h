// Argument checking of edit_norms_layers (Persona Eq. 11-12 over every layer), shared by the CPU
// and CUDA wrappers; pyeditor/validate.py layer_norms_args is its twin for the Triton op and the
// fake kernel. Every shape and stride the kernels index with is checked here.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace pyeditor {

struct LayerNormsArgs {
  int64_t layers, batch, dim, protos;
  int rule;                   // pe::LayerRule
  std::vector<int64_t> kept;  // the layers the rule reads (weighted: lambda_l > 0), in order
  std::vector<double> lam;    // lambda_l per layer (1 unless weighted)
  at::Tensor threshold;       // float64 contiguous [1 or B], or undefined (unclipped)
  at::Tensor gram;            // float64 contiguous [L, P, d+1, d+1] (the layers' Grams), or undefined
};

// e [L, B, d] (a stride-0 layer axis shares one embedding); weights L tensors [P, d, n_l];
// biases L entries None / [P, n_l]; threshold None or float64 0-d / [1] / [B], >= 0;
// rule "sumsq" | "sum" | "max" | "weighted" (with layer_weights: L finite values >= 0, not all 0);
// gram None or float64 [L, P, d+1, d+1] (prototype_gram_layers of these layers; the caller
// vouches that it matches them).
LayerNormsArgs prepare_layer_norms(const at::Tensor& e, at::TensorList weights,
                                   const c10::List<c10::optional<at::Tensor>>& biases,
                                   const c10::optional<at::Tensor>& threshold, c10::string_view rule,
                                   c10::optional<at::ArrayRef<double>> layer_weights,
                                   const c10::optional<at::Tensor>& gram);

}  // namespace pyeditor
