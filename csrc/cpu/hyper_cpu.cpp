// CPU kernels of the Persona serving ops. All three share one loop shape: a work item is
// (group of rows, 64-column block); for each k-block it packs the rows' inputs and one weight
// tile into thread-local buffers (the tile is edited on the fly for edited_linear), runs the
// tile GEMM, and finishes in an epilogue that writes outputs or reduces squared norms.
// Extra memory is three tiles per thread; K or a [P, B, n] tensor is never formed.
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

using cpu::cptr;
using cpu::Groups;
using cpu::kTileK;
using cpu::kTileM;
using cpu::kTileN;
using cpu::make_groups;
using cpu::mptr;
using cpu::Scratch;

// a[r][k] = src[row(r), k0 + k] for `rows` rows given by `row_of`.
template <class S, class A, class RowOf>
void pack_rows(A* a, const S* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t k0, int64_t kc, RowOf row_of) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* p = src + row_of(r) * s_row + k0 * s_col;
    A* d = a + r * kc;
    if (s_col == 1) {
      for (int64_t k = 0; k < kc; ++k) d[k] = static_cast<A>(pe::load(p + k));
    } else {
      for (int64_t k = 0; k < kc; ++k) d[k] = static_cast<A>(pe::load(p + k * s_col));
    }
  }
}

// tile[k][j] = w[k0 + k, j0 + j] (edited: clip(delta) + theta), zero past nc.
template <bool kEdited, class S, class A>
void pack_tile(A* tile, const S* w, int64_t w_row, int64_t w_col, const S* delta, int64_t d_row, int64_t d_col,
               A t, int64_t k0, int64_t kc, int64_t j0, int64_t nc) {
  for (int64_t k = 0; k < kc; ++k) {
    A* dst = tile + k * kTileN;
    const S* wr = w + (k0 + k) * w_row + j0 * w_col;
    if constexpr (kEdited) {
      const S* dr = delta + (k0 + k) * d_row + j0 * d_col;
      if (w_col == 1 && d_col == 1) {
        for (int64_t j = 0; j < nc; ++j) dst[j] = pe::edited_weight<S, A>(dr + j, wr + j, t);
      } else {
        for (int64_t j = 0; j < nc; ++j) dst[j] = pe::edited_weight<S, A>(dr + j * d_col, wr + j * w_col, t);
      }
    } else {
      if (w_col == 1) {
        for (int64_t j = 0; j < nc; ++j) dst[j] = static_cast<A>(pe::load(wr + j));
      } else {
        for (int64_t j = 0; j < nc; ++j) dst[j] = static_cast<A>(pe::load(wr + j * w_col));
      }
    }
    for (int64_t j = nc; j < kTileN; ++j) dst[j] = A(0);
  }
}

// acc[0:nc] += bias[j * stride] (no-op without a bias): one vectorizable pass before the epilogue.
template <class S, class A> void add_bias(A* acc, const S* bias, int64_t stride, int64_t nc) {
  if (!bias) return;
  if (stride == 1) {
    for (int64_t j = 0; j < nc; ++j) acc[j] += static_cast<A>(pe::load(bias + j));
  } else {
    for (int64_t j = 0; j < nc; ++j) acc[j] += static_cast<A>(pe::load(bias + j * stride));
  }
}

// out[j * stride] = round(acc[j]) for j < nc.
template <class S, class A> void store_row(S* out, int64_t stride, const A* acc, int64_t nc) {
  if (stride == 1) {
    for (int64_t j = 0; j < nc; ++j) pe::store(out + j, acc[j]);
  } else {
    for (int64_t j = 0; j < nc; ++j) pe::store(out + j * stride, acc[j]);
  }
}

