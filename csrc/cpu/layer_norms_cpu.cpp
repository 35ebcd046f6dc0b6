// CPU kernel of edit_norms_layers: every (sample, prototype) pair's edit norm over every layer,
// combined by the rule, in one pass and one output [B, P] float64 (no per-layer [B, P], no [P, B, n]).
// Work item: kLayerRows samples; for each prototype the kept layers run in order and fold into
// the pair's state. An unclipped layer goes through its Gram form when layer_prefers_gram says so
// (the Grams given, or formed here first by a float32 GEMM as pyeditor.prototype_gram does), with
// the pairs it cannot trust redone directly; every other layer directly (layer_norms.h). Built
// once per vector level (portable / AVX2 / AVX-512) from the same inlined body, picked at load.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../aten_storage.h"
#include "../layer_norms_args.h"
#include "../layer_norms.h"
#include "pyeditor/cpu_isa.h"
#include "pyeditor/layer_norms.h"

namespace pyeditor {
namespace {

template <class S> struct LayerJob {
  std::vector<pe::LayerOperands<S>> layers;  // the kept layers, in order
  std::vector<const double*> gram;           // per kept layer: its Grams [P, d+1, d+1], or null (direct)
  std::vector<const double*> gram_frob;      // per kept layer: ||G_p||_F [P], or null
  double eps;                                // the Grams' cancellation margin
  int64_t dim, batch, protos;
  int rule;
  const double* thr;  // null: unclipped
  int64_t thr_stride;
  double* out;  // [B, P] contiguous
};

template <class S> PE_HD void run_blocks(const LayerJob<S>& job, int64_t begin, int64_t end) {
  double t[pe::kLayerRows] = {}, sq[pe::kLayerRows], bound[pe::kLayerRows], state[pe::kLayerRows];
  const bool clipped = job.thr != nullptr;
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t b0 = blk * pe::kLayerRows, rows = std::min(pe::kLayerRows, job.batch - b0);
    if (clipped)
      for (int64_t r = 0; r < rows; ++r) t[r] = job.thr[(b0 + r) * job.thr_stride];
    for (int64_t p = 0; p < job.protos; ++p) {
      for (int64_t r = 0; r < rows; ++r) state[r] = 0.0;
      for (size_t i = 0; i < job.layers.size(); ++i) {
        const pe::LayerOperands<S>& l = job.layers[i];
        if (job.gram[i]) {
          const int64_t d1 = job.dim + 1;
          pe::gram_rows(l, job.dim, b0, rows, job.gram[i] + p * d1 * d1, job.gram_frob[i][p], sq, bound);
          for (int64_t r = 0; r < rows; ++r)
            if (!pe::gram_value_ok(sq[r], bound[r], job.eps)) sq[r] = pe::layer_sumsq(l, job.dim, b0 + r, p, false, 0.0);
        } else {
          pe::layer_rows_sumsq(l, job.dim, b0, rows, p, clipped, t, sq);
        }
        for (int64_t r = 0; r < rows; ++r) state[r] = pe::combine_layer(state[r], sq[r], job.rule, l.weight);
      }
      for (int64_t r = 0; r < rows; ++r) job.out[(b0 + r) * job.protos + p] = pe::finish_layers(state[r], job.rule);
    }
  }
}

template <class S> using BlocksFn = void (*)(const LayerJob<S>&, int64_t, int64_t);

template <class S> void blocks_portable(const LayerJob<S>& job, int64_t begin, int64_t end) {
  run_blocks(job, begin, end);
}
#if PE_ISA_VARIANTS
template <class S> PE_TARGET_AVX2 void blocks_avx2(const LayerJob<S>& job, int64_t begin, int64_t end) {
  run_blocks(job, begin, end);
}
template <class S> PE_TARGET_AVX512 void blocks_avx512(const LayerJob<S>& job, int64_t begin, int64_t end) {
  run_blocks(job, begin, end);
}
#endif

template <class S> BlocksFn<S> pick_blocks() {
#if PE_ISA_VARIANTS
  return pe::cpu::pick_variant<BlocksFn<S>>(pe::cpu::vector_level(), blocks_portable<S>, blocks_avx2<S>,
                                            blocks_avx512<S>);
#else
  return blocks_portable<S>;
#endif
}

}  // namespace

const char* layer_norms_level() { return pe::cpu::level_name(pe::cpu::vector_level()); }

