"""pyeditor.nn.PackedLinear and quantize_model: forward vs reference, in-place model
quantization, bit-exact state_dict round trips (also through safetensors), corrupt state."""
import pytest
import torch
from torch import nn

from pyeditor import nn as pnn
from pyeditor import quant
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7, bias=False), nn.Linear(7, 3))


def bits_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]


def test_from_linear_forward_and_grad():
    lin = nn.Linear(30, 20)
    bits = bits_of(20)
    layer = pnn.PackedLinear.from_linear(lin, bits)
    x = torch.randn(5, 30, requires_grad=True)
    y = layer(x)
    qw = ref.quantize_channelwise(lin.weight.detach(), bits)
    check_close(y, ref.packed_linear(x, qw, lin.bias), tol=reduction_tolerance(torch.float32, 30))
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert torch.equal(layer.dequantize(), ref.dequantize(qw))
    assert layer.packed_bytes == layer.packed.nbytes and "packed_bytes" in repr(layer)


def test_quantize_model_in_place():
    m = model()
    x = torch.randn(4, 24)
    dense = m(x)
    out = pnn.quantize_model(m, lambda name, lin: None if name == "3" else 8)
    assert out is m
    assert isinstance(m[0], pnn.PackedLinear) and isinstance(m[2], pnn.PackedLinear)
    assert isinstance(m[3], nn.Linear)
    assert (m(x) - dense).abs().max() < 0.05  # 8-bit weights: close to the float model


def _quantized(seed=0):
    m = model()
    return pnn.quantize_model(m, lambda name, lin: bits_of(lin.out_features, seed))


def test_state_dict_roundtrip_bit_exact():
    a, b = _quantized(0), _quantized(1)  # different widths: packed shapes differ
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_state_dict_with_int32_permutation_loads():
    """A state_dict saved when the permutation was always int32 loads into the int16 layout."""
    a, b = _quantized(0), _quantized(1)
    sd = a.state_dict()
    assert sd["0.perm"].dtype == torch.int16
    sd["0.perm"] = sd["0.perm"].to(torch.int32)
    b.load_state_dict(sd)
    assert b[0].perm.dtype == torch.int16 and torch.equal(b[0].perm, a[0].perm)
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))
    sd["0.perm"] = sd["0.perm"].clone()
    sd["0.perm"][0] = 40000  # out of range for the layer (and for int16)
    with pytest.raises(ValueError, match="perm"):
        b.load_state_dict(sd)


def test_safetensors_roundtrip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    a, b = _quantized(0), _quantized(2)
    path = tmp_path / "m.safetensors"
    safetensors.save_file(a.state_dict(), str(path))
    b.load_state_dict(safetensors.load_file(str(path)))
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("corrupt,msg", [
    (lambda sd: sd.__setitem__("0.data", sd["0.data"][:-1]), "bytes"),
    (lambda sd: sd.__setitem__("0.bits", sd["0.bits"][:-1]), "bits"),
    (lambda sd: sd.__setitem__("0.perm", torch.zeros_like(sd["0.perm"])), "perm|bits"),
    (lambda sd: sd.__setitem__("0.scale", sd["0.scale"].double()), "scale"),
    (lambda sd: sd.__setitem__("0.buckets", sd["0.buckets"][:, :3]), "buckets"),
    (lambda sd: sd["0.zero"].fill_(255), "zero"),
    (lambda sd: sd["0.scale"].fill_(float("nan")), "scale"),
])
def test_corrupt_state_dict_raises(corrupt, msg):
    a, b = _quantized(0), _quantized(1)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    corrupt(sd)
    with pytest.raises(ValueError, match=msg):
        b.load_state_dict(sd)


def test_from_linear_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        pnn.PackedLinear.from_linear(nn.Conv1d(2, 2, 1), 4)
    with pytest.raises(ValueError, match="bits"):
        pnn.PackedLinear.from_linear(nn.Linear(4, 3), torch.tensor([2, 4]))
    with pytest.raises(TypeError, match="bits_for"):
        pnn.quantize_model(model(), bits_for=4)
    with pytest.raises(TypeError, match="bits"):
        pnn.quantize_model(model(), "4")  # an int, a dict or a callable (test_quant_dropin.py)


def test_packed_size_is_a_fraction_of_fp32():
    lin = nn.Linear(4096, 256, bias=False)
    layer = pnn.PackedLinear.from_linear(lin, 4)
    data = layer.packed.data.numel()
    assert data == 256 * 4096 // 2
    assert layer.packed_bytes - data < 0.02 * data
    assert isinstance(layer.packed, quant.PackedWeight)


