"""The packed layers' bf16 mode (issue 29 item 2): activations rounded to bfloat16, then exact
mode. Every backend against pyeditor.reference on the rounded activations (shapes, dtypes,
group sizes, strides, special values), the mode's bound against the unrounded product, its
gradient (the exact layer's) and torch.compile (opcheck: test_quant.py's test_opcheck)."""
from __future__ import annotations

import math

import pytest
import torch

import pyeditor.nn as pnn
from pyeditor import backends, quant, reference
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params

BACKENDS = backend_params(include_reference=True)
needs_cpp = pytest.mark.skipif("cpu" not in backends.available("cpu"), reason="the C++ CPU backend is not built here")
K = 200  # not a multiple of any group size: a ragged last group, and a padded last block


def _packed(n: int, k: int, group_size, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    bits = torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]
    p = quant.quantize_channelwise(w, bits, group_size)
    return p, p.quantized(), torch.randn(n, generator=g)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bfloat16 (to nearest even): what the mode multiplies, in x's dtype (float16 x
    in float32: bfloat16 passes its range)."""
    return x.to(torch.bfloat16).to(torch.float32 if x.dtype == torch.float16 else x.dtype)


def _want(x, qw, b=None):
    """The reference on the rounded activations, in x's dtype."""
    return reference.packed_linear(_rounded(x), qw, b).to(x.dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bf16_mode_is_exact_mode_on_rounded_activations(backend, device, group_size, dtype):
    n = 40
    p, qw, b = _packed(n, K, group_size, seed=1)
    p = p.to(device)
    g = torch.Generator().manual_seed(2)
    for m in (0, 1, 3, 16):  # 16: the Triton GEMM (its tensor-core dot on a GPU; 17+ rows: the next test)
        x = (torch.randn(m, K, generator=g) * 3).to(dtype)
        got = quant.packed_linear(x.to(device), p, b.to(device), mode="bf16", backend=backend).cpu()
        assert got.dtype == dtype and got.shape == (m, n)
        check_close(got, _want(x, qw, b), dtype, reduction_tolerance(dtype, K))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_mode_strided_broadcast_and_3d_inputs(backend, device):
    p, qw, b = _packed(24, K, 64, seed=3)
    p = p.to(device)
    wide = torch.randn(17, 2 * K)
    cases = {
        "non-contiguous": wide[:, ::2],
        "stride-0 rows": torch.randn(1, K).expand(18, K),
        "3-d": torch.randn(2, 9, K),
    }
    for label, x in cases.items():
        got = quant.packed_linear(x.to(device), p, b.to(device), mode="bf16", backend=backend).cpu()
        want = _want(x, qw, b)
        try:
            check_close(got, want, torch.float32, reduction_tolerance(torch.float32, K))
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_mode_special_values(backend, device):
    """NaN, +-inf, values that round to inf in bfloat16 (above its largest finite 3.3895e38),
    subnormals and ties: the reference on the same rounded inputs, NaN exactly where it has NaN."""
    p, qw, _ = _packed(24, K, 32, seed=4)
    p = p.to(device)
    x = torch.randn(18, K)
    x[0, 5] = math.nan
    x[1, 7] = math.inf
    x[2, 9] = -math.inf
    x[3, :] = 3.4e38  # every input rounds to +inf
    x[5, :] = 1.0 + 2.0 ** -8  # a tie: rounds to even (1.0)
    x[6, :] = 1.0 + 3 * 2.0 ** -8  # a tie: rounds to even (1 + 2^-6)
    xr = _rounded(x)
    assert bool((xr[5] == 1.0).all()) and bool((xr[6] == 1.0 + 2.0 ** -6).all()) and bool(xr[3].isinf().all())
    got = quant.packed_linear(x.to(device), p, mode="bf16", backend=backend).cpu()
    want = reference.packed_linear(xr, qw)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    check_close(got[finite], want[finite], torch.float32, reduction_tolerance(torch.float32, K))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_mode_rounds_subnormals_and_float16_past_its_range(backend, device):
    """Inputs that are float32 subnormals round to bfloat16's subnormal spacing (2^-133): with
    weights near 2^124 the outputs are near 1, so a kernel that kept the dropped bits (or
    flushed the inputs to zero) misses the reference by far more than the tolerance. float16
    inputs of 65408 and more round to 65536, past float16's range: summed in float32 like the
    reference, not turned into inf."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, K, generator=g) * 2.0 ** 124
    p = quant.quantize_channelwise(w, 8, 64)
    x = torch.randn(18, K, generator=g).sign() * (2.0 ** -130 * (1 + torch.rand(18, K, generator=g)))
    xr = _rounded(x)
    assert not torch.equal(xr, x) and bool((xr != 0).all())
    got = quant.packed_linear(x.to(device), p.to(device), mode="bf16", backend=backend).cpu()
    want = _want(x, p.quantized())
    assert bool(want.isfinite().all()) and float(want.abs().max()) > 0.1
    check_close(got, want, torch.float32, reduction_tolerance(torch.float32, K))
    # float16 x near its largest value, against small weights: finite outputs
    small = quant.quantize_channelwise(torch.randn(24, K, generator=g) * 1e-3, 4, 32)
    xh = torch.full((17, K), 65504.0, dtype=torch.float16)
    xh[1::2] = -65472.0
    got = quant.packed_linear(xh.to(device), small.to(device), mode="bf16", backend=backend).cpu()
    want = _want(xh, small.quantized())
    assert got.dtype == torch.float16 and bool(want.isfinite().all())
    check_close(got, want, torch.float16, reduction_tolerance(torch.float16, K))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_mode_within_its_bound_of_the_unrounded_product(backend, device):
    p, qw, _ = _packed(32, K, 64, seed=5)
    p = p.to(device)
    x = torch.randn(20, K) * torch.logspace(-3, 3, K)  # magnitudes across six decades
    got = quant.packed_linear(x.to(device), p, mode="bf16", backend=backend).cpu().double()
    exact = reference.packed_linear(x.double(), qw)
    bound = quant.bf16_error_bound(x, reference.dequantize(qw))
    err = (got - exact).abs()
    atol, rtol = reduction_tolerance(torch.float32, K)  # exact mode's own rounding on top
    assert bool((err <= bound + atol + rtol * exact.abs()).all())
    # the mode does round: it differs from exact mode by more than float32 rounding somewhere
    assert float((err / (bound + 1e-30)).max()) > 0.05


@needs_cpp
def test_bf16_error_bound_is_attained_within_its_float_slack():
    """One input sits just below a bfloat16 tie, so it moves by nearly 2^-8 of itself; with a
    single weight the output moves by the same: the bound is tight."""
    w = torch.zeros(1, 16)
    w[0, 0] = 1.0
    p = quant.quantize_channelwise(w, 8)
    x = torch.zeros(1, 16)
    x[0, 0] = 1.0 + 2.0 ** -8 - 2.0 ** -23  # rounds down to 1.0
    got = quant.packed_linear(x, p, mode="bf16", backend="cpu").double()
    exact = reference.packed_linear(x.double(), p.quantized())
    bound = quant.bf16_error_bound(x, p)
    assert float((got - exact).abs()[0, 0]) > 0.99 * float(bound[0, 0]) > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_mode_gradients_are_the_exact_layers(backend, device):
    """The rounding is a straight-through step: grad_x = grad_y @ W and grad_bias = sum grad_y,
    as in exact mode, and the double backward (through grad_y) is exact mode's too."""
    p, _, b = _packed(24, K, 32, seed=6)
    p = p.to(device)
    x = torch.randn(5, K)
    grads = {}
    for mode in ("exact", "bf16"):
        xa = x.clone().to(device).requires_grad_()
        ba = b.clone().to(device).requires_grad_()
        gy = torch.randn(5, 24, generator=torch.Generator().manual_seed(8)).to(device).requires_grad_()
        y = quant.packed_linear(xa, p, ba, mode=mode, backend=backend)
        gx, gb = torch.autograd.grad(y, (xa, ba), gy, create_graph=True)
        ggy, = torch.autograd.grad((gx * gx).sum(), gy)
        grads[mode] = (gx.detach().cpu(), gb.detach().cpu(), ggy.cpu())
    for got, want in zip(grads["bf16"], grads["exact"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpp
def test_torch_compile_fullgraph_in_bf16_mode():
    torch._dynamo.reset()
    lin = torch.nn.Linear(K, 24)
    layer = pnn.PackedLinear.from_linear(lin, 4, 64, mode="bf16", backend="cpu")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, K)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        assert not torch.equal(layer(x), pnn.PackedLinear.from_linear(lin, 4, 64, backend="cpu")(x))
