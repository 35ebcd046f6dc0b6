// Framework-free checks of layer_norms.h: the double edit element, the clipped square (NaN kept,
// inf clipped), the blocked CPU rows against the scalar per-pair definition (strided, clipped,
// bf16), the Gram form (its formation, values, bound, the trust test, which layers take it) and every
// combination rule, NaN included.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "expect.h"
#include "pyeditor/layer_norms.h"

namespace {

const double nan_ = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();

bool close(double a, double b) { return std::fabs(a - b) <= 1e-12 * (1.0 + std::fabs(b)); }

// A pseudo-random value in [-1, 1) (no <random>: same sequence everywhere).
float next(unsigned& s) {
  s = s * 1664525u + 1013904223u;
  return static_cast<float>((s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

// Blocked rows vs the scalar definition vs a direct double sum, for one layer layout.
void check_rows(int64_t B, int64_t P, int64_t d, int64_t n, bool transposed, bool clipped, bool with_bias) {
  unsigned s = 7u + static_cast<unsigned>(n);
  std::vector<float> e(B * d), w(P * d * n), bias(P * n);
  for (auto& x : e) x = next(s);
  for (auto& x : w) x = next(s);
  for (auto& x : bias) x = next(s);
  // W stored [P, d, n] or with its last two axes swapped ([P, n, d] memory, column stride d)
  pe::LayerOperands<float> l{e.data(), d, 1, w.data(), d * n, transposed ? 1 : n, transposed ? d : 1,
                             with_bias ? bias.data() : nullptr, n, 1, n, 1.0};
  std::vector<double> t(B);
  for (int64_t b = 0; b < B; ++b) t[b] = 0.05 * static_cast<double>(b % 5);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t b0 = 0; b0 < B; b0 += pe::kLayerRows) {
      const int64_t rows = B - b0 < pe::kLayerRows ? B - b0 : pe::kLayerRows;
      double out[pe::kLayerRows];
      pe::layer_rows_sumsq(l, d, b0, rows, p, clipped, t.data() + b0, out);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = b0 + r;
        double direct = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          double g = 0.0;
          for (int64_t k = 0; k < d; ++k)
            g += static_cast<double>(e[b * d + k]) * w[p * d * n + (transposed ? j * d + k : k * n + j)];
          if (with_bias) g += bias[p * n + j];
          if (clipped) g = g < -t[b] ? -t[b] : (g > t[b] ? t[b] : g);
          direct += g * g;
        }
        EXPECT(close(out[r], direct));
        EXPECT(close(pe::layer_sumsq(l, d, b, p, clipped, t[b]), direct));
      }
    }
  }
}

}  // namespace

