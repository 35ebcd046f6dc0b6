"""`python -m pyeditor verify`: every op with kernels, on every backend this machine can run,
against pyeditor.reference, over a grid of shapes and dtypes (forward and gradients).

Pass rule per row: every element has abs(got - ref) <= atol + rtol * abs(ref) (torch.isclose; NaN
exactly where the reference has NaN), with atol and rtol from pyeditor.testing's table (scaled by
sqrt(K) for sums over K products; the packed_linear int8act and bf16 rows add their mode's bound,
(max|x_row| / 254) * sum_k |W[n, k]| and sum_k (2^-8 |x_k| + 2^-134) |W[n, k]|, at its largest
over the case); rows whose rule starts "idx="
also need indices or labels equal to the reference's. Progress goes to stderr, one line per op
and backend; the table to stdout; exit 1 on any failure.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from . import backends, reference
from .edit import apply_edit
from .testing import errors, reduction_tolerance, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHORT_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
TABLE_WIDTH = 110


@dataclass
class Check:
    op: str  # the case's name; its first word is the op that --op selects
    shape: str
    dtype: torch.dtype
    # (backend, device) -> (actual, expected) or (actual, expected, {name: equal?}) where the dict
    # holds results that must match exactly (indices, labels)
    run: Callable[[str, str], tuple]
    # (atol, rtol) instead of the dtype's row, e.g. reduction_tolerance; or a function returning
    # them, for a bound that depends on the case's data (the int8act mode's)
    tol: Optional[tuple | Callable[[], tuple]] = None


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    abs_err: float
    rel_err: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""
    exact: dict = field(default_factory=dict)  # name -> equal to the reference's

    @property
    def family(self) -> str:
        return self.op.split()[0]

    @property
    def rule(self) -> str:
        close = "exact" if self.atol == 0 and self.rtol == 0 else f"abs<={self.atol:.0e}+{self.rtol:.1e}|ref|"
        return ("idx= " if self.exact else "") + close

    def as_json(self) -> dict:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  (strict JSON has no NaN)
        return {"op": self.family, "case": self.op, "backend": self.backend, "dtype": self.dtype, "shape": self.shape,
                "errors": {"max_abs": finite(self.abs_err), "max_rel": finite(self.rel_err)},
                "tolerances": {"atol": self.atol, "rtol": self.rtol}, "rule": self.rule,
                "exact": self.exact, "pass": self.passed, "note": self.note}


def _mode_check(setup, mode: str, bound, dtype: torch.dtype, k: int):
    """(run, tolerance) of packed_linear in a compute mode against the exact reference: exact
    mode's tolerance plus the largest bound of the case's outputs (int8act:
    (max|x_row| / 254) * sum_k |W[n, k]|; bf16: sum_k (2^-8 |x_k| + 2^-134) |W[n, k]|)."""
    from . import quant

    def run(backend, device):
        p, qw, x, b = setup(device)
        got = quant.packed_linear(x.to(device), p.to(device), b.to(device), mode=mode, backend=backend)
        return got.cpu(), reference.packed_linear(x, qw, b)

    def tol():
        _, qw, x, _ = setup("cpu")
        atol, rtol = reduction_tolerance(dtype, k)
        return atol + float(bound(x, reference.dequantize(qw)).max()), rtol

    return run, tol


def _rand(shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _edit_checks(small: bool) -> Iterator[Check]:
    shapes = [((33, 65), (33, 65), None), ((4, 17, 31), (9, 17, 31), [3, 0, 1, 2, 2, 1, 0, 3, 3]),
              ((17, 31), (5, 17 * 31), None)]
    if not small:
        shapes += [((8, 128, 257), (64, 128, 257), [i % 8 for i in range(64)]), ((1024, 1024), (1024, 1024), None)]
    for dtype in DTYPES:
        for theta_shape, delta_shape, index in shapes:
            label = f"theta{list(theta_shape)} delta{list(delta_shape)}" + (" idx" if index else "")

            def run(backend, device, theta_shape=theta_shape, delta_shape=delta_shape, index=index, dtype=dtype):
                theta = _rand(theta_shape, dtype, device, seed=1)
                delta = _rand(delta_shape, dtype, device, scale=2.0, seed=2)
                delta.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
                idx = None if index is None else torch.tensor(index, device=device)
                return apply_edit(theta, delta, 0.5, idx, backend=backend), reference.apply_edit(theta, delta, 0.5, idx)

            yield Check("apply_edit", label, dtype, run)

            def run_grad(backend, device, theta_shape=theta_shape, delta_shape=delta_shape, index=index, dtype=dtype):
                results = []
                for fn in (lambda t, d, i: apply_edit(t, d, 0.5, i, backend=backend),
                           lambda t, d, i: reference.apply_edit(t, d, 0.5, i)):
                    theta = _rand(theta_shape, dtype, device, seed=1).requires_grad_()
                    delta = _rand(delta_shape, dtype, device, scale=2.0, seed=2).requires_grad_()
                    idx = None if index is None else torch.tensor(index, device=device)
                    out = fn(theta, delta, idx)
                    w = _rand(out.shape, dtype, device, seed=3)
                    (out * w).sum().backward()
                    results.append(torch.cat([theta.grad.flatten(), delta.grad.flatten()]))
                return results[0], results[1]

            yield Check("apply_edit (grad)", label, dtype, run_grad)


def _search_checks(small: bool) -> Iterator[Check]:
    """nearest_prototype (issue 5): indices must equal the reference's exactly, distances
    within the dtype's tolerance; clustered data offset far from 0."""
    from .search import nearest_prototype

    shapes = [(24, 40, 3, 1e4), (24, 40, 64, 300.0)] if small else \
        [(24, 40, 3, 1e4), (500, 70, 64, 1e4), (300, 50, 257, 30.0)]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for B, N, d, off in shapes:
            for metric in ("l2", "ip", "cosine"):
                def run(backend, device, B=B, N=N, d=d, off=off, metric=metric, dtype=dtype):
                    g = torch.Generator().manual_seed(B + d)
                    c = torch.randn(6, d, generator=g) * 3
                    p = c[torch.randint(0, 6, (N,), generator=g)] + 0.5 * torch.randn(N, d, generator=g) + off
                    x = c[torch.randint(0, 6, (B,), generator=g)] + 0.5 * torch.randn(B, d, generator=g) + off
                    p[N // 2] = p[1]
                    x, p = x.to(dtype), p.to(dtype)
                    dist, idx = nearest_prototype(x.to(device), p.to(device), 2, metric, backend=backend)
                    rd, ri = reference.nearest_prototype(x, p, 2, metric)
                    return dist.cpu(), rd, {"indices": torch.equal(idx.cpu(), ri)}

                yield Check(f"nearest_prototype {metric}", f"x[{B},{d}] P[{N}] +{off:g}", dtype, run)


# Each op family adds a `Check` generator (small shapes when given True) to CHECKS; the table,
# JSON, --op names and exit code come for free.
CHECKS: list[Callable[[bool], Iterator[Check]]] = [_edit_checks]
CHECKS.append(_search_checks)  # issue 5


# ---------------------------------------------------------------- packed low-bit weights (quant)
def _quant_checks(small: bool) -> Iterator[Check]:
    from . import quant

    shapes = [((1, 50), 37), ((20, 33), 21), ((2, 3, 17), 1)]
    if not small:
        shapes += [((1, 4096), 512), ((64, 1000), 300)]
    for dtype in DTYPES:
        for x_shape, n in shapes:
            k = x_shape[-1]
            label = f"x{list(x_shape)} out={n} mixed bits"

            def setup(device, x_shape=x_shape, n=n, k=k, dtype=dtype):
                g = torch.Generator().manual_seed(n)
                bits = torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (n,), generator=g)]
                w = _rand((n, k), torch.float32, "cpu", seed=4)
                return (quant.quantize_channelwise(w, bits), reference.quantize_channelwise(w, bits),
                        _rand(x_shape, dtype, "cpu", seed=5), _rand((n,), dtype, "cpu", seed=6))

            def run(backend, device, setup=setup, dtype=dtype, k=k):
                p, qw, x, b = setup(device)
                got = quant.packed_linear(x.to(device), p.to(device), b.to(device), backend=backend)
                return got.cpu(), reference.packed_linear(x, qw, b)

            yield Check("packed_linear", label, dtype, run, reduction_tolerance(dtype, k))

            def run_grad(backend, device, setup=setup, dtype=dtype, n=n):
                p, qw, x, b = setup(device)
                g = _rand((*x.shape[:-1], n), dtype, "cpu", seed=7)
                xa = x.detach().clone().to(device).requires_grad_()
                (quant.packed_linear(xa, p.to(device), backend=backend) * g.to(device)).sum().backward()
                xr = x.detach().clone().requires_grad_()
                (reference.packed_linear(xr, qw) * g).sum().backward()
                return xa.grad.cpu(), xr.grad

            yield Check("packed_linear (grad x)", label, dtype, run_grad, reduction_tolerance(dtype, n))

            # the other modes against the exact reference, within their bounds (float64 x computes
            # exact mode in int8act)
            for mode, bound in (("int8act", quant.int8act_error_bound), ("bf16", quant.bf16_error_bound)):
                if mode == "int8act" and dtype == torch.float64:
                    continue
                yield Check(f"packed_linear ({mode})", label, dtype, *_mode_check(setup, mode, bound, dtype, k))

        if dtype == torch.float32:
            def run_deq(backend, device):
                p, qw, _, _ = setup(device)
                return quant.dequantize(p.to(device), backend=backend).cpu(), reference.dequantize(qw)

            yield Check("dequantize (bit-exact)", f"[{n}, {k}] mixed bits", dtype, run_deq, (0.0, 0.0))

    # past 32767 channels the packed permutation is int32 instead of int16
    n_big = quant.PERM_INT16_CHANNELS + 1

    def run_big(backend, device):
        bits = torch.tensor([2, 8, 4, 6]).repeat(n_big // 4)
        w, x = _rand((n_big, 20), torch.float32, "cpu", seed=8), _rand((2, 20), torch.float32, "cpu", seed=9)
        p = quant.quantize_channelwise(w, bits).to(device)
        return (quant.packed_linear(x.to(device), p, backend=backend).cpu(),
                reference.packed_linear(x, reference.quantize_channelwise(w, bits)))

    yield Check("packed_linear (int32 perm)", f"x[2, 20] out={n_big} mixed bits", torch.float32, run_big,
                reduction_tolerance(torch.float32, 20))

    # an input 10^6 times the rest against codes at their zero point (weight 0): kernels that sum
    # centred codes, (q - z) x, as the reference does, keep the small rest of those outputs; four
    # rows, which every backend's kernels centre (PackedLinear's docstring names the CPU calls
    # that do not)
    for group in (None, 64):
        def run_huge(backend, device, group=group):
            bits = torch.tensor([2, 4, 6, 8]).repeat(16)
            w, x = _rand((64, 256), torch.float32, "cpu", seed=10), _rand((4, 256), torch.float32, "cpu", seed=11)
            w[::2, 7] = 0.0  # quantizes to its zero point
            x[:, 7] = 1e6
            p = quant.quantize_channelwise(w, bits, group).to(device)
            return (quant.packed_linear(x.to(device), p, backend=backend).cpu(),
                    reference.packed_linear(x, reference.quantize_channelwise(w, bits, group)))

        yield Check("packed_linear (huge input)", f"x[4, 256] x[:, 7]=1e6 g={group or 'K'}", torch.float32, run_huge,
                    reduction_tolerance(torch.float32, 256))


CHECKS.append(_quant_checks)
# ---------------------------------------------------------------- Persona serving ops (issue 4)
def _hyper_checks(small: bool) -> Iterator[Check]:
    from . import hyper

    # small inner dimensions keep fp32 sums within the shared elementwise tolerance
    linear = [(3, 4, 9, 13, 3, [2, 0, 1]), (2, 5, 12, 40, None, None)]
    gens = [(6, 8, 33, 3, [2, 0, 1, 1, 2, 0]), (5, 7, 20, 2, None)]
    if not small:
        linear.append((4, 3, 16, 300, 4, [3, 1, 0, 2]))  # grads sum over B*S rows: keep them few
        gens.append((10, 16, 70, 8, [i % 8 for i in range(10)]))  # d e sums over n: keep it short
    for dtype in DTYPES:
        for B, S, n_in, n_out, P, index in linear:
            label = f"x[{B},{S},{n_in}] theta{[P, n_in, n_out] if P else [n_in, n_out]}" + (" idx" if index else "")

            def inputs(device, B=B, S=S, n_in=n_in, n_out=n_out, P=P, index=index, dtype=dtype):
                x = _rand((B, S, n_in), dtype, device, seed=1)
                theta = _rand((P, n_in, n_out) if P else (n_in, n_out), dtype, device, seed=2)
                delta = _rand((B, n_in, n_out), dtype, device, scale=0.5, seed=3)
                bias = _rand((P, n_out) if P else (n_out,), dtype, device, seed=4)
                idx = None if index is None else torch.tensor(index, device=device)
                return x, theta, delta, bias, idx

            def run(backend, device, inputs=inputs):
                x, theta, delta, bias, idx = inputs(device)
                return (hyper.edited_linear(x, theta, delta, 0.5, bias, idx, backend=backend),
                        reference.edited_linear(x, theta, delta, 0.5, bias, idx))

            def run_grad(backend, device, inputs=inputs):
                results = []
                for fn in (lambda *a: hyper.edited_linear(*a, backend=backend), reference.edited_linear):
                    x, theta, delta, bias, idx = [t.requires_grad_() if t is not None and t.is_floating_point() else t
                                                  for t in inputs(device)]
                    out = fn(x, theta, delta, 0.5, bias, idx)
                    (out * _rand(out.shape, out.dtype, device, seed=5)).sum().backward()
                    results.append(torch.cat([t.grad.flatten().float() for t in (x, theta, delta, bias)]))
                return results[0], results[1]

            yield Check("edited_linear", label, dtype, run)
            yield Check("edited_linear (grad)", label, dtype, run_grad)
        for B, d, n, P, index in gens:
            label = f"e[{B},{d}] W[{P},{d},{n}]" + (" idx" if index else "")

            def hinputs(device, B=B, d=d, n=n, P=P, index=index, dtype=dtype):
                idx = None if index is None else torch.tensor(index, device=device)
                return (_rand((B, d), dtype, device, seed=1), _rand((P, d, n), dtype, device, seed=2),
                        _rand((P, n), dtype, device, seed=3), idx)

            def hrun(backend, device, hinputs=hinputs):
                e, w, b, idx = hinputs(device)
                return hyper.hyper_matmul(e, w, b, idx, backend=backend), reference.hyper_matmul(e, w, b, idx)

            def hrun_grad(backend, device, hinputs=hinputs):
                results = []
                for fn in (lambda *a: hyper.hyper_matmul(*a, backend=backend), reference.hyper_matmul):
                    e, w, b, idx = hinputs(device)
                    e, w, b = e.requires_grad_(), w.requires_grad_(), b.requires_grad_()
                    out = fn(e, w, b, idx)
                    (out * _rand(out.shape, out.dtype, device, seed=5)).sum().backward()
                    results.append(torch.cat([t.grad.flatten().float() for t in (e, w, b)]))
                return results[0], results[1]

            def norms(backend, device, hinputs=hinputs, dtype=dtype):
                e, w, b, _ = hinputs(device)
                got = hyper.edit_norms(e, w, b, 0.3, backend=backend, method="fused")
                # compared at the inputs' precision: the norms sum n squares of rounded products
                return got.to(dtype), reference.edit_norms(e, w, b, 0.3).to(dtype)

            yield Check("hyper_matmul", label, dtype, hrun)
            yield Check("hyper_matmul (grad)", label, dtype, hrun_grad)
            if index is None:
                yield Check("edit_norms (T=0.3)", label, dtype, norms)


CHECKS.append(_hyper_checks)  # issue 4


def _hyper_heads_checks(small: bool) -> Iterator[Check]:
    """hyper_matmul_heads: the heads of one editor in one launch, forward and gradients."""
    from . import hyper

    cases = [(6, 8, [20, 5, 33], 3, [2, 0, 1, 1, 2, 0]), (5, 7, [9, 4], 2, None)]
    if not small:
        cases.append((10, 16, [70, 1, 12], 8, [i % 8 for i in range(10)]))
    for dtype in DTYPES:
        for B, d, sizes, P, index in cases:
            label = f"e[{len(sizes)},{B},{d}] heads{sizes} P{P}" + (" idx" if index else "")

            def inputs(device, B=B, d=d, sizes=sizes, P=P, index=index, dtype=dtype):
                idx = None if index is None else torch.tensor(index, device=device)
                return (_rand((len(sizes), B, d), dtype, device, seed=1), _rand((P, d, sum(sizes)), dtype, device, seed=2),
                        _rand((P, sum(sizes)), dtype, device, seed=3), idx)

            def run(backend, device, inputs=inputs, sizes=sizes):
                e, w, b, idx = inputs(device)
                return (torch.cat(hyper.hyper_matmul_heads(e, w, sizes, b, idx, backend=backend), -1),
                        torch.cat(reference.hyper_matmul_heads(e, w, sizes, b, idx), -1))

            def run_grad(backend, device, inputs=inputs, sizes=sizes):
                results = []
                for fn in (lambda *a: hyper.hyper_matmul_heads(*a, backend=backend), reference.hyper_matmul_heads):
                    e, w, b, idx = inputs(device)
                    e, w, b = e.requires_grad_(), w.requires_grad_(), b.requires_grad_()
                    out = torch.cat(fn(e, w, sizes, b, idx), -1)
                    (out * _rand(out.shape, out.dtype, device, seed=5)).sum().backward()
                    results.append(torch.cat([t.grad.flatten().float() for t in (e, w, b)]))
                return results[0], results[1]

            yield Check("hyper_matmul_heads", label, dtype, run)
            yield Check("hyper_matmul_heads (grad)", label, dtype, run_grad)


CHECKS.append(_hyper_heads_checks)  # issue 4: grouped heads


def _kmeans_checks(small: bool) -> Iterator[Check]:
    """kmeans on the search kernels against the reference's Lloyd loop: labels exactly, centroids
    and inertia (last element) within the tolerance of a sum over d."""
    from .search import kmeans

    shapes = [(60, 4, 5, 4)] if small else [(60, 4, 5, 4), (400, 16, 8, 10)]  # (B, d, K, iterations)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for B, d, K, n_iter in shapes:
            for metric in ("l2", "ip", "cosine"):
                def run(backend, device, B=B, d=d, K=K, n_iter=n_iter, metric=metric, dtype=dtype):
                    g = torch.Generator().manual_seed(B + d)
                    centres = torch.randn(K, d, generator=g, dtype=torch.float64) * 3
                    x = centres[torch.randint(0, K, (B,), generator=g)] + 0.5 * torch.randn(B, d, generator=g) + 50.0
                    x = x.to(dtype)
                    kw = dict(n_iter=n_iter, seed=3, metric=metric, tol=0.0)
                    c, labels, inertia = kmeans(x.to(device), K, backend=backend, **kw)
                    cr, lr, ir = reference.kmeans(x, K, **kw)
                    got = torch.cat([c.cpu().double().flatten(), torch.tensor([inertia], dtype=torch.float64)])
                    want = torch.cat([cr.double().flatten(), torch.tensor([ir], dtype=torch.float64)])
                    return got, want, {"labels": torch.equal(labels.cpu(), lr)}

                yield Check(f"kmeans {metric}", f"x[{B},{d}]+50 K={K} it={n_iter}", dtype, run,
                            reduction_tolerance(dtype, d))


CHECKS.append(_kmeans_checks)


def _hyper_data(B, d, n, P, dtype, device):
    return (_rand((B, d), dtype, device, seed=1), _rand((P, d, n), dtype, device, seed=2),
            _rand((P, n), dtype, device, seed=3))


def _assign_checks(small: bool) -> Iterator[Check]:
    """assign_prototypes (Persona Eq. 12): chosen prototypes exactly, float64 norms within the
    tolerance of a sum over d*n products; the fused kernel under each threshold form, and the
    Gram form (threshold None) on the same device."""
    from . import hyper

    cases = [(9, 20, 130, 3), (6, 9, 70, 4)]  # (B, d, n, P)
    if not small:
        cases.append((64, 32, 257, 8))
    for dtype in DTYPES:
        for B, d, n, P in cases:
            for method, thr in (("fused", None), ("fused", 0.4), ("fused", "[B]"), ("gram", None)):
                def run(backend, device, B=B, d=d, n=n, P=P, method=method, thr=thr, dtype=dtype):
                    e, w, b = _hyper_data(B, d, n, P, dtype, "cpu")
                    t = torch.linspace(0, 2, B) if thr == "[B]" else thr
                    norms, chosen = hyper.assign_prototypes(
                        e.to(device), w.to(device), b.to(device), t.to(device) if isinstance(t, torch.Tensor) else t,
                        backend=backend, method=method)
                    want_norms, want = reference.assign_prototypes(e, w, b, t)
                    return norms.cpu(), want_norms, {"chosen": torch.equal(chosen.cpu(), want)}

                name = f"assign_prototypes {method}" + {None: "", "[B]": " T[B]"}.get(thr, f" T={thr}")
                yield Check(name, f"e[{B},{d}] W[{P},{d},{n}]", dtype, run, reduction_tolerance(dtype, d * n))


def _generate_edit_checks(small: bool) -> Iterator[Check]:
    """generate_edit (Persona Eq. 6): hyper_matmul then the clip, for every prototype or the
    indexed one, with a scalar and a per-sample threshold."""
    from . import hyper

    cases = [(6, 9, 70, 3, None), (9, 20, 130, 3, [2, 0, 1, 1, 2, 0, 0, 2, 1])]  # (B, d, n, P, index)
    if not small:
        cases.append((32, 64, 300, 8, [i % 8 for i in range(32)]))
    for dtype in DTYPES:
        for B, d, n, P, index in cases:
            for thr in (0.3, "[B]"):
                def run(backend, device, B=B, d=d, n=n, P=P, index=index, thr=thr, dtype=dtype):
                    e, w, b = _hyper_data(B, d, n, P, dtype, device)
                    idx = None if index is None else torch.tensor(index, device=device)
                    t = torch.linspace(0, 1, B, device=device) if thr == "[B]" else thr
                    return (hyper.generate_edit(e, w, b, idx, t, backend=backend),
                            reference.generate_edit(e, w, b, idx, t))

                label = f"e[{B},{d}] W[{P},{d},{n}]" + (" idx" if index else "")
                name = "generate_edit " + ("T[B]" if thr == "[B]" else f"T={thr}")
                yield Check(name, label, dtype, run, reduction_tolerance(dtype, d))


def _assign_layers_checks(small: bool) -> Iterator[Check]:
    """assign_prototypes_layers (Persona Eq. 11-12 over every layer, one call of the all-layer op):
    chosen prototypes exactly, float64 norms, every rule, unclipped (a wide layer takes its Gram
    form on CPU) and clipped, per-layer embeddings."""
    from . import assign_layers

    cases = [(9, 6, [130, 0, 7], 3), (12, 8, [64, 5], 4)]  # (B, d, layer widths, P)
    if not small:
        cases.append((192, 32, [1024, 192], 4))  # the Persona example's shapes
    for dtype in DTYPES:
        for B, d, sizes, P in cases:
            for rule, thr in (("sumsq", None), ("sum", 0.4), ("max", "[B]"), ([0.5, 2.0] + [1.0] * (len(sizes) - 2), None)):
                def run(backend, device, B=B, d=d, sizes=sizes, P=P, rule=rule, thr=thr, dtype=dtype):
                    e = _rand((len(sizes), B, d), dtype, "cpu", seed=1)
                    w = _rand((P, d, sum(sizes)), dtype, "cpu", d ** -0.5, seed=2)
                    b = _rand((P, sum(sizes)), dtype, "cpu", seed=3)
                    t = torch.linspace(0, 2, B) if thr == "[B]" else thr
                    norms, chosen = assign_layers.assign_prototypes_layers(
                        e.to(device), w.to(device), b.to(device), t.to(device) if isinstance(t, torch.Tensor) else t,
                        rule=rule, sizes=sizes, backend=backend, method="fused")
                    want_norms, want = reference.assign_prototypes_layers(e, w, b, t, rule, sizes)
                    return norms.cpu(), want_norms, {"chosen": torch.equal(chosen.cpu(), want)}

                name = "assign_prototypes_layers " + (rule if isinstance(rule, str) else "weighted") + \
                    {None: "", "[B]": " T[B]"}.get(thr, f" T={thr}")
                yield Check(name, f"e[{len(sizes)},{B},{d}] W[{P},{d},{sizes}]", dtype, run,
                            reduction_tolerance(dtype, d * max(sizes)))


CHECKS += [_assign_checks, _assign_layers_checks, _generate_edit_checks]


def op_names() -> list[str]:
    """The names --op accepts: the first word of every check's name, in run order."""
    names: dict[str, None] = {}
    for make in CHECKS:
        for check in make(True):
            names.setdefault(check.op.split()[0])
    return list(names)


def _targets(device: str | None = None) -> list[tuple[str, str]]:
    targets = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        if device is None or dev == device:
            targets += [(b, dev) for b in backends.available(dev) if b != "reference"]
    return targets


def _run_check(check: Check, backend: str, device: str, interpreted: bool) -> Row:
    note = "interpreter truncates bf16" if interpreted and check.dtype == torch.bfloat16 else ""
    atol, rtol = (check.tol() if callable(check.tol) else check.tol) or tolerance(check.dtype)
    exact: dict = {}
    try:
        actual, expected, *rest = check.run(backend, device)
        exact = {k: bool(v) for k, v in (rest[0] if rest else {}).items()}
        if actual.shape != expected.shape:
            raise ValueError(f"shape {tuple(actual.shape)} != the reference's {tuple(expected.shape)}")
        a, r = errors(actual, expected)
        got, want = actual.detach().double().cpu(), expected.detach().double().cpu()
        same_nan = bool((torch.isnan(got) == torch.isnan(want)).all())
        ok = (same_nan and all(exact.values())
              and bool(torch.isclose(got, want, atol=atol, rtol=rtol, equal_nan=True).all()))
        if not all(exact.values()):
            note = ", ".join(f"{k} differ" for k, v in exact.items() if not v)
    except Exception as exc:  # a crash is a failure with its reason shown
        a = r = float("nan")
        ok, note = False, f"{type(exc).__name__}: {exc}"
    dev = "" if device == "cpu" or backend == "cuda" else f"@{device}"
    return Row(check.op, backend + dev, SHORT_DTYPE.get(check.dtype, str(check.dtype).replace("torch.", "")),
               check.shape.replace(", ", ","), a, r, atol, rtol, ok, note, exact)


def run_all(only_backend: str | None = None, ops: Optional[list[str]] = None, device: str | None = None,
            small: bool = False, dtypes: Optional[list[torch.dtype]] = None, progress=None, on_group=None) -> list[Row]:
    """Every selected check on every target; ``progress(text, end)`` reports each (op, backend)
    group as it starts and ends, ``on_group(rows so far)`` runs after each group."""
    rows: list[Row] = []
    for backend, dev in _targets(device):
        if only_backend and backend != only_backend:
            continue
        interpreted = backend == "triton" and dev == "cpu"
        groups: dict[str, list[Check]] = {}
        for make in CHECKS:
            for check in make(small or interpreted):
                family = check.op.split()[0]
                if (ops is None or family in ops) and (dtypes is None or check.dtype in dtypes):
                    groups.setdefault(family, []).append(check)
        where = backend if backend == "cuda" or dev == "cpu" else f"{backend}@{dev}"
        for family, checks in groups.items():
            if progress:
                progress(f"verify {family:<19} {where:<12}", "")
            start = time.perf_counter()
            new = [_run_check(c, backend, dev, interpreted) for c in checks]
            rows += new
            failed = sum(not r.passed for r in new)
            if progress:
                progress(f" {len(new) - failed:>3}/{len(new)} passed"
                         + (f", {failed} FAILED" if failed else "") + f"  {time.perf_counter() - start:.1f}s", "\n")
            if on_group:
                on_group(rows)
    return rows


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "~"


def format_table(rows: list[Row], width: int = TABLE_WIDTH) -> str:
    """Rows under one heading line per (op, backend), within ``width`` columns (a long shape is
    cut with ~; --json has it whole); a failure's reason goes on the line below its row."""
    head = ("case", "dtype", "shape", "max abs", "max rel", "pass rule", "pass")
    body = [["  " + (r.op[len(r.family):].strip(" ()") or "forward"), r.dtype, r.shape, f"{r.abs_err:.1e}",
             f"{r.rel_err:.1e}", r.rule, "yes" if r.passed else "NO"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    if over > 0:  # the shape column gives way first, then the case names
        for col in (2, 0):
            cut = min(over, widths[col] - len(head[col]) - 1)
            if cut > 0:
                widths[col] -= cut
                over -= cut
    line = lambda cells: "  ".join(_cut(str(c), w).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    group = None
    for r, b in zip(rows, body):
        if (r.family, r.backend) != group:
            group = (r.family, r.backend)
            out.append(f"{r.family} on {r.backend}")
        out.append(line(b))
        if r.note and not r.passed:
            out.append(_cut("      ^ " + r.note.replace("\n", " "), width))
    return "\n".join(out)


def write_json(path: str, rows: list[Row], complete: bool, argv: list[str]) -> None:
    """Every row so far (rewritten after each group, so a run cut short still leaves its rows)."""
    doc = {"complete": complete, "argv": argv, "torch": torch.__version__,
           "triton_interpreted": backends.triton_interpreted(),
           "passed": sum(r.passed for r in rows), "failed": sum(not r.passed for r in rows),
           "rows": [r.as_json() for r in rows]}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=[b for b in backends.NAMES if b != "reference"],
                        help="only this backend (default: every one that runs here)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="only backends on this device")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="only this op (repeatable, or a comma list): " + ", ".join(op_names()))
    parser.add_argument("--dtype", action="append", metavar="NAME",
                        help="only this dtype (repeatable, or a comma list): " + ", ".join(SHORT_DTYPE.values()))
    parser.add_argument("--small", action="store_true",
                        help="the small shapes on every backend (the Triton interpreter always uses them)")
    parser.add_argument("--json", metavar="PATH", help="also write every row to PATH as JSON")


def _split(values: Optional[list[str]]) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def check_args(parser, args) -> None:
    """--op and --dtype split on commas and checked (parser.error lists the valid names); they
    become lists of op names / torch dtypes, or None for all."""
    ops, valid = _split(args.op), op_names()
    unknown = [n for n in ops if n not in valid]
    if unknown or (args.op and not ops):
        parser.error(f"unknown --op {', '.join(unknown) or repr(args.op)}; valid ops: {', '.join(valid)}")
    by_name = {**{v: k for k, v in SHORT_DTYPE.items()}, **{str(k).replace("torch.", ""): k for k in SHORT_DTYPE}}
    dtypes = _split(args.dtype)
    unknown = [n for n in dtypes if n not in by_name]
    if unknown or (args.dtype and not dtypes):
        parser.error(f"unknown --dtype {', '.join(unknown) or repr(args.dtype)}; valid: {', '.join(by_name)}")
    args.op = ops or None
    args.dtype = [by_name[n] for n in dtypes] or None


def run(args, argv: list[str]) -> int:
    """verify with arguments parsed by add_arguments and normalised by check_args."""
    def progress(text: str, end: str) -> None:
        print(text, end=end, file=sys.stderr, flush=True)

    on_group = None
    if args.json:
        try:
            write_json(args.json, [], False, argv)  # a bad path fails now, not after the first op
        except OSError as exc:
            print(f"python -m pyeditor verify: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
        on_group = lambda rows: write_json(args.json, rows, False, argv)  # noqa: E731
    rows = run_all(args.backend, args.op, args.device, args.small, args.dtype, progress, on_group)
    if not rows:
        print("no checks ran: nothing here matches the selection "
              f"(backends: {[b for b, _ in _targets(args.device)]})", file=sys.stderr)
        return 1
    if args.json:
        write_json(args.json, rows, True, argv)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed"
          + (f"; rows written to {args.json}" if args.json else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyeditor verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run(args, argv)
