// CUDA nearest-prototype search: one thread per query runs the direct float32 pass of
// search_math.h (the same code the CPU's direct path runs), accepts it or rescans exactly in
// float64, and writes its k results. Launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "../search_args.h"
#include "pyeditor/search_math.h"

namespace pyeditor {
namespace {

namespace ps = pe::search;
constexpr int kThreads = 128;

template <int CAP>
__global__ void search_fast_kernel(const float* x, const float* P, int64_t B, int64_t N, int64_t d, int k, int metric,
                                   float* dist, int64_t* idx) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (q >= B) return;
  const float* xr = x + q * d;
  if (ps::row_finite(xr, d)) {
    ps::TopK<float, CAP> top;
    const ps::Bound b = ps::direct_fast<CAP>(xr, P, d, N, d, k, metric, top);
    const double xn = metric == ps::kCosine ? ps::norm64(xr, d) : 0.0;
    auto exact = [&](int64_t j) { return ps::exact_key(xr, P + j * d, d, metric, xn); };
    if (ps::accept_fast(top, k, b, metric, exact, dist + q * k, idx + q * k)) return;
  }
  ps::exact_query<CAP>(xr, P, d, N, d, k, metric, dist + q * k, idx + q * k);
}

template <int CAP>
__global__ void search_exact_kernel(const double* x, const double* P, int64_t B, int64_t N, int64_t d, int k,
                                    int metric, double* dist, int64_t* idx) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (q >= B) return;
  ps::exact_query<CAP>(x + q * d, P, d, N, d, k, metric, dist + q * k, idx + q * k);
}

template <int CAP>
void launch(const at::Tensor& x, const at::Tensor& P, int k, int metric, at::Tensor& dist, at::Tensor& idx,
            bool wide) {
  const int64_t B = x.size(0), N = P.size(0), d = x.size(1);
  const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (wide) {
    search_exact_kernel<CAP><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<double>(), P.const_data_ptr<double>(),
                                                              B, N, d, k, metric, dist.mutable_data_ptr<double>(),
                                                              idx.mutable_data_ptr<int64_t>());
  } else {
    search_fast_kernel<CAP><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<float>(), P.const_data_ptr<float>(), B,
                                                             N, d, k, metric, dist.mutable_data_ptr<float>(),
                                                             idx.mutable_data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_prototype_cuda(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                         c10::string_view metric_name) {
  TORCH_CHECK(x.is_cuda() && prototypes.device() == x.device(), "pyeditor: x and prototypes must be on one GPU");
  const SearchArgs args = check_search(x, prototypes, k, metric_name);
  TORCH_CHECK(k <= ps::kMaxK, "pyeditor: the cuda backend supports k <= ", ps::kMaxK, ", got ", k);
  const int64_t B = args.batch;
  const int metric = args.metric;
  const c10::cuda::CUDAGuard guard(x.device());
  const bool wide = x.scalar_type() == at::kDouble || prototypes.scalar_type() == at::kDouble;
  const auto t = wide ? at::kDouble : at::kFloat;
  at::Tensor xc = x.to(t).contiguous(), pc = prototypes.to(t).contiguous();
  at::Tensor dist = at::empty({B, k}, x.options().dtype(t));
  at::Tensor idx = at::empty({B, k}, x.options().dtype(at::kLong));
  if (B > 0) {
    const int kk = static_cast<int>(k);
    if (kk + 1 <= 2) launch<2>(xc, pc, kk, metric, dist, idx, wide);
    else if (kk + 1 <= 8) launch<8>(xc, pc, kk, metric, dist, idx, wide);
    else launch<ps::kMaxK + 1>(xc, pc, kk, metric, dist, idx, wide);
  }
  return {dist.to(x.scalar_type()), idx};
}

}  // namespace pyeditor
