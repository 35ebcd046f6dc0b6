// Eager fast path for one device's CPU search: Python calls the CPU kernel directly, skipping
// the Python-side checks and the dispatcher's argument boxing (a large share of a one-query
// call; bench: nearest_prototype B=1). It takes only calls on plain CPU tensors (dense, strided,
// no nested / zero / conjugate / subclass / functorch / functional wrapper, a dtype the public
// API takes) with no dispatch or torch-function mode active that pass the registered op's own
// argument checks (search_problem, search_args.h: the one checking layer, run once); for
// anything else it returns None and the caller takes the checked path to the registered op
// torch.ops.pyeditor.nearest_prototype (whose Python checks raise the errors naming arguments).
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "ops.h"
#include "search_args.h"

namespace pyeditor {
namespace {

// The dispatch keys of a plain CPU tensor (inference tensors have a subset); anything else
// (nested, zero tensor, conjugate / negative views, Python subclasses, functorch and
// functionalization wrappers, other devices) adds a key outside this set.
const c10::DispatchKeySet& plain_cpu_keys() {
  static const c10::DispatchKeySet keys({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                         c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU});
  return keys;
}

bool plain_cpu_float(const at::Tensor& t) {
  // (operator- keeps backend bits, so test the subset relation with &)
  if (!t.defined() || (t.key_set() & plain_cpu_keys()) != t.key_set() || !t.device().is_cpu() ||
      t.layout() != at::kStrided || !t.has_storage())
    return false;
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

bool no_modes() {
  // the keys every eager call has included; a dispatch mode (Python) or functorch adds more
  static const c10::DispatchKeySet usual({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  return (c10::impl::tls_local_dispatch_key_set().included_ - usual).empty() &&
         !at::impl::torch_function_mode_enabled();
}

// Releases the GIL for its lifetime, and takes it back on every exit, exceptions included.
struct NoGil {
  PyThreadState* state = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(state); }
};

}  // namespace

PyObject* search_cpu_eager(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *xo = nullptr, *po = nullptr, *ko = nullptr, *mo = nullptr;
  if (!PyArg_ParseTuple(args, "OOOO", &xo, &po, &ko, &mo)) return nullptr;
  if (!THPVariable_Check(xo) || !THPVariable_Check(po) || !PyLong_CheckExact(ko) || !PyUnicode_Check(mo))
    Py_RETURN_NONE;
  const long long k = PyLong_AsLongLong(ko);
  if (k == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  Py_ssize_t metric_size = 0;
  const char* metric_chars = PyUnicode_AsUTF8AndSize(mo, &metric_size);
  if (metric_chars == nullptr) return nullptr;
  const c10::string_view metric(metric_chars, static_cast<size_t>(metric_size));  // (an embedded NUL stays)
  const at::Tensor& x = THPVariable_Unpack(xo);
  const at::Tensor& p = THPVariable_Unpack(po);
  SearchArgs checked;
  if (!plain_cpu_float(x) || !plain_cpu_float(p) || !no_modes() || !search_problem(x, p, k, metric, checked).empty())
    Py_RETURN_NONE;
  // the profiler still sees the call under the op's name (a flag test when it is off)
  RECORD_FUNCTION("pyeditor::nearest_prototype", std::vector<c10::IValue>({x, p}));
  std::tuple<at::Tensor, at::Tensor> out;
  const double work = static_cast<double>(checked.batch) * static_cast<double>(checked.count) *
                      static_cast<double>(checked.dim);
  if (work < static_cast<double>(1 << 20)) {
    out = nearest_prototype_cpu_checked(x, p, checked);
  } else {  // long searches let other Python threads run
    NoGil released;
    out = nearest_prototype_cpu_checked(x, p, checked);
  }
  return Py_BuildValue("(NN)", THPVariable_Wrap(std::move(std::get<0>(out))),
                       THPVariable_Wrap(std::move(std::get<1>(out))));
  END_HANDLE_TH_ERRORS
}

}  // namespace pyeditor
