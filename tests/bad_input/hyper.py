"""Cases of hyper_matmul, hyper_matmul_heads, generate_edit, edit_norms and assign_prototypes."""
from __future__ import annotations

import math

import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import reduction_tolerance

from .core import BAD_FLOAT, Case, Draw, bad_dtype, poke, strided

def hyper_inputs(d: Draw, lo: int = 1, half: bool = False):
    P, B, dim, n = d.int(1, 3), d.int(lo, 4), d.int(lo, 5), d.int(lo, 7)
    dt = d.float_dtype(half)
    return d.rnd(B, dim, dtype=dt), d.rnd(P, dim, n, dtype=dt), d.rnd(P, n, dtype=dt), d.index(B, P), (P, B, dim, n, dt)


def hyper_matmul_cases(bk):
    api = lambda *a: pyeditor.hyper_matmul(*a, backend=bk)  # noqa: E731

    def valid_strided(d):
        e, w, b, idx, dims = hyper_inputs(d)
        form = d.pick(["strided", "stride0-index", "all-prototypes", "stride0-e"])
        if form == "strided":
            e, w, b, idx = (strided(t) for t in (e, w, b, idx))
        elif form == "stride0-index":
            idx = torch.tensor([d.int(0, dims[0] - 1)]).expand(dims[1])
        elif form == "all-prototypes":
            idx = None
        else:
            e = e[:1].expand(dims[1], dims[2])
        return Case(lambda: api(e, w, b, idx), lambda: ref.hyper_matmul(e, w, b, idx), valid=True,
                    tol=reduction_tolerance(dims[-1], dims[2]))

    def valid_empty_or_16bit(d):
        e, w, b, idx, dims = hyper_inputs(d, lo=0, half=True)
        idx, b = d.pick([idx, None]), d.pick([b, None])
        return Case(lambda: api(e, w, b, idx), lambda: ref.hyper_matmul(e, w, b, idx), valid=True,
                    tol=reduction_tolerance(dims[-1], dims[2]))

    def nan_inf(d):
        e, w, b, idx, dims = hyper_inputs(d)
        e, w = poke(e, math.nan, d), poke(w, d.pick([math.inf, -math.inf]), d)
        return Case(lambda: api(e, w, b, idx), lambda: ref.hyper_matmul(e, w, b, idx), valid=True,
                    tol=reduction_tolerance(dims[-1], dims[2]))

    def dtype(d):
        e, w, b, idx, dims = hyper_inputs(d)
        which = d.pick(["e", "weight", "bias", "index"])
        args = dict(e=e, weight=w, bias=b, index=idx)
        args[which] = idx.double() if which == "index" else bad_dtype(args[which], d.pick(BAD_FLOAT + [torch.float16]))
        a = (args["e"], args["weight"], args["bias"], args["index"])
        return Case(lambda: api(*a), lambda: ref.hyper_matmul(*a), which if which != "e" else "e\\b|weight")

    def shape(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        which = d.pick(["e", "weight", "bias", "index", "e-rank", "weight-rank"])
        args = dict(e=e, weight=w, bias=b, index=idx)
        if which == "e":
            args["e"] = d.rnd(B, dim + 1, dtype=dt)
        elif which == "e-rank":
            args["e"] = e.unsqueeze(0)
        elif which == "weight":
            args["weight"] = d.rnd(P, dim + 1, n, dtype=dt)
        elif which == "weight-rank":
            args["weight"] = w[0]
        elif which == "bias":
            args["bias"] = d.rnd(P + 1, n, dtype=dt)
        else:
            args["index"] = d.pick([d.index(B + 1, P), idx.view(B, 1)])
        a = (args["e"], args["weight"], args["bias"], args["index"])
        names = {"e": "e has|weight", "e-rank": "\\be\\b", "weight": "weight|e has", "weight-rank": "weight",
                 "bias": "bias", "index": "index"}[which]
        return Case(lambda: api(*a), lambda: ref.hyper_matmul(*a), names)

    def index_range(d):
        e, w, b, idx, (P, *_) = hyper_inputs(d)
        idx = poke(idx, d.pick([P, -1, -2 ** 40]), d)
        return Case(lambda: api(e, w, b, idx), None, "index")

    return locals()


def hyper_matmul_heads_cases(bk):
    api = lambda *a: pyeditor.hyper_matmul_heads(*a, backend=bk)  # noqa: E731

    def _inputs(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        L = d.int(1, 3)
        cuts = sorted(d.int(0, n) for _ in range(L - 1))
        sizes = [hi - lo for lo, hi in zip([0] + cuts, cuts + [n])]
        return d.rnd(L, B, dim, dtype=dt), w, sizes, b, idx, (P, B, dim, n, dt, L)

    def valid_strided(d):
        e, w, sizes, b, idx, dims = _inputs(d)
        form = d.pick(["strided", "stride0-e", "all-prototypes", "list-of-heads"])
        if form == "strided":
            e, w, b, idx = (strided(t) for t in (e, w, b, idx))
        elif form == "stride0-e":
            e = e[:1].expand(*e.shape)
        elif form == "all-prototypes":
            idx = None
        return Case(lambda: api(e, list(w.split(sizes, 2)), None, list(b.split(sizes, 1)), idx)
                    if form == "list-of-heads" else api(e, w, sizes, b, idx),
                    lambda: ref.hyper_matmul_heads(e, w, sizes, b, idx), valid=True,
                    tol=reduction_tolerance(dims[4], dims[2]))

    def sizes_bad(d):
        e, w, sizes, b, idx, dims = _inputs(d)
        form = d.pick(["negative", "sum", "count", "type"])
        if form == "negative":
            sizes = [-1] + [sizes[0] + 1] + sizes[1:] if len(sizes) > 1 else [-1]
        elif form == "sum":
            sizes = sizes[:-1] + [sizes[-1] + d.int(1, 3)]
        elif form == "count":
            sizes = sizes + [0]
        else:
            sizes = [float(s) for s in sizes]
        return Case(lambda: api(e, w, sizes, b, idx), lambda: ref.hyper_matmul_heads(e, w, sizes, b, idx), "sizes")

    def dtype_shape(d):
        e, w, sizes, b, idx, (P, B, dim, n, dt, L) = _inputs(d)
        which = d.pick(["e", "e-rank", "weight", "bias", "index"])
        args = dict(e=e, weight=w, bias=b, index=idx)
        if which == "e":
            args["e"] = bad_dtype(e, d.pick(BAD_FLOAT))
        elif which == "e-rank":
            args["e"] = e[0]
        elif which == "weight":
            args["weight"] = d.pick([w.to(torch.float16), w[0]])
        elif which == "bias":
            args["bias"] = d.rnd(P, n + 1, dtype=dt)
        else:
            args["index"] = poke(idx, P, d)
        a = (args["e"], args["weight"], sizes, args["bias"], args["index"])
        names = {"e": "\\be\\b", "e-rank": "\\be\\b", "weight": "weight", "bias": "bias", "index": "index"}[which]
        return Case(lambda: api(*a), lambda: ref.hyper_matmul_heads(*a), names)

    return locals()


def generate_edit_cases(bk):
    api = lambda *a: pyeditor.generate_edit(*a, backend=bk)  # noqa: E731

    def valid(d):
        e, w, b, idx, dims = hyper_inputs(d)
        thr = d.pick([0.3, strided(d.rnd(dims[1]).abs()), torch.tensor(2), 1e39])
        want = math.inf if isinstance(thr, float) and thr > 1e38 else thr
        return Case(lambda: api(e, w, b, idx, thr), lambda: ref.generate_edit(e, w, b, idx, want), valid=True,
                    tol=reduction_tolerance(dims[-1], dims[2]))

    def threshold_bad(d):
        e, w, b, idx, dims = hyper_inputs(d)
        thr = d.pick([-1.0, math.nan, True, 1j, torch.tensor(True), torch.tensor([1j] * dims[1]),
                      d.rnd(dims[1] + 1).abs(), d.rnd(dims[1], 1).abs()])
        return Case(lambda: api(e, w, b, idx, thr), lambda: ref.generate_edit(e, w, b, idx, thr), "threshold")

    return locals()


def edit_norms_cases(bk):
    def api(*a, method="fused"):
        return pyeditor.edit_norms(*a, backend=bk, method=method)

    def valid(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        form = d.pick(["strided", "threshold", "strided-threshold", "gram"])
        thr = None
        if form == "strided":
            e, w, b = strided(e), strided(w), strided(b)
        elif form == "threshold":
            thr = d.pick([0.4, torch.tensor(1), 1e39])
        elif form == "strided-threshold":
            thr = strided(d.rnd(B).abs())
        want = math.inf if isinstance(thr, float) and thr > 1e38 else thr
        return Case(lambda: api(e, w, b, thr, method="gram" if form == "gram" else "fused"),
                    lambda: ref.edit_norms(e, w, b, want), valid=True, tol=reduction_tolerance(dt, dim * n))

    def valid_empty_or_16bit(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d, lo=0, half=True)
        thr, method = d.pick([None, 0.5]), d.pick(["fused", "gram", "auto"])
        thr = None if method == "gram" else thr
        return Case(lambda: tuple(pyeditor.assign_prototypes(e, w, b, thr, backend=bk, method=method)),
                    lambda: tuple(ref.assign_prototypes(e, w, b, thr)), valid=True,
                    tol=reduction_tolerance(dt, max(dim, 1) * max(n, 1)))

    def overflow(d):
        # edits beyond float32 (or cancelling sums past it): the fused kernels' float32 edit
        # overflows where the reference's float64 one does not
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        big = d.pick([1e19, 1e25, 3e38])
        e, w = e * big if big < 1e38 else e.sign() + (e == 0), w * big
        return Case(lambda: api(e, w, b, None), lambda: ref.edit_norms(e, w, b), valid=True,
                    tol=reduction_tolerance(dt, dim * n))

    def nan_inf(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        e, b = poke(e, math.nan, d), poke(b, d.pick([math.inf, -math.inf]), d)
        thr = d.pick([None, 0.5])
        return Case(lambda: api(e, w, b, thr), lambda: ref.edit_norms(e, w, b, thr), valid=True,
                    tol=reduction_tolerance(dt, dim * n))

    def bad(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        which = d.pick(["threshold", "threshold-dtype", "method", "weight", "e", "gram-threshold"])
        thr, method = 0.5, "fused"
        if which == "threshold":
            thr = d.pick([-1.0, math.nan, d.rnd(B + 1).abs()])
        elif which == "threshold-dtype":
            thr = d.pick([torch.tensor(True), torch.tensor(1j)])
        elif which == "method":
            method = d.pick(["Gram", "", "auto "])
        elif which == "weight":
            w = d.pick([w[:0], w.to(torch.int64), w[0]])
        elif which == "e":
            e = d.pick([e.to(torch.int32), e[None]])
        else:
            method = "gram"
        names = {"threshold-dtype": "threshold", "gram-threshold": "threshold|gram"}.get(which, which)
        return Case(lambda: api(e, w, b, thr, method=method), lambda: ref.edit_norms(e, w, b, thr), names)

    return locals()


def assign_prototypes_cases(bk):
    def valid(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        method = d.pick(["fused", "gram", "auto", "cached"])
        thr = d.pick([None, 0.5]) if method == "fused" else None
        gram = pyeditor.prototype_gram(w, b) if method == "cached" else None
        kw = dict(backend=bk, method="auto" if method == "cached" else method, gram=gram)
        return Case(lambda: tuple(pyeditor.assign_prototypes(e, w, b, thr, **kw)),
                    lambda: tuple(ref.assign_prototypes(e, w, b, thr)), valid=True,
                    tol=reduction_tolerance(dt, dim * n))

    def gram_bad(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        form = d.pick(["tensor", "other-editors"])
        gram = (pyeditor.prototype_gram(w, b).gram if form == "tensor"
                else pyeditor.prototype_gram(d.rnd(P + 1, dim + 1, n, dtype=dt)))
        return Case(lambda: pyeditor.assign_prototypes(e, w, b, backend=bk, gram=gram), None, "gram")

    def empty_editors(d):
        e, w, b, idx, dims = hyper_inputs(d)
        return Case(lambda: pyeditor.assign_prototypes(e, w[:0], b[:0], backend=bk),
                    lambda: ref.assign_prototypes(e, w[:0], b[:0]), "weight")

    return locals()
