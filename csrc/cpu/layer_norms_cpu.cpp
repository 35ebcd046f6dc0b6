// CPU kernel of edit_norms_layers: every (sample, prototype) pair's edit norm over every layer,
// combined by the rule, in one pass and one output [B, P] float64 (no per-layer [B, P], no [P, B, n]).
// An unclipped layer goes through its Gram form when layer_prefers_gram says so. First pass: the
// Grams of those layers, [W_p; b_p][W_p; b_p]^T per prototype, formed here in one pass over the
// weights (float32 products for non-float64 editors, as pyeditor.prototype_gram; no ATen ops) or
// read from the Grams given, laid out for the evaluation (gram_half). Second pass, work item
// kLayerRows samples: for each prototype the kept layers run in order and fold into the pair's
// state, a Gram layer as one small product across the samples with the pairs it cannot trust
// redone directly, every other layer directly (layer_norms.h). When the prototypes share out
// evenly over the threads, each thread runs both passes for its own prototypes (one parallel
// region); otherwise the Grams, then the sample blocks, are shared out. Both passes are built once per
// vector level (portable / AVX2 / AVX-512) from the same inlined bodies, picked at load; at AVX2
// and above the Grams of float32 and 16-bit editors run on an AVX2 register block (gram_dot).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../aten_storage.h"
#include "../layer_norms_args.h"
#include "../layer_norms.h"
#include "pyeditor/cpu_isa.h"
#include "pyeditor/layer_norms.h"
#if PE_ISA_VARIANTS
#include <immintrin.h>
#endif

namespace pyeditor {
namespace {

template <class S> struct LayerJob {
  std::vector<pe::LayerOperands<S>> layers;  // the kept layers, in order
  std::vector<const double*> gram;           // per kept layer: gram_half of its Grams [P, d+1, d+1], or null (direct)
  std::vector<const double*> gram_frob;      // per kept layer: ||G_p||_F [P], or null
  double eps;                                // the Grams' cancellation margin
  int64_t dim, batch, protos;
  int rule;
  const double* thr;  // null: unclipped
  int64_t thr_stride;
  double* out;  // [B, P] contiguous
};

// Blocks [begin, end) of samples, prototypes [p0, p1).
template <class S> PE_HD void run_blocks(const LayerJob<S>& job, int64_t begin, int64_t end, int64_t p0, int64_t p1) {
  double t[pe::kLayerRows] = {}, sq[pe::kLayerRows], bound[pe::kLayerRows], state[pe::kLayerRows];
  const bool clipped = job.thr != nullptr;
  const int64_t d1 = job.dim + 1, n_layers = static_cast<int64_t>(job.layers.size());
  std::vector<double> samples;  // per Gram layer: the block's samples as gram_rows reads them
  for (int64_t i = 0; i < n_layers; ++i)
    if (job.gram[i]) samples.resize(n_layers * d1 * pe::kLayerRows);
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t b0 = blk * pe::kLayerRows, rows = std::min(pe::kLayerRows, job.batch - b0);
    if (clipped)
      for (int64_t r = 0; r < rows; ++r) t[r] = job.thr[(b0 + r) * job.thr_stride];
    for (int64_t i = 0; i < n_layers; ++i)
      if (job.gram[i]) pe::gram_samples(job.layers[i], job.dim, b0, rows, samples.data() + i * d1 * pe::kLayerRows);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = 0; r < rows; ++r) state[r] = 0.0;
      for (int64_t i = 0; i < n_layers; ++i) {
        const pe::LayerOperands<S>& l = job.layers[i];
        if (job.gram[i]) {
          pe::gram_rows(samples.data() + i * d1 * pe::kLayerRows, job.dim, rows, job.gram[i] + p * d1 * d1,
                        job.gram_frob[i][p], sq, bound);
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

// The Gram pass: task t is the Gram of prototype t / n of Gram layer t % n (n Gram layers;
// prototype-major, so contiguous task ranges share the wide and the narrow layers).
template <class S> struct GramJob {
  std::vector<pe::LayerOperands<S>> layers;  // the layers that go through their Gram form
  std::vector<const double*> given;          // per such layer: its Grams [P, d+1, d+1] if given, else null
  int64_t dim, protos;
  double* half;  // [n, P, d+1, d+1]: gram_half of each Gram
  double* frob;  // [n, P]: ||G||_F
};

// One thread's scratch: the packed rows of A = [W_p; b_p] for a chunk of columns, the Gram in
// double, and the AVX2 kernel's padded Gram (rows to a multiple of 3, columns of 4).
template <class S> struct GramScratch {
  std::vector<pe::acc_t<S>> rows;
  std::vector<double> g, padded;
  explicit GramScratch(int64_t dim)
      : rows((dim + 1) * pe::kGramChunk), g((dim + 1) * (dim + 1)),
        padded(pe::ceil_div(dim + 1, 3) * 3 * pe::ceil_div(dim + 1, 4) * 4) {}
};

#if PE_ISA_VARIANTS
// out[r * ld + q] += sum_{k < n} x[r][k] y[q][k] for r < 3, q < 4: 12 accumulators of 8 float32
// lanes (with the 3 x rows and one y row, the 16 ymm registers), reduced four at a time into a
// row of out; a chunk's lanes sum n / 8 products each.
__attribute__((target("avx2,fma"))) inline void dot_block(const float* const* x, const float* const* y, int64_t n,
                                                         double* out, int64_t ld) {
  __m256 c[12];
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) c[i] = _mm256_setzero_ps();
  const int64_t n8 = n / 8 * 8;
  for (int64_t k = 0; k < n8; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x[0] + k), x1 = _mm256_loadu_ps(x[1] + k), x2 = _mm256_loadu_ps(x[2] + k);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(y[q] + k);
      c[q] = _mm256_fmadd_ps(x0, v, c[q]);
      c[4 + q] = _mm256_fmadd_ps(x1, v, c[4 + q]);
      c[8 + q] = _mm256_fmadd_ps(x2, v, c[8 + q]);
    }
  }
#pragma GCC unroll 3
  for (int r = 0; r < 3; ++r) {
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t k = n8; k < n; ++k)
      for (int q = 0; q < 4; ++q) tail[q] += x[r][k] * y[q][k];
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(c[4 * r], c[4 * r + 1]), _mm256_hadd_ps(c[4 * r + 2], c[4 * r + 3]));
    const __m128 s = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_loadu_ps(tail));
    double* o = out + r * ld;
    _mm256_storeu_pd(o, _mm256_add_pd(_mm256_loadu_pd(o), _mm256_cvtps_pd(s)));
  }
}

