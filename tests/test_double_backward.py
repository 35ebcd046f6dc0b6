"""Second derivatives (issue 26): double backward through apply_edit, edited_linear, hyper_matmul,
hyper_matmul_heads and generate_edit is exact on every backend, checked by gradgradcheck in
float64 (finite differences of the first backward), and emits no "autograd kernel was not
registered" warning (which used to come with silent zeros)."""
import warnings

import pytest
import torch
from torch.autograd import gradgradcheck

import pyeditor

from conftest import backend_params

BACKENDS = [p for p in backend_params(include_reference=True) if p.id in ("cpu", "triton", "reference")]


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _away_from(t: torch.Tensor, thr: float) -> torch.Tensor:
    """Keeps |delta| away from the clip bound, where finite differences would straddle the kink."""
    return torch.where((t.abs() - thr).abs() < 0.1, t * 0.5, t)


def _check(fn, inputs, backend):
    inputs = tuple(t.requires_grad_() for t in inputs)
    # (first derivatives: the ops' own test files.) The Triton interpreter is slow: fast_mode
    # checks random projections of the same Jacobians
    fast = backend == "triton"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["proto-index", "shared-delta", "per-sample-threshold"])
def test_apply_edit(backend, device, case):
    theta = _rand(3, 2, 3, seed=1)
    if case == "proto-index":
        delta, thr, idx = _rand(4, 2, 3, seed=2), 0.5, torch.tensor([2, 0, 1, 2])
    elif case == "shared-delta":  # one [R, C] edit broadcast over the prototypes: its gradient is summed
        delta, thr, idx = _rand(2, 3, seed=2), 0.5, None
    else:
        delta, thr, idx = _rand(4, 2, 3, seed=2), torch.tensor([0.3, 0.5, 0.8, 1.0], dtype=torch.float64), \
            torch.tensor([1, 1, 0, 2])
    delta = _away_from(delta, 0.5) if case != "per-sample-threshold" else delta
    if case == "per-sample-threshold":
        delta = torch.stack([_away_from(d, float(t)) for d, t in zip(delta, thr)])
    _check(lambda t, d: pyeditor.apply_edit(t, d, thr, idx, backend=backend), (theta, delta), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["proto-index-bias", "one-theta", "per-sample-theta"])
def test_edited_linear(backend, device, case):
    x = _rand(3, 2, 4, seed=1)
    delta = _away_from(_rand(3, 4, 2, seed=2), 0.5)
    if case == "proto-index-bias":
        theta, bias, idx = _rand(2, 4, 2, seed=3), _rand(2, 2, seed=4), torch.tensor([1, 0, 1])
        fn = lambda x, t, d, b: pyeditor.edited_linear(x, t, d, 0.5, b, idx, backend=backend)  # noqa: E731
        _check(fn, (x, theta, delta, bias), backend)
    elif case == "one-theta":
        theta, bias = _rand(4, 2, seed=3), _rand(2, seed=4)
        fn = lambda x, t, d, b: pyeditor.edited_linear(x, t, d, 0.5, b, backend=backend)  # noqa: E731
        _check(fn, (x, theta, delta, bias), backend)
    else:
        theta = _rand(3, 4, 2, seed=3)
        fn = lambda x, t, d: pyeditor.edited_linear(x, t, d, 0.5, backend=backend)  # noqa: E731
        _check(fn, (x, theta, delta), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("gathered", [True, False], ids=["index", "all-prototypes"])
def test_hyper_matmul(backend, device, gathered):
    e, w, b = _rand(4, 2, seed=1), _rand(3, 2, 5, seed=2), _rand(3, 5, seed=3)
    idx = torch.tensor([2, 0, 2, 1]) if gathered else None
    _check(lambda e, w, b: pyeditor.hyper_matmul(e, w, b, idx, backend=backend), (e, w, b), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("gathered", [True, False], ids=["index", "all-prototypes"])
def test_hyper_matmul_heads(backend, device, gathered):
    sizes = [2, 0, 3]  # an empty head too
    e, w, b = _rand(3, 4, 2, seed=1), _rand(2, 2, 5, seed=2), _rand(2, 5, seed=3)
    idx = torch.tensor([1, 0, 1, 1]) if gathered else None

    def fn(e, w, b):
        return torch.cat(pyeditor.hyper_matmul_heads(e, w, sizes, b, idx, backend=backend), -1)

    _check(fn, (e, w, b), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_generate_edit(backend, device):
    e, w, b = _rand(4, 2, seed=1), _rand(3, 2, 5, seed=2) * 0.3, _rand(3, 5, seed=3) * 0.3
    idx = torch.tensor([2, 0, 2, 1])
    g = pyeditor.generate_edit(e, w, b, idx, backend="reference")
    assert ((g.abs() - 0.5).abs() > 1e-3).all(), "inputs must stay off the clip bound"
    _check(lambda e, w, b: pyeditor.generate_edit(e, w, b, idx, threshold=0.5, backend=backend), (e, w, b), backend)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "reference"])
def test_weight_grad_op(backend, device):
    """hyper_weight_grad, the gathered d weight of both hyper ops, is itself differentiable."""
    op = pyeditor.ops.heads_ops(backend)[1]
    e, grad, idx = _rand(2, 4, 3, seed=1), _rand(4, 5, seed=2), torch.tensor([1, 0, 1, 2])
    _check(lambda e, g: op(e, g, [2, 3], idx, 3), (e, grad), backend)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "reference"])
def test_hessian_vector_product_matches_reference(backend, device):
    """A second-order quantity used in practice (d/dx of a gradient norm) against the reference."""
    x, theta, delta = _rand(3, 2, 4, seed=1), _rand(2, 4, 2, seed=2), _away_from(_rand(3, 4, 2, seed=3), 0.5)
    idx = torch.tensor([1, 0, 1])
    results = []
    for be in (backend, "reference"):
        xs, ts, ds = (t.clone().requires_grad_() for t in (x, theta, delta))
        y = pyeditor.edited_linear(xs, ts, ds, 0.5, None, idx, backend=be)
        gx, gt, gd = torch.autograd.grad(y.square().sum(), (xs, ts, ds), create_graph=True)
        penalty = gx.square().sum() + gt.square().sum() + gd.square().sum()
        results.append(torch.autograd.grad(penalty, (xs, ts, ds)))
    for got, want in zip(*results):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)
        assert got.abs().sum() > 0
