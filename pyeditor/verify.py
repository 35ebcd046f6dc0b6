"""`python -m pyeditor verify`: every op with kernels, on every backend this machine can run,
against pyeditor.reference, over a grid of shapes and dtypes (forward and gradients).

Each op family adds a `Check` generator to CHECKS; the table and exit code come for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

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


CHECKS: list[Callable[[bool], Iterator[Check]]] = [_edit_checks]
CHECKS.append(_hyper_checks)  # issue 4


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
                atol, rtol = tolerance(check.dtype)
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
