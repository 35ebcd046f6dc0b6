// Persona Eq. 11-12 over every edited layer (edit_norms_layers): each layer's squared edit norm
// ||clip(e_l,b W_l,p + b_l,p)||^2 for one (sample, prototype) pair, and the rule that combines
// the layers' norms. Framework-free, shared by the CPU kernel and the CUDA kernel.
//
// Two ways to a layer's sum of squares. Direct: every edit element formed in double whatever the
// input dtype (k ascending, bias last), as the reference computes it (float32 / 16-bit products
// are exact in double). Gram form (unclipped only): ||a W + b||^2 = a G a^T with a = [e, 1] and
// G = [W; b][W; b]^T, (d+1)^2 multiply-adds a pair instead of d n; a pair whose value is small
// next to its magnitude bound (it may have cancelled) or not finite is redone directly, so the
// result keeps the reference's accuracy.
#pragma once
#include <cmath>
#include <cstdint>

#include "hyper_math.h"

namespace pe {

// Rules of edit_norms_layers: sqrt(sum_l s_l), sum_l sqrt(s_l), max_l sqrt(s_l) and
// sqrt(sum_l lambda_l s_l), s_l the layer's sum of squares (lambda_l = 0: left out by the caller).
enum LayerRule : int { kRuleSumSq = 0, kRuleSum = 1, kRuleMax = 2, kRuleWeighted = 3 };

// One layer's operands, element strides: e_l [B, d], W_l [P, d, n], bias_l [P, n] or null.
template <class S> struct LayerOperands {
  const S* e;
  int64_t e_b, e_k;
  const S* w;
  int64_t w_p, w_k, w_j;
  const S* bias;
  int64_t b_p, b_j;
  int64_t width;
  double weight;  // lambda_l of kRuleWeighted (1 otherwise)
};

PE_HD double clip_square(double g, bool clipped, double t) {
  const double v = clipped ? clip(g, t) : g;  // clip keeps NaN, sends +-inf to +-T
  return v * v;
}

// g = e_b . W_p[:, j] + bias_p[j], in double.
template <class S>
PE_HD double layer_edit(const LayerOperands<S>& l, int64_t dim, int64_t b, int64_t p, int64_t j) {
  const S* e = l.e + b * l.e_b;
  const S* w = l.w + p * l.w_p + j * l.w_j;
  double g = 0.0;
  for (int64_t k = 0; k < dim; ++k)
    g += static_cast<double>(load(e + k * l.e_k)) * static_cast<double>(load(w + k * l.w_k));
  if (l.bias) g += static_cast<double>(load(l.bias + p * l.b_p + j * l.b_j));
  return g;
}

// The layer's sum of squares of one pair, column by column (the CUDA kernel: one thread a pair).
template <class S>
PE_HD double layer_sumsq(const LayerOperands<S>& l, int64_t dim, int64_t b, int64_t p, bool clipped, double t) {
  double s = 0.0;
  for (int64_t j = 0; j < l.width; ++j) s += clip_square(layer_edit(l, dim, b, p, j), clipped, t);
  return s;
}

// Folds one layer's sum of squares into the pair's running state (0 before the first layer).
// A NaN norm stays NaN under every rule (max included, as torch.amax).
PE_HD double combine_layer(double state, double sumsq, int rule, double weight) {
  if (rule == kRuleSumSq) return state + sumsq;
  if (rule == kRuleWeighted) return state + weight * sumsq;
  const double n = sqrt(sumsq);
  if (rule == kRuleSum) return state + n;
  return (n > state || n != n) ? n : state;  // kRuleMax; state NaN: neither holds, stays NaN
}

PE_HD double finish_layers(double state, int rule) {
  return (rule == kRuleSumSq || rule == kRuleWeighted) ? sqrt(state) : state;
}

// CPU blocking: kLayerRows samples of one prototype at a time, kLayerCols columns per pass, so
// each row of W_p is read once for all the rows (and vectorizes along the columns when unit-strided);
// the Gram form runs across the kLayerRows samples.
constexpr int64_t kLayerRows = 16;
constexpr int64_t kLayerCols = 64;

// out[r] = the layer's sum of squares of samples b0 + r (r < rows <= kLayerRows) for prototype p;
// t[r] their thresholds when clipped. Each edit element is layer_edit's value; the squares are
// summed per column block, so the sums agree with layer_sumsq to rounding.
template <class S>
PE_HD void layer_rows_sumsq(const LayerOperands<S>& l, int64_t dim, int64_t b0, int64_t rows, int64_t p,
                            bool clipped, const double* t, double* out) {
  double acc[kLayerRows][kLayerCols];
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.0;
  const S* wp = l.w + p * l.w_p;
  for (int64_t j0 = 0; j0 < l.width; j0 += kLayerCols) {
    const int64_t nc = l.width - j0 < kLayerCols ? l.width - j0 : kLayerCols;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < nc; ++j) acc[r][j] = 0.0;
    for (int64_t k = 0; k < dim; ++k) {
      const S* wr = wp + k * l.w_k + j0 * l.w_j;
      for (int64_t r = 0; r < rows; ++r) {
        const double ek = static_cast<double>(load(l.e + (b0 + r) * l.e_b + k * l.e_k));
        double* a = acc[r];
        if (l.w_j == 1) {
          for (int64_t j = 0; j < nc; ++j) a[j] += ek * static_cast<double>(load(wr + j));
        } else {
          for (int64_t j = 0; j < nc; ++j) a[j] += ek * static_cast<double>(load(wr + j * l.w_j));
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      double* a = acc[r];
      if (l.bias) {
        const S* br = l.bias + p * l.b_p + j0 * l.b_j;
        for (int64_t j = 0; j < nc; ++j) a[j] += static_cast<double>(load(br + j * l.b_j));
      }
      double s = 0.0;
      const double tr = clipped ? t[r] : 0.0;
      for (int64_t j = 0; j < nc; ++j) s += clip_square(a[j], clipped, tr);
      out[r] += s;
    }
  }
}

// Whether an unclipped layer goes through its Gram form: P B (d+1)^2 multiply-adds to evaluate
// (plus forming the Gram, P (d+1)^2 n by a float32 GEMM at a fraction of a loop's cost per
// multiply-add, unless it is given) against the direct P B d n.
constexpr double kGramFormCost = 0.25;
PE_HD bool layer_prefers_gram(int64_t batch, int64_t dim, int64_t width, bool given) {
  const double d1 = static_cast<double>(dim + 1) * static_cast<double>(dim + 1);
  const double gram = static_cast<double>(batch) * d1 + (given ? 0.0 : kGramFormCost * d1 * static_cast<double>(width));
  return gram < static_cast<double>(batch) * static_cast<double>(dim) * static_cast<double>(width);
}

// Widest embedding the Gram form takes (the caller sends wider layers to the direct path).
constexpr int64_t kGramMaxDim = 255;

// Columns of [W_p; b_p] one Gram partial sum covers: products and their sums in acc_t<S>
// (float for float32 and 16-bit operands, whose products float holds exactly; double for
// double), each chunk's sums then added in double, so float error grows with the chunk, not n.
constexpr int64_t kGramChunk = 128;

// Rows of A = [W_p; b_p] (d+1 rows, the last zero without a bias), columns [j0, j0 + nc) of the
// layer, as acc_t<S>: out[i * kGramChunk + j], zero past nc (nc <= kGramChunk).
template <class S>
PE_HD void pack_gram_rows(const LayerOperands<S>& l, int64_t dim, int64_t p, int64_t j0, int64_t nc,
                          acc_t<S>* out) {
  using T = acc_t<S>;
  for (int64_t i = 0; i <= dim; ++i) {
    T* o = out + i * kGramChunk;
    const bool weight = i < dim;
    if (weight || l.bias) {
      const S* x = weight ? l.w + p * l.w_p + i * l.w_k + j0 * l.w_j : l.bias + p * l.b_p + j0 * l.b_j;
      const int64_t step = weight ? l.w_j : l.b_j;
      if (step == 1) {  // the usual layout: a plain (vectorized) copy
        for (int64_t j = 0; j < nc; ++j) o[j] = static_cast<T>(load(x + j));
      } else {
        for (int64_t j = 0; j < nc; ++j) o[j] = static_cast<T>(load(x + j * step));
      }
    } else {
      for (int64_t j = 0; j < nc; ++j) o[j] = T(0);
    }
    for (int64_t j = nc; j < kGramChunk; ++j) o[j] = T(0);
  }
}

// Mirrors the upper triangle of g [n, n] (row-major) onto the lower.
PE_HD void mirror_upper(double* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) g[i * n + j] = g[j * n + i];
}

// The Gram G = A A^T [d+1, d+1] (row-major, symmetric, overwritten) of prototype p's
// A = [W_p; b_p], summed as kGramChunk describes; `pack` holds (d+1) * kGramChunk values.
// Each entry's chunk sum runs in 8 interleaved partial sums (so it vectorizes, the same order
// at every vector width).
template <class S>
PE_HD void layer_gram(const LayerOperands<S>& l, int64_t dim, int64_t p, acc_t<S>* pack, double* g) {
  using T = acc_t<S>;
  const int64_t d1 = dim + 1, rows = l.bias ? d1 : dim;  // without a bias the last row is zero
  for (int64_t i = 0; i < d1 * d1; ++i) g[i] = 0.0;
  for (int64_t j0 = 0; j0 < l.width; j0 += kGramChunk) {
    const int64_t nc = l.width - j0 < kGramChunk ? l.width - j0 : kGramChunk;
    pack_gram_rows(l, dim, p, j0, nc, pack);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t m = i; m < rows; ++m) {
        const T* x = pack + i * kGramChunk;
        const T* y = pack + m * kGramChunk;
        T s[8] = {};
        for (int64_t k = 0; k < nc; k += 8)
          for (int v = 0; v < 8; ++v) s[v] += x[k + v] * y[k + v];
        g[i * d1 + m] += static_cast<double>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
      }
  }
  mirror_upper(g, d1);
}

