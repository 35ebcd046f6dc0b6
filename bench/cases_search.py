"""Benchmark cases for ``pyeditor.nearest_prototype`` (k=1, l2) and ``pyeditor.kmeans``.

Peers: faiss-cpu IndexFlatL2 (search k=1) and faiss.Kmeans, torch.cdist + argmin, all with the
runner's torch thread count. Every impl returns the chosen indices; the reference is a float64
computation, so max|err| > 0 means wrong prototypes were picked.
Rows (default run): B=65536 d=64 N=16, B=65536 d=256 N=256, B=1 d=256 N=256, an exactness row
(clustered data offset by 1e4, where the expansion-based peers pick wrong prototypes), and
k-means 65536 x 64, 256 clusters, 10 iterations (init "random" like faiss.Kmeans).
--full adds ip, B=4096 and N=1024 shapes.
"""
from __future__ import annotations

import functools

import torch

from bench.registry import OURS, Case, Context, Prepared

FAMILY = "search"


def _faiss():
    try:
        import faiss  # test/bench dependency only (requirements-dev.txt)
    except ImportError as e:
        return f"faiss unavailable: {e}"
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _data(B, N, d, offset, clustered, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not clustered:
        return torch.randn(B, d, generator=g) + offset, torch.randn(N, d, generator=g) + offset
    c = torch.randn(16, d, generator=g, dtype=torch.float64) * 3
    p = c[torch.randint(0, 16, (N,), generator=g)] + 0.5 * torch.randn(N, d, generator=g, dtype=torch.float64)
    x = c[torch.randint(0, 16, (B,), generator=g)] + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64)
    return (x + offset).float(), (p + offset).float()


def _ours_search(ctx, x, p, metric):
    import pyeditor

    kw = {} if ctx.backend is None else {"backend": ctx.backend}
    return lambda: pyeditor.nearest_prototype(x, p, 1, metric, **kw)


def _faiss_search(x, p, metric):
    faiss = _faiss()
    if isinstance(faiss, str):
        return faiss
    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(p.shape[1])
    index.add(p.numpy())
    xn = x.numpy()
    return lambda: index.search(xn, 1)


def _make_search(B, N, d, metric, offset, clustered, ctx: Context) -> Prepared:
    x, p = _data(B, N, d, offset, clustered)
    x, p = x.to(ctx.device), p.to(ctx.device)
    fns = {OURS: _ours_search(ctx, x, p, metric), "faiss": _faiss_search(x.cpu(), p.cpu(), metric)}
    if metric == "l2":
        fns["cdist-argmin"] = lambda: torch.cdist(x, p).argmin(1)
    else:
        fns["cdist-argmin"] = lambda: (x @ p.T).argmax(1)  # the torch peer for ip: matmul + argmax

    def reference():
        from pyeditor import reference as ref

        if B * N * d <= 1 << 24:
            return ref.nearest_prototype(x.cpu(), p.cpu(), 1, metric)[1][:, 0]
        xd, pd = x.cpu().double(), p.cpu().double()  # offset 0: float64 expansion is exact enough
        return torch.cdist(xd, pd).argmin(1) if metric == "l2" else (xd @ pd.T).argmax(1)

    # each impl is timed on its own call (ours: (dist, idx) tensors; faiss: numpy arrays); the
    # chosen index is taken out for the check only, untimed
    convert = {OURS: lambda out: out[1][:, 0], "faiss": lambda out: torch.from_numpy(out[1][:, 0])}
    notes = ["impls' chosen indices are compared; max|err| > 0 means wrong prototypes",
             "faiss: IndexFlatL2/IP.search(x, 1) on numpy views; cdist-argmin: torch.cdist(x, p).argmin(1)"]
    if clustered:
        want = reference()
        for name, fn in fns.items():
            if callable(fn):
                got = fn() if name not in convert else convert[name](fn())
                notes.append(f"{name}: {int((got.cpu() != want).sum())} of {B} indices wrong")
    # the distance products (x . p for every pair); norms and the selection are lower order
    return Prepared(fns=fns, bytes_moved=(B + N) * d * 4 + B * 8, flops=2 * B * N * d, reference=reference, tol=0.0,
                    notes=notes, convert=convert)


def _make_kmeans(B, d, K, iters, ctx: Context) -> Prepared:
    import pyeditor
    x, _ = _data(B, 1, d, 0.0, True, seed=1)
    x = x.to(ctx.device)
    kw = {} if ctx.backend is None else {"backend": ctx.backend}
    ours = lambda: pyeditor.kmeans(x, K, n_iter=iters, init="random", seed=0, tol=0.0, **kw)[0]  # noqa: E731
    fns = {OURS: ours}
    faiss = _faiss()
    inertia = {}

    def exact(c):  # inertia of centroids c: exact squared distances to the nearest one
        return float(pyeditor.nearest_prototype(x.cpu(), c.cpu().float(), 1)[0].double().sum())

    inertia[OURS] = exact(ours())
    if isinstance(faiss, str):
        fns["faiss"] = faiss
    else:
        xn = x.cpu().numpy()

        def run_faiss():
            km = faiss.Kmeans(d, K, niter=iters, seed=1234, verbose=False)
            km.train(xn)
            return torch.from_numpy(km.centroids)

        fns["faiss"] = run_faiss
        inertia["faiss"] = exact(run_faiss())

    def derive(m):
        out = {f"inertia_{k}": v for k, v in inertia.items()}
        if "faiss" in inertia:
            out["inertia_ratio_ours_over_faiss"] = inertia[OURS] / inertia["faiss"]
            out["summary"] = f"inertia ours/faiss = {out['inertia_ratio_ours_over_faiss']:.4f}"
        return out

    # per iteration: the assignment's distance products and the centroid sums
    return Prepared(fns=fns, bytes_moved=B * d * 4 * iters, flops=iters * (2 * B * K * d + B * d), derive=derive,
                    notes=["inertia of each impl's centroids, computed exactly (float64 recheck) by "
                           "nearest_prototype; both use random init and the same iteration count"])


def _search(B, N, d, metric="l2", offset=0.0, clustered=False, full=False):
    tag = f"{B}x{d}-N{N}" + (f"-clustered+{offset:g}" if clustered else "")
    return Case(f"{FAMILY}/{metric}/{tag}/fp32", f"nearest_prototype {metric} B={B} d={d} N={N}"
                + (f" clustered offset {offset:g}" if clustered else ""), FAMILY, (OURS, "faiss", "cdist-argmin"),
                functools.partial(_make_search, B, N, d, metric, offset, clustered), full,
                {"B": B, "N": N, "d": d, "k": 1, "metric": metric, "offset": offset, "clustered": clustered})


def _cases():
    cases = [_search(65536, 16, 64), _search(65536, 256, 256), _search(1, 256, 256),
             _search(2048, 256, 64, offset=1e4, clustered=True),
             Case(f"{FAMILY}/kmeans/65536x64-K256-it10/fp32", "kmeans B=65536 d=64 K=256 10 iters", FAMILY,
                  (OURS, "faiss"), functools.partial(_make_kmeans, 65536, 64, 256, 10), False,
                  {"B": 65536, "d": 64, "K": 256, "n_iter": 10, "init": "random"})]
    cases += [_search(65536, 16, 64, "ip", full=True), _search(4096, 1024, 64, full=True),
              _search(4096, 256, 256, full=True), _search(64, 256, 256, full=True)]
    return cases


CASES: list[Case] = _cases()
