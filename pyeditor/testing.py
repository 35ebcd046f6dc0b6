"""Numerics helpers shared by the tests, `python -m pyeditor verify` and the benchmarks.

TOLERANCES is the one per-dtype (atol, rtol) table every comparison with the reference uses.
Elementwise ops round once, so they meet it with room to spare; ops that reduce over K
elements scale it with `reduction_tolerance`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1.3e-6),
    # one rounding step of the 16-bit formats (the Triton interpreter truncates bf16, a 1-ulp gap)
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def reduction_tolerance(dtype: torch.dtype, k: int) -> tuple[float, float]:
    """Tolerance for results summed over k products: rounding error grows like sqrt(k)."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, math.sqrt(max(k, 1)))
    return atol * scale, rtol * scale


def errors(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    """(max abs error, max rel error) over finite entries; NaN/inf positions must agree exactly."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(e) & torch.isfinite(a)
    if finite.sum() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()[finite]
    rel = diff / e.abs()[finite].clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff.max()), float(rel.max())


def check_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, tol=None) -> None:
    """assert_close with the shared table, NaN == NaN, and a message that says where it failed."""
    dtype = dtype or expected.dtype
    atol, rtol = tol or TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"dtype {actual.dtype} != expected {expected.dtype}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nan = torch.isnan(a) == torch.isnan(e)
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) & same_nan
    if not bool(close.all()):
        bad = (~close).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{bad.shape[0]} of {a.numel()} elements differ beyond atol={atol}, rtol={rtol} ({dtype}); "
            f"first at {first}: got {a[first].item()!r}, expected {e[first].item()!r}"
        )
