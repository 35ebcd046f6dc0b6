"""Persona Eq. 11-12 over every edited layer (assign_prototypes_layers / edit_norms_layers /
prototype_gram_layers), the agreement diagnostic and the norms plan, against
pyeditor.reference on every backend: rules, clipped and unclipped, embedding layouts, the Gram
form's accuracy repair, cached Grams and bad input."""
import itertools
import math

import pytest
import torch

import pyeditor
from pyeditor import assign_layers as al
from pyeditor import hyper
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params

BACKENDS = backend_params(include_reference=True)
RULES = {"sumsq": "sumsq", "sum": "sum", "max": "max", "weighted": [0.5, 0.0, 2.0]}
SIZES = [12, 0, 7]  # a layer without columns too
P, D, B = 3, 6, 9


def make(shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def layer_inputs(dtype=torch.float32, device="cpu", sizes=SIZES):
    w = make((P, D, sum(sizes)), dtype, device, D ** -0.5, seed=1)
    b = make((P, sum(sizes)), dtype, device, 0.3, seed=2)
    e = make((len(sizes), B, D), dtype, device, seed=3)
    return e, w, b


def embeddings(e, layout):
    if layout == "per-layer":
        return e
    if layout == "shared":
        return e[0]
    return e[0].expand_as(e)  # shared through a stride-0 layer axis


def tol(dtype, sizes=SIZES):
    return reduction_tolerance(dtype, D * max(sizes))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("thr", [None, 0.4, "per-sample"])
def test_layers_match_reference(backend, device, rule, thr):
    e, w, b = layer_inputs(device=device)
    if thr == "per-sample":
        thr = torch.linspace(0, 1.5, B, device=device)
    ws, bs = list(w.split(SIZES, 2)), list(b.split(SIZES, 1))
    methods = ["auto", "fused"] + (["gram"] if thr is None else [])
    for layout, method in itertools.product(["per-layer", "shared", "expanded"], methods):
        x = embeddings(e, layout)
        want_norms, want = ref.assign_prototypes_layers(x, w, b, thr, RULES[rule], SIZES)
        for args in ((w, b), (ws, bs)):  # concatenated heads and a list of layers
            kw = {"sizes": SIZES} if args[0] is w else {}
            norms, chosen = al.assign_prototypes_layers(x, *args, thr, rule=RULES[rule], backend=backend,
                                                           method=method, **kw)
            assert norms.dtype == torch.float64 and norms.shape == (B, P)
            check_close(norms, want_norms, tol=tol(torch.float32))
            assert torch.equal(chosen, want), (layout, method)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["fused", "gram"])
def test_layers_dtypes(dtype, method):
    e, w, b = layer_inputs(dtype)
    for rule in RULES.values():
        norms = al.edit_norms_layers(e, w, b, rule=rule, sizes=SIZES, method=method)
        check_close(norms, ref.edit_norms_layers(e, w, b, None, rule, SIZES), tol=tol(dtype))


def test_reference_rules_by_hand():
    # the oracle's rules against per-layer reference.edit_norms, combined here
    e, w, b = layer_inputs(torch.float64)
    per = torch.stack([ref.edit_norms(e[l], wl, bl, 0.3) for l, (wl, bl)
                       in enumerate(zip(w.split(SIZES, 2), b.split(SIZES, 1)))])
    check_close(ref.edit_norms_layers(e, w, b, 0.3, "sumsq", SIZES), per.square().sum(0).sqrt())
    check_close(ref.edit_norms_layers(e, w, b, 0.3, "sum", SIZES), per.sum(0))
    check_close(ref.edit_norms_layers(e, w, b, 0.3, "max", SIZES), per.amax(0))
    lam = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64).view(-1, 1, 1)
    check_close(ref.edit_norms_layers(e, w, b, 0.3, [0.5, 0, 2], SIZES), (per.square() * lam).sum(0).sqrt())


def test_one_layer_is_edit_norms():
    e, w, b = layer_inputs(sizes=[20])
    for thr in (None, 0.2):
        for rule in ("sumsq", "sum", "max"):
            check_close(al.edit_norms_layers(e, [w], [b], thr, rule=rule), ref.edit_norms(e[0], w, b, thr),
                        tol=tol(torch.float32, [20]))


