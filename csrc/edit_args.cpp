#include "edit_args.h"

#include <cstdlib>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

namespace pyeditor {
namespace {

bool is_edit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

pe::MatrixStrides strides_of(const at::Tensor& t, bool has_sample_dim) {
  const int64_t d = t.dim();
  return {has_sample_dim && d == 3 ? t.stride(0) : 0, t.stride(d - 2), t.stride(d - 1)};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor threshold_for(const at::Tensor& threshold, int64_t samples, bool batched, at::ScalarType acc,
                         int64_t* stride) {
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), "pyeditor: threshold must be a floating tensor, got ",
              threshold.scalar_type());
  if (threshold.numel() == 1 && threshold.dim() <= 1) {
    *stride = 0;
  } else {
    TORCH_CHECK(batched && threshold.dim() == 1 && threshold.size(0) == samples,
                "pyeditor: threshold must be a number, a 0-d tensor or one value per sample [", samples,
                "], got shape ", threshold.sizes());
    *stride = 1;
  }
  return threshold.to(acc).contiguous();
}

}  // namespace

EditArgs prepare_edit(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                      const c10::optional<at::Tensor>& proto_index) {
  TORCH_CHECK(theta.dim() == 2 || theta.dim() == 3, "pyeditor: theta must be [R, C] or [P, R, C], got shape ",
              theta.sizes());
  TORCH_CHECK(delta.dim() == 2 || delta.dim() == 3, "pyeditor: delta must be [R, C] or [B, R, C], got shape ",
              delta.sizes());
  TORCH_CHECK(is_edit_dtype(theta.scalar_type()), "pyeditor: theta dtype must be float32, float64, float16 or bfloat16, got ",
              theta.scalar_type());
  TORCH_CHECK(delta.scalar_type() == theta.scalar_type(), "pyeditor: delta dtype ", delta.scalar_type(),
              " does not match theta dtype ", theta.scalar_type());
  TORCH_CHECK(delta.device() == theta.device() && threshold.device() == theta.device(),
              "pyeditor: theta, delta and threshold must be on one device, got ", theta.device(), ", ",
              delta.device(), ", ", threshold.device());
  const int64_t rows = theta.size(-2), cols = theta.size(-1);
  TORCH_CHECK(delta.size(-2) == rows && delta.size(-1) == cols, "pyeditor: delta matrices ", delta.sizes(),
              " do not match theta's matrix shape [", rows, ", ", cols, "]");

  EditArgs a;
  pe::EditGeometry& g = a.geometry;
  g.rows = rows;
  g.cols = cols;
  g.theta_per_sample = false;
  const bool theta3 = theta.dim() == 3, delta3 = delta.dim() == 3;
  const int64_t P = theta3 ? theta.size(0) : 1;
  g.num_protos = P;

  if (proto_index.has_value()) {
    const at::Tensor& idx = *proto_index;
    TORCH_CHECK(theta3, "pyeditor: proto_index needs theta as a [P, R, C] prototype stack, got shape ",
                theta.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kLong, "pyeditor: proto_index must be int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1, "pyeditor: proto_index must be 1-D [B], got shape ", idx.sizes());
    TORCH_CHECK(idx.device() == theta.device(), "pyeditor: proto_index is on ", idx.device(), ", theta on ",
                theta.device());
    g.samples = idx.size(0);
    TORCH_CHECK(!delta3 || delta.size(0) == g.samples, "pyeditor: delta has ", delta.size(0),
                " samples but proto_index has ", g.samples);
    TORCH_CHECK(P > 0 || g.samples == 0, "pyeditor: proto_index given but theta holds no prototypes");
    a.proto_index = idx.contiguous();
  } else {
    const int64_t B = delta3 ? delta.size(0) : 1;
    if (theta3 && delta3) {
      TORCH_CHECK(P == B || P == 1 || B == 1, "pyeditor: theta has ", P, " matrices and delta ", B,
                  "; without proto_index they must match (or one of them be 1)");
    }
    g.samples = theta3 ? (delta3 ? std::max(P, B) : P) : B;
    g.theta_per_sample = theta3 && P != 1;  // a single matrix is broadcast over samples
  }
  const bool batched = theta3 || delta3;
  g.theta = strides_of(theta, true);
  if (!g.theta_per_sample && !proto_index.has_value()) g.theta.sample = 0;
  g.delta = strides_of(delta, true);
  if (delta3 && delta.size(0) == 1) g.delta.sample = 0;
  a.out_shape = batched ? std::vector<int64_t>{g.samples, rows, cols} : std::vector<int64_t>{rows, cols};
  a.threshold = threshold_for(threshold, g.samples, batched, acc_type(theta.scalar_type()), &g.thr_stride);
  return a;
}

EditArgs prepare_edit_grad(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold) {
  TORCH_CHECK(grad.dim() == 2 || grad.dim() == 3, "pyeditor: grad must be [R, C] or [B, R, C], got shape ",
              grad.sizes());
  TORCH_CHECK(delta.dim() == 2 || delta.dim() == grad.dim(), "pyeditor: delta shape ", delta.sizes(),
              " does not fit grad shape ", grad.sizes());
  TORCH_CHECK(delta.size(-1) == grad.size(-1) && delta.size(-2) == grad.size(-2) &&
                  (delta.dim() == 2 || delta.size(0) == grad.size(0)),
              "pyeditor: delta shape ", delta.sizes(), " does not fit grad shape ", grad.sizes());
  TORCH_CHECK(is_edit_dtype(grad.scalar_type()) && delta.scalar_type() == grad.scalar_type(),
              "pyeditor: grad and delta must share a floating dtype, got ", grad.scalar_type(), " and ",
              delta.scalar_type());
  TORCH_CHECK(delta.device() == grad.device() && threshold.device() == grad.device(),
              "pyeditor: grad, delta and threshold must be on one device");
  // The incoming gradient takes theta's place in the geometry: one slice per sample.
  EditArgs a;
  pe::EditGeometry& g = a.geometry;
  const bool batched = grad.dim() == 3;
  g.samples = batched ? grad.size(0) : 1;
  g.rows = grad.size(-2);
  g.cols = grad.size(-1);
  g.num_protos = g.samples;
  g.theta_per_sample = true;
  g.theta = strides_of(grad, true);
  g.delta = strides_of(delta, true);
  a.out_shape = grad.sizes().vec();
  a.threshold = threshold_for(threshold, g.samples, batched, acc_type(grad.scalar_type()), &g.thr_stride);
  return a;
}

at::Tensor edit_output(const EditArgs& args, const at::Tensor& like, const at::Tensor* out) {
  at::Tensor result;
  if (out == nullptr) {
    result = at::empty(args.out_shape, like.options());
  } else {
    result = *out;
    TORCH_CHECK(result.sizes().vec() == args.out_shape, "pyeditor: out has shape ", result.sizes(),
                ", expected ", at::IntArrayRef(args.out_shape));
    TORCH_CHECK(result.scalar_type() == like.scalar_type(), "pyeditor: out dtype ", result.scalar_type(),
                " does not match ", like.scalar_type());
    TORCH_CHECK(result.device() == like.device(), "pyeditor: out is on ", result.device(), ", inputs on ",
                like.device());
    at::assert_no_internal_overlap(result);
  }
  return result;
}

namespace {
// Whether the byte ranges a and b span in one storage meet (ATen's overlap test gives up on
// non-dense views and lets them through).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t span = 0;
    for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * std::abs(t.stride(d));
    const char* p = static_cast<const char*>(t.const_data_ptr());
    return std::pair{p, p + (span + 1) * t.element_size()};
  };
  const auto [alo, ahi] = extent(a);
  const auto [blo, bhi] = extent(b);
  return alo < bhi && blo < ahi;
}
}  // namespace

