// Kernel entry points of every pyeditor op, per device; registered in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace pyeditor {

at::Tensor apply_edit_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cpu(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);

#ifdef PYEDITOR_WITH_CUDA
at::Tensor apply_edit_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                           const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cuda(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);
#endif

// Persona serving ops (issue 4)
#define PE_DECLARE_HYPER(dev)                                                                                  \
  at::Tensor edited_linear_##dev(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,        \
                                 const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,           \
                                 const c10::optional<at::Tensor>& proto_index);                                \
  at::Tensor hyper_matmul_##dev(const at::Tensor& e, const at::Tensor& weight,                                 \
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index); \
  at::Tensor edit_sumsq_##dev(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, \
                              const c10::optional<at::Tensor>& threshold);
PE_DECLARE_HYPER(cpu)
#ifdef PYEDITOR_WITH_CUDA
PE_DECLARE_HYPER(cuda)
#endif
#undef PE_DECLARE_HYPER

}  // namespace pyeditor
