"""PackedLinear's compute modes (issue 29 item 2): mode="exact" | "int8act" | "bf16", the deprecated
fast= spelling, and the int8act error bound (max|x_row| / 254) * sum_k |W[n, k]| against
pyeditor.reference on random activations, activations with outlier rows and columns, and
activations captured from the bench's real models (skipped when their packages are absent).
The bf16 mode's numerics: test_quant_bf16_mode.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import pyeditor.nn as pnn
from pyeditor import backends, quant, reference

needs_cpp = pytest.mark.skipif("cpu" not in backends.available("cpu"),
                               reason="int8act is a kernel of the C++ CPU backend, which is not built here")
# the output's rounding to its dtype, on top of the bound (float32: the exact mode's sums)
OUT_EPS = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


def layer_of(n, k, bits, group_size, mode="exact", seed=0, bias=True) -> pnn.PackedLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    if bits == "mixed":
        bits = torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]
    return pnn.PackedLinear.from_linear(lin, bits, group_size, mode=mode, backend="cpu")


def exact_ref(layer: pnn.PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference's x @ W.T + bias in float64 (the exact product with the exact weight)."""
    bias = None if layer.bias is None else layer.bias.detach().double()
    return reference.packed_linear(x.detach().double(), layer.packed.quantized(), bias)


BOUNDS = {"int8act": quant.int8act_error_bound, "bf16": quant.bf16_error_bound}


def check_within_bound(layer: pnn.PackedLinear, x: torch.Tensor) -> float:
    """Asserts the layer's output (int8act or bf16 mode) is within its mode's bound of the
    reference; returns max err / bound."""
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == x.dtype
    want = exact_ref(layer, x)
    bound = BOUNDS[layer.mode](x, layer.packed)
    err = (got.double() - want).abs()
    # float roundings on top of the bound: the epilogue's (relative to the bound's scale) and the
    # output's cast to its dtype
    slack = bound * 2.0 ** -10 + OUT_EPS[x.dtype] * (want.abs() + bound) + 1e-30
    bad = err > bound + slack
    assert not bool(bad.any()), (f"{int(bad.sum())} outputs beyond the {layer.mode} bound: worst err "
                                 f"{float(err[bad].max()):.3e} at bound {float(bound.expand_as(err)[bad].max()):.3e}")
    return float((err / (bound + 1e-30)).max())


# ---------------------------------------------------------------- the API
def test_default_mode_is_exact_and_mode_is_settable():
    layer = layer_of(20, 48, 4, 32)
    assert layer.mode == "exact" and layer.fast is False and "mode='exact'" in repr(layer)
    layer.mode = "int8act"
    assert layer.mode == "int8act" and layer.fast is True
    with pytest.raises(ValueError, match="mode"):
        layer.mode = "int4"
    with pytest.raises(ValueError, match="mode must be one of"):
        layer.mode = "bfloat16"
    assert layer.mode == "int8act"  # a refused value changes nothing
    layer.mode = "bf16"
    assert layer.mode == "bf16" and layer.fast is False and "mode='bf16'" in repr(layer)


@pytest.mark.parametrize("make", [
    lambda **kw: pnn.PackedLinear(quant.quantize_channelwise(torch.randn(16, 32), 4), **kw),
    lambda **kw: pnn.PackedLinear.from_linear(nn.Linear(32, 16), 4, **kw),
    lambda **kw: pnn.quantize_model(nn.Sequential(nn.Linear(32, 16)), 4, **kw)[0],
])
def test_fast_is_a_deprecated_spelling_and_conflicts_are_refused(make):
    assert make(mode="int8act").mode == "int8act" and make().mode == "exact"
    for fast, mode in ((True, "int8act"), (False, "exact")):
        with pytest.warns(FutureWarning, match=f"fast={fast} is deprecated.*mode='{mode}'"):
            assert make(fast=fast).mode == mode
        with pytest.warns(FutureWarning):  # agreeing spellings: accepted, still a warning
            assert make(fast=fast, mode=mode).mode == mode
    for fast, mode in ((True, "exact"), (False, "int8act")):
        with pytest.raises(ValueError, match=f"fast={fast} conflicts with mode='{mode}'"):
            make(fast=fast, mode=mode)
    with pytest.raises(TypeError, match="fast must be a bool"):
        make(fast=1)
    assert make(mode="bf16").mode == "bf16"
    with pytest.raises(ValueError, match="fast=True conflicts with mode=.bf16."):
        make(fast=True, mode="bf16")
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="fast")
    with pytest.raises(TypeError, match="mode must be a str"):
        make(mode=True)