def test_parameter_editor_heads():
    torch.manual_seed(0)
    editor = pyeditor.nn.ParameterEditor(5, 8, [(4, 4), (4, 3)], prototypes=3, sequential=True)
    with torch.no_grad():
        e = editor.layer_embeddings(torch.randn(11, 5))
        heads = [editor.head(l) for l in range(2)]
        got = pyeditor.assign_prototypes_layers(e, editor.head_weight, editor.head_bias, sizes=editor.head_sizes)
        want = ref.assign_prototypes_layers(e, [h[0] for h in heads], [h[1] for h in heads])
    check_close(got.norms, want[0], tol=tol(torch.float32, [16]))
    assert torch.equal(got.chosen, want[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layers_ties_nan_and_inf(backend, device):
    w = torch.zeros(3, 2, 4, device=device)
    b = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0]], device=device)  # 0 and 1 tie
    e = torch.tensor([[0.0, 0.0], [math.nan, 0.0], [1.0, 0.0]], device=device)
    w[2, 0, 0] = math.inf
    for rule, method in itertools.product(["sumsq", "sum", "max", [1.0, 3.0]], ["fused", "gram"]):
        norms, chosen = al.assign_prototypes_layers(e, [w, w], [b, b], rule=rule, backend=backend, method=method)
        want_norms, want = ref.assign_prototypes_layers(e, [w, w], [b, b], None, rule)
        check_close(norms, want_norms)
        assert chosen.tolist() == want.tolist() == [0, -1, 0]


@pytest.mark.parametrize("layout", ["per-layer", "shared"])
def test_gram_cancellation_is_repaired(layout):
    # edits that nearly cancel in every layer: e_l W_l,p + b_l,p ~ 1e-3 while each term is ~1e4
    g = torch.Generator().manual_seed(0)
    L, n, d = 2, 48, 8
    e = torch.randn(L, 24, d, generator=g) * 1e3
    if layout == "shared":
        e = e[:1].expand(L, 24, d)
    ws = [torch.randn(P, d, n, generator=g) for _ in range(L)]
    bs = [torch.empty(P, n) for _ in range(L)]
    for l in range(L):
        for p in range(P):
            bs[l][p] = -(e[l, p] @ ws[l][p]) + torch.randn(n, generator=g) * 1e-3 * (p + 1)
    for rule in ("sumsq", [1.0, 2.0], "max"):
        norms, chosen = al.assign_prototypes_layers(e, ws, bs, rule=rule, method="gram")
        want_norms, want = ref.assign_prototypes_layers(e, ws, bs, None, rule)
        check_close(norms, want_norms, tol=(1e-3, 1e-3))
        assert torch.equal(chosen, want)
        assert chosen[:P].tolist() == list(range(P))


def test_cached_layer_gram():
    e, w, b = layer_inputs()
    gram = al.prototype_gram_layers(w, b, sizes=SIZES)
    assert gram.gram.shape == (len(SIZES), P, D + 1, D + 1) and gram.gram.dtype == torch.float64
    for rule, layout in itertools.product(RULES.values(), ["per-layer", "shared"]):
        x = embeddings(e, layout)
        got = al.assign_prototypes_layers(x, w, b, rule=rule, sizes=SIZES, gram=gram)
        want = ref.assign_prototypes_layers(x, w, b, None, rule, SIZES)
        check_close(got.norms, want[0], tol=tol(torch.float32))
        assert torch.equal(got.chosen, want[1])
    ws, bs = list(w.split(SIZES, 2)), list(b.split(SIZES, 1))
    listed = al.prototype_gram_layers(ws, bs)
    check_close(al.edit_norms_layers(e, ws, bs, gram=listed), al.edit_norms_layers(e, w, b, sizes=SIZES, gram=gram))
    # a Gram of other layers, of edited layers, of one layer, or with a threshold is refused
    with pytest.raises(ValueError, match="not computed from these weights"):
        al.edit_norms_layers(e, w.clone(), b, sizes=SIZES, gram=gram)
    with pytest.raises(ValueError, match="not computed from these weights"):
        al.edit_norms_layers(e, ws, bs, gram=gram)  # same memory, other layout
    w2 = w.clone()
    stale = al.prototype_gram_layers(w2, b, sizes=SIZES)
    w2[0, 0, 0] += 1
    with pytest.raises(ValueError, match="changed since"):
        al.edit_norms_layers(e, w2, b, sizes=SIZES, gram=stale)
    with pytest.raises(ValueError, match="expected float64"):
        al.edit_norms_layers(e, w, b, sizes=SIZES, gram=hyper.prototype_gram(ws[0], bs[0]))
    with pytest.raises(TypeError, match="gram must be a PrototypeGram"):
        al.edit_norms_layers(e, w, b, sizes=SIZES, gram=gram.gram)
    with pytest.raises(ValueError, match="needs threshold=None"):
        al.edit_norms_layers(e, w, b, 0.5, sizes=SIZES, method="gram")


