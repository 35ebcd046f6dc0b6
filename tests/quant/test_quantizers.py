"""pyeditor.quantizers: minmax is the reference bit for bit; search and calibrated are never worse
than min-max (weight error per group, output error per channel on the calibration data); the
dispatch and quant.quantize_channelwise name bad arguments."""
import pytest
import torch

from pyeditor import quant, quantizers, reference

GROUPS = (None, 32, 64, 128)


def _same(a, b):
    assert a.group_size == b.group_size
    for name, x, y in zip(("codes", "scale", "zero", "bits"), a[:4], b[:4]):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


def _weight(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).mul(3).add(1e-3)
    if n > 3 and k > 1:
        w[1] = 0.75                       # a constant positive row
        w[2] = -0.5                       # a constant negative row
        w[3] = 0.0                        # a zero row
    if n > 5 and k > 40:
        w[4, :40] = -2.0                  # constant groups inside a row
        w[5, 32:64] = 3.0
        w[5, 7] = float("1e-30")          # tiny values
    return w.to(dtype)


def _bits(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]


@pytest.mark.parametrize("shape", [(1, 1), (1, 100), (7, 33), (16, 100), (9, 257), (40, 128), (5, 0), (0, 5),
                                   (3, 2000)])
@pytest.mark.parametrize("group_size", GROUPS)
def test_minmax_equals_reference(shape, group_size):
    n, k = shape
    w = _weight(n, k, n * 1000 + k)
    for bits in (_bits(n, k), 2, 8):
        _same(quantizers.minmax(w, bits, group_size), reference.quantize_channelwise(w, bits, group_size))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_minmax_equals_reference_other_dtypes(dtype):
    w = _weight(24, 200, 3, dtype)
    for g in GROUPS:
        _same(quantizers.minmax(w, _bits(24, 1), g), reference.quantize_channelwise(w, _bits(24, 1), g))


def test_minmax_many_blocks_and_halfway_values():
    # more rows than one float64 working block, and values that sit exactly half-way between
    # two codes (round half to even must agree)
    w = torch.randn(600, 700, generator=torch.Generator().manual_seed(5))
    w[:, :50] = torch.arange(50, dtype=torch.float32) * 0.5 - 12.25
    for g in (None, 64):
        _same(quantizers.minmax(w, _bits(600, 2), g), reference.quantize_channelwise(w, _bits(600, 2), g))


def test_minmax_errors_match_reference():
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    for fn in (quantizers.minmax, reference.quantize_channelwise):
        with pytest.raises(ValueError, match="finite"):
            fn(bad, 4)
        with pytest.raises(ValueError, match="fit float32"):
            fn(torch.tensor([[1e300, -1e300]], dtype=torch.float64), 4)
        with pytest.raises(ValueError, match="bits"):
            fn(torch.ones(3, 4), 3)
        with pytest.raises(ValueError, match="group_size"):
            fn(torch.ones(3, 4), 4, 48)
        with pytest.raises(ValueError, match="weight"):
            fn(torch.ones(3), 4)


def test_quantize_channelwise_default_is_reference():
    w = _weight(20, 96, 11)
    bits = _bits(20, 4)
    for g in GROUPS:
        got = quant.quantize_channelwise(w, bits, g)
        want = quant.pack(reference.quantize_channelwise(w, bits, g))
        for x, y in zip(got.tensors(), want.tensors()):
            assert torch.equal(x, y)
        assert got.buckets == want.buckets and got.group_size == want.group_size


def _group_err(w, qw):
    """float64 [out, G] squared weight error per group (per channel: G = 1)."""
    d = (reference.dequantize(qw).double() - w.double()).square()
    gid = reference._group_of_column(w.shape[1], qw.group_size)
    return torch.zeros(w.shape[0], int(gid.max()) + 1 if w.shape[1] else 1, dtype=torch.float64).index_add_(1, gid, d)


def _check_format(qw, w, bits, group_size):
    n, k = w.shape
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (n, k)
    shape = (n,) if group_size is None else (n, reference.n_groups(k, group_size))
    assert qw.scale.dtype == torch.float32 and tuple(qw.scale.shape) == shape
    assert qw.zero.dtype == torch.int32 and tuple(qw.zero.shape) == shape
    b = torch.as_tensor(bits).expand(n) if not isinstance(bits, torch.Tensor) else bits
    qmax = (1 << b) - 1
    assert bool((qw.codes.long() <= qmax[:, None]).all())
    assert bool((qw.zero.long().reshape(n, -1) <= qmax[:, None]).all()) and bool((qw.zero >= 0).all())
    assert bool((qw.scale > 0).all()) and bool(torch.isfinite(qw.scale).all())
    # packs and dequantizes like any other QuantizedWeight
    assert torch.equal(quant.pack(qw).quantized().dequantize(), reference.dequantize(qw))


@pytest.mark.parametrize("group_size", GROUPS)
def test_search_never_worse_than_minmax(group_size):
    w = _weight(32, 200, 21)  # 200 inputs: a ragged last group for every group size
    w[10:20, ::37] *= 25  # outlier weights: clipping pays
    for bits in (2, 4, _bits(32, 9)):
        mm = quantizers.minmax(w, bits, group_size)
        se = quantizers.search(w, bits, group_size)
        _check_format(se, w, bits, group_size)
        e_mm, e_se = _group_err(w, mm), _group_err(w, se)
        assert bool((e_se <= e_mm * (1 + 1e-9)).all())
        if isinstance(bits, int) and bits == 2:
            assert e_se.sum() < 0.9 * e_mm.sum()  # and it does find better clipping
    # constant groups stay exact
    assert torch.equal(reference.dequantize(quantizers.search(w, 4, group_size))[1:4], w[1:4])


