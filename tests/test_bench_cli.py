"""The benchmark suite's command line: report, compare, --shape, plots, clean output, any cwd.

Report and compare run on small synthetic results files; one test lays the package out as
setup.py installs it and runs a tiny real case in a subprocess from a directory outside the checkout.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import compare as cmp
from bench.__main__ import main
from bench.registry import Case, Context, Prepared
from bench.results import SCHEMA, load, result_name, write_run
from bench.shapes import accepted, apply_shapes, convert, parse_shape

REPO = Path(__file__).resolve().parent.parent
HOST = {"cpu_model": "Test CPU 9000", "cores_usable": 2, "caches": {"L1d": "32K", "L2": "1M", "L3": "16M"},
        "cpu_capability": "AVX2", "pyeditor_isa": "avx2", "llc": "L3 16M", "hostname": "box",
        "git_commit": "0123456789abcdef0123", "git_dirty": False, "date": "2026-12-01T10:00:00+00:00",
        "torch_threads": 2, "ours_backend": "cpu", "torch": "2.13.0",
        "bandwidth": {"copy_gbps": 20.0, "read_gbps": 25.0}}


def _timing(median, iqr=0.0, **kw):
    return {"median_s": median, "iqr_s": iqr, "min_s": median - iqr, "max_s": median + iqr, "reps": 10, **kw}


def _doc(rows, schema=SCHEMA, **machine):
    return {"schema": schema, "command": "python -m bench --filter x", "argv": ["--filter", "x"],
            "machine": {**HOST, **machine}, "rows": rows}


def _rows(search_ours=1e-3, search_iqr=1e-5):
    return [
        {"name": "search/l2/65536x64-N16/fp32", "label": "nearest_prototype l2 B=65536 d=64 N=16", "family": "search",
         "impls": {"ours": _timing(search_ours, search_iqr, roofline_pct=55.0, gbps=11.0),
                   "faiss": _timing(2.5e-3, 2e-5), "cdist-argmin": {"error": "RuntimeError: boom | pipe"}}},
        {"name": "hyper/assign-auto/B256xd128xn65536-P8/fp32", "label": "assign_prototypes (auto)", "family": "hyper",
         "impls": {"ours": _timing(1e-3, 1e-5), "naive": _timing(4e-3, 1e-5)}},
        {"name": "packed_linear/dram/M1/4096x4096/2", "label": "packed_linear dram M=1 4096x4096 2-bit",
         "family": "packed_linear", "contended": True,
         "roles": {"ours": "ours", "ours-fast": "own", "int4pack": "peer", "read-sum": "bound"},
         "impls": {"ours": _timing(4e-4, 4e-6, contended_reps=3), "ours-fast": _timing(2e-4, 2e-6),
                   "int4pack": _timing(6e-4, 6e-6), "read-sum": _timing(1.5e-4, 1e-6)},
         "extra": {"read_roofline_pct_fast": 75.0, "summary": "read_roofline_pct_fast=75.00"}},
    ]


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _table_row(text: str, label: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label}"))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


# -- report -----------------------------------------------------------------------------------------

def test_report_tables_per_host_and_family(tmp_path, capsys):
    src = _write(tmp_path / "r.json", _doc(_rows()))
    out = tmp_path / "BENCHMARKS.md"
    assert main(["report", str(src), "-o", str(out)]) == 0
    text = out.read_text()
    assert "## Test CPU 9000, avx2 (torch AVX2), 2 cores, L3 16M" in text
    for family in ("search", "hyper", "packed_linear"):
        assert f"### {family}" in text
    assert "commit `0123456789ab`" in text and "2026-12-01T10:00:00+00:00" in text
    assert "`python -m bench --filter x`" in text

    search = _table_row(text, "nearest_prototype l2 B=65536 d=64 N=16")
    assert "**1 ms**" in search[1] and "IQR 1.0%" in search[1] and "n=10" in search[1]
    assert "faiss 2.5 ms" in search[3] and "**2.50x**" in search[3]
    assert "cdist-argmin: failed (RuntimeError: boom \\| pipe)" in search[3]  # a '|' cannot break the table
    assert "55%" in search[4]
    assert "target ≥ 3" in search[5] and "miss" in search[5]  # issue 29: >= 3x FAISS at N=16

    assign = _table_row(text, "assign_prototypes (auto)")
    assert "4 (target ≥ 3" in assign[5] and "pass" in assign[5]

    packed = _table_row(text, "packed_linear dram M=1 4096x4096 2-bit ⚠")
    assert "ours-fast 200 µs" in packed[2] and "0.50× ours' time" in packed[2]
    assert "ours-fast" not in packed[3] and "read-sum" not in packed[3] and "int4pack" in packed[3]
    assert "75 (target ≥ 70" in packed[5] and "pass" in packed[5]
    assert "3 under load" in packed[1]
    # targets whose rows the results lack are listed, not dropped
    assert "Targets with no row in these results" in text and "per-head loop" in text


def test_report_newest_row_per_case_and_separate_hosts(tmp_path, capsys):
    old = _write(tmp_path / "old.json", _doc(_rows(search_ours=2e-3)))
    new = _write(tmp_path / "new.json", _doc(_rows()[:1], date="2026-12-02T10:00:00+00:00", git_commit="feedbeef" * 5))
    other = _write(tmp_path / "other.json", _doc(_rows()[:1], cpu_model="Other CPU", cores_usable=64))
    assert main(["report", str(new), str(old), str(other)]) == 0
    text = capsys.readouterr().out
    heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
    from bench.targets import UNMEASURED

    assert len(heads) == 2 + bool(UNMEASURED)  # two hosts, and the list of unmeasured targets if any
    first_host = text.split("## Other CPU")[0]
    assert "**1 ms**" in _table_row(first_host, "nearest_prototype")[1]  # the newer file's row
    assert "feedbeeffeed" in first_host and "0123456789ab" in first_host  # both runs named


def test_report_reads_schema_1_and_rejects_unknown(tmp_path, capsys):
    old = _doc(_rows(), schema=1)
    del old["command"]
    old["argv"] = ["/somewhere/bench/__main__.py", "--filter", "realmodel"]
    assert main(["report", str(_write(tmp_path / "s1.json", old))]) == 0
    assert "`python -m bench --filter realmodel`" in capsys.readouterr().out

    assert main(["report", str(_write(tmp_path / "s9.json", _doc(_rows(), schema=99)))]) == 2
    err = capsys.readouterr().err
    assert "schema 99" in err and "rerun `python -m bench`" in err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
    assert main(["report", str(_write(tmp_path / "x.json", {"rows": []}))]) == 2
    assert "not a bench results file" in capsys.readouterr().err


# -- compare ----------------------------------------------------------------------------------------

def test_compare_flags_changes_beyond_the_spread(tmp_path, capsys):
    old_rows = _rows()
    new_rows = _rows(search_ours=1.5e-3)  # search 1.5x slower, its IQR 1%: beyond the spread
    new_rows[1]["impls"]["ours"] = _timing(1.004e-3, 1e-5)  # assign: within the spread
    new_rows.append({"name": "only/new", "label": "only new", "family": "x", "impls": {"ours": _timing(1.0)}})
    old, new = _write(tmp_path / "a.json", _doc(old_rows)), _write(tmp_path / "b.json", _doc(new_rows))
    assert main(["compare", str(old), str(new)]) == 0
    text = capsys.readouterr().out
    search = next(ln for ln in text.splitlines() if ln.startswith("nearest_prototype"))
    assert "1.50x" in search and search.rstrip().endswith("slower")
    assign = next(ln for ln in text.splitlines() if ln.startswith("assign_prototypes"))
    assert assign.rstrip().endswith("~")
    assert "only in NEW (1): only/new" in text

    found, _ = cmp.changes(load(old), load(new), all_impls=True)
    assert {(c.case.split("/")[0], c.impl) for c in found} >= {("search", "faiss"), ("packed_linear", "ours-fast")}
    assert main(["compare", str(old), str(new), "--fail-slower", "40"]) == 1
    assert main(["compare", str(old), str(new), "--fail-slower", "60"]) == 0


def test_compare_warns_across_hosts(tmp_path, capsys):
    old = _write(tmp_path / "a.json", _doc(_rows()))
    new = _write(tmp_path / "b.json", _doc(_rows(), cpu_model="Other CPU"))
    assert main(["compare", str(old), str(new)]) == 0
    assert "WARNING: different hosts" in capsys.readouterr().out


# -- result files -----------------------------------------------------------------------------------

def test_results_are_timestamped_and_never_overwritten(tmp_path):
    doc = _doc(_rows())
    first = write_run(doc, directory=tmp_path)
    second = write_run(doc, directory=tmp_path)
    assert first[0].name == "box-20261201T100000Z-0123456789ab.json" == result_name(doc["machine"])
    assert second[0] != first[0] and second[0].exists() and first[0].exists()
    assert first[1].name == second[1].name == "latest.json"
    assert json.loads((tmp_path / "latest.json").read_text())["rows"] == doc["rows"]
    assert result_name({**doc["machine"], "git_dirty": True, "hostname": "a b/c"}).startswith("a-b-c-")


# -- --shape ----------------------------------------------------------------------------------------

def _make(n, k, m, width, dram, ctx):
    raise AssertionError("not run")


def _make_other(B, d, ctx):
    raise AssertionError("not run")


def _modules():
    cases = [Case(f"fam/{w}/{m}", f"fam M={m} {w}-bit", "fam", ("ours",),
                  functools.partial(_make, 64, 64, m, w, True), params={"regime": "dram"})
             for w in ("4", "mix") for m in (1, 16)]
    cases.append(Case("fam/other", "other B=8", "fam", ("ours",), functools.partial(_make_other, 8, 4)))
    return {"short": cases}


def test_parse_shape():
    spec = parse_shape("quant:M=1,N=4096,K=4096")
    assert spec.selector == "quant" and spec.overrides == (("M", "1"), ("N", "4096"), ("K", "4096"))
    assert parse_shape("hyper:shapes=[(64,64),(64,10)],B=8").overrides == (("shapes", "[(64,64),(64,10)]"), ("B", "8"))
    assert parse_shape("search").overrides == ()
    for bad, why in (("", "empty"), (":M=1", "no family"), ("quant:M", "not KEY=VALUE"), ("quant:M=1,M=2", "twice"),
                     ("quant:shapes=[(1,2)", "unbalanced"), ("quant:1x=2", "not KEY=VALUE")):
        with pytest.raises(ValueError, match=why):
            parse_shape(bad)


def test_shape_values_take_the_cases_types():
    assert convert("4", "mix", "width") == "4" and convert("1024", 4096, "n") == 1024
    assert convert("0", 1.5, "offset") == 0.0 and isinstance(convert("0", 1.5, "offset"), float)
    assert convert("true", False, "dram") is True and convert("[(1, 2)]", [(3, 4)], "shapes") == [(1, 2)]
    with pytest.raises(ValueError, match="n='abc' is not of type int"):
        convert("abc", 4096, "n")
    with pytest.raises(ValueError, match="not of type int"):
        convert("true", 4096, "n")


def test_apply_shapes_rebuilds_matching_cases():
    cases = apply_shapes(_modules(), [parse_shape("short:M=2,N=128")])
    # m is overridden everywhere, so the M=1 and M=16 cases of one width collapse into one
    assert [c.name for c in cases] == ["fam/4/1@m=2,n=128", "fam/mix/1@m=2,n=128"]
    assert cases[0].label == "fam M=2 4-bit with n=128"
    assert accepted(cases[0]) == {"n": 128, "k": 64, "m": 2, "width": "4", "dram": True}
    assert cases[0].params["base_case"] == "fam/4/1" and cases[0].params["base_params"] == {"regime": "dram"}
    assert [c.name for c in apply_shapes(_modules(), [parse_shape("fam:B=2")])] == ["fam/other@B=2"]
    assert len(apply_shapes(_modules(), [parse_shape("fam")])) == 5
    with pytest.raises(ValueError, match=r"no fam case takes Q; its cases take: _make\(n, k, m, width, dram\)"):
        apply_shapes(_modules(), [parse_shape("fam:Q=1")])
    with pytest.raises(ValueError, match="no selected case of family 'nope'.*; known: fam, short"):
        apply_shapes(_modules(), [parse_shape("nope:M=1")])


def test_every_real_case_exposes_its_shape_arguments():
    from bench.registry import discover

    for case in discover():
        assert accepted(case), f"{case.name}: --shape cannot rebuild it (make is not a functools.partial)"


# -- runner: roles, clean output ---------------------------------------------------------------------

def _noisy_case() -> Case:
    def make(ctx):
        x = torch.ones(4)
        os.write(1, b"library chatter on fd 1\n")
        import warnings
        warnings.warn("something deprecated", DeprecationWarning)
        return Prepared(fns={"ours": lambda: x + 1, "ours-fast": lambda: x + 1, "read-sum": lambda: x.sum(),
                             "torch": lambda: x + 1}, bytes_moved=16, reference=lambda: x + 1, tol=0.0)

    return Case("t/noisy", "noisy", "t", ("ours", "ours-fast", "read-sum", "torch"), make,
                params={"regime": "cache"})


def test_run_case_keeps_output_out_of_the_terminal_and_splits_roles(capfd):
    from bench.runner import add_roofline, run_case

    row = run_case(_noisy_case(), Context(), {"budget_s": 0.0, "min_reps": 2, "warmup_s": 0.0})
    add_roofline(row, 10.0)
    printed = capfd.readouterr()
    assert "chatter" not in printed.out and "chatter" not in printed.err
    assert row["output"] == ["library chatter on fd 1"]
    assert row["warnings"] == ["DeprecationWarning: something deprecated"]
    assert row["roles"] == {"ours": "ours", "ours-fast": "own", "read-sum": "bound", "torch": "peer"}
    assert set(row["speedup"]) == {"torch"} and set(row["variants"]) == {"ours-fast"}
    assert "roofline_pct" not in row["impls"]["ours"] and "gbps" in row["impls"]["ours"]  # cache-resident


# -- plots ------------------------------------------------------------------------------------------

def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_matplotlib(), reason="matplotlib is installed: the plot is written instead")
def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys):
    assert main(["plot", str(_write(tmp_path / "r.json", _doc(_rows()))), "-o", str(tmp_path)]) == 3
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib (optional) is not installed")
def test_plot_writes_a_png_per_family(tmp_path, capsys):
    assert main(["plot", str(_write(tmp_path / "r.json", _doc(_rows()))), "-o", str(tmp_path / "p")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert pngs == ["Test-CPU-9000-2c-hyper.png", "Test-CPU-9000-2c-packed_linear.png", "Test-CPU-9000-2c-search.png"]
    assert all((tmp_path / "p" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)


# -- the default run and its options --------------------------------------------------------------

# targets whose rows are --full only (each row alone costs what several default rows do)
FULL_ONLY_TARGET_CASES = {"packed_linear_group/dram/M1/4096x4096/4-g128", "realmodel/smollm2-*/w4g64-quantizers/ppl"}


def test_default_run_keeps_every_targeted_row():
    """A row moved to --full to shorten `make bench` must not take a target's figure with it."""
    import fnmatch

    from bench.registry import discover, select
    from bench.targets import ISSUE_TARGETS

    every, default = discover(), select(discover())
    for t in ISSUE_TARGETS:
        assert any(fnmatch.fnmatchcase(c.name, t.cases) for c in every), f"no case at all for target {t.cases}"
        if t.cases not in FULL_ONLY_TARGET_CASES:
            assert any(fnmatch.fnmatchcase(c.name, t.cases) for c in default), f"{t.cases} left the default run"


