"""Group-wise scales (group_size 32, 64, 128; ragged last group) on every backend against
pyeditor.reference: the reference quantizer's own rules, bit-exact packing and dequantization,
packed_linear (exact and int8 modes, every width mixed per channel, odd and ragged K, dtypes),
autograd, opcheck, torch.compile and bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyeditor import quant
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params, backend_rows_params
from test_quant import rand, rand_bits

BACKENDS = backend_params()
GROUPS = [32, 64, 128]


def both(w, bits, group_size):
    return quant.quantize_channelwise(w, bits, group_size), ref.quantize_channelwise(w, bits, group_size)


# ---------------------------------------------------------------- the reference's own rules
def test_reference_group_rules_by_hand():
    """Each group of a channel gets its own min-max scale; the ragged last group too."""
    w = torch.cat([torch.full((1, 32), 2.0), torch.linspace(-1, 1, 32)[None], torch.tensor([[0.5, -4.0]])], 1)
    qw = ref.quantize_channelwise(w, 4, 32)
    assert qw.scale.shape == (1, 3) and qw.zero.shape == (1, 3) and qw.group_size == 32
    assert qw.scale[0, 0] == 2.0 and qw.zero[0, 0] == 0  # constant group: exact
    assert torch.equal(ref.dequantize(qw)[0, :32], w[0, :32])
    assert torch.isclose(qw.scale[0, 1], torch.tensor(2.0 / 15))
    assert torch.isclose(qw.scale[0, 2], torch.tensor(4.5 / 15))  # the 2-input ragged group
    err = (ref.dequantize(qw) - w).abs()
    assert bool((err[0, 32:64] <= qw.scale[0, 1] / 2 + 1e-7).all())


def test_group_of_whole_row_equals_per_channel_values():
    w = rand((5, 32), seed=3)
    per_channel = ref.quantize_channelwise(w, 4)
    grouped = ref.quantize_channelwise(w, 4, 32)
    assert torch.equal(ref.dequantize(per_channel), ref.dequantize(grouped))
    assert torch.equal(per_channel.scale, grouped.scale[:, 0])


def test_groups_shrink_error_with_outlier_columns():
    w = rand((64, 256), seed=4)
    w[:, 7] *= 40.0  # one outlier input column: per channel, every scale is set by it
    err = {g: (ref.dequantize(ref.quantize_channelwise(w, 4, g)) - w).pow(2).mean().item() for g in (None, 64)}
    assert err[64] < err[None] / 3  # three of the four groups no longer see the outlier


# ---------------------------------------------------------------- packing: exact
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(0, 300), group=st.sampled_from(GROUPS), seed=st.integers(0, 2**16),
       data=st.data())
def test_roundtrip_exact_property(n, k, group, seed, data):
    bits = torch.tensor(data.draw(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=n, max_size=n)))
    w = rand((n, k), seed=seed, scale=data.draw(st.sampled_from([1e-3, 1.0, 50.0])))
    if n > 1 and k:
        w[0] = w[0, 0]  # a constant channel
    p, qw = both(w, bits, group)
    assert p.group_size == group and tuple(p.scale.shape) == (ref.n_groups(k, group), p.perm.numel())
    assert torch.equal(p.codes(), qw.codes)
    back = p.quantized()
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    want = ref.dequantize(qw)
    assert torch.equal(quant.dequantize(p, backend="reference"), want)
    assert torch.equal(quant.dequantize(p, backend="cpu"), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(37, 200), (16, 64), (3, 0), (0, 40), (20, 17)])
def test_dequantize_bit_exact(backend, device, group, n, k):
    p, qw = both(rand((n, k), seed=1), rand_bits(n, seed=2), group)
    assert torch.equal(quant.dequantize(p.to(device), backend=backend).cpu(), ref.dequantize(qw))


# ---------------------------------------------------------------- packed_linear
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 17, 100), (17, 33, 130), (2, 16, 576)])
def test_linear_matches_reference(backend, device, group, dtype, m, n, k):
    p, qw = both(rand((n, k), seed=m + k), rand_bits(n, seed=n), group)
    x = rand((m, k), dtype, seed=5)
    b = rand((n,), seed=6)
    got = quant.packed_linear(x.to(device), p.to(device), b.to(device), backend=backend)
    assert got.dtype == dtype and got.shape == (m, n)
    check_close(got.cpu(), ref.packed_linear(x, qw, b), tol=reduction_tolerance(dtype, k))


@pytest.mark.parametrize("m", [1, 2, 7, 64])
@pytest.mark.parametrize("width", [2, 4, 6, 8])
def test_cpu_every_width_and_row_count(m, width):
    """The one-row walk over several same-width tiles, and the per-tile path for more rows."""
    n, k = 160, 320  # ten tiles: more than one walk of kRowTiles
    p, qw = both(rand((n, k), seed=width), width, 64)
    x = rand((m, k), seed=m)
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw),
                tol=reduction_tolerance(torch.float32, k))


def test_cpu_large_inputs_against_zero_weight_do_not_cancel():
    """A huge activation column against exactly-zero weights: the factored zero-point form must
    not lose the small rest of the sum (an all-zero group has zero codes and zero point, so its
    sums are exactly zero in every kernel)."""
    w = rand((16, 128), seed=1)
    w[:, :64] = 0.0
    p, qw = both(w, 4, 64)
    x = rand((1, 128), seed=2)
    x[0, :64] = 1e7
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw),
                tol=reduction_tolerance(torch.float32, 128))



def _cpu_quant_level() -> str:
    from pyeditor import _ext

    return _ext.build_info().get("quant_cpu", "")


def _cpu_factored(m: int, bits, group) -> bool:
    """Whether the C++ CPU kernels sum codes against x in float32 and subtract zero point times
    sum(x) after for a call whose rows hold one input far above the rest (PackedLinear's
    docstring): per-channel calls of 9+ rows on AMX (its bf16 GEMM). Every other call sums
    centred codes, (q - z) x: many rows always, one or two rows because such a row is spiky
    (quant_plan.h spiky_row), which takes the centred kernels on every CPU."""
    return "amx" in _cpu_quant_level() and group is None and m > 8


@pytest.mark.parametrize("backend,device,m", backend_rows_params([1, 2, 3, 4, 16], fast_rows=(1, 16)))
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("huge", [1e6, 1e12])
def test_huge_input_against_zero_point_code_does_not_cancel(backend, device, m, group, huge):
    """An input 10^6 or 10^12 times the rest of its row against codes equal to their zero point
    (weight 0): the kernels that sum centred codes, (q - z) x, as the reference does, stay within
    the float32 reduction tolerance of x @ W.T (where those products are 0) relative to
    sum |x| |W|; the factored form sum q x - z sum x misses it by 10^3-10^5 at 10^6 and loses the
    rest of the row at 10^12, as does the one-row digits' 46-bit copy. The CPU calls that still
    form it (_cpu_factored, stated in PackedLinear's docstring) are skipped; test_isa_paths reruns
    this under each ISA cap."""
    k = 256
    checked = 0
    for bits in (2, 4, 8, rand_bits(64, seed=5)):
        if backend == "cpu" and _cpu_factored(m, bits, group):
            continue
        checked += 1
        p, qw = both(rand((64, k), seed=3), bits, group)
        x = rand((m, k), seed=4)
        x[:, 7] = huge  # against column 7's codes, several equal to their (group's) zero point
        w = ref.dequantize(qw).double()
        got = quant.packed_linear(x.to(device), p.to(device), backend=backend).cpu().double()
        want = x.double() @ w.T
        mag = x.double().abs() @ w.abs().T
        rtol = reduction_tolerance(torch.float32, k)[1]
        err = float(((got - want).abs() / mag).max())
        assert err <= rtol, (bits if isinstance(bits, int) else "mixed", err)
    if not checked:
        pytest.skip(f"every width takes the factored form here ({_cpu_quant_level() or 'portable'}, {m} row)")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_inputs(backend, device):
    p, qw = both(rand((16, 96), seed=1), rand_bits(16, seed=1), 32)
    x = rand((3, 96), seed=2)
    x[0, 5] = float("inf")
    x[1, 70] = float("nan")
    got = quant.packed_linear(x.to(device), p.to(device), backend=backend).cpu()
    check_close(got, ref.packed_linear(x, qw), tol=reduction_tolerance(torch.float32, 96))


def _fast_bound(x, qw):
    """|y - exact| <= max|x_row| / 254 * sum_k |W[n, k]| (+ fp32 rounding) for int8 activations."""
    return x.double().abs().amax(1, keepdim=True) / 254 * ref.dequantize(qw).double().abs().sum(1)


@pytest.mark.parametrize("group", GROUPS)
def test_cpu_one_row_group_kernels(group):
    """One row takes the group-aware row kernels: the fixed-point digits on AVX-512 VNNI
    (quant_group_digits.cpp, every width; rows with inf / NaN take the float ones there), the
    AVX2 float kernels (quant_group_avx2.cpp) under the AVX2 cap, the per-group path on the
    portable one (test_isa_paths reruns this file under each cap): 4-bit runs of 8 tiles and a partial one
    beside every other width, K = 1000 (a ragged last group), a bias; rows scaled far down and up
    (the codes read in place as denormals, converted, or neither: the float rows), a zero row,
    bfloat16, inf / NaN, flush-to-zero on; the int8 mode within its error bound."""
    n, k = 230, 1000
    bits = torch.cat([torch.full((150,), 4), rand_bits(n - 150, seed=41)])
    p, qw = both(rand((n, k), seed=42), bits, group)
    x, b = rand((1, k), seed=43), rand((n,), seed=44)
    tol = reduction_tolerance(torch.float32, k)
    check_close(quant.packed_linear(x, p, b, backend="cpu"), ref.packed_linear(x, qw, b), tol=tol)
    for e in (-127, -112, 100):  # 2^-127: mostly float32 denormals; against the float64 reference
        xs = x * 2.0 ** e
        got = quant.packed_linear(xs, p, backend="cpu").double() * 2.0 ** -e
        check_close(got, ref.packed_linear(xs.double(), qw) * 2.0 ** -e, tol=tol)
    z = torch.zeros(1, k)
    check_close(quant.packed_linear(z, p, backend="cpu"), ref.packed_linear(z, qw), tol=(0.0, 0.0))
    xb = x.to(torch.bfloat16)
    check_close(quant.packed_linear(xb, p, backend="cpu"), ref.packed_linear(xb, qw),
                tol=reduction_tolerance(torch.bfloat16, k))
    for bad in (float("nan"), float("inf")):
        xi = x.clone()
        xi[0, 70] = bad
        got, want = quant.packed_linear(xi, p, backend="cpu"), ref.packed_linear(xi, qw)
        for fn in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(fn(got), fn(want))
    was = quant.packed_linear(x, p, backend="cpu")
    torch.set_flush_denormal(True)
    try:
        assert torch.equal(quant.packed_linear(x, p, backend="cpu"), was)
    finally:
        torch.set_flush_denormal(False)
    got = quant.packed_linear(x, p, fast=True, backend="cpu").double()
    exact = ref.packed_linear(x, qw).double()
    assert bool(((got - exact).abs() <= _fast_bound(x, qw) + 1e-4 * exact.abs() + 1e-4).all())


@pytest.mark.parametrize("m", [1, 5])
def test_fast_mode_error_bound(m):
    """int8 activations: |y - exact| <= max|x_row| / 254 * sum_k |W[n, k]| (+ fp32 rounding)."""
    n, k = 50, 200
    p, qw = both(rand((n, k), seed=m), rand_bits(n, seed=m), 64)
    x = rand((m, k), seed=11)
    got = quant.packed_linear(x, p, fast=True, backend="cpu").double()
    exact = ref.packed_linear(x, qw).double()
    assert bool(((got - exact).abs() <= _fast_bound(x, qw) + 1e-4 * exact.abs() + 1e-4).all())


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend, device):
    # K = 40: a full group of 32 and a ragged one of 8. The interpreter runs a kernel launch per
    # perturbed input, so Triton on CPU takes gradcheck's fast mode (random projections of the
    # Jacobian, still a numerical check of every entry's contribution)
    p, _ = both(rand((6, 40), seed=1), rand_bits(6, seed=1), 32)
    p = p.to(device)
    x = rand((2, 40), torch.float64, seed=2).to(device).requires_grad_()
    b = rand((6,), torch.float64, seed=3).to(device).requires_grad_()
    fn = lambda x, b: quant.packed_linear(x, p, b, backend=backend)  # noqa: E731
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, (x, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, b), fast_mode=fast)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    p, qw = both(rand((8, 100), seed=1), rand_bits(8, seed=1), 64)
    fn = torch.compile(lambda x: quant.packed_linear(x, p), fullgraph=True)
    x = rand((3, 100), seed=2)
    check_close(fn(x), ref.packed_linear(x, qw), tol=reduction_tolerance(torch.float32, 100))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [16, 48, 0, 256, -64])
def test_bad_group_size_named(bad):
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_channelwise(rand((4, 64)), 4, bad)
    with pytest.raises(TypeError, match="group_size"):
        quant.quantize_channelwise(rand((4, 64)), 4, 64.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_refuses_mismatched_scales(backend, device):
    from pyeditor import ops
    linear, dequant = ops.quant_ops(backend)
    p, _ = both(rand((16, 100), seed=1), 4, 32)  # 4 groups
    p = p.to(device)
    x = rand((2, 100), seed=2).to(device)
    args = lambda scale, zero, gs: (x, p.data, scale, zero, p.perm, p.flat_buckets, 100, 16, None, False, gs)  # noqa: E731
    with pytest.raises(RuntimeError, match="group_size"):
        linear(*args(p.scale, p.zero, 48))
    with pytest.raises(RuntimeError, match="scale"):
        linear(*args(p.scale[:3].contiguous(), p.zero, 32))  # 3 groups for K = 100
    with pytest.raises(RuntimeError, match="zero"):
        linear(*args(p.scale, p.zero[:, :8].contiguous(), 32))
    with pytest.raises(RuntimeError, match="scale"):
        linear(*args(p.scale, p.zero, 0))  # a grouped scale read as per-channel
    with pytest.raises(RuntimeError, match="scale"):
        dequant(p.data, p.scale, p.zero, p.perm, p.flat_buckets, 100, 16, 64)
