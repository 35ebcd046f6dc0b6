"""Packed channel-wise 2/4/6/8-bit weights on every backend against pyeditor.reference: exact
codes and dequantization (hypothesis), packed_linear over dtypes / shapes / strides, the fast
int8 mode's error bound, autograd, opcheck, torch.compile, bad input, and the strategy codes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeditor
from pyeditor import quant
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params, backend_rows_params

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def rand(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand_bits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]


def both(w, bits):
    return quant.quantize_channelwise(w, bits), ref.quantize_channelwise(w, bits)


# ---------------------------------------------------------------- packing: exact codes
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(0, 70), seed=st.integers(0, 2**16), data=st.data())
def test_roundtrip_exact_property(n, k, seed, data):
    bits = torch.tensor(data.draw(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=n, max_size=n)))
    w = rand((n, k), seed=seed, scale=data.draw(st.sampled_from([1e-3, 1.0, 50.0])))
    if n > 1 and k:
        w[0] = w[0, 0]  # a constant channel
    p, qw = both(w, bits)
    assert torch.equal(p.codes(), qw.codes)
    want = ref.dequantize(qw)
    assert torch.equal(quant.dequantize(p, backend="reference"), want)
    assert torch.equal(quant.dequantize(p, backend="cpu"), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,k", [(37, 50), (1, 1), (16, 16), (3, 0), (0, 5)])
def test_dequantize_bit_exact(backend, device, n, k):
    w = rand((n, k), seed=1)
    if n > 2 and k:
        w[1] = 0.0
        w[2] = -3.0
    p, qw = both(w, rand_bits(n, seed=2))
    got = quant.dequantize(p.to(device), backend=backend)
    assert torch.equal(got.cpu(), ref.dequantize(qw))


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_every_code_value_survives(bits):
    """All 2**bits codes in every position of a block: the planes never lose or mix a bit."""
    q = 2 ** bits
    k = 64
    w = (torch.arange(16 * k) % q).float().view(16, k)
    w[:, 0] = 0.0
    w[:, 1] = q - 1  # so min/max give scale 1, zero 0
    p, qw = both(w, bits)
    assert torch.equal(qw.codes.float(), w)
    assert torch.equal(p.codes(), qw.codes)
    assert torch.equal(quant.dequantize(p, backend="cpu"), w)


def test_layout_groups_channels_by_width():
    bits = torch.tensor([8, 2, 4, 2, 6, 8, 2])
    p, _ = both(rand((7, 20)), bits)
    assert [b[0] for b in p.buckets] == [2, 4, 6, 8]
    assert all(b[2] % 16 == 0 for b in p.buckets)
    real = p.perm[p.perm >= 0].tolist()
    assert real == [1, 3, 6, 2, 4, 0, 5]  # stable within each width


def test_packed_size_and_metadata():
    p, _ = both(rand((4096, 256)), 4)
    assert p.data.numel() == 4096 * 256 // 2
    assert p.perm.dtype == torch.int16
    assert p.metadata_bytes == 4096 * (4 + 1 + 2)  # scale, zero point, int16 permutation entry
    assert "bytes" in repr(p)
    # the bound: a uniform 2-bit 384 x 1536 layer (the smallest codes per channel of the
    # benchmark shapes) stays under 2% metadata
    small = quant.quantize_channelwise(rand((384, 1536)), 2)
    assert small.metadata_bytes / small.nbytes < 0.02


def _slow_on_triton(params):
    """The same params, the Triton one also `slow` (the interpreter runs one program per tile)."""
    return [pytest.param(*p.values, id=p.id, marks=[*p.marks, *([pytest.mark.slow] if p.id == "triton" else [])])
            for p in params]


@pytest.mark.parametrize("backend,device", _slow_on_triton(backend_params()))
def test_int32_permutation_past_int16(backend, device):
    """More than 32767 output channels: int32 permutation entries, same results."""
    n = quant.PERM_INT16_CHANNELS + 1
    w = rand((n, 20))
    bits = torch.tensor([2, 8, 4, 6], dtype=torch.int64).repeat(n // 4)
    p = quant.quantize_channelwise(w, bits)
    qw = ref.quantize_channelwise(w, bits)
    assert p.perm.dtype == torch.int32 and int(p.perm.max()) == n - 1
    x = rand((3, 20))
    check_close(quant.packed_linear(x.to(device), p.to(device), backend=backend).cpu(), ref.packed_linear(x, qw),
                tol=reduction_tolerance(torch.float32, 20))
    assert torch.equal(p.to(device).dequantize(backend=backend).cpu(), ref.dequantize(qw))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.id == "triton"])
def test_triton_kernels_read_int32_permutation_entries(backend, device):
    """The Triton kernels on int32 permutation entries at a small size (the fast tier's twin of
    the case above: the kernels read perm the same way whatever the channel count)."""
    from pyeditor.kernels import quant as kernels
    n, k = 37, 50
    p, qw = both(rand((n, k), seed=5), rand_bits(n, seed=6))
    p = p.to(device)
    perm = p.perm.to(torch.int32)
    x = rand((3, k)).to(device)
    y = torch.zeros((3, n), device=device)
    kernels.linear(x, p.data, p.scale, p.zero, perm, p.flat_buckets, n, None, y)
    check_close(y.cpu(), ref.packed_linear(x.cpu(), qw), tol=reduction_tolerance(torch.float32, k))
    w = torch.zeros((n, k), device=device)
    kernels.dequantize(p.data, p.scale, p.zero, perm, p.flat_buckets, k, n, w)
    assert torch.equal(w.cpu(), ref.dequantize(qw))


# ---------------------------------------------------------------- packed_linear
SHAPES = {  # (x shape, out features)
    "gemv": ((1, 50), 37),
    "gemm": ((20, 33), 21),
    "3d": ((2, 3, 17), 5),
    "one-channel": ((4, 40), 1),
    "empty-rows": ((0, 17), 6),
    "k0": ((3, 0), 4),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_linear_matches_reference(backend, device, dtype, case):
    xs, n = SHAPES[case]
    k = xs[-1]
    p, qw = both(rand((n, k), seed=3), rand_bits(n, seed=4))
    x, b = rand(xs, dtype, seed=5), rand((n,), dtype, seed=6)
    got = quant.packed_linear(x.to(device), p.to(device), b.to(device), backend=backend)
    check_close(got.cpu(), ref.packed_linear(x, qw, b), tol=reduction_tolerance(dtype, k))
    got = quant.packed_linear(x.to(device), p.to(device), backend=backend)
    check_close(got.cpu(), ref.packed_linear(x, qw), tol=reduction_tolerance(dtype, k))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 64])
@pytest.mark.parametrize("width", [2, 4, 6, 8])
def test_cpu_paths_every_width(m, width):
    """The GEMV (few rows) and GEMM (decoded tile) paths, every width, K with a tail block."""
    n, k = 40, 300
    p, qw = both(rand((n, k), seed=m), width)
    x = rand((m, k), seed=width)
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw),
                tol=reduction_tolerance(torch.float32, k))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_cpu_2bit_table_gemv_across_chunks_and_groups(monkeypatch, m):
    """The 2-bit lookup-table GEMV (1-2 rows; 3 rows take the few-row kernel) walks K in
    32-block chunks over groups of 8 tiles: K = 1100 (chunks 32 + 32 + 5 blocks) and 13 tiles (a
    group of 8 and one of 5), with a NaN row, an inf row and a stride-0 row among the m rows.
    (AMX off: with it, 1-2 rows take the AMX GEMV.)"""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", "0")
    n, k = 200, 1100
    p, qw = both(rand((n, k), seed=11), 2)
    x = rand((m, k), seed=12)
    tol = reduction_tolerance(torch.float32, k)
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw), tol=tol)
    x0 = rand((1, 1), seed=13).expand(m, k)  # stride 0 along K
    check_close(quant.packed_linear(x0, p, backend="cpu"), ref.packed_linear(x0, qw), tol=tol)
    if m > 1:
        x = x.clone()
        x[0, 700] = math.nan
        x[1, 5] = math.inf
        got, want = quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw)
        assert torch.isnan(got[0]).all() and torch.isnan(want[0]).all()
        assert torch.equal(torch.isnan(got[1]), torch.isnan(want[1]))
        assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
        check_close(got[2:], want[2:], tol=tol)


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-if-present", "avx512"])
def test_cpu_gemm_paths(monkeypatch, amx):
    """Many rows take the AMX bf16 GEMM where the CPU has it (PYEDITOR_CPU_AMX=0 forces the
    AVX-512 one): rows off the 16-row grid, K off the 32-input grid and past one 1024-input chunk,
    a group of 8 tiles and a partial one, every width; rows scaled far down (bf16 parts that AMX
    would flush as denormals) and up; NaN and inf rows; bfloat16 activations."""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", amx)
    n, k, m = 150, 1100, 37
    p, qw = both(rand((n, k), seed=21), rand_bits(n, seed=22))
    x = rand((m, k), seed=23)
    tol = reduction_tolerance(torch.float32, k)
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw), tol=tol)
    b = rand((n,), seed=24)
    check_close(quant.packed_linear(x, p, b, backend="cpu"), ref.packed_linear(x, qw, b), tol=tol)
    for e in (-112, 100):
        xs = x * 2.0 ** e
        got = quant.packed_linear(xs, p, backend="cpu").double() * 2.0 ** -e
        check_close(got, ref.packed_linear(xs, qw).double() * 2.0 ** -e, tol=tol)
    xb = x.to(torch.bfloat16)
    check_close(quant.packed_linear(xb, p, backend="cpu"), ref.packed_linear(xb, qw), tol=reduction_tolerance(torch.bfloat16, k))
    x = x.clone()
    x[3, 50], x[4, 7], x[5, 9], x[5, 10] = math.nan, math.inf, math.inf, -math.inf
    got, want = quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw)
    assert torch.isnan(got[3]).all()
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(got), fn(want))


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-if-present", "avx512"])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_cpu_gemv_paths(monkeypatch, amx, m):
    """Up to 8 rows take the AMX-INT8 fixed-point GEMV where the CPU has it, two rows per pass
    (one row: the VNNI digit kernel for 4-, 6- and 8-bit tiles, also with PYEDITOR_CPU_AMX=0;
    else the AVX-512 / lookup-table / decoded-tile paths; on AVX2 one row reads the codes in
    place against a scaled x, and rows near the denormals, which that scaling cannot hold,
    take the float rows): K = 1100
    (a partial last 64-input step, so the 8-bit tiles are unpacked there too), every width, rows
    scaled far down and up, a zero row, bfloat16, and inf / NaN rows (which leave the fixed-point
    path)."""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", amx)
    n, k = 150, 1100
    p, qw = both(rand((n, k), seed=31), rand_bits(n, seed=32))
    x = rand((m, k), seed=33)
    tol = reduction_tolerance(torch.float32, k)
    check_close(quant.packed_linear(x, p, backend="cpu"), ref.packed_linear(x, qw), tol=tol)
    for e in (-127, -112, 100):  # 2^-127: mostly float32 denormals; against the float64 reference
        xs = x * 2.0 ** e
        got = quant.packed_linear(xs, p, backend="cpu").double() * 2.0 ** -e
        check_close(got, ref.packed_linear(xs.double(), qw) * 2.0 ** -e, tol=tol)
    z = torch.zeros(m, k)
    check_close(quant.packed_linear(z, p, backend="cpu"), ref.packed_linear(z, qw), tol=(0.0, 0.0))
    xb = x.to(torch.bfloat16)
    check_close(quant.packed_linear(xb, p, backend="cpu"), ref.packed_linear(xb, qw), tol=reduction_tolerance(torch.bfloat16, k))
    for bad in (math.nan, math.inf):
        xi = x.clone()
        xi[0, 70] = bad
        got, want = quant.packed_linear(xi, p, backend="cpu"), ref.packed_linear(xi, qw)
        for fn in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(fn(got), fn(want))
        if m > 1:
            check_close(got[1:], want[1:], tol=tol)


def test_cpu_one_row_under_flush_denormal_and_wide_range():
    """On AVX2 one float32 row reads the codes in place; on AMD as float32 denormals (quant_avx2.cpp),
    which denormals-are-zero would read as 0: the kernel turns it off meanwhile, so
    torch.set_flush_denormal(True) leaves the result bit for bit as it was (and the flag set).
    A row over more binades than that read keeps its sums normal for (here 100) takes the
    converting read or the float rows, still within the reduction tolerance."""
    n, k = 70, 1100
    p, qw = both(rand((n, k), seed=71), rand_bits(n, seed=72))
    x, b = rand((1, k), seed=73), rand((n,), seed=74)
    want = quant.packed_linear(x, p, b, backend="cpu")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got = quant.packed_linear(x, p, b, backend="cpu")
        tiny = torch.tensor([1e-40]) * torch.tensor([1.0])  # still flushed after the call
        assert tiny.item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got, want)
    xw = x.clone()
    xw[0, ::5] *= 2.0 ** -100
    check_close(quant.packed_linear(xw, p, b, backend="cpu"), ref.packed_linear(xw, qw, b),
                tol=reduction_tolerance(torch.float32, k))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= set(_cpu_flags()),
                    reason="the digit GEMV needs AVX-512 (F, BW, DQ, VL, VNNI)")
@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-if-present", "avx512"])
def test_cpu_one_exact_row_is_exact(monkeypatch, amx):
    """One exact row takes fixed-point digits with exact integer sums (4-, 6- and 8-bit tiles on
    VNNI, 1-4 tiles together; 2-bit on AMX where present), then one rounding: each output is
    within a few float32 roundings of the float64 layer, far inside the float32 reduction
    tolerance, at any activation scale; and where AMX is present it equals the same row inside a
    two-row batch (AMX digits for every width) bit for bit."""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", amx)
    on_amx = amx == "1" and "amx_int8" in _cpu_flags()
    n, k = 16 * 9 + 3, 1100
    bits = torch.tensor([4] * 40 + [8] * 65 + [6] * 20 + [4] * 17 + [8] * 5)
    if on_amx:
        bits[::7] = 2
    p, qw = both(rand((n, k), seed=61), bits)
    w = qw.dequantize().double()
    x = rand((2, k), seed=62)
    x[0, ::3] *= 2.0 ** -20  # a wide range inside the row
    b = rand((n,), seed=63)
    # then rows of few significant bits, whose low digits are all zero, so the one-row kernel skips
    # their products (the AMX batch computes all six): 5, 3 (bf16 values), 4, 2 and 1 of the six
    # digits in use (x[1] spans fewer binades than x[0])
    r = x[1:]
    few_bits = (r, r.bfloat16().float(), torch.round(r * 2**26) / 2**26, torch.round(r * 2**10) / 2**10, r.sign())
    for xs in [x * 2.0 ** e for e in (0, -120, 100)] + [f.expand(2, k) for f in few_bits]:
        got = quant.packed_linear(xs[:1], p, b, backend="cpu").double()
        want = xs[:1].double() @ w.T + b.double()
        bound = 4 * 2.0 ** -24 * ((xs[:1].double().abs() @ w.abs().T) + b.double().abs() + want.abs())
        assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
        if on_amx:
            assert torch.equal(got, quant.packed_linear(xs, p, b, backend="cpu")[:1].double())
    # weights in [0, 1) (zero points 0) and x = 1: 8-bit sums near 2^62, past the vector
    # epilogue's int64 range, so its 128-bit scalar fallback runs
    wp = torch.rand((n, k), generator=torch.Generator().manual_seed(64))
    pp, qp = both(wp, torch.full((n,), 8))
    ones = torch.ones(1, k)
    got = quant.packed_linear(ones, pp, backend="cpu").double()
    want = ones.double() @ qp.dequantize().double().T
    assert ((got - want).abs() <= 4 * 2.0 ** -24 * 2 * want.abs()).all()


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-if-present", "avx512"])
@pytest.mark.parametrize("k", [0, 70000])
@pytest.mark.parametrize("m", [1, 2])
def test_cpu_gemv_k_edges(monkeypatch, amx, k, m):
    """No inputs (bias only), and more inputs than the AMX fixed-point GEMV's int32 digit sums
    allow (it must leave them to the float path; one row: the multi-tile float kernel)."""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", amx)
    n = 20
    p, qw = both(rand((n, k), seed=51), rand_bits(n, seed=52))
    x, b = rand((m, k), seed=53), rand((n,), seed=54)
    check_close(quant.packed_linear(x, p, b, backend="cpu"), ref.packed_linear(x, qw, b),
                tol=reduction_tolerance(torch.float32, k))


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-if-present", "avx512"])
def test_cpu_fast_mode_one_row_walks_tiles_together(monkeypatch, amx):
    """One row in fast mode takes up to eight same-width tiles at once (8-tile groups, a partial
    group, width changes between groups); its integer sums are exact, so each row's result equals
    that row's result inside a batch (which takes the tile-at-a-time kernels) bit for bit."""
    monkeypatch.setenv("PYEDITOR_CPU_AMX", amx)
    n, k = 16 * 21 + 5, 1100
    bits = torch.tensor([8] * 40 + [2] * 150 + [4] * 17 + [6] * 134)
    p, _ = both(rand((n, k), seed=44), bits)
    x = rand((3, k), seed=45)
    b = rand((n,), seed=46)
    batch = quant.packed_linear(x, p, b, fast=True, backend="cpu")
    for r in range(3):
        one = quant.packed_linear(x[r:r + 1], p, b, fast=True, backend="cpu")
        assert torch.equal(one, batch[r:r + 1])


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 40])
def test_cpu_fast_mode_amx_equals_vnni(monkeypatch, m):
    """The fast mode's integer sums are exact on both CPU paths (AMX-INT8 tiles, 16 rows a pass,
    from 2 rows where present; VNNI otherwise and for one row), so their results are identical
    bit for bit."""
    n, k = 70, 1100
    p, _ = both(rand((n, k), seed=41), rand_bits(n, seed=42))
    x = rand((m, k), seed=43)
    x[0, 3] = math.nan
    monkeypatch.setenv("PYEDITOR_CPU_AMX", "1")
    got = quant.packed_linear(x, p, fast=True, backend="cpu")
    monkeypatch.setenv("PYEDITOR_CPU_AMX", "0")
    want = quant.packed_linear(x, p, fast=True, backend="cpu")
    assert torch.equal(got.isnan(), want.isnan()) and torch.isnan(got[0]).all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_and_broadcast_x(backend, device):
    n, k = 19, 40
    p, qw = both(rand((n, k), seed=7), rand_bits(n, seed=8))
    base = rand((6, 2 * k), seed=9)
    tol = reduction_tolerance(torch.float32, k)
    for x in (base[:, ::2], base[::2, :k], base[0, :k].expand(4, k), base[:4, :k].T.contiguous().T):
        got = quant.packed_linear(x.to(device), p.to(device), backend=backend)
        check_close(got.cpu(), ref.packed_linear(x, qw), tol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_activation_propagates(backend, device):
    p, qw = both(rand((5, 20), seed=1), 4)
    x = rand((3, 20), seed=2)
    x[1, 3] = math.nan
    got = quant.packed_linear(x.to(device), p.to(device), backend=backend).cpu()
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2]]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m", [4, 17], ids=["gemv", "gemm"])
@pytest.mark.parametrize("widths", ["mixed", "uniform"])
def test_inf_and_overflow_rows_match_reference(backend, device, m, widths):
    """s * (sum q x - z * sum x) gives inf - inf = NaN for an inf input or a sum that overflows
    (and a centred sum, s * sum (q - z) x, can overflow too); the reference's sum of
    ((q - z) * s) * x gives +-inf or a finite value, and so must we.
    (One width: tiles of 16 consecutive output columns, which the CPU stores whole; with a bias.)"""
    n, k = 48, 37
    w = rand((n, k), seed=3, scale=1e-3)
    w[5] = 0.25  # a constant channel: every weight equals its zero point's value
    bits = rand_bits(n, seed=4) if widths == "mixed" else torch.full((n,), 4, dtype=torch.int64)
    p, qw = both(w, bits)
    b = rand((n,), seed=9) if widths == "uniform" else None
    x = rand((m, k), seed=5)
    x[0, 7] = math.inf
    x[1, 2], x[1, 30] = -math.inf, math.inf  # opposite infs: NaN where their weights share a sign
    x[2] = 3e38  # finite, but sum x overflows float32; the reference's sum stays finite
    x[3, 0] = math.nan
    got = quant.packed_linear(x.to(device), p.to(device), None if b is None else b.to(device), backend=backend).cpu()
    want = ref.packed_linear(x, qw, b)
    assert torch.isfinite(want[2]).sum() > n // 2  # the constant channel 5 overflows
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    check_close(got[fin], want[fin], tol=reduction_tolerance(torch.float32, k))