namespace {

// Multiply-adds one parallel task should carry at least (waking a thread costs about that much).
constexpr int64_t kTaskMacs = 1 << 16;

// The Grams [P, d+1, d+1] float64 of [W_p; b_p] (zero last row and column without a bias),
// products in float32 (float64 for float64 editors), as pyeditor.prototype_gram forms them: W W^T
// and W b^T by batched GEMMs on the generators in place (no augmented copy of W), b b^T in float64.
at::Tensor layer_gram(const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const at::ScalarType acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t d = w.size(1);
  const at::Tensor wa = w.to(acc);
  at::Tensor g = at::constant_pad_nd(at::bmm(wa, wa.transpose(1, 2)).to(at::kDouble), {0, 1, 0, 1});
  if (bias.has_value()) {
    const at::Tensor c = at::bmm(bias->to(acc).unsqueeze(1), wa.transpose(1, 2)).squeeze(1);  // [P, d]
    g.select(2, d).narrow(1, 0, d).copy_(c);
    g.select(1, d).narrow(1, 0, d).copy_(c);
    g.select(1, d).select(1, d).copy_(bias->to(at::kDouble).square().sum(1));
  }
  return g;
}

// ||G_p||_F of each prototype's Gram (the bound's scale).
std::vector<double> gram_frobenius(const at::Tensor& g) {
  const int64_t P = g.size(0), n = g.size(1) * g.size(2);
  const double* p = g.const_data_ptr<double>();
  std::vector<double> out(P);
  for (int64_t q = 0; q < P; ++q) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += p[q * n + i] * p[q * n + i];
    out[q] = std::sqrt(s);
  }
  return out;
}

template <class S>
void layer_norms_kernel(const LayerNormsArgs& a, const at::Tensor& e, at::TensorList weights,
                        const c10::List<c10::optional<at::Tensor>>& biases, at::Tensor& out) {
  LayerJob<S> job{{}, {}, {}, e.scalar_type() == at::kDouble ? 0x1p-40 : 0x1p-10, a.dim, a.batch, a.protos,
                  a.rule, nullptr, 0, out.data_ptr<double>()};
  const bool clipped = a.threshold.defined();
  std::vector<at::Tensor> grams;                // keep what the job points into alive
  std::vector<std::vector<double>> frobs;
  int64_t macs = 0;                       // per sample and prototype
  for (int64_t l : a.kept) {
    const at::Tensor& w = weights[l];
    const c10::optional<at::Tensor> b = biases.get(l);
    const S* bp = b.has_value() ? reinterpret_cast<const S*>(b->const_data_ptr()) : nullptr;
    job.layers.push_back({reinterpret_cast<const S*>(e.const_data_ptr()) + l * e.stride(0), e.stride(1), e.stride(2),
                          reinterpret_cast<const S*>(w.const_data_ptr()), w.stride(0), w.stride(1), w.stride(2), bp,
                          b.has_value() ? b->stride(0) : 0, b.has_value() ? b->stride(1) : 0, w.size(2), a.lam[l]});
    const bool gram = !clipped && a.dim <= pe::kGramMaxDim &&
                      pe::layer_prefers_gram(a.batch, a.dim, w.size(2), a.gram.defined());
    if (gram) {
      grams.push_back(a.gram.defined() ? a.gram.select(0, l) : layer_gram(w, b));
      frobs.push_back(gram_frobenius(grams.back()));
      macs += (a.dim + 1) * (a.dim + 1);
    }
    job.gram.push_back(gram ? grams.back().const_data_ptr<double>() : nullptr);
    job.gram_frob.push_back(gram ? frobs.back().data() : nullptr);
    if (!gram) macs += std::max<int64_t>(1, a.dim) * w.size(2);
  }
  if (clipped) {
    job.thr = a.threshold.const_data_ptr<double>();
    job.thr_stride = a.threshold.numel() > 1 ? 1 : 0;
  }
  const int64_t blocks = pe::ceil_div(a.batch, pe::kLayerRows);
  const int64_t block_macs = std::max<int64_t>(1, pe::kLayerRows * a.protos * macs);
  const int64_t grain = std::max<int64_t>(1, kTaskMacs / block_macs);
  static const BlocksFn<S> run = pick_blocks<S>();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) { run(job, begin, end); });
}

}  // namespace

at::Tensor edit_norms_layers_cpu(const at::Tensor& e, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases,
                                 const c10::optional<at::Tensor>& threshold, c10::string_view rule,
                                 c10::optional<at::ArrayRef<double>> layer_weights, const c10::optional<at::Tensor>& gram) {
  TORCH_CHECK(e.device().is_cpu(), "pyeditor: e must be a CPU tensor here, got ", e.device());
  const LayerNormsArgs a = prepare_layer_norms(e, weights, biases, threshold, rule, layer_weights, gram);
  at::Tensor out = at::empty({a.batch, a.protos}, e.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pyeditor_edit_norms_layers_cpu", [&] {
    using S = typename storage_of<scalar_t>::type;
    layer_norms_kernel<S>(a, e, weights, biases, out);
  });
  return out;
}

}  // namespace pyeditor
