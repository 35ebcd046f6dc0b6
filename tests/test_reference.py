"""Tests of the numerics oracle pyeditor.reference: hand-computed examples, properties
against brute force, and bad-input errors."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyeditor import reference as ref

FAST = settings(max_examples=60, deadline=None)
INF, NAN = float("inf"), float("nan")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- edited_linear


def test_edited_linear_hand_example():
    x = torch.tensor([[[1.0, 2.0]]])
    theta = torch.eye(2)
    delta = torch.tensor([[[5.0, -5.0], [0.5, 0.0]]])  # clipped to [[1, -1], [0.5, 0]]
    y = ref.edited_linear(x, theta, delta, 1.0)
    assert torch.equal(y, torch.tensor([[[3.0, 1.0]]]))
    y = ref.edited_linear(x, theta, delta.reshape(1, 4), 1.0, bias=torch.tensor([10.0, 20.0]))
    assert torch.equal(y, torch.tensor([[[13.0, 21.0]]]))


def explicit_edited_linear(x, theta, delta, t, bias, proto):
    out = []
    for b in range(x.shape[0]):
        th = theta[proto[b]] if proto is not None else (theta if theta.dim() == 2 else theta[b])
        k = th.double() + delta[b].reshape(th.shape).double().clamp(-float(t[b]), float(t[b]))
        y = x[b].double() @ k
        if bias is not None:
            y = y + (bias if bias.dim() == 1 else bias[proto[b] if proto is not None else b]).double()
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("case", ["proto", "shared", "per_sample_theta"])
def test_edited_linear_matches_loop(case):
    g = gen(1)
    B, S, n_in, n_out, P = 5, 3, 4, 6, 3
    x = torch.randn(B, S, n_in, generator=g)
    delta = torch.randn(B, n_in * n_out, generator=g)
    t = torch.rand(B, generator=g)
    if case == "proto":
        theta, bias = torch.randn(P, n_in, n_out, generator=g), torch.randn(P, n_out, generator=g)
        proto = torch.randint(P, (B,), generator=g)
    elif case == "shared":
        theta, bias, proto = torch.randn(n_in, n_out, generator=g), torch.randn(n_out, generator=g), None
    else:
        theta, bias = torch.randn(B, n_in, n_out, generator=g), torch.randn(B, n_out, generator=g)
        proto = None
    y = ref.edited_linear(x, theta, delta, t, bias, proto)
    want = explicit_edited_linear(x, theta, delta, t, bias, proto)
    assert y.dtype == torch.float32 and y.shape == (B, S, n_out)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_edited_linear_dtype_and_nan():
    x = torch.ones(2, 1, 2, dtype=torch.bfloat16)
    theta = torch.zeros(2, 2)
    delta = torch.tensor([[INF, -INF, 0.0, NAN], [1.0, 1.0, 1.0, 1.0]])
    y = ref.edited_linear(x, theta, delta, 0.5)
    assert y.dtype == torch.bfloat16
    assert y[0, 0, 0] == 0.5 and torch.isnan(y[0, 0, 1])  # +-inf clipped, NaN propagates
    assert torch.equal(y[1].float(), torch.tensor([[1.0, 1.0]]))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=torch.ones(2, 3)), ValueError, "x must be 3-D"),
        (dict(x=torch.ones(2, 1, 3, dtype=torch.int64)), TypeError, "x must be a floating"),
        (dict(x=torch.ones(2, 1, 5)), ValueError, "input features"),
        (dict(delta=torch.ones(3, 12)), ValueError, "delta"),
        (dict(delta=torch.ones(12)), ValueError, "one edit per sample"),
        (dict(theta=torch.ones(4, 3, 4)), ValueError, "proto_index"),
        (dict(theta=torch.ones(4, 3, 4), proto_index=torch.tensor([0, 4])), ValueError, r"proto_index values must be in \[0, 4\)"),
        (dict(theta=torch.ones(4, 3, 4), proto_index=torch.tensor([0.0, 1.0])), TypeError, "proto_index must be an integer"),
        (dict(proto_index=torch.tensor([0, 0])), ValueError, "proto_index needs theta"),
        (dict(threshold=-1.0), ValueError, "threshold must be >= 0"),
        (dict(threshold=torch.ones(3)), ValueError, "threshold must be"),
        (dict(threshold="1"), TypeError, "threshold"),
        (dict(bias=torch.ones(5)), ValueError, "bias must have 4 outputs"),
        (dict(bias=torch.ones(3, 4)), ValueError, "2-D bias"),
    ],
)
def test_edited_linear_errors(kwargs, err, match):
    args = dict(x=torch.ones(2, 1, 3), theta=torch.ones(3, 4), delta=torch.ones(2, 12), threshold=1.0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ref.edited_linear(**args)


# ------------------------------------------------------------------ hypernetwork and norms


def test_hyper_matmul_hand_example():
    e = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    w = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # [2, 2, 2]
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    full = ref.hyper_matmul(e, w, b)
    assert torch.equal(full, torch.tensor([[[2.0, 3.0], [1.0, 2.0]], [[2.0, 3.0], [0.0, 1.0]]]))
    sel = ref.hyper_matmul(e, w, b, index=torch.tensor([1, 0]))
    assert torch.equal(sel, torch.tensor([[2.0, 3.0], [1.0, 2.0]]))
    clipped = ref.generate_edit(e, w, b, index=torch.tensor([1, 0]), threshold=torch.tensor([2.5, 1.5]))
    assert torch.equal(clipped, torch.tensor([[2.0, 2.5], [1.0, 1.5]]))


def test_hyper_matmul_index_agrees_with_full():
    g = gen(2)
    e, w, b = torch.randn(7, 5, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(3, 8, generator=g)
    idx = torch.randint(3, (7,), generator=g)
    full = ref.hyper_matmul(e, w, b)
    sel = ref.hyper_matmul(e, w, b, idx)
    torch.testing.assert_close(sel, full[idx, torch.arange(7)])
    t = torch.rand(7, generator=g)
    clipped = ref.generate_edit(e, w, b, threshold=t)
    torch.testing.assert_close(clipped, torch.maximum(torch.minimum(full, t[:, None]), -t[:, None]))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(e=torch.ones(2, 4)), ValueError, "e has 4 features"),
        (dict(weight=torch.ones(3, 5)), ValueError, "weight must be 3-D"),
        (dict(bias=torch.ones(3, 7)), ValueError, r"bias must have shape \[3, 6\]"),
        (dict(index=torch.tensor([0, 3])), ValueError, r"index values must be in \[0, 3\)"),
        (dict(index=torch.tensor([0])), ValueError, r"index must have shape \[2\]"),
        (dict(e=torch.ones(2, 5, dtype=torch.int32)), TypeError, "e must be a floating"),
    ],
)
def test_hyper_matmul_errors(kwargs, err, match):
    args = dict(e=torch.ones(2, 5), weight=torch.ones(3, 5, 6), bias=None, index=None)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ref.hyper_matmul(**args)


def test_edit_norms_hand_example():
    e = torch.tensor([[1.0]])
    w = torch.tensor([[[3.0, 4.0]], [[1.0, 1.0]]])  # editors generate [3, 4] and [1, 1]
    norms, chosen = ref.assign_prototypes(e, w)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, torch.tensor([[5.0, math.sqrt(2)]], dtype=torch.float64))
    assert chosen.tolist() == [1]
    norms, chosen = ref.assign_prototypes(e, w, threshold=0.5)  # both clip to [.5, .5]: a tie
    torch.testing.assert_close(norms, torch.full((1, 2), math.sqrt(0.5), dtype=torch.float64))
    assert chosen.tolist() == [0]


def test_assign_prototypes_equals_argmin_of_explicit_norms():
    g = gen(3)
    e = torch.randn(20, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, 12, generator=g, dtype=torch.float64)
    b = torch.randn(5, 12, generator=g, dtype=torch.float64)
    t = torch.rand(20, generator=g, dtype=torch.float64)
    norms, chosen = ref.assign_prototypes(e, w, b, threshold=t)
    edits = ref.generate_edit(e, w, b, threshold=t)  # [P, B, n]
    explicit = torch.linalg.vector_norm(edits, dim=-1).T
    torch.testing.assert_close(norms, explicit)
    assert torch.equal(chosen, explicit.argmin(1))


def test_assign_prototypes_nan_rules():
    e = torch.ones(3, 1)
    w = torch.tensor([[[NAN]], [[INF]], [[2.0]]])
    b = torch.zeros(3, 1)
    norms, chosen = ref.assign_prototypes(e, w, b)
    assert chosen.tolist() == [2, 2, 2]
    norms, chosen = ref.assign_prototypes(e, w[:2], b[:2])  # NaN ranks after +inf
    assert torch.isnan(norms[:, 0]).all() and chosen.tolist() == [1, 1, 1]
    _, chosen = ref.assign_prototypes(e, w[:1], b[:1])  # all NaN
    assert chosen.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="at least one prototype"):
        ref.assign_prototypes(e, torch.ones(0, 1, 1))


# --------------------------------------------------------------------- nearest_prototype


def test_nearest_prototype_hand_examples():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    d, i = ref.nearest_prototype(x, p, k=2)
    assert torch.equal(d, torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    assert torch.equal(i, torch.tensor([[0, 2], [0, 1]]))  # the 1-1 tie goes to index 0
    d, i = ref.nearest_prototype(x, p, k=3, metric="ip")
    assert torch.equal(d, torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0]]))
    assert torch.equal(i, torch.tensor([[0, 1, 2], [1, 0, 2]]))
    d, i = ref.nearest_prototype(x, p, k=1, metric="cosine")  # zero query: similarity 0
    assert d[0, 0] == 0 and i[0, 0] == 0
    torch.testing.assert_close(d[1, 0], torch.tensor(math.sqrt(0.5)))
    assert i.dtype == torch.int64


def brute_force(x, p, k, metric):
    out_d, out_i = [], []
    for xr in x.double().tolist():
        scored = []
        for j, pr in enumerate(p.double().tolist()):
            if metric == "l2":
                s = sum((a - c) ** 2 for a, c in zip(xr, pr))
            else:
                s = sum(a * c for a, c in zip(xr, pr))
                if metric == "cosine":
                    nx, npr = math.sqrt(sum(a * a for a in xr)), math.sqrt(sum(c * c for c in pr))
                    s = s / (nx * npr) if nx > 0 and npr > 0 else 0.0
            scored.append((s if metric == "l2" else -s, j, s))
        scored.sort()  # by key, then by index
        out_d.append([s for _, _, s in scored[:k]])
        out_i.append([j for _, j, _ in scored[:k]])
    return torch.tensor(out_d, dtype=torch.float64), torch.tensor(out_i, dtype=torch.int64)


small_ints = st.integers(-3, 3).map(float)


@FAST
@given(
    data=st.data(),
    b=st.integers(0, 6),
    n=st.integers(1, 6),
    dim=st.integers(1, 4),
    metric=st.sampled_from(["l2", "ip", "cosine"]),
)
def test_nearest_prototype_matches_brute_force(data, b, n, dim, metric):
    # small integer coordinates make exact ties common; l2 and ip are then exact
    x = torch.tensor(data.draw(st.lists(st.lists(small_ints, min_size=dim, max_size=dim), min_size=b, max_size=b)))
    p = torch.tensor(data.draw(st.lists(st.lists(small_ints, min_size=dim, max_size=dim), min_size=n, max_size=n)))
    x, p = x.reshape(b, dim), p.reshape(n, dim)
    k = data.draw(st.integers(1, n))
    d, i = ref.nearest_prototype(x.double(), p.double(), k=k, metric=metric)
    want_d, want_i = brute_force(x, p, k, metric)
    assert d.shape == (b, k) and i.shape == (b, k)
    if metric == "cosine":  # float rounding can break exact cosine ties: check the values
        torch.testing.assert_close(d, want_d.reshape(b, k))
        xd, pd = x.double(), p.double()
        nx, npr = xd.norm(dim=1, keepdim=True), pd.norm(dim=1, keepdim=True)
        cos = (xd / nx.clamp_min(1e-300)) @ (pd / npr.clamp_min(1e-300)).T
        torch.testing.assert_close(cos.gather(1, i), d)
    else:
        assert torch.equal(d, want_d.reshape(b, k)) and torch.equal(i, want_i.reshape(b, k))


def test_nearest_prototype_far_from_origin_is_exact():
    g = gen(4)
    p = 1e4 + torch.randn(8, 16, generator=g, dtype=torch.float64) * 1e-2
    x = 1e4 + torch.randn(64, 16, generator=g, dtype=torch.float64) * 1e-2
    d, i = ref.nearest_prototype(x, p)
    direct = ((x[:, None, :] - p[None]) ** 2).sum(-1)
    assert torch.equal(i[:, 0], direct.argmin(1)) and (d >= 0).all()
    d32, _ = ref.nearest_prototype(x.float(), p.float(), k=8)
    assert (d32 >= 0).all() and d32.dtype == torch.float32


def test_nearest_prototype_nan_rules():
    x = torch.tensor([[0.0, 0.0], [NAN, 0.0], [1.0, 0.0]])
    p = torch.tensor([[NAN, 1.0], [2.0, 0.0], [0.5, 0.0]])
    d, i = ref.nearest_prototype(x, p, k=3)
    assert i.tolist() == [[2, 1, -1], [-1, -1, -1], [2, 1, -1]]
    assert torch.isnan(d[1]).all()
    assert torch.equal(d[0], torch.tensor([0.25, 4.0, INF])) and torch.equal(d[2], torch.tensor([0.25, 1.0, INF]))
    d, i = ref.nearest_prototype(x, p, k=3, metric="ip")
    assert i[0].tolist() == [1, 2, -1] and d[0, 2] == -INF
    d, i = ref.nearest_prototype(x, p[:1], k=1, metric="cosine")
    assert i.tolist() == [[-1], [-1], [-1]] and d[0, 0] == -INF


def test_nearest_prototype_empty_and_dtype():
    d, i = ref.nearest_prototype(torch.empty(0, 3), torch.ones(4, 3), k=2)
    assert d.shape == (0, 2) and i.shape == (0, 2) and i.dtype == torch.int64
    d, _ = ref.nearest_prototype(torch.ones(2, 3, dtype=torch.float16), torch.zeros(4, 3), k=1)
    assert d.dtype == torch.float16 and d.tolist() == [[3.0], [3.0]]


@pytest.mark.parametrize(
    "x, p, k, metric, err, match",
    [
        (torch.ones(2, 3), torch.ones(4, 3), 0, "l2", ValueError, "k must be >= 1"),
        (torch.ones(2, 3), torch.ones(4, 3), 5, "l2", ValueError, r"k must be <= the number of prototypes \(4\)"),
        (torch.ones(2, 3), torch.ones(4, 2), 1, "l2", ValueError, "x has 3 features"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3), 1, "l2", TypeError, "x must be a floating"),
        (torch.ones(2, 3), torch.ones(4, 3, dtype=torch.int32), 1, "l2", TypeError, "prototypes must be a floating"),
        (torch.ones(3), torch.ones(4, 3), 1, "l2", ValueError, "x must be 2-D"),
        (torch.ones(2, 3), torch.ones(4, 3), 1, "l1", ValueError, "metric must be one of"),
        (torch.ones(2, 3), torch.ones(4, 3), 1.0, "l2", TypeError, "k must be an int"),
    ],
)
def test_nearest_prototype_errors(x, p, k, metric, err, match):
    with pytest.raises(err, match=match):
        ref.nearest_prototype(x, p, k=k, metric=metric)


# ------------------------------------------------------------------------------- kmeans


def test_kmeans_two_blobs():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    for init in ("k-means++", "random"):
        c, labels, inertia = ref.kmeans(x, 2, init=init, seed=3)
        assert labels[:3].unique().numel() == 1 and labels[3:].unique().numel() == 1
        assert labels[0] != labels[3]
        torch.testing.assert_close(c[labels[0]], torch.tensor([1 / 3, 1 / 3]))
        torch.testing.assert_close(c[labels[3]], torch.tensor([31 / 3, 31 / 3]))
        assert inertia == pytest.approx(2 * (2 * (1 / 9 + 4 / 9) + 2 / 9))


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_kmeans_deterministic_monotone_and_predict(metric):
    x = torch.randn(300, 5, generator=gen(5))
    history = []
    for n_iter in range(7):
        c, labels, inertia = ref.kmeans(x, 6, n_iter=n_iter, seed=11, metric=metric, tol=0.0)
        history.append(inertia)
        assert torch.equal(ref.kmeans_predict(x, c, metric), labels)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0]
    c1, l1, i1 = ref.kmeans(x, 6, seed=11, metric=metric)
    c2, l2, i2 = ref.kmeans(x, 6, seed=11, metric=metric)
    assert torch.equal(c1, c2) and torch.equal(l1, l2) and i1 == i2
    assert c1.shape == (6, 5) and c1.dtype == x.dtype and l1.dtype == torch.int64


def test_kmeans_reseeds_empty_clusters():
    # 10 copies of the origin: random inits often pick it twice, leaving clusters empty
    x = torch.cat([torch.zeros(10, 2), torch.tensor([[5.0, 5.0], [9.0, 9.0]])])
    for seed in range(8):
        c, labels, inertia = ref.kmeans(x, 3, init="random", seed=seed)
        assert inertia == 0.0 and labels.bincount(minlength=3).min() > 0
        assert sorted(map(tuple, c.tolist())) == [(0.0, 0.0), (5.0, 5.0), (9.0, 9.0)]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(n_clusters=0), ValueError, "n_clusters must be >= 1"),
        (dict(n_clusters=5), ValueError, r"n_clusters must be <= the number of points \(4\)"),
        (dict(init="kmeans"), ValueError, "init must be"),
        (dict(metric="l1"), ValueError, "metric must be"),
        (dict(n_iter=-1), ValueError, "n_iter must be >= 0"),
        (dict(tol=-1.0), ValueError, "tol must be"),
        (dict(x=torch.tensor([[0.0], [NAN], [1.0], [2.0]])), ValueError, "x must be finite"),
        (dict(x=torch.ones(4, 2, dtype=torch.int64)), TypeError, "x must be a floating"),
    ],
)
def test_kmeans_errors(kwargs, err, match):
    args = dict(x=torch.randn(4, 2), n_clusters=2)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ref.kmeans(**args)


# ------------------------------------------------------------------------- quantization


def test_quantize_hand_example():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = ref.quantize_channelwise(w, torch.tensor([2]))
    # lo=-1, hi=2, q_max=3: scale=1, zero=1, codes=round(w)+1 (0.5 rounds half to even: 0)
    assert q.codes.tolist() == [[0, 1, 1, 3]] and q.zero.tolist() == [1] and q.bits.tolist() == [2]
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float32 and q.zero.dtype == torch.int32
    assert q.scale.tolist() == [1.0]
    assert torch.equal(ref.dequantize(q), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))
    # scale = float32(2/3) and -lo/scale = 1.4999999 -> zero 1: the integer zero point
    # shifts the grid, so both ends land (up to float32 rounding) scale/2 away
    q = ref.quantize_channelwise(torch.tensor([[-1.0, 1.0]]), 2)
    assert q.codes.tolist() == [[0, 2]] and q.zero.tolist() == [1]
    err = (ref.dequantize(q) - torch.tensor([[-1.0, 1.0]])).abs()
    torch.testing.assert_close(err, (q.scale / 2).expand(1, 2))
    q8 = ref.quantize_channelwise(torch.tensor([[0.0, 1.0, 2.55]]), 8)  # all >= 0: zero = 0
    assert q8.zero.tolist() == [0] and q8.codes.tolist() == [[0, 100, 255]]


def test_quantize_constant_channels_are_exact():
    w = torch.tensor([[3.0, 3.0, 3.0], [-1.7, -1.7, -1.7], [0.0, 0.0, 0.0], [1e-30, 1e-30, 1e-30]])
    for b in (2, 4, 6, 8):
        q = ref.quantize_channelwise(w, b)
        assert torch.equal(q.dequantize(), w)
    q = ref.quantize_channelwise(torch.empty(3, 0), 4)
    assert q.codes.shape == (3, 0) and ref.dequantize(q).shape == (3, 0)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n_out=st.integers(1, 8),
    n_in=st.integers(1, 40),
    magnitude=st.sampled_from([1e-3, 1.0, 1e4]),
    offset=st.sampled_from([0.0, 1.0, -3.0]),
)
def test_quantize_error_bound_and_code_range(seed, n_out, n_in, magnitude, offset):
    g = gen(seed)
    w = (torch.randn(n_out, n_in, generator=g) + offset) * magnitude
    bits = torch.tensor([2, 4, 6, 8])[torch.randint(4, (n_out,), generator=g)]
    q = ref.quantize_channelwise(w, bits)
    q_max = (2 ** q.bits) - 1
    assert (q.codes.long() <= q_max[:, None]).all()
    assert ((q.zero >= 0) & (q.zero <= q_max)).all() and (q.scale > 0).all()
    err = (ref.dequantize(q).double() - w.double()).abs()
    bound = q.scale.double()[:, None] / 2 * (1 + 1e-5)
    assert (err <= bound).all()


def test_packed_linear_matches_dequantized_matmul():
    g = gen(6)
    w = torch.randn(5, 7, generator=g)
    q = ref.quantize_channelwise(w, torch.tensor([2, 4, 6, 8, 8]))
    x, bias = torch.randn(2, 3, 7, generator=g), torch.randn(5, generator=g)
    y = ref.packed_linear(x, q, bias)
    torch.testing.assert_close(y, x @ ref.dequantize(q).T + bias)
    assert y.shape == (2, 3, 5)

    class Dense:  # anything with dequantize() works
        def dequantize(self):
            return w

    torch.testing.assert_close(ref.packed_linear(x.double(), Dense()), x.double() @ w.double().T)
    assert ref.packed_linear(x.half(), q).dtype == torch.float16


@pytest.mark.parametrize(
    "fn, args, err, match",
    [
        (ref.quantize_channelwise, (torch.tensor([[NAN, 1.0]]), 4), ValueError, "weight must be finite"),
        (ref.quantize_channelwise, (torch.tensor([[INF, 1.0]]), 4), ValueError, "weight must be finite"),
        (ref.quantize_channelwise, (torch.ones(2, 3), 3), ValueError, r"bits must be in \{2, 4, 6, 8\}, got 3"),
        (ref.quantize_channelwise, (torch.ones(2, 3), torch.tensor([2, 4, 8])), ValueError, r"bits must have shape \[2\]"),
        (ref.quantize_channelwise, (torch.ones(2, 3, dtype=torch.int64), 4), TypeError, "weight must be a floating"),
        (ref.quantize_channelwise, (torch.ones(3), 4), ValueError, "weight must be 2-D"),
        (ref.packed_linear, (torch.ones(2, 3), torch.ones(4, 3)), TypeError, "packed must have a dequantize"),
        (ref.packed_linear, (torch.ones(2, 5), ref.quantize_channelwise(torch.ones(4, 3), 8)), ValueError, "x has 5 input features"),
        (ref.packed_linear, (torch.ones(2, 3), ref.quantize_channelwise(torch.ones(4, 3), 8), torch.ones(3)), ValueError, r"bias must have shape \[4\]"),
        (ref.dequantize, (ref.QuantizedWeight(torch.full((1, 2), 9, dtype=torch.uint8), torch.ones(1), torch.zeros(1), torch.tensor([2])),), ValueError, "codes exceed"),
    ],
)
def test_quantization_errors(fn, args, err, match):
    with pytest.raises(err, match=match):
        fn(*args)


# ------------------------------------------------------------------------ strategy codes


def test_encode_strategy_hand_example():
    codes = ref.encode_strategy(torch.tensor([2, 4, 6, 8, 8]))
    # byte 0 = 0 | 1 << 2 | 2 << 4 | 3 << 6 = 228; byte 1 = 3 with zero padding
    assert codes.dtype == torch.uint8 and codes.tolist() == [228, 3]
    assert ref.decode_strategy(codes, 5).tolist() == [2, 4, 6, 8, 8]
    assert ref.encode_strategy(torch.tensor([8.0, 2.0])).tolist() == [3]
    assert ref.encode_strategy(torch.zeros(0, dtype=torch.int64)).shape == (0,)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=0, max_size=41))
def test_strategy_round_trip(bits):
    b = torch.tensor(bits, dtype=torch.int64)
    codes = ref.encode_strategy(b)
    assert codes.dtype == torch.uint8 and codes.shape == ((len(bits) + 3) // 4,)
    decoded = ref.decode_strategy(codes, len(bits))
    assert decoded.dtype == torch.int64 and torch.equal(decoded, b)


@pytest.mark.parametrize(
    "fn, args, err, match",
    [
        (ref.encode_strategy, (torch.tensor([2, 3]),), ValueError, r"bits must be in \{2, 4, 6, 8\}, got 3"),
        (ref.encode_strategy, (torch.tensor([[2, 4]]),), ValueError, "bits must have shape 1-D"),
        (ref.encode_strategy, ([2, 4],), TypeError, "bits must be an integer"),
        (ref.decode_strategy, (torch.tensor([0b01000000], dtype=torch.uint8), 3), ValueError, "padding bits"),
        (ref.decode_strategy, (torch.tensor([0, 0], dtype=torch.uint8), 4), ValueError, r"codes must have shape \[1\] for 4 channels"),
        (ref.decode_strategy, (torch.tensor([0]), 4), TypeError, "codes must be a uint8"),
        (ref.decode_strategy, (torch.tensor([0], dtype=torch.uint8), -1), ValueError, "n_channels must be >= 0"),
    ],
)
def test_strategy_errors(fn, args, err, match):
    with pytest.raises(err, match=match):
        fn(*args)


# ------------------------------------------------------------------------- allocate_bits


def test_allocate_bits_hand_example():
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.4])
    assert ref.allocate_bits(s, 0.125).tolist() == [2, 8, 2, 2, 2, 2, 4, 2]
    assert ref.allocate_bits(s, 0.25).tolist() == [2, 8, 4, 4, 2, 2, 8, 2]
    assert ref.allocate_bits(torch.zeros(5), 0.2).tolist() == [8, 4, 2, 2, 2]  # ties: low index first
    assert ref.allocate_bits(s, 0.0).tolist() == [2] * 8


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 70),
    beta=st.sampled_from([0.0, 0.0625, 0.125, 0.1875, 0.25, 0.3, 0.5]),
)
def test_allocate_bits_tier_counts(seed, n, beta):
    s = torch.randint(0, 5, (n,), generator=gen(seed)).float()  # many ties
    bits = ref.allocate_bits(s, beta)
    n8, n84 = math.floor(beta * n + 0.5), math.floor(2 * beta * n + 0.5)
    assert int((bits == 8).sum()) == n8 and int((bits == 4).sum()) == n84 - n8
    assert int((bits == 2).sum()) == n - n84
    order = sorted(range(n), key=lambda i: (-s[i].item(), i))  # rank by sensitivity, then index
    ranked = bits[order]
    assert (ranked[:-1] >= ranked[1:]).all()


def test_allocate_bits_layer_boost_and_cut():
    layers = [torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    base = ref.allocate_bits(layers, 0.25)
    assert [b.tolist() for b in base] == [[2, 8, 2, 4], [8, 4, 2, 2], [2, 2, 4, 8]]
    # mean 0.4: layer 1 one rung up ([8, 6, 4, 4]), layers 0 and 2 one down ([2, 6, 2, 2], [2, 2, 2, 6]);
    # that is 46 bits against Gamma's 48: the rank-0 channels come first, layer 1's (at 8 already),
    # then layer 0's, which goes 6 -> 8
    out = ref.allocate_bits(layers, 0.25, layer_importance=torch.tensor([0.2, 0.9, 0.1]))
    assert [b.tolist() for b in out] == [[2, 8, 2, 2], [8, 6, 4, 4], [2, 2, 2, 6]]
    same = ref.allocate_bits(layers, 0.25, layer_importance=torch.ones(3))
    assert all(torch.equal(a, b) for a, b in zip(same, base))
    # mean 0.7667: layer 0 down, layers 1 and 2 up -> 56 bits; 8 come off the least important
    # channels: rank 3 of 4 first (layer 0's is at 2; layers 2 and 1 tie on importance, the later
    # layer counts as less important), 4 -> 2 each, then rank 2 the same way
    ties = ref.allocate_bits(layers, 0.25, layer_importance=torch.tensor([0.5, 0.9, 0.9]))
    assert [b.tolist() for b in ties] == [[2, 6, 2, 2], [8, 6, 2, 2], [2, 2, 6, 8]]
    one = ref.allocate_bits(layers[0], 0.25, layer_importance=torch.tensor([3.0]))
    assert one.tolist() == base[0].tolist() and one.dtype == torch.int64


def test_allocate_bits_budget_hand_example():
    layers = [torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([0.4, 0.3, 0.2, 0.1])]
    # Gamma [2, 8, 2, 4], [8, 4, 2, 2] = 32 bits; 3.5 * 8 = 28: channels last by rank / C go down
    # first (ties: the later layer first); ranks 3 and 2 are at 2 bits already, so the two rank-1
    # channels (4 bits) drop to 2
    out = ref.allocate_bits(layers, 0.25, budget=3.5)
    assert [b.tolist() for b in out] == [[2, 8, 2, 2], [8, 2, 2, 2]]
    # 3.3 * 7 = 23.1 -> 23 bits is odd: the nearest even total below, 22
    out = ref.allocate_bits([layers[0], layers[1][:3]], 0.25, budget=3.3)
    assert sum(int(b.sum()) for b in out) == 22
    # 2-5-6-7: steps 3, 1, 1; 4.0 * 4 = 16 bits from Gamma's [2, 7, 2, 5] = 16 -> unchanged
    assert ref.allocate_bits(layers[0], 0.25, budget=4.0, widths=(2, 5, 6, 7)).tolist() == [2, 7, 2, 5]


def test_allocate_bits_straight_through():
    s = torch.tensor([0.3, -1.0, 2.0, 0.5], requires_grad=True)
    bits = ref.allocate_bits(s, 0.25, straight_through=True)
    assert bits.dtype == torch.float32 and bits.tolist() == [2.0, 2.0, 8.0, 4.0]
    (bits * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert s.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    layers = [torch.randn(6, requires_grad=True), torch.randn(3, requires_grad=True)]
    lam = torch.tensor([0.0, 1.0], requires_grad=True)
    out = ref.allocate_bits(layers, 0.125, lam, straight_through=True)
    sum(o.sum() for o in out).backward()
    assert all(torch.equal(layer.grad, torch.ones_like(layer)) for layer in layers)
    assert lam.grad.tolist() == [6 - 4.5, 3 - 4.5]  # each layer's channel count minus their mean
    assert ref.encode_strategy(out[0].detach()).dtype == torch.uint8


@pytest.mark.parametrize(
    "args, kwargs, err, match",
    [
        ((torch.ones(4), 0.6), {}, ValueError, r"beta must be a number in \[0, 0.5\]"),
        ((torch.ones(4), -0.1), {}, ValueError, "beta must be"),
        ((torch.tensor([1.0, NAN]), 0.25), {}, ValueError, "sensitivity must not contain NaN"),
        ((torch.ones(2, 2, 4), 0.25), {}, ValueError, "sensitivity must be 1-D or 2-D"),
        (([torch.ones(4), torch.ones(2, 2)], 0.25), {}, ValueError, r"sensitivity\[1\] has batch shape"),
        ((torch.ones(4, dtype=torch.int64), 0.25), {}, TypeError, "sensitivity must be a floating"),
        (([], 0.25), {}, ValueError, "at least one layer"),
        (([torch.ones(4), torch.ones(3)], 0.25), dict(layer_importance=torch.ones(3)), ValueError, r"layer_importance must have shape \[2\]"),
        (([torch.ones(4), torch.ones(3)], 0.25), dict(layer_importance=torch.tensor([1.0, NAN])), ValueError, "layer_importance must not contain NaN"),
        (([torch.ones(4), torch.ones(3)], 0.25), dict(layer_importance=torch.tensor([1.0, INF])), ValueError, "layer_importance must be finite"),
        ((torch.ones(4), 0.25), dict(budget=8.5), ValueError, r"budget must be in \[2, 8\]"),
        ((torch.ones(4), 0.25), dict(budget=True), TypeError, "budget must be a number"),
        ((torch.ones(4), 0.25), dict(widths=(2, 4, 4, 8)), ValueError, "strictly increasing"),
    ],
)
def test_allocate_bits_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ref.allocate_bits(*args, **kwargs)


def test_search_and_norms_are_not_differentiable_here_either():
    """The kernels' search distances and edit norms carry no graph (an argmin's inputs); the
    oracle's must not offer one either, or code tested on it loses its gradients elsewhere."""
    x, p = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    for metric in ("l2", "ip", "cosine"):
        assert not ref.nearest_prototype(x, p, 2, metric)[0].requires_grad
    e, w, b = torch.randn(5, 3, requires_grad=True), torch.randn(2, 3, 6, requires_grad=True), torch.randn(2, 6)
    assert not ref.edit_norms(e, w, b).requires_grad
    assert not ref.assign_prototypes(e, w, b, threshold=0.5)[0].requires_grad
