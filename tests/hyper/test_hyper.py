"""Persona serving ops (edited_linear, hyper_matmul, generate_edit, edit_norms,
assign_prototypes) and pyeditor.nn modules on every backend against pyeditor.reference:
dtypes, shapes, strides, edge values, autograd, opcheck, torch.compile and bad input."""
import math

import pytest
import torch

import pyeditor
from pyeditor import hyper
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = backend_params()


def make(shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def close(got, want, k):
    check_close(got, want, tol=reduction_tolerance(want.dtype, k))


# ------------------------------------------------------------------ edited_linear
# (B, S, in, out, theta form, bias form, index or None, threshold)
LINEAR = {
    "shared-theta": (3, 5, 9, 11, "2d", "1d", None, 0.5),
    "proto-index": (5, 4, 17, 70, "3d", "2d", [2, 0, 1, 1, 2], 0.3),
    "per-sample-theta": (3, 2, 8, 20, "3d", "2d", None, 0.4),
    "per-sample-T": (4, 3, 7, 9, "3d", None, [1, 0, 1, 0], [0.0, 0.2, 1.0, math.inf]),
    "odd-big": (2, 13, 300, 67, "2d", None, None, 0.5),  # more than one k tile and a ragged n tile
    "one": (1, 1, 1, 1, "2d", "1d", None, 0.5),
    "S=0": (3, 0, 4, 5, "2d", "1d", None, 0.5),
    "B=0": (0, 3, 4, 5, "3d", "2d", [], 0.5),
    "in=0": (2, 3, 0, 5, "2d", "1d", None, 0.5),
}


def linear_inputs(case, dtype, device="cpu"):
    B, S, I, O, tf, bf, index, thr = LINEAR[case]
    P = 3 if index is not None else B
    x = make((B, S, I), dtype, device, seed=1)
    theta = make((I, O) if tf == "2d" else (P, I, O), dtype, device, seed=2)
    delta = make((B, I, O), dtype, device, scale=0.5, seed=3)
    bias = None if bf is None else make((O,) if bf == "1d" else (P, O), dtype, device, seed=4)
    idx = None if index is None else torch.tensor(index, dtype=torch.int64, device=device)
    if isinstance(thr, list):
        thr = torch.tensor(thr, device=device)
    return x, theta, delta, thr, bias, idx


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LINEAR))
def test_edited_linear_matches_reference(backend, device, dtype, case):
    x, theta, delta, thr, bias, idx = linear_inputs(case, dtype, device)
    got = hyper.edited_linear(x, theta, delta, thr, bias, idx, backend=backend)
    close(got, ref.edited_linear(x, theta, delta, thr, bias, idx), x.shape[2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edited_linear_strides_flat_and_edges(backend, device):
    x = make((4, 6, 10), device=device).transpose(1, 2)[:, :, :6]  # [4, 6(strided), 6]
    x = make((4, 6, 12), device=device)[:, :, ::2]                  # column stride 2
    theta = make((1, 6, 9), device=device, seed=5).expand(4, 6, 9)   # stride-0 prototype axis
    delta = make((4, 9, 6), device=device, scale=2, seed=6).transpose(1, 2)  # transposed edits
    delta = delta.clone()
    delta[0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    for d in (delta, delta.reshape(4, 54)):  # flat [B, in*out] edits too
        got = hyper.edited_linear(x, theta, d, 0.5, backend=backend)
        close(got, ref.edited_linear(x, theta, d, 0.5), 6)
    assert torch.isnan(got[0]).any() and not torch.isnan(got[1:]).any()


def _gradcheck(backend, device, case, fast_mode):
    x, theta, delta, thr, bias, idx = linear_inputs(case, torch.float64, device)
    if backend == "triton":  # keep the interpreter's work tiny
        x, theta, delta = x[:, :2, :3], theta[..., :3, :4], delta[:, :3, :4].contiguous()
        bias = None if bias is None else bias[..., :4]
    args = [t.clone().requires_grad_() for t in (x, theta, delta)] + ([bias.clone().requires_grad_()] if bias is not None else [])

    def fn(x, theta, delta, *b):
        return hyper.edited_linear(x, theta, delta, thr, b[0] if b else None, idx, backend=backend)

    assert torch.autograd.gradcheck(fn, args, fast_mode=fast_mode)


def _gradcheck_params():
    """(backend, device, case); the exhaustive gradcheck of the largest case on the C++ kernels
    (every entry of a ~10k-input Jacobian) is slow: its fast-mode twin below runs in make test."""
    return [pytest.param(*b.values, case, id=f"{case}-{b.id}",
                         marks=[*b.marks, *([pytest.mark.slow] if (case, b.id) == ("proto-index", "cpu") else [])])
            for b in BACKENDS for case in ("proto-index", "shared-theta", "per-sample-theta")]


@pytest.mark.parametrize("backend,device,case", _gradcheck_params())
def test_edited_linear_gradcheck(backend, device, case):
    _gradcheck(backend, device, case, fast_mode=backend == "triton")


def test_edited_linear_gradcheck_fast_mode_cpu():
    """The largest case at full size on the C++ kernels in gradcheck's fast mode (random
    projections of the Jacobian)."""
    _gradcheck("cpu", "cpu", "proto-index", fast_mode=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edited_linear_grads_match_reference_fp32(backend, device):
    x, theta, delta, thr, bias, idx = linear_inputs("proto-index", torch.float32, device)
    grads = []
    for fn in (lambda *a: hyper.edited_linear(*a, backend=backend), ref.edited_linear):
        ins = [t.clone().requires_grad_() for t in (x, theta, delta, bias)]
        out = fn(ins[0], ins[1], ins[2], thr, ins[3], idx)
        (out * make(out.shape, device=device, seed=9)).sum().backward()
        grads.append([t.grad for t in ins])
    for g, r in zip(*grads):
        close(g, r, 70)


# ------------------------------------------------------------------ hyper_matmul / generate_edit
HYPER = {  # (B, d, n, P, index)
    "all": (6, 9, 70, 3, None),
    "gathered": (9, 20, 130, 3, [2, 0, 1, 1, 2, 0, 0, 2, 1]),
    "gathered-missing-proto": (4, 5, 33, 4, [3, 3, 0, 3]),
    "P=1": (3, 4, 5, 1, [0, 0, 0]),
    "deep": (3, 300, 7, 2, [1, 0, 1]),
    "B=0": (0, 4, 5, 2, []),
}


def hyper_inputs(case, dtype, device="cpu"):
    B, d, n, P, index = HYPER[case]
    e, w, b = make((B, d), dtype, device, seed=1), make((P, d, n), dtype, device, seed=2), make((P, n), dtype, device, seed=3)
    idx = None if index is None else torch.tensor(index, dtype=torch.int64, device=device)
    return e, w, b, idx


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HYPER))
def test_hyper_matmul_matches_reference(backend, device, dtype, case):
    e, w, b, idx = hyper_inputs(case, dtype, device)
    close(hyper.hyper_matmul(e, w, b, idx, backend=backend), ref.hyper_matmul(e, w, b, idx), e.shape[1])
    close(hyper.hyper_matmul(e, w, None, idx, backend=backend), ref.hyper_matmul(e, w, None, idx), e.shape[1])
    got = hyper.generate_edit(e, w, b, idx, 0.3, backend=backend)
    close(got, ref.generate_edit(e, w, b, idx, 0.3), e.shape[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hyper_matmul_strided(backend, device):
    e = make((5, 16), device=device)[:, ::2]                         # [5, 8] stride 2
    w = make((3, 11, 8), device=device, seed=2).transpose(1, 2)      # [3, 8, 11] transposed
    b = make((1, 11), device=device, seed=3).expand(3, 11)           # stride-0 rows
    idx = torch.tensor([2, 2, 0, 1, 0], device=device)
    for i in (None, idx):
        close(hyper.hyper_matmul(e, w, b, i, backend=backend), ref.hyper_matmul(e, w, b, i), 8)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["all", "gathered"])
def test_hyper_matmul_gradcheck(backend, device, case):
    e, w, b, idx = hyper_inputs(case, torch.float64, device)
    e, w, b = e[:4, :4], w[:, :4, :6], b[:, :6]
    idx = None if idx is None else idx[:4]
    args = [t.clone().requires_grad_() for t in (e, w, b)]
    assert torch.autograd.gradcheck(lambda e, w, b: hyper.hyper_matmul(e, w, b, idx, backend=backend), args,
                                    fast_mode=backend == "triton")


# ------------------------------------------------------------------ edit_norms / assign_prototypes
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["fused", "gram"])
@pytest.mark.parametrize("thr", [None, 0.4, "per-sample"])
def test_assign_matches_reference(backend, device, dtype, method, thr):
    if method == "gram" and thr is not None:
        pytest.skip("the Gram form has no clip")
    e, w, b, _ = hyper_inputs("gathered", dtype, device)
    if thr == "per-sample":
        thr = torch.linspace(0, 2, e.shape[0], device=device)
    norms, chosen = hyper.assign_prototypes(e, w, b, thr, backend=backend, method=method)
    want_norms, want = ref.assign_prototypes(e, w, b, thr)
    assert norms.dtype == torch.float64
    check_close(norms, want_norms, tol=reduction_tolerance(dtype, w.shape[1] * w.shape[2]))
    assert torch.equal(chosen, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_assign_ties_nan_and_inf(backend, device):
    w = torch.zeros(3, 2, 4, device=device)
    b = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0]], device=device)  # ties between 0 and 1
    e = torch.tensor([[0.0, 0.0], [math.nan, 0.0], [1.0, 0.0]], device=device)
    w[2, 0, 0] = math.inf  # prototype 2 reads inf for rows with e[:, 0] != 0
    for method in ("fused", "gram"):
        norms, chosen = hyper.assign_prototypes(e, w, b, backend=backend, method=method)
        want_norms, want = ref.assign_prototypes(e, w, b)
        check_close(norms, want_norms)
        assert chosen.tolist() == want.tolist() == [0, -1, 0]