@pytest.mark.parametrize("backend,device,m", backend_rows_params([1, 2, 3], fast_rows=(1, 3)))
@pytest.mark.parametrize("group", [None, 64], ids=["channel", "g64"])
def test_few_rows_special_values_strides_and_spiky_rows(backend, device, m, group):
    """The few-row paths (1-3 rows: the centred few-row kernels, the 2-bit tables, one-row
    kernels, and the centred kernels that a spiky row takes) against the reference: a row with
    inf, a row with NaN, a spiky row (one input 1e12 with NaN elsewhere must stay NaN), a zero
    row; x strided (a column slice) and stride-0 along K; K = 0; every width mixed, K ragged."""
    n, k = 64, 150
    qfn = (lambda w, b: (quant.quantize_channelwise(w, b, group), ref.quantize_channelwise(w, b, group)))
    p, qw = qfn(rand((n, k), seed=21), rand_bits(n, seed=22))
    tol = reduction_tolerance(torch.float32, k)

    def run(x):
        got = quant.packed_linear(x.to(device), p.to(device), backend=backend).cpu()
        want = ref.packed_linear(x.contiguous(), qw)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isposinf(got), torch.isposinf(want))
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        fin = torch.isfinite(want)
        check_close(got[fin], want[fin], tol=tol)

    base = rand((3, 2 * k), seed=23)[:, ::2]  # strided along K
    assert not base.is_contiguous()
    run(base[:m])
    specials = [base.clone() for _ in range(4)]
    specials[0][:, 5] = math.inf
    specials[1][:, 40] = math.nan
    specials[2][:, 7] = 1e12  # spiky, and a NaN riding along in the last row
    specials[2][-1, 90] = math.nan
    specials[3].zero_()
    for x in specials:
        run(x[:m])
    run(rand((1, 1), seed=24).expand(m, k))  # stride 0 along K
    p0, qw0 = qfn(torch.empty(n, 0), rand_bits(n, seed=25))  # K = 0: the bias-free output is 0
    got = quant.packed_linear(torch.empty(m, 0, device=device), p0.to(device), backend=backend).cpu()
    assert torch.equal(got, ref.packed_linear(torch.empty(m, 0), qw0))


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fast_mode_error_bound(m, dtype):
    """int8 activations: |y - exact| <= max|x_row| / 254 * sum_k |W[n, k]| (+ fp32 rounding)."""
    n, k = 50, 200
    p, qw = both(rand((n, k), seed=m), rand_bits(n, seed=m))
    x = rand((m, k), dtype, seed=11)
    got = quant.packed_linear(x, p, fast=True, backend="cpu").double()
    exact = ref.packed_linear(x.float(), qw).double()
    bound = x.double().abs().amax(1, keepdim=True) / 254 * ref.dequantize(qw).double().abs().sum(1)
    slack = 1e-4 * exact.abs() + 1e-4 + (0.0 if dtype == torch.float32 else 1e-2 * exact.abs())
    assert bool(((got - exact).abs() <= bound + slack).all())


