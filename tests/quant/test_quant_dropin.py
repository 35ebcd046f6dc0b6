"""pyeditor.nn as a drop-in for real models (issue 25 item 4): quantize_model's bits forms,
skip patterns and tied weights; attention modules that read ``.weight`` directly; dtype casts
that leave the packed buffers alone; load_quantized into a meta-constructed model; group-wise
scales in PackedLinear state_dicts."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyeditor import nn as pnn
from pyeditor import quant
from pyeditor import reference as ref

PACKED = ("data", "scale", "zero", "perm", "buckets", "bits", "group")


class Block(nn.Module):
    """Hugging Face-style attention (separate q/k/v/o linears), an MLP and a tied head."""

    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: the same Parameter

    def forward(self, ids):
        h = self.embed(ids)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        h = h + self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        h = h + self.mlp(h)
        return self.lm_head(h)


def block(seed=0):
    torch.manual_seed(seed)
    return Block()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24, bias=False), nn.Linear(24, 8))


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def quantize_quietly(m, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pnn.quantize_model(m, *args, **kwargs)


# ---------------------------------------------------------------- quantize_model: bits forms, skip
def test_bits_int_dict_callable_and_bits_for():
    m = mlp()
    assert pnn.quantize_model(m, 8) is m
    assert all(isinstance(m[i], pnn.PackedLinear) for i in (0, 2, 3))
    assert all(bool((m[i].bits == 8).all()) for i in (0, 2, 3))

    m = mlp()
    widths = torch.tensor([2, 4, 6, 8]).repeat(6)  # [24]
    pnn.quantize_model(m, {"0": 4, "2": widths, "3": None})
    assert isinstance(m[0], pnn.PackedLinear) and isinstance(m[2], pnn.PackedLinear)
    assert isinstance(m[3], nn.Linear) and torch.equal(m[2].bits, widths)

    m = mlp()
    pnn.quantize_model(m, lambda name, lin: 6 if lin.out_features == 40 else None)  # the old positional form
    assert isinstance(m[0], pnn.PackedLinear) and isinstance(m[2], nn.Linear)
    m = mlp()
    pnn.quantize_model(m, bits_for=lambda name, lin: 2 if name == "3" else None, fast=True)  # README's form
    assert isinstance(m[3], pnn.PackedLinear) and m[3].fast and isinstance(m[0], nn.Linear)


def test_bits_spellings_numpy_list_tuple_and_0d_tensor():
    """An integer width as a NumPy integer or a 0-d integer tensor, and per-channel widths as a
    list or tuple, mean what the int / [out] tensor forms mean; the error lists the widths in order."""
    import numpy as np

    lin = nn.Linear(32, 24)
    want = pnn.PackedLinear.from_linear(lin, 4)
    for b in (np.int64(4), torch.tensor(4), [4] * 24, (4,) * 24):
        got = pnn.PackedLinear.from_linear(lin, b)
        assert torch.equal(got.bits, want.bits) and torch.equal(got.packed.data, want.packed.data)
    widths = [2, 4, 6, 8] * 6
    assert torch.equal(pnn.PackedLinear.from_linear(lin, widths).bits, torch.tensor(widths))
    for b in (np.int32(8), torch.tensor(8)):
        m = mlp()
        pnn.quantize_model(m, b)
        assert all(bool((m[i].bits == 8).all()) for i in (0, 2, 3))
    with pytest.raises(ValueError, match=r"bits must be in \{2, 4, 6, 8\}, got 3"):
        pnn.PackedLinear.from_linear(lin, [3] * 24)
    with pytest.raises(TypeError, match="bits"):
        pnn.PackedLinear.from_linear(lin, [True] * 24)


def test_quantize_model_on_packed_layers_warns_and_keeps_them():
    """A second quantize_model does not re-quantize PackedLinear codes: it says so."""
    m = mlp()
    pnn.quantize_model(m, 4)
    before = m[0].packed.data.clone()
    with pytest.warns(UserWarning, match=r"PackedLinear already .*keep their widths"):
        pnn.quantize_model(m, 2)
    assert bool((m[0].bits == 4).all()) and torch.equal(m[0].packed.data, before)
    m = mlp()
    pnn.quantize_model(m, {"0": 4})
    with warnings.catch_warnings():  # a second pass over the float layers left is quiet
        warnings.simplefilter("error")
        pnn.quantize_model(m, {"2": 8, "3": 8})
    assert isinstance(m[2], pnn.PackedLinear) and bool((m[0].bits == 4).all())


def test_skip_names_and_patterns():
    m = block()
    quantize_quietly(m, 4, skip=("mlp", "*_proj"))  # a module name keeps the linears inside it
    assert not any(isinstance(x, pnn.PackedLinear) for x in m.modules())
    m = block()
    quantize_quietly(m, 4, skip="[qk]_proj")  # one pattern as a str
    kinds = {n: type(x).__name__ for n, x in m.named_modules() if isinstance(x, (nn.Linear, pnn.PackedLinear))}
    assert kinds == {"q_proj": "Linear", "k_proj": "Linear", "v_proj": "PackedLinear", "o_proj": "PackedLinear",
                     "mlp.0": "PackedLinear", "mlp.2": "PackedLinear", "lm_head": "Linear"}
    m = mlp()
    pnn.quantize_model(m, {"0": 4, "2": 4}, skip=["2"])  # skip wins over the dict
    assert isinstance(m[0], pnn.PackedLinear) and isinstance(m[2], nn.Linear)


def test_quantize_kwargs_are_forwarded(monkeypatch):
    seen = []
    real = quant.quantize_channelwise

    def spy(weight, bits, group_size=None, **kwargs):
        seen.append((group_size, kwargs))
        return real(weight, bits, group_size)

    monkeypatch.setattr(quant, "quantize_channelwise", spy)
    pnn.quantize_model(mlp(), 4, group_size=32, method="minmax")
    assert seen == [(32, {"method": "minmax"})] * 3
    monkeypatch.undo()
    if "method" in inspect.signature(quant.quantize_channelwise).parameters:  # the real keyword
        a, b = pnn.quantize_model(mlp(), 4, method="minmax"), pnn.quantize_model(mlp(), 4)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("call,exc,msg", [
    (lambda m: pnn.quantize_model(m, 3), ValueError, "bits"),
    (lambda m: pnn.quantize_model(m, "4"), TypeError, "bits"),
    (lambda m: pnn.quantize_model(m, True), TypeError, "bits"),
    (lambda m: pnn.quantize_model(m), TypeError, "bits"),
    (lambda m: pnn.quantize_model(m, 4, bits_for=lambda n, lin: 4), TypeError, "bits_for"),
    (lambda m: pnn.quantize_model(m, {"0": 4, "1": 4}), ValueError, r"\['1'\]"),  # "1" is the ReLU
    (lambda m: pnn.quantize_model(m, {"0": 4, "nope": 4}), ValueError, "nope"),
    (lambda m: pnn.quantize_model(m, 4, group_size=48), ValueError, "group_size"),
    (lambda m: pnn.quantize_model(m, 4, skip=[3]), TypeError, "skip"),
    (lambda m: pnn.quantize_model(m, 4, tied="maybe"), ValueError, "tied"),
    (lambda m: pnn.quantize_model(m, 4, fast=1), TypeError, "fast"),
    (lambda m: pnn.quantize_model(m, {"0": 4, "2": torch.tensor([2, 4])}), ValueError, "'2'.*bits"),
    (lambda m: pnn.quantize_model(m, 4, no_such_option=1), TypeError, "no_such_option"),
    (lambda m: pnn.quantize_model(nn.Linear(3, 4), 4), ValueError, "from_linear"),
    (lambda m: pnn.quantize_model("model", 4), TypeError, "model"),
])
def test_quantize_model_bad_input_names_the_argument_and_changes_nothing(call, exc, msg):
    m = mlp()
    with pytest.raises(exc, match=msg):
        call(m)
    assert not any(isinstance(x, pnn.PackedLinear) for x in m.modules())


def test_meta_model_cannot_be_quantized():
    with torch.device("meta"):
        m = mlp()
    with pytest.raises(ValueError, match="'0'.*meta"):
        pnn.quantize_model(m, 4)


# ---------------------------------------------------------------- tied weights
def test_tied_weights_are_kept_float_with_a_warning():
    m = block()
    ids = torch.randint(0, 50, (2, 7))
    dense = m(ids)
    with pytest.warns(UserWarning, match="lm_head"):
        pnn.quantize_model(m, 8)
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight is m.embed.weight  # still tied
    assert isinstance(m.o_proj, pnn.PackedLinear) and isinstance(m.mlp[2], pnn.PackedLinear)
    assert cosine(m(ids), dense) > 0.999

    with pytest.raises(ValueError, match="lm_head"):
        pnn.quantize_model(block(), 8, tied="error")
    m = block()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pnn.quantize_model(m, 8, tied="untie")
    assert isinstance(m.lm_head, pnn.PackedLinear) and isinstance(m.embed, nn.Embedding)


def test_tied_by_shared_memory_and_shared_modules():
    m = mlp()
    m[3].weight = nn.Parameter(torch.randn(8, 24))
    emb = nn.Embedding(8, 24)
    emb.weight = nn.Parameter(m[3].weight.data)  # another Parameter over the same memory
    m.add_module("emb", emb)
    with pytest.warns(UserWarning, match=r"\['3'\]"):
        pnn.quantize_model(m, 4)
    assert isinstance(m[3], nn.Linear) and isinstance(m[0], pnn.PackedLinear)

    shared = nn.Linear(16, 16)
    m = nn.Sequential(shared, nn.ReLU(), shared)  # one module under two names: stays one module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pnn.quantize_model(m, 4)
    assert isinstance(m[0], pnn.PackedLinear) and m[0] is m[2]


# ---------------------------------------------------------------- attention
def test_transformer_encoder_layer_fast_path(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, batch_first=True).eval()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        dense = layer(x)
    pnn.quantize_model(layer, 8)
    assert isinstance(layer.self_attn.out_proj, pnn.PackedLinear) and isinstance(layer.linear1, pnn.PackedLinear)
    calls = []
    fast = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or fast(*a))
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        y = layer(x)
    assert calls, "the fast path was not taken"
    assert cosine(y, dense) > 0.99
    y_slow = layer(x)  # grad enabled: the slow path, through PackedLinear.forward
    assert len(calls) == 1 and cosine(y_slow, dense) > 0.99
    y_slow.sum().backward()
    assert layer.linear1.bias.grad is not None


def test_multihead_attention_and_its_weight_property():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 9, 64)
    with torch.no_grad():
        dense = mha(q, kv, kv)[0]
        dense_self = mha(q, q, q)[0]
    pnn.quantize_model(mha, 8)
    out = mha.out_proj
    assert isinstance(out, pnn.PackedLinear)
    w = out.weight
    assert w.dtype == torch.float32 and w.shape == (64, 64) and not w.requires_grad
    assert torch.equal(w, out.dequantize())
    with torch.no_grad():
        assert cosine(mha(q, kv, kv)[0], dense) > 0.99
        assert cosine(mha(q, q, q)[0], dense_self) > 0.99  # the native fast path
    y = mha(q, kv, kv)[0]
    assert cosine(y, dense) > 0.99
    y.sum().backward()
    assert out.bias.grad is not None
    with pytest.raises(AttributeError):  # read-only
        out.weight = w
    with pytest.raises(KeyError, match="weight"):
        out.weight = nn.Parameter(w)


def test_hugging_face_style_projections():
    m = block()
    ids = torch.randint(0, 50, (2, 7))
    dense = m(ids)
    quantize_quietly(m, 8, group_size=32)
    assert isinstance(m.q_proj, pnn.PackedLinear) and m.q_proj.group_size == 32
    assert cosine(m(ids), dense) > 0.999


# ---------------------------------------------------------------- dtype casts
@pytest.mark.parametrize("cast,dtype", [
    (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.half(), torch.float16),
    (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    (lambda m: m.double(), torch.float64),
])
def test_dtype_casts_keep_the_packed_buffers(cast, dtype):
    m = mlp()
    x = torch.randn(5, 48)
    dense = m(x)
    pnn.quantize_model(m, {"0": 8, "2": 8}, group_size=32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert cast(m) is m
    after = m.state_dict()
    for k, v in before.items():
        leaf = k.rpartition(".")[2]
        if leaf in PACKED:
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        else:
            assert after[k].dtype == dtype, k  # bias and the float layer follow the module
    assert m[0].scale.dtype == torch.float32 and m[0].weight.dtype == dtype and m[2].weight.dtype == dtype
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert cosine(y, dense) > 0.99
    m.float()
    assert m[2].weight.dtype == torch.float32  # no bias: the dtype of the last cast
    assert cosine(m(x), dense) > 0.99


def test_bf16_forward_matches_reference():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    layer = pnn.PackedLinear.from_linear(lin, 4, group_size=32)
    assert layer.bias.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    qw = ref.quantize_channelwise(lin.weight.detach(), 4, 32)
    expected = ref.packed_linear(x, qw, lin.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_transformer_layer_in_bf16():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True).eval()
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        dense = layer(x)
        pnn.quantize_model(layer, 8).to(torch.bfloat16)
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and cosine(y, dense) > 0.99


# ---------------------------------------------------------------- load_quantized
def _saved(seed=0):
    m = block(seed)
    quantize_quietly(m, lambda name, lin: None if name == "q_proj" else
                     torch.tensor([2, 4, 6, 8])[torch.arange(lin.out_features) % 4], group_size=None)
    quantize_quietly(m, {"q_proj": 8}, group_size=32)
    return m


@pytest.mark.parametrize("fmt", ["dict", "torch", "safetensors"])
def test_round_trip_into_a_meta_model(tmp_path, fmt):
    a = _saved()
    sd = a.state_dict()
    if fmt == "dict":
        src = sd
    elif fmt == "torch":
        src = tmp_path / "m.pt"
        torch.save(sd, src)
    else:
        st = pytest.importorskip("safetensors.torch")
        src = str(tmp_path / "m.safetensors")
        st.save_model(a, src)  # drops the tied duplicate lm_head.weight
    with torch.device("meta"):
        b = Block()
    assert pnn.load_quantized(b, src) is b
    assert not any(t.is_meta for t in b.state_dict().values())
    assert isinstance(b.q_proj, pnn.PackedLinear) and b.q_proj.group_size == 32
    assert isinstance(b.o_proj, pnn.PackedLinear) and b.o_proj.group_size is None
    assert b.lm_head.weight is b.embed.weight  # tied again
    for k, v in sd.items():
        assert b.state_dict()[k].dtype == v.dtype and torch.equal(b.state_dict()[k], v), k
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(a(ids), b(ids))


def test_load_into_a_float_model_and_an_attention_model():
    a = mlp()
    pnn.quantize_model(a, {"0": 4, "3": 2}, group_size=32)
    b = mlp(seed=1)  # materialized float model: loads in place
    pnn.load_quantized(b, a.state_dict(), fast=True)
    x = torch.randn(3, 48)
    assert isinstance(b[0], pnn.PackedLinear) and b[0].fast and isinstance(b[2], nn.Linear)
    assert torch.equal(b[2].weight, a[2].weight)
    torch.testing.assert_close(b[0](x), a[0](x), atol=0.05, rtol=0)  # fast: int8 activations
    assert b[3].fast
    b[0].fast = b[3].fast = False
    assert torch.equal(a(x), b(x))

    torch.manual_seed(0)
    enc = pnn.quantize_model(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 8).eval()
    with torch.device("meta"):
        enc2 = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    pnn.load_quantized(enc2, enc.state_dict()).eval()
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), enc2(x))


def _bad(sd_edit, model_fn=mlp):
    a = mlp()
    pnn.quantize_model(a, {"0": 4, "2": 8}, group_size=32)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd_edit(sd)
    with torch.device("meta"):
        b = model_fn()
    return b, sd


def _wider():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32, bias=False), nn.Linear(24, 8))


def _longer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24, bias=False), nn.Linear(24, 8))


@pytest.mark.parametrize("edit,model_fn,msg", [
    (lambda sd: sd.pop("3.bias"), mlp, r"missing keys \['3.bias'\]"),
    (lambda sd: sd.__setitem__("9.weight", torch.zeros(1)), mlp, r"unexpected keys \['9.weight'\]"),
    (lambda sd: sd.pop("0.perm"), mlp, r"'0'.*\['0.perm'\]"),
    (lambda sd: sd.__setitem__("0.weight", torch.zeros(40, 48)), mlp, "'0.weight'"),
    (lambda sd: None, _wider, "'2.bits'.*out_features=32"),
    (lambda sd: None, _longer, "'0.data'.*in_features=64"),
    (lambda sd: sd.__setitem__("3.weight", torch.zeros(8, 25)), mlp, r"'3.weight'.*\[8, 25\]"),
    (lambda sd: sd.__setitem__("0.bias", torch.zeros(41)), mlp, "'0.bias'"),
    (lambda sd: sd.__setitem__("0.scale", sd["0.scale"][:1]), mlp, "'0.scale'.*group_size=32"),
    (lambda sd: sd.__setitem__("0.zero", sd["0.zero"].t()), mlp, "'0.zero'"),
    (lambda sd: sd["0.zero"][1].fill_(16), mlp, "'0.zero'.*2\\*\\*bits"),
    (lambda sd: sd["0.scale"][1, 0].fill_(0), mlp, "'0.scale'.*> 0"),
    (lambda sd: sd["0.scale"][0, 3].fill_(float("inf")), mlp, "'0.scale'.*finite"),
    (lambda sd: sd.__setitem__("0.group", torch.tensor(48)), mlp, "'0.group'"),
    (lambda sd: sd.__setitem__("0.group", torch.tensor(32.0)), mlp, "'0.group'.*int64"),
    (lambda sd: sd.__setitem__("0.scale", sd["0.scale"].half()), mlp, "'0.scale'.*float32"),
    (lambda sd: sd.__setitem__("1.bits", sd["0.bits"]), mlp, "unexpected.*1.bits.*nn.Linear"),
])
def test_load_quantized_bad_state_names_the_key(edit, model_fn, msg):
    b, sd = _bad(edit, model_fn)
    with pytest.raises(ValueError, match=msg):
        pnn.load_quantized(b, sd)
    assert not any(isinstance(x, pnn.PackedLinear) for x in b.modules())  # checked before any change


def test_load_quantized_bad_arguments_and_leftover_meta(tmp_path):
    with pytest.raises(TypeError, match="path_or_state_dict"):
        pnn.load_quantized(mlp(), 42)
    with pytest.raises(FileNotFoundError, match="path_or_state_dict"):
        pnn.load_quantized(mlp(), tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="'0.weight'"):
        pnn.load_quantized(mlp(), {"0.weight": [1.0]})
    b, sd = _bad(lambda sd: sd.pop("3.bias"))
    with pytest.raises(ValueError, match=r"\['3.bias'\].*meta"):
        pnn.load_quantized(b, sd, strict=False)


# ---------------------------------------------------------------- PackedLinear with group-wise scales
def test_from_linear_group_size_repr_and_state():
    lin = nn.Linear(70, 20)
    layer = pnn.PackedLinear.from_linear(lin, 4, group_size=32)
    assert layer.group_size == 32 and layer.scale.shape == (3, 32) and layer.zero.shape == (3, 32)
    assert "group_size=32" in repr(layer) and "group_size=None" in repr(pnn.PackedLinear.from_linear(lin, 4))
    x = torch.randn(4, 70)
    qw = ref.quantize_channelwise(lin.weight.detach(), 4, 32)
    torch.testing.assert_close(layer(x), ref.packed_linear(x, qw, lin.bias), atol=1e-4, rtol=1e-5)
    assert torch.equal(layer.dequantize(), ref.dequantize(qw))
    with pytest.raises(ValueError, match="group_size"):
        pnn.PackedLinear.from_linear(lin, 4, group_size=16)

    other = pnn.PackedLinear.from_linear(nn.Linear(70, 20), torch.tensor([2, 8] * 10))  # per channel
    other.load_state_dict(layer.state_dict())
    assert other.group_size == 32 and torch.equal(other(x), layer(x))
    sd = layer.state_dict()
    del sd["group"]  # a state_dict without the key: the group size comes from scale's shape
    other = pnn.PackedLinear.from_linear(nn.Linear(70, 20), 2)
    other.load_state_dict(sd)
    assert other.group_size == 32 and int(other.group) == 32 and torch.equal(other(x), layer(x))


def test_grouped_state_dict_strict_or_not():
    layer = pnn.PackedLinear.from_linear(nn.Linear(70, 20), 4, group_size=64)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["zero"].fill_(16)
    for strict in (True, False):
        with pytest.raises(ValueError, match="'zero'"):
            pnn.PackedLinear.from_linear(nn.Linear(70, 20), 2).load_state_dict(sd, strict=strict)
    sd = {k: v for k, v in layer.state_dict().items() if k != "perm"}  # partial packed state
    with pytest.raises(ValueError, match=r"\['perm'\]"):
        pnn.PackedLinear.from_linear(nn.Linear(70, 20), 2).load_state_dict(sd, strict=False)
    sd = {"bias": torch.zeros(20)}  # no packed keys, strict=False: the layer keeps its weight
    keep = pnn.PackedLinear.from_linear(nn.Linear(70, 20), 2)
    w = keep.dequantize()
    keep.load_state_dict(sd, strict=False)
    assert torch.equal(keep.dequantize(), w) and not keep.bias.any()


def test_untied_head_round_trip_and_no_aliasing():
    a = block()
    pnn.quantize_model(a, 4, tied="untie")
    with torch.device("meta"):
        b = Block()
    pnn.load_quantized(b, a.state_dict())
    assert isinstance(b.lm_head, pnn.PackedLinear) and torch.equal(b.embed.weight, a.embed.weight)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(a(ids), b(ids))

    c = pnn.quantize_model(mlp(seed=1), 2)
    sd = pnn.quantize_model(mlp(), 8).state_dict()
    c.load_state_dict(sd)
    sd["0.data"].zero_()  # the loaded layer holds copies, not the caller's tensors
    assert c[0].data.any()


def test_load_quantized_with_a_renaming_pre_hook():
    """A module that renames older keys in a load_state_dict pre-hook (ParameterEditor does)."""
    class Renames(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.register_load_state_dict_pre_hook(self._rename)

        @staticmethod
        def _rename(module, state_dict, prefix, *args):
            if prefix + "old_scale" in state_dict:
                state_dict[prefix + "body.3.bias"] = state_dict.pop(prefix + "old_scale")

    a = Renames()
    pnn.quantize_model(a, {"body.0": 4})
    sd = a.state_dict()
    sd["old_scale"] = sd.pop("body.3.bias")
    with torch.device("meta"):
        b = Renames()
    pnn.load_quantized(b, sd)
    x = torch.randn(2, 48)
    assert torch.equal(a.body(x), b.body(x))


# ---------------------------------------------------------------- quantize_model(calibration=...)
def spy_activations(monkeypatch):
    """Records (weight shape, activations) of every quantize_channelwise call."""
    seen = []
    real = quant.quantize_channelwise

    def spy(weight, bits, group_size=None, **kwargs):
        seen.append((tuple(weight.shape), kwargs.get("method"), kwargs.get("activations")))
        return real(weight, bits, group_size, **kwargs)

    monkeypatch.setattr(quant, "quantize_channelwise", spy)
    return seen


def layer_inputs(model, x):
    """{linear name: its input rows [-1, in]} from one forward of x."""
    got, hooks = {}, []

    def keep(name, x):
        got.setdefault(name, x.reshape(-1, x.shape[-1]).clone())

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, _n=name: keep(_n, inp[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def test_calibration_gives_each_layer_its_own_inputs(monkeypatch):
    m, ids = block(), torch.randint(0, 50, (3, 7))
    want = layer_inputs(m, ids)
    seen = spy_activations(monkeypatch)
    quantize_quietly(m, 4, group_size=32, calibration=ids)  # lm_head is tied: kept float
    assert [s for s, _, _ in seen] == [(32, 32)] * 4 + [(128, 32), (32, 128)]
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.0", "mlp.2"]
    for (_, method, acts), name in zip(seen, names):
        assert method == "calibrated" and torch.equal(acts, want[name]), name
    assert seen[0][2] is seen[1][2] is seen[2][2]  # q, k, v read one tensor: one buffer
    assert seen[3][2] is not seen[0][2]
    # the same as quantizing each layer with its inputs by hand
    by_hand = block()
    for name in names:
        pnn.quantize_model(by_hand, {name: 4}, group_size=32, method="calibrated", activations=want[name])
    sd = by_hand.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_calibration_forms_agree():
    x1, x2 = torch.randn(5, 48), torch.randn(3, 48)

    def run(calibration, **kw):
        return pnn.quantize_model(mlp(), 4, calibration=calibration, **kw).state_dict()

    base = run(lambda model: (model(x1), model(x2)))
    for form in ([x1, x2], [(x1,), {"input": x2}]):
        got = run(form)
        assert all(torch.equal(v, got[k]) for k, v in base.items())
    assert run(x1, method="calibrated").keys() == base.keys()


def test_calibration_rows_are_a_bounded_seeded_sample(monkeypatch):
    m, xs = mlp(), [torch.randn(4, 6, 48) for _ in range(3)]  # 72 rows per layer
    want = torch.cat([x.reshape(-1, 48) for x in xs])
    seen = spy_activations(monkeypatch)
    pnn.quantize_model(m, 4, calibration=xs, calibration_rows=20)
    acts = seen[0][2]
    assert acts.shape == (20, 48)
    row_of = {tuple(r.tolist()): i for i, r in enumerate(want)}
    picked = sorted(row_of[tuple(r.tolist())] for r in acts)  # every kept row is a real input row, once
    assert len(set(picked)) == 20 and picked[-1] >= 20  # not just the first 20
    seen.clear()
    pnn.quantize_model(mlp(), 4, calibration=xs, calibration_rows=20)
    assert torch.equal(seen[0][2], acts)  # the same data gives the same sample
    seen.clear()
    pnn.quantize_model(mlp(), 4, calibration=xs, calibration_rows=500)
    assert torch.equal(seen[0][2], want)  # all rows while they fit


def test_calibrated_layer_has_no_more_output_error_than_minmax():
    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[:, :4] *= 20  # outlier inputs: where the data matters
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    out = lin(x).detach()
    errs = {}
    for method in ("minmax", "calibrated"):
        kw = {"calibration": x} if method == "calibrated" else {}
        q = pnn.quantize_model(nn.Sequential(copy.deepcopy(lin)), 4, group_size=32, **kw)
        with torch.no_grad():
            errs[method] = (q(x) - out).pow(2).sum().item()
    assert errs["calibrated"] < errs["minmax"]


def test_sequential_calibration_sees_the_quantized_layers_before(monkeypatch):
    x = torch.randn(16, 48)
    seen = spy_activations(monkeypatch)
    q = pnn.quantize_model(mlp(), 4, calibration=x, sequential=True)
    assert all(isinstance(q[i], pnn.PackedLinear) for i in (0, 2, 3))
    with torch.no_grad():
        h0 = torch.relu(q[0](x))
        assert torch.equal(seen[0][2], x) and torch.equal(seen[1][2], h0)  # layer 2 reads quantized layer 0
        assert torch.equal(seen[2][2], q[2](h0))
    seen.clear()
    pnn.quantize_model(mlp(), 4, calibration=x)
    with torch.no_grad():
        assert torch.equal(seen[1][2], torch.relu(mlp()[0](x)))  # one pass: the float model's inputs


def test_sequential_calibration_error_restores_the_model():
    m, calls = mlp(), []
    x = torch.randn(4, 48)

    def flaky(model):
        calls.append(1)
        if len(calls) == 3:  # order pass, step of layer 0, then fail in the step of layer 2
            raise RuntimeError("data source went away")
        model(x)

    with pytest.raises(RuntimeError, match="went away"):
        pnn.quantize_model(m, 4, calibration=flaky, sequential=True)
    assert not any(isinstance(l, pnn.PackedLinear) for l in m.modules())
    assert all(isinstance(m[i], nn.Linear) for i in (0, 2, 3))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda m: pnn.quantize_model(m, 4, calibration="text"), TypeError, "calibration"),
    (lambda m: pnn.quantize_model(m, 4, calibration=[]), TypeError, "calibration"),
    (lambda m: pnn.quantize_model(m, 4, calibration=torch.randn(2, 48), method="search"), ValueError,
     "calibration.*calibrated"),
    (lambda m: pnn.quantize_model(m, 4, calibration=torch.randn(2, 48), activations=torch.randn(2, 48)), TypeError,
     "not both"),
    (lambda m: pnn.quantize_model(m, 4, calibration=torch.randn(2, 48), calibration_rows=0), ValueError,
     "calibration_rows"),
    (lambda m: pnn.quantize_model(m, 4, calibration=torch.randn(2, 48), calibration_rows=2.0), TypeError,
     "calibration_rows"),
    (lambda m: pnn.quantize_model(m, 4, calibration=torch.randn(2, 48), sequential=1), TypeError, "sequential"),
    (lambda m: pnn.quantize_model(m, 4, sequential=True), ValueError, "sequential.*calibration"),
    (lambda m: pnn.quantize_model(m, 4, method="calibrated"), ValueError, "calibration="),
    (lambda m: pnn.quantize_model(m, 4, calibration=lambda model: model[0](torch.randn(2, 48))), ValueError,
     r"never called \['2', '3'\]"),
    (lambda m: pnn.quantize_model(m, 4, calibration=lambda model: model[0](torch.randn(2, 48)), sequential=True),
     ValueError, r"never called \['2', '3'\]"),
])
def test_calibration_bad_input_names_the_argument_and_changes_nothing(call, exc, msg):
    m = mlp()
    with pytest.raises(exc, match=msg):
        call(m)
    assert not any(isinstance(x, pnn.PackedLinear) for x in m.modules())


def test_calibration_layers_that_share_an_input_only_at_first_keep_their_own(monkeypatch):
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(32, 4), nn.Linear(32, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else 2 * x)  # shared on the first call only

    x1, x2 = torch.randn(3, 32), torch.randn(2, 32)
    seen = spy_activations(monkeypatch)
    pnn.quantize_model(Fork(), 4, calibration=[x1, x2])
    (_, _, a), (_, _, b) = seen
    assert torch.equal(a, torch.cat([x1, x2])) and torch.equal(b, torch.cat([x1, 2 * x2]))


def test_calibration_sees_inputs_changed_in_place_between_layers(monkeypatch):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 4), nn.Linear(32, 4)

        def forward(self, x):
            x = x.clone()
            y = self.a(x)
            x.mul_(3)  # the same tensor object, other values
            return y + self.b(x)

    x = torch.randn(5, 32)
    seen = spy_activations(monkeypatch)
    pnn.quantize_model(InPlace(), 4, calibration=x)
    (_, _, a), (_, _, b) = seen
    assert torch.equal(a, x) and torch.equal(b, 3 * x)