def test_gram_cancellation_is_repaired():
    # edits that nearly cancel: e W_p + b_p ~ 1e-3 while each term is ~1e4
    g = torch.Generator().manual_seed(0)
    P, d, n, B = 3, 8, 64, 32
    w = torch.randn(P, d, n, generator=g)
    e = torch.randn(B, d, generator=g) * 1e3
    b = torch.empty(P, n)
    for p in range(P):
        b[p] = -(e[p] @ w[p]) + torch.randn(n, generator=g) * 1e-3 * (p + 1)
    norms, chosen = hyper.assign_prototypes(e, w, b, method="gram")
    want_norms, want = ref.assign_prototypes(e, w, b)
    check_close(norms, want_norms, tol=(1e-3, 1e-3))
    assert torch.equal(chosen, want)
    assert chosen[:P].tolist() == list(range(P))  # row p's edit under prototype p nearly vanishes


def test_cached_gram_matches():
    e, w, b, _ = hyper_inputs("gathered", torch.float32)
    gram = hyper.prototype_gram(w, b)
    n1, c1 = hyper.assign_prototypes(e, w, b, gram=gram)
    n2, c2 = ref.assign_prototypes(e, w, b)
    check_close(n1, n2, tol=reduction_tolerance(torch.float32, w.shape[1] * w.shape[2]))
    assert torch.equal(c1, c2)
    edit = hyper.generate_edit(e, w, b, c1, 0.5)  # only the chosen prototype's edit
    check_close(edit, ref.generate_edit(e, w, b, c1, 0.5), tol=reduction_tolerance(torch.float32, 20))