def test_fast_attribute_still_works_with_a_warning():
    layer = layer_of(16, 32, 4, None)
    with pytest.warns(FutureWarning, match="PackedLinear.fast"):
        layer.fast = True
    assert layer.mode == "int8act"
    with pytest.raises(TypeError, match="fast must be a bool"):
        layer.fast = "yes"


def test_quantize_model_and_load_quantized_set_the_mode_on_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(ValueError, match="conflicts"):
        pnn.quantize_model(model, 4, fast=False, mode="int8act")
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # refused before any swap
    pnn.quantize_model(model, 4, group_size=32, mode="int8act")
    assert model[0].mode == model[2].mode == "int8act"
    sd = model.state_dict()
    assert not any("mode" in k for k in sd)  # the mode is how to compute, not part of the weight
    fresh = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))
    pnn.load_quantized(fresh, sd, mode="int8act")
    assert fresh[0].mode == fresh[2].mode == "int8act"
    x = torch.randn(5, 48)
    assert torch.equal(fresh(x), model(x))
    plain = pnn.load_quantized(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)), sd)
    assert plain[0].mode == "exact"
    halves = pnn.load_quantized(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)), sd, mode="bf16")
    assert halves[0].mode == halves[2].mode == "bf16"
    with pytest.warns(FutureWarning, match="load_quantized: fast=True"):
        again = pnn.load_quantized(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)), sd, fast=True)
    assert again[2].mode == "int8act"


def test_a_layer_pickled_with_the_fast_flag_loads_its_mode():
    layer = layer_of(16, 32, 4, None)
    state = dict(layer.__dict__)
    state.pop("_mode"), state.pop("_fast")
    state["fast"] = True  # how a layer pickled before mode= stored it
    old = pnn.PackedLinear.__new__(pnn.PackedLinear)
    old.__setstate__(state)
    assert old.mode == "int8act" and "fast" not in old.__dict__


