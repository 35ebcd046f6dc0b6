"""Issue 29's peers of the packed-linear rows (bf16 F.linear, bitsandbytes NF4 and W8A8) and the
targets that read them: which rows carry which peer, how the targets evaluate on result rows, and
small real runs with bitsandbytes present and absent."""
from __future__ import annotations

import sys

import pytest
import torch

from bench.registry import Context, discover, select
from bench.targets import UNMEASURED, for_row

M16, M256 = "packed_linear/cache/M16/4096x4096", "packed_linear/cache/M256/4096x4096"
DRAM4 = "packed_linear/dram/M1/4096x4096/4"


def _t(median):
    return {"median_s": median, "iqr_s": 0.0, "reps": 6}


def _row(name, **impls):
    return {"name": name, "label": name, "family": "packed_linear",
            "impls": {k.replace("_", "-"): v if isinstance(v, dict) else _t(v) for k, v in impls.items()}}


def _outcomes(row):
    return {(o.target.metric, o.target.what.split(":")[0]): o for o in for_row(row)}


def _cases():
    return {c.name: c for c in discover()}


def test_gemm_rows_carry_the_bf16_and_bitsandbytes_peers():
    cases, default = _cases(), {c.name for c in select(discover())}
    for m in (M16, M256):
        for width in ("2", "4", "6", "8", "mix"):
            case = cases[f"{m}/{width}"]
            assert {"bf16", "bnb-nf4", "bnb-w8a8"} <= set(case.peers), case.name
            assert "ours-fast" in case.variants  # the int8-activation mode is ours, not a peer
        assert f"{m}/mix" in default  # the targets' figures are in the default run
    assert "bnb-nf4" in cases[DRAM4].peers and DRAM4 in default
    assert "bnb-nf4" not in cases["packed_linear/dram/M1/4096x4096/2"].impls  # NF4 is a 4-bit format
    assert "bf16" not in cases[DRAM4].impls


def test_gemm_targets_read_bf16_nf4_and_w8a8():
    row = _row(f"{M256}/mix", ours=10e-3, ours_fast=5e-3, bf16=12e-3, bnb_nf4=11e-3, bnb_w8a8=7e-3)
    got = _outcomes(row)
    bf16 = got[("time:bf16/ours", "M=256")]
    assert bf16.value == pytest.approx(1.2) and bf16.passed  # >= 1.0x bf16
    nf4 = got[("time:bnb-nf4/ours", "M=256")]
    assert nf4.value == pytest.approx(1.1) and nf4.passed is False  # 1.1 < 1.2
    w8a8 = got[("time:bnb-w8a8/ours-fast", "M=256")]  # the int8-activation mode against W8A8, not ours
    assert w8a8.value == pytest.approx(1.4) and w8a8.passed
    assert len(got) == 3

    m16 = _outcomes(_row(f"{M16}/2", ours=1e-3, ours_fast=1e-3, bf16=0.9e-3, bnb_nf4=2e-3, bnb_w8a8=1e-3))
    assert set(m16) == {("time:bf16/ours", "M=16"), ("time:bnb-nf4/ours", "M=16")}  # W8A8 is set at M=256
    assert m16[("time:bf16/ours", "M=16")].passed is False


def test_targets_without_the_peer_read_not_measured():
    absent = {"error": "bitsandbytes unavailable (ImportError); pip install ..."}
    got = _outcomes(_row(f"{M256}/4", ours=1e-2, ours_fast=5e-3, bf16=2e-2, bnb_nf4=absent, bnb_w8a8=absent))
    assert got[("time:bf16/ours", "M=256")].passed is True
    for key in (("time:bnb-nf4/ours", "M=256"), ("time:bnb-w8a8/ours-fast", "M=256")):
        assert got[key].value is None and got[key].passed is None

    dram = for_row(_row(DRAM4, ours=3e-4, bnb_nf4=3.3e-4))
    nf4 = [o for o in dram if o.target.metric == "time:bnb-nf4/ours"]
    assert len(nf4) == 1 and nf4[0].value == pytest.approx(1.1) and nf4[0].passed
    # the same peer elsewhere sets no target: cache-resident GEMV, other widths, --shape rows
    assert not for_row(_row("packed_linear/cache/M1/4096x4096/4", ours=1e-3, bnb_nf4=2e-3))
    assert not for_row(_row(f"{M256}/mix@n=64,k=128", ours=1e-3, bf16=2e-3))
    assert not [u for u in UNMEASURED if "bitsandbytes" in u[1] or "bf16" in u[1]]