def test_fast_mode_large_values_not_saturated():
    p, qw = both(rand((16, 64), seed=1) * 1e3, 8)
    x = rand((1, 64), seed=2) * 1e4
    got = quant.packed_linear(x, p, fast=True, backend="cpu")
    exact = ref.packed_linear(x, qw)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device):
    p, _ = both(rand((6, 10), seed=1), rand_bits(6, seed=1))
    p = p.to(device)
    x = rand((3, 10), torch.float64, seed=2).to(device).requires_grad_()
    b = rand((6,), torch.float64, seed=3).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: quant.packed_linear(x, p, b, backend=backend), (x, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_only_where_asked(backend, device):
    """The C++ op skips its autograd node when nothing needs a gradient; a bias that needs one
    still gets it through an x that does not, and no_grad gives a plain result."""
    p, qw = both(rand((9, 21), seed=1), rand_bits(9, seed=2))
    p = p.to(device)
    x = rand((4, 21), seed=3).to(device)
    b = rand((9,), seed=4).to(device).requires_grad_()
    y = quant.packed_linear(x, p, b, backend=backend)
    assert y.requires_grad
    y.sum().backward()
    check_close(b.grad.cpu(), torch.full((9,), 4.0), tol=reduction_tolerance(torch.float32, 4))
    with torch.no_grad():
        y0 = quant.packed_linear(x.requires_grad_(), p, b, backend=backend)
    assert not y0.requires_grad
    expect = ref.packed_linear(x.detach().cpu(), qw, b.detach().cpu())
    check_close(y0.cpu(), expect, tol=reduction_tolerance(torch.float32, 21))
    assert not quant.packed_linear(x.detach(), p, b.detach(), backend=backend).requires_grad


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_backward_formula(backend, device):
    """Both quant_linear ops record the node of the one Python backward: the Triton op directly,
    the C++ op through its router (csrc/quant_autograd.cpp), which skips it without a gradient."""
    p, _ = both(rand((9, 21), seed=1), rand_bits(9, seed=2))
    x = rand((4, 21), seed=3).to(device).requires_grad_()
    y = quant.packed_linear(x, p.to(device), backend=backend)
    want = "quant_linear_triton" if backend == "triton" else "quant_linear_autograd"
    assert want in y.grad_fn.name()
    if backend != "triton":
        args = _op_args(p.to(device), x)
        with torch.no_grad():
            assert torch.ops.pyeditor.quant_linear(*args).grad_fn is None
        assert "quant_linear_autograd" in torch.ops.pyeditor.quant_linear(*args).grad_fn.name()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["empty", "transposed", "stride0", "3d"])