// sum_j clip(acc[j], -T, T)^2 in double, over 8 independent lanes so the adds pipeline and
// vectorize (a single running sum would serialize on the add latency).
template <class A> double sum_clipped_squares(const A* acc, int64_t nc, bool clipped, A t) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  if (clipped) {
    for (; j + 8 <= nc; j += 8)
      for (int l = 0; l < 8; ++l) lane[l] += pe::clipped_square<A>(acc[j + l], true, t);
  } else {
    for (; j + 8 <= nc; j += 8)
      for (int l = 0; l < 8; ++l) lane[l] += pe::clipped_square<A>(acc[j + l], false, t);
  }
  for (; j < nc; ++j) lane[0] += pe::clipped_square<A>(acc[j], clipped, t);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// ------------------------------------------------------------------ edited_linear
// A work item is one sample and a group of up to kGroup column tiles: its edited rows are packed
// in one pass over whole contiguous row segments of delta and theta (so the prefetchers stream
// them), then each tile of the group runs the tile GEMM into its own accumulators.
constexpr int64_t kGroup = 8;       // column tiles per item (512 columns)
constexpr int64_t kLinearK = 64;    // rows of the edited weight per pass: the group's tiles = 128 KiB

template <class A> struct LinearBuffers {
  std::vector<A> a, tile, acc;
  LinearBuffers() : a(kTileM * kLinearK), tile(kGroup * kLinearK * kTileN), acc(kGroup * kTileM * kTileN) {}
};

