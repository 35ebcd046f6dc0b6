// The one place where pyeditor's C++ ops are declared (schemas) and bound to kernels per device.
#include <Python.h>
#include <torch/library.h>

#include "layer_norms.h"
#include "ops.h"
#include "cpu/search_passes.h"
#include "cpu/tile_gemm.h"
#include "pyeditor/cpu_quant.h"
#include "pyeditor/cpu_spans.h"

#ifndef PYEDITOR_TORCH_VERSION
#define PYEDITOR_TORCH_VERSION "unknown"
#endif

namespace pyeditor {
PyObject* search_cpu_eager(PyObject* self, PyObject* args);  // eager_call.cpp
}

// An importable Python module: loading it runs the registrations below. Its one function is
// the eager fast path of the CPU search (eager_call.cpp); every op is reached via torch.ops.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"search_cpu_eager", pyeditor::search_cpu_eager, METH_VARARGS,
       "nearest_prototype_cpu(x, prototypes, k, metric) for plain CPU tensors, else None"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

namespace pyeditor {

std::string build_info() {
  std::string info = "torch=" PYEDITOR_TORCH_VERSION;
  // the CPU kernel paths picked at load (under PYEDITOR_CPU_ISA, csrc/include/pyeditor/cpu_isa.h)
  info += ";edit_cpu=";
  info += pe::cpu::edit_level();
  info += ";search_cpu=";
  info += pyeditor::search_cpu::search_level();
  info += ";layer_norms_cpu=";
  info += pyeditor::layer_norms_level();
  info += ";quant_cpu=";
  info += pe::quant::cpu::quant_simd_level();
  if (pe::quant::cpu::amx_enabled()) info += "+amx";
  info += ";tile_gemm=";
  info += pyeditor::cpu::tile_gemm_level();
  info += ";fma_probe=";
  info += pyeditor::compute_probe_level();
#ifdef PYEDITOR_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(pyeditor, m) {
  m.def("build_info() -> str", &build_info);
  m.def("apply_edit(Tensor theta, Tensor delta, Tensor threshold, Tensor? proto_index=None) -> Tensor");
  m.def("apply_edit_out(Tensor theta, Tensor delta, Tensor threshold, Tensor? proto_index, Tensor(a!) out) -> ()");
  m.def("apply_edit_backward(Tensor grad, Tensor delta, Tensor threshold) -> Tensor");
  // packed channel-wise 2/4/6/8-bit weights (layout: csrc/include/pyeditor/pack.h)
  // group_size 0: scale and zero [rows], one per channel; 32, 64 or 128: [ceil(in / group_size), rows]
  m.def("quant_dequantize(Tensor data, Tensor scale, Tensor zero, Tensor perm, int[] buckets, int in_features, "
        "int out_features, int group_size=0) -> Tensor");
  // in_features is the layer's own (x's last dimension must equal it): the padded data alone
  // cannot tell a 21-wide weight from a 17- to 32-wide x
  // fast: int8 activations (CPU); bf16: activations rounded to bfloat16 first (exclusive with fast)
  m.def("quant_linear(Tensor x, Tensor data, Tensor scale, Tensor zero, Tensor perm, int[] buckets, "
        "int in_features, int out_features, Tensor? bias=None, bool fast=False, int group_size=0, "
        "bool bf16=False) -> Tensor");
  // benchmarks only (bench/roofline.py, bench/cases_quant.py): memory moved as `streams`
  // concurrent streams per thread. read_probe: max int32 word of data; copy_probe: dst = src.
  m.def("read_probe(Tensor data, int streams=4) -> Tensor");
  m.def("copy_probe(Tensor src, Tensor(a!) dst, int streams=4) -> ()");
  // benchmarks only (bench/roofline.py): y = x after `rounds` steps of v = fma(v, a, b), with a
  // and b rounded to float32; its time gives the fp32 FMA peak (the compute roofline)
  m.def("fma_probe(Tensor x, float a, float b, int rounds) -> Tensor");
  // nearest-prototype search (issue 5)
  m.def("nearest_prototype(Tensor x, Tensor prototypes, int k=1, str metric=\"l2\") -> (Tensor, Tensor)");
  // Persona serving: edited linear, hypernetwork matmuls, fused edit norms (issue 4)
  m.def("edited_linear(Tensor x, Tensor theta, Tensor delta, Tensor threshold, Tensor? bias=None, Tensor? proto_index=None) -> Tensor");
  m.def("hyper_matmul(Tensor e, Tensor weight, Tensor? bias=None, Tensor? index=None) -> Tensor");
  m.def("edit_sumsq(Tensor e, Tensor weight, Tensor? bias=None, Tensor? threshold=None) -> Tensor");
  // every head of one editor in one launch: weight [P, d, sum(sizes)], head l reads e[l]
  m.def("hyper_matmul_heads(Tensor e, Tensor weight, int[] sizes, Tensor? bias=None, Tensor? index=None) -> Tensor");
  // gathered weight gradient, per prototype segment: [P, d, sum(sizes)]
  m.def("hyper_weight_grad(Tensor e, Tensor grad, int[] sizes, Tensor index, int protos) -> Tensor");
  // Persona Eq. 11-12 over every layer (issue 27): e [L, B, d], weights L [P, d, n_l] -> [B, P] float64
  m.def("edit_norms_layers(Tensor e, Tensor[] weights, Tensor?[] biases, Tensor? threshold=None, "
        "str rule=\"sumsq\", float[]? layer_weights=None, Tensor? gram=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyeditor, CPU, m) {
  m.impl("apply_edit", &apply_edit_cpu);
  m.impl("apply_edit_out", &apply_edit_out_cpu);
  m.impl("apply_edit_backward", &apply_edit_backward_cpu);
  m.impl("quant_dequantize", &quant_dequantize_cpu);
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("read_probe", &read_probe_cpu);
  m.impl("copy_probe", &copy_probe_cpu);
  m.impl("fma_probe", &fma_probe_cpu);
  m.impl("nearest_prototype", &nearest_prototype_cpu);  // issue 5
  m.impl("edited_linear", &edited_linear_cpu);
  m.impl("hyper_matmul", &hyper_matmul_cpu);
  m.impl("edit_sumsq", &edit_sumsq_cpu);
  m.impl("hyper_matmul_heads", &hyper_matmul_heads_cpu);
  m.impl("hyper_weight_grad", &hyper_weight_grad_cpu);
  m.impl("edit_norms_layers", &edit_norms_layers_cpu);
}

#ifdef PYEDITOR_WITH_CUDA
TORCH_LIBRARY_IMPL(pyeditor, CUDA, m) {
  m.impl("apply_edit", &apply_edit_cuda);
  m.impl("apply_edit_out", &apply_edit_out_cuda);
  m.impl("apply_edit_backward", &apply_edit_backward_cuda);
  m.impl("quant_dequantize", &quant_dequantize_cuda);
  m.impl("quant_linear", &quant_linear_cuda);
  m.impl("nearest_prototype", &nearest_prototype_cuda);  // issue 5
  m.impl("edited_linear", &edited_linear_cuda);
  m.impl("hyper_matmul", &hyper_matmul_cuda);
  m.impl("edit_sumsq", &edit_sumsq_cuda);
  m.impl("hyper_matmul_heads", &hyper_matmul_heads_cuda);
  m.impl("hyper_weight_grad", &hyper_weight_grad_cuda);
  m.impl("edit_norms_layers", &edit_norms_layers_cuda);
}
#endif

}  // namespace pyeditor