// layer_gram for float32 rows (the weights in place when unit-strided float32, else packed per
// chunk of kGramChunk columns): per chunk, every 3 x 4 block of row pairs on or above the
// diagonal by dot_block, its float32 sums added into the double Gram.
template <class S>
__attribute__((target("avx2,fma"))) void gram_dot(const pe::LayerOperands<S>& l, int64_t dim, int64_t p,
                                                   GramScratch<S>& s) {
  const int64_t d1 = dim + 1, count = l.bias ? d1 : dim, ld = pe::ceil_div(d1, 4) * 4;
  constexpr bool in_place_type = std::is_same<S, float>::value;
  const bool in_place = in_place_type && l.w_j == 1 && (!l.bias || l.b_j == 1);
  const float* row[pe::kGramMaxDim + 1];
  double* g = s.padded.data();
  std::fill(s.padded.begin(), s.padded.end(), 0.0);
  for (int64_t j0 = 0; j0 < l.width && count > 0; j0 += pe::kGramChunk) {
    const int64_t nc = std::min(pe::kGramChunk, l.width - j0);
    if constexpr (in_place_type) {
      if (in_place) {
        for (int64_t i = 0; i < dim; ++i) row[i] = reinterpret_cast<const float*>(l.w) + p * l.w_p + i * l.w_k + j0;
        if (l.bias) row[dim] = reinterpret_cast<const float*>(l.bias) + p * l.b_p + j0;
      }
    }
    if (!in_place) {
      pe::pack_gram_rows(l, dim, p, j0, nc, s.rows.data());
      for (int64_t i = 0; i < count; ++i) row[i] = reinterpret_cast<const float*>(s.rows.data()) + i * pe::kGramChunk;
    }
    for (int64_t i0 = 0; i0 < count; i0 += 3) {
      const float* x[3];
      // past the last row: a repeat of it, whose sums land in the padding and are not read back
      for (int r = 0; r < 3; ++r) x[r] = row[std::min(i0 + r, count - 1)];
      for (int64_t c0 = i0 / 4 * 4; c0 < count; c0 += 4) {
        const float* y[4];
        for (int q = 0; q < 4; ++q) y[q] = row[std::min(c0 + q, count - 1)];
        dot_block(x, y, nc, g + i0 * ld + c0, ld);
      }
    }
  }
  double* out = s.g.data();
  for (int64_t i = 0; i < d1; ++i)
    for (int64_t j = i; j < d1; ++j) out[i * d1 + j] = j < count ? g[i * ld + j] : 0.0;
  pe::mirror_upper(out, d1);
}
#endif

