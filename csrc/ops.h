// Kernel entry points of every pyeditor op, per device; registered in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace pyeditor {

at::Tensor apply_edit_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cpu(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);

// nearest-prototype search (issue 5)
std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                        c10::string_view metric);

#ifdef PYEDITOR_WITH_CUDA
at::Tensor apply_edit_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                           const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cuda(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);
std::tuple<at::Tensor, at::Tensor> nearest_prototype_cuda(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                         c10::string_view metric);  // issue 5
#endif

}  // namespace pyeditor
