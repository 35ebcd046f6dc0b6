// The Autograd kernel of pyeditor::quant_linear: a router, not a formula. Without a gradient to
// record (inference, the serving path) it calls the kernel directly, so a decode-sized call pays
// no Python autograd wrapper (bench: packed_linear M=1). With one, it calls
// pyeditor::quant_linear_autograd, the op that carries the one backward formula of both
// quant_linear ops (pyeditor/ops.py, registered with torch.library.register_autograd).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace pyeditor {
namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, at::IntArrayRef, int64_t, int64_t, const c10::optional<at::Tensor>&,
                            bool, int64_t, bool);

c10::TypedOperatorHandle<LinearFn> linear_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), "pyeditor: ", name,
              " is not registered: import pyeditor (its Python package registers the backward)");
  return handle->typed<LinearFn>();
}

at::Tensor quant_linear_autograd(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                                 const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                                 int64_t in_features, int64_t out_features, const c10::optional<at::Tensor>& bias,
                                 bool fast, int64_t group_size, bool bf16) {
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || bias_grad)) {
    static const auto kernel = linear_op("pyeditor::quant_linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    return kernel.call(x, data, scale, zero, perm, buckets, in_features, out_features, bias, fast, group_size, bf16);
  }
  // looked up on every differentiable call (a hash lookup): the Python package may register it
  // after this library loads
  return linear_op("pyeditor::quant_linear_autograd")
      .call(x, data, scale, zero, perm, buckets, in_features, out_features, bias, fast, group_size, bf16);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeditor, Autograd, m) {
  m.impl("quant_linear", &quant_linear_autograd);
}

}  // namespace pyeditor
