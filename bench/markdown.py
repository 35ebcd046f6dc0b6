"""BENCHMARKS.md from results files: per host, one table per family, regenerated whole each time.

Rows of several files are merged per host (CPU model, ISA level, cores, last-level cache): for each
case the newest file's row is shown, and every table names the run(s) it comes from (commit, date,
command). Columns: ours (median, spread), pyeditor's own other modes, peers (with speedup),
% of the memory roofline, and the issues' targets with a pass/miss mark (bench/targets.py).
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Optional

from bench.results import host_key, host_title, isa, llc
from bench.roles import OURS, row_role
from bench.targets import ISSUE_TARGETS, UNMEASURED, Outcome, Target, for_row

OP_TEXT = {">=": "≥", "<=": "≤"}


def fmt_time(s: Optional[float]) -> str:
    if s is None or not isinstance(s, (int, float)) or math.isnan(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            v = s / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{s * 1e9:.0f} ns"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def spread(e: dict[str, Any]) -> str:
    """IQR as % of the median, the min-max range and the sample count."""
    med, iqr = e.get("median_s"), e.get("iqr_s")
    parts = []
    if med and iqr is not None:
        parts.append(f"IQR {100 * iqr / med:.1f}%")
    if e.get("min_s") is not None and e.get("max_s") is not None:
        parts.append(f"{fmt_time(e['min_s'])}–{fmt_time(e['max_s'])}")
    if e.get("reps"):
        parts.append(f"n={e['reps']}" + (f", {e['contended_reps']} under load" if e.get("contended_reps") else ""))
    return ", ".join(parts)


def _short_error(text: str, limit: int = 90) -> str:
    first = " ".join(str(text).split())
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _impl_entries(row: dict[str, Any], role: str) -> list[str]:
    impls = row.get("impls") or {}
    ours = impls.get(OURS, {}).get("median_s")
    out = []
    for name, e in impls.items():
        if row_role(row, name) != role:
            continue
        if "median_s" not in e:
            out.append(f"{name}: failed ({_short_error(e.get('error', '?'))})")
            continue
        text = f"{name} {fmt_time(e['median_s'])} (IQR {100 * e.get('iqr_s', 0) / e['median_s']:.0f}%)"
        if ours and role == "peer":
            text += f" → **{e['median_s'] / ours:.2f}x**"
        elif ours and role == "own":
            text += f", {e['median_s'] / ours:.2f}× ours' time"
        out.append(text)
    return out


def _roofline(row: dict[str, Any]) -> str:
    ours = (row.get("impls") or {}).get(OURS, {})
    parts = []
    pct = ours.get("roofline_pct")
    if pct is not None:
        gbps = ours.get("gbps")
        text = f"{pct:.0f}%" + (f" ({gbps:.1f} GB/s)" if gbps else "")
        parts.append(text + " †" if pct > 100 else text)
    if ours.get("compute_pct") is not None:
        parts.append(f"{ours['compute_pct']:.0f}% compute ({ours['gflops']:.0f} GFLOP/s)")
    return "<br>".join(parts) or "-"


def outcome_text(o: Outcome) -> str:
    t = o.target
    if o.passed is None:
        return f"{t.what}: not measured ({t.source})"
    mark = "pass ✅" if o.passed else "**miss** ❌"
    return f"{t.what}: {o.value:.3g} (target {OP_TEXT[t.op]} {o.bound:.3g}, {t.source}) {mark}"


def _ours_cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {_short_error(row['error'])}"
    e = (row.get("impls") or {}).get(OURS)
    if e is None:
        return "(no ours impl)"
    if "median_s" not in e:
        return f"failed: {_short_error(e.get('error', '?'))}"
    return f"**{fmt_time(e['median_s'])}**<br>{spread(e)}"


def _label(row: dict[str, Any]) -> str:
    text = row.get("label") or row["name"]
    if row.get("contended"):
        text += " ⚠"
    return text


def family_table(rows: list[dict[str, Any]], targets: list[Target]) -> list[str]:
    lines = ["| case | ours: median<br>spread | pyeditor's other modes | peers → speedup (peer time / ours) "
             "| % roofline | targets | derived figures |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [_label(row), _ours_cell(row), "<br>".join(_impl_entries(row, "own")) or "-",
                 "<br>".join(_impl_entries(row, "peer")) or "-", _roofline(row),
                 "<br>".join(outcome_text(o) for o in for_row(row, targets)) or "-",
                 _short_error((row.get("extra") or {}).get("summary", "") or "-", 300)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _run_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    commit = (m.get("git_commit") or "unknown")[:12] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    return (f"commit `{commit}`, {m.get('date', '?')}, `{doc.get('command', '?')}`, "
            f"torch threads {m.get('torch_threads', '?')}, backend {m.get('ours_backend', '?')}, "
            f"torch {m.get('torch', '?')}")


def _compute_text(m: dict[str, Any]) -> str:
    peak = (m.get("compute") or {}).get("fp32_gflops")
    return f"; fp32 FMA peak {peak:.0f} GFLOP/s (fma_probe, all threads)" if peak else ""


def _host_block(entries: list[tuple[dict[str, Any], dict[str, Any]]], targets: list[Target]) -> list[str]:
    """entries: (doc, row) pairs of one host, newest row per case already chosen."""
    newest = max((doc for doc, _ in entries), key=lambda d: d["machine"].get("date") or "")
    m = newest["machine"]
    bw = m.get("bandwidth") or {}
    lines = [f"## {host_title(m)}", "",
             f"ISA: {isa(m)}; last-level cache {llc(m)}; {m.get('cores_usable', '?')} usable cores; "
             f"memory bandwidth copy {bw.get('copy_gbps', float('nan')):.1f} GB/s, read "
             f"{bw.get('read_gbps', float('nan')):.1f} GB/s (best of the newest run's start and end)"
             + _compute_text(m), ""]
    families: dict[str, list[tuple[dict, dict]]] = {}
    for doc, row in entries:
        families.setdefault(row.get("family") or row["name"].split("/")[0], []).append((doc, row))
    for family, pairs in families.items():
        docs = []
        for doc, _ in pairs:
            if not any(d is doc for d in docs):
                docs.append(doc)
        lines += [f"### {family}", ""]
        lines += [("Run: " if len(docs) == 1 else "Runs: ") + "; ".join(_run_line(d) for d in docs), ""]
        lines += family_table([row for _, row in pairs], targets) + [""]
    names = [row["name"] for _, row in entries]
    missing = [t for t in targets if not any(fnmatch.fnmatchcase(n, t.cases) for n in names)]
    if missing:
        lines += ["Targets with no row in these results (rerun those cases, or `--full`):", ""]
        lines += [f"- {t.what} ({t.source}; cases `{t.cases}`)" for t in missing] + [""]
    return lines


def by_host(docs: list[dict[str, Any]]) -> dict[tuple, list[tuple[dict, dict]]]:
    """Per host, each case's row from the newest file that has it (in the place the case first had)."""
    hosts: dict[tuple, dict[str, tuple[dict, dict]]] = {}
    for doc in sorted(docs, key=lambda d: d["machine"].get("date") or ""):
        rows = hosts.setdefault(host_key(doc["machine"]), {})
        for row in doc["rows"]:
            rows[row["name"]] = (doc, row)
    return {k: list(v.values()) for k, v in hosts.items()}