# ---------------------------------------------------------------- forward's per-call path
# forward calls the registered op on the buffers directly (no PackedWeight per call): it must
# give what packed_linear gives, follow buffers set by load_state_dict, and check x itself.
@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("group_size", [None, 32])
def test_forward_is_packed_linear_values_and_grads(backend, group_size):
    lin = nn.Linear(70, 20)
    layer = pnn.PackedLinear.from_linear(lin, bits_of(20), group_size, backend=backend)
    for shape in [(70,), (1, 70), (1, 1, 70), (3, 2, 70)]:
        x = torch.randn(shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y = layer(x)
        want = quant.packed_linear(x2, layer.packed, layer.bias, backend=backend)
        assert y.shape == (*shape[:-1], 20) and torch.equal(y, want)
        g = torch.randn_like(y)
        (gx, gb), (wx, wb) = (torch.autograd.grad(t, (v, layer.bias), g) for t, v in ((y, x), (want, x2)))
        assert torch.equal(gx, wx) and torch.equal(gb, wb)
    with torch.no_grad():
        x = torch.randn(1, 70)
        assert not layer(x).requires_grad and torch.equal(layer(x), quant.packed_linear(x, layer.packed, layer.bias,
                                                                                         backend=backend))


def test_forward_follows_loaded_and_assigned_state():
    """load_state_dict (copied or assigned) with other widths and group size: forward uses them."""
    x = torch.randn(2, 30)
    src = pnn.PackedLinear.from_linear(nn.Linear(30, 20), bits_of(20, 1), 32)
    for assign in (False, True):
        dst = pnn.PackedLinear.from_linear(nn.Linear(30, 20), 4)
        dst.load_state_dict(src.state_dict(), assign=assign)
        assert torch.equal(dst(x), src(x))


def test_forward_after_pickling_a_layer_from_before_the_call_plan():
    layer = pnn.PackedLinear.from_linear(nn.Linear(30, 20), bits_of(20), 32)
    state = dict(layer.__dict__)
    del state["_flat_buckets"], state["_op_group_size"]  # what a layer pickled before them holds
    old = pnn.PackedLinear.__new__(pnn.PackedLinear)
    old.__setstate__(state)
    x = torch.randn(3, 30)
    assert torch.equal(old(x), layer(x))


def test_forward_resolves_the_backend_per_call(monkeypatch):
    from pyeditor import reference
    layer = pnn.PackedLinear.from_linear(nn.Linear(30, 20), 4)
    x = torch.randn(2, 30)
    calls = []
    real = reference.packed_linear
    monkeypatch.setattr(reference, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(x)
    assert not calls
    want, fast = real(x, layer.packed.quantized(), layer.bias), layer(x)
    monkeypatch.setenv("PYEDITOR_BACKEND", "reference")
    assert torch.equal(layer(x), want) and calls == [1]
    monkeypatch.delenv("PYEDITOR_BACKEND")
    assert torch.equal(layer(x), fast) and calls == [1]
    layer.backend = "reference"  # the attribute, changed after calls, wins too
    assert torch.equal(layer(x), want) and calls == [1, 1]
    layer.backend = "no-such-backend"
    with pytest.raises(ValueError, match="backend must be one of"):
        layer(x)


@pytest.mark.parametrize("bad,exc,msg", [
    ("x", TypeError, "x must be a torch.Tensor"),
    (torch.ones(2, 30, dtype=torch.int32), TypeError, "x must be float32"),
    (torch.tensor(1.0), ValueError, "at least 1 dimension"),
    (torch.ones(2, 31), ValueError, "31 input features.*in_features=30"),
    (torch.ones(2, 30, device="meta"), ValueError, "x is on meta"),
])
def test_forward_bad_x_names_it(bad, exc, msg):
    layer = pnn.PackedLinear.from_linear(nn.Linear(30, 20), 4)
    with pytest.raises(exc, match=msg):
        layer(bad)


def test_torch_compile_fullgraph_module():
    torch._dynamo.reset()
    layer = pnn.PackedLinear.from_linear(nn.Linear(70, 20), bits_of(20), 32)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(1, 1, 70, requires_grad=True)
    y = compiled(x)
    assert torch.equal(y, layer(x))
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    layer(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
