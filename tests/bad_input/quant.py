"""Cases of quantize_channelwise, dequantize, packed_linear and the strategy codes."""
from __future__ import annotations

import math

import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.quant import PackedWeight
from pyeditor.testing import reduction_tolerance

from .core import BAD_FLOAT, Case, Draw, bad_dtype, poke, strided

def weight_inputs(d: Draw, lo: int = 1):
    n, k = d.int(lo, 20), d.int(lo, 70)
    bits = d.pick([2, 4, 6, 8, "mixed"])
    b = torch.tensor([d.pick([2, 4, 6, 8]) for _ in range(n)]) if bits == "mixed" else bits
    return d.rnd(n, k), b, d.pick([None, 32, 64, 128]), (n, k)


def quantize_cases(bk):
    def roundtrip(w, bits, gs):
        return pyeditor.dequantize(pyeditor.quantize_channelwise(w, bits, gs), backend=bk)

    def ref_roundtrip(w, bits, gs):
        return ref.dequantize(ref.quantize_channelwise(w, bits, gs))

    def valid(d):
        w, bits, gs, (n, k) = weight_inputs(d)
        form = d.pick(["strided", "near-float32-max", "float64", "constant", "empty-in"])
        if form == "strided":
            w = strided(w)
        elif form == "near-float32-max":
            w = (w.sign() + (w == 0)) * d.pick([3e38, 3.4028235e38, 1.7e38]) * (w.abs() > 0.3) + w
        elif form == "float64":
            w = w.double()
        elif form == "constant":
            w = torch.full_like(w, float(w[0, 0]))
        else:
            w = w[:, :0]
        return Case(lambda: roundtrip(w, bits, gs), lambda: ref_roundtrip(w, bits, gs), valid=True, tol=(0.0, 0.0))

    def bad(d):
        w, bits, gs, (n, k) = weight_inputs(d)
        which = d.pick(["group_size", "bits", "bits-shape", "weight", "weight-rank", "weight-nonfinite", "method"])
        method = "minmax"
        if which == "group_size":
            gs = d.pick([0, 16, 48, 256, -32, True, 32.0, "64"])
        elif which == "bits":
            bits = d.pick([3, 0, -2, 16, torch.full((n,), 5), torch.full((n,), 4.5), torch.ones(n, dtype=torch.bool)])
        elif which == "bits-shape":
            bits = torch.full((n + 1,), 4)
        elif which == "weight":
            w = bad_dtype(w, d.pick(BAD_FLOAT))
        elif which == "weight-rank":
            w = d.pick([w[0], w[None]])
        elif which == "weight-nonfinite":
            w = poke(w, d.pick([math.nan, math.inf, -math.inf]), d)
        else:
            method = d.pick(["MinMax", "gptq"])
        names = {"bits-shape": "bits", "weight-rank": "weight", "weight-nonfinite": "weight"}.get(which, which)
        return Case(lambda: pyeditor.quantize_channelwise(w, bits, gs, method=method),
                    lambda: ref_roundtrip(w, bits, gs), names)

    return locals()


def packed_inputs(d: Draw, lo: int = 1):
    w, bits, gs, (n, k) = weight_inputs(d, lo)
    return pyeditor.quantize_channelwise(w, bits, gs), (n, k)


def corrupt_packed(p: PackedWeight, d: Draw):
    """(a PackedWeight with one inconsistent field, regex naming it)."""
    data, scale, zero, perm = p.tensors()
    form = d.pick(["truncated", "extra-bytes", "bits", "order", "rows", "perm-dup", "perm-range", "scale-shape",
                   "zero-dtype", "in-features", "out-features", "group_size"])
    buckets = [list(b) for b in p.buckets]
    kw = dict(in_features=p.in_features, out_features=p.out_features, group_size=p.group_size)
    if form == "truncated":
        data = data[:-d.int(1, data.numel())]
    elif form == "extra-bytes":
        data = torch.cat([data, data[:d.int(1, 64)]])
    elif form == "bits":
        buckets[0][0] = d.pick([3, 0, 16])
    elif form == "order":
        buckets[0][1] = 16
    elif form == "rows":
        buckets[-1][2] = d.pick([buckets[-1][2] + 16, 2 ** 62, -16, 7])
    elif form == "perm-dup":
        perm = perm.clone()
        perm[-1] = perm[0]
    elif form == "perm-range":
        perm = poke(perm, d.pick([p.out_features, -2, 32767]), d)
    elif form == "scale-shape":
        scale = scale[..., :-1]
    elif form == "zero-dtype":
        zero = zero.to(torch.int32)
    elif form == "in-features":
        kw["in_features"] = d.pick([p.in_features + 16, -1, 2 ** 50])
    elif form == "out-features":
        kw["out_features"] = d.pick([perm.numel() + 1, -1])
    else:
        kw["group_size"] = 32 if p.group_size is None else None
    bad = PackedWeight(data, scale, zero, perm, buckets, p.bits, kw["in_features"], kw["out_features"],
                       kw["group_size"])
    names = {"truncated": "data", "extra-bytes": "data", "bits": "bits", "order": "bucket", "rows": "bucket|rows|data",
             "perm-dup": "perm", "perm-range": "perm", "scale-shape": "scale", "zero-dtype": "zero",
             "in-features": "in_features|data|x has", "out-features": "out_features|rows|channels|bias",
             "group_size": "scale|group"}[form]
    return bad, names


