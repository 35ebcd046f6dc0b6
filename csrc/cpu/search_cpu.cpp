// CPU nearest-prototype search: argument checks (search_args.h), then one of four exact paths, as the plan
// (search_plan.h) says (see search_math.h for the acceptance rule that makes the float32
// passes exact):
//  * resident (search_resident.cpp): k = 1 and few prototypes, all kept in L1 while the
//    queries stream past, the best two of each query reduced in registers.
//  * blocked (search_blocked.cpp): packed prototypes, a register-tiled float32 micro-kernel
//    with the top-k in its epilogue; the B x N distance matrix is never written. Large batches.
//  * direct (search_direct.cpp): float32 (x - p)^2 / x.p per pair on the raw rows; small
//    batches (no packing cost).
//  * exact: float64 direct difference; float64 inputs, k > kMaxK, and rejected queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../search_args.h"
#include "pyeditor/search_math.h"
#include "pyeditor/search_plan.h"
#include "search_passes.h"

namespace pyeditor {
namespace {

namespace ps = pe::search;
using search_cpu::BlockJob;
using search_cpu::kMC;
using search_cpu::Packed;

// Exact scan for any k (k > kMaxK): float64 keys of every prototype, partial sort.
template <class T, class O>
void exact_query_any_k(const T* x, const T* P, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  if (ps::row_has_nan(x, d)) return ps::write_nan_row(dist, idx, k);
  const double xn = metric == ps::kCosine ? ps::norm64(x, d) : 0.0;
  std::vector<std::pair<double, int64_t>> all;
  all.reserve(N);
  for (int64_t j = 0; j < N; ++j) {
    const double e = ps::exact_key(x, P + j * d, d, metric, xn);
    if (e == e) all.emplace_back(e, j);
  }
  const size_t m = std::min<size_t>(k, all.size());
  std::partial_sort(all.begin(), all.begin() + m, all.end(),
                    [](const auto& a, const auto& b) { return ps::before(a.first, a.second, b.first, b.second); });
  std::vector<double> keys(m);
  std::vector<int64_t> ids(m);
  for (size_t i = 0; i < m; ++i) keys[i] = all[i].first, ids[i] = all[i].second;
  ps::write_row(dist, idx, k, keys.data(), ids.data(), static_cast<int>(m), metric);
}

template <int CAP, class T, class O>
void exact_query_cap(const T* x, const T* P, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  if (k > ps::kMaxK) return exact_query_any_k(x, P, N, d, k, metric, dist, idx);
  ps::exact_query<CAP>(x, P, d, N, d, k, metric, dist, idx);
}

int capacity_for(int k) {
  const int need = k + 1;
  return need <= 2 ? 2 : need <= 4 ? 4 : need <= 8 ? 8 : need <= 16 ? 16 : ps::kMaxK + 1;
}

// at least ~2^18 multiply-adds per task: smaller batches run inline, without waking threads
int64_t grain_for(int64_t N, int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, N * d)); }

// float64 keys everywhere (float64 inputs, or k beyond the fixed lists).
template <class T, class O>
void exact_all(const T* x, const T* P, int64_t B, int64_t N, int64_t d, int k, int metric, O* dist, int64_t* idx) {
  at::parallel_for(0, B, grain_for(N, d), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      exact_query_cap<ps::kMaxK + 1>(x + q * d, P, N, d, k, metric, dist + q * k, idx + q * k);
  });
}

void fast_all(const ps::SearchPlan& plan, const float* x, const float* P, int64_t B, int64_t N, int64_t d, int k,
              int metric, float* dist, int64_t* idx) {
  const int cap = capacity_for(k);
  auto direct = [&] {
    at::parallel_for(0, B, grain_for(N, d), [&](int64_t q0, int64_t q1) {
      search_cpu::direct_job(x, P, N, d, k, metric, q0, q1, dist, idx, cap);
    });
  };
  if (plan.path == ps::SearchPath::kDirect) return direct();
  std::vector<int64_t> valid;
  bool has_inf = false;
  for (int64_t j = 0; j < N; ++j) {
    if (ps::row_finite(P + j * d, d)) valid.push_back(j);
    else if (!ps::row_has_nan(P + j * d, d)) has_inf = true;
  }
  // inf prototypes can still win (at distance inf): the direct pass keeps every row
  if (has_inf || valid.empty()) return direct();
  const Packed pk = search_cpu::pack_prototypes(P, N, d, metric, valid);
  if (plan.path == ps::SearchPath::kResident) {
    const int vectors = static_cast<int>((pk.count + plan.lanes - 1) / plan.lanes);  // (NaN rows dropped)
    at::parallel_for(0, B, grain_for(N, d), [&](int64_t q0, int64_t q1) {
      BlockJob job{x, P, &pk, N, d, q0, q1 - q0, B, k, metric, dist, idx};
      search_cpu::resident_job(job, vectors);
    });
    return;
  }
  const int64_t blocks = (B + kMC - 1) / kMC;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kMC;
      BlockJob job{x, P, &pk, N, d, row0, std::min<int64_t>(kMC, B - row0), B, k, metric, dist, idx};
      search_cpu::blocked_job(job, cap);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                        c10::string_view metric) {
  TORCH_CHECK(x.device().is_cpu() && prototypes.device().is_cpu(), "pyeditor: x and prototypes must be CPU tensors");
  return nearest_prototype_cpu_checked(x, prototypes, check_search(x, prototypes, k, metric));
}

std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu_checked(const at::Tensor& x, const at::Tensor& prototypes,
                                                                const SearchArgs& args) {
  const int64_t B = args.batch, N = args.count, d = args.dim, k = args.k;
  const int metric = args.metric;
  at::Tensor idx = at::empty({B, k}, x.options().dtype(at::kLong));
  const bool wide = x.scalar_type() == at::kDouble || prototypes.scalar_type() == at::kDouble;
  if (B == 0) return {at::empty({0, k}, x.options()), idx};
  const int kk = static_cast<int>(k);
  ps::SearchCall call;
  call.batch = B, call.count = N, call.dim = d, call.k = k, call.wide = wide, call.level = pe::cpu::vector_level();
  const ps::SearchPlan plan = ps::plan_search(call);
  if (wide) {  // (the plan's kExact: float64 keys on float64 copies)
    at::Tensor xd = x.to(at::kDouble).contiguous(), pd = prototypes.to(at::kDouble).contiguous();
    at::Tensor dist = at::empty({B, k}, x.options().dtype(at::kDouble));
    exact_all(xd.const_data_ptr<double>(), pd.const_data_ptr<double>(), B, N, d, kk, metric,
              dist.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>());
    return {dist.to(x.scalar_type()), idx};
  }
  // skip the no-op conversions' dispatcher round trips: one device's search is a few us
  auto as_f32 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor xf = as_f32(x), pf = as_f32(prototypes);
  at::Tensor dist = at::empty({B, k}, x.options().dtype(at::kFloat));
  const float* xp = xf.const_data_ptr<float>();
  const float* pp = pf.const_data_ptr<float>();
  if (plan.path == ps::SearchPath::kExact) {
    exact_all(xp, pp, B, N, d, kk, metric, dist.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>());
  } else {
    fast_all(plan, xp, pp, B, N, d, kk, metric, dist.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>());
  }
  if (x.scalar_type() == at::kFloat) return {dist, idx};
  return {dist.to(x.scalar_type()), idx};
}

}  // namespace pyeditor
