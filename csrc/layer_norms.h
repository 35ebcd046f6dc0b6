// Entry points of edit_norms_layers (Persona Eq. 11-12 over every layer, issue 27): [B, P]
// float64 edit norms combined by rule. Schema in register.cpp; arguments in layer_norms_args.h.
#pragma once
#include <ATen/ATen.h>

namespace pyeditor {

#define PE_DECLARE_LAYER_NORMS(dev)                                                                       \
  at::Tensor edit_norms_layers_##dev(const at::Tensor& e, at::TensorList weights,                         \
                                     const c10::List<c10::optional<at::Tensor>>& biases,                  \
                                     const c10::optional<at::Tensor>& threshold, c10::string_view rule,   \
                                     c10::optional<at::ArrayRef<double>> layer_weights,                   \
                                     const c10::optional<at::Tensor>& gram);
PE_DECLARE_LAYER_NORMS(cpu)
#ifdef PYEDITOR_WITH_CUDA
PE_DECLARE_LAYER_NORMS(cuda)
#endif
#undef PE_DECLARE_LAYER_NORMS

// The build_info name of the CPU kernel's variant: "avx512", "avx2" or "portable".
const char* layer_norms_level();

}  // namespace pyeditor