template <class S, bool kDot> PE_HD void gram_tasks(const GramJob<S>& job, int64_t begin, int64_t end) {
  GramScratch<S> s(job.dim);
  const int64_t n = static_cast<int64_t>(job.layers.size()), d1 = job.dim + 1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = t % n, p = t / n;
    const double* g = s.g.data();
    if (job.given[i]) {
      g = job.given[i] + p * d1 * d1;
    } else {
#if PE_ISA_VARIANTS
      if constexpr (kDot) gram_dot(job.layers[i], job.dim, p, s);
      else pe::layer_gram(job.layers[i], job.dim, p, s.rows.data(), s.g.data());
#else
      pe::layer_gram(job.layers[i], job.dim, p, s.rows.data(), s.g.data());
#endif
    }
    const int64_t at = i * job.protos + p;
    job.frob[at] = pe::gram_half(g, d1, job.half + at * d1 * d1);
  }
}

template <class S> using BlocksFn = void (*)(const LayerJob<S>&, int64_t, int64_t, int64_t, int64_t);
template <class S> using GramsFn = void (*)(const GramJob<S>&, int64_t, int64_t);

template <class S>
void blocks_portable(const LayerJob<S>& job, int64_t begin, int64_t end, int64_t p0, int64_t p1) {
  run_blocks(job, begin, end, p0, p1);
}
template <class S> void grams_portable(const GramJob<S>& job, int64_t begin, int64_t end) {
  gram_tasks<S, false>(job, begin, end);
}
#if PE_ISA_VARIANTS
template <class S>
PE_TARGET_AVX2 void blocks_avx2(const LayerJob<S>& job, int64_t begin, int64_t end, int64_t p0, int64_t p1) {
  run_blocks(job, begin, end, p0, p1);
}
template <class S>
PE_TARGET_AVX512 void blocks_avx512(const LayerJob<S>& job, int64_t begin, int64_t end, int64_t p0, int64_t p1) {
  run_blocks(job, begin, end, p0, p1);
}
template <class S> PE_TARGET_AVX2 void grams_avx2(const GramJob<S>& job, int64_t begin, int64_t end) {
  gram_tasks<S, std::is_same<pe::acc_t<S>, float>::value>(job, begin, end);
}
template <class S> PE_TARGET_AVX512 void grams_avx512(const GramJob<S>& job, int64_t begin, int64_t end) {
  gram_tasks<S, std::is_same<pe::acc_t<S>, float>::value>(job, begin, end);
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

template <class S> GramsFn<S> pick_grams() {
#if PE_ISA_VARIANTS
  return pe::cpu::pick_variant<GramsFn<S>>(pe::cpu::vector_level(), grams_portable<S>, grams_avx2<S>,
                                           grams_avx512<S>);
#else
  return grams_portable<S>;
#endif
}
}  // namespace

const char* layer_norms_level() { return pe::cpu::level_name(pe::cpu::vector_level()); }

