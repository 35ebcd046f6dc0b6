"""Turn a family's ``CASES`` into pytest-benchmark tests (one test per case x impl).

    from bench.cases_edit import CASES
    from bench.pytest_support import parametrize, run_benchmark

    @parametrize(CASES)
    def test_apply_edit(benchmark, bench_ctx, bandwidth, case, impl):
        run_benchmark(benchmark, bench_ctx, bandwidth, case, impl)

Full-only cases are skipped unless PYEDITOR_BENCH_FULL=1. Fixtures live in conftest.py.
"""
from __future__ import annotations

import gc
import os
from typing import Any, Optional

import pytest

from bench.registry import OURS, Case, Context, Prepared
from bench.roofline import roofline_s
from bench.runner import error_text, max_abs_err

FULL = os.environ.get("PYEDITOR_BENCH_FULL", "") not in ("", "0")


def parametrize(cases: list[Case]):
    params = []
    for c in cases:
        marks = [pytest.mark.skipif(c.full and not FULL, reason="full-only case (PYEDITOR_BENCH_FULL=1)")]
        params += [pytest.param(c, impl, id=f"{c.name}-{impl}", marks=marks) for impl in c.impls]
    return pytest.mark.parametrize("case,impl", params)


# one prepared case at a time (they hold hundreds of MiB); tests arrive grouped by case
_current: dict[str, Any] = {"name": None}


def _prepared(case: Case, ctx: Context) -> tuple[Prepared, Optional[Any]]:
    if _current["name"] != case.name:
        _current.clear()
        _current["name"] = None
        gc.collect()
        prep = case.make(ctx)
        ref = prep.reference() if prep.reference is not None else None
        _current.update(name=case.name, prep=prep, ref=ref)
    return _current["prep"], _current["ref"]


def run_benchmark(benchmark, ctx: Context, bw: dict, case: Case, impl: str, warmup: int = 2) -> None:
    prep, ref = _prepared(case, ctx)
    fn = prep.fns.get(impl, "not provided by the case")
    if isinstance(fn, str):
        (pytest.fail if impl == OURS else pytest.skip)(fn)
    try:
        for _ in range(warmup):  # compiles (torch.compile) and warms up outside the timing
            result = fn()
    except Exception as e:
        if impl == OURS:
            raise
        pytest.skip(f"{impl} failed: {error_text(e, 500)}")
    benchmark.group = case.name
    info = benchmark.extra_info
    info.update(label=case.label, impl=impl, backend=ctx.backend or "auto", bytes=prep.bytes_moved,
                copy_gbps=bw["copy_gbps"], roofline_s=roofline_s(prep.bytes_moved, bw["copy_gbps"]))
    if ref is not None:
        if impl in prep.convert:
            result = prep.convert[impl](result)
        info["max_abs_err"] = err = max_abs_err(result, ref)
    del result
    benchmark(fn)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and prep.bytes_moved:
        info["gbps"] = prep.bytes_moved / stats.median / 1e9
        info["roofline_pct"] = 100.0 * info["roofline_s"] / stats.median
    if ref is not None and prep.tol is not None:
        assert err <= prep.tol, f"{case.name} {impl}: max|err| {err} > {prep.tol}"