def test_small_and_output_options(tmp_path, capsys):
    from bench.__main__ import BUDGET_S, _run_parser, _timing_defaults

    for argv, want in (([], (BUDGET_S, 6, 256)), (["--full"], (BUDGET_S, 10, 256)), (["--small"], (0.0, 2, 16)),
                       (["--small", "--budget", "0.5", "--min-reps", "3"], (0.5, 3, 16))):
        args = _run_parser().parse_args(argv)
        _timing_defaults(args)
        assert (args.budget, args.min_reps, args.probe_mib) == want, argv
    assert main(["--out", str(tmp_path), "--json", str(tmp_path / "x.json"), "--list"]) == 2
    assert main(["--min-reps", "0", "--list"]) == 2
    assert "not both" in capsys.readouterr().err


# -- a tiny real run of the installed package from another directory --------------------------------

def test_installed_copy_runs_from_another_cwd(tmp_path):
    """setup.py's layout of the bench package (build_py: its modules and data, nothing else) runs
    `python -m bench --small` from a directory outside any checkout and writes ./bench-results."""
    site = tmp_path / "site"
    b = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # copies files, compiles nothing
    assert b.returncode == 0, b.stderr[-2000:]
    assert sorted(p.name for p in (site / "bench" / "data").iterdir()) == sorted(
        p.name for p in (REPO / "bench" / "data").iterdir())
    assert not (site / "bench" / "results").exists()
    for tree in site.iterdir():  # the checkout's pyeditor (with its built _C) stays the one imported
        if tree.name != "bench":
            shutil.rmtree(tree)
    env = {k: v for k, v in os.environ.items() if k != "PYEDITOR_BENCH_RESULTS"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), OMP_NUM_THREADS="1")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "bench", "--small", "--filter", "search/l2/1x256",
                        "--shape", "search:B=8,N=4,d=8", "--threads", "1"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("machine: "), r.stdout[:500]  # stdout is the table only
    assert [p.name for p in cwd.iterdir()] == ["bench-results"]
    files = sorted(p.name for p in (cwd / "bench-results").iterdir())
    assert len(files) == 2 and "latest.json" in files
    doc = load(cwd / "bench-results" / "latest.json")
    (row,) = doc["rows"]
    assert row["name"] == "search/l2/1x256-N256/fp32@B=8,N=4,d=8" and row["label"] == "nearest_prototype l2 B=8 d=8 N=4"
    assert row["impls"]["ours"]["max_abs_err"] == 0.0 and row["roles"]["faiss"] == "peer"
    assert doc["command"].startswith("python -m bench --small --filter search/l2/1x256 --shape")
    assert doc["machine"]["git_commit"] is None  # not this checkout's commit: the copy is not in it
