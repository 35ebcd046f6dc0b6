"""Command line: ``python -m bench [--full] [--filter SUBSTR] [--list] [--json PATH]``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bench.contention import BUSY_CORES_FLAG, foreign_load, wait_until_idle
from bench.machine import machine_info
from bench.registry import Context, default_backend, discover, select
from bench.report import format_report, write_json
from bench.roofline import BandwidthProbe, best_of
from bench.runner import add_roofline, run_case

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--full", action="store_true", help="also bf16/fp16 and extra shapes")
    p.add_argument("--filter", action="append", metavar="SUBSTR",
                   help="only cases whose name or label contains SUBSTR (repeatable: any)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="results file (default bench/results/latest.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="pyeditor backend for 'ours' (default: native for device)")
    # 1.5 s keeps the default run near 5 minutes on the 2-core CI machine (2 s took 6.3 minutes
    # once the packed rows gained a second read peer and a 4x-L3 working set)
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed reps per impl (default 1.5)")
    # at least 6 samples per impl by default, 10 with --full: the slow peers (0.3-0.7 s a call on the
    # 2026-12-04 AMD Zen 3 host) made min-reps, not the budget, set the default run's length (6.3 min)
    p.add_argument("--min-reps", type=int, default=None, help="samples per impl at least (default 6, --full 10)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each case wait up to S seconds for other processes to go idle")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cases = select(discover(), full=args.full, filters=args.filter)
    if args.list:
        for c in cases:
            print(f"{c.name:<44} {'full' if c.full else 'default':<8} {', '.join(c.impls)}")
        return 0
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 1

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
    probe = BandwidthProbe(args.device, sync=ctx.sync)
    bw_start = probe.measure()
    machine = machine_info(args.device)
    machine["load_at_start"] = load
    machine["ours_backend"] = ctx.backend if ctx.backend is not None else "auto"

    rows = []
    min_reps = args.min_reps if args.min_reps is not None else (10 if args.full else 6)
    timing_kw = {"budget_s": args.budget, "min_reps": min_reps}
    for i, case in enumerate(cases, 1):
        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        before = probe.copy_gbps()  # bandwidth drifts on a shared host: each case gets its own
        progress(f"[{i}/{len(cases)}] {case.label} ...")
        row = run_case(case, ctx, timing_kw)
        add_roofline(row, max(before, probe.copy_gbps()))
        rows.append(row)

    progress("measuring memory bandwidth again ...")
    machine["bandwidth"] = best_of(bw_start, probe.measure())
    del probe

    machine["wall_s"] = time.perf_counter() - start
    print(format_report(machine, rows))
    write_json(args.json, machine, rows, sys.argv if argv is None else argv)
    print(f"\nwrote {args.json} ({len(rows)} rows) in {machine['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
