// CUDA wrappers of the packed low-bit ops: one launch per width bucket, one block per
// (16-channel tile, 16 activation rows), one thread per (channel, row); codes decoded with the
// shared pack.h codec; launched on the current stream. Activations stay in their float type;
// the fast (int8) mode of the CPU backend is not implemented here (fast is ignored: exact).
// Group-wise scales (group_size 32, 64, 128): scale/zero are [groups, rows] group-major, entry
// (i / group_size) * rows + row for input i; group_size 0 is one group of all k inputs, entry row.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "../quant_args.h"
#include "pyeditor/pack.h"

namespace pyeditor {
namespace {
namespace q = pe::quant;

template <class T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

// Inputs per scale entry: group_size, or all k (one scale per packed row; 0 when k is 0).
__device__ __forceinline__ int64_t inputs_per_scale(int64_t k, int64_t group_size) {
  return group_size > 0 ? group_size : k;
}

template <class T>
__global__ void quant_linear_kernel(const T* x, const uint8_t* data, const float* scale, const uint8_t* zero,
                                    q::PermView perm, const float* bias, T* y, q::Bucket b, int64_t m,
                                    int64_t k, int64_t n, int64_t rows, int64_t group_size) {
  using A = typename acc_type<T>::type;
  const int c = threadIdx.x;
  const int64_t tile = blockIdx.x, r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t row = b.row_start + tile * q::kTileN + c;
  if (r >= m) return;
  const int32_t col = perm[row];
  if (col < 0 || col >= n) return;  // padding row (the host checks perm on CPU tensors only)
  const uint8_t* t = data + b.byte_offset + tile * q::tile_bytes(b.bits, k);
  const T* xr = x + r * k;
  const int64_t gs = inputs_per_scale(k, group_size);
  // per group: the sum of (q - z_g) x (an exact small integer times x: a code at its zero point
  // adds nothing, as in the reference), then v += s_g * acc with entry g * rows + row
  A v = 0;
  for (int64_t i0 = 0, g = 0; i0 < k; i0 += gs, ++g) {
    const int64_t i1 = i0 + gs < k ? i0 + gs : k;
    const int64_t e = g * rows + row;
    const int z = zero[e];
    A acc = 0;
    for (int64_t i = i0; i < i1; ++i)
      acc += static_cast<A>(static_cast<int>(q::get_code(t + (i / q::kTileK) * q::block_bytes(b.bits),
                                                         static_cast<int>(b.bits), c, static_cast<int>(i % q::kTileK))) -
                            z) *
             static_cast<A>(xr[i]);
    const A term = static_cast<A>(scale[e]) * acc;
    v = g == 0 ? term : v + term;
  }
  if (!isfinite(v)) {
    // an overflowing sum (or an inf input) where the reference's sum of ((q - z) * s) * x may stay
    // finite or give another inf: redo it in that order
    v = 0;
    for (int64_t i = 0; i < k; ++i) {
      const unsigned code = q::get_code(t + (i / q::kTileK) * q::block_bytes(b.bits), static_cast<int>(b.bits), c,
                                        static_cast<int>(i % q::kTileK));
      const int64_t e = (i / gs) * rows + row;  // the input's group
      v += static_cast<A>(q::dequant(code, zero[e], scale[e])) * static_cast<A>(xr[i]);
    }
  }
  if (bias) v += static_cast<A>(bias[col]);
  y[r * n + col] = static_cast<T>(v);
}

__global__ void quant_dequantize_kernel(const uint8_t* data, const float* scale, const uint8_t* zero,
                                        q::PermView perm, float* w, q::Bucket b, int64_t k, int64_t n,
                                        int64_t rows, int64_t group_size) {
  const int c = threadIdx.x;
  const int64_t tile = blockIdx.x, row = b.row_start + tile * q::kTileN + c;
  const int32_t col = perm[row];
  if (col < 0 || col >= n) return;
  const uint8_t* t = data + b.byte_offset + tile * q::tile_bytes(b.bits, k);
  const int64_t gs = inputs_per_scale(k, group_size);
  for (int64_t i = threadIdx.y; i < k; i += blockDim.y) {
    const unsigned code = q::get_code(t + (i / q::kTileK) * q::block_bytes(b.bits), static_cast<int>(b.bits), c,
                                      static_cast<int>(i % q::kTileK));
    const int64_t e = (i / gs) * rows + row;  // the input's group
    w[static_cast<int64_t>(col) * k + i] = q::dequant(code, zero[e], scale[e]);
  }
}

}  // namespace

at::Tensor quant_dequantize_cuda(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                                 const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                                 int64_t out_features, int64_t group_size) {
  const PackedArgs a = check_packed(data, scale, zero, perm, buckets, in_features, out_features, group_size);
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor w = at::zeros({a.n, a.k}, data.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& b : a.buckets) {
    if (b.rows == 0 || a.k == 0) continue;
    quant_dequantize_kernel<<<dim3(b.rows / q::kTileN), dim3(q::kTileN, 16), 0, stream>>>(
        data.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(), zero.const_data_ptr<uint8_t>(),
        perm_view(perm), w.mutable_data_ptr<float>(), b, a.k, a.n, a.rows, a.group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return w;
}

at::Tensor quant_linear_cuda(const at::Tensor& x_in, const at::Tensor& data, const at::Tensor& scale,
                             const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                             int64_t in_features, int64_t out_features, const c10::optional<at::Tensor>& bias,
                             bool fast, int64_t group_size, bool bf16) {
  const PackedArgs a = check_packed(data, scale, zero, perm, buckets, in_features, out_features, group_size);
  check_linear_inputs(a, x_in, bias, data);
  // int8 activations are a CPU kernel: fast computes exact mode here, within that mode's bound
  const at::Tensor x = mode_activations(x_in, fast, bf16);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), a.k}).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::zeros({m, a.n}, x.options());
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyeditor_quant_linear_cuda", [&] {
      for (const auto& b : a.buckets) {
        if (b.rows == 0) continue;
        const dim3 grid(b.rows / q::kTileN, (m + 15) / 16);
        quant_linear_kernel<scalar_t><<<grid, dim3(q::kTileN, 16), 0, stream>>>(
            x2.const_data_ptr<scalar_t>(), data.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(),
            zero.const_data_ptr<uint8_t>(), perm_view(perm),
            bf.defined() ? bf.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<scalar_t>(), b, m, a.k, a.n,
            a.rows, a.group_size);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (x.scalar_type() != x_in.scalar_type()) y = y.to(x_in.scalar_type());  // bf16 mode, float16 x
  return y.reshape(linear_out_shape(x, a.n));
}

}  // namespace pyeditor
