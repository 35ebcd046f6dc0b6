"""Command line of the benchmark suite.

  python -m bench [--full] [--small] [--filter SUBSTR] [--shape FAMILY:K=V,...] [--list] [--out DIR]
                 [--json PATH] [--plot DIR]
      run the suite (default); results go to <results dir>/<host>-<date>-<commit>.json and latest.json,
      where the results dir is bench/results in a checkout, ./bench-results when installed elsewhere,
      $PYEDITOR_BENCH_RESULTS when set, or --out DIR
  python -m bench report [RESULTS.json ...] [-o BENCHMARKS.md]
      the results as Markdown: per host, one table per family, targets marked pass/miss
  python -m bench compare OLD.json NEW.json [--all] [--fail-slower PCT]
      per case, new/old ratio of medians, flagged when beyond the two runs' spread
  python -m bench plot [RESULTS.json ...] [-o DIR]
      a roofline / speedup PNG per family (needs matplotlib)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.results import LATEST, ResultsError, results_dir


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also bf16/fp16 and extra shapes")
    p.add_argument("--filter", action="append", metavar="SUBSTR",
                   help="only cases whose name or label contains SUBSTR (repeatable: any)")
    p.add_argument("--shape", action="append", metavar="FAMILY:KEY=VALUE,...",
                   help="run FAMILY's cases at your own sizes, e.g. quant:M=1,N=1024,K=1024 or search:B=4096,N=32 "
                        "(repeatable; keys are the case's arguments: see --list --shape FAMILY)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help=f"results dir for this run's timestamped file and {LATEST} (default: {results_dir()})")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results here only (default: a new timestamped file in the results dir "
                        f"and a copy at {LATEST})")
    p.add_argument("--small", action="store_true",
                   help="a quick check that the cases run: one short round of samples per impl (at least 2), "
                        "a 16 MiB bandwidth probe; the figures mean little (--shape sets smaller sizes)")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also write the PNG plots into DIR")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="pyeditor backend for 'ours' (default: native for device)")
    # the budget bounds the fast impls' share of the run; a µs impl still gets over a thousand
    # samples in 1 s, so its median moves far less than its interquartile spread
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of timed reps per impl (default {BUDGET_S:g}, --small 0)")
    # slow peers, not the budget, set the rest: min-reps bounds them
    p.add_argument("--min-reps", type=int, default=None,
                   help="samples per impl at least (default 6, --full 10, --small 2)")
    p.add_argument("--probe-mib", type=int, default=None, metavar="MIB",
                   help="size of the memory-bandwidth probe's buffers (default 256: far beyond the caches; "
                        "--small 16, whose rooflines then mean little)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each case wait up to S seconds for other processes to go idle")
    return p


BUDGET_S = 1.0


def _timing_defaults(args: argparse.Namespace) -> None:
    """Fill the timing options the user left out: --small's quick values, else the run's defaults."""
    if args.budget is None:
        args.budget = 0.0 if args.small else BUDGET_S
    if args.min_reps is None:
        args.min_reps = 2 if args.small else 10 if args.full else 6
    if args.probe_mib is None:
        args.probe_mib = 16 if args.small else 256


def _select(args: argparse.Namespace) -> list:
    from bench.registry import discover_modules, select
    from bench.shapes import apply_shapes, parse_shape

    modules = discover_modules()
    if args.shape:
        specs = [parse_shape(s) for s in args.shape]
        picked = {id(c) for c in select([c for cs in modules.values() for c in cs], full=args.full,
                                        filters=args.filter)}
        modules = {m: [c for c in cs if id(c) in picked] for m, cs in modules.items()}
        return apply_shapes(modules, specs)
    return select([c for cs in modules.values() for c in cs], full=args.full, filters=args.filter)


def run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    _timing_defaults(args)
    if args.budget < 0 or args.min_reps < 1:
        print("python -m bench: --budget must be >= 0 and --min-reps >= 1", file=sys.stderr)
        return 2
    if args.out is not None and args.json is not None:
        print("python -m bench: give --out DIR or --json PATH, not both", file=sys.stderr)
        return 2
    try:
        cases = _select(args)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    if args.list:
        from bench.shapes import accepted

        for c in cases:
            print(f"{c.name:<44} {'full' if c.full else 'default':<8} {', '.join(c.impls)}")
            if args.shape:
                print(f"    {c.make.func.__name__}(" + ", ".join(f"{k}={v!r}" for k, v in accepted(c).items()) + ")")
        return 0
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 1

    import torch

    from bench.contention import foreign_load, wait_until_idle
    from bench.machine import machine_info
    from bench.registry import Context, default_backend
    from bench.report import format_report
    from bench.results import document, write_run
    from bench.roofline import BandwidthProbe, ComputeProbe, best_of
    from bench.runner import add_compute_roofline, add_roofline, run_case

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    ctx = Context(device=args.device, backend=args.backend or default_backend(args.device))
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"{msg}  [{time.perf_counter() - start:.0f}s]", file=sys.stderr, flush=True)

    load = foreign_load()
    if load.get("contended"):
        print(f"WARNING: other processes are using {load['foreign_cores']:.1f} cores of this machine; "
              "timings will be noisy (rows measured under load are flagged)", file=sys.stderr)
    progress(f"measuring memory bandwidth on {args.device} with {threads} threads ...")
    if args.probe_mib < 1:
        print("python -m bench: --probe-mib must be at least 1", file=sys.stderr)
        return 2
    probe = BandwidthProbe(args.device, nbytes=args.probe_mib << 20, sync=ctx.sync)
    bw_start = probe.measure()
    compute = ComputeProbe(threads) if args.device == "cpu" else None
    peak_start = compute.measure() if compute is not None else None
    machine = machine_info(args.device)
    machine["load_at_start"] = load
    machine["ours_backend"] = ctx.backend if ctx.backend is not None else "auto"

    rows = []
    timing_kw = {"budget_s": args.budget, "min_reps": args.min_reps}
    for i, case in enumerate(cases, 1):
        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        before = probe.copy_gbps()  # bandwidth drifts on a shared host: each case gets its own
        progress(f"[{i}/{len(cases)}] {case.label} ...")
        row = run_case(case, ctx, timing_kw)
        if row.get("bytes"):  # rows without bytes to move have no roofline: no second probe
            add_roofline(row, max(before, probe.copy_gbps()))
        rows.append(row)

    progress("measuring memory bandwidth again ...")
    machine["bandwidth"] = best_of(bw_start, probe.measure())
    del probe
    if peak_start is not None and peak_start["fp32_gflops"]:
        runs = [peak_start["fp32_gflops"], compute.gflops()]
        machine["compute"] = {**peak_start, "fp32_gflops": max(runs), "fp32_gflops_runs": runs}
        for row in rows:  # the best of the run's start and end, as for the memory rooflines
            add_compute_roofline(row, machine["compute"]["fp32_gflops"])

    machine["wall_s"] = time.perf_counter() - start
    print(format_report(machine, rows), flush=True)
    paths = write_run(document(machine, rows, argv), out=args.json, directory=args.out)
    print(f"\nwrote {' and '.join(map(str, paths))} ({len(rows)} rows) in {machine['wall_s']:.0f} s", file=sys.stderr)
    if args.plot is not None:
        return _plot_files([paths[0]], args.plot)
    return 0


def _load_all(paths: list[Path]) -> list[dict]:
    from bench.results import load

    return [load(p) for p in paths]


def report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report",
                                description="BENCHMARKS.md from results files (regenerated whole).")
    p.add_argument("results", nargs="*", type=Path,
                   help=f"results files (default: {LATEST} in the results dir); per host and case the newest wins")
    p.add_argument("-o", "--output", type=Path, default=None, help="write here instead of stdout")
    args = p.parse_args(argv)
    from bench.markdown import render
    from bench.results import command_line

    files = args.results or [results_dir() / LATEST]
    text = render(_load_all(files), command_line(["report", *map(str, args.results)]))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compare",
                                description="Per case, the new/old ratio of medians; changes beyond the spread "
                                            "are flagged slower/faster.")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--all", action="store_true", help="every impl, not only ours")
    p.add_argument("--fail-slower", type=float, default=None, metavar="PCT",
                   help="exit 1 when a flagged slowdown exceeds PCT percent")
    args = p.parse_args(argv)
    from bench.compare import format_changes, worst_slowdown

    old, new = _load_all([args.old, args.new])
    text, found = format_changes(old, new, args.all)
    print(text)
    worst = worst_slowdown(found)
    if args.fail_slower is not None and worst is not None and worst.ratio > 1 + args.fail_slower / 100:
        print(f"FAIL: {worst.label} {worst.impl} is {100 * (worst.ratio - 1):.0f}% slower "
              f"(limit {args.fail_slower:g}%)", file=sys.stderr)
        return 1
    return 0


def _plot_files(files: list[Path], out_dir: Path) -> int:
    from bench.plot import PlotUnavailable, plot

    try:
        written = plot(_load_all(files), out_dir)
    except PlotUnavailable as e:
        print(f"python -m bench plot: {e}", file=sys.stderr)
        return 3
    for path in written:
        print(path)
    if not written:
        print("no family had a roofline or a peer to plot", file=sys.stderr)
    return 0


def plot_cmd(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench plot",
                                description="A % roofline and speedup PNG per host and family (needs matplotlib).")
    p.add_argument("results", nargs="*", type=Path, help=f"results files (default: {LATEST} in the results dir)")
    p.add_argument("-o", "--output-dir", type=Path, default=None, help="default: the results dir's plots/")
    args = p.parse_args(argv)
    return _plot_files(args.results or [results_dir() / LATEST], args.output_dir or results_dir() / "plots")


COMMANDS = {"report": report, "compare": compare, "plot": plot_cmd, "run": run}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0], None) if argv else None
    try:
        return command(argv[1:]) if command else run(argv)
    except ResultsError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
