// CPU (ATen) wrappers of the edit ops: checks, then a parallel loop over row blocks whose
// contiguous runs go to the SIMD span functions and whose strided runs use the same math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../aten_storage.h"
#include "../edit_args.h"
#include "../ops.h"
#include "pyeditor/cpu_spans.h"
#include "pyeditor/edit_math.h"
#include "huge_pages.h"

namespace pyeditor {
namespace {

using cpu::advise_huge_pages;

constexpr int64_t kColBlock = 16384;    // elements per work item along a row
constexpr int64_t kGrainElems = 65536;  // at least this many elements per thread task

// Runs `span(a_ptr, delta_ptr, out_ptr, n, t)` over every sample / row / column block of the
// geometry, in parallel. `a` is theta (or the incoming gradient for the backward).
template <class S, class Span>
void for_each_span(const pe::EditGeometry& g0, const S* a, const S* delta, S* out, const pe::acc_t<S>* thr,
                   const int64_t* proto_index, Span span) {
  const pe::EditGeometry g = pe::flatten_dense(g0);
  const bool unit = g.theta.col == 1 && g.delta.col == 1 && g.out.col == 1;
  const int64_t items = pe::span_items(g, kColBlock);
  if (items == 0 || g.cols == 0) return;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(g.cols, kColBlock));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const pe::SpanItem s = pe::span_item(g, it, kColBlock);
      const int64_t slot = pe::theta_slot(g, proto_index, s.sample);
      const S* ap = a + slot * g.theta.sample + s.row * g.theta.row + s.col0 * g.theta.col;
      const S* dp = delta + s.sample * g.delta.sample + s.row * g.delta.row + s.col0 * g.delta.col;
      S* op = out + s.sample * g.out.sample + s.row * g.out.row + s.col0 * g.out.col;
      const pe::acc_t<S> t = thr[s.sample * g.thr_stride];
      if (unit) {
        span(ap, dp, op, s.len, t);
      } else {
        for (int64_t i = 0; i < s.len; ++i) span(ap + i * g.theta.col, dp + i * g.delta.col, op + i * g.out.col, 1, t);
      }
    }
  });
}

template <bool kGrad>
void run_cpu(const EditArgs& args, const at::Tensor& a, const at::Tensor& delta, at::Tensor& out) {
  pe::EditGeometry g = args.geometry;
  const int64_t d = out.dim();
  g.out = {d == 3 ? out.stride(0) : 0, out.stride(d - 2), out.stride(d - 1)};
  check_threshold_values(args.threshold);
  const int64_t* idx = nullptr;
  if (args.proto_index.defined()) {
    check_index_values(args.proto_index, g.num_protos);
    idx = args.proto_index.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pyeditor_edit_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    using A = pe::acc_t<S>;
    const auto* ap = reinterpret_cast<const S*>(a.const_data_ptr<scalar_t>());
    const auto* dp = reinterpret_cast<const S*>(delta.const_data_ptr<scalar_t>());
    auto* op = reinterpret_cast<S*>(out.mutable_data_ptr<scalar_t>());
    const A* thr = args.threshold.const_data_ptr<A>();
    // the variant picked at load (cpu_spans.h), fetched once: strided runs call it per element
    const pe::cpu::SpanFns<S> fns = pe::cpu::spans<S>();
    const auto fn = kGrad ? fns.grad : fns.add;
    auto span = [fn](const S* x, const S* dl, S* o, int64_t n, A t) { fn(x, dl, o, n, t); };
    for_each_span<S>(g, ap, dp, op, thr, idx, span);
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pyeditor: ", name, " must be a CPU tensor here, got ", t.device());
}

}  // namespace

at::Tensor apply_edit_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index) {
  check_cpu(theta, "theta");
  EditArgs args = prepare_edit(theta, delta, threshold, proto_index);
  at::Tensor out = edit_output(args, theta, nullptr);
  advise_huge_pages(out);
  run_cpu<false>(args, theta, delta, out);
  return out;
}

void apply_edit_out_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& proto_index, at::Tensor out) {
  check_cpu(theta, "theta");
  EditArgs args = prepare_edit_out(theta, delta, threshold, proto_index, out);
  run_cpu<false>(args, theta, delta, out);
}

at::Tensor apply_edit_backward_cpu(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold) {
  check_cpu(grad, "grad");
  EditArgs args = prepare_edit_grad(grad, delta, threshold);
  at::Tensor out = edit_output(args, grad, nullptr);
  advise_huge_pages(out);
  run_cpu<true>(args, grad, delta, out);
  return out;
}

}  // namespace pyeditor