// gram_rows' operand from a Gram g [d1, d1] (row-major, symmetric): h[j][i] = G_jj for i = j and
// 2 G_ji for i < j (the rest is not read), so a G a^T = sum_j a_j sum_{i<=j} h[j][i] a_i at
// about half the multiply-adds. Returns ||G||_F, the scale of gram_rows' bound.
PE_HD double gram_half(const double* g, int64_t d1, double* h) {
  double f = 0.0;
  for (int64_t j = 0; j < d1; ++j)
    for (int64_t i = 0; i < d1; ++i) {
      const double x = g[j * d1 + i];
      f += x * x;
      if (i <= j) h[j * d1 + i] = i == j ? x : 2.0 * x;
    }
  return sqrt(f);
}

// The samples b0 + r (r < rows <= kLayerRows) of one layer as gram_rows reads them, side by
// side: a[i * kLayerRows + r] = e_{b0 + r, i} (i < dim), a[dim * kLayerRows + r] = 1, zero for
// r >= rows. Formed once per block of samples, read for every prototype.
template <class S>
PE_HD void gram_samples(const LayerOperands<S>& l, int64_t dim, int64_t b0, int64_t rows, double* a) {
  for (int64_t r = 0; r < kLayerRows; ++r) {
    const S* e = l.e + (b0 + r) * l.e_b;
    if (r < rows) {
      for (int64_t i = 0; i < dim; ++i) a[i * kLayerRows + r] = static_cast<double>(load(e + i * l.e_k));
    } else {
      for (int64_t i = 0; i < dim; ++i) a[i * kLayerRows + r] = 0.0;
    }
    a[dim * kLayerRows + r] = 1.0;
  }
}

