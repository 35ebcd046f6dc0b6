#include "layer_norms_args.h"

#include <cmath>

#include "edit_args.h"
#include "pyeditor/layer_norms.h"

namespace pyeditor {
namespace {

void check_operand(const at::Tensor& t, const std::string& name, const at::Tensor& e) {
  TORCH_CHECK(t.scalar_type() == e.scalar_type(), "pyeditor: ", name, " dtype ", t.scalar_type(),
              " does not match e dtype ", e.scalar_type());
  TORCH_CHECK(t.device() == e.device(), "pyeditor: ", name, " is on ", t.device(), " but e is on ", e.device());
}

int parse_rule(c10::string_view rule) {
  if (rule == "sumsq") return pe::kRuleSumSq;
  if (rule == "sum") return pe::kRuleSum;
  if (rule == "max") return pe::kRuleMax;
  if (rule == "weighted") return pe::kRuleWeighted;
  TORCH_CHECK(false, "pyeditor: rule must be 'sumsq', 'sum', 'max' or 'weighted', got '", rule, "'");
}

}  // namespace

LayerNormsArgs prepare_layer_norms(const at::Tensor& e, at::TensorList weights,
                                   const c10::List<c10::optional<at::Tensor>>& biases,
                                   const c10::optional<at::Tensor>& threshold, c10::string_view rule,
                                   c10::optional<at::ArrayRef<double>> layer_weights,
                                   const c10::optional<at::Tensor>& gram) {
  TORCH_CHECK(e.is_floating_point(), "pyeditor: e must be floating point, got ", e.scalar_type());
  TORCH_CHECK(e.dim() == 3, "pyeditor: e must be [L, B, d] (one embedding per layer), got ", e.sizes());
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "pyeditor: weights must hold at least one layer");
  TORCH_CHECK(e.size(0) == L, "pyeditor: e holds ", e.size(0), " layer embeddings but weights has ", L, " layers");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L, "pyeditor: biases has ", biases.size(),
              " entries but weights has ", L, " layers");
  LayerNormsArgs a{L, e.size(1), e.size(2), weights[0].dim() == 3 ? weights[0].size(0) : 0, 0, {}, {}, {}, {}};
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    const std::string name = "weights[" + std::to_string(l) + "]";
    check_operand(w, name, e);
    TORCH_CHECK(w.dim() == 3 && w.size(0) == a.protos && w.size(1) == a.dim, "pyeditor: ", name, " must be [",
                a.protos, ", ", a.dim, ", n] (every layer: P of weights[0], d of e), got ", w.sizes());
    const c10::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) {
      const std::string bname = "biases[" + std::to_string(l) + "]";
      check_operand(*b, bname, e);
      TORCH_CHECK(b->dim() == 2 && b->size(0) == a.protos && b->size(1) == w.size(2), "pyeditor: ", bname,
                  " must be [", a.protos, ", ", w.size(2), "], got ", b->sizes());
    }
  }
  a.rule = parse_rule(rule);
  TORCH_CHECK((a.rule == pe::kRuleWeighted) == layer_weights.has_value(),
              "pyeditor: layer_weights goes with rule 'weighted' and only with it");
  a.lam.assign(L, 1.0);
  if (layer_weights.has_value()) {
    const auto& lam = *layer_weights;
    TORCH_CHECK(static_cast<int64_t>(lam.size()) == L, "pyeditor: layer_weights has ", lam.size(),
                " values but weights has ", L, " layers");
    bool any = false;
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(std::isfinite(lam[l]) && lam[l] >= 0, "pyeditor: layer_weights[", l, "] = ", lam[l],
                  " must be finite and >= 0");
      a.lam[l] = lam[l];
      any = any || lam[l] > 0;
    }
    TORCH_CHECK(any, "pyeditor: layer_weights must not all be 0");
  }
  for (int64_t l = 0; l < L; ++l)
    if (a.lam[l] > 0) a.kept.push_back(l);
  if (threshold.has_value()) {
    const at::Tensor& t = *threshold;
    TORCH_CHECK(t.scalar_type() == at::kDouble, "pyeditor: threshold must be float64 (the clip runs in double), got ",
                t.scalar_type());
    TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == a.batch), "pyeditor: threshold must hold 1 or ",
                a.batch, " values, got shape ", t.sizes());
    TORCH_CHECK(t.device() == e.device(), "pyeditor: threshold is on ", t.device(), " but e is on ", e.device());
    a.threshold = t.reshape({t.numel()}).contiguous();
    check_threshold_values(a.threshold.device().is_cpu() ? a.threshold : a.threshold.cpu());
  }
  if (gram.has_value()) {
    const at::Tensor& g = *gram;
    TORCH_CHECK(g.scalar_type() == at::kDouble, "pyeditor: gram must be float64, got ", g.scalar_type());
    TORCH_CHECK(g.dim() == 4 && g.size(0) == L && g.size(1) == a.protos && g.size(2) == a.dim + 1 &&
                    g.size(3) == a.dim + 1,
                "pyeditor: gram must be [", L, ", ", a.protos, ", ", a.dim + 1, ", ", a.dim + 1, "], got ", g.sizes());
    TORCH_CHECK(g.device() == e.device(), "pyeditor: gram is on ", g.device(), " but e is on ", e.device());
    a.gram = g.contiguous();
  }
  return a;
}

}  // namespace pyeditor