namespace {

// Multiply-adds one parallel task should carry at least (waking a thread costs about that much).
constexpr int64_t kTaskMacs = 1 << 16;

template <class S>
void layer_norms_kernel(const LayerNormsArgs& a, const at::Tensor& e, at::TensorList weights,
                        const c10::List<c10::optional<at::Tensor>>& biases, at::Tensor& out) {
  LayerJob<S> job{{}, {}, {}, e.scalar_type() == at::kDouble ? 0x1p-40 : 0x1p-10, a.dim, a.batch, a.protos,
                  a.rule, nullptr, 0, out.data_ptr<double>()};
  GramJob<S> grams{{}, {}, a.dim, a.protos, nullptr, nullptr};
  const bool clipped = a.threshold.defined();
  const int64_t d1 = a.dim + 1, gram_size = a.protos * d1 * d1;
  std::vector<int64_t> slot;  // per kept layer: its index among the Gram layers, or -1 (direct)
  int64_t macs = 0;           // per sample and prototype
  int64_t gram_macs = 0;      // the Gram pass, per prototype
  for (int64_t l : a.kept) {
    const at::Tensor& w = weights[l];
    const c10::optional<at::Tensor> b = biases.get(l);
    const S* bp = b.has_value() ? reinterpret_cast<const S*>(b->const_data_ptr()) : nullptr;
    job.layers.push_back({reinterpret_cast<const S*>(e.const_data_ptr()) + l * e.stride(0), e.stride(1), e.stride(2),
                          reinterpret_cast<const S*>(w.const_data_ptr()), w.stride(0), w.stride(1), w.stride(2), bp,
                          b.has_value() ? b->stride(0) : 0, b.has_value() ? b->stride(1) : 0, w.size(2), a.lam[l]});
    const bool gram = !clipped && a.dim <= pe::kGramMaxDim &&
                      pe::layer_prefers_gram(a.batch, a.dim, w.size(2), a.gram.defined());
    slot.push_back(gram ? static_cast<int64_t>(grams.layers.size()) : -1);
    if (gram) {
      grams.layers.push_back(job.layers.back());
      grams.given.push_back(a.gram.defined() ? a.gram.const_data_ptr<double>() + l * gram_size : nullptr);
      gram_macs += d1 * d1 * (a.gram.defined() ? 1 : std::max<int64_t>(1, w.size(2) / 2));
      macs += d1 * d1 / 2 + d1;
    } else {
      macs += std::max<int64_t>(1, a.dim) * w.size(2);
    }
  }
  const int64_t n_gram = static_cast<int64_t>(grams.layers.size());
  std::vector<double> half(n_gram * gram_size), frob(n_gram * a.protos);
  grams.half = half.data();
  grams.frob = frob.data();
  for (int64_t s : slot) {
    job.gram.push_back(s >= 0 ? half.data() + s * gram_size : nullptr);
    job.gram_frob.push_back(s >= 0 ? frob.data() + s * a.protos : nullptr);
  }
  if (clipped) {
    job.thr = a.threshold.const_data_ptr<double>();
    job.thr_stride = a.threshold.numel() > 1 ? 1 : 0;
  }
  static const GramsFn<S> form = pick_grams<S>();
  static const BlocksFn<S> run = pick_blocks<S>();
  const int64_t blocks = pe::ceil_div(a.batch, pe::kLayerRows);
  const int64_t threads = at::get_num_threads();
  if (n_gram && a.protos % threads == 0) {
    // the prototypes share out evenly: each thread forms its prototypes' Grams and evaluates
    // them over every sample, one parallel region instead of two (the Gram tasks are
    // prototype-major, so prototypes [p0, p1) are tasks [p0 n_gram, p1 n_gram))
    at::parallel_for(0, a.protos, 1, [&](int64_t p0, int64_t p1) {
      form(grams, p0 * n_gram, p1 * n_gram);
      run(job, 0, blocks, p0, p1);
    });
    return;
  }
  if (n_gram) {
    const int64_t grain = std::max<int64_t>(1, kTaskMacs * n_gram / std::max<int64_t>(1, gram_macs));
    at::parallel_for(0, n_gram * a.protos, grain, [&](int64_t begin, int64_t end) { form(grams, begin, end); });
  }
  const int64_t block_macs = std::max<int64_t>(1, pe::kLayerRows * a.protos * macs);
  const int64_t grain = std::max<int64_t>(1, kTaskMacs / block_macs);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) { run(job, begin, end, 0, a.protos); });
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
