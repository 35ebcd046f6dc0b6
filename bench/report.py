"""The stdout table of a run (the results file: bench/results.py; BENCHMARKS.md: bench/markdown.py)."""
from __future__ import annotations

import math
from typing import Any, Optional

from bench.results import isa, llc
from bench.roles import row_role
from bench.targets import Outcome, for_row

MiB = 1 << 20


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.1f}"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _oneline(text: str, limit: int = 200) -> str:
    flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _methods(by: Any) -> str:
    return ", ".join(f"{k} {_num(v, '.1f')}" for k, v in by.items()) if isinstance(by, dict) else "n/a"


def header(machine: dict[str, Any]) -> str:
    bw = machine.get("bandwidth", {})
    return "\n".join([
        f"machine: {machine.get('cpu_model')}, {machine.get('cores_usable')} cores, "
        f"{machine.get('torch_threads')} torch threads, ISA {isa(machine)}, last-level cache {llc(machine)}, "
        f"caches {machine.get('caches')}",
        f"software: torch {machine.get('torch')}, triton {machine.get('triton')}, "
        f"python {machine.get('python')}, commit {(machine.get('git_commit') or 'none')[:12]}"
        f"{' (dirty)' if machine.get('git_dirty') else ''}, {machine.get('date')}",
        f"bandwidth ({(bw.get('tensor_bytes') or 0) >> 20} MiB fp32, best of {bw.get('reps')}, start/end of run): copy "
        f"{'/'.join(_num(x, '.1f') for x in bw.get('copy_gbps_runs', []))} GB/s, read "
        f"{'/'.join(_num(x, '.1f') for x in bw.get('read_gbps_runs', []))} GB/s, write "
        f"{'/'.join(_num(x, '.1f') for x in bw.get('write_gbps_runs', []))} GB/s (copy and read: the faster of "
        f"torch's op and the multi-stream probe; at start copy {_methods(bw.get('copy_gbps_by_method'))}, read "
        f"{_methods(bw.get('read_gbps_by_method'))}); each case's roofline = bytes / copy bandwidth measured around "
        "that case",
    ] + ([f"compute: fp32 FMA peak {'/'.join(_num(x, '.0f') for x in machine['compute']['fp32_gflops_runs'])} "
          f"GFLOP/s start/end ({machine['compute']['method']}); a case with flops gets % of the best"]
         if (machine.get("compute") or {}).get("fp32_gflops_runs") else []))


def _case_block(i: int, row: dict[str, Any]) -> list[str]:
    head = f"[{i}] {row['label']}"
    if row.get("bytes") and row.get("roofline_s") is None:
        head += f"   {row['bytes'] / MiB:.1f} MiB, cache-resident (no DRAM roofline)"
    elif row.get("bytes"):
        head += (f"   {row['bytes'] / MiB:.1f} MiB moved, roofline {_ms(row.get('roofline_s'))} ms "
                 f"at {_num(row.get('copy_gbps'), '.1f')} GB/s")
    if "ours" in row.get("impls", {}):
        head += f", backend {row.get('backend')}"
    lines = [head]
    load = row.get("load") or {}
    dropped = sum(e.get("dropped_reps", 0) for e in row.get("impls", {}).values())
    if row.get("contended"):
        lines.append(f"    !! contended: other processes used {load.get('foreign_cores', 0):.2f} cores on average; "
                     "reps marked ! include samples taken under that load")
    elif dropped:
        lines.append(f"    (other processes were busy at times: {dropped} samples from contended rounds dropped)")
    kept = [f"{len(row[k])} {what}" for k, what in (("output", "line(s) of library output"),
                                                     ("warnings", "warning(s)")) if row.get(k)]
    if kept:
        lines.append(f"    ({' and '.join(kept)} kept in the results file's row)")
    if "error" in row:
        return lines + [f"    ERROR {_oneline(row['error'], 300)}"]
    lines.append(f"    {'impl':<16}{'role':<6}{'median ms':>10}{'GB/s':>8}{'%roof':>8}{'t/ours':>8}"
                 f"{'max|err|':>10}{'reps':>6}  spread(IQR)")
    for name, e in row["impls"].items():
        role = row_role(row, name)
        if "error" in e:
            lines.append(f"    {name:<16}{role:<6}ERROR {_oneline(e['error'])}")
            continue
        err = e.get("max_abs_err")
        err_s = _num(err, ".1e") + ("!" if e.get("error_above_tol") else "")
        if "check_error" in e:
            err_s = "check failed"
        ours = row["impls"].get("ours", {}).get("median_s")
        rel = "-" if not ours or name == "ours" else f"{e['median_s'] / ours:.2f}"
        lines.append(f"    {name:<16}{role:<6}{_ms(e['median_s']):>10}{_num(e.get('gbps'), '.1f'):>8}"
                     f"{_pct(e.get('roofline_pct')):>8}{rel:>8}"
                     f"{err_s:>10}{str(e['reps']) + ('!' if e.get('contended_reps') else ''):>6}  {100 * e['iqr_s'] / e['median_s']:.1f}%"
                     + (f"  {e['gflops']:.0f} GFLOP/s = {e['compute_pct']:.0f}% of peak" if "compute_pct" in e else ""))
        if "check_error" in e:
            lines.append(f"      check: {e['check_error'][:200]}")
    extra = row.get("extra") or {}
    if "summary" in extra:
        lines.append(f"    => {extra['summary']}")
    for o in for_row(row):
        lines.append(f"    target ({o.target.source}): {o.target.what}: {_outcome(o)}")
    return lines


def _outcome(o: Outcome) -> str:
    if o.passed is None:
        return "not measured (figure missing)"
    return f"{o.value:.3g} {o.target.op} {o.bound:.3g} {'pass' if o.passed else 'MISS'}"


def _load(row: dict[str, Any]) -> str:
    load = row.get("load") or {}
    return "-" if "foreign_cores" not in load else f"{load['foreign_cores']:.1f}" + ("!" if row.get("contended") else "")


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'case':<42}{'ours ms':>9}{'GB/s':>7}{'%roof':>7}{'max|err|':>10}{'load':>6}  speedup vs peers"]
    for r in rows:
        if "ours" not in r.get("impls", {}) and "error" not in r:
            continue  # rows without an "ours" impl (e.g. first-touch) are not comparisons
        if "time_s" not in r:
            why = r.get("error") or r.get("impls", {}).get("ours", {}).get("error", "?")
            out.append(f"{r['label']:<42}  ERROR {_oneline(why, 100)}")
            continue
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("speedup", {}).items() if row_role(r, k) == "peer")
        fails = [k for k, e in r["impls"].items() if "error" in e]
        if fails:
            sp += (", " if sp else "") + ", ".join(f"{k} failed" for k in fails)
        out.append(f"{r['label']:<42}{_ms(r['time_s']):>9}{_num(r.get('gbps'), '.1f'):>7}"
                   f"{_pct(r.get('roofline_pct')):>7}{_num(r.get('max_abs_err'), '.1e'):>10}"
                   f"{_load(r):>6}  {sp}")
    return out


def format_report(machine: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [header(machine), ""]
    for i, row in enumerate(rows, 1):
        lines += _case_block(i, row) + [""]
    summ = summary_table(rows)
    if len(summ) > 1:
        lines += ["summary (speedup vs peers = peer time / ours, >1: ours is faster; pyeditor's own other modes and "
                  "the roofline reads are not peers; t/ours above = impl time / ours time; %roof = roofline time / "
                  "time; load = cores other processes used meanwhile, ! = some samples taken under that load)"] + summ
    return "\n".join(lines)

