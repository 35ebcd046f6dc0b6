// Eager fast path for one device's CPU search: Python calls nearest_prototype_cpu directly,
// skipping the Python-side checks and the dispatcher's argument boxing (together about 2.5 us
// of a one-query call). It takes only valid calls on plain dense CPU tensors with no dispatch
// or torch-function mode, functorch layer or other thread-local dispatch key active; for
// anything else it returns None and the caller takes the checked path to the registered op
// torch.ops.pyeditor.nearest_prototype (which also raises the errors for bad input).
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>

#include "ops.h"

namespace pyeditor {
namespace {

bool plain_float_cpu(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() && !t.is_neg() && !t.is_conj() &&
         t.dim() == 2 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                          t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}

bool no_modes() {
  // the keys every eager call has included; a dispatch mode (Python) or functorch adds more
  static const c10::DispatchKeySet usual({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  return (c10::impl::tls_local_dispatch_key_set().included_ - usual).empty() &&
         !at::impl::torch_function_mode_enabled();
}

}  // namespace

PyObject* search_cpu_eager(PyObject* /*self*/, PyObject* args) {
  PyObject *xo = nullptr, *po = nullptr, *ko = nullptr;
  const char* metric = nullptr;
  if (!PyArg_ParseTuple(args, "OOOs", &xo, &po, &ko, &metric)) return nullptr;
  if (!THPVariable_Check(xo) || !THPVariable_Check(po) || !PyLong_CheckExact(ko)) Py_RETURN_NONE;
  const long long k = PyLong_AsLongLong(ko);
  if (k == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const at::Tensor& x = THPVariable_Unpack(xo);
  const at::Tensor& p = THPVariable_Unpack(po);
  const bool metric_ok = !std::strcmp(metric, "l2") || !std::strcmp(metric, "ip") || !std::strcmp(metric, "cosine");
  if (!metric_ok || !plain_float_cpu(x) || !plain_float_cpu(p) || x.size(1) != p.size(1) || k < 1 ||
      k > p.size(0) || !no_modes())
    Py_RETURN_NONE;
  try {
    // the profiler still sees the call under the op's name (a flag test when it is off)
    RECORD_FUNCTION("pyeditor::nearest_prototype", std::vector<c10::IValue>({x, p}));
    std::tuple<at::Tensor, at::Tensor> out;
    if (x.size(0) * p.size(0) * p.size(1) < (int64_t(1) << 20)) {
      out = nearest_prototype_cpu(x, p, k, metric);
    } else {  // long searches let other Python threads run
      Py_BEGIN_ALLOW_THREADS
      out = nearest_prototype_cpu(x, p, k, metric);
      Py_END_ALLOW_THREADS
    }
    return Py_BuildValue("(NN)", THPVariable_Wrap(std::move(std::get<0>(out))),
                         THPVariable_Wrap(std::move(std::get<1>(out))));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

}  // namespace pyeditor