template <class S>
void edited_linear_kernel(const LinearArgs& g, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,
                          const at::Tensor* bias, at::Tensor& y) {
  using A = pe::acc_t<S>;
  const int64_t nj = pe::ceil_div(g.out, kTileN);
  const int64_t groups = pe::ceil_div(nj, kGroup);
  const S* xp = cptr<S>(x);
  const S* tp = cptr<S>(theta);
  const S* dp = cptr<S>(delta);
  const S* bp = bias ? cptr<S>(*bias) : nullptr;
  S* yp = mptr<S>(y);
  const A* thr = g.threshold.const_data_ptr<A>();
  const int64_t* idx = g.index.defined() ? g.index.const_data_ptr<int64_t>() : nullptr;
  const int64_t tr = theta.stride(-2), tc = theta.stride(-1);
  const int64_t ds = delta.stride(0), dr = delta.stride(1), dc = delta.stride(2);
  at::parallel_for(0, g.batch * groups, 1, [&](int64_t begin, int64_t end) {
    LinearBuffers<A> buf;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / groups, jt0 = (it % groups) * kGroup, jts = std::min(kGroup, nj - jt0);
      const int64_t j0 = jt0 * kTileN, width = std::min(jts * kTileN, g.out - j0);
      const int64_t slot = pe::sample_slot(idx, g.per_sample, b);
      const A t = thr[b * g.thr_stride];
      const S* th = tp + slot * g.theta_ss;
      const S* de = dp + b * ds;
      for (int64_t r0 = 0; r0 < g.rows; r0 += kTileM) {
        const int64_t rows = std::min(kTileM, g.rows - r0);
        std::fill(buf.acc.begin(), buf.acc.end(), A(0));
        for (int64_t k0 = 0; k0 < g.in; k0 += kLinearK) {
          const int64_t kc = std::min(kLinearK, g.in - k0);
          pack_rows(buf.a.data(), xp + b * x.stride(0), x.stride(1), x.stride(2), rows, k0, kc,
                    [r0](int64_t r) { return r0 + r; });
          for (int64_t k = 0; k < kc; ++k) {  // row by row: one contiguous run of `width` per row
            for (int64_t q = 0; q < jts; ++q) {
              const int64_t nc = std::min(kTileN, width - q * kTileN);
              pack_tile<true>(buf.tile.data() + (q * kLinearK + k) * kTileN, th, tr, tc, de, dr, dc, t, k0 + k, 1,
                              j0 + q * kTileN, nc);
            }
          }
          for (int64_t q = 0; q < jts; ++q)
            cpu::tile_gemm(buf.a.data(), rows, kc, buf.tile.data() + q * kLinearK * kTileN,
                           buf.acc.data() + q * kTileM * kTileN);
        }
        for (int64_t q = 0; q < jts; ++q) {
          const int64_t jq = j0 + q * kTileN, nc = std::min(kTileN, g.out - jq);
          const S* brow = bp ? bp + slot * g.bias_ss + jq * g.bias_cs : nullptr;
          for (int64_t r = 0; r < rows; ++r) {
            A* acc = buf.acc.data() + (q * kTileM + r) * kTileN;
            add_bias(acc, brow, g.bias_cs, nc);
            store_row(yp + b * y.stride(0) + (r0 + r) * y.stride(1) + jq * y.stride(2), y.stride(2), acc, nc);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------ hyper_matmul / edit_sumsq
// One product e_head[rows of group p] @ W_p[:, columns of the head]: where its operands live.
template <class S> struct HeadView {
  const S* e;
  int64_t e_row, e_col;
  const S* w;  // W_p at the head's first column
  int64_t w_row, w_col, dim, width;
};

// Thread scratch of hyper_tiles, sized to the problem (a small d needs small tiles). When d fits
// one k-block, `group` column tiles are packed together, so that each of the d rows of W_p is read
// as one run of group * kTileN values: as many as keep the packed tiles within kGroupBytes (a
// fraction of a core's L2), since few long runs stream from DRAM faster than many short ones.
constexpr int64_t kGroupBytes = int64_t(128) << 10;
constexpr int64_t kMaxHyperGroup = 16;

template <class A> struct Buffers {
  A *a, *tile, *acc;
  int64_t group;
  static int64_t depth(int64_t dim) { return std::max<int64_t>(1, std::min(dim, kTileK)); }
  static int64_t groups(int64_t dim) {
    const int64_t by_size = kGroupBytes / (depth(dim) * kTileN * int64_t(sizeof(A)));
    return std::max<int64_t>(1, std::min(kMaxHyperGroup, by_size));
  }
  static int64_t size(int64_t dim) {
    return kTileM * depth(dim) + groups(dim) * depth(dim) * kTileN + kTileM * kTileN;
  }
  Buffers(A* base, int64_t dim) : group(groups(dim)) {
    a = base;
    tile = a + kTileM * depth(dim);
    acc = tile + group * depth(dim) * kTileN;
  }
};

// Runs fn(r0, rows, j0, nc) with buf.acc = e[rows of group p, r0..] @ W_p[:, j0:j0+nc] for every
// row block and column tile jb in [jb_begin, jb_end) of the view. When d fits one k-block,
// buf.group tiles are packed together row by row, so each row of W_p is read as one run.
template <class S, class Fn>
void hyper_tiles(const HeadView<S>& v, const Groups& gr, int64_t p, int64_t jb_begin, int64_t jb_end,
                 const Buffers<pe::acc_t<S>>& buf, Fn fn) {
  using A = pe::acc_t<S>;
  const int64_t m = gr.size(p);
  const bool one_k = v.dim <= kTileK;
  for (int64_t r0 = 0; r0 < m; r0 += kTileM) {
    const int64_t rows = std::min(kTileM, m - r0);
    auto row_of = [&gr, p, r0](int64_t r) { return gr.row(p, r0 + r); };
    if (one_k) pack_rows(buf.a, v.e, v.e_row, v.e_col, rows, 0, v.dim, row_of);
    for (int64_t jb = jb_begin; jb < jb_end; jb += buf.group) {
      const int64_t jn = std::min(buf.group, jb_end - jb);
      if (one_k) {
        for (int64_t k = 0; k < v.dim; ++k)
          for (int64_t q = 0; q < jn; ++q) {
            const int64_t j0 = (jb + q) * kTileN;
            pack_tile<false, S, A>(buf.tile + (q * v.dim + k) * kTileN, v.w, v.w_row, v.w_col, nullptr, 0, 0, A(0),
                                   k, 1, j0, std::min(kTileN, v.width - j0));
          }
      }
      for (int64_t q = 0; q < jn; ++q) {
        const int64_t j0 = (jb + q) * kTileN, nc = std::min(kTileN, v.width - j0);
        std::fill(buf.acc, buf.acc + rows * kTileN, A(0));
        if (one_k) {
          cpu::tile_gemm(buf.a, rows, v.dim, buf.tile + q * v.dim * kTileN, buf.acc);
        } else {
          for (int64_t k0 = 0; k0 < v.dim; k0 += kTileK) {
            const int64_t kc = std::min(kTileK, v.dim - k0);
            pack_rows(buf.a, v.e, v.e_row, v.e_col, rows, k0, kc, row_of);
            pack_tile<false, S, A>(buf.tile, v.w, v.w_row, v.w_col, nullptr, 0, 0, A(0), k0, kc, j0, nc);
            cpu::tile_gemm(buf.a, rows, kc, buf.tile, buf.acc);
          }
        }
        fn(r0, rows, j0, nc);
      }
    }
  }
}

// Every head of hyper_matmul_heads (hyper_matmul is the one-head case) in one parallel loop over
// a work table of (head, prototype, run of column tiles), like a grouped GEMM: head l reads
// e[l] and the columns [heads[l], heads[l+1]) of W_p, and writes the same columns of out.
template <class S>
void hyper_matmul_kernel(const HyperArgs& g, const at::Tensor& e, const at::Tensor& w, const at::Tensor* bias,
                         at::Tensor& out) {
  using A = pe::acc_t<S>;
  struct Item { int64_t head, p, jb0, jb1; };
  const Groups gr = make_groups(g);
  const int64_t L = static_cast<int64_t>(g.heads.size()) - 1;
  int64_t tiles = 0;
  for (int64_t l = 0; l < L; ++l) tiles += pe::ceil_div(g.heads[l + 1] - g.heads[l], kTileN);
  // column tiles per item: enough items for every thread, long enough to amortize packing e
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(16, tiles * g.protos / (8 * at::get_num_threads())));
  std::vector<Item> items;
  for (int64_t p = 0; p < g.protos; ++p) {
    if (gr.size(p) == 0) continue;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t nj = pe::ceil_div(g.heads[l + 1] - g.heads[l], kTileN);
      for (int64_t jb = 0; jb < nj; jb += per) items.push_back({l, p, jb, std::min(nj, jb + per)});
    }
  }
  const bool gathered = g.index.defined();
  const int64_t og = gathered ? 0 : out.stride(0), orow = out.stride(gathered ? 0 : 1), ocol = out.stride(-1);
  S* op = mptr<S>(out);
  const S* bp = bias ? cptr<S>(*bias) : nullptr;
  const int64_t bs0 = bias ? bias->stride(0) : 0, bs1 = bias ? bias->stride(1) : 0;
  const Scratch<A> scratch(Buffers<A>::size(g.dim));
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    const Buffers<A> buf(scratch.get(), g.dim);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t p = item.p, c0 = g.heads[item.head];
      const HeadView<S> v{cptr<S>(e) + item.head * e.stride(0), e.stride(1), e.stride(2),
                          cptr<S>(w) + p * w.stride(0) + c0 * w.stride(2), w.stride(1), w.stride(2), g.dim,
                          g.heads[item.head + 1] - c0};
      hyper_tiles<S>(v, gr, p, item.jb0, item.jb1, buf, [&](int64_t r0, int64_t rows, int64_t j0, int64_t nc) {
        const S* brow = bp ? bp + p * bs0 + (c0 + j0) * bs1 : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          A* acc = buf.acc + r * kTileN;
          add_bias(acc, brow, bs1, nc);
          store_row(op + p * og + gr.row(p, r0 + r) * orow + (c0 + j0) * ocol, ocol, acc, nc);
        }
      });
    }
  });
}