def dequantize_cases(bk):
    def corrupt(d):
        p, _ = packed_inputs(d)
        bad, names = corrupt_packed(p, d)
        return Case(lambda: pyeditor.dequantize(bad, backend=bk), None, names)

    def not_packed(d):
        w = d.rnd(4, 8)
        obj = d.pick([w, ref.quantize_channelwise(w, 4), None])
        return Case(lambda: pyeditor.dequantize(obj, backend=bk), None, "packed")

    return locals()


def packed_linear_cases(bk):
    api = lambda *a, **k: pyeditor.packed_linear(*a, backend=bk, **k)  # noqa: E731

    def valid(d):
        p, (n, k) = packed_inputs(d, lo=0)
        x = d.rnd(d.int(1, 3), k, dtype=d.float_dtype())
        bias = d.pick([None, strided(d.rnd(n)), d.rnd(n)])
        form = d.pick(["strided", "stride0", "batched", "nan", "16-bit", "empty"])
        if form == "strided":
            x = strided(x)
        elif form == "stride0":
            x = x[:1].expand(3, k)
        elif form == "batched":
            x = x.reshape(1, -1, k).expand(2, -1, k)
        elif form == "nan":
            x = poke(x, math.nan, d)
        elif form == "16-bit":
            x = x.to(d.pick([torch.float16, torch.bfloat16]))
            bias = None if bias is None else bias.to(x.dtype)
        else:
            x = x[:0]
        qw = p.quantized()
        return Case(lambda: api(x, p, bias), lambda: ref.packed_linear(x, qw, bias), valid=True,
                    tol=reduction_tolerance(x.dtype, k))

    def bad(d):
        p, (n, k) = packed_inputs(d)
        x, bias, fast = d.rnd(2, k), None, False
        which = d.pick(["x", "x-features", "x-rank", "bias", "bias-dtype", "fast", "packed"])
        names = which
        if which == "x":
            x = bad_dtype(x, d.pick(BAD_FLOAT))
        elif which == "x-features":
            x, names = d.rnd(2, k + d.int(1, 20)), "input features|\\bx\\b"
        elif which == "x-rank":
            x, names = x[0, 0], "\\bx\\b"
        elif which == "bias":
            bias = d.pick([d.rnd(n + 1), d.rnd(1, n)])
        elif which == "bias-dtype":
            bias, names = d.rnd(n).to(d.pick(BAD_FLOAT)), "bias"
        elif which == "fast":
            fast = d.pick([1, "yes", None])
        else:
            p, names = corrupt_packed(p, d)
        qw = None if which == "packed" else p.quantized()
        return Case(lambda: api(x, p, bias, fast=fast),
                    None if qw is None else (lambda: ref.packed_linear(x, qw, bias)), names)

    return locals()


def strategy_cases(bk):
    def encode(d):
        n = d.int(0, 9)
        bits = d.pick([torch.full((n,), 3), torch.full((n, 1), 4), torch.ones(n, dtype=torch.bool),
                       torch.full((n,), 4.0) + 0.5, [2, 4], torch.tensor([2, 4, 6, 8])[d.index(n, 4)]])
        return Case(lambda: pyeditor.encode_strategy(bits), lambda: ref.encode_strategy(bits), "bits")

    def decode(d):
        n = d.int(1, 9)
        codes = pyeditor.encode_strategy(torch.tensor([2, 4, 6, 8])[d.index(n, 4)])
        form = d.pick(["n-negative", "n-type", "length", "dtype", "padding", "valid-strided"])
        if form == "n-negative":
            n = -n
        elif form == "n-type":
            n = d.pick([float(n), None])
        elif form == "length":
            n = n + 4
        elif form == "dtype":
            codes = codes.to(torch.int32)
        elif form == "padding":
            codes = codes.clone()
            codes[-1] |= 0xC0
            n = 4 * codes.numel() - 1 if n % 4 == 0 else n
        else:
            codes = strided(codes)
        names = "n_channels|codes" if form.startswith("n-") or form == "length" else "codes"
        return Case(lambda: pyeditor.decode_strategy(codes, n), lambda: ref.decode_strategy(codes, n), names,
                    valid=form == "valid-strided")

    def allocate(d):
        C = d.int(1, 8)
        s, beta, imp = d.rnd(C), 0.25, None
        form = d.pick(["beta", "sensitivity-nan", "sensitivity-dtype", "importance", "valid-strided"])
        if form == "beta":
            beta = d.pick([-0.1, 0.6, math.nan, "0.2", True])
        elif form == "sensitivity-nan":
            s = poke(s, math.nan, d)
        elif form == "sensitivity-dtype":
            s = d.pick([s.to(torch.int64), s[None]])
        elif form == "importance":
            s, imp = [s, d.rnd(C + 1)], d.pick([d.rnd(3), poke(d.rnd(2), math.nan, d), d.rnd(2).int()])
        else:
            s = strided(s)
        names = {"beta": "beta", "importance": "layer_importance"}.get(form, "sensitivity")
        return Case(lambda: pyeditor.allocate_bits(s, beta, imp), lambda: ref.allocate_bits(s, beta, imp), names,
                    valid=form == "valid-strided")

    return locals()
