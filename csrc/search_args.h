// Argument checks of nearest_prototype, shared by the CPU and CUDA wrappers and the eager CPU
// fast path (eager_call.cpp); pyeditor/validate.py search_args is their twin for the Triton op
// and the fake kernel (same conditions, same messages).
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace pyeditor {

struct SearchArgs {
  int64_t batch = 0, count = 0, dim = 0, k = 0;  // B, N, d, k
  int metric = 0;                                // pe::search::Metric
};

// x [B, d] and prototypes [N, d] floating, 1 <= k <= N, metric "l2" | "ip" | "cosine" (devices
// are the wrappers' to check). Fills args and returns "", or returns the first failed
// condition's message (built only then: a one-query search is a few microseconds).
std::string search_problem(const at::Tensor& x, const at::Tensor& prototypes, int64_t k, c10::string_view metric,
                           SearchArgs& args);

// search_problem raising RuntimeError("pyeditor: <message>").
SearchArgs check_search(const at::Tensor& x, const at::Tensor& prototypes, int64_t k, c10::string_view metric);

}  // namespace pyeditor