def test_report_shows_the_new_peers_and_marks():
    from bench.markdown import render
    from bench.results import SCHEMA

    row = _row(f"{M256}/mix", ours=10e-3, ours_fast=5e-3, bf16=12e-3, bnb_nf4=11e-3, bnb_w8a8=7e-3)
    row["label"] = "packed_linear cache M=256 4096x4096 mix-bit"
    machine = {"cpu_model": "Test CPU", "cores_usable": 2, "date": "2026-12-01T10:00:00+00:00"}
    text = render([{"schema": SCHEMA, "command": "python -m bench", "machine": machine, "rows": [row]}], "report")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row['label']}"))
    cells = [c.strip() for c in line.split(" | ")]
    assert "bf16 12 ms" in cells[3] and "**1.20x**" in cells[3] and "bnb-w8a8 7 ms" in cells[3]
    assert "ours-fast" in cells[2] and "ours-fast" not in cells[3]
    assert "1.2 (target ≥ 1" in cells[5] and "1.1 (target ≥ 1.2" in cells[5] and "1.4 (target ≥ 1.3" in cells[5]
    assert cells[5].count("pass") == 2 and cells[5].count("miss") == 1


def _small(name):
    """The case at a small size, as --shape builds it (the 4096x4096 layers take seconds to quantize)."""
    from bench.registry import discover_modules
    from bench.shapes import apply_shapes, parse_shape

    picked = {c.name for c in discover() if c.name == name}
    modules = {m: [c for c in cs if c.name in picked] for m, cs in discover_modules().items()}
    (case,) = apply_shapes(modules, [parse_shape("packed_linear:n=64,k=128")])
    return case


def test_small_gemm_row_runs_every_peer():
    pytest.importorskip("bitsandbytes")
    from bench.runner import run_case

    case = _small(f"{M16}/mix")
    prep = case.make(Context())
    want = prep.fns["fp32"]()
    for impl, rel in (("bf16", 2e-2), ("bnb-nf4", 0.2), ("bnb-w8a8", 5e-2)):
        got = prep.fns[impl]().float()
        assert got.shape == want.shape == (16, 64)
        assert ((got - want).norm() / want.norm()).item() < rel, impl
    assert any("bnb-w8a8" in n and "int8" in n for n in prep.notes)  # says which int8 path runs here
    row = run_case(case, Context(), {"budget_s": 0.0, "min_reps": 2})
    for impl in ("bf16", "bnb-nf4", "bnb-w8a8"):
        assert "median_s" in row["impls"][impl] and row["roles"][impl] == "peer"
        assert f"vs_{impl}_fast" in row["extra"]


def test_without_bitsandbytes_the_row_notes_why(monkeypatch):
    from bench import peers_bnb
    from bench.runner import run_case

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    row = run_case(_small(f"{M16}/mix"), Context(), {"budget_s": 0.0, "min_reps": 2})
    for impl in ("bnb-nf4", "bnb-w8a8"):
        assert "bitsandbytes unavailable" in row["impls"][impl]["error"]
        assert "requirements-bench.txt" in row["impls"][impl]["error"]
    assert "median_s" in row["impls"]["bf16"] and "median_s" in row["impls"]["ours"]
    assert any("unavailable" in n for n in row["notes"])
    assert "unavailable" in peers_bnb.describe("bnb-nf4")
    with pytest.raises(ValueError, match="impl must be"):
        peers_bnb.describe("bnb-fp4")
