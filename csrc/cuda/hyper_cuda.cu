// CUDA kernels of the Persona serving ops: one shared-memory tiled GEMM whose weight tile is
// edited on the fly (clip(delta) + theta, hyper_math.h) for edited_linear, read plainly for
// hyper_matmul (rows gathered through counting-sorted segments, no per-sample weight copy), and
// whose epilogue either stores or reduces clipped squares (edit_sumsq: no [P, B, n] tensor).
// hyper_matmul_heads runs every head in one launch over a head-tile table; hyper_weight_grad sums
// e^T grad over each prototype's segment only. Launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "../aten_storage.h"
#include "../hyper_args.h"
#include "../ops.h"
#include "pyeditor/hyper_math.h"

namespace pyeditor {
namespace {

constexpr int kT = 16;

// Where every operand of one tiled product lives (element strides). A group is a sample
// (edited_linear) or a prototype (hyper_matmul / edit_sumsq).
struct TileArgs {
  int64_t groups, rows, inner, cols;
  const int64_t* offsets;  // gathered rows of group p: sorted[offsets[p] .. offsets[p+1]), or null
  const int64_t* sorted;
  const int64_t* slot_index;  // edited_linear's proto_index, or null
  bool per_group;             // without slot_index: group g reads weight g (else weight 0)
  int64_t a_gs, a_rs, a_ks, w_gs, w_ks, w_ns, d_gs, d_ks, d_ns, b_gs, b_ns, o_gs, o_rs, o_ns;
  int64_t thr_stride;
  bool thr_per_row;  // edit_sumsq: T of the row's sample; edited_linear: T of the group's sample
  int64_t col_tiles_per_block;
  // hyper_matmul_heads: column tiles from a head table (3 per tile: head, first, end column,
  // pe::head_tiles); head h reads a + h * a_hs. Null: kT-wide tiles of the whole width, head 0.
  const int64_t* tiles = nullptr;
  int64_t n_tiles = 0, a_hs = 0;
};

template <class S, bool kEdited, bool kSumsq>
__global__ void tile_kernel(TileArgs g, const S* a, const S* w, const S* delta, const S* bias, S* out,
                            const pe::acc_t<S>* thr, double* partial) {
  using A = pe::acc_t<S>;
  __shared__ A as[kT][kT + 1];
  __shared__ A bs[kT][kT + 1];
  __shared__ double red[kT][kT + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col_tiles = g.tiles ? g.n_tiles : pe::ceil_div(g.cols, kT);
  for (int64_t grp = blockIdx.z; grp < g.groups; grp += gridDim.z) {
    const int64_t count = g.offsets ? g.offsets[grp + 1] - g.offsets[grp] : g.rows;
    const int64_t local = blockIdx.y * int64_t(kT) + ty;
    if (blockIdx.y * int64_t(kT) >= count) continue;  // uniform over the block
    const bool valid = local < count;
    const int64_t row = !valid ? 0 : (g.offsets ? g.sorted[g.offsets[grp] + local] : local);
    const int64_t slot = pe::sample_slot(g.slot_index, g.per_group, grp);
    const A t = thr ? thr[(g.thr_per_row ? row : grp) * g.thr_stride] : A(0);
    const S* wg = w + slot * g.w_gs;
    double sq = 0;
    const int64_t ct0 = blockIdx.x * g.col_tiles_per_block;
    const int64_t ct1 = ct0 + g.col_tiles_per_block < col_tiles ? ct0 + g.col_tiles_per_block : col_tiles;
    for (int64_t ct = ct0; ct < ct1; ++ct) {
      const int64_t head = g.tiles ? g.tiles[3 * ct] : 0;
      const int64_t n = (g.tiles ? g.tiles[3 * ct + 1] : ct * kT) + tx;
      const int64_t n_end = g.tiles ? g.tiles[3 * ct + 2] : g.cols;
      const S* ar = a + grp * g.a_gs + head * g.a_hs + row * g.a_rs;
      A acc = 0;
      for (int64_t k0 = 0; k0 < g.inner; k0 += kT) {
        as[ty][tx] = (valid && k0 + tx < g.inner) ? A(pe::load(ar + (k0 + tx) * g.a_ks)) : A(0);
        const int64_t kk = k0 + ty;
        A wv = 0;
        if (kk < g.inner && n < n_end) {
          if constexpr (kEdited) {
            wv = pe::edited_weight<S, A>(delta + grp * g.d_gs + kk * g.d_ks + n * g.d_ns, wg + kk * g.w_ks + n * g.w_ns, t);
          } else {
            wv = A(pe::load(wg + kk * g.w_ks + n * g.w_ns));
          }
        }
        bs[ty][tx] = wv;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kT; ++k) acc += as[ty][k] * bs[k][tx];
        __syncthreads();
      }
      if (valid && n < n_end) {
        const A v = acc + (bias ? A(pe::load(bias + slot * g.b_gs + n * g.b_ns)) : A(0));
        if constexpr (kSumsq) {
          sq += pe::clipped_square<A>(v, thr != nullptr, t);
        } else {
          pe::store(out + grp * g.o_gs + row * g.o_rs + n * g.o_ns, v);
        }
      }
    }
    if constexpr (kSumsq) {
      red[ty][tx] = sq;
      __syncthreads();
      if (tx == 0 && valid) {
        double s = 0;
        for (int k = 0; k < kT; ++k) s += red[ty][k];
        partial[blockIdx.x * g.rows * g.groups + row * g.groups + grp] = s;
      }
      __syncthreads();
    }
  }
}

template <class S, bool kEdited, bool kSumsq>
void launch(const TileArgs& g, int64_t max_rows, const at::Tensor& a, const at::Tensor& w, const at::Tensor* delta,
            const at::Tensor* bias, at::Tensor* out, const at::Tensor& thr, double* partial, int64_t col_blocks) {
  using A = pe::acc_t<S>;
  const dim3 block(kT, kT);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::max<int64_t>(1, pe::ceil_div(max_rows, kT))),
                  static_cast<unsigned>(std::min<int64_t>(g.groups, 65535)));
  auto ptr = [](const at::Tensor* t) { return t ? reinterpret_cast<const S*>(t->const_data_ptr()) : nullptr; };
  tile_kernel<S, kEdited, kSumsq><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g, ptr(&a), ptr(&w), ptr(delta), ptr(bias), out ? reinterpret_cast<S*>(out->mutable_data_ptr()) : nullptr,
      thr.defined() ? thr.const_data_ptr<A>() : nullptr, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Counting-sorted segments of a gathered batch, built on the host and copied once.
at::Tensor device_segments(const at::Tensor& index, int64_t protos) {
  const at::Tensor host = index.cpu();
  std::vector<int64_t> buf(protos + 1 + host.numel());
  pe::counting_segments(host.const_data_ptr<int64_t>(), host.numel(), protos, buf.data(), buf.data() + protos + 1);
  return at::from_blob(buf.data(), {static_cast<int64_t>(buf.size())}, at::kLong).to(index.device());
}

}  // namespace

