#!/usr/bin/env python3
"""`make gpu-check`: the one command for the first time a CUDA GPU is available.

Steps, each under `timeout`, all within --budget-s seconds: build the CUDA extension (USE_CUDA=1),
print `python -m pyeditor info` and require the cuda and triton backends, run the tests marked
`cuda` or `triton` with Triton compiled for the GPU (TRITON_INTERPRET unset), run
`python -m pyeditor verify --device cuda`, and run a short bench on cuda. Everything goes to
bench/results/gpu-check-<host>-<date>.log, with the verify and bench JSON beside it.

Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 when there is no
usable GPU (checked first, before anything is built or run).
Standard library only, so `--preflight` runs before the project's environment exists.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one bench case per op family, at the shapes the CPU table also reports
BENCH_FILTERS = ("apply_edit/serving/4096x4096", "hyper/edited_linear", "packed_linear/dram/M1/4096x4096/4",
                 "search/l2/65536x64-N16")
NO_GPU = 2


@dataclass
class Step:
    name: str
    argv: list[str]
    max_s: int  # the most this step may take
    reserve_s: int  # kept back for it while earlier steps run
    env: dict = field(default_factory=dict)  # None values unset the variable


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=_seconds, default=480.0, metavar="S",
                   help="wall-clock limit for all steps together (default 480)")
    p.add_argument("--python", default=sys.executable, help="the project's interpreter (default: this one)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results", metavar="DIR",
                   help="where the log and JSON files go (default bench/results)")
    p.add_argument("--bench-filter", action="append", metavar="SUBSTR",
                   help="bench cases to run (repeatable; default: " + ", ".join(BENCH_FILTERS) + ")")
    p.add_argument("--skip", action="append", default=[], choices=["build", "info", "tests", "verify", "bench"],
                   help="leave out a step (repeatable)")
    p.add_argument("--preflight", action="store_true", help="only look for a GPU; exit 2 without one")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    return p.parse_args(argv)


def find_gpu() -> tuple[bool, str]:
    """(found, description) from nvidia-smi, or the driver's /proc entries without it."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"nvidia-smi -L failed: {exc}"
        gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
        if out.returncode == 0 and gpus:
            return True, "\n".join(gpus)
        return False, f"nvidia-smi -L lists no GPU ({(out.stderr or out.stdout).strip() or 'no output'})"
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir() and any(proc.iterdir()):
        return True, f"{len(list(proc.iterdir()))} GPU(s) in {proc} (no nvidia-smi)"
    return False, "no nvidia-smi on PATH and no NVIDIA driver entries in /proc/driver/nvidia/gpus"


def torch_cuda(python: str) -> tuple[bool, str]:
    """(usable, description) of the interpreter's torch: a CUDA build that sees a GPU."""
    code = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'available': ok, 'device': torch.cuda.get_device_name(0) if ok else None, "
            "'capability': list(torch.cuda.get_device_capability(0)) if ok else None}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return False, f"cannot ask {python} about torch: {exc}"
    if info["cuda"] is None:
        return False, (f"torch {info['torch']} in {python} is a CPU-only build; install a CUDA build of the "
                       f"same version (pip install torch=={info['torch'].split('+')[0]} --index-url "
                       "https://download.pytorch.org/whl/cu<XY>, XY the driver's CUDA version)")
    if not info["available"]:
        return False, (f"torch {info['torch']} (CUDA {info['cuda']}) sees no GPU: check the driver and "
                       "CUDA_VISIBLE_DEVICES")
    return True, (f"torch {info['torch']}, CUDA {info['cuda']}, {info['device']} "
                  f"(compute capability {'.'.join(map(str, info['capability']))})")


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = shutil.which("nvcc")
    if found is None and home and Path(home, "bin", "nvcc").exists():
        found = str(Path(home, "bin", "nvcc"))
    return found


