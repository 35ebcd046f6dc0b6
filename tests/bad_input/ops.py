"""Cases of the registered ops called directly: what compiled code reaches without the public
functions' checks."""
from __future__ import annotations

import math

import torch

from pyeditor import reference as ref
from pyeditor.testing import reduction_tolerance

from .core import Case, poke, strided
from .edit import broadcast_out, edit_inputs, linear_inputs
from .hyper import hyper_inputs
from .quant import packed_inputs
from .search import search_inputs

def direct_op_cases(bk):
    """torch.ops.pyeditor.X (cpu) / X_triton: what compiled code reaches without the public
    functions' checks. Errors are RuntimeErrors naming the argument."""
    sfx = "_triton" if bk == "triton" else ""

    def op(name):
        return getattr(torch.ops.pyeditor, name + sfx)

    def apply_edit(d):
        theta, delta, idx, P, B, R, C, dt = edit_inputs(d)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        thr, out = torch.tensor(0.5, dtype=acc), None
        form = d.pick(["valid-strided", "index", "index-dtype", "threshold-shape", "threshold-value",
                       "out-small", "out-stride0", "out-alias", "delta-shape"])
        names, valid = form.split("-")[0], False
        if form == "valid-strided":
            theta, delta, idx, thr = strided(theta), strided(delta), strided(idx), strided(d.rnd(B, dtype=acc).abs())
            valid = True
        elif form == "index":
            idx, names = poke(idx, d.pick([P, -1, 2 ** 62]), d), "proto_index"
        elif form == "index-dtype":
            idx, names = idx.to(d.pick([torch.int32, torch.float32])), "proto_index"
        elif form == "threshold-shape":
            thr, names = d.rnd(B + 1, dtype=acc).abs(), "threshold"
        elif form == "threshold-value":
            thr, names = poke(d.rnd(B, dtype=acc).abs(), d.pick([-1.0, math.nan]), d), "threshold"
        elif form == "out-small":
            out = torch.empty(B + 1, R, C, dtype=dt)
        elif form == "out-stride0":
            out, names = broadcast_out(B, R, C, dt), "out|memory location"
        elif form == "out-alias":
            out, idx, names = theta, torch.arange(P).flip(0), "out|overlap|memory location"
            delta = delta[:1].expand(P, R, C).contiguous()
        else:
            delta = d.rnd(B, R, C + 1, dtype=dt)
        want = lambda: ref.apply_edit(theta, delta, thr, idx)  # noqa: E731
        if out is None:
            return Case(lambda: op("apply_edit")(theta, delta, thr, idx), want, names, valid=valid)
        return Case(lambda: op("apply_edit_out")(theta, delta, thr, idx, out), None, names)

    def edited_linear(d):
        x, theta, delta, bias, idx, (P, B, S, n_in, n_out, dt) = linear_inputs(d)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        thr = torch.tensor(0.5, dtype=acc)
        form = d.pick(["valid-strided", "index", "threshold-dtype", "threshold-shape", "bias-shape", "delta-shape"])
        names, valid = form.split("-")[0], form == "valid-strided"
        if valid:
            x, theta, delta, bias = strided(x), strided(theta), strided(delta), strided(bias)
            idx = torch.tensor([d.int(0, P - 1)]).expand(B)
        elif form == "index":
            idx, names = poke(idx, d.pick([P, -1]), d), "proto_index"
        elif form == "threshold-dtype":
            thr = thr.to(torch.float16)
        elif form == "threshold-shape":
            thr = d.rnd(B + 1, dtype=acc).abs()
        elif form == "bias-shape":
            bias = d.rnd(P + 1, n_out, dtype=dt)
        else:
            delta = d.rnd(B, n_in, n_out + 1, dtype=dt)
        return Case(lambda: op("edited_linear")(x, theta, delta, thr, bias, idx),
                    lambda: ref.edited_linear(x, theta, delta, thr, bias, idx), names, valid=valid,
                    tol=reduction_tolerance(dt, n_in))

    def hyper(d):
        e, w, b, idx, (P, B, dim, n, dt) = hyper_inputs(d)
        form = d.pick(["valid-stride0", "index", "bias-shape", "weight-shape", "sizes-negative", "sizes-sum",
                       "sumsq-threshold"])
        names, valid = form.split("-")[0], form == "valid-stride0"
        if valid:
            idx = torch.tensor([d.int(0, P - 1)]).expand(B)
        elif form == "index":
            idx = poke(idx, d.pick([P, -1, 2 ** 62]), d)
        elif form == "bias-shape":
            b = d.rnd(P, n + 1, dtype=dt)
        elif form == "weight-shape":
            w = d.rnd(P, dim + 1, n, dtype=dt)
        elif form.startswith("sizes"):
            sizes = [-1, n + 1] if form == "sizes-negative" else [n + 1]
            e3 = e.expand(len(sizes), B, dim)
            return Case(lambda: op("hyper_matmul_heads")(e3, w, sizes, b, idx), None, "sizes")
        else:
            thr = d.pick([d.rnd(B + 1).abs(), torch.tensor(0.5, dtype=torch.float16), torch.tensor(-1.0)])
            return Case(lambda: op("edit_sumsq")(e, w, b, thr), None, "threshold")
        return Case(lambda: op("hyper_matmul")(e, w, b, idx), lambda: ref.hyper_matmul(e, w, b, idx), names,
                    valid=valid, tol=reduction_tolerance(dt, dim))

    def quant(d):
        p, (n, k) = packed_inputs(d)
        data, scale, zero, perm = p.tensors()
        bk_, gs, x, bias = list(p.flat_buckets), p.op_group_size, d.rnd(2, k), None
        form = d.pick(["valid-strided-bias", "truncated", "bits", "rows-overflow", "in-negative", "in-huge",
                       "out-too-many", "group_size", "x-features", "perm-dtype", "modes"])
        names, valid, k_in, n_out, fast, bf16 = "data", form.startswith("valid"), k, n, False, False
        if valid:
            bias = strided(d.rnd(n))
        elif form == "truncated":
            data = data[:-d.int(1, data.numel())]
        elif form == "bits":
            bk_[0], names = d.pick([3, 10]), "bits"
        elif form == "rows-overflow":
            bk_[2], names = 2 ** 62, "rows|2\\^40|data"
        elif form == "in-negative":
            k_in, names = -k, "in_features"
        elif form == "in-huge":
            k_in, names = 2 ** 61, "in_features|2\\^40"
        elif form == "out-too-many":
            n_out, names = perm.numel() + 1, "rows|channels"
        elif form == "group_size":
            gs, names = d.pick([16, 48, -1]), "group_size"
        elif form == "x-features":
            # any other width, also one the padded data would hold (k + 1 within a block)
            x, names = d.rnd(2, k + d.pick([1, 16 * d.int(1, 3)])), "features"
        elif form == "modes":  # int8 and bfloat16 activations at once
            fast, bf16, names = True, True, "fast.*bf16"
        else:
            perm, names = perm.to(torch.int64), "perm"
        qw = p.quantized()
        if d.int(0, 1) or valid or form == "modes":
            return Case(lambda: op("quant_linear")(x, data, scale, zero, perm, bk_, k_in, n_out, bias, fast, gs, bf16),
                        lambda: ref.packed_linear(x, qw, bias), names, valid=valid, tol=reduction_tolerance(x.dtype, k))
        return Case(lambda: op("quant_dequantize")(data, scale, zero, perm, bk_, k_in, n_out, gs),
                    lambda: ref.dequantize(qw), names, valid=valid)

    def search(d):
        x, p, (B, N, dim, dt) = search_inputs(d)
        form = d.pick(["valid-strided", "k", "metric", "features"])
        k, metric, names = 1, "l2", form
        if form == "valid-strided":
            x, p, k = strided(x), strided(p), d.int(1, N)
        elif form == "k":
            k = d.pick([0, -1, N + 1])
        elif form == "metric":
            metric = d.pick(["L2", "l1"])
        else:
            p = d.rnd(N, dim + 1, dtype=dt)
        return Case(lambda: op("nearest_prototype")(x, p, k, metric), lambda: ref.nearest_prototype(x, p, k, metric),
                    names, valid=form == "valid-strided", tol=reduction_tolerance(dt, dim))

    return locals()
