#include "search_args.h"

#include "pyeditor/search_math.h"

namespace pyeditor {

std::string search_problem(const at::Tensor& x, const at::Tensor& prototypes, int64_t k, c10::string_view metric,
                           SearchArgs& args) {
  if (x.dim() != 2) return c10::str("x must be [B, d], got shape ", x.sizes());
  if (prototypes.dim() != 2) return c10::str("prototypes must be [N, d], got shape ", prototypes.sizes());
  if (!at::isFloatingType(x.scalar_type()) || !at::isFloatingType(prototypes.scalar_type()))
    return c10::str("x and prototypes must be floating, got ", x.scalar_type(), " and ", prototypes.scalar_type());
  if (x.size(1) != prototypes.size(1))
    return c10::str("x has ", x.size(1), " features but prototypes have ", prototypes.size(1));
  const int64_t n = prototypes.size(0);
  if (k < 1 || k > n) return c10::str("k must be in [1, N = ", n, "], got ", k);
  namespace ps = pe::search;
  if (metric == "l2") args.metric = ps::kL2;
  else if (metric == "ip") args.metric = ps::kIP;
  else if (metric == "cosine") args.metric = ps::kCosine;
  else return c10::str("metric must be 'l2', 'ip' or 'cosine', got '", std::string(metric), "'");
  args.batch = x.size(0), args.count = n, args.dim = x.size(1), args.k = k;
  return {};
}

SearchArgs check_search(const at::Tensor& x, const at::Tensor& prototypes, int64_t k, c10::string_view metric) {
  SearchArgs args;
  const std::string problem = search_problem(x, prototypes, k, metric, args);
  TORCH_CHECK(problem.empty(), "pyeditor: ", problem);
  return args;
}

}  // namespace pyeditor
