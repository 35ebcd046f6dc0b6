"""apply_edit on every backend against pyeditor.reference: dtypes, shapes, strides, edge
values, out=, autograd, opcheck, torch.compile and bad input."""
import math

import pytest
import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import check_close

from conftest import HAS_CUDA, backend_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = backend_params()


def make(shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


# (theta shape, delta shape, proto_index or None, threshold): the broadcasting forms of the op
CASES = {
    "single": ((7, 13), (7, 13), None, 0.5),
    "flat-delta": ((7, 13), (91,), None, 0.5),
    "batch-on-one-theta": ((5, 9), (4, 5, 9), None, 0.3),
    "flat-batch": ((5, 9), (4, 45), None, 0.3),
    "one-edit-all-protos": ((3, 5, 9), (5, 9), None, 0.7),
    "per-proto": ((3, 5, 9), (3, 5, 9), None, 0.7),
    "proto-index": ((3, 6, 11), (7, 6, 11), [2, 0, 1, 1, 2, 0, 2], 0.4),
    "proto-index-shared-delta": ((3, 6, 11), (6, 11), [2, 2, 0, 1], 0.4),
    "per-sample-threshold": ((3, 6, 11), (4, 6, 11), [1, 0, 2, 1], [0.0, 0.3, 1.0, math.inf]),
    "one-row": ((1, 1), (1, 1), None, 0.5),
    "empty-rows": ((0, 5), (0, 5), None, 0.5),
    "empty-cols": ((4, 0), (4, 0), None, 0.5),
    "empty-batch": ((3, 4, 5), (0, 4, 5), [], 0.5),
    "long-row": ((2, 20000), (2, 20000), None, 0.5),
}


def case_inputs(name, dtype, device):
    theta_shape, delta_shape, index, thr = CASES[name]
    theta = make(theta_shape, dtype, device, seed=1)
    delta = make(delta_shape, dtype, device, scale=2.0, seed=2)
    idx = None if index is None else torch.tensor(index, dtype=torch.int64, device=device)
    if isinstance(thr, list):
        thr = torch.tensor(thr, device=device)
    return theta, delta, thr, idx


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, device, dtype, case):
    theta, delta, thr, idx = case_inputs(case, dtype, device)
    got = pyeditor.apply_edit(theta, delta, thr, idx, backend=backend)
    check_close(got, ref.apply_edit(theta, delta, thr, idx))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_edge_values(backend, device, dtype):
    theta = make((4, 8), dtype, device)
    delta = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e-30, 0.5] * 4, dtype=dtype, device=device)
    delta = delta.view(4, 8)
    for thr in (0.0, 0.5, math.inf):
        got = pyeditor.apply_edit(theta, delta, thr, backend=backend)
        check_close(got, ref.apply_edit(theta, delta, thr))
        assert torch.isnan(got[0, 0]), "NaN in delta must stay NaN"
    if backend != "triton" or device != "cpu":  # the interpreter's bf16 store truncates
        k = pyeditor.apply_edit(theta, delta, 0.0, backend=backend)
        assert torch.equal(k[~torch.isnan(delta)], theta[~torch.isnan(delta)]), "T = 0 must leave theta"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_and_broadcast_inputs(backend, device):
    base_t = make((3, 12, 18), torch.float32, device, seed=3)
    base_d = make((6, 18, 12), torch.float32, device, scale=2, seed=4)
    theta = base_t[:, ::2, ::3]                      # [3, 6, 6] with row and col strides
    delta = base_d.transpose(1, 2)[::2, :6, :6]       # [3, 6, 6] transposed, every other sample
    idx = torch.tensor([2, 0, 1], device=device)
    for args in [
        (theta, delta, 0.5, idx),
        (theta, delta, 0.5, None),
        (theta[0], make((6, 6), torch.float32, device).expand(5, 6, 6), 0.5, None),   # stride-0 batch
        (theta[:1].expand(4, 6, 6), delta[:1].expand(4, 6, 6), 0.5, None),              # stride-0 both
        (make((6, 1), torch.float32, device).expand(6, 6), delta[0], 0.2, None),        # stride-0 columns
    ]:
        check_close(pyeditor.apply_edit(*args, backend=backend), ref.apply_edit(*args))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_writes_in_place(backend, device):
    theta = make((3, 5, 7), torch.float32, device)
    delta = make((4, 5, 7), torch.float32, device, scale=2)
    idx = torch.tensor([1, 0, 2, 1], device=device)
    out = torch.full((4, 5, 7), 123.0, device=device)
    res = pyeditor.apply_edit(theta, delta, 0.5, idx, out=out, backend=backend)
    assert res is out
    check_close(out, ref.apply_edit(theta, delta, 0.5, idx))
    strided = torch.zeros(4, 7, 5, device=device).transpose(1, 2)  # non-contiguous out
    pyeditor.apply_edit(theta, delta, 0.5, idx, out=strided, backend=backend)
    check_close(strided, ref.apply_edit(theta, delta, 0.5, idx))
    # serving: edit the device model's weight in place (out is theta)
    w = make((5, 7), torch.float32, device)
    expected = ref.apply_edit(w, delta[0], 0.5)
    pyeditor.apply_edit(w, delta[0], 0.5, out=w, backend=backend)
    check_close(w, expected)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_out_rejects_bad_buffers(backend, device):
    theta = make((5, 7), torch.float32, device)
    delta = make((5, 7), torch.float32, device)
    with pytest.raises(ValueError, match="out has shape"):
        pyeditor.apply_edit(theta, delta, 0.5, out=torch.empty(7, 5, device=device), backend=backend)
    with pytest.raises(TypeError, match="out dtype"):
        pyeditor.apply_edit(theta, delta, 0.5, out=torch.empty(5, 7, dtype=torch.float64, device=device), backend=backend)
    with pytest.raises(ValueError, match="broadcast"):
        pyeditor.apply_edit(theta, delta, 0.5, out=torch.empty(1, 7, device=device).expand(5, 7), backend=backend)
    big = torch.zeros(6, 7, device=device)
    with pytest.raises(ValueError, match="partially overlaps"):
        pyeditor.apply_edit(big[:5], delta, 0.5, out=big[1:], backend=backend)
    pyeditor.apply_edit(big[:3, :5].T, delta[:5, :3], 0.5, out=big[3:, :5].T, backend=backend)  # same storage, disjoint