def steps(args: argparse.Namespace, stem: Path) -> list[Step]:
    py = args.python
    gpu_env = {"TRITON_INTERPRET": None}  # Triton compiled for the GPU, never the interpreter
    # `pyeditor info`, then fail unless both GPU backends loaded
    info = ("import sys, pyeditor, pyeditor.__main__ as cli; cli._info(); "
            "sys.exit(0 if {'cuda', 'triton'} <= set(pyeditor.backends.available('cuda')) else 1)")
    bench = [py, "-m", "bench", "--device", "cuda", "--budget", "0.3", "--min-reps", "3",
             "--json", f"{stem}-bench.json"]
    for f in args.bench_filter or BENCH_FILTERS:
        bench += ["--filter", f]
    all_steps = [
        Step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
             270, 60, {**gpu_env, "USE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}),
        Step("info", [py, "-c", info], 60, 20, gpu_env),
        Step("tests", [py, "-m", "pytest", "-q", "-m", "cuda or triton", "tests", "--durations=15",
                       "-p", "no:cacheprovider"], 180, 60, gpu_env),
        Step("verify", [py, "-m", "pyeditor", "verify", "--device", "cuda", "--json", f"{stem}-verify.json"],
             120, 45, gpu_env),
        Step("bench", bench, 120, 45, gpu_env),
    ]
    return [s for s in all_steps if s.name not in args.skip]


class Log:
    """Lines to the terminal and the results file at once."""

    def __init__(self, path: Path):
        self.file = open(path, "w", buffering=1)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")


def run_step(step: Step, limit: int, log: Log) -> int:
    env = dict(os.environ)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log(f"\n=== {step.name}: {shlex.join(step.argv)}  (limit {limit} s)")
    proc = subprocess.Popen(["timeout", "-k", "10", str(limit), *step.argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in proc.stdout:
        log(line.rstrip("\n"))
    return proc.wait()


def _header(log: Log, args: argparse.Namespace, gpu: str, torch_info: str) -> None:
    def cmd(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"({shlex.join(argv)}: {exc})"

    log(f"gpu-check on {socket.gethostname()} at {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    dirty = " (with local changes)" if cmd(["git", "status", "--porcelain"]) else ""
    log(f"commit {cmd(['git', 'rev-parse', 'HEAD'])}{dirty}")
    log(f"command: {shlex.join(sys.argv)}; budget {args.budget_s:g} s")
    log(f"python {args.python}: {torch_info}")
    log(gpu)
    if shutil.which("nvidia-smi"):
        log(cmd(["nvidia-smi"]))
    found = nvcc()
    version = cmd([found, "--version"]).splitlines()[-1:] if found else []
    log(f"nvcc: {found} {' '.join(version)}" if found else "nvcc: not found (the CUDA build needs it, or CUDA_HOME)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    stem = args.results_dir / f"gpu-check-{host}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    plan = steps(args, stem)
    if args.dry_run:
        for s in plan:
            env = "".join(f"{k}={v} " if v is not None else f"(no {k}) " for k, v in s.env.items())
            print(f"{s.name:<7} up to {s.max_s:>3} s  {env}{shlex.join(s.argv)}")
        print(f"log: {stem}.log; budget {args.budget_s:g} s")
        return 0
    found, gpu = find_gpu()
    if not found:
        print(f"gpu-check: no CUDA GPU here ({gpu}); nothing was built or run", file=sys.stderr)
        return NO_GPU
    if args.preflight:
        print(f"gpu-check: {gpu}")
        return 0
    usable, torch_info = torch_cuda(args.python)
    if not usable:
        print(f"gpu-check: {torch_info}; nothing was built or run", file=sys.stderr)
        return NO_GPU
    if shutil.which("timeout") is None:
        print("gpu-check: needs coreutils `timeout` on PATH", file=sys.stderr)
        return NO_GPU

    args.results_dir.mkdir(parents=True, exist_ok=True)
    log = Log(stem.with_suffix(".log"))
    _header(log, args, gpu, torch_info)
    deadline = start + args.budget_s
    results = []
    for i, step in enumerate(plan):
        later = sum(s.reserve_s for s in plan[i + 1:])
        limit = int(min(step.max_s, deadline - time.monotonic() - later))
        if step.name == "build" and nvcc() is None:
            log("\n=== build: no nvcc on PATH and no CUDA_HOME: the CUDA extension cannot be built")
            results.append((step.name, None, 0.0, "FAILED (no nvcc)"))
            continue
        if limit < 10:
            log(f"\n=== {step.name}: skipped, the {args.budget_s:g} s budget is spent")
            results.append((step.name, None, 0.0, "SKIPPED (no time left)"))
            continue
        t0 = time.monotonic()
        rc = run_step(step, limit, log)
        status = "ok" if rc == 0 else "TIMED OUT" if rc in (124, 137) else "FAILED"
        results.append((step.name, rc, time.monotonic() - t0, status))

    log("\n=== summary")
    for name, rc, secs, status in results:
        log(f"{name:<7} {status:<22} rc={rc if rc is not None else '-':<4} {secs:6.1f} s")
    ok = all(status == "ok" for *_, status in results)
    log(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s; log {stem}.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
