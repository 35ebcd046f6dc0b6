"""This machine's memory bandwidth, measured in the same run as the cases.

copy:  dst.copy_(src) into a preallocated buffer, counted as read + write = 2 * nbytes, or
       pyeditor's copy_probe (eight concurrent streams per thread), whichever is faster
read:  src.sum(), counted as nbytes, or pyeditor's read_probe (eight streams), whichever is faster
write: dst.fill_(0), counted as nbytes
256 MiB fp32 tensors (far beyond the caches); best of several reps after warm-up.
The roofline time of a case is its bytes-that-must-move / copy bandwidth.

Why the probes: torch's copy_ and sum() read one sequential stream per thread, and on the Intel
VM of 2026-12-03 that moved 15-19 GB/s where eight streams per thread moved 21-26 (apply_edit,
three streams, ran at 115% of the copy_ roofline). The probes need the C++ extension on CPU;
elsewhere the torch ops alone set the roofline.

The bandwidth a VM gets varies over minutes (measured here: 37 to 65 GB/s copy in
one afternoon), so the CLI re-measures copy bandwidth right before every case and
uses that for the case's roofline.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

import pyeditor  # noqa: F401  (registers the probes when the C++ extension is built)
from bench.timing import measure

MiB = 1 << 20
STREAMS = 8  # concurrent streams per thread of the pyeditor probes


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

    def _fns(self, kind: str) -> dict[str, Callable[[], Any]]:
        """The ways to move memory of one kind, by name: torch's op, and pyeditor's probe on CPU."""
        ops = getattr(torch.ops, "pyeditor", None)
        probes = self.src.device.type == "cpu" and ops is not None and hasattr(ops, "copy_probe")
        if kind == "copy":
            fns = {"torch": lambda: self.dst.copy_(self.src)}
            if probes:
                fns["streams"] = lambda: ops.copy_probe(self.src, self.dst, STREAMS)
        else:
            fns = {"torch": lambda: self.src.sum()}
            if probes:
                fns["streams"] = lambda: ops.read_probe(self.src, STREAMS)
        return fns

    def _fastest(self, kind: str, reps: int):
        stats = {name: self._best(fn, reps) for name, fn in self._fns(kind).items()}
        return min(stats.values(), key=lambda s: s.min_s), {k: v.min_s for k, v in stats.items()}

    def copy_gbps(self, reps: int = 3) -> float:
        return 2 * self.src.nbytes / self._fastest("copy", reps)[0].min_s / 1e9

    def measure(self, reps: int = 8) -> dict[str, Any]:
        nb = self.src.nbytes
        copy, copy_by = self._fastest("copy", reps)
        read, read_by = self._fastest("read", reps)
        write = self._best(lambda: self.dst.fill_(0.0), reps)
        return {
            "copy_gbps": 2 * nb / copy.min_s / 1e9,
            "read_gbps": nb / read.min_s / 1e9,
            "write_gbps": nb / write.min_s / 1e9,
            "copy_gbps_median": 2 * nb / copy.median_s / 1e9,
            "read_gbps_median": nb / read.median_s / 1e9,
            "write_gbps_median": nb / write.median_s / 1e9,
            "copy_gbps_by_method": {k: 2 * nb / t / 1e9 for k, t in copy_by.items()},
            "read_gbps_by_method": {k: nb / t / 1e9 for k, t in read_by.items()},
            "tensor_bytes": nb,
            "reps": reps,
            "method": f"copy: faster of dst.copy_(src) and pyeditor copy_probe ({STREAMS} streams per thread), "
                      f"2*nbytes; read: faster of src.sum() and read_probe ({STREAMS} streams), nbytes; "
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


class ComputeProbe:
    """The fp32 FMA peak of this host's threads at the vector level the CPU kernels run:
    pyeditor's fma_probe (csrc/cpu/compute_probe.cpp) keeps a block of independent FMA chains in
    registers per thread, so its time is the FMA pipes' and nothing else. CPU only (None elsewhere
    or without the C++ extension)."""

    ROUNDS = 20_000  # FMAs per element per call: a call of a few milliseconds

    def __init__(self, threads: int) -> None:
        ops = getattr(torch.ops, "pyeditor", None)
        self.op = getattr(ops, "fma_probe", None) if ops is not None else None
        # 8 blocks of 768 floats per thread: each thread gets whole blocks, the pool stays busy
        self.x = torch.rand(8 * 768 * max(1, threads)) * 0.5

    def gflops(self, reps: int = 5) -> Optional[float]:
        if self.op is None:
            return None
        r = measure(lambda: self.op(self.x, 0.5, 1.0, self.ROUNDS), min_reps=reps, max_reps=reps, budget_s=0.0,
                    min_warmup=1, warmup_s=0.0, drop_contended=False)
        return 2 * self.x.numel() * self.ROUNDS / r.min_s / 1e9

    def measure(self, reps: int = 5) -> dict[str, Any]:
        peak = self.gflops(reps)
        return {"fp32_gflops": peak, "method": f"pyeditor fma_probe: {self.ROUNDS} fused multiply-adds on each of "
                                               f"{self.x.numel()} floats held in registers, best of {reps}"}
