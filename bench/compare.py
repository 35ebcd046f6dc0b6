"""``python -m bench compare OLD.json NEW.json``: per case, the ratio of medians and whether the
change is beyond the spread of the two runs.

A change counts when the medians differ by more than half the two interquartile ranges together,
i.e. the middle halves of the two sets of samples do not overlap; smaller changes print as "~".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from bench.markdown import fmt_time
from bench.results import host_key, host_title
from bench.roles import OURS


@dataclass(frozen=True)
class Change:
    case: str
    label: str
    impl: str
    old_s: float
    new_s: float
    beyond_spread: bool

    @property
    def ratio(self) -> float:
        return self.new_s / self.old_s

    @property
    def verdict(self) -> str:
        if not self.beyond_spread:
            return "~"
        return "slower" if self.new_s > self.old_s else "faster"


def beyond_spread(old: dict[str, Any], new: dict[str, Any]) -> bool:
    half = (old.get("iqr_s") or 0.0) / 2 + (new.get("iqr_s") or 0.0) / 2
    return abs(new["median_s"] - old["median_s"]) > half


def changes(old: dict[str, Any], new: dict[str, Any], all_impls: bool = False) -> tuple[list[Change], list[str]]:
    """The timed impls both files have for each case both have (ours only unless ``all_impls``),
    in the new file's order, and notes on what only one file has."""
    old_rows = {r["name"]: r for r in old["rows"]}
    new_names = {r["name"] for r in new["rows"]}
    out, notes = [], []
    for row in new["rows"]:
        before = old_rows.get(row["name"])
        if before is None:
            continue
        impls = row.get("impls") or {}
        names = list(impls) if all_impls else [OURS]
        for impl in names:
            a, b = (before.get("impls") or {}).get(impl, {}), impls.get(impl, {})
            if "median_s" in a and "median_s" in b:
                out.append(Change(row["name"], row.get("label") or row["name"], impl, a["median_s"], b["median_s"],
                                  beyond_spread(a, b)))
            elif impl in impls or impl in (before.get("impls") or {}):
                notes.append(f"{row['name']} {impl}: no time in " + ("both files" if "median_s" not in a and
                                                                     "median_s" not in b else
                                                                     "OLD" if "median_s" not in a else "NEW"))
    only_old = [n for n in old_rows if n not in new_names]
    only_new = [r["name"] for r in new["rows"] if r["name"] not in old_rows]
    if only_old:
        notes.append(f"only in OLD ({len(only_old)}): " + ", ".join(only_old))
    if only_new:
        notes.append(f"only in NEW ({len(only_new)}): " + ", ".join(only_new))
    return out, notes


def _describe(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return (f"{doc.get('path', '?')}: commit {(m.get('git_commit') or 'unknown')[:12]}"
            f"{' (dirty)' if m.get('git_dirty') else ''}, {m.get('date', '?')}, {doc.get('command', '?')}")


def format_changes(old: dict[str, Any], new: dict[str, Any], all_impls: bool = False) -> tuple[str, list[Change]]:
    found, notes = changes(old, new, all_impls)
    lines = [f"OLD {_describe(old)}", f"NEW {_describe(new)}"]
    if host_key(old["machine"]) != host_key(new["machine"]):
        lines.append(f"WARNING: different hosts ({host_title(old['machine'])} vs {host_title(new['machine'])}); "
                     "ratios compare machines as much as code")
    lines.append("")
    width = max([len(c.label) for c in found] + [4])
    lines.append(f"{'case':<{width}}  {'impl':<14}{'old':>10}{'new':>10}{'new/old':>9}  change (beyond the spread?)")
    for c in found:
        lines.append(f"{c.label:<{width}}  {c.impl:<14}{fmt_time(c.old_s):>10}{fmt_time(c.new_s):>10}"
                     f"{c.ratio:>8.2f}x  {c.verdict}")
    slower = sum(c.verdict == "slower" for c in found)
    faster = sum(c.verdict == "faster" for c in found)
    lines += ["", f"{len(found)} compared: {slower} slower, {faster} faster beyond the spread "
                  "(|median change| > (IQR old + IQR new) / 2), the rest within it"]
    lines += notes
    return "\n".join(lines), found


def worst_slowdown(found: list[Change]) -> Optional[Change]:
    slower = [c for c in found if c.verdict == "slower"]
    return max(slower, key=lambda c: c.ratio) if slower else None