at::Tensor edited_linear_cuda(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,
                              const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& proto_index) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearArgs L = prepare_edited_linear(x, theta, delta, threshold, bias, proto_index);
  at::Tensor y = at::empty({L.batch, L.rows, L.out}, x.options());
  if (y.numel() == 0) return y;
  TileArgs g{L.batch, L.rows, L.in, L.out, nullptr, nullptr,
             L.index.defined() ? L.index.const_data_ptr<int64_t>() : nullptr, L.per_sample,
             x.stride(0), x.stride(1), x.stride(2), L.theta_ss, theta.stride(-2), theta.stride(-1),
             delta.stride(0), delta.stride(1), delta.stride(2), L.bias_ss, L.bias_cs,
             y.stride(0), y.stride(1), y.stride(2), L.thr_stride, false, 1};
  const int64_t col_blocks = pe::ceil_div(L.out, kT);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyeditor_edited_linear_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    launch<S, true, false>(g, L.rows, x, theta, &delta, bias.has_value() ? &*bias : nullptr, &y, L.threshold,
                           nullptr, col_blocks);
  });
  return y;
}

namespace {

// hyper_matmul on e viewed as [L, B, d] (one head: L = 1, no table).
at::Tensor hyper_heads_cuda(const HyperArgs& h, const at::Tensor& e, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  const bool gathered = h.index.defined();
  at::Tensor out = gathered ? at::empty({h.batch, h.width}, e.options()) : at::empty({h.protos, h.batch, h.width}, e.options());
  if (out.numel() == 0) return out;
  at::Tensor seg = gathered ? device_segments(h.index, h.protos) : at::Tensor();
  const int64_t* offsets = gathered ? seg.const_data_ptr<int64_t>() : nullptr;
  const int64_t L = static_cast<int64_t>(h.heads.size()) - 1;
  at::Tensor table;
  int64_t n_tiles = pe::ceil_div(h.width, kT);
  if (L > 1) {  // the head table, built on the host and copied once
    n_tiles = pe::head_tiles(h.heads.data(), L, kT, nullptr);
    std::vector<int64_t> host(3 * n_tiles);
    pe::head_tiles(h.heads.data(), L, kT, host.data());
    table = at::from_blob(host.data(), {3 * n_tiles}, at::kLong).to(e.device());
  }
  TileArgs g{h.protos, h.batch, h.dim, h.width, offsets, gathered ? offsets + h.protos + 1 : nullptr, nullptr, true,
             0, e.stride(1), e.stride(2), weight.stride(0), weight.stride(1), weight.stride(2), 0, 0, 0,
             bias.has_value() ? bias->stride(0) : 0, bias.has_value() ? bias->stride(1) : 0,
             gathered ? 0 : out.stride(0), out.stride(gathered ? 0 : 1), out.stride(-1), 0, false, 1};
  g.tiles = table.defined() ? table.const_data_ptr<int64_t>() : nullptr;
  g.n_tiles = n_tiles;
  g.a_hs = e.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_hyper_matmul_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    launch<S, false, false>(g, h.batch, e, weight, nullptr, bias.has_value() ? &*bias : nullptr, &out, at::Tensor(),
                            nullptr, n_tiles);
  });
  return out;
}