def test_grad_through_odd_layouts(backend, device, layout):
    """The gradient of the one backward matches the reference's for empty, transposed, stride-0
    and 3-d inputs (the router hands them to quant_linear_autograd as they come)."""
    p, qw = both(rand((9, 21), seed=1), rand_bits(9, seed=2))
    base = {"empty": rand((0, 21), seed=3), "transposed": rand((21, 5), seed=3).t(),
            "stride0": rand((1, 21), seed=3).expand(4, 21), "3d": rand((2, 3, 21), seed=3)}[layout]
    x = base.to(device).requires_grad_()
    y = quant.packed_linear(x, p.to(device), backend=backend)
    g = rand(tuple(y.shape), seed=4).to(device)
    (y * g).sum().backward()
    xr = base.detach().clone().requires_grad_()
    (ref.packed_linear(xr, qw) * g.cpu()).sum().backward()
    check_close(x.grad.cpu(), xr.grad, tol=reduction_tolerance(torch.float32, 9))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_matches_reference_fp32(backend, device):
    p, qw = both(rand((9, 21), seed=1), rand_bits(9, seed=2))
    x = rand((4, 21), seed=3).to(device).requires_grad_()
    g = rand((4, 9), seed=4).to(device)
    (quant.packed_linear(x, p.to(device), backend=backend) * g).sum().backward()
    xr = rand((4, 21), seed=3).requires_grad_()
    (ref.packed_linear(xr, qw) * g.cpu()).sum().backward()
    check_close(x.grad.cpu(), xr.grad, tol=reduction_tolerance(torch.float32, 9))