def test_cpp_out_checks():
    """The C++ out= kernel checks the buffer itself too (direct op calls skip Python)."""
    theta, delta, t = torch.randn(5, 7), torch.randn(5, 7), torch.tensor(0.5)
    op = torch.ops.pyeditor.apply_edit_out
    with pytest.raises(RuntimeError, match="out has shape"):
        op(theta, delta, t, None, torch.empty(7, 5))
    with pytest.raises(RuntimeError, match="memory location"):
        op(theta, delta, t, None, torch.empty(1, 7).expand(5, 7))
    big = torch.zeros(6, 7)
    with pytest.raises(RuntimeError, match="memory location"):
        op(big[:5], delta, t, None, big[1:])


def test_out_refuses_autograd():
    theta = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="autograd"):
        pyeditor.apply_edit(theta, torch.randn(3, 4), 0.5, out=torch.empty(3, 4))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("case", ["proto-index", "batch-on-one-theta", "proto-index-shared-delta",
                                  "per-sample-threshold", "one-edit-all-protos", "single"])
def test_gradcheck(backend, device, case):
    theta, delta, thr, idx = case_inputs(case, torch.float64, device)
    theta, delta = theta[..., :2, :3], delta[..., :2, :3] if delta.dim() > 1 else delta  # tiny: finite differences
    # keep |delta| away from T so finite differences do not straddle the clip
    delta = torch.where((delta.abs() - 0.4).abs() < 0.05, delta * 0.5, delta)
    theta.requires_grad_()
    delta.requires_grad_()
    fn = lambda t, d: pyeditor.apply_edit(t, d, thr, idx, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (theta, delta), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_match_reference(backend, device):
    theta, delta, thr, idx = case_inputs("proto-index", torch.float32, device)
    delta = delta.clone()
    delta[0, 0, 0] = 0.4  # exactly at T: the gradient passes (clamp's convention)
    grads = []
    for fn in (lambda t, d: pyeditor.apply_edit(t, d, thr, idx, backend=backend), lambda t, d: ref.apply_edit(t, d, thr, idx)):
        t, d = theta.clone().requires_grad_(), delta.clone().requires_grad_()
        w = torch.randn(delta.shape, generator=torch.Generator().manual_seed(5)).to(device)
        (fn(t, d) * w).sum().backward()
        grads.append((t.grad, d.grad))
    check_close(grads[0][0], grads[1][0])
    check_close(grads[0][1], grads[1][1])


def _opcheck_samples(device):
    theta, delta, thr, idx = case_inputs("proto-index", torch.float32, device)
    t = torch.tensor(0.4, device=device)
    return [
        (theta, delta, t, idx),
        (theta[0], delta, t, None),
        (theta, delta[:3], torch.tensor([0.1, 0.2, 0.3], device=device), None),
    ]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    fwd, out_op, bwd = pyeditor.ops.edit_ops(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")  # no inductor on the interpreter
    for theta, delta, t, idx in _opcheck_samples(device):
        torch.library.opcheck(fwd, (theta, delta, t, idx), test_utils=tests)
        torch.library.opcheck(fwd, (theta.clone().requires_grad_(), delta.clone().requires_grad_(), t, idx), test_utils=tests)
        out = torch.empty(pyeditor.reference.apply_edit(theta, delta, t, idx).shape, device=device)
        torch.library.opcheck(out_op, (theta, delta, t, idx, out), test_utils=tests)
        grad = torch.randn(out.shape, device=device)
        torch.library.opcheck(bwd, (grad, delta.expand(out.shape), t), test_utils=tests)


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("triton", "cuda", id="triton", marks=pytest.mark.cuda),
                                            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda)])
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    theta, delta, thr, idx = case_inputs("proto-index", torch.float32, device)

    def step(theta, delta, idx):
        k = pyeditor.apply_edit(theta, delta, 0.4, idx, backend=backend)
        return (k * 2).sum(dim=0)

    compiled = torch.compile(step, fullgraph=True)
    check_close(compiled(theta, delta, idx), step(theta, delta, idx))
    t, d = theta.clone().requires_grad_(), delta.clone().requires_grad_()
    compiled(t, d, idx).sum().backward()
    t2, d2 = theta.clone().requires_grad_(), delta.clone().requires_grad_()
    step(t2, d2, idx).sum().backward()
    check_close(t.grad, t2.grad)
    check_close(d.grad, d2.grad)
    buf = torch.empty(7, 6, 11, device=device)
    serve = torch.compile(lambda th, de, ix, o: pyeditor.apply_edit(th, de, 0.4, ix, out=o, backend=backend), fullgraph=True)
    serve(theta, delta, idx, buf)
    check_close(buf, ref.apply_edit(theta, delta, 0.4, idx))