def render(docs: list[dict[str, Any]], command: str, targets: Optional[list[Target]] = None) -> str:
    targets = ISSUE_TARGETS if targets is None else targets
    lines = ["# Benchmarks", "",
             f"Generated by `{command}` from the suite's results files; do not edit by hand. To refresh: "
             "`python -m bench` (or `make bench`, `ARGS=--full` for every row), then this command.", "",
             "How to read the tables: times are medians of interleaved rounds (bench/timing.py); spread = the "
             "interquartile range as % of the median, the fastest and slowest sample, and the sample count. "
             "Peers are other libraries or plain torch; speedup = peer time / ours (> 1: ours is faster). "
             "pyeditor's other modes (ours-fast = int8 activations, ...) are shown as a fraction of ours' time "
             "and are not counted as peers. % roofline = the bytes the op must move / the copy bandwidth "
             "measured around the case, over ours' time; cache-resident rows have none; † marks rows above "
             "100% (data partly in cache, so the DRAM roofline does not bound them). Rows that declare their "
             "floating-point work also show % compute = their GFLOP/s over the host's fp32 FMA peak (a "
             "multiply-add counts 2; the peak is pyeditor's fma_probe on every thread, the best of the run's "
             "start and end). ⚠ = measured while other "
             "processes used the CPU. Targets are the figures issues set (bench/targets.py).", ""]
    for entries in by_host(docs).values():
        lines += _host_block(entries, targets)
    if UNMEASURED:
        lines += ["## Targets no row measures yet", ""]
        lines += [f"- {what} ({source})" for source, what in UNMEASURED] + [""]
    return "\n".join(lines).rstrip() + "\n"
