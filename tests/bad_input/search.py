"""Cases of nearest_prototype, kmeans_predict and kmeans."""
from __future__ import annotations

import math

import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import reduction_tolerance

from .core import BAD_FLOAT, Case, Draw, bad_dtype, poke, strided

def search_inputs(d: Draw, lo: int = 1, half: bool = False):
    B, N, dim = d.int(0, 5), d.int(1, 6), d.int(lo, 4)
    dt = d.float_dtype(half)
    return d.rnd(B, dim, dtype=dt), d.rnd(N, dim, dtype=dt), (B, N, dim, dt)


def nearest_prototype_cases(bk):
    api = lambda *a: pyeditor.nearest_prototype(*a, backend=bk)  # noqa: E731

    def valid(d):
        x, p, (B, N, dim, dt) = search_inputs(d)
        form = d.pick(["strided", "stride0-prototypes", "stride0-x", "plain"])
        if form == "strided":
            x, p = strided(x), strided(p)
        elif form == "stride0-prototypes":
            p = p[:1].expand(N, dim)
        elif form == "stride0-x" and B:
            x = x[:1].expand(B, dim)
        k, metric = d.int(1, N), d.pick(["l2", "ip", "cosine"])
        return Case(lambda: api(x, p, k, metric), lambda: ref.nearest_prototype(x, p, k, metric), valid=True,
                    tol=reduction_tolerance(dt, dim))

    def valid_empty_or_16bit(d):
        x, p, (B, N, dim, dt) = search_inputs(d, lo=0, half=True)
        k, metric = d.int(1, N), d.pick(["l2", "ip", "cosine"])
        return Case(lambda: api(x, p, k, metric), lambda: ref.nearest_prototype(x, p, k, metric), valid=True,
                    tol=reduction_tolerance(dt, dim))

    def nan_inf(d):
        x, p, (B, N, dim, dt) = search_inputs(d)
        x, p = poke(x, math.nan, d), poke(p, d.pick([math.nan, math.inf, -math.inf]), d)
        k, metric = d.int(1, N), d.pick(["l2", "ip", "cosine"])
        return Case(lambda: api(x, p, k, metric), lambda: ref.nearest_prototype(x, p, k, metric), valid=True,
                    tol=reduction_tolerance(dt, dim))

    def bad(d):
        x, p, (B, N, dim, dt) = search_inputs(d)
        which = d.pick(["k", "k-type", "metric", "x", "prototypes", "features", "x-rank", "empty-prototypes"])
        k, metric = 1, "l2"
        if which == "k":
            k = d.pick([0, -1, N + 1, 2 ** 62])
        elif which == "k-type":
            k = d.pick([1.0, True, "1", None])
        elif which == "metric":
            metric = d.pick(["L2", "l1", "", None])
        elif which == "x":
            x = bad_dtype(x, d.pick(BAD_FLOAT))
        elif which == "prototypes":
            p = bad_dtype(p, d.pick(BAD_FLOAT))
        elif which == "features":
            p = d.rnd(N, dim + 1, dtype=dt)
        elif which == "x-rank":
            x = d.pick([x[None], x.reshape(-1)])
        else:
            p = p[:0]
        names = {"k-type": "\\bk\\b", "k": "\\bk\\b", "features": "features", "x-rank": "\\bx\\b",
                 "empty-prototypes": "prototypes|\\bk\\b"}.get(which, which)
        return Case(lambda: api(x, p, k, metric), lambda: ref.nearest_prototype(x, p, k, metric), names)

    def predict(d):
        x, p, (B, N, dim, dt) = search_inputs(d)
        p = d.pick([strided(p), p.to(torch.int32), p[None]])
        return Case(lambda: pyeditor.kmeans_predict(x, p, backend=bk), lambda: ref.kmeans_predict(x, p),
                    "prototypes|centroids", valid=p.dtype == dt and p.dim() == 2)

    return locals()


def kmeans_cases(bk):
    def _inputs(d):
        B, dim = d.int(4, 9), d.int(1, 3)
        centres = d.rnd(3, dim, scale=20)  # well-separated blobs: no near-tie assignments
        x = centres[d.index(B, 3)] + d.rnd(B, dim) * 0.1
        return x.to(d.float_dtype()), B

    def valid(d):
        x, B = _inputs(d)
        x = d.pick([strided(x), x])
        kw = dict(n_clusters=d.int(1, min(3, B)), n_iter=d.int(0, 2), init=d.pick(["k-means++", "random"]),
                  seed=d.int(0, 5), metric=d.pick(["l2", "ip", "cosine"]))
        return Case(lambda: pyeditor.kmeans(x, backend=bk, **kw), lambda: ref.kmeans(x, **kw), valid=True,
                    tol=reduction_tolerance(x.dtype, B))

    def bad(d):
        x, B = _inputs(d)
        which = d.pick(["n_clusters", "n_iter", "seed", "init", "tol", "metric", "x", "x-nan", "x-rank"])
        kw = dict(n_clusters=2, n_iter=1)
        value = {"n_clusters": lambda: d.pick([0, -1, B + 1, 2.0]), "n_iter": lambda: d.pick([-1, 1.5]),
                 "seed": lambda: d.pick([-1, 0.5]), "init": lambda: d.pick(["kmeans++", None]),
                 "tol": lambda: d.pick([-1e-3, math.nan, "0"]), "metric": lambda: d.pick(["L2", "cos"])}
        if which in value:
            kw[which] = value[which]()
        elif which == "x":
            x = bad_dtype(x, d.pick(BAD_FLOAT))
        elif which == "x-nan":
            x = poke(x, d.pick([math.nan, math.inf]), d)
        else:
            x = x.reshape(-1)
        names = "\\bx\\b" if which.startswith("x") else which
        return Case(lambda: pyeditor.kmeans(x, backend=bk, **kw), lambda: ref.kmeans(x, **kw), names)

    return locals()