def test_no_edit_tensor_across_layers():
    # neither form materialises a layer's [P, B, n] edits
    from pyeditor.memory import peak_extra_bytes
    L, n, d, Bn = 2, 4096, 8, 64
    g = torch.Generator().manual_seed(0)
    e = torch.randn(L, Bn, d, generator=g)
    w, b = torch.randn(P, d, L * n, generator=g), torch.randn(P, L * n, generator=g)
    one_layer_edits = P * Bn * n * 4
    for method, thr in (("gram", None), ("fused", None), ("fused", 0.5)):
        peak = peak_extra_bytes(lambda: al.edit_norms_layers(e, w, b, thr, sizes=[n, n], method=method))
        assert peak < one_layer_edits / 8, (method, thr, peak)


def test_bad_input():
    e, w, b = layer_inputs()
    ws, bs = list(w.split(SIZES, 2)), list(b.split(SIZES, 1))
    f = al.edit_norms_layers
    cases = [
        (ValueError, "rule must be 'sumsq', 'sum', 'max'", lambda: f(e, w, b, rule="l2", sizes=SIZES)),
        (ValueError, "rule has 2 weights but weights has 3 layers", lambda: f(e, w, b, rule=[1, 2], sizes=SIZES)),
        (ValueError, "rule weights must be finite and >= 0", lambda: f(e, w, b, rule=[1, -1, 0], sizes=SIZES)),
        (ValueError, "not all 0", lambda: f(e, w, b, rule=[0, 0, 0], sizes=SIZES)),
        (ValueError, "rule weights must be finite", lambda: f(e, w, b, rule=[1, math.nan, 1], sizes=SIZES)),
        (TypeError, "rule weights must be real numbers", lambda: f(e, w, b, rule=[True, 1, 1], sizes=SIZES)),
        (TypeError, "rule must be", lambda: f(e, w, b, rule=2, sizes=SIZES)),
        (ValueError, "sizes is required", lambda: f(e, w, b)),
        (ValueError, "sizes sum to 18 but weights has 19", lambda: f(e, w, b, sizes=[12, 6])),
        (TypeError, "sizes must be one int >= 0", lambda: f(e, w, b, sizes=[12, -1, 8])),
        (ValueError, "pass sizes only with a concatenated", lambda: f(e, ws, bs, sizes=SIZES)),
        (ValueError, "weights must hold at least one layer", lambda: f(e[:0], [], None)),
        (TypeError, "weights must be a list", lambda: f(e, "w", None)),
        (ValueError, "biases must have shape", lambda: f(e, w, b[:, 1:], sizes=SIZES)),
        (TypeError, "biases must be None or one", lambda: f(e, w, bs, sizes=SIZES)),
        (ValueError, "biases has 2 entries but weights has 3", lambda: f(e, ws, bs[:2])),
        (ValueError, r"biases\[2\] must have shape", lambda: f(e, ws, bs[:2] + [bs[1]])),
        (ValueError, "e holds 2 layer embeddings but weights has 3", lambda: f(e[:2], ws, bs)),
        (ValueError, "e has 5 features but weights expect 6", lambda: f(e[..., :5], ws, bs)),
        (ValueError, "e must be", lambda: f(e[0, 0], ws, bs)),
        (ValueError, r"weights\[1\] has shape", lambda: f(e, [ws[0], ws[1][:2], ws[2]], None)),
        (TypeError, r"weights\[1\] dtype", lambda: f(e, [ws[0], ws[1].double(), ws[2]], None)),
        (TypeError, "e must be float32", lambda: f(e.int(), ws, bs)),
        (ValueError, "at least one prototype", lambda: f(e, [t[:0] for t in ws], None)),
        (ValueError, "method must be", lambda: f(e, ws, bs, method="fast")),
        (ValueError, "threshold has 2 values; expected one or 9", lambda: f(e, ws, bs, torch.ones(2))),
        (ValueError, "threshold must be >= 0", lambda: f(e, ws, bs, -1.0)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()


# ------------------------------------------------------------------ assignment_agreement
def test_agreement_is_the_best_matching():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        Pn, K = torch.randint(1, 5, (2,), generator=g).tolist()
        c = torch.randint(-1, Pn, (40,), generator=g)
        k = torch.randint(0, K, (40,), generator=g)
        got = al.assignment_agreement(c, k, Pn, K)
        best = max(sum(int(((c == p) & (k == q)).sum()) for p, q in enumerate(perm) if q < K)
                   for perm in itertools.permutations(range(max(Pn, K)), Pn))
        assert got.rate == best / 40
        matched = [q for q in got.matching.tolist() if q >= 0]
        assert len(set(matched)) == len(matched)
        assert sum(int(got.confusion[p, q]) for p, q in enumerate(got.matching.tolist()) if q >= 0) == best
        assert int(got.confusion.sum()) == int((c >= 0).sum())


def test_agreement_up_to_relabelling():
    k = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    perm = torch.tensor([2, 0, 1])
    full = al.assignment_agreement(perm[k], k)
    assert full.rate == 1.0 and full.matching.tolist() == [1, 2, 0]
    chosen = perm[k].clone()
    chosen[0] = -1  # an all-NaN row never agrees
    chosen[6] = 0
    assert al.assignment_agreement(chosen, k).rate == 5 / 7


def test_agreement_bad_input():
    c, k = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0])
    with pytest.raises(TypeError, match="chosen must be an integer tensor"):
        al.assignment_agreement(c.float(), k)
    with pytest.raises(ValueError, match="chosen has 3 samples but labels has 2"):
        al.assignment_agreement(c, k[:2])
    with pytest.raises(ValueError, match="labels value -2 is negative"):
        al.assignment_agreement(c, torch.tensor([0, -2, 0]))
    with pytest.raises(ValueError, match="chosen value 1 is out of range for prototypes=1"):
        al.assignment_agreement(c, k, prototypes=1)
    with pytest.raises(ValueError, match="at least one sample"):
        al.assignment_agreement(c[:0], k[:0])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        al.assignment_agreement(c, k.view(3, 1))


