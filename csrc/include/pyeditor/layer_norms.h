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
// each row of W_p is read once for all the rows (and vectorizes along the columns when unit-strided).
constexpr int64_t kLayerRows = 4;
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

// Gram-form values of `rows` samples b0 + r for one prototype: value[r] = a_r G a_r^T with
// a_r = [e_r, 1] (G row-major (d+1) x (d+1), symmetric) and bound[r] = ||G||_F ||a_r||^2, which is
// at least |a_r| |G| |a_r|^T, the sum of the form's terms' magnitudes. Y = A G is accumulated row
// of G by row (vectorizes along G's rows), then value = sum_j a_j y_j.
template <class S>
PE_HD void gram_rows(const LayerOperands<S>& l, int64_t dim, int64_t b0, int64_t rows, const double* g,
                     double g_frob, double* value, double* bound) {
  constexpr int64_t kMaxD1 = 256;  // the caller sends wider layers to the direct path
  const int64_t d1 = dim + 1;
  double a[kLayerRows][kMaxD1], y[kLayerRows][kMaxD1];
  for (int64_t r = 0; r < rows; ++r) {
    const S* e = l.e + (b0 + r) * l.e_b;
    for (int64_t i = 0; i < dim; ++i) a[r][i] = static_cast<double>(load(e + i * l.e_k));
    a[r][dim] = 1.0;
    for (int64_t j = 0; j < d1; ++j) y[r][j] = 0.0;
  }
  for (int64_t i = 0; i < d1; ++i) {
    const double* gi = g + i * d1;
    for (int64_t r = 0; r < rows; ++r) {
      const double ai = a[r][i];
      double* yr = y[r];
      for (int64_t j = 0; j < d1; ++j) yr[j] += ai * gi[j];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    double v = 0.0, n2 = 0.0;
    for (int64_t j = 0; j < d1; ++j) {
      v += a[r][j] * y[r][j];
      n2 += a[r][j] * a[r][j];
    }
    value[r] = v;
    bound[r] = g_frob * n2;
  }
}
constexpr int64_t kGramMaxDim = 255;

// Whether a Gram-form value is trusted: finite, and not small next to its bound (eps: the
// Gram's relative accuracy margin, 2^-10 for float32 products, 2^-40 for float64).
PE_HD bool gram_value_ok(double value, double bound, double eps) {
  return value >= eps * bound && bound <= 1.7976931348623157e308;
}

}  // namespace pe