def _op_args(p, x, bias=None, fast=False, bf16=False):
    return (x, *p.tensors(), p.flat_buckets, p.in_features, p.out_features, bias, fast, p.op_group_size, bf16)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group,k", [(None, 18), (32, 80)], ids=["channel", "g32"])
def test_opcheck(backend, device, group, k):
    """Both ops' registration, per channel and group-wise (groups of 32 over K = 80: a ragged
    last group), with and without gradients, in the fast and bf16 modes."""
    from pyeditor import ops
    linear, dequant = ops.quant_ops(backend)
    p = quant.quantize_channelwise(rand((7, k), seed=1), rand_bits(7, seed=1), group).to(device)
    x = rand((2, k), seed=2).to(device)
    b = rand((7,), seed=3).to(device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = tests[:3]  # no inductor on the interpreter
    torch.library.opcheck(dequant, (*p.tensors(), p.flat_buckets, k, 7, p.op_group_size), test_utils=tests)
    torch.library.opcheck(linear, _op_args(p, x, b), test_utils=tests)
    torch.library.opcheck(linear, _op_args(p, x.clone().requires_grad_(), b.clone().requires_grad_()),
                          test_utils=tests)
    torch.library.opcheck(linear, _op_args(p, x[:1], None, True), test_utils=tests)
    torch.library.opcheck(linear, _op_args(p, x.clone().requires_grad_(), b, bf16=True), test_utils=tests)
    x16 = rand((16, k), seed=4).to(device)  # the GEMM, with the bf16 rounding and dot (Triton)
    torch.library.opcheck(linear, _op_args(p, x16, b, bf16=True), test_utils=tests)
    torch.library.opcheck(linear, _op_args(p, x16.to(torch.bfloat16), None), test_utils=tests)
    if backend != "triton":  # the op behind the C++ router, which carries the backward
        for bf16 in (False, True):
            torch.library.opcheck(torch.ops.pyeditor.quant_linear_autograd,
                                  _op_args(p, x.clone().requires_grad_(), b.clone().requires_grad_(), bf16=bf16),
                                  test_utils=tests)


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("triton", "cuda", id="triton", marks=pytest.mark.cuda),
                                            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    p, qw = both(rand((8, 24), seed=1), rand_bits(8, seed=1))
    p = p.to(device)
    fn = torch.compile(lambda x: quant.packed_linear(x, p, backend=backend), fullgraph=True)
    x = rand((3, 24), seed=2)
    check_close(fn(x.to(device)).cpu(), ref.packed_linear(x, qw), tol=reduction_tolerance(torch.float32, 24))


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    w = rand((4, 8))
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_channelwise(w, torch.tensor([2, 4, 5, 8]))
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_channelwise(w, torch.tensor([2, 4, 8]))
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_channelwise(w, 3)
    for bad in (math.nan, math.inf):
        w2 = w.clone()
        w2[1, 1] = bad
        with pytest.raises(ValueError, match="finite"):
            quant.quantize_channelwise(w2, 4)
    with pytest.raises(TypeError, match="weight"):
        quant.quantize_channelwise(w.int(), 4)
    with pytest.raises(ValueError, match="weight"):
        quant.quantize_channelwise(w[0], 4)
    p = quant.quantize_channelwise(w, 4)
    with pytest.raises(ValueError, match="input features"):
        quant.packed_linear(rand((2, 9)), p)
    with pytest.raises(TypeError, match="x"):
        quant.packed_linear(torch.ones(2, 8, dtype=torch.int32), p)
    with pytest.raises(ValueError, match="bias"):
        quant.packed_linear(rand((2, 8)), p, rand((3,)))
    with pytest.raises(TypeError, match="packed"):
        quant.packed_linear(rand((2, 8)), w)
    with pytest.raises(TypeError, match="fast"):
        quant.packed_linear(rand((2, 8)), p, fast=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quant.packed_linear([[0.0] * 8], p)
    with pytest.raises(TypeError, match="bias"):
        quant.packed_linear(rand((2, 8)), p, [0.0] * 8)
    with pytest.raises(TypeError, match="bias"):
        quant.packed_linear(rand((2, 8)), p, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        quant.packed_linear(torch.tensor(1.0), p)


def test_cpp_refuses_corrupt_metadata():
    """The C++ op checks sizes and the permutation itself: it never reads out of range."""
    p = quant.quantize_channelwise(rand((20, 33)), rand_bits(20))
    x = rand((2, 33))
    op = torch.ops.pyeditor.quant_linear
    args = list(_op_args(p, x))
    bad_buckets = list(p.flat_buckets)
    bad_buckets[2] += 16
    for i, val, msg in [(1, p.data[:-1], "bytes"), (5, bad_buckets, "bytes|contiguous|rows"),
                        (4, p.perm.clone().fill_(0), "permutation"), (2, p.scale[:-1], "scale"),
                        (3, p.zero.int(), "zero"), (5, [3, 0, 16, 0], "bits")]:
        a = list(args)
        a[i] = val
        with pytest.raises(RuntimeError, match=msg):
            op(*a)


def _corrupt_perms(perm: torch.Tensor, n: int):
    """perm with one defect each: out of range either side, a channel dropped, a channel twice
    (on a padding row, so that all n channels are still covered), both at once; and two
    channels swapped (valid)."""
    live = (perm >= 0).nonzero().flatten()
    pad = (perm < 0).nonzero().flatten()
    out = []
    for i, val in [(live[0], n), (live[1], -2), (live[2], -1), (pad[0], int(perm[live[3]])),
                   (live[0], 32767 if perm.dtype == torch.int16 else 2 ** 31 - 1)]:
        bad = perm.clone()
        bad[i] = val
        out.append(bad)
    both = perm.clone()  # one channel dropped, another twice: the counts alone look right
    both[live[2]], both[pad[0]] = -1, perm[live[3]]
    out.append(both)
    swapped = perm.clone()
    swapped[live[0]], swapped[live[1]] = perm[live[1]], perm[live[0]]
    return out, swapped


@pytest.mark.parametrize("n", [20, 33000])
def test_cpp_refuses_every_bad_permutation(n):
    """The op's own permutation check (it runs on every call): out-of-range, missing and
    duplicated channels all raise; a permutation that is merely different runs."""
    k = 8
    p = quant.quantize_channelwise(rand((n, k)), rand_bits(n))
    x = rand((1, k))
    op = torch.ops.pyeditor.quant_linear
    args = list(_op_args(p, x))
    bad_perms, swapped = _corrupt_perms(p.perm, n)
    for bad in bad_perms:
        a = list(args)
        a[4] = bad
        with pytest.raises(RuntimeError, match="perm"):
            op(*a)
        with pytest.raises(RuntimeError, match="perm"):
            torch.ops.pyeditor.quant_dequantize(p.data, p.scale, p.zero, bad, p.flat_buckets, k, n)
    a = list(args)
    a[4] = swapped
    got = op(*a)
    want = op(*args)
    live = (p.perm >= 0).nonzero().flatten()
    c0, c1 = int(p.perm[live[0]]), int(p.perm[live[1]])
    cols = torch.arange(n)
    cols[c0], cols[c1] = c1, c0
    assert torch.equal(got, want[:, cols])


# ---------------------------------------------------------------- strategy codes
@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([2, 4, 6, 8]), max_size=41))
def test_strategy_roundtrip(bits):
    b = torch.tensor(bits, dtype=torch.int64)
    code = pyeditor.encode_strategy(b)
    assert code.dtype == torch.uint8 and code.numel() == (len(bits) + 3) // 4
    assert torch.equal(code, ref.encode_strategy(b))
    assert torch.equal(pyeditor.decode_strategy(code, len(bits)), b)


def test_strategy_layout_and_errors():
    assert pyeditor.encode_strategy(torch.tensor([2, 4, 6, 8, 8])).tolist() == [0b11100100, 0b11]
    with pytest.raises(ValueError, match="padding"):
        pyeditor.decode_strategy(torch.tensor([0b11100100, 0b111], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="bits"):
        pyeditor.encode_strategy(torch.tensor([2, 3]))