// dW[p][k, n] = sum over p's segment rows r of e[head(n), r, k] * grad[r, n]: a block per
// (column tile, d tile, prototype), looping over the segment in kT-row steps.
struct GradArgs {
  int64_t dim;
  const int64_t *offsets, *sorted, *tiles;
  int64_t e_hs, e_rs, e_ks, g_rs, g_ns, o_ps, o_ks, o_ns;
};

template <class S>
__global__ void weight_grad_kernel(GradArgs g, const S* e, const S* grad, S* out) {
  using A = pe::acc_t<S>;
  __shared__ A es[kT][kT + 1];
  __shared__ A gs[kT][kT + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t head = g.tiles[3 * blockIdx.x], n = g.tiles[3 * blockIdx.x + 1] + tx, n_end = g.tiles[3 * blockIdx.x + 2];
  const int64_t k_row = blockIdx.y * int64_t(kT) + ty;  // this thread's output row (a d index)
  const int64_t k_load = blockIdx.y * int64_t(kT) + tx;  // the d index this thread loads
  const int64_t p = blockIdx.z, start = g.offsets[p], count = g.offsets[p + 1] - start;
  A acc = 0;
  for (int64_t r0 = 0; r0 < count; r0 += kT) {
    const bool in_seg_y = r0 + ty < count;
    // es[r][k] = e[head, row r0+r, k]; gs[r][n] = grad[row r0+r, n]
    const int64_t row_y = in_seg_y ? g.sorted[start + r0 + ty] : 0;
    es[ty][tx] = (in_seg_y && k_load < g.dim) ? A(pe::load(e + head * g.e_hs + row_y * g.e_rs + k_load * g.e_ks)) : A(0);
    gs[ty][tx] = (in_seg_y && n < n_end) ? A(pe::load(grad + row_y * g.g_rs + n * g.g_ns)) : A(0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kT; ++r) acc += es[r][ty] * gs[r][tx];
    __syncthreads();
  }
  if (k_row < g.dim && n < n_end) pe::store(out + p * g.o_ps + k_row * g.o_ks + n * g.o_ns, acc);
}

}  // namespace

