"""The all-layer edit-norms op (pyeditor::edit_norms_layers, issue 27) on every backend against
pyeditor.reference: every combination rule clipped and not, dtypes, odd / empty shapes, strided
and stride-0 operands, NaN / inf, bad input (the C++ checks and their Python twin), opcheck,
torch.compile, and the public API's routing to it."""
import itertools
import math

import pytest
import torch

import pyeditor
from pyeditor import assign_layers as al
from pyeditor import ops
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from conftest import backend_params

BACKENDS = backend_params()
# op rule, layer_weights, and the reference's rule argument
RULES = [("sumsq", None, "sumsq"), ("sum", None, "sum"), ("max", None, "max"),
         ("weighted", [0.5, 0.0, 2.0], [0.5, 0.0, 2.0])]
EXACT = (1e-10, 1e-10)  # clipped layers: the op and the oracle both form every edit in float64
# unclipped layers may go through their Gram form, whose entries are float32 products for
# non-float64 editors (cancelled pairs are redone in float64)
GRAM = reduction_tolerance(torch.float32, 2048)


def tol(thr, dtype=torch.float32):
    return EXACT if thr is not None or dtype == torch.float64 else GRAM
P, D, B = 3, 6, 9


def make(shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def inputs(sizes=(12, 0, 7), dtype=torch.float32, device="cpu", batch=B, protos=P, dim=D):
    e = make((len(sizes), batch, dim), dtype, device, seed=3)
    ws = [make((protos, dim, n), dtype, device, max(dim, 1) ** -0.5, seed=10 + l) for l, n in enumerate(sizes)]
    bs = [make((protos, n), dtype, device, 0.3, seed=20 + l) for l, n in enumerate(sizes)]
    return e, ws, bs


def want(e, ws, bs, thr, rule):
    return ref.edit_norms_layers(e, ws, bs, thr, rule)


def thresholds(device, batch=B):
    t_b = torch.linspace(0, 1.5, batch, dtype=torch.float64, device=device)
    return [(None, None), (torch.tensor(0.4, dtype=torch.float64, device=device), 0.4), (t_b, t_b)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rule,lam,ref_rule", RULES, ids=[r[0] for r in RULES])
def test_op_matches_reference(backend, device, rule, lam, ref_rule):
    op = ops.layer_norms_op(backend)
    e, ws, bs = inputs(device=device)
    for (t, ref_t), layout in itertools.product(thresholds(device), ["per-layer", "shared"]):
        x = e if layout == "per-layer" else e[0].expand_as(e)
        got = op(x, ws, bs, t, rule, lam)
        assert got.dtype == torch.float64 and got.shape == (B, P)
        check_close(got, want(x, ws, bs, ref_t, ref_rule), tol=tol(t))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_op_dtypes(backend, device, dtype):
    op = ops.layer_norms_op(backend)
    e, ws, bs = inputs(dtype=dtype, device=device)
    for rule, lam, ref_rule in RULES:
        check_close(op(e, ws, bs, None, rule, lam), want(e, ws, bs, None, ref_rule), tol=tol(None, dtype))
        t = torch.tensor(0.2, dtype=torch.float64, device=device)
        check_close(op(e, ws, bs, t, rule, lam), want(e, ws, bs, 0.2, ref_rule), tol=EXACT)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_odd_and_empty_shapes(backend, device):
    op = ops.layer_norms_op(backend)
    t = torch.tensor(0.3, dtype=torch.float64, device=device)
    # one sample, a partial row block, column blocks with a tail, one layer, 20 layers (past the
    # CUDA kernel's per-launch chunk), d = 1
    for sizes, batch, dim in (((5, 3), 1, D), ((70, 1), 7, D), ((33,), 5, 1), ((2,) * 20, 6, 3)):
        e, ws, bs = inputs(sizes, device=device, batch=batch, dim=dim)
        for rule in ("sumsq", "sum", "max"):
            for thr, ref_t in ((None, None), (t, 0.3)):
                check_close(op(e, ws, bs, thr, rule), want(e, ws, bs, ref_t, rule), tol=tol(thr))
    # no samples, layers without columns, no embedding features (edits = bias)
    e, ws, bs = inputs((4, 2), device=device, batch=0)
    assert op(e, ws, bs).shape == (0, P)
    e, ws, bs = inputs((0, 0), device=device)
    assert torch.equal(op(e, ws, bs, None, "max"), torch.zeros(B, P, dtype=torch.float64, device=device))
    e, ws, bs = inputs((4, 3), device=device, dim=0)
    check_close(op(e, ws, bs), want(e, ws, bs, None, "sumsq"), tol=GRAM)
    e, ws, bs = inputs((4, 3), device=device, protos=0)
    assert op(e, ws, [None, None]).shape == (B, 0)


@pytest.mark.parametrize("protos", [3, 4])
def test_cpu_op_same_for_any_thread_count(protos):
    """The CPU kernel forms the Grams and evaluates them in one parallel region when the
    prototypes share out evenly over the threads, else in two passes: same values either way."""
    if not ops.HAS_CPP:
        pytest.skip("needs the compiled CPU kernels")
    op = ops.layer_norms_op("cpu")
    e, ws, bs = inputs((150, 40, 3), batch=37, protos=protos, dim=5)  # 3 blocks of samples, Gram and direct layers
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(op(e, ws, bs))
    finally:
        torch.set_num_threads(before)
    check_close(got[0], want(e, ws, bs, None, "sumsq"), tol=GRAM)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_strides(backend, device):
    op = ops.layer_norms_op(backend)
    e, ws, bs = inputs(device=device)
    # transposed weights (column stride d), every other embedding feature, strided and stride-0 biases
    wt = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in ws]
    wide = torch.zeros(e.shape[0], B, 2 * D, device=device)
    wide[..., ::2] = e
    ex = wide[..., ::2]
    b_strided = [torch.stack([b, b], -1)[..., 0] for b in bs]
    b_zero = [b[:1].expand_as(b) for b in bs]
    strided = ((e, wt, bs), (ex, ws, bs), (e, ws, b_strided), (e, ws, b_zero), (ex, wt, b_zero),
               (e[:1].expand_as(e), ws, bs))
    for args in strided:
        assert not all(a.is_contiguous() for a in [args[0], *args[1], *args[2]])
    for args in strided + ((e, ws, [None, bs[1], None]),):
        for rule, lam, ref_rule in RULES:
            check_close(op(*args, None, rule, lam), want(*args, None, ref_rule), tol=GRAM)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_nan_inf(backend, device):
    op = ops.layer_norms_op(backend)
    e, ws, bs = inputs((5, 4), device=device)
    e[0, 1, 2] = math.nan  # sample 1, layer 0: NaN for every prototype
    ws[1][2, 0, 3] = math.inf  # prototype 2, layer 1: inf (NaN where e is 0, none here)
    e[1, 4, 0] = -math.inf  # sample 4, layer 1
    t_inf = torch.tensor(math.inf, dtype=torch.float64, device=device)
    t_zero = torch.tensor(0.0, dtype=torch.float64, device=device)
    for (thr, ref_t), (rule, lam, ref_rule) in itertools.product(
            [(None, None), (t_inf, math.inf), (t_zero, 0.0), (torch.tensor(0.5, dtype=torch.float64,
                                                                            device=device), 0.5)],
            [("sumsq", None, "sumsq"), ("sum", None, "sum"), ("max", None, "max"),
             ("weighted", [0.0, 1.0], [0.0, 1.0]), ("weighted", [1.0, 0.0], [1.0, 0.0])]):
        got = op(e, ws, bs, thr, rule, lam)
        check_close(got, want(e, ws, bs, ref_t, ref_rule), tol=tol(thr))
    # a layer the weights leave out does not bring its NaN in
    assert not torch.isnan(op(e, ws, bs, None, "weighted", [0.0, 1.0])[1]).any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_bad_input(backend, device):
    op = ops.layer_norms_op(backend)
    e, ws, bs = inputs((4, 3), device=device)
    t64 = torch.tensor(0.3, dtype=torch.float64, device=device)
    cases = [
        ("e must be floating point", lambda: op(e.int(), ws, bs)),
        (r"e must be \[L, B, d\]", lambda: op(e[0], ws, bs)),
        ("weights must hold at least one layer", lambda: op(e[:0], [], [])),
        ("e holds 2 layer embeddings but weights has 1 layers", lambda: op(e, ws[:1], bs[:1])),
        ("biases has 1 entries but weights has 2", lambda: op(e, ws, bs[:1])),
        (r"weights\[1\] dtype .* does not match e dtype", lambda: op(e, [ws[0], ws[1].double()], bs)),
        (r"biases\[0\] dtype", lambda: op(e, ws, [bs[0].double(), bs[1]])),
        (r"weights\[1\] must be \[3, 6, n\]", lambda: op(e, [ws[0], ws[1][:2]], [bs[0], None])),
        (r"weights\[0\] must be \[3, 5, n\] \(every layer: P of weights\[0\], d of e\)", lambda: op(e[..., :5], ws, bs)),
        (r"biases\[1\] must be \[3, 3\]", lambda: op(e, ws, [bs[0], bs[1][:, :2]])),
        ("rule must be 'sumsq', 'sum', 'max' or 'weighted', got 'l2'", lambda: op(e, ws, bs, None, "l2")),
        ("layer_weights goes with rule 'weighted'", lambda: op(e, ws, bs, None, "sumsq", [1.0, 1.0])),
        ("layer_weights goes with rule 'weighted'", lambda: op(e, ws, bs, None, "weighted")),
        ("layer_weights has 1 values but weights has 2", lambda: op(e, ws, bs, None, "weighted", [1.0])),
        (r"layer_weights\[1\] = -1", lambda: op(e, ws, bs, None, "weighted", [1.0, -1.0])),
        (r"layer_weights\[0\] = nan", lambda: op(e, ws, bs, None, "weighted", [math.nan, 1.0])),
        ("layer_weights must not all be 0", lambda: op(e, ws, bs, None, "weighted", [0.0, 0.0])),
        ("threshold must be float64", lambda: op(e, ws, bs, t64.float())),
        ("threshold must hold 1 or 9 values", lambda: op(e, ws, bs, torch.ones(2, dtype=torch.float64,
                                                                              device=device))),
        ("threshold must be >= 0 and not NaN", lambda: op(e, ws, bs, -t64)),
        ("threshold must be >= 0 and not NaN", lambda: op(e, ws, bs, t64 * math.nan)),
    ]
    for msg, call in cases:
        with pytest.raises(RuntimeError, match="pyeditor: " + msg):
            call()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_opcheck(backend, device):
    op = ops.layer_norms_op(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    e, ws, bs = inputs((4, 3), device=device)
    t = torch.linspace(0, 1, B, dtype=torch.float64, device=device)
    for args in ((e, ws, bs, None, "sumsq", None), (e, ws, [None, bs[1]], t, "max", None),
                 (e, ws, bs, t, "weighted", [2.0, 0.0])):
        torch.library.opcheck(op, args, test_utils=tests)


def test_compile_fullgraph():
    torch._dynamo.reset()
    e, ws, bs = inputs((4, 3))

    def step(e, w0, w1, b0, b1):
        return pyeditor.assign_prototypes_layers(e, [w0, w1], [b0, b1], 0.3, rule="sum", method="fused").norms

    compiled = torch.compile(step, fullgraph=True)
    check_close(compiled(e, *ws, *bs), want(e, ws, bs, 0.3, "sum"), tol=EXACT)


# ------------------------------------------------------------------ the public API's route
def test_api_routes_to_the_op(monkeypatch):
    e, ws, bs = inputs()
    calls = []
    real = ops.layer_norms_op

    def spy(backend):
        calls.append(backend)
        return real(backend)

    monkeypatch.setattr(ops, "layer_norms_op", spy)
    # the Persona example's shapes: "auto" takes the fused op, clipped or not, any rule
    Bp, dp, sizes = 192, 32, [32, 6]
    ep = make((2, Bp, dp))
    wp = make((4, dp, sum(sizes)), scale=dp ** -0.5, seed=1)
    bp = make((4, sum(sizes)), seed=2)
    for thr, rule in itertools.product([None, 0.1], ["sumsq", "sum", "max", [1.0, 0.5]]):
        got = al.assign_prototypes_layers(ep, wp, bp, thr, rule=rule, sizes=sizes)
        w_ref, c_ref = ref.assign_prototypes_layers(ep, wp, bp, thr, rule, sizes)
        check_close(got.norms, w_ref, tol=tol(thr))
        assert torch.equal(got.chosen, c_ref)
    assert calls == ["cpu"] * 8
    assert al.layers_plan("auto", "cpu", Bp, dp, sizes, 4, clipped=False, cached=True, forms=2) == "fused"
    # "fused" on the reference backend is the oracle; "gram" stays the Gram form
    assert al.layers_plan("fused", "reference", Bp, dp, sizes, 4, clipped=False, cached=False, forms=2) == "reference"
    assert al.layers_plan("gram", "cpu", Bp, dp, sizes, 4, clipped=False, cached=False, forms=2) == "gram"


def test_api_not_differentiable():
    e, ws, bs = inputs()
    e.requires_grad_()
    norms = al.edit_norms_layers(e, ws, bs, 0.3, method="fused")
    assert not norms.requires_grad
