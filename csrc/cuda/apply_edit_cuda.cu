// CUDA wrappers of the edit ops: one block per span item (a run of one row of one sample),
// the element math from edit_math.h, launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../aten_storage.h"
#include "../edit_args.h"
#include "../ops.h"
#include "pyeditor/edit_math.h"

namespace pyeditor {
namespace {

constexpr int64_t kColBlock = 4096;
constexpr int kThreads = 256;

template <class S, bool kGrad>
__global__ void edit_kernel(pe::EditGeometry g, const S* a, const S* delta, S* out, const pe::acc_t<S>* thr,
                            const int64_t* proto_index, int64_t items) {
  for (int64_t it = blockIdx.x; it < items; it += gridDim.x) {
    const pe::SpanItem s = pe::span_item(g, it, kColBlock);
    const int64_t slot = pe::theta_slot(g, proto_index, s.sample);
    if (!pe::slot_in_range(g, slot)) {
      CUDA_KERNEL_ASSERT(false && "pyeditor: proto_index out of range");
      continue;  // never read outside theta
    }
    const pe::acc_t<S> t = thr[s.sample * g.thr_stride];
    const S* ap = a + slot * g.theta.sample + s.row * g.theta.row + s.col0 * g.theta.col;
    const S* dp = delta + s.sample * g.delta.sample + s.row * g.delta.row + s.col0 * g.delta.col;
    S* op = out + s.sample * g.out.sample + s.row * g.out.row + s.col0 * g.out.col;
    for (int64_t i = threadIdx.x; i < s.len; i += blockDim.x) {
      const auto av = pe::load(ap + i * g.theta.col), dv = pe::load(dp + i * g.delta.col);
      pe::store(op + i * g.out.col, kGrad ? pe::clip_grad(av, dv, t) : pe::clip_add(dv, av, t));
    }
  }
}

template <bool kGrad>
void run_cuda(const EditArgs& args, const at::Tensor& a, const at::Tensor& delta, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  pe::EditGeometry g = args.geometry;
  const int64_t d = out.dim();
  g.out = {d == 3 ? out.stride(0) : 0, out.stride(d - 2), out.stride(d - 1)};
  g = pe::flatten_dense(g);
  const int64_t items = pe::span_items(g, kColBlock);
  if (items == 0 || g.cols == 0) return;
  const int64_t* idx = args.proto_index.defined() ? args.proto_index.const_data_ptr<int64_t>() : nullptr;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(items, 1 << 20));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pyeditor_edit_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    edit_kernel<S, kGrad><<<blocks, kThreads, 0, stream>>>(
        g, reinterpret_cast<const S*>(a.const_data_ptr<scalar_t>()),
        reinterpret_cast<const S*>(delta.const_data_ptr<scalar_t>()),
        reinterpret_cast<S*>(out.mutable_data_ptr<scalar_t>()), args.threshold.const_data_ptr<pe::acc_t<S>>(), idx,
        items);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor apply_edit_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                           const c10::optional<at::Tensor>& proto_index) {
  EditArgs args = prepare_edit(theta, delta, threshold, proto_index);
  at::Tensor out = edit_output(args, theta, nullptr);
  run_cuda<false>(args, theta, delta, out);
  return out;
}

void apply_edit_out_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& proto_index, at::Tensor out) {
  EditArgs args = prepare_edit_out(theta, delta, threshold, proto_index, out);
  run_cuda<false>(args, theta, delta, out);
}

at::Tensor apply_edit_backward_cuda(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold) {
  EditArgs args = prepare_edit_grad(grad, delta, threshold);
  at::Tensor out = edit_output(args, grad, nullptr);
  run_cuda<true>(args, grad, delta, out);
  return out;
}

}  // namespace pyeditor