int main() {
  // the element and its clipped square
  EXPECT(pe::clip_square(3.0, false, 0.0) == 9.0);
  EXPECT(pe::clip_square(3.0, true, 0.5) == 0.25);
  EXPECT(pe::clip_square(-inf, true, 0.5) == 0.25);
  EXPECT(pe::clip_square(inf, false, 0.5) == inf);
  EXPECT(std::isnan(pe::clip_square(nan_, true, 0.5)));
  EXPECT(pe::clip_square(inf, true, inf) == inf);
  // float32 products are exact in double: (1 + 2^-12)^2 keeps its 2^-24 term
  const float e1[1] = {1.0f + 0x1p-12f}, w1[1] = {1.0f + 0x1p-12f};
  pe::LayerOperands<float> one{e1, 1, 1, w1, 1, 1, 1, nullptr, 0, 0, 1, 1.0};
  EXPECT(pe::layer_edit(one, 1, 0, 0, 0) == 1.0 + 0x1p-11 + 0x1p-24);
  // bf16 operands are widened exactly
  const pe::bf16 eb[2] = {pe::to_bf16(2.0f), pe::to_bf16(-1.0f)}, wb[2] = {pe::to_bf16(0.5f), pe::to_bf16(3.0f)};
  pe::LayerOperands<pe::bf16> lb{eb, 2, 1, wb, 2, 1, 1, nullptr, 0, 0, 1, 1.0};
  EXPECT(pe::layer_edit(lb, 2, 0, 0, 0) == -2.0);
  EXPECT(pe::layer_sumsq(lb, 2, 0, 0, false, 0.0) == 4.0);

  // blocked rows: odd batch and width (partial row block, several column blocks), strided W,
  // clipped and not, with and without bias, no columns, no embedding features
  for (bool transposed : {false, true})
    for (bool clipped : {false, true})
      for (bool with_bias : {false, true}) {
        check_rows(9, 3, 5, 131, transposed, clipped, with_bias);
        check_rows(3, 2, 4, 0, transposed, clipped, with_bias);
        check_rows(5, 2, 0, 7, transposed, clipped, with_bias);
      }

  // Gram form: a G a^T equals the direct sum of squares; the bound covers the terms' magnitudes
  {
    const int64_t Bg = 21, d = 4, n = 11;  // a full and a partial block of samples
    unsigned s = 99u;
    std::vector<float> e(Bg * d), w(d * n), bias(n);
    for (auto& x : e) x = next(s);
    for (auto& x : w) x = next(s);
    for (auto& x : bias) x = next(s);
    pe::LayerOperands<float> l{e.data(), d, 1, w.data(), 0, n, 1, bias.data(), 0, 1, n, 1.0};
    std::vector<double> g((d + 1) * (d + 1), 0.0);
    for (int64_t i = 0; i <= d; ++i)
      for (int64_t k = 0; k <= d; ++k)
        for (int64_t j = 0; j < n; ++j)
          g[i * (d + 1) + k] += static_cast<double>(i < d ? w[i * n + j] : bias[j]) * (k < d ? w[k * n + j] : bias[j]);
    double frob = 0.0;
    for (double x : g) frob += x * x;
    frob = std::sqrt(frob);
    std::vector<double> h((d + 1) * (d + 1));
    EXPECT(close(pe::gram_half(g.data(), d + 1, h.data()), frob));
    for (int64_t b0 = 0; b0 < Bg; b0 += pe::kLayerRows) {
      const int64_t rows = Bg - b0 < pe::kLayerRows ? Bg - b0 : pe::kLayerRows;
      double value[pe::kLayerRows], bound[pe::kLayerRows];
      std::vector<double> a((d + 1) * pe::kLayerRows);
      pe::gram_samples(l, d, b0, rows, a.data());
      pe::gram_rows(a.data(), d, rows, h.data(), frob, value, bound);
      for (int64_t r = 0; r < rows; ++r) {
        const double direct = pe::layer_sumsq(l, d, b0 + r, 0, false, 0.0);
        EXPECT(close(value[r], direct));
        double mag = 0.0;  // |a| |G| |a|^T
        for (int64_t i = 0; i <= d; ++i)
          for (int64_t k = 0; k <= d; ++k) {
            const double ai = i < d ? e[(b0 + r) * d + i] : 1.0, ak = k < d ? e[(b0 + r) * d + k] : 1.0;
            mag += std::fabs(ai * g[i * (d + 1) + k] * ak);
          }
        EXPECT(bound[r] >= mag);
        EXPECT(pe::gram_value_ok(value[r], bound[r], 0x1p-10));
      }
    }
  }
  // the Gram formed from the operands (several column chunks, strided W, with and without bias)
  // matches the double sums to float32 rounding; both triangles are filled
  for (bool with_bias : {false, true})
    for (int64_t n : {int64_t(0), int64_t(5), pe::kGramChunk + 37}) {
      const int64_t d = 7, P = 2, d1 = d + 1;
      unsigned s = 5u + static_cast<unsigned>(n);
      std::vector<float> w(P * n * d), bias(P * n);
      for (auto& x : w) x = next(s);
      for (auto& x : bias) x = next(s);
      // W stored [P, n, d] (column stride d)
      pe::LayerOperands<float> l{nullptr, 0, 0, w.data(), n * d, 1, d, with_bias ? bias.data() : nullptr, n, 1, n, 1.0};
      std::vector<float> pack(d1 * pe::kGramChunk);
      std::vector<double> g(d1 * d1, -1.0);
      for (int64_t p = 0; p < P; ++p) {
        pe::layer_gram(l, d, p, pack.data(), g.data());
        for (int64_t i = 0; i < d1; ++i)
          for (int64_t k = 0; k < d1; ++k) {
            double want = 0.0, mag = 0.0;
            for (int64_t j = 0; j < n; ++j) {
              const double x = i < d ? w[p * n * d + j * d + i] : (with_bias ? bias[p * n + j] : 0.0);
              const double y = k < d ? w[p * n * d + j * d + k] : (with_bias ? bias[p * n + j] : 0.0);
              want += x * y;
              mag += std::fabs(x * y);
            }
            EXPECT(std::fabs(g[i * d1 + k] - want) <= 1e-6 * (1.0 + mag));
            EXPECT(g[i * d1 + k] == g[k * d1 + i]);
          }
      }
    }
  // trusted only when finite and not small next to the bound
  EXPECT(!pe::gram_value_ok(1e-6, 1.0, 0x1p-10));
  EXPECT(!pe::gram_value_ok(nan_, 1.0, 0x1p-10));
  EXPECT(!pe::gram_value_ok(1.0, inf, 0x1p-10));
  EXPECT(!pe::gram_value_ok(1.0, nan_, 0x1p-10));
  EXPECT(!pe::gram_value_ok(-1e-300, 0.0, 0x1p-10));
  EXPECT(pe::gram_value_ok(0.0, 0.0, 0x1p-10));  // an all-zero editor
  // the Gram form for wide layers over many samples, not for narrow ones, nor for few samples
  // unless the Grams are given
  EXPECT(pe::layer_prefers_gram(192, 32, 1024, false));
  EXPECT(!pe::layer_prefers_gram(192, 32, 6, false));
  EXPECT(!pe::layer_prefers_gram(192, 32, 6, true));
  EXPECT(!pe::layer_prefers_gram(2, 32, 1024, false));
  EXPECT(pe::layer_prefers_gram(2, 32, 1024, true));

  // the rules over layer sums of squares {9, 16}: norms 3 and 4
  const double sq[2] = {9.0, 16.0}, lam[2] = {2.0, 0.5};
  auto fold = [&](int rule) {
    double state = 0.0;
    for (int l = 0; l < 2; ++l) state = pe::combine_layer(state, sq[l], rule, lam[l]);
    return pe::finish_layers(state, rule);
  };
  EXPECT(fold(pe::kRuleSumSq) == 5.0);
  EXPECT(fold(pe::kRuleSum) == 7.0);
  EXPECT(fold(pe::kRuleMax) == 4.0);
  EXPECT(close(fold(pe::kRuleWeighted), std::sqrt(2.0 * 9.0 + 0.5 * 16.0)));
  // NaN in any layer, first or last, stays NaN; inf gives inf
  for (int rule : {pe::kRuleSumSq, pe::kRuleSum, pe::kRuleMax, pe::kRuleWeighted}) {
    for (int at = 0; at < 2; ++at) {
      double state = 0.0;
      for (int l = 0; l < 2; ++l) state = pe::combine_layer(state, l == at ? nan_ : 4.0, rule, 1.0);
      EXPECT(std::isnan(pe::finish_layers(state, rule)));
      state = 0.0;
      for (int l = 0; l < 2; ++l) state = pe::combine_layer(state, l == at ? inf : 4.0, rule, 1.0);
      EXPECT(pe::finish_layers(state, rule) == inf);
    }
  }
  if (failures) std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
