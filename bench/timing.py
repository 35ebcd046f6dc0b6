"""The timer: warm-up, then per-call time.perf_counter samples; report the median.

Each sample is one call, including freeing whatever the call returned (so an
allocating impl pays for its munmap too, as it would in real use).

``measure_interleaved`` times several impls of one case in round-robin blocks of
about ``block_s`` each, so slow drifts of a shared machine (other VMs, memory
bandwidth neighbours) hit every impl alike and the speedups stay meaningful.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

clock = time.perf_counter


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    mean_s: float
    iqr_s: float  # spread: 75th - 25th percentile
    p99_s: float  # 99th percentile, interpolated (close to the max when there are few samples)
    reps: int
    warmup_reps: int
    first_call_s: float  # includes compilation / lazy init
    contended_reps: int = 0  # samples taken while other processes competed for the CPU
    dropped_reps: int = 0  # contended samples left out (enough clean ones were had)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(samples: list[float], warm: int, first: float) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) >= 2 else samples[0]
    return Timing(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples),
                  mean_s=statistics.fmean(samples), iqr_s=q[2] - q[0], p99_s=p99, reps=len(samples),
                  warmup_reps=warm, first_call_s=first)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t = clock()
    fn()
    sync()
    return clock() - t


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    sync: Optional[Callable[[], None]] = None,
    min_reps: int = 10,
    max_reps: int = 2000,
    budget_s: float = 1.0,
    warmup_s: float = 0.1,
    min_warmup: int = 2,
    block_s: float = 0.05,
    drop_contended: bool = True,
    patience: float = 3.0,
) -> dict[str, Union[Timing, BaseException]]:
    """Time each impl: at least ``min_reps`` samples, more until ``budget_s`` per impl is spent.

    With ``drop_contended``, each round-robin round is checked for other processes'
    CPU use (bench.contention); contended rounds are dropped while enough clean ones
    can be had within ``patience`` x the budget; past that, all samples are used and
    ``Timing.contended_reps`` says how many came from contended rounds.
    An impl that raises (on its first call, e.g. a failing torch.compile, or later)
    gets the exception as its result; the others go on.
    """
    from bench.contention import CpuMonitor

    sync = sync or (lambda: None)
    out: dict[str, Union[Timing, BaseException]] = {}
    first: dict[str, float] = {}
    warm: dict[str, int] = {}
    est: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            first[name] = _timed(fn, sync)
            times: list[float] = []
            start = clock()
            while len(times) + 1 < min_warmup or clock() - start < warmup_s:
                times.append(_timed(fn, sync))
            warm[name] = len(times) + 1
            est[name] = max(statistics.median(times) if times else first[name], 1e-7)
        except Exception as e:
            out[name] = e

    live = [n for n in fns if n in est]
    clean: dict[str, list[float]] = {n: [] for n in live}
    dirty: dict[str, list[float]] = {n: [] for n in live}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        deadline, last_chance = t0 + budget_s * len(live), t0 + patience * budget_s * len(live)
        while live:
            mon = CpuMonitor() if drop_contended else None
            got: dict[str, list[float]] = {}
            for name in list(live):
                have = len(clean[name]) + len(dirty[name])
                k = max(1, min(int(block_s / est[name]), max_reps - have))
                got[name] = []
                try:
                    for _ in range(k):
                        got[name].append(_timed(fns[name], sync))
                except Exception as e:
                    out[name] = e
                    live.remove(name)
            contended = mon is not None and bool(mon.read().get("contended"))
            for name, ts in got.items():
                (dirty if contended else clean)[name].extend(ts)
            live = [n for n in live if len(clean[n]) + len(dirty[n]) < max_reps]
            now = clock()
            if now >= deadline and all(len(clean[n]) >= min_reps for n in live):
                break
            if now >= last_chance and all(len(clean[n]) + len(dirty[n]) >= min_reps for n in live):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in clean:
        if name in out:
            continue
        use_all = len(clean[name]) < min_reps
        samples = clean[name] + dirty[name] if use_all else clean[name]
        if samples:
            t = _stats(samples, warm[name], first[name])
            t.contended_reps = len(dirty[name]) if use_all else 0
            t.dropped_reps = 0 if use_all else len(dirty[name])
            out[name] = t
    return {n: out[n] for n in fns if n in out}


def measure(fn: Callable[[], Any], **kw: Any) -> Timing:
    """Time one callable (see measure_interleaved); raises what ``fn`` raises."""
    r = measure_interleaved({"fn": fn}, **kw)["fn"]
    if isinstance(r, BaseException):
        raise r
    return r
