// Autograd of pyeditor::quant_linear in C++ (one registration for every device): the Python
// register_autograd wrapper costs a noticeable share of a DRAM-bound GEMV (bench: packed_linear M=1).
// grad_x = grad_y @ W with W from pyeditor::quant_dequantize; grad_bias = grad_y summed over rows.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace pyeditor {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_linear(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                       const at::Tensor& perm, at::IntArrayRef buckets, int64_t n,
                       const c10::optional<at::Tensor>& bias, bool fast, int64_t group_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyeditor::quant_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, at::IntArrayRef, int64_t,
                                         const c10::optional<at::Tensor>&, bool, int64_t)>();
  return op.call(x, data, scale, zero, perm, buckets, n, bias, fast, group_size);
}

at::Tensor call_dequantize(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                           const at::Tensor& perm, at::IntArrayRef buckets, int64_t k, int64_t n,
                           int64_t group_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyeditor::quant_dequantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, int64_t, int64_t, int64_t)>();
  return op.call(data, scale, zero, perm, buckets, k, n, group_size);
}

struct QuantLinear : public torch::autograd::Function<QuantLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& data,
                            const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& perm,
                            std::vector<int64_t> buckets, int64_t n, const c10::optional<at::Tensor>& bias,
                            bool fast, int64_t group_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({data, scale, zero, perm});
    ctx->saved_data["buckets"] = buckets;
    ctx->saved_data["k"] = x.dim() ? x.size(-1) : 0;
    ctx->saved_data["n"] = n;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] = has_bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    return call_linear(x, data, scale, zero, perm, buckets, n, bias, fast, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto buckets = ctx->saved_data["buckets"].toIntVector();
    const int64_t k = ctx->saved_data["k"].toInt(), n = ctx->saved_data["n"].toInt();
    const int64_t group_size = ctx->saved_data["group_size"].toInt();
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const at::Tensor& grad = grads[0];
    const auto acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor w = call_dequantize(saved[0], saved[1], saved[2], saved[3], buckets, k, n, group_size);
      grad_x = at::matmul(grad.to(acc), w.to(acc)).to(x_dtype);
    }
    if (bias_dtype >= 0 && ctx->needs_input_grad(5))  // over tensor inputs: x, data, scale, zero, perm, bias
      grad_bias = grad.reshape({-1, n}).to(acc).sum(0).to(static_cast<at::ScalarType>(bias_dtype));
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_bias,
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor quant_linear_autograd(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                                 const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                                 int64_t out_features, const c10::optional<at::Tensor>& bias, bool fast,
                                 int64_t group_size) {
  // inference (nothing needs a gradient): straight to the kernel, without the autograd node and
  // its saved state (string-keyed saved_data alone showed up in per-call profiles)
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || bias_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_linear(x, data, scale, zero, perm, buckets, out_features, bias, fast, group_size);
  }
  return QuantLinear::apply(x, data, scale, zero, perm, buckets.vec(), out_features, bias, fast, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeditor, Autograd, m) {
  m.impl("quant_linear", &quant_linear_autograd);
}

}  // namespace pyeditor
