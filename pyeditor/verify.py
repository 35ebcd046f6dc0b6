"""`python -m pyeditor verify`: every op with kernels, on every backend this machine can run,
against pyeditor.reference, over a grid of shapes and dtypes (forward and gradients).

Each op family adds a `Check` generator to CHECKS; the table and exit code come for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import backends, reference
from .api import apply_edit
from .testing import errors, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Check:
    op: str
    shape: str
    dtype: torch.dtype
    run: Callable[[str, str], tuple]  # (backend, device) -> (actual, expected)
    tol: Optional[tuple] = None  # (atol, rtol) instead of the dtype's row, e.g. reduction_tolerance


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
    """nearest_prototype (issue 5): indices must equal the reference's exactly (compared as
    floats), distances within the dtype's tolerance; clustered data offset far from 0."""
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
                    same = (idx.cpu() == ri).all()
                    return (torch.cat([dist.cpu().double().flatten(), same.double().view(1)]),
                            torch.cat([rd.double().flatten(), torch.ones(1, dtype=torch.float64)]))

                yield Check(f"nearest_prototype {metric}", f"x[{B},{d}] P[{N}] +{off:g}", dtype, run)


CHECKS: list[Callable[[bool], Iterator[Check]]] = [_edit_checks]
CHECKS.append(_search_checks)  # issue 5


# ---------------------------------------------------------------- packed low-bit weights (quant)
def _quant_checks(small: bool) -> Iterator[Check]:
    from . import quant
    from .testing import reduction_tolerance

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


def _targets() -> list[tuple[str, str]]:
    targets = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        targets += [(b, device) for b in backends.available(device) if b != "reference"]
    return targets


def run_all(only_backend: str | None = None) -> list[Row]:
    rows = []
    for backend, device in _targets():
        if only_backend and backend != only_backend:
            continue
        interpreted = backend == "triton" and device == "cpu"
        for make in CHECKS:
            for check in make(interpreted):
                if interpreted and check.dtype == torch.bfloat16:
                    note = "interpreter truncates bf16"
                else:
                    note = ""
                atol, rtol = check.tol or tolerance(check.dtype)
                try:
                    actual, expected = check.run(backend, device)
                    a, r = errors(actual, expected)
                    same_nan = bool((torch.isnan(actual.float()) == torch.isnan(expected.float())).all())
                    ok = same_nan and bool(torch.isclose(actual.double().cpu(), expected.double().cpu(),
                                                         atol=atol, rtol=rtol, equal_nan=True).all())
                except Exception as exc:  # a crash is a failure with its reason shown
                    a = r = float("nan")
                    ok, note = False, f"{type(exc).__name__}: {exc}"[:80]
                dev = "" if device == "cpu" or backend == "cuda" else f"@{device}"
                rows.append(Row(check.op, backend + dev, str(check.dtype).replace("torch.", ""), check.shape,
                                a, r, atol, rtol, ok, note))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("op", "backend", "dtype", "shape", "max abs", "max rel", "atol", "rtol", "pass")
    body = [(r.op, r.backend, r.dtype, r.shape, f"{r.abs_err:.2e}", f"{r.rel_err:.2e}", f"{r.atol:.0e}",
             f"{r.rtol:.1e}", ("yes" if r.passed else "NO") + (f" ({r.note})" if r.note else "")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyeditor verify", description=__doc__)
    parser.add_argument("--backend", help="only this backend")
    args = parser.parse_args(argv)
    rows = run_all(args.backend)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