def _acts(m, k, seed, structured):
    g = torch.Generator().manual_seed(seed)
    if structured:  # low-rank plus noise, like a transformer's hidden states
        basis = torch.randn(16, k, generator=torch.Generator().manual_seed(99))
        x = torch.randn(m, 16, generator=g) @ basis + 0.3 * torch.randn(m, k, generator=g)
    else:
        x = torch.randn(m, k, generator=g)
    x[:, :4] *= 30  # outlier input columns
    return x


def _out_err(w, qw, x):
    return (x.double() @ (w.double() - reference.dequantize(qw).double()).T).square().sum(0)  # [out]


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("structured", [False, True])
def test_calibrated_never_worse_than_minmax_on_its_activations(group_size, structured):
    n, k = 32, 192
    w = _weight(n, k, 31)
    x = _acts(256, k, 1, structured)
    bits = _bits(n, 3)
    mm = quantizers.minmax(w, bits, group_size)
    ca = quantizers.calibrated(w, bits, group_size, activations=x)
    _check_format(ca, w, bits, group_size)
    e_mm, e_ca = _out_err(w, mm, x), _out_err(w, ca, x)
    assert bool((e_ca <= e_mm * (1 + 1e-9)).all())  # per output channel
    assert e_ca.sum() < 0.8 * e_mm.sum()
    # new inputs from the same distribution: better too (held-out rows guard against overfitting)
    xe = _acts(1024, k, 2, structured)
    assert _out_err(w, ca, xe).sum() < _out_err(w, mm, xe).sum()


def test_calibrated_accepts_batched_activations_and_tiny_sets():
    w = _weight(16, 64, 41)
    x = _acts(24, 64, 5, True)
    a = quantizers.calibrated(w, 4, 32, activations=x.reshape(2, 12, 64))
    b = quantizers.calibrated(w, 4, 32, activations=x)
    _same(a, b)
    for m in (1, 3):  # fewer rows than a held-out split needs: all rows fit and choose
        qw = quantizers.calibrated(w, 4, None, activations=x[:m])
        assert bool((_out_err(w, qw, x[:m]) <= _out_err(w, quantizers.minmax(w, 4), x[:m]) * (1 + 1e-9)).all())
    zero = quantizers.calibrated(w, 4, None, activations=torch.zeros(8, 64))
    _same(zero, quantizers.minmax(w, 4))


def test_quantize_dispatch_and_packing():
    w = _weight(16, 64, 51)
    x = _acts(64, 64, 6, True)
    _same(quantizers.quantize(w, 4, 32), reference.quantize_channelwise(w, 4, 32))
    _same(quantizers.quantize(w, 4, 32, method="search"), quantizers.search(w, 4, 32))
    _same(quantizers.quantize(w, 4, 32, method="calibrated", activations=x),
          quantizers.calibrated(w, 4, 32, activations=x))
    p = quant.quantize_channelwise(w, 4, 32, method="calibrated", activations=x)
    assert torch.equal(p.dequantize(backend="reference"),
                       reference.dequantize(quantizers.calibrated(w, 4, 32, activations=x)))


def test_bad_arguments_name_the_argument():
    w = torch.randn(8, 16)
    x = torch.randn(10, 16)
    for fn in (quantizers.quantize, quant.quantize_channelwise):
        with pytest.raises(ValueError, match="method"):
            fn(w, 4, method="gptq")
        with pytest.raises(TypeError, match="method"):
            fn(w, 4, method=None)
        with pytest.raises(ValueError, match="activations"):
            fn(w, 4, method="calibrated")
        with pytest.raises(ValueError, match="activations"):
            fn(w, 4, method="calibrated", activations=torch.randn(10, 15))
        with pytest.raises(TypeError, match="activations"):
            fn(w, 4, method="calibrated", activations=x.numpy())
        with pytest.raises(TypeError, match="activations"):
            fn(w, 4, method="calibrated", activations=x.long())
        with pytest.raises(ValueError, match="activations"):
            fn(w, 4, method="calibrated", activations=torch.full((3, 16), float("nan")))
        with pytest.raises(ValueError, match="activations"):
            fn(w, 4, method="calibrated", activations=torch.zeros(0, 16))
        with pytest.raises(ValueError, match="activations"):
            fn(w, 4, method="minmax", activations=x)
        with pytest.raises(ValueError, match="bits"):
            fn(w, 5, method="search")
        with pytest.raises(ValueError, match="group_size"):
            fn(w, 4, 16, method="search")
    with pytest.raises(ValueError, match="weight"):
        quantizers.search(torch.randn(4), 4)
    with pytest.raises(TypeError, match="weight"):
        quantizers.calibrated(torch.ones(4, 4, dtype=torch.int32), 4, activations=x)


def test_calibrated_cache_follows_the_activation_tensor():
    # per-activation work is cached on the tensor object; an in-place change must not reuse it
    w = _weight(16, 64, 61)
    x = _acts(64, 64, 7, True)
    first = quantizers.calibrated(w, 4, None, activations=x)
    _same(first, quantizers.calibrated(w, 4, None, activations=x.clone()))
    x.mul_(-3.0).add_(1.0)
    _same(quantizers.calibrated(w, 4, None, activations=x), quantizers.calibrated(w, 4, None, activations=x.clone()))
    # the same tensor for layers of another width is checked again, not served from the cache
    with pytest.raises(ValueError, match="activations"):
        quantizers.calibrated(_weight(16, 32, 62), 4, None, activations=x)
