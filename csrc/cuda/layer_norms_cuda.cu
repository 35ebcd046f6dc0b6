// CUDA kernel of edit_norms_layers: one thread per (sample, prototype) pair runs every kept layer
// through layer_norms.h's per-pair sum of squares and folds it by the rule, so the output [B, P]
// is the only tensor written. Layers go in by value, kLayerChunk per launch; with more layers the
// running state waits in the output between launches. Every layer goes directly (a given gram is
// checked, not read: the Gram form is the CPU's way around FLOPs). Launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../aten_storage.h"
#include "../layer_norms_args.h"
#include "../layer_norms.h"
#include "pyeditor/layer_norms.h"

namespace pyeditor {
namespace {

constexpr int kLayerChunk = 16;  // kernel parameters stay well under the 4 KiB limit
constexpr int kThreads = 128;

template <class S> struct LayerChunk {
  int count;
  pe::LayerOperands<S> layer[kLayerChunk];
};

template <class S>
__global__ void layer_norms_kernel(LayerChunk<S> chunk, int64_t dim, int64_t batch, int64_t protos, int rule,
                                   const double* thr, int64_t thr_stride, double* out, bool first, bool last) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * protos) return;
  const int64_t b = i / protos, p = i % protos;
  const bool clipped = thr != nullptr;
  const double t = clipped ? thr[b * thr_stride] : 0.0;
  double state = first ? 0.0 : out[i];
  for (int c = 0; c < chunk.count; ++c)
    state = pe::combine_layer(state, pe::layer_sumsq(chunk.layer[c], dim, b, p, clipped, t), rule,
                              chunk.layer[c].weight);
  out[i] = last ? pe::finish_layers(state, rule) : state;
}

}  // namespace

at::Tensor edit_norms_layers_cuda(const at::Tensor& e, at::TensorList weights,
                                  const c10::List<c10::optional<at::Tensor>>& biases,
                                  const c10::optional<at::Tensor>& threshold, c10::string_view rule,
                                  c10::optional<at::ArrayRef<double>> layer_weights, const c10::optional<at::Tensor>& gram) {
  const c10::cuda::CUDAGuard guard(e.device());
  const LayerNormsArgs a = prepare_layer_norms(e, weights, biases, threshold, rule, layer_weights, gram);
  at::Tensor out = at::empty({a.batch, a.protos}, e.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  const double* thr = a.threshold.defined() ? a.threshold.const_data_ptr<double>() : nullptr;
  const int64_t thr_stride = a.threshold.defined() && a.threshold.numel() > 1 ? 1 : 0;
  const int64_t pairs = a.batch * a.protos;
  const dim3 grid(static_cast<unsigned>(pe::ceil_div(pairs, kThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_edit_norms_layers_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    const int64_t kept = static_cast<int64_t>(a.kept.size());
    for (int64_t c0 = 0; c0 < kept; c0 += kLayerChunk) {
      LayerChunk<S> chunk{};
      chunk.count = static_cast<int>(std::min<int64_t>(kLayerChunk, kept - c0));
      for (int c = 0; c < chunk.count; ++c) {
        const int64_t l = a.kept[c0 + c];
        const at::Tensor& w = weights[l];
        const c10::optional<at::Tensor> b = biases.get(l);
        chunk.layer[c] = {reinterpret_cast<const S*>(e.const_data_ptr()) + l * e.stride(0), e.stride(1), e.stride(2),
                          reinterpret_cast<const S*>(w.const_data_ptr()), w.stride(0), w.stride(1), w.stride(2),
                          b.has_value() ? reinterpret_cast<const S*>(b->const_data_ptr()) : nullptr,
                          b.has_value() ? b->stride(0) : 0, b.has_value() ? b->stride(1) : 0, w.size(2), a.lam[l]};
      }
      layer_norms_kernel<S><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          chunk, a.dim, a.batch, a.protos, a.rule, thr, thr_stride, out.data_ptr<double>(), c0 == 0,
          c0 + kLayerChunk >= kept);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace pyeditor