#if !defined(__CUDACC__)  // the CPU's Gram form (the CUDA kernel evaluates every layer directly)
// Gram-form values of `rows` samples (a from gram_samples) for one prototype: value[r] =
// a_r G a_r^T with a_r = [e_r, 1], from h = gram_half(G), and bound[r] = ||G||_F ||a_r||^2,
// which is at least |a_r| |G| |a_r|^T, the sum of the form's terms' magnitudes. Every
// multiply-add runs across the kLayerRows samples at once: z_j = sum_{i<=j} h[j][i] a_i, value
// = sum_j a_j z_j, with the samples' lanes held in registers (GCC / Clang vector types: left to
// itself the compiler vectorized across i instead, transposing a at every step).
PE_HD void gram_rows(const double* a, int64_t dim, int64_t rows, const double* h, double g_frob, double* value,
                     double* bound) {
  const int64_t d1 = dim + 1;
#if defined(__GNUC__)
  typedef double V4 __attribute__((vector_size(4 * sizeof(double)), aligned(sizeof(double))));
  static_assert(kLayerRows == 16, "four vectors of four samples");
  V4 v[4] = {}, n[4] = {};
  for (int64_t j = 0; j < d1; ++j) {
    const double* hj = h + j * d1;
    V4 z0 = {}, z1 = {}, z2 = {}, z3 = {};
    for (int64_t i = 0; i <= j; ++i) {
      const V4* ai = reinterpret_cast<const V4*>(a + i * kLayerRows);
      const double c = hj[i];
      z0 += c * ai[0];
      z1 += c * ai[1];
      z2 += c * ai[2];
      z3 += c * ai[3];
    }
    const V4* aj = reinterpret_cast<const V4*>(a + j * kLayerRows);
    v[0] += aj[0] * z0;
    v[1] += aj[1] * z1;
    v[2] += aj[2] * z2;
    v[3] += aj[3] * z3;
    for (int q = 0; q < 4; ++q) n[q] += aj[q] * aj[q];
  }
  double vr[kLayerRows], nr[kLayerRows];
  for (int q = 0; q < 4; ++q)
    for (int k = 0; k < 4; ++k) {
      vr[4 * q + k] = v[q][k];
      nr[4 * q + k] = n[q][k];
    }
  for (int64_t r = 0; r < rows; ++r) {
    value[r] = vr[r];
    bound[r] = g_frob * nr[r];
  }
#else
  double v[kLayerRows] = {}, n[kLayerRows] = {};
  for (int64_t j = 0; j < d1; ++j) {
    const double* hj = h + j * d1;
    double z[kLayerRows] = {};
    for (int64_t i = 0; i <= j; ++i)
      for (int64_t r = 0; r < kLayerRows; ++r) z[r] += hj[i] * a[i * kLayerRows + r];
    for (int64_t r = 0; r < kLayerRows; ++r) {
      v[r] += a[j * kLayerRows + r] * z[r];
      n[r] += a[j * kLayerRows + r] * a[j * kLayerRows + r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    value[r] = v[r];
    bound[r] = g_frob * n[r];
  }
#endif
}
#endif

// Whether a Gram-form value is trusted: finite, and not small next to its bound (eps: the
// Gram's relative accuracy margin, 2^-10 for float32 products, 2^-40 for float64).
PE_HD bool gram_value_ok(double value, double bound, double eps) {
  return value >= eps * bound && bound <= 1.7976931348623157e308;
}

}  // namespace pe