@pytest.mark.parametrize("d", [1, 5, 32, 129])
@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hyper_matmul_wide_column_runs(d, gathered, dtype):
    """The C++ kernel packs up to 16 column tiles per pass at small d (fewer at larger d and for
    float64): widths over 16 tiles with a ragged last group and tile, a strided weight, against
    the reference."""
    P, B, n = 3, 11, 64 * 37 + 5
    e = make((B, d), dtype, seed=1)
    w = make((P, n, d), dtype, seed=2).transpose(1, 2)  # [P, d, n], strided
    b = make((P, n), dtype, seed=3)
    idx = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 2, 2]) if gathered else None
    got = hyper.hyper_matmul(e, w, b, idx, backend="cpu")
    close(got, ref.hyper_matmul(e, w, b, idx), d)


@pytest.mark.parametrize("per_editor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_gram_both_layouts_against_float64(monkeypatch, per_editor, dtype, bias):
    """prototype_gram forms the Grams batched for small editors and one editor at a time for
    large ones (hyper._GRAM_PER_EDITOR): both against the float64 Gram of [W_p; b_p], on a
    non-contiguous weight."""
    monkeypatch.setattr(hyper, "_GRAM_PER_EDITOR", 0 if per_editor else 1 << 62)
    P, d, n = 3, 5, 37
    w = make((P, n, d), dtype, seed=1).transpose(1, 2)  # [P, d, n], strided
    b = make((P, n), dtype, seed=2) if bias else None
    g = hyper.prototype_gram(w, b).gram
    wa = torch.cat([w.double(), (b.double() if bias else torch.zeros(P, n, dtype=torch.float64)).unsqueeze(1)], 1)
    want = wa @ wa.transpose(1, 2)
    check_close(g, want, torch.float64, reduction_tolerance(dtype, n))


# ------------------------------------------------------------------ registration
def _op_samples(device):
    x, theta, delta, thr, bias, idx = linear_inputs("proto-index", torch.float32, device)
    t = torch.tensor(0.3, device=device)
    e, w, b, ix = hyper_inputs("gathered", torch.float32, device)
    return (x, theta, delta, t, bias, idx), (e, w, b, ix), (e, w, b, None)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    linear, hm, sumsq = pyeditor.ops.hyper_ops(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    la, ga, aa = _op_samples(device)
    torch.library.opcheck(linear, la, test_utils=tests)
    grad_la = tuple(a.clone().requires_grad_() if a is not None and a.is_floating_point() and a.dim() > 0 else a for a in la)
    torch.library.opcheck(linear, grad_la, test_utils=tests)
    for args in (ga, aa):
        torch.library.opcheck(hm, args, test_utils=tests)
        torch.library.opcheck(hm, tuple(a.clone().requires_grad_() if a is not None and a.is_floating_point() else a
                                        for a in args), test_utils=tests)
    torch.library.opcheck(sumsq, (ga[0], ga[1], ga[2], torch.tensor(0.3, device=device)), test_utils=tests)
    torch.library.opcheck(sumsq, (ga[0], ga[1], None, None), test_utils=tests)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, theta, delta, thr, bias, idx = linear_inputs("proto-index", torch.float32)
    e, w, b, ix = hyper_inputs("gathered", torch.float32)

    def step(x, theta, delta, bias, e, w, b):
        y = hyper.edited_linear(x, theta, delta, 0.3, bias, idx)
        g = hyper.hyper_matmul(e, w, b, ix)
        norms = hyper.edit_norms(e, w, b, 0.5, method="fused")
        return y.sum() + g.sum(), norms

    compiled = torch.compile(step, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (x, theta, delta, bias, e, w, b)]
    out, norms = compiled(*args)
    out.backward()
    args2 = [t.clone().requires_grad_() for t in (x, theta, delta, bias, e, w, b)]
    out2, norms2 = step(*args2)
    out2.backward()
    check_close(out, out2, tol=(1e-3, 1e-5))
    check_close(norms, norms2)
    for a, a2 in zip(args, args2):
        close(a.grad, a2.grad, 70)


# ------------------------------------------------------------------ bad input
def test_bad_input():
    x, theta, delta = torch.randn(3, 2, 4), torch.randn(2, 4, 5), torch.randn(3, 4, 5)
    idx = torch.tensor([0, 1, 1])
    with pytest.raises(IndexError, match="proto_index value 2 is out of range"):
        hyper.edited_linear(x, theta, delta, 0.5, proto_index=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="proto_index must be an integer tensor"):
        hyper.edited_linear(x, theta, delta, 0.5, proto_index=idx.float())
    with pytest.raises(ValueError, match="delta must hold one edit per sample"):
        hyper.edited_linear(x, theta, torch.randn(3, 5, 4), 0.5, proto_index=idx)
    with pytest.raises(ValueError, match="delta has 2 edits but x has batch 3"):
        hyper.edited_linear(x, theta, delta[:2], 0.5, proto_index=idx)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        hyper.edited_linear(x, theta, delta, -1.0, proto_index=idx)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        hyper.edited_linear(x, theta, delta, math.nan, proto_index=idx)
    with pytest.raises(ValueError, match="needs proto_index"):
        hyper.edited_linear(x, theta, delta, 0.5)
    with pytest.raises(TypeError, match="delta dtype"):
        hyper.edited_linear(x, theta, delta.double(), 0.5, proto_index=idx)
    with pytest.raises(ValueError, match="bias must be"):
        hyper.edited_linear(x, theta, delta, 0.5, torch.randn(3, 5), idx)
    e, w = torch.randn(3, 4), torch.randn(2, 4, 6)
    with pytest.raises(IndexError, match="index value -1"):
        hyper.hyper_matmul(e, w, index=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="e has 5 features"):
        hyper.hyper_matmul(torch.randn(3, 5), w)
    with pytest.raises(ValueError, match="at least one prototype"):
        hyper.assign_prototypes(e, torch.randn(0, 4, 6))
    with pytest.raises(ValueError, match="needs threshold=None"):
        hyper.edit_norms(e, w, threshold=0.5, method="gram")
    # the C++ op re-checks bounds itself: never reads outside theta
    t = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyeditor.edited_linear(x, theta, delta, t, None, torch.tensor([0, 5, 1]))
    with pytest.raises(TypeError, match="index must be a torch.Tensor, got list"):
        hyper.generate_edit(e, w, index=[0, 1, 1])
    with pytest.raises(RuntimeError, match=r"index\[1\] = 2 is out of range"):  # its own name, not proto_index
        torch.ops.pyeditor.hyper_matmul(e, w, None, torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match="delta must be"):
        torch.ops.pyeditor.edited_linear(x, theta, delta[:, :3], t, None, idx)


# ------------------------------------------------------------------ nn modules
def test_nn_modules_train():
    torch.manual_seed(0)
    P, B, S = 3, 6, 4
    layers = [(8, 5), (5, 3)]
    editor = pyeditor.nn.ParameterEditor(embed_dim=7, hidden=16, layer_shapes=layers, prototypes=P, sequential=True)
    lin = [pyeditor.nn.EditedLinear(i, o, prototypes=P, threshold=0.5) for i, o in layers]
    params = list(editor.parameters()) + [p for m in lin for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    emb, x, target = torch.randn(B, 7), torch.randn(B, S, 8), torch.randn(B, S, 3)
    idx = torch.randint(0, P, (B,))
    losses = []
    for _ in range(5):
        deltas = editor(emb, idx)
        h = torch.relu(lin[0](x, deltas[0], idx))
        loss = (lin[1](h, deltas[1], idx) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert editor.head_weight.grad is not None and bool(editor.head_weight.grad.abs().sum() > 0)
    # the module equals the reference formula
    deltas = editor(emb, idx)
    want = ref.edited_linear(x, lin[0].theta, deltas[0], 0.5, lin[0].bias, idx)
    close(lin[0](x, deltas[0], idx), want, 8)
    single = pyeditor.nn.EditedLinear.from_linear(torch.nn.Linear(8, 5), prototypes=1)
    assert single(x[:, 0], torch.zeros(B, 40)).shape == (B, 5)


def test_one_prototype_editor_feeds_edited_linear_without_index():
    # a one-prototype editor returns [1, B, in*out] without proto_index; the layer takes it as is
    torch.manual_seed(0)
    B = 4
    editor = pyeditor.nn.ParameterEditor(embed_dim=5, hidden=8, layer_shapes=[(6, 3)], prototypes=1)
    layer = pyeditor.nn.EditedLinear(6, 3, prototypes=1, threshold=0.2)
    emb, x = torch.randn(B, 5), torch.randn(B, 2, 6)
    (delta,) = editor(emb)
    assert delta.shape == (1, B, 18)
    want = ref.edited_linear(x, layer.theta[0], delta[0], 0.2, layer.bias[0])
    close(layer(x, delta), want, 8)
    # the per-layer head views feed the functional ops
    w, b = editor.head(0)
    close(pyeditor.hyper_matmul(editor.layer_embeddings(emb)[0], w, b)[0], delta[0], 8)