template <class S>
void edit_sumsq_kernel(const HyperArgs& g, const at::Tensor& e, const at::Tensor& w, const at::Tensor* bias,
                       const at::Tensor& thr, at::Tensor& out) {
  using A = pe::acc_t<S>;
  const Groups gr = make_groups(g);
  const int64_t nj = pe::ceil_div(g.width, kTileN);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(nj, 4 * at::get_num_threads()));
  const int64_t per = pe::ceil_div(nj, chunks);
  // one partial [B, P] per column chunk, so items never write the same sum
  at::Tensor partial = at::zeros({chunks, g.batch, g.protos}, out.options());
  double* pp = partial.data_ptr<double>();
  const S* bp = bias ? cptr<S>(*bias) : nullptr;
  const int64_t bs0 = bias ? bias->stride(0) : 0, bs1 = bias ? bias->stride(1) : 0;
  const A* tp = thr.defined() ? thr.const_data_ptr<A>() : nullptr;
  const int64_t ts = thr.defined() && thr.numel() > 1 ? 1 : 0;
  const Scratch<A> scratch(Buffers<A>::size(g.dim));
  at::parallel_for(0, g.protos * chunks, 1, [&](int64_t begin, int64_t end) {
    const Buffers<A> buf(scratch.get(), g.dim);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t p = it / chunks, c = it % chunks;
      const int64_t jb0 = c * per, jb1 = std::min(nj, (c + 1) * per);
      if (jb0 >= jb1) continue;
      double* part = pp + c * g.batch * g.protos;
      const HeadView<S> v{cptr<S>(e), e.stride(0), e.stride(1), cptr<S>(w) + p * w.stride(0), w.stride(1),
                          w.stride(2), g.dim, g.width};
      hyper_tiles<S>(v, gr, p, jb0, jb1, buf, [&](int64_t r0, int64_t rows, int64_t j0, int64_t nc) {
        const S* brow = bp ? bp + p * bs0 + j0 * bs1 : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = gr.row(p, r0 + r);
          A* acc = buf.acc + r * kTileN;
          add_bias(acc, brow, bs1, nc);
          part[row * g.protos + p] += sum_clipped_squares<A>(acc, nc, tp != nullptr, tp ? tp[row * ts] : A(0));
        }
      });
    }
  });
  out.copy_(partial.sum(0));
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pyeditor: ", name, " must be a CPU tensor here, got ", t.device());
}

}  // namespace

