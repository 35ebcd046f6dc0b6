// CPU kernel of hyper_weight_grad, the weight gradient of the gathered hyper_matmul (and of
// hyper_matmul_heads): for every prototype p and head l,
//   dW[p][:, columns of l] = e[l, rows of p]^T @ grad[rows of p, columns of l]
// over p's counting-sorted segment only, so the work is d * N * B (not P times that, as a product
// masked by a one-hot of the index would be). One parallel loop over (head, prototype, d block,
// column tile); both operands are gathered through the segment into thread-local tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../aten_storage.h"
#include "../hyper_args.h"
#include "../ops.h"
#include "huge_pages.h"
#include "hyper_cpu.h"
#include "pyeditor/hyper_math.h"
#include "tile_gemm.h"

namespace pyeditor {
namespace {

using cpu::kTileK;
using cpu::kTileM;
using cpu::kTileN;

template <class S>
void weight_grad_kernel(const HyperArgs& g, const at::Tensor& e, const at::Tensor& grad, at::Tensor& out) {
  using A = pe::acc_t<S>;
  struct Item { int64_t head, p, d0, j0; };
  const cpu::Groups gr = cpu::make_groups(g);
  const int64_t L = static_cast<int64_t>(g.heads.size()) - 1;
  std::vector<Item> items;
  for (int64_t p = 0; p < g.protos; ++p)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t d0 = 0; d0 < g.dim; d0 += kTileM)
        for (int64_t j0 = g.heads[l]; j0 < g.heads[l + 1]; j0 += kTileN) items.push_back({l, p, d0, j0});
  const S* ep = cpu::cptr<S>(e);
  const S* gp = cpu::cptr<S>(grad);
  S* op = cpu::mptr<S>(out);
  const int64_t es0 = e.stride(0), es1 = e.stride(1), es2 = e.stride(2), gs0 = grad.stride(0), gs1 = grad.stride(1);
  const int64_t per_thread = kTileM * kTileK + kTileK * kTileN + kTileM * kTileN;
  const cpu::Scratch<A> scratch(per_thread);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    A* a = scratch.get();  // [dm][kc]: e^T of the segment's rows
    A* tile = a + kTileM * kTileK;  // [kc][kTileN]: the segment's rows of grad
    A* acc = tile + kTileK * kTileN;
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t dm = std::min(kTileM, g.dim - item.d0);
      const int64_t nc = std::min(kTileN, g.heads[item.head + 1] - item.j0);
      const int64_t m = gr.size(item.p);
      const S* eh = ep + item.head * es0 + item.d0 * es2;
      std::fill(acc, acc + dm * kTileN, A(0));
      for (int64_t k0 = 0; k0 < m; k0 += kTileK) {
        const int64_t kc = std::min(kTileK, m - k0);
        for (int64_t k = 0; k < kc; ++k) {
          const int64_t row = gr.row(item.p, k0 + k);
          const S* er = eh + row * es1;
          for (int64_t r = 0; r < dm; ++r) a[r * kc + k] = static_cast<A>(pe::load(er + r * es2));
          const S* gr_row = gp + row * gs0 + item.j0 * gs1;
          A* t = tile + k * kTileN;
          for (int64_t j = 0; j < nc; ++j) t[j] = static_cast<A>(pe::load(gr_row + j * gs1));
          std::fill(t + nc, t + kTileN, A(0));
        }
        cpu::tile_gemm(a, dm, kc, tile, acc);
      }
      for (int64_t r = 0; r < dm; ++r) {
        S* o = op + item.p * out.stride(0) + (item.d0 + r) * out.stride(1) + item.j0 * out.stride(2);
        for (int64_t j = 0; j < nc; ++j) pe::store(o + j * out.stride(2), acc[r * kTileN + j]);
      }
    }
  });
}

}  // namespace

at::Tensor hyper_weight_grad_cpu(const at::Tensor& e, const at::Tensor& grad, at::IntArrayRef sizes,
                                 const at::Tensor& index, int64_t protos) {
  TORCH_CHECK(e.device().is_cpu(), "pyeditor: e must be a CPU tensor here, got ", e.device());
  const HyperArgs g = prepare_weight_grad(e, grad, sizes, index, protos);
  at::Tensor out = at::empty({g.protos, g.dim, g.width}, grad.options());
  if (out.numel() == 0) return out;
  cpu::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_hyper_weight_grad_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    weight_grad_kernel<S>(g, e, grad, out);
  });
  return out;
}

}  // namespace pyeditor
