"""Run one case: time every impl, check it against the reference, derive the metrics."""
from __future__ import annotations

import gc
import time
from typing import Any, Optional

import torch

from bench.contention import CpuMonitor
from bench.quiet import captured_output, collect_warnings
from bench.registry import OURS, Case, Context
from bench.roofline import roofline_s
from bench.timing import measure_interleaved


def error_text(e: BaseException, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def max_abs_err(got: Any, want: torch.Tensor) -> float:
    if not isinstance(got, torch.Tensor):
        raise TypeError(f"impl returned {type(got).__name__}, not a tensor")
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise TypeError(f"dtype {got.dtype} != reference {want.dtype}")
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def run_case(case: Case, ctx: Context, timing_kw: Optional[dict] = None) -> dict[str, Any]:
    """One JSON row for ``case``; failures are recorded in the row, never raised.

    What the case's libraries print and warn goes into the row ("output", "warnings"), not to
    the terminal. Bandwidth-dependent fields are added by :func:`add_roofline`.
    """
    output: list[str] = []
    caught: list[str] = []
    with captured_output(output), collect_warnings(caught):
        row = _run_case(case, ctx, timing_kw)
    if output:
        row["output"] = output
    if caught:
        row["warnings"] = caught
    return row


def _run_case(case: Case, ctx: Context, timing_kw: Optional[dict]) -> dict[str, Any]:
    start = time.perf_counter()
    row: dict[str, Any] = {
        "name": case.name, "label": case.label, "family": case.family, "params": case.params,
        "backend": ctx.backend if ctx.backend is not None else "auto",
        "roles": {impl: case.role(impl) for impl in case.impls},
    }
    try:
        prep = case.make(ctx)
        ref = prep.reference() if prep.reference is not None else None
    except Exception as e:
        row["error"] = error_text(e)
        row["wall_s"] = time.perf_counter() - start
        return row
    row.update(bytes=prep.bytes_moved, tol=prep.tol, notes=list(prep.notes))
    if prep.flops:
        row["flops"] = prep.flops

    fns = {n: prep.fns.get(n, "not provided by the case") for n in case.impls}
    runnable = {n: f for n, f in fns.items() if not isinstance(f, str)}
    mon = CpuMonitor()
    timed = measure_interleaved(runnable, sync=ctx.sync, **{**(timing_kw or {}), **prep.timing})
    row["load"] = mon.read()

    impls: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        r = fn if isinstance(fn, str) else timed[name]
        if isinstance(r, str):
            impls[name] = {"error": r}
            continue
        if isinstance(r, BaseException):  # e.g. torch.compile failing on this machine
            impls[name] = {"error": error_text(r)}
            continue
        entry = impls[name] = r.as_dict()
        if ref is not None:
            try:
                got = fn()
                if name in prep.convert:
                    got = prep.convert[name](got)
                entry["max_abs_err"] = err = max_abs_err(got, ref)
                if prep.tol is not None and not err <= prep.tol:
                    entry["error_above_tol"] = True
            except Exception as e:
                entry["check_error"] = error_text(e)
    row["impls"] = impls
    row["contended"] = any(e.get("contended_reps", 0) > 0 for e in impls.values())

    ours = impls.get(OURS, {})
    if "median_s" in ours:
        row.update(time_s=ours["median_s"], max_abs_err=ours.get("max_abs_err"))
        # peers only: pyeditor's own other modes and the roofline reads are not peers
        row["speedup"] = {p: impls[p]["median_s"] / ours["median_s"] for p in case.peers if "median_s" in impls[p]}
        for p, s in row["speedup"].items():
            impls[p]["speedup"] = s
        # own variants: variant time / ours time (< 1: the variant is faster than the default path)
        row["variants"] = {v: impls[v]["median_s"] / ours["median_s"] for v in case.variants
                           if "median_s" in impls[v]}
        for v, s in row["variants"].items():
            impls[v]["time_vs_ours"] = s
    if prep.derive is not None:
        try:
            row["extra"] = prep.derive({k: v for k, v in impls.items() if "median_s" in v})
        except Exception as e:
            row["extra"] = {"error": error_text(e)}
    del prep, ref, fns, runnable
    gc.collect()
    row["wall_s"] = time.perf_counter() - start
    return row


def cache_resident(params: dict[str, Any]) -> bool:
    """Whether the case says its data stays in cache (a --shape case keeps its base case's params)."""
    return (params.get("regime") or (params.get("base_params") or {}).get("regime")) == "cache"


def add_compute_roofline(row: dict[str, Any], peak_gflops: float) -> None:
    """GFLOP/s and % of the host's fp32 FMA peak (bench.roofline.ComputeProbe) for every timed
    impl of a row that declares its flops: the bound of the compute-heavy rows, which the memory
    roofline does not bound."""
    flops = row.get("flops")
    if not flops or not peak_gflops:
        return
    row["peak_gflops"] = peak_gflops
    roles = row.get("roles") or {}
    for name, e in row.get("impls", {}).items():
        if "median_s" in e and roles.get(name) != "bound":  # memory reads do none of the flops
            e["gflops"] = flops / e["median_s"] / 1e9
            e["compute_pct"] = 100.0 * e["gflops"] / peak_gflops
    ours = row.get("impls", {}).get(OURS, {})
    if "compute_pct" in ours:
        row["compute_pct"] = ours["compute_pct"]


def add_roofline(row: dict[str, Any], copy_gbps: float) -> None:
    """GB/s and % of roofline (roofline time = bytes / copy bandwidth) for every timed impl.

    Cache-resident rows get GB/s only: a DRAM roofline says nothing about data in cache.
    """
    nbytes = row.get("bytes")
    if not nbytes:
        return
    row["copy_gbps"] = copy_gbps
    roof = None if cache_resident(row.get("params") or {}) else roofline_s(nbytes, copy_gbps)
    if roof is not None:
        row["roofline_s"] = roof
    for e in row.get("impls", {}).values():
        if "median_s" in e:
            e["gbps"] = nbytes / e["median_s"] / 1e9
            if roof is not None:
                e["roofline_pct"] = 100.0 * roof / e["median_s"]
    ours = row.get("impls", {}).get(OURS, {})
    if "gbps" in ours:
        row["gbps"] = ours["gbps"]
    if "roofline_pct" in ours:
        row["roofline_pct"] = ours["roofline_pct"]
