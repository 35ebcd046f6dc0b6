"""This machine's memory bandwidth, measured in the same run as the cases.

copy:  dst.copy_(src) into a preallocated buffer, counted as read + write = 2 * nbytes
read:  src.sum(), counted as nbytes
write: dst.fill_(0), counted as nbytes
256 MiB fp32 tensors (far beyond the caches); best of several reps after warm-up.
The roofline time of a case is its bytes-that-must-move / copy bandwidth.

The bandwidth a VM gets varies over minutes (measured here: 37 to 65 GB/s copy in
one afternoon), so the CLI re-measures copy bandwidth right before every case and
uses that for the case's roofline.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from bench.timing import measure

MiB = 1 << 20


class BandwidthProbe:
    """Holds two touched 256 MiB buffers so repeated measurements cost no page faults."""

    def __init__(self, device: str = "cpu", nbytes: int = 256 * MiB,
                 sync: Optional[Callable[[], None]] = None) -> None:
        n = nbytes // 4
        self.src = torch.arange(n, dtype=torch.float32, device=device)  # distinct pages, all touched
        self.dst = torch.empty_like(self.src).fill_(-1.0)
        self.sync = sync

    def _best(self, fn: Callable[[], Any], reps: int):
        return measure(fn, sync=self.sync, min_reps=reps, max_reps=reps, budget_s=0.0,
                       min_warmup=2, warmup_s=0.0, drop_contended=False)

    def copy_gbps(self, reps: int = 5) -> float:
        return 2 * self.src.nbytes / self._best(lambda: self.dst.copy_(self.src), reps).min_s / 1e9

    def measure(self, reps: int = 8) -> dict[str, Any]:
        nb = self.src.nbytes
        copy = self._best(lambda: self.dst.copy_(self.src), reps)
        read = self._best(lambda: self.src.sum(), reps)
        write = self._best(lambda: self.dst.fill_(0.0), reps)
        return {
            "copy_gbps": 2 * nb / copy.min_s / 1e9,
            "read_gbps": nb / read.min_s / 1e9,
            "write_gbps": nb / write.min_s / 1e9,
            "copy_gbps_median": 2 * nb / copy.median_s / 1e9,
            "read_gbps_median": nb / read.median_s / 1e9,
            "write_gbps_median": nb / write.median_s / 1e9,
            "tensor_bytes": nb,
            "reps": reps,
            "method": "copy: dst.copy_(src) 2*nbytes; read: src.sum() nbytes; "
                      "write: dst.fill_(0) nbytes; fp32, best of reps",
        }


def measure_bandwidth(device: str = "cpu", nbytes: int = 256 * MiB, reps: int = 8,
                      sync: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    return BandwidthProbe(device, nbytes, sync).measure(reps)


def best_of(*runs: dict[str, Any]) -> dict[str, Any]:
    """Combine several measurements (e.g. start and end of a run): best of each kind."""
    out = dict(runs[0])
    for kind in ("copy", "read", "write"):
        out[f"{kind}_gbps"] = max(r[f"{kind}_gbps"] for r in runs)
        out[f"{kind}_gbps_runs"] = [r[f"{kind}_gbps"] for r in runs]
    return out


def roofline_s(nbytes: Optional[int], copy_gbps: float) -> Optional[float]:
    if not nbytes:
        return None
    return nbytes / (copy_gbps * 1e9)