EditArgs prepare_edit_out(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index, const at::Tensor& out) {
  EditArgs args = prepare_edit(theta, delta, threshold, proto_index);
  edit_output(args, theta, &out);
  at::assert_no_partial_overlap(out, theta);
  at::assert_no_partial_overlap(out, delta);
  // out may be theta itself (no index: each element reads only its own place) or delta itself;
  // any other sharing would read values already overwritten
  TORCH_CHECK(!(proto_index.has_value() && proto_index->defined() && overlaps(out, theta)),
              "pyeditor: out is theta itself, but with proto_index a sample may read a prototype another sample "
              "has already overwritten; pass a separate buffer");
  TORCH_CHECK(!overlaps(out, threshold), "pyeditor: out overlaps threshold: the kernel would read values it has "
              "already overwritten; pass a separate buffer");
  TORCH_CHECK(!(proto_index.has_value() && proto_index->defined() && overlaps(out, *proto_index)),
              "pyeditor: out overlaps proto_index; pass a separate buffer");
  return args;
}

void check_threshold_values(const at::Tensor& t) {
  // t is contiguous float or double (prepare_edit made it so); read it directly, no ATen ops
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pyeditor_check_threshold", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0, "pyeditor: threshold must be >= 0 and not NaN, got ", p[i]);  // NaN fails too
    }
  });
}

void check_index_values(const at::Tensor& idx, int64_t num_protos, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < num_protos, "pyeditor: ", name, "[", i, "] = ", p[i],
                " is out of range for ", num_protos, " prototypes");
  }
}

}  // namespace pyeditor
