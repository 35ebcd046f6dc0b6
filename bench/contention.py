"""How much CPU other processes used while we measured (this machine is shared).

On 2 cores, one busy neighbour process is enough to stall torch's 2-thread
parallel regions for a scheduler slice (~8 ms) each: an op made of many small
parallel calls then runs 10-100x slower. Rows measured under such load are flagged.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_CORES_FLAG = 0.25  # foreign CPU use above this many cores marks a row "contended"


def _system_busy_s() -> Optional[tuple[float, float]]:
    """(busy seconds over all CPUs, steal seconds) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMonitor:
    """Foreign (other processes') CPU use in cores, and hypervisor steal, over an interval."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._sys = _system_busy_s()
        self._self = _self_cpu_s()

    def read(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t
        now = _system_busy_s()
        if now is None or self._sys is None or wall <= 0:
            return {}
        busy = now[0] - self._sys[0]
        ours = _self_cpu_s() - self._self
        foreign = max(0.0, busy - ours) / wall
        return {"foreign_cores": round(foreign, 3), "steal_cores": round((now[1] - self._sys[1]) / wall, 3),
                "contended": foreign > BUSY_CORES_FLAG}


def foreign_load(sample_s: float = 0.5) -> dict[str, Any]:
    """Sleep ``sample_s`` and report what others used meanwhile."""
    mon = CpuMonitor()
    time.sleep(sample_s)
    return mon.read()


def wait_until_idle(max_wait_s: float, sample_s: float = 0.5) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes use < BUSY_CORES_FLAG cores."""
    deadline = time.perf_counter() + max_wait_s
    load = foreign_load(sample_s)
    while load.get("contended") and time.perf_counter() < deadline:
        load = foreign_load(sample_s)
    return load
