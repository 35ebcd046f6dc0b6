"""The suite's compute roofline: rows that declare their flops get GFLOP/s and % of the host's
fp32 FMA peak (bench.roofline.ComputeProbe, pyeditor's fma_probe), in the results and in the
generated tables; rows without flops are unchanged."""
from __future__ import annotations

import pytest

from bench.markdown import render
from bench.registry import Case, Context, Prepared
from bench.roofline import ComputeProbe
from bench.runner import add_compute_roofline, run_case


def _timing(median):
    return {"median_s": median, "iqr_s": 0.0, "min_s": median, "max_s": median, "reps": 3}


def test_rows_with_flops_get_percent_of_peak():
    row = {"flops": 2e9, "impls": {"ours": _timing(0.02), "faiss": _timing(0.04), "broken": {"error": "x"},
                                   "read-sum": _timing(0.001)},
           "roles": {"ours": "ours", "faiss": "peer", "read-sum": "bound"}}
    add_compute_roofline(row, 200.0)
    assert "compute_pct" not in row["impls"]["read-sum"]  # a memory read is not a compute impl
    assert row["impls"]["ours"]["gflops"] == pytest.approx(100.0)
    assert row["impls"]["ours"]["compute_pct"] == pytest.approx(50.0)
    assert row["impls"]["faiss"]["compute_pct"] == pytest.approx(25.0)
    assert "compute_pct" not in row["impls"]["broken"]
    assert row["compute_pct"] == pytest.approx(50.0) and row["peak_gflops"] == 200.0
    plain = {"impls": {"ours": _timing(0.02)}}
    add_compute_roofline(plain, 200.0)
    assert "compute_pct" not in plain["impls"]["ours"] and "peak_gflops" not in plain


def test_run_case_records_the_cases_flops():
    import torch

    x = torch.ones(8)
    case = Case("t/flops", "flops", "t", ("ours",),
                lambda ctx: Prepared(fns={"ours": lambda: x * 2}, flops=16, reference=lambda: x * 2, tol=0.0))
    row = run_case(case, Context(), {"budget_s": 0.0, "min_reps": 2, "warmup_s": 0.0})
    assert row["flops"] == 16


def test_table_shows_compute_next_to_memory():
    machine = {"cpu_model": "Test CPU", "cores_usable": 2, "caches": {"L3": "16M"}, "cpu_capability": "AVX2",
               "pyeditor_isa": "avx2", "llc": "L3 16M", "hostname": "box", "git_commit": "0" * 12,
               "git_dirty": False, "date": "2026-12-01T10:00:00+00:00", "torch_threads": 2, "torch": "2.13.0",
               "bandwidth": {"copy_gbps": 20.0, "read_gbps": 25.0},
               "compute": {"fp32_gflops": 180.0, "fp32_gflops_runs": [175.0, 180.0], "method": "m"}}
    ours = {**_timing(0.05), "roofline_pct": 4.0, "gbps": 1.2, "gflops": 150.0, "compute_pct": 83.3}
    row = {"name": "search/l2/x/fp32", "label": "nearest_prototype big", "family": "search", "flops": 7.5e9,
           "impls": {"ours": ours}}
    text = render([{"schema": 2, "command": "c", "argv": [], "machine": machine, "rows": [row]}], "cmd")
    assert "fp32 FMA peak 180 GFLOP/s" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| nearest_prototype big"))
    assert "4% (1.2 GB/s)<br>83% compute (150 GFLOP/s)" in line


def test_probe_measures_a_positive_peak():
    """The probe runs and reports a figure (its size is the host's; no bound is asserted here)."""
    probe = ComputeProbe(threads=1)
    if probe.op is None:
        pytest.skip("no compiled extension")
    probe.ROUNDS = 200
    assert probe.gflops(reps=2) > 0
