"""nearest_prototype / kmeans / kmeans_predict on every backend against pyeditor.reference:
exactness far from the origin, ties and duplicates across tiles, NaN rules, dtypes, strides,
bad input, opcheck, torch.compile, determinism across thread counts."""
import math

import pytest
import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import check_close

from conftest import backend_params

BACKENDS = backend_params()
METRICS = ["l2", "ip", "cosine"]


def clustered(n_points, n_protos, d, offset, seed, spread=0.5, centers=8):
    """Points and prototypes around shared cluster centres, shifted by `offset`; prototypes
    duplicated across every tile boundary the kernels use (16, 32, 64 lanes)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g, dtype=torch.float64) * 3
    p = c[torch.randint(0, centers, (n_protos,), generator=g)] + torch.randn(n_protos, d, generator=g,
                                                                         dtype=torch.float64) * spread
    x = c[torch.randint(0, centers, (n_points,), generator=g)] + torch.randn(n_points, d, generator=g,
                                                                         dtype=torch.float64) * spread
    for a, b in [(3, 17), (15, 16), (31, 32), (1, 63), (40, 64)]:
        if b < n_protos:
            p[b] = p[a]
    x[:2] = p[:2]  # queries sitting exactly on a prototype
    return (x + offset).float(), (p + offset).float()


def uniform(n_points, n_protos, d, offset, seed):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n_points, d, generator=g) + offset), (torch.randn(n_protos, d, generator=g) + offset))


def sizes(backend, device):
    # the Triton interpreter is slow: tiny shapes; the C++ CPU gets batches that take its blocked path
    return (24, 40) if backend == "triton" and device == "cpu" else (200, 80)


def assert_same(got, want, dtype=None):
    d, i = got
    dr, ir = want
    wrong = int((i.cpu() != ir).sum())
    assert wrong == 0, f"{wrong} wrong indices of {ir.numel()}"
    check_close(d.cpu(), dr, tol=(1e-5, 2e-6) if d.dtype == torch.float32 else None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("d", [3, 64, 257])
@pytest.mark.parametrize("offset", [0.0, 30.0, 300.0, 1e4])
@pytest.mark.parametrize("data", ["clustered", "random"])
def test_exact_far_from_origin(backend, device, d, offset, data):
    B, N = sizes(backend, device)
    make = clustered if data == "clustered" else uniform
    x, p = make(B, N, d, offset, seed=int(offset) % 97 + d)
    for k in (1, 3):
        got = pyeditor.nearest_prototype(x.to(device), p.to(device), k, "l2", backend=backend)
        assert_same(got, ref.nearest_prototype(x, p, k, "l2"))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_exact_ip_cosine(backend, device, metric, offset):
    B, N = sizes(backend, device)
    for d in (3, 64):
        x, p = clustered(B, N, d, offset, seed=d)
        for k in (1, 4):
            got = pyeditor.nearest_prototype(x.to(device), p.to(device), k, metric, backend=backend)
            assert_same(got, ref.nearest_prototype(x, p, k, metric))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_dtypes(backend, device, dtype, metric):
    x, p = clustered(40, 37, 19, 5.0, seed=1)
    x, p = x.to(dtype), p.to(dtype)
    got = pyeditor.nearest_prototype(x.to(device), p.to(device), 2, metric, backend=backend)
    assert got[0].dtype == dtype and got[1].dtype == torch.int64
    assert_same(got, ref.nearest_prototype(x, p, 2, metric))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_and_all_k(backend, device):
    p = torch.zeros(40, 5)
    x = torch.randn(33, 5)
    for metric in METRICS:
        d, i = pyeditor.nearest_prototype(x.to(device), p.to(device), 3, metric, backend=backend)
        assert torch.equal(i.cpu(), torch.arange(3).expand(33, 3)), "ties must go to the lowest index"
    x, p = clustered(35, 40, 7, 0.0, seed=4)
    for k in (1, 2, 17, 33, 40):
        if backend == "cuda" and k > 32:
            continue
        assert_same(pyeditor.nearest_prototype(x.to(device), p.to(device), k, "l2", backend=backend),
                    ref.nearest_prototype(x, p, k, "l2"))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_and_inf_rules(backend, device, metric):
    x, p = clustered(36, 20, 6, 0.0, seed=2)
    x[3, 2] = math.nan
    x[4, 0] = math.inf
    p[5, 1] = math.nan
    p[9, 3] = math.nan
    for k in (1, 3):
        got = pyeditor.nearest_prototype(x.to(device), p.to(device), k, metric, backend=backend)
        assert_same(got, ref.nearest_prototype(x, p, k, metric))
        assert torch.isnan(got[0][3].cpu()).all() and (got[1][3] == -1).all()
        assert not ((got[1] == 5) | (got[1] == 9)).any(), "a NaN prototype must never be chosen"
    p_inf = p.clone()
    p_inf[7, 0] = math.inf
    assert_same(pyeditor.nearest_prototype(x.to(device), p_inf.to(device), 2, metric, backend=backend),
                ref.nearest_prototype(x, p_inf, 2, metric))
    # fewer eligible prototypes than k: -1 and +-inf fill
    p_few = torch.full((4, 6), math.nan)
    p_few[2] = 1.0
    d, i = pyeditor.nearest_prototype(x.to(device), p_few.to(device), 3, metric, backend=backend)
    assert_same((d, i), ref.nearest_prototype(x, p_few, 3, metric))
    assert (i[:, 1:] == -1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_empty_and_huge_values(backend, device):
    x, p = clustered(64, 48, 10, 1.0, seed=3)
    xt = torch.cat([x, x], 1)[:, ::2]                  # column stride 2
    pt = p.t().contiguous().t()                         # transposed storage
    assert_same(pyeditor.nearest_prototype(xt.to(device), pt.to(device), 2, backend=backend),
                ref.nearest_prototype(xt, pt, 2))
    xe = x[:1].expand(40, 10)                           # stride-0 batch
    assert_same(pyeditor.nearest_prototype(xe.to(device), p.to(device), 1, backend=backend),
                ref.nearest_prototype(xe, p, 1))
    d, i = pyeditor.nearest_prototype(torch.empty(0, 10, device=device), p.to(device), 3, backend=backend)
    assert d.shape == (0, 3) and i.shape == (0, 3)
    big = x.double() * 1e25                              # float32 squares overflow: exact fallback
    assert_same(pyeditor.nearest_prototype(big.float().to(device), (p.double() * 1e25).float().to(device), 2,
                                           backend=backend),
                ref.nearest_prototype(big.float(), (p.double() * 1e25).float(), 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_products_past_float32_range(backend, device, metric):
    """Finite inputs whose float32 products or squared distances overflow: every prototype is
    still ranked (by the float64 rescan), also when the float32 pass kept k or fewer keys
    (k = N) or none, at 1, 3 and 40 queries (the CPU's direct, resident and blocked passes)."""
    g = torch.Generator().manual_seed(11)
    cases = [(torch.tensor([[3e19, 1e19]]), torch.tensor([[3e19, 0.0], [0.0, 3e19]]))]  # a new-user trial's
    for scale, B, N, d in [(3e19, 3, 5, 16), (1e30, 3, 3, 2), (1e20, 40, 5, 16)]:
        x, p = torch.randn(B, d, generator=g) * scale, torch.randn(N, d, generator=g) * scale
        p[0] = x[0]
        cases.append((x, p))
    for x, p in cases:
        for k in sorted({1, 2, p.shape[0]}):
            got = pyeditor.nearest_prototype(x.to(device), p.to(device), k, metric, backend=backend)
            assert_same(got, ref.nearest_prototype(x, p, k, metric))
            assert (got[1] >= 0).all(), "finite inputs: every slot holds a prototype"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_cosine_query_with_inf_has_no_direction(backend, device):
    """x / ||x|| is NaN for an inf entry, so no pair is eligible, not even a zero prototype
    (which scores 0 against every query that has a direction)."""
    x = torch.tensor([[math.inf, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    got = pyeditor.nearest_prototype(x.to(device), p.to(device), 2, "cosine", backend=backend)
    assert_same(got, ref.nearest_prototype(x, p, 2, "cosine"))
    assert (got[1][0] == -1).all() and got[1][1].tolist() == [0, 1]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33])
@pytest.mark.parametrize("scale", [1.0, 1e18, 1e-30])
@pytest.mark.parametrize("batch", [5, 70])
def test_cpu_passes_at_panel_edges(n, scale, batch):
    # batch 70 takes the CPU blocked pass: k = 1 runs the 16-query transposed tile (rows 64 + 6,
    # so a partial tile; d not a multiple of its 16-dim chunks), k > 1 feeds each 16/32-lane
    # panel to the vector top-k. batch 5 takes the direct pass (k = 1, l2: 16 prototypes per
    # butterfly-reduced group). Fewer prototypes than the k+1 slots, padded lanes, partial
    # groups, duplicates, overflowing and tiny keys, NaN and inf prototypes.
    g = torch.Generator().manual_seed(n)
    for d in (1, 16, 17, 64):
        x, p = torch.randn(batch, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale
        p[n // 2] = p[0]
        x[min(3, batch - 1)] = p[0]
        variants = [p]
        if n > 2:
            bad = p.clone()
            bad[1, 0] = math.nan
            bad[n - 1, -1] = math.inf
            variants.append(bad)
        for protos in variants:
            for k in sorted({1, min(n, 2), n}):
                for metric in ("l2", "ip", "cosine"):
                    dist, idx = pyeditor.nearest_prototype(x, protos, k, metric, backend="cpu")
                    want_d, want_i = ref.nearest_prototype(x, protos, k, metric)
                    assert torch.equal(idx, want_i), (n, d, k, scale, metric)
                    check_close(dist, want_d)


@pytest.mark.parametrize("n", [2, 5, 9, 16, 24, 32])
def test_cpu_resident_pass(n):
    # k = 1 with at most 32 prototypes and a batch of at least 32 takes the resident pass
    # (search_plan.h): query groups ending mid-group (batch 203), d off the 16-dim chunks, ties
    # from duplicate prototypes and queries on a prototype, a NaN prototype (dropped from the
    # packed lanes) and NaN / inf queries, far from the origin where the float32 keys cannot
    # decide alone.
    for d, offset, seed in ((1, 0.0, 1), (17, 0.0, 2), (64, 300.0, 3), (100, 1e4, 4)):
        x, p = clustered(203, n, d, offset, seed=seed + n)
        p[n - 1] = p[0]
        x[5] = p[n // 2]
        x[7, 0] = math.nan
        x[8, -1] = math.inf
        variants = [p]
        if n > 2:
            bad = p.clone()
            bad[1, -1] = math.nan
            variants.append(bad)
        for protos in variants:
            for metric in METRICS:
                dist, idx = pyeditor.nearest_prototype(x, protos, 1, metric, backend="cpu")
                want_d, want_i = ref.nearest_prototype(x, protos, 1, metric)
                assert torch.equal(idx, want_i), (n, d, offset, metric)
                check_close(dist, want_d)


def test_deterministic_across_threads():
    x, p = clustered(3000, 100, 33, 300.0, seed=7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pyeditor.nearest_prototype(x, p, 3, backend="cpu")
        torch.set_num_threads(max(2, old))
        many = pyeditor.nearest_prototype(x, p, 3, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert_same(one, ref.nearest_prototype(x, p, 3))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bad_input(backend, device):
    x, p = torch.randn(5, 4, device=device), torch.randn(6, 4, device=device)
    with pytest.raises(ValueError, match="x has 3 features but prototypes have 4"):
        pyeditor.nearest_prototype(x[:, :3], p, backend=backend)
    with pytest.raises(ValueError, match="k must be in"):
        pyeditor.nearest_prototype(x, p, 7, backend=backend)
    with pytest.raises(ValueError, match="k must be in"):
        pyeditor.nearest_prototype(x, p, 0, backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        pyeditor.nearest_prototype(x, p, 1.0, backend=backend)
    with pytest.raises(ValueError, match="at least one row"):
        pyeditor.nearest_prototype(x, p[:0], backend=backend)
    with pytest.raises(TypeError, match="x must be float32"):
        pyeditor.nearest_prototype(x.int(), p, backend=backend)
    with pytest.raises(TypeError, match="prototypes must be float32"):
        pyeditor.nearest_prototype(x, p.long(), backend=backend)
    with pytest.raises(ValueError, match="x must be 2-D"):
        pyeditor.nearest_prototype(x[0], p, backend=backend)
    with pytest.raises(ValueError, match="metric must be one of"):
        pyeditor.nearest_prototype(x, p, metric="l1", backend=backend)
    with pytest.raises(ValueError, match="prototypes is on meta"):
        pyeditor.nearest_prototype(x, p.to("meta"), backend=backend)


def test_cpp_checks_itself():
    op = torch.ops.pyeditor.nearest_prototype
    x, p = torch.randn(5, 4), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, p, 9, "l2")
    with pytest.raises(RuntimeError, match="features"):
        op(x, p[:, :3], 1, "l2")
    with pytest.raises(RuntimeError, match="metric must be"):
        op(x, p, 1, "l1")
    with pytest.raises(RuntimeError, match="must be floating"):
        op(x.int(), p, 1, "l2")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_underflowing_keys(backend, device):
    # squares below float32's smallest subnormal round to 0 or 2^-149 with an absolute error no
    # relative bound covers: a = 2.6204e-23 gives 0.98 x 2^-149 in float64 but 0 in float32
    a, b = 2.6204e-23, 2.6733e-23
    p = torch.tensor([[a, a], [b, 0.0]])
    for batch in (1, 40):  # the CPU's direct and blocked passes
        x = torch.zeros(batch, 2)
        for k in (1, 2):
            got = pyeditor.nearest_prototype(x.to(device), p.to(device), k, "l2", backend=backend)
            assert torch.equal(got[1].cpu(), ref.nearest_prototype(x, p, k, "l2")[1]), (batch, k)
    # cosine: a prototype with a tiny (underflowing) norm still has its true direction
    pc = torch.tensor([[1e-30, 0.0], [0.6, 0.8]])
    xc = torch.tensor([[1.0, 0.0]]).expand(40, 2)
    for batch in (1, 40):
        got = pyeditor.nearest_prototype(xc[:batch].to(device), pc.to(device), 1, "cosine", backend=backend)
        assert torch.equal(got[1].cpu(), ref.nearest_prototype(xc[:batch], pc, 1, "cosine")[1])


def test_bound_for_huge_d():
    # at d ~ 6M the float32 relative bound would reach 1 (and turn negative): it must reject
    d = 6_000_000
    x, p = torch.zeros(1, d), torch.ones(2, d)
    p[1, 0] = 1 - 2.0 ** -24
    for backend in ("cpu", "reference"):
        assert pyeditor.nearest_prototype(x, p, 1, backend=backend)[1].item() == 1, backend


@pytest.mark.skipif("cpu" not in pyeditor.backends.available("cpu"), reason="needs the C++ extension")
def test_eager_cpu_call_and_its_fallbacks():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyeditor import _ext

    x, p = clustered(3, 20, 8, 0.0, seed=5)
    direct = _ext.search_cpu_eager(x, p, 2, "l2")
    assert direct is not None, "a plain eager CPU call should skip the dispatcher"
    want = torch.ops.pyeditor.nearest_prototype(x, p, 2, "l2")
    for got in (direct, pyeditor.nearest_prototype(x, p, 2)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:  # a dispatch mode must see the registered op
        got = pyeditor.nearest_prototype(x, p, 2)
    assert any("pyeditor.nearest_prototype" in n for n in mode.names), mode.names
    assert torch.equal(got[1], want[1])
    with FakeTensorMode() as fake:  # fake tensors take the op's fake kernel
        d, i = pyeditor.nearest_prototype(fake.from_tensor(x), fake.from_tensor(p), 2)
    assert i.shape == (3, 2) and i.dtype == torch.int64
    # anything but a valid plain call answers None (the checked path then raises)
    nested = torch.nested.nested_tensor([torch.randn(8), torch.randn(8)])
    ragged = torch.nested.nested_tensor([torch.randn(8), torch.randn(5)])
    for args in [(x, p, 0, "l2"), (x, p, 21, "l2"), (x, p, True, "l2"), (x, p, 1, "l1"), (x, p, 1, None),
                 (x, p, 1, "l2\0"), (x, p, 1, "cosine "),
                 (x[0], p, 1, "l2"), (x[:, :3], p, 1, "l2"), (x.int(), p, 1, "l2"), (x, p.to("meta"), 1, "l2"),
                 (x.to(torch.float8_e4m3fn), p, 1, "l2"), (nested, p, 1, "l2"), (ragged, p, 1, "l2"),
                 (torch._efficientzerotensor(3, 8), p, 1, "l2")]:
        assert _ext.search_cpu_eager(*args) is None, args
    # an error inside the kernel (here: no memory for a 2^40-row result) is raised, GIL held
    with pytest.raises(RuntimeError):
        _ext.search_cpu_eager(x[:1].expand(2 ** 40, 8), p, 1, "l2")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    op = pyeditor.ops.search_op(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, p = clustered(20, 9, 5, 0.0, seed=5)
    for args in [(x, p, 1, "l2"), (x, p, 3, "ip"), (x[:0], p, 2, "cosine")]:
        torch.library.opcheck(op, (args[0].to(device), args[1].to(device)) + args[2:], test_utils=tests)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, p = clustered(50, 20, 8, 100.0, seed=6)

    def assign(x, p):
        d, i = pyeditor.nearest_prototype(x, p, 2, backend="cpu")
        return d.sum(1), i[:, 0]

    got = torch.compile(assign, fullgraph=True)(x, p)
    want = assign(x, p)
    assert torch.equal(got[1], want[1])
    check_close(got[0], want[0])


# ------------------------------------------------------------------ k-means
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_kmeans_matches_reference(backend, device, metric):
    x, _ = clustered(60 if backend == "triton" else 300, 4, 5, 50.0, seed=8, centers=5)
    kw = dict(n_iter=4 if backend == "triton" else 8, seed=3, metric=metric, tol=0.0)
    c, labels, inertia = pyeditor.kmeans(x.to(device), 5, backend=backend, **kw)
    cr, lr, ir = ref.kmeans(x, 5, **kw)
    check_close(c.cpu(), cr, tol=(1e-4, 1e-5))
    assert torch.equal(labels.cpu(), lr)
    assert math.isclose(inertia, ir, rel_tol=1e-6, abs_tol=1e-6)
    assert torch.equal(pyeditor.kmeans_predict(x.to(device), c, metric, backend=backend).cpu(), labels.cpu())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kmeans_near_the_top_of_float32(backend, device):
    """float32 points around 1e20: cosine and ip keep their directions (norms in float64, where
    float32 squares overflow and every centroid came out 0); l2's float32 squared distances
    would overflow, so it is refused with a message naming x, by the oracle too."""
    x, _ = clustered(40, 4, 5, 0.0, seed=9, centers=3)
    big = (x.double() * 1e20).float()
    for metric in ("cosine", "ip"):
        kw = dict(n_iter=3, seed=1, metric=metric, tol=0.0)
        c, labels, inertia = pyeditor.kmeans(big.to(device), 3, backend=backend, **kw)
        cr, lr, ir = ref.kmeans(big, 3, **kw)
        assert torch.isfinite(cr).all() and (cr.norm(dim=1) > 0.99).all()
        check_close(c.cpu(), cr, tol=(1e-4, 1e-5))
        assert torch.equal(labels.cpu(), lr) and math.isclose(inertia, ir, rel_tol=1e-5)
        if metric == "cosine":  # scale-free: the same fit as the unscaled points
            assert torch.equal(lr, ref.kmeans(x, 3, **kw)[1])
    for fit in (lambda: pyeditor.kmeans(big.to(device), 3, backend=backend), lambda: ref.kmeans(big, 3)):
        with pytest.raises(ValueError, match=r"x spans \d(\.\d+)?e\+2\d .*l2 k-means would overflow.*float64"):
            fit()
    pyeditor.kmeans(big.double().to(device), 3, n_iter=1, backend=backend)  # float64 is fine
    # l2's limit is on the spread, not the location: points near 1e18 a trillion apart fit
    far = (x.double() * 1e12 + 1e18).float()
    kw = dict(n_iter=2, seed=1, tol=0.0)
    assert torch.equal(pyeditor.kmeans(far.to(device), 3, backend=backend, **kw)[1].cpu(), ref.kmeans(far, 3, **kw)[1])
    # ip sums whole clusters of points: 40 points of 1e37 could overflow float32
    huge = (x.double() * 1e37).float()
    for fit in (lambda: pyeditor.kmeans(huge.to(device), 3, metric="ip", backend=backend),
                lambda: ref.kmeans(huge, 3, metric="ip")):
        with pytest.raises(ValueError, match="the sum of its 40 points could overflow float32.*float64"):
            fit()


def test_kmeans_empty_clusters_random_init_and_progress(capsys):
    x = torch.cat([torch.zeros(20, 3), torch.ones(5, 3) * 10])  # many duplicates: clusters go empty
    for init in ("k-means++", "random"):
        got = pyeditor.kmeans(x, 6, n_iter=5, init=init, seed=1, tol=0.0, progress="always")
        want = ref.kmeans(x, 6, n_iter=5, init=init, seed=1, tol=0.0)
        check_close(got[0], want[0])
        assert torch.equal(got[1], want[1]) and math.isclose(got[2], want[2], abs_tol=1e-9)
    assert "kmeans 5/5" in capsys.readouterr().err
    pyeditor.kmeans(x, 2, n_iter=2, progress=True)  # stderr is not a terminal here: silent
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="n_clusters must be <="):
        pyeditor.kmeans(x, 26)
    with pytest.raises(ValueError, match="finite"):
        pyeditor.kmeans(torch.full((4, 2), math.nan), 2)
    with pytest.raises(ValueError, match="init must be"):
        pyeditor.kmeans(x, 2, init="kmeans")
