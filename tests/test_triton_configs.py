"""The Triton kernels' block sizes are data (kernels/*_CONFIGS, autotuned on a GPU): every config of
every table must compute the same result, so each one runs here on small ragged shapes (the
interpreter on CPU), bound alone to its kernel; and launches pass no block size of their own."""
import pytest
import torch

import pyeditor
from pyeditor import backends, quant
from pyeditor import reference as ref

pytestmark = pytest.mark.triton
if not backends.triton_available():
    pytest.skip("needs Triton", allow_module_level=True)

from pyeditor.kernels import configs, edit, hyper, search  # noqa: E402
from pyeditor.kernels import quant as kquant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _each(module, name, table):
    """(id, patch) per config: patch binds that config alone to the Tuned object module.name."""
    tuned = getattr(module, name)
    kernel = tuned._fixed.fn
    for i, cfg in enumerate(table, 1):
        yield pytest.param(module, name, configs.Tuned(kernel, [cfg], cfg, key=tuned._fixed.keys),
                           id=f"{name.strip('_').lower()}-{i}")


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=tol, rtol=tol)


def _edit_case():
    theta, delta, idx = _rand(3, 19, 70), _rand(4, 19, 70, seed=1), torch.tensor([0, 2, 1, 2], device=DEVICE)
    _close(pyeditor.apply_edit(theta, delta, 0.5, idx, backend="triton"), ref.apply_edit(theta, delta, 0.5, idx))


def _search_case(dtype):
    x, p = _rand(37, 20).to(dtype), _rand(70, 20, seed=1).to(dtype)
    got = pyeditor.nearest_prototype(x, p, 2, backend="triton")  # float64: the EXACT passes only
    assert torch.equal(got[1].cpu(), ref.nearest_prototype(x, p, 2)[1].cpu())


def _packed(group):
    p = quant.quantize_channelwise(_rand(40, 70).cpu(), torch.tensor([2, 4, 6, 8] * 10), group)
    return p.to(DEVICE), p.quantized()


def _linear_case(m):
    p, qw = _packed(32)
    x = _rand(m, 70, seed=m)
    _close(quant.packed_linear(x, p, backend="triton"), ref.packed_linear(x.cpu(), qw))


def _dequant_case():
    p, qw = _packed(32)
    assert torch.equal(quant.dequantize(p, backend="triton").cpu(), qw.dequantize())


_IDX = torch.tensor([0, 2, 1, 2, 0], device=DEVICE)


def _edited_linear_case():
    x, theta, delta = _rand(5, 19, 40), _rand(3, 40, 37, seed=1), _rand(5, 40, 37, seed=2)
    _close(pyeditor.edited_linear(x, theta, delta, 0.5, None, _IDX, backend="triton"),
           ref.edited_linear(x, theta, delta, 0.5, None, _IDX), tol=1e-4)


def _hyper_case():
    e, w, b = _rand(5, 40), _rand(3, 40, 70, seed=3), _rand(3, 70, seed=4)
    _close(pyeditor.hyper_matmul(e, w, b, _IDX, backend="triton"), ref.hyper_matmul(e, w, b, _IDX), tol=1e-4)
    _close(pyeditor.edit_norms(e, w, b, backend="triton", method="fused"), ref.edit_norms(e, w, b), tol=1e-4)


def _weight_grad_case():
    e, w, b = _rand(5, 40), _rand(3, 40, 70, seed=3), _rand(3, 70, seed=4)
    grads = []
    for fn in (lambda *a: pyeditor.hyper_matmul(*a, backend="triton"), ref.hyper_matmul):
        ww = w.clone().requires_grad_()
        fn(e, ww, b, _IDX).square().sum().backward()
        grads.append(ww.grad)
    _close(*grads, tol=1e-3)


CASES = {"_EDIT": _edit_case, "_FAST": lambda: _search_case(torch.float32),
         "_EXACT": lambda: _search_case(torch.float64), "_GEMM": lambda: _linear_case(37),
         "_GEMV": lambda: _linear_case(3), "_DEQUANT": _dequant_case, "_EDITED_LINEAR": _edited_linear_case,
         "_HYPER": _hyper_case, "_WEIGHT_GRAD": _weight_grad_case}
# the first config of each table is the interpreter's, which every other Triton test runs
TABLES = [*_each(edit, "_EDIT", edit.EDIT_CONFIGS[1:]),
          *_each(search, "_FAST", search.FAST_CONFIGS[1:]), *_each(search, "_EXACT", search.EXACT_CONFIGS[1:]),
          *_each(kquant, "_GEMM", kquant.LINEAR_GEMM_CONFIGS[1:]),
          *_each(kquant, "_GEMV", kquant.LINEAR_GEMV_CONFIGS[1:]),
          *_each(kquant, "_DEQUANT", kquant.DEQUANT_CONFIGS[1:]),
          *_each(hyper, "_EDITED_LINEAR", hyper.EDITED_LINEAR_CONFIGS[1:]),
          *_each(hyper, "_HYPER", hyper.HYPER_CONFIGS[1:]),
          *_each(hyper, "_WEIGHT_GRAD", hyper.WEIGHT_GRAD_CONFIGS[1:])]


@pytest.mark.parametrize("module,name,single", TABLES)
def test_every_config_computes_the_reference(monkeypatch, module, name, single):
    monkeypatch.setattr(module, name, single)
    CASES[name]()


def test_the_interpreter_runs_the_first_config_of_each_table():
    for tuned in (edit._EDIT, search._FAST, search._EXACT, kquant._GEMM, kquant._GEMV, kquant._DEQUANT,
                  hyper._EDITED_LINEAR, hyper._HYPER, hyper._WEIGHT_GRAD):
        assert tuned.interpreter is tuned.table[0] and len(tuned._fixed.configs) == 1
        assert tuned.on(torch.zeros(1)) is tuned._fixed  # CPU tensors: the interpreter
        assert len(tuned._gpu.configs) == len(tuned.table) >= 1
