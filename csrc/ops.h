// Kernel entry points of every pyeditor op, per device; registered in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace pyeditor {

at::Tensor apply_edit_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cpu(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cpu(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);
at::Tensor quant_dequantize_cpu(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                                const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                                int64_t out_features, int64_t group_size);
at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                            const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                            int64_t in_features, int64_t out_features, const c10::optional<at::Tensor>& bias,
                            bool fast, int64_t group_size, bool bf16);
// benchmarks: bandwidth probes for the rooflines (cpu/bandwidth_probe.cpp)
at::Tensor read_probe_cpu(const at::Tensor& data, int64_t streams);
void copy_probe_cpu(const at::Tensor& src, at::Tensor dst, int64_t streams);
// benchmarks: fp32 FMA probe for the compute roofline (cpu/compute_probe.cpp)
at::Tensor fma_probe_cpu(const at::Tensor& x, double a, double b, int64_t rounds);
const char* compute_probe_level();

// nearest-prototype search (issue 5); _checked: the CPU search after check_search / search_problem
// (search_args.h) passed, for the eager fast path (eager_call.cpp)
struct SearchArgs;
std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                        c10::string_view metric);
std::tuple<at::Tensor, at::Tensor> nearest_prototype_cpu_checked(const at::Tensor& x, const at::Tensor& prototypes,
                                                                const SearchArgs& args);

#ifdef PYEDITOR_WITH_CUDA
at::Tensor apply_edit_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                           const c10::optional<at::Tensor>& proto_index);
void apply_edit_out_cuda(const at::Tensor& theta, const at::Tensor& delta, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& proto_index, at::Tensor out);
at::Tensor apply_edit_backward_cuda(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& threshold);
at::Tensor quant_dequantize_cuda(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                                 const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                                 int64_t out_features, int64_t group_size);
at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                             const at::Tensor& zero, const at::Tensor& perm, at::IntArrayRef buckets,
                             int64_t in_features, int64_t out_features, const c10::optional<at::Tensor>& bias,
                             bool fast, int64_t group_size, bool bf16);
std::tuple<at::Tensor, at::Tensor> nearest_prototype_cuda(const at::Tensor& x, const at::Tensor& prototypes, int64_t k,
                                                         c10::string_view metric);  // issue 5
#endif

// Persona serving ops (issue 4)
#define PE_DECLARE_HYPER(dev)                                                                                  \
  at::Tensor edited_linear_##dev(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& delta,        \
                                 const at::Tensor& threshold, const c10::optional<at::Tensor>& bias,           \
                                 const c10::optional<at::Tensor>& proto_index);                                \
  at::Tensor hyper_matmul_##dev(const at::Tensor& e, const at::Tensor& weight,                                 \
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index); \
  at::Tensor edit_sumsq_##dev(const at::Tensor& e, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, \
                              const c10::optional<at::Tensor>& threshold);                                     \
  at::Tensor hyper_matmul_heads_##dev(const at::Tensor& e, const at::Tensor& weight, at::IntArrayRef sizes,    \
                                      const c10::optional<at::Tensor>& bias,                                   \
                                      const c10::optional<at::Tensor>& index);                                 \
  at::Tensor hyper_weight_grad_##dev(const at::Tensor& e, const at::Tensor& grad, at::IntArrayRef sizes,       \
                                     const at::Tensor& index, int64_t protos);
PE_DECLARE_HYPER(cpu)
#ifdef PYEDITOR_WITH_CUDA
PE_DECLARE_HYPER(cuda)
#endif
#undef PE_DECLARE_HYPER

}  // namespace pyeditor