at::Tensor edited_linear_cpu(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,
                             const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& proto_index) {
  check_cpu(x, "x");
  const LinearArgs g = prepare_edited_linear(x, theta, delta, threshold, bias, proto_index);
  at::Tensor y = at::empty({g.batch, g.rows, g.out}, x.options());
  if (y.numel() == 0) return y;
  cpu::advise_huge_pages(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyeditor_edited_linear_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    edited_linear_kernel<S>(g, x, theta, delta, bias.has_value() ? &*bias : nullptr, y);
  });
  return y;
}

namespace {

at::Tensor hyper_heads_cpu(const HyperArgs& g, const at::Tensor& e, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  at::Tensor out = g.index.defined() ? at::empty({g.batch, g.width}, e.options())
                                     : at::empty({g.protos, g.batch, g.width}, e.options());
  if (out.numel() == 0) return out;
  cpu::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_hyper_matmul_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    hyper_matmul_kernel<S>(g, e, weight, bias.has_value() ? &*bias : nullptr, out);
  });
  return out;
}

}  // namespace

at::Tensor hyper_matmul_cpu(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& index) {
  check_cpu(e, "e");
  const HyperArgs g = prepare_hyper(e, weight, bias, index);
  return hyper_heads_cpu(g, e.unsqueeze(0), weight, bias);  // the one-head case
}

at::Tensor hyper_matmul_heads_cpu(const at::Tensor& e, const at::Tensor& weight, at::IntArrayRef sizes,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index) {
  check_cpu(e, "e");
  return hyper_heads_cpu(prepare_hyper_heads(e, weight, sizes, bias, index), e, weight, bias);
}

at::Tensor edit_sumsq_cpu(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& threshold) {
  check_cpu(e, "e");
  const HyperArgs g = prepare_hyper(e, weight, bias, c10::nullopt);
  const at::Tensor thr = prepare_sumsq_threshold(threshold, e, g.batch);
  at::Tensor out = at::zeros({g.batch, g.protos}, e.options().dtype(at::kDouble));
  if (out.numel() == 0 || g.width == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_edit_sumsq_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    edit_sumsq_kernel<S>(g, e, weight, bias.has_value() ? &*bias : nullptr, thr, out);
  });
  return out;
}

}  // namespace pyeditor
