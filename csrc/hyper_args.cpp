#include "hyper_args.h"

#include "edit_args.h"

namespace pyeditor {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_floating_point(), "pyeditor: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "pyeditor: ", name, " dtype ", t.scalar_type(),
              " does not match ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "pyeditor: ", name, " is on ", t.device(), " but expected ",
              like.device());
}

at::Tensor prepare_index(const at::Tensor& idx, int64_t batch, int64_t bound, const char* name) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "pyeditor: ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == batch, "pyeditor: ", name, " must have shape [", batch, "], got ",
              idx.sizes());
  at::Tensor out = idx.contiguous();
  // host-side range check (CPU tensors here; a CUDA index is copied once)
  check_index_values(out.device().is_cpu() ? out : out.cpu(), bound, name);
  return out;
}

at::Tensor prepare_threshold(const at::Tensor& t, const at::Tensor& like, int64_t batch) {
  TORCH_CHECK(t.scalar_type() == acc_type(like.scalar_type()), "pyeditor: threshold must be ",
              acc_type(like.scalar_type()), " for ", like.scalar_type(), " inputs, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == batch), "pyeditor: threshold must hold 1 or ",
              batch, " values, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "pyeditor: threshold is on ", t.device(), " but expected ", like.device());
  at::Tensor out = t.reshape({t.numel()}).contiguous();
  check_threshold_values(out.device().is_cpu() ? out : out.cpu());
  return out;
}

}  // namespace

LinearArgs prepare_edited_linear(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,
                                 const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& proto_index) {
  check_float(x, "x", x);
  check_float(theta, "theta", x);
  check_float(delta, "delta", x);
  TORCH_CHECK(x.dim() == 3, "pyeditor: x must be [B, S, in], got ", x.sizes());
  TORCH_CHECK(theta.dim() == 2 || theta.dim() == 3, "pyeditor: theta must be [in, out] or [P, in, out], got ",
              theta.sizes());
  LinearArgs a{};
  a.batch = x.size(0);
  a.rows = x.size(1);
  a.in = x.size(2);
  a.out = theta.size(-1);
  a.slots = theta.dim() == 3 ? theta.size(0) : 1;
  TORCH_CHECK(theta.size(-2) == a.in, "pyeditor: theta has ", theta.size(-2), " rows but x has ", a.in, " features");
  TORCH_CHECK(delta.dim() == 3 && delta.size(0) == a.batch && delta.size(1) == a.in && delta.size(2) == a.out,
              "pyeditor: delta must be [", a.batch, ", ", a.in, ", ", a.out, "], got ", delta.sizes());
  a.theta_ss = theta.dim() == 3 ? theta.stride(0) : 0;
  if (proto_index.has_value()) {
    TORCH_CHECK(theta.dim() == 3, "pyeditor: proto_index needs theta as [P, in, out]");
    a.index = prepare_index(*proto_index, a.batch, a.slots, "proto_index");
  } else if (theta.dim() == 3) {
    TORCH_CHECK(a.slots == a.batch, "pyeditor: theta has ", a.slots, " matrices for batch ", a.batch,
                "; pass proto_index");
    a.per_sample = true;
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_float(b, "bias", x);
    TORCH_CHECK(b.size(-1) == a.out && (b.dim() == 1 || (b.dim() == 2 && b.size(0) == a.slots && theta.dim() == 3)),
                "pyeditor: bias must be [", a.out, "] or [", a.slots, ", ", a.out, "], got ", b.sizes());
    a.bias_ss = b.dim() == 2 ? b.stride(0) : 0;
    a.bias_cs = b.stride(-1);
  }
  a.threshold = prepare_threshold(threshold, x, a.batch);
  a.thr_stride = a.threshold.numel() == 1 ? 0 : 1;
  return a;
}

HyperArgs prepare_hyper(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& index) {
  check_float(e, "e", e);
  check_float(weight, "weight", e);
  TORCH_CHECK(e.dim() == 2, "pyeditor: e must be [B, d], got ", e.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == e.size(1), "pyeditor: weight must be [P, ", e.size(1),
              ", n], got ", weight.sizes());
  HyperArgs a{e.size(0), e.size(1), weight.size(2), weight.size(0), at::Tensor(), {0, weight.size(2)}};
  if (bias.has_value()) {
    check_float(*bias, "bias", e);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == a.protos && bias->size(1) == a.width,
                "pyeditor: bias must be [", a.protos, ", ", a.width, "], got ", bias->sizes());
  }
  if (index.has_value()) a.index = prepare_index(*index, a.batch, a.protos, "index");
  return a;
}

namespace {

std::vector<int64_t> head_offsets(at::IntArrayRef sizes, int64_t heads, int64_t width) {
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == heads, "pyeditor: sizes has ", sizes.size(),
              " entries but e holds ", heads, " heads");
  std::vector<int64_t> off(1, 0);
  for (size_t l = 0; l < sizes.size(); ++l) {
    TORCH_CHECK(sizes[l] >= 0, "pyeditor: sizes[", l, "] = ", sizes[l], " is negative");
    off.push_back(off.back() + sizes[l]);
  }
  TORCH_CHECK(off.back() == width, "pyeditor: sizes sum to ", off.back(), " but the heads have ", width, " columns");
  return off;
}

}  // namespace

HyperArgs prepare_hyper_heads(const at::Tensor& e, const at::Tensor& weight, at::IntArrayRef sizes,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index) {
  TORCH_CHECK(e.dim() == 3 && e.size(0) >= 1, "pyeditor: e must be [L >= 1, B, d] (one embedding per head), got ",
              e.sizes());
  HyperArgs a = prepare_hyper(e.select(0, 0), weight, bias, index);
  a.heads = head_offsets(sizes, e.size(0), a.width);
  return a;
}

HyperArgs prepare_weight_grad(const at::Tensor& e, const at::Tensor& grad, at::IntArrayRef sizes,
                              const at::Tensor& index, int64_t protos) {
  check_float(e, "e", e);
  check_float(grad, "grad", e);
  TORCH_CHECK(e.dim() == 3, "pyeditor: e must be [L, B, d], got ", e.sizes());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == e.size(1), "pyeditor: grad must be [", e.size(1), ", N], got ",
              grad.sizes());
  TORCH_CHECK(protos >= 0, "pyeditor: protos must be >= 0, got ", protos);
  HyperArgs a{e.size(1), e.size(2), grad.size(1), protos, prepare_index(index, e.size(1), protos, "index"), {}};
  a.heads = head_offsets(sizes, e.size(0), a.width);
  return a;
}

at::Tensor prepare_sumsq_threshold(const c10::optional<at::Tensor>& threshold, const at::Tensor& e, int64_t batch) {
  if (!threshold.has_value()) return at::Tensor();
  return prepare_threshold(*threshold, e, batch);
}

}  // namespace pyeditor