# ------------------------------------------------------------------ bad input
def test_bad_input_messages():
    theta, delta = torch.randn(3, 4, 5), torch.randn(6, 4, 5)
    idx = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match="delta dtype"):
        pyeditor.apply_edit(theta, delta.double(), 0.5, idx)
    with pytest.raises(TypeError, match="theta must be float32"):
        pyeditor.apply_edit(theta.int(), delta.int(), 0.5, idx)
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        pyeditor.apply_edit([[1.0]], delta, 0.5)
    with pytest.raises(ValueError, match="cannot be read as edits"):
        pyeditor.apply_edit(theta, torch.randn(6, 19), 0.5, idx)
    with pytest.raises(IndexError, match="proto_index value 3 is out of range for 3"):
        pyeditor.apply_edit(theta, delta, 0.5, torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(IndexError, match="proto_index value -1"):
        pyeditor.apply_edit(theta, delta, 0.5, torch.tensor([0, 1, 2, -1, 0, 0]))
    with pytest.raises(TypeError, match="proto_index must be an integer"):
        pyeditor.apply_edit(theta, delta, 0.5, idx.float())
    with pytest.raises(ValueError, match="delta has 6 samples but proto_index has 2"):
        pyeditor.apply_edit(theta, delta, 0.5, idx[:2])
    with pytest.raises(ValueError, match="needs theta as a \\[P, R, C\\]"):
        pyeditor.apply_edit(theta[0], delta, 0.5, idx)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        pyeditor.apply_edit(theta, delta, -0.1, idx)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        pyeditor.apply_edit(theta, delta, math.nan, idx)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        pyeditor.apply_edit(theta, delta, torch.tensor([0.1, 0.2, math.nan, 0.1, 0.1, 0.1]), idx)
    with pytest.raises(ValueError, match="threshold has 2 values"):
        pyeditor.apply_edit(theta, delta, torch.tensor([0.1, 0.2]), idx)
    with pytest.raises(ValueError, match="theta has 3 matrices and delta 6"):
        pyeditor.apply_edit(theta, delta, 0.5)
    with pytest.raises(ValueError, match="delta is on meta but theta is on cpu"):
        pyeditor.apply_edit(theta, delta.to("meta"), 0.5, idx)
    with pytest.raises(ValueError, match="backend must be one of"):
        pyeditor.apply_edit(theta, delta, 0.5, idx, backend="gpu")


def test_cpp_checks_bounds_itself():
    """The C++ kernel refuses bad input even when called directly, without the Python checks."""
    theta, delta = torch.randn(3, 4, 5), torch.randn(2, 4, 5)
    t = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyeditor.apply_edit(theta, delta, t, torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="threshold must be >= 0"):
        torch.ops.pyeditor.apply_edit(theta, delta, torch.tensor(-1.0), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="proto_index must be int64"):
        torch.ops.pyeditor.apply_edit(theta, delta, t, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="do not match theta's matrix shape"):
        torch.ops.pyeditor.apply_edit(theta, torch.randn(2, 5, 4), t, torch.tensor([0, 1]))


def test_backend_env_var(monkeypatch):
    theta, delta = torch.randn(3, 4), torch.randn(3, 4)
    monkeypatch.setenv("PYEDITOR_BACKEND", "reference")
    assert pyeditor.backends.resolve(None, theta.device) == "reference"
    assert pyeditor.backends.resolve("cpu", theta.device) == "cpu"  # the argument wins
    monkeypatch.setenv("PYEDITOR_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        pyeditor.apply_edit(theta, delta, 0.5)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only default")
def test_default_backend_on_cpu_is_cpp():
    assert pyeditor.backends.default("cpu") == "cpu"


def test_old_module_name_still_imports():
    # the edit family's module is pyeditor.edit; pyeditor.api stays as a deprecated alias
    import importlib
    import sys

    import pyeditor.edit

    sys.modules.pop("pyeditor.api", None)
    with pytest.warns(DeprecationWarning, match="pyeditor.api is deprecated"):
        api = importlib.import_module("pyeditor.api")
    assert api.apply_edit is pyeditor.edit.apply_edit is pyeditor.apply_edit
