"""Benchmark rows for group-wise packed weights: M = 1 GEMV of a 4096x4096 layer from DRAM
(working set >= 4x the last-level cache), the same 4-bit codes with one scale per group of 64
(default run) or 128 inputs (--full), against named peers in the same run:

- ours-channel: the same codes with one scale per channel (the group-wise cost: target <= 1.1x)
- int4pack: aten ``_weight_int4pack_mm_for_cpu`` with bf16 x, group 128 (target: ours >= 1.3x at g128)
- bnb-nf4: bitsandbytes' NF4 matmul, blocksize 64 (bench/peers_bnb.py, an optional bench extra;
  target: ours at g64 at least as fast)
- read-streams: a read of exactly the packed bytes (the roofline)
ours-fast is the int8-activation mode on the same grouped weight; ours-bf16x exact mode on x cast to
bf16, the activations int4pack gets (the targets stay on ours, with float32 x).
"""
from __future__ import annotations

import functools

import torch

from bench import peers_bnb
from bench.cases_quant import WORKING_SET, _copies, _cycle
from bench.registry import OURS, Case, Context, Prepared
from bench.roofline import STREAMS

FAMILY = "packed_linear_group"
IMPLS = (OURS, "ours-fast", "ours-bf16x", "ours-channel", "int4pack", "bnb-nf4", "read-streams")


@functools.lru_cache(maxsize=1)
def _weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0))


def _make(n: int, k: int, group: int, ctx: Context) -> Prepared:
    import pyeditor

    w = _weight(n, k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    kw = {} if ctx.backend is None else {"backend": ctx.backend}
    grouped = pyeditor.quantize_channelwise(w, 4, group_size=group)
    channel = pyeditor.quantize_channelwise(w, 4)
    copies = _copies(grouped.nbytes, True)

    def clone(p):
        return pyeditor.PackedWeight(*(t.clone() for t in p.tensors()), p.buckets, p.bits, k, n, p.group_size)

    # the two formats' copies are allocated in turn: copies allocated later in a process can read
    # faster (their pages), which would bias the group_cost ratio towards whichever came last
    gs, cs = [grouped], [channel]
    for _ in range(copies - 1):
        gs.append(clone(grouped))
        cs.append(clone(channel))
    fns = {
        OURS: _cycle([functools.partial(pyeditor.packed_linear, x, p, **kw) for p in gs]),
        "ours-fast": _cycle([functools.partial(pyeditor.packed_linear, x, p, fast=True, **kw) for p in gs]),
        "ours-channel": _cycle([functools.partial(pyeditor.packed_linear, x, p, **kw) for p in cs]),
    }
    xb = x.bfloat16()
    fns["ours-bf16x"] = _cycle([functools.partial(pyeditor.packed_linear, xb, p, **kw) for p in gs])
    gen = torch.Generator().manual_seed(2)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32,
                                                                          generator=gen), 2)
    sz = torch.rand(k // 128, n, 2, generator=gen).bfloat16()
    w4s = [w4] + [w4.clone() for _ in range(_copies(w4.nbytes + sz.nbytes, True) - 1)]
    fns["int4pack"] = _cycle([functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, xb, t, 128, sz)
                              for t in w4s])
    fns["bnb-nf4"] = peers_bnb.nf4(w, x, _copies(peers_bnb.nf4_bytes(n, k), True))
    reads = [torch.zeros(grouped.nbytes // 4) for _ in gs]
    fns["read-streams"] = (_cycle([functools.partial(torch.ops.pyeditor.read_probe, r, STREAMS) for r in reads])
                           if hasattr(torch.ops.pyeditor, "read_probe") else "read_probe needs the C++ extension")

    def derive(stats: dict) -> dict:
        t = {name: v["median_s"] for name, v in stats.items()}
        out = {}
        if "ours-channel" in t:
            out["group_cost"] = t[OURS] / t["ours-channel"]  # target <= 1.1
            # the bytes ratio: what group_cost tends to where both kernels stream at the read limit
            out["group_bytes"] = grouped.nbytes / channel.nbytes
        for peer in ("int4pack", "bnb-nf4"):
            if peer in t:
                out[f"vs_{peer}"] = t[peer] / t[OURS]
                out[f"vs_{peer}_fast"] = t[peer] / t["ours-fast"]
                if "ours-bf16x" in t:
                    out[f"vs_{peer}_bf16x"] = t[peer] / t["ours-bf16x"]
        if "read-streams" in t:
            out["read_roofline_pct"] = 100.0 * t["read-streams"] / t[OURS]
            out["read_roofline_pct_fast"] = 100.0 * t["read-streams"] / t["ours-fast"]
        out["summary"] = ", ".join(f"{name}={v:.2f}" for name, v in out.items())
        return out

    return Prepared(fns=fns, bytes_moved=grouped.nbytes, derive=derive,
                    notes=[f"4-bit group {group}: {grouped.nbytes} B packed ({grouped.metadata_bytes} B metadata); "
                           f"per channel {channel.nbytes} B; {copies} copies per cycle, working set "
                           f"{WORKING_SET >> 20} MiB per impl"])


CASES: list = [
    Case(f"{FAMILY}/dram/M1/4096x4096/4-g{g}", f"packed_linear group-wise dram M=1 4096x4096 4-bit g{g}", FAMILY,
         IMPLS, functools.partial(_make, 4096, 4096, g), g != 64, {"out": 4096, "in": 4096, "M": 1, "bits": 4,
                                                                    "group": g, "regime": "dram"})
    for g in (64, 128)
]
