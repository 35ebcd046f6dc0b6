"""Cases of apply_edit and edited_linear."""
from __future__ import annotations

import math

import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import reduction_tolerance

from .core import BAD_FLOAT, Case, Draw, bad_dtype, poke, strided

def edit_inputs(d: Draw, lo: int = 1, half: bool = False):
    """lo=0: empty batches and matrices too; half: 16-bit floats too."""
    P, B, R, C = d.int(1, 3), d.int(lo, 4), d.int(lo, 5), d.int(lo, 6)
    dt = d.float_dtype(half)
    theta, delta = d.rnd(P, R, C, dtype=dt), d.rnd(B, R, C, dtype=dt, scale=2)
    return theta, delta, d.index(B, P), P, B, R, C, dt


def broadcast_out(B, R, C, dt):
    """An out= buffer whose elements share one memory location (of the wrong shape if it has one
    element, where sharing is harmless)."""
    return torch.empty(1, dtype=dt).expand(B, R, C) if B * R * C > 1 else torch.empty(2, R, C, dtype=dt)


def apply_edit_cases(bk):
    api = lambda *a, **k: pyeditor.apply_edit(*a, backend=bk, **k)  # noqa: E731

    def valid_strided(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        form = d.pick(["strided", "stride0-index", "stride0-delta", "strided-threshold"])
        thr = 0.5
        if form == "strided":
            theta, delta, idx = strided(theta), strided(delta), strided(idx)
        elif form == "stride0-index":
            idx = torch.tensor([d.int(0, P - 1)]).expand(B)
        elif form == "stride0-delta":
            delta = delta[:1].expand(B, R, C)
        else:
            thr = strided(d.rnd(B).abs())
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx), valid=True)

    def valid_empty_or_16bit(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d, lo=0, half=True)
        thr = d.pick([0.5, d.rnd(B).abs()])
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx), valid=True)

    def nan_inf(d):
        theta, delta, idx, *_ = edit_inputs(d)
        theta = poke(theta, d.pick([math.nan, math.inf]), d)
        delta = poke(poke(delta, math.nan, d), -math.inf, d)
        thr = d.pick([0.5, math.inf, 0.0])
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx), valid=True)

    def huge_threshold(d):
        theta, delta, idx, *_ = edit_inputs(d)
        thr = d.pick([1e39, 3.5e38, 10 ** 400, torch.tensor(1e39, dtype=torch.float64), torch.tensor(10 ** 18)])
        # T above every finite edit: no clip (saturates to +inf), as the reference with T = inf
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, math.inf, idx),
                    valid=True)

    def dtype(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        which = d.pick(["theta", "delta", "proto_index", "threshold", "threshold-py"])
        thr = 0.5
        if which == "theta":
            theta = bad_dtype(theta, d.pick(BAD_FLOAT))
        elif which == "delta":
            delta = delta.to(d.pick([torch.float16, torch.int32, torch.complex64] +
                                    [torch.float64 if dt == torch.float32 else torch.float32]))
        elif which == "proto_index":
            idx = idx.to(d.pick([torch.float32, torch.bool, torch.complex64]))
        elif which == "threshold":
            thr = d.pick([torch.tensor(True), torch.tensor(0.5 + 1j), torch.ones(B, dtype=torch.bool),
                          torch.full((B,), 0.5 + 0.5j)])
        else:
            thr = d.pick([True, 0.5 + 1j, "0.5", None])
        name = "threshold" if which.startswith("threshold") else which
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx), name)

    def rank(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        which = d.pick(["theta", "delta", "proto_index", "threshold"])
        thr = 0.5
        if which == "theta":
            theta = d.pick([theta[0, 0], theta.unsqueeze(0), theta.reshape(-1)])
        elif which == "delta":
            delta = delta.unsqueeze(0)
        elif which == "proto_index":
            idx = idx.view(B, 1)
        else:
            thr = d.rnd(B, 2).abs()
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx),
                    which if which != "theta" else "theta|proto_index")

    def shape(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        which = d.pick(["delta", "proto_index", "threshold"])
        thr = 0.5
        if which == "delta":
            delta = d.rnd(B, R + 1, C, dtype=dt)
        elif which == "proto_index":
            idx = d.index(B + d.int(1, 2), P)
        else:
            thr = d.rnd(B + 1).abs()
        return Case(lambda: api(theta, delta, thr, idx), lambda: ref.apply_edit(theta, delta, thr, idx),
                    {"delta": "delta", "proto_index": "proto_index|delta", "threshold": "threshold"}[which])

    def index_range(d):
        theta, delta, idx, P, B, *_ = edit_inputs(d)
        idx = poke(idx, d.pick([P, P + 7, -1, -P - 1, 2 ** 62]), d)
        return Case(lambda: api(theta, delta, 0.5, idx), None, "proto_index")

    def threshold_value(d):
        theta, delta, idx, P, B, *_ = edit_inputs(d)
        thr = d.pick([-0.5, math.nan, -math.inf, torch.tensor(-1.0), poke(d.rnd(B).abs(), math.nan, d),
                      poke(d.rnd(B).abs(), -2.0, d)])
        return Case(lambda: api(theta, delta, thr, idx), None, "threshold")

    def out_bad(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        form = d.pick(["small", "dtype", "stride0", "shape", "int"])
        out = {"small": lambda: torch.empty(max(B - 1, 0), R, C, dtype=dt),
               "dtype": lambda: torch.empty(B, R, C, dtype=torch.float16),
               "stride0": lambda: broadcast_out(B, R, C, dt),
               "shape": lambda: torch.empty(B, C + 1, R, dtype=dt),
               "int": lambda: torch.empty(B, R, C, dtype=torch.int32)}[form]()
        return Case(lambda: api(theta, delta, 0.5, idx, out=out), None, "out")

    def out_valid(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        out = strided(torch.empty(B, R, C, dtype=dt))
        return Case(lambda: api(theta, delta, 0.5, idx, out=out), lambda: ref.apply_edit(theta, delta, 0.5, idx),
                    valid=True)

    return locals()


def linear_inputs(d: Draw, lo: int = 1, half: bool = False):
    P, B, S, n_in, n_out = d.int(1, 3), d.int(lo, 3), d.int(lo, 3), d.int(lo, 5), d.int(lo, 5)
    dt = d.float_dtype(half)
    x, theta, delta = d.rnd(B, S, n_in, dtype=dt), d.rnd(P, n_in, n_out, dtype=dt), d.rnd(B, n_in, n_out, dtype=dt)
    bias = d.rnd(P, n_out, dtype=dt)
    return x, theta, delta, bias, d.index(B, P), (P, B, S, n_in, n_out, dt)


def edited_linear_cases(bk):
    api = lambda *a: pyeditor.edited_linear(*a, backend=bk)  # noqa: E731

    def tol(dims):
        return reduction_tolerance(dims[-1], dims[3])

    def valid_strided(d):
        x, theta, delta, bias, idx, dims = linear_inputs(d)
        P, B = dims[0], dims[1]
        form = d.pick(["strided", "stride0-index", "strided-threshold", "bias-1d"])
        thr = 0.5
        if form == "strided":
            x, theta, delta, bias, idx = (strided(t) for t in (x, theta, delta, bias, idx))
        elif form == "stride0-index":
            idx = torch.tensor([d.int(0, P - 1)]).expand(B)
        elif form == "strided-threshold":
            thr = strided(d.rnd(B).abs())
        else:
            bias = strided(bias[0])
        return Case(lambda: api(x, theta, delta, thr, bias, idx),
                    lambda: ref.edited_linear(x, theta, delta, thr, bias, idx), valid=True, tol=tol(dims))

    def valid_empty_or_16bit(d):
        x, theta, delta, bias, idx, dims = linear_inputs(d, lo=0, half=True)
        bias = d.pick([bias, None, bias[0]])
        return Case(lambda: api(x, theta, delta, 0.5, bias, idx),
                    lambda: ref.edited_linear(x, theta, delta, 0.5, bias, idx), valid=True, tol=tol(dims))

    def nan_inf(d):
        x, theta, delta, bias, idx, dims = linear_inputs(d)
        x = poke(x, math.nan, d)
        delta = poke(delta, d.pick([math.inf, -math.inf, math.nan]), d)
        return Case(lambda: api(x, theta, delta, 0.5, bias, idx),
                    lambda: ref.edited_linear(x, theta, delta, 0.5, bias, idx), valid=True, tol=tol(dims))

    def huge_threshold(d):
        x, theta, delta, bias, idx, dims = linear_inputs(d)
        thr = d.pick([1e39, 10 ** 400, torch.tensor(1e39, dtype=torch.float64)])
        return Case(lambda: api(x, theta, delta, thr, bias, idx),
                    lambda: ref.edited_linear(x, theta, delta, math.inf, bias, idx), valid=True, tol=tol(dims))

    def dtype(d):
        x, theta, delta, bias, idx, dims = linear_inputs(d)
        which = d.pick(["x", "theta", "delta", "bias", "proto_index", "threshold"])
        args = dict(x=x, theta=theta, delta=delta, bias=bias, proto_index=idx, threshold=0.5)
        if which == "proto_index":
            args[which] = idx.float()
        elif which == "threshold":
            args[which] = d.pick([torch.tensor(True), torch.tensor(1j), True, 1j])
        else:
            args[which] = bad_dtype(args[which], d.pick(BAD_FLOAT + [torch.float16]))
        a = (args["x"], args["theta"], args["delta"], args["threshold"], args["bias"], args["proto_index"])
        return Case(lambda: api(*a), lambda: ref.edited_linear(*a), which if which != "x" else "x|theta")

    def shape(d):
        x, theta, delta, bias, idx, (P, B, S, n_in, n_out, dt) = linear_inputs(d)
        which = d.pick(["x", "theta", "delta", "bias", "proto_index", "threshold"])
        args = dict(x=x, theta=theta, delta=delta, bias=bias, proto_index=idx, threshold=0.5)
        args[which] = {"x": lambda: d.rnd(B, S, n_in + 1, dtype=dt).squeeze(0) if d.int(0, 1) else x[0],
                       "theta": lambda: d.rnd(P, n_in + 1, n_out, dtype=dt),
                       "delta": lambda: d.rnd(B + 1, n_in, n_out, dtype=dt),
                       "bias": lambda: d.rnd(P, n_out + 1, dtype=dt),
                       "proto_index": lambda: d.index(B + 1, P),
                       "threshold": lambda: d.rnd(B + 1).abs()}[which]()
        a = (args["x"], args["theta"], args["delta"], args["threshold"], args["bias"], args["proto_index"])
        names = {"x": "x|theta|delta", "theta": "theta|x", "delta": "delta|x", "bias": "bias",
                 "proto_index": "proto_index|batch", "threshold": "threshold"}[which]
        return Case(lambda: api(*a), lambda: ref.edited_linear(*a), names)

    def index_range(d):
        x, theta, delta, bias, idx, (P, *_) = linear_inputs(d)
        idx = poke(idx, d.pick([P, -1, 2 ** 40]), d)
        return Case(lambda: api(x, theta, delta, 0.5, bias, idx), None, "proto_index")

    def threshold_value(d):
        x, theta, delta, bias, idx, (P, B, *_) = linear_inputs(d)
        thr = d.pick([-1.0, math.nan, poke(d.rnd(B).abs(), math.nan, d)])
        return Case(lambda: api(x, theta, delta, thr, bias, idx), None, "threshold")

    return locals()