# ---------------------------------------------------------------- the bound, synthetic activations
def _activations(kind: str, m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "outlier-rows":  # a few rows 1000x the others (their own scale takes it)
        x[1] *= 1e3
        x[m - 1] *= 3e-4
    elif kind == "outlier-columns":  # LLM-style: a few input features far larger in every row
        x[:, 3] *= 80.0
        x[:, k // 2] *= -300.0
    elif kind == "one-spike":  # one entry dominates its row: everything else rounds to few levels
        x[0, 5] = 1e4
    elif kind == "sparse":
        x[torch.rand(m, k, generator=g) < 0.7] = 0.0
        x[2] = 0.0  # an all-zero row: scale 1, output = bias
    return x


@needs_cpp
@pytest.mark.parametrize("group_size", [None, 32, 64])
@pytest.mark.parametrize("kind", ["random", "outlier-rows", "outlier-columns", "one-spike", "sparse"])
def test_int8act_within_its_bound_of_the_reference(kind, group_size):
    # K = 200: a ragged last group for 32 and 64; mixed widths in every layer
    layer = layer_of(40, 200, "mixed", group_size, mode="int8act", seed=3)
    for m in (1, 7):  # the one-row kernels and the many-row ones
        x = _activations(kind, max(m, 3), 200, seed=m)[:m]
        check_within_bound(layer, x)
    x = _activations(kind, 7, 200, seed=11)
    exact = layer_of(40, 200, "mixed", group_size, seed=3)
    with torch.no_grad():
        assert not torch.equal(layer(x), exact(x))  # int8act really runs (it is not exact mode)


@needs_cpp
def test_the_bound_is_attained_by_an_adversarial_row():
    """Every input sits just under half a step from its int8 level, on the side of sign(W[n, k]):
    the errors add up to nearly the whole bound for output n, so the formula is the kernel's
    (scale max|x| / 127, round to nearest), not a loose envelope."""
    layer = layer_of(16, 256, 8, None, mode="int8act", bias=False)
    w = layer.dequantize()
    n = 5
    x = torch.zeros(1, 256)
    x[0, 0] = 127.0  # scale 1: the levels are the integers
    x[0, 1:] = 0.499 * torch.sign(w[n, 1:])  # all round to 0
    ratio_worst = check_within_bound(layer, x)
    with torch.no_grad():
        err = float((layer(x)[0, n].double() - exact_ref(layer, x)[0, n]).abs())
    bound = float(quant.int8act_error_bound(x, w)[0, n])
    assert err > 0.95 * bound and ratio_worst <= 1.0 + 2.0 ** -10


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casts_keep_the_mode_and_the_bound(dtype):
    x = _activations("outlier-columns", 6, 200, seed=5)
    for mode in ("exact", "int8act"):
        layer = layer_of(40, 200, 4, 64, mode=mode, seed=7)
        layer = layer.to(dtype) if dtype == torch.bfloat16 else layer.half()
        assert layer.mode == mode and layer.scale.dtype == torch.float32 and layer.bias.dtype == dtype
        xd = x.to(dtype)
        if mode == "int8act":
            check_within_bound(layer, xd)
        else:
            with torch.no_grad():
                got = layer(xd)
            assert got.dtype == dtype
            want = exact_ref(layer, xd)
            torch.testing.assert_close(got.double(), want, rtol=4 * OUT_EPS[dtype], atol=1e-3)


@needs_cpp
@pytest.mark.parametrize("mode", ["exact", "int8act"])
def test_torch_compile_fullgraph_in_both_modes(mode):
    torch._dynamo.reset()
    layer = layer_of(24, 80, "mixed", 32, mode=mode, seed=2)
    # aot_eager: Dynamo's full graph and AOT tracing through the op's fake kernel, without
    # Inductor's code generation (test_quant_nn compiles the exact mode with Inductor)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 80)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
    if mode == "int8act":
        check_within_bound(layer, x)


# ---------------------------------------------------------------- real-model activations
def _capture_inputs(model: nn.Module, run) -> dict:
    """{name: the inputs of that nn.Linear, [rows, in]} from one call of run()."""
    seen: dict = {}

    def keep(name):
        def hook(module, args, out) -> None:  # (returning a value would replace the output)
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _check_real_layers(model: nn.Module, acts: dict, group_size, mode: str) -> list:
    ratios = []
    for name, x in acts.items():
        layer = pnn.PackedLinear.from_linear(model.get_submodule(name), 4, group_size, mode=mode, backend="cpu")
        ratios.append(check_within_bound(layer, x))
    return ratios


@needs_cpp
@pytest.mark.parametrize("mode", ["int8act", "bf16"])
def test_mode_bound_on_minilm_activations(mode):
    from bench import cases_realmodel as minilm

    d = minilm.model_dir()
    if d is None:
        pytest.skip(f"the MiniLM model package is not installed ({minilm.INSTALL})")
    model = minilm.load_model(d)
    ids, mask = minilm.WordPiece(d / "vocab.txt")(minilm.sentences("eval", 3))
    acts = _capture_inputs(model, lambda: model(ids, mask))
    assert len(acts) == 36  # q, k, v, out, intermediate, output of 6 layers
    names = [n for n in acts if ".0." in n or ".5." in n]  # the first and the last layer
    assert len(names) == 12
    assert max(_check_real_layers(model, {n: acts[n] for n in names}, 64, mode)) > 0


@needs_cpp
@pytest.mark.parametrize("mode", ["int8act", "bf16"])
def test_mode_bound_on_smollm2_activations(mode):
    """The second block of SmolLM2-135M (the first two read from the GGUF file of the bench's
    package) on a sentence: real LM activations, the residual stream's outlier features
    included."""
    from bench import bpe, gguf, llama
    from bench import cases_realmodel_lm as lm

    path = lm.gguf_path()
    if path is None:
        pytest.skip(f"the SmolLM2 model package is not installed ({lm.INSTALL})")
    g = gguf.GGUFFile(path)
    cfg = dataclasses.replace(llama.config_of(g), layers=2)
    with torch.device("meta"):
        model = llama.LlamaLM(cfg)
    state = {"embed_tokens.weight": g.tensor("token_embd.weight"), "norm.weight": g.tensor("output_norm.weight")}
    for i in range(cfg.layers):
        for src, dst in llama._NAMES.items():
            state[f"layers.{i}.{dst}.weight"] = g.tensor(f"blk.{i}.{src}.weight")
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = cfg.rope_base ** (-torch.arange(0, cfg.dim // cfg.heads, 2, dtype=torch.float32)
                                       / (cfg.dim // cfg.heads))
    model.eval()
    tok = bpe.ByteLevelBPE(g.meta["tokenizer.ggml.tokens"], g.meta["tokenizer.ggml.merges"])
    ids = torch.tensor([tok.encode("The committee approved the budget for next year after a long debate.")])
    acts = _capture_inputs(model.layers[1], lambda: model(ids))
    assert len(acts) == 7
    assert max(_check_real_layers(model.layers[1], acts, 64, mode)) > 0


@needs_cpp
def test_verify_checks_int8act_against_its_bound():
    from pyeditor import testing, verify

    rows = [r for r in verify.run_all("cpu", ["packed_linear"], small=True, dtypes=[torch.float32])
            if "int8act" in r.op]
    assert len(rows) == 3 and all(r.passed for r in rows)
    # the rule is the exact mode's tolerance widened by the bound, and the errors need it
    for r in rows:
        k = int(r.shape.split(",")[-1].split("]")[0])
        assert r.atol > testing.reduction_tolerance(torch.float32, k)[0]
    assert max(r.abs_err for r in rows) > testing.reduction_tolerance(torch.float32, 50)[0]
