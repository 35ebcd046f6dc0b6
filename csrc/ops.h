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

}  // namespace pyeditor
