"""pyeditor.gptq / quantizers.gptq (error-feedback quantization from calibration activations) against
a direct float64 computation of the textbook algorithm, and the data-free search against min-max.

The direct computation here is written independently of pyeditor.gptq: the inverse Hessian's
upper Cholesky factor U (H^-1 = U^T U), one column at a time with the full update of every later
column, no blocks, the group's scale chosen from the updated weights when its first column comes.
pyeditor.gptq instead factors H itself (no inverse) and updates lazily in blocks; in float64 the
two must give the same codes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyeditor import gptq, quantizers
from pyeditor import nn as pnn

TINY = torch.finfo(torch.float32).tiny


def _clip_params(wg, qmax, weight):
    """float64 [n, m] group -> per row (scale, zero) of the clip ratio with the least weighted error."""
    lo = wg.min(1).values.clamp(max=0.0)
    hi = wg.max(1).values.clamp(min=0.0)
    best = None
    for r in gptq.CLIP_RATIOS:
        s = ((hi - lo) * r / qmax).clamp(min=TINY)
        z = torch.minimum(torch.round(-r * lo / s).clamp(min=0.0), qmax)
        q = torch.minimum(torch.clamp(torch.round(wg / s[:, None]) + z[:, None], min=0.0), qmax[:, None])
        e = (((q - z[:, None]) * s[:, None] - wg) ** 2 * weight[None]).sum(1)
        if best is None:
            best = [e, s, z]
        else:
            m = e < best[0]
            best = [torch.where(m, e, best[0]), torch.where(m, s, best[1]), torch.where(m, z, best[2])]
    return best[1], best[2]


def _textbook(w, bits, group_size, x):
    """float64 GPTQ: codes [n, k], scale [n, G], zero [n, G]."""
    w = w.double()
    n, k = w.shape
    h = x.double().T @ x.double() / x.shape[0]
    h = h + gptq.DAMP * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = 2.0 ** torch.as_tensor(bits, dtype=torch.float64).expand(n) - 1.0
    gs = k if group_size is None else group_size
    groups = -(-k // gs)
    W = w.clone()
    codes = torch.zeros(n, k, dtype=torch.float64)
    scale = torch.zeros(n, groups, dtype=torch.float64)
    zero = torch.zeros(n, groups, dtype=torch.float64)
    for c in range(k):
        g = c // gs
        if c % gs == 0:
            cols = slice(c, min(c + gs, k))
            scale[:, g], zero[:, g] = _clip_params(W[:, cols], qmax, h.diagonal()[cols])
        s, z = scale[:, g], zero[:, g]
        q = torch.minimum(torch.clamp(torch.round(W[:, c] / s) + z, min=0.0), qmax)
        codes[:, c] = q
        err = (W[:, c] - (q - z) * s) / u[c, c]
        W[:, c + 1:] -= err[:, None] * u[c, c + 1:][None]
    return codes, scale, zero


def _case(n, k, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1.0 + 3.0 * torch.rand(n, 1, generator=g))
    x = torch.randn(4 * k + 7, k, generator=g)
    if outliers:  # a few loud inputs, and correlated ones, like transformer activations
        x[:, :3] *= 8.0
        x[:, 5] = x[:, 4] + 0.1 * x[:, 5]
    return w, x


def _out_err(w, qw, x):
    e = (w.double() - qw.dequantize().double())
    return ((x.double() @ e.T) ** 2).sum(0)


MIXED = torch.tensor([2, 4, 6, 8, 4, 4, 8, 2])
SHAPES = [(8, 96, 32, 4), (8, 200, 64, MIXED), (16, 130, None, 4), (8, 136, 128, MIXED), (8, 40, 32, 2)]


@pytest.mark.parametrize("n,k,group_size,bits", SHAPES)
def test_float64_run_equals_textbook_gptq(n, k, group_size, bits):
    bits = bits.repeat(n // 8) if isinstance(bits, torch.Tensor) else bits
    w, x = _case(n, k, seed=n * k)
    h = x.double().T @ x.double() / x.shape[0]
    r, lam = gptq.factor(h, torch.float64)
    qmax = 2.0 ** torch.as_tensor(bits, dtype=torch.float64).expand(n) - 1.0
    codes, scale, zero, obj = gptq.run(w.double(), qmax, group_size, r, lam)
    want_codes, want_scale, want_zero = _textbook(w, bits, group_size, x)
    assert torch.equal(codes.double(), want_codes)
    torch.testing.assert_close(scale, want_scale, rtol=1e-10, atol=0)
    assert torch.equal(zero, want_zero)
    # the objective read off the running sums is the output error D H D^T
    d = w.double() - (codes.double() - zero.repeat_interleave(k if group_size is None else group_size, 1)[:, :k]) \
        * scale.repeat_interleave(k if group_size is None else group_size, 1)[:, :k]
    torch.testing.assert_close(obj, ((d @ h) * d).sum(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,k,group_size,bits", SHAPES)
def test_float32_gptq_matches_textbook_and_beats_minmax(n, k, group_size, bits):
    bits = bits.repeat(n // 8) if isinstance(bits, torch.Tensor) else bits
    w, x = _case(n, k, seed=n * k + 1)
    qw = quantizers.gptq(w, bits, group_size, activations=x)
    assert qw.codes.dtype == torch.uint8 and qw.zero.dtype == torch.int32 and qw.scale.dtype == torch.float32
    assert qw.scale.shape == ((n,) if group_size is None else (n, -(-k // group_size)))
    mm = quantizers.minmax(w, bits, group_size)
    e_q, e_mm = _out_err(w, qw, x), _out_err(w, mm, x)
    assert bool((e_q <= e_mm * (1 + 1e-5)).all())  # per output row, on the calibration data
    assert float(e_q.sum()) < 0.8 * float(e_mm.sum())
    codes, scale, zero = _textbook(w, bits, group_size, x)
    # float32 vs float64: the same codes but for rounding ties, and the same output error
    rows = e_q < e_mm * (1 - 1e-3)  # rows that kept GPTQ (the rest fell back to min-max)
    assert float((qw.codes[rows].double() == codes[rows]).double().mean()) > 0.98
    ref = type(qw)(codes.to(torch.uint8), scale.float(), zero.to(torch.int32), qw.bits, group_size)
    if group_size is None:
        ref = ref._replace(scale=ref.scale[:, 0], zero=ref.zero[:, 0])
    torch.testing.assert_close(e_q[rows], _out_err(w, ref, x)[rows], rtol=2e-2, atol=0)


def test_gptq_empty_silent_and_odd_shapes():
    for n, k in ((0, 16), (4, 0), (1, 1), (3, 33)):
        w = torch.randn(n, k)
        x = torch.randn(10, k)
        qw = quantizers.gptq(w, 4, 32 if k >= 32 else None, activations=x)
        assert qw.codes.shape == (n, k)
        if n * k:
            mm = quantizers.minmax(w, 4, 32 if k >= 32 else None)
            assert bool((_out_err(w, qw, x) <= _out_err(w, mm, x) * (1 + 1e-5)).all())
    w = torch.randn(8, 64)
    silent = quantizers.gptq(w, 4, 32, activations=torch.zeros(12, 64))  # no signal: min-max
    mm = quantizers.minmax(w, 4, 32)
    assert torch.equal(silent.codes, mm.codes) and torch.equal(silent.scale, mm.scale)
    one = quantizers.gptq(w, 4, 32, activations=torch.randn(1, 64))  # one sample: rank-1 H, damped
    assert one.codes.shape == (8, 64)
    batched = torch.randn(2, 9, 64)
    a = quantizers.gptq(w, 4, 32, activations=batched)
    b = quantizers.gptq(w, 4, 32, activations=batched.reshape(18, 64).clone())
    assert torch.equal(a.codes, b.codes)


def test_gptq_bad_input_names_the_argument():
    w, x = torch.randn(8, 32), torch.randn(20, 32)
    with pytest.raises(ValueError, match="activations"):
        quantizers.gptq(w, 4, 32, activations=torch.randn(20, 31))
    with pytest.raises(ValueError, match="activations"):
        quantizers.gptq(w, 4, 32, activations=torch.full((3, 32), float("nan")))
    with pytest.raises(TypeError, match="activations"):
        quantizers.gptq(w, 4, 32, activations=x.numpy())
    with pytest.raises(ValueError, match="activations"):
        quantizers.quantize(w, 4, 32, method="gptq")
    with pytest.raises(ValueError, match="bits"):
        quantizers.gptq(w, torch.full((7,), 4), 32, activations=x)
    with pytest.raises(ValueError, match="group_size"):
        quantizers.gptq(w, 4, 48, activations=x)
    with pytest.raises(ValueError, match="weight"):
        quantizers.gptq(torch.randn(2, 8, 32), 4, 32, activations=x)
    with pytest.raises(ValueError, match="weight"):
        quantizers.gptq(torch.full((8, 32), float("inf")), 4, 32, activations=x)


def test_quantize_model_runs_gptq_from_calibration():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 40)).eval()
    x = torch.randn(48, 64)
    x[:, :2] *= 6.0
    with torch.no_grad():
        want = model(x)
    errs = {}
    for kw in ({"method": "minmax"}, {"calibration": x, "method": "gptq"}):
        import copy

        q = pnn.quantize_model(copy.deepcopy(model), 4, group_size=32, **kw)
        assert isinstance(q[0], pnn.PackedLinear)
        with torch.no_grad():
            errs[kw["method"]] = float((q(x) - want).square().sum())
    assert errs["gptq"] < errs["minmax"]
    with pytest.raises(ValueError, match="gptq"):
        pnn.quantize_model(model, 4, group_size=32, method="gptq")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 150), group_size=st.sampled_from([None, 32, 64, 128]),
       width=st.sampled_from([2, 4, 6, 8, "mixed"]), seed=st.integers(0, 2**31 - 1),
       outlier=st.floats(1.0, 50.0))
def test_search_never_worse_than_minmax_on_weight_error(n, k, group_size, width, seed, outlier):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, torch.randint(0, k, (max(1, k // 16),), generator=g)] *= outlier
    bits = torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)] if width == "mixed" else width
    mm = quantizers.minmax(w, bits, group_size)
    se = quantizers.search(w, bits, group_size)
    gs = k if group_size is None else group_size
    groups = -(-k // gs)

    def per_group(qw):
        e = torch.nn.functional.pad((w.double() - qw.dequantize().double()) ** 2, (0, groups * gs - k))
        return e.reshape(n, groups, gs).sum(2)

    assert bool((per_group(se) <= per_group(mm) * (1 + 1e-9) + 1e-30).all())