at::Tensor hyper_matmul_cuda(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& index) {
  const c10::cuda::CUDAGuard guard(e.device());
  return hyper_heads_cuda(prepare_hyper(e, weight, bias, index), e.unsqueeze(0), weight, bias);
}

at::Tensor hyper_matmul_heads_cuda(const at::Tensor& e, const at::Tensor& weight, at::IntArrayRef sizes,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index) {
  const c10::cuda::CUDAGuard guard(e.device());
  return hyper_heads_cuda(prepare_hyper_heads(e, weight, sizes, bias, index), e, weight, bias);
}

at::Tensor hyper_weight_grad_cuda(const at::Tensor& e, const at::Tensor& grad, at::IntArrayRef sizes,
                                  const at::Tensor& index, int64_t protos) {
  const c10::cuda::CUDAGuard guard(e.device());
  const HyperArgs h = prepare_weight_grad(e, grad, sizes, index, protos);
  at::Tensor out = at::empty({h.protos, h.dim, h.width}, grad.options());
  if (out.numel() == 0) return out;
  const at::Tensor seg = device_segments(h.index, h.protos);
  const int64_t L = static_cast<int64_t>(h.heads.size()) - 1;
  const int64_t n_tiles = pe::head_tiles(h.heads.data(), L, kT, nullptr);
  std::vector<int64_t> host(3 * n_tiles);
  pe::head_tiles(h.heads.data(), L, kT, host.data());
  const at::Tensor table = at::from_blob(host.data(), {3 * n_tiles}, at::kLong).to(e.device());
  const int64_t* offsets = seg.const_data_ptr<int64_t>();
  GradArgs g{h.dim, offsets, offsets + h.protos + 1, table.const_data_ptr<int64_t>(), e.stride(0), e.stride(1),
             e.stride(2), grad.stride(0), grad.stride(1), out.stride(0), out.stride(1), out.stride(2)};
  const dim3 block(kT, kT);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(pe::ceil_div(h.dim, kT)),
                  static_cast<unsigned>(h.protos));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_hyper_weight_grad_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    weight_grad_kernel<S><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g, reinterpret_cast<const S*>(e.const_data_ptr()), reinterpret_cast<const S*>(grad.const_data_ptr()),
        reinterpret_cast<S*>(out.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor edit_sumsq_cuda(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& threshold) {
  const c10::cuda::CUDAGuard guard(e.device());
  const HyperArgs h = prepare_hyper(e, weight, bias, c10::nullopt);
  const at::Tensor thr = prepare_sumsq_threshold(threshold, e, h.batch);
  if (h.batch == 0 || h.protos == 0 || h.width == 0) return at::zeros({h.batch, h.protos}, e.options().dtype(at::kDouble));
  const int64_t col_tiles = pe::ceil_div(h.width, kT);
  const int64_t col_blocks = std::min<int64_t>(col_tiles, 64);
  const int64_t per = pe::ceil_div(col_tiles, col_blocks);
  // one partial [B, P] per column block: blocks never add into the same sum
  at::Tensor partial = at::zeros({col_blocks, h.batch, h.protos}, e.options().dtype(at::kDouble));
  TileArgs g{h.protos, h.batch, h.dim, h.width, nullptr, nullptr, nullptr, true,
             0, e.stride(0), e.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), 0, 0, 0,
             bias.has_value() ? bias->stride(0) : 0, bias.has_value() ? bias->stride(1) : 0, 0, 0, 0,
             thr.defined() && thr.numel() > 1 ? 1 : 0, true, per};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_edit_sumsq_cuda", [&] {
    using S = typename storage_of<scalar_t>::type;
    launch<S, false, true>(g, h.batch, e, weight, nullptr, bias.has_value() ? &*bias : nullptr, nullptr, thr,
                           partial.data_ptr<double>(), pe::ceil_div(col_tiles, per));
  });
  return partial.sum(0);
}

}  // namespace pyeditor
