"""One PNG per host and family: % of the memory roofline per impl, and ours' speedup over each peer.

matplotlib is optional (not a requirement of pyeditor or the suite); without it :func:`plot`
raises :class:`PlotUnavailable` with the install hint.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from bench.markdown import by_host
from bench.results import host_title
from bench.roles import OURS, row_role


TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("the plots need matplotlib, which is not installed (it is optional): "
                              "pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]]) -> tuple[dict[str, list], dict[str, list]]:
    """impl -> [% roofline per row] and peer -> [speedup per row] (None where the row lacks it)."""
    roof: dict[str, list] = {}
    speed: dict[str, list] = {}
    for i, row in enumerate(rows):
        impls = row.get("impls") or {}
        ours = impls.get(OURS, {}).get("median_s")
        for name, e in impls.items():
            if "roofline_pct" in e:
                roof.setdefault(name, [None] * len(rows))[i] = e["roofline_pct"]
            if ours and row_role(row, name) == "peer" and "median_s" in e:
                speed.setdefault(name, [None] * len(rows))[i] = e["median_s"] / ours
    return roof, speed


def _bars(ax, n_rows: int, series: dict[str, list], base: float = 0.0) -> None:
    """Grouped horizontal bars, one group per row; bars start at ``base`` (1 for speedups)."""
    height = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        ys = [i + j * height for i, v in enumerate(values) if v is not None]
        ax.barh(ys, [v - base for v in values if v is not None], height=height, left=base, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(n_rows)])
    ax.legend(fontsize=7, loc="best")


def plot_family(plt, title: str, rows: list[dict[str, Any]], path: Path) -> bool:
    """Write the family's figure; False when no row has a roofline or a peer to show."""
    roof, speed = _series(rows)
    panels = [p for p in (("roof", roof), ("speed", speed)) if p[1]]
    if not panels:
        return False
    labels = [textwrap.fill(r.get("label") or r["name"], 38) for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 + 5 * len(panels), 1.5 + 0.7 * len(rows)),
                             squeeze=False, sharey=True)
    for ax, (kind, series) in zip(axes[0], panels):
        if kind == "roof":
            _bars(ax, len(rows), series)
            ax.axvline(100, color="k", lw=0.8)
            ax.set_xlabel("% of the copy-bandwidth roofline")
        else:
            _bars(ax, len(rows), series, base=1.0)
            ax.set_xscale("log")
            vals = [v for vs in series.values() for v in vs if v is not None] + [1.0]
            ticks = [t for t in TICKS if min(vals) / 1.5 <= t <= max(vals) * 1.5]
            ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.axvline(1, color="k", lw=0.8)
            ax.set_xlabel("ours' speedup = peer time / ours (> 1: ours faster)")
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(docs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per host and family into ``out_dir``; returns the files written."""
    plt = _pyplot()
    written = []
    for entries in by_host(docs).values():
        machine = entries[0][0]["machine"]
        host = re.sub(r"[^A-Za-z0-9]+", "-", f"{machine.get('cpu_model', 'cpu')}-{machine.get('cores_usable')}c")
        families: dict[str, list] = {}
        for _, row in entries:
            families.setdefault(row.get("family") or row["name"].split("/")[0], []).append(row)
        for family, rows in families.items():
            path = Path(out_dir) / f"{host.strip('-')}-{family}.png"
            if plot_family(plt, f"{family} on {host_title(machine)}", rows, path):
                written.append(path)
    return written