# ------------------------------------------------------------------ norms plan (method="auto")
def test_norms_plan():
    plan = hyper.norms_plan
    # the bench assign shape: forming the Gram (P d^2 n) costs about d / B of the fused pass
    assert plan(256, 128, [65536], 8) == "gram"
    assert plan(256, 128, [65536], 8, clipped=True) == "fused"  # a clip is no quadratic form
    assert plan(64, 128, [65536], 8) == "fused"  # B < d: the fused pass does less work
    # narrow layers (n < d): the quadratic form's P B d^2 exceeds the fused P B d n, cached or not
    assert plan(1024, 128, [64], 8, cached=True) == "fused"
    # a cached Gram with wide layers; and per-layer forms cost L evaluations
    assert plan(64, 32, [4096], 4, cached=True) == "gram"
    assert plan(4096, 64, [128] * 4, 4, forms=1) == "gram" != plan(4096, 64, [128] * 4, 4, forms=4)
    # once the Gram form wins for a batch it wins for every larger one
    for d, n, cached in itertools.product([8, 32, 128], [16, 1024, 65536], [False, True]):
        picks = [plan(B, d, [n], 4, cached=cached) for B in (1, 4, 16, 64, 256, 1024, 4096)]
        assert picks == sorted(picks, key=lambda m: m == "gram"), (d, n, cached, picks)


def test_auto_uses_the_plan(monkeypatch):
    e, w, b = layer_inputs()
    seen = []
    real = hyper.norms_plan

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(hyper, "norms_plan", spy)
    hyper.edit_norms(e[0], w, b)
    assert len(seen) == 1
    # every layer in one call of the all-layer op on a native backend (it picks each layer's form);
    # the torch Gram form vs the oracle on backend "reference"
    al.edit_norms_layers(e, w, b, sizes=SIZES)
    al.edit_norms_layers(e, w, b, 0.3, sizes=SIZES)
    assert len(seen) == 1
    al.edit_norms_layers(e, w, b, sizes=SIZES, backend="reference")
    al.edit_norms_layers(e, w, b, 0.3, sizes=SIZES, backend="reference")
    assert len(seen) == 3 and seen[2] == "fused"
