"""Peak extra CPU memory of a call, measured (not estimated) from torch.profiler's memory events.

Every allocation through the c10 CPU allocator (tensors, and the scratch the C++ kernels take
from it) is an event with its size; the running sum of sizes in time order, and its maximum, is
the memory the call held beyond what existed before it. Used by the assignment tests and bench
rows to check ``assign_prototypes`` against the [P, B, n] edits the plain form builds.
"""
from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Largest number of bytes allocated and not yet freed at any point while ``fn()`` ran
    (its result included while it is alive)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their order
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
