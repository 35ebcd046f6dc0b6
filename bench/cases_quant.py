"""Benchmark cases for ``pyeditor.packed_linear``: y = x @ W.T with W channel-wise 2/4/6/8-bit packed.

Impls: ours (exact fp32 mode), ours-fast (int8 activations, VNNI), ours-bf16x (exact mode on the
same x rounded to bf16, as the int8pack and int4pack peers get it; GEMV rows only: a row of bf16
values needs fewer of the exact kernel's fixed-point digits), fp32 (torch ``x @ W.T`` on the
dequantized weight), int8pack (``aten._weight_int8pack_mm``, bf16 x), int4pack
(``aten._weight_int4pack_mm_for_cpu``, bf16 x, group 128), and two reads of buffers holding
exactly the packed bytes: read-sum (torch ``.sum()``, one stream per thread) and read-streams
(``pyeditor::read_probe``: eight concurrent streams per thread, CPU builds only). The faster of
the two is the weight-read roofline of the row: on the Intel VM of 2026-12-03 one stream per
core read ~15 GB/s and eight ~20 GB/s, so a roofline from ``.sum()`` alone flattered every kernel.
GEMM rows (M > 1) add ours-bf16 (PackedLinear's mode="bf16": the fp32 x rounded to bf16 inside
the call) and issue 29's peers: bf16 (torch ``F.linear`` with weight and x in bf16, a
model cast to bf16), bnb-nf4 (bitsandbytes NF4, block 64) and bnb-w8a8 (bitsandbytes
Linear8bitLt, int8 weight and activations); the 4-bit GEMV rows add bnb-nf4 (bench/peers_bnb.py:
an optional bench extra; without it these impls record why, and their targets read "not measured").

GEMV rows ("dram") cycle over distinct copies of the layer, for every impl, so each one's
working set is >= 4x the last-level cache (this machine's L3 as the OS reports it, at least the
issue's 32 MiB) and weights stream from DRAM like one token through a real model; "cache" rows
call one layer repeatedly. Widths: 2, 4, 6, 8 uniform and the CHORD mix
(beta = 12.5%: 12.5% 8-bit, 12.5% 4-bit, 75% 2-bit).
Default run: 4096x4096 GEMV (dram) at 2 and 4 bits and the mix, GEMM M=16 and M=256 for the mix;
--full adds the rest of the grid (6- and 8-bit GEMV, cache-resident GEMV, the other widths at M=16
and M=256, M=3 at 4 bits and the mix (the few-row kernels), 384x1536).
"module" rows (default run): one M = 1 call of the drop-in PackedLinear (4-bit, groups of 64) at
SmolLM2-135M's 576x576 and 1536x576, module against nn.Linear fp32 and against the bare op, from
DRAM: the per-call cost a decoder pays per layer and token (see _make_module).
"""
from __future__ import annotations

import functools
import itertools

import torch

from bench.machine import last_level_cache_bytes
from bench.registry import OURS, Case, Context, Prepared
from bench.roofline import STREAMS

FAMILY = "packed_linear"
L3_BYTES = max(32 << 20, last_level_cache_bytes())  # the machine has 32 MiB; this one may have more
WORKING_SET = 4 * L3_BYTES
WIDTHS = ("2", "4", "6", "8", "mix")
READS = ("read-sum", "read-streams")
IMPLS = (OURS, "ours-fast", "fp32", "int8pack", "int4pack") + READS
GEMV_IMPLS = IMPLS[:2] + ("ours-bf16x",) + IMPLS[2:]
GEMM_PEERS = ("bf16", "bnb-nf4", "bnb-w8a8")  # issue 29's peers of the batched (M > 1) rows
PEERS = ("fp32", "int8pack", "int4pack") + GEMM_PEERS
# seconds of samples per impl on GEMM rows, whatever the run's budget (as the real-model batch rows
# do): there each impl's calls are long, min_reps still bounds every impl from below, and ten impls
# at the run's budget would make each GEMM row cost the default run several GEMV rows
GEMM_BUDGET_S = 0.4


def _impls(m: int, width: str) -> tuple[str, ...]:
    """A row's impls: GEMM rows add the bf16 and bitsandbytes peers; the 4-bit GEMV rows add NF4,
    the one bitsandbytes format of the same width."""
    if m > 1:  # + the bf16 mode (activations rounded to bf16), a mode for batched calls
        return IMPLS[:2] + ("ours-bf16",) + IMPLS[2:-len(READS)] + GEMM_PEERS + READS
    return GEMV_IMPLS[:-len(READS)] + (("bnb-nf4",) if width == "4" else ()) + READS


def _bits(width: str, n: int) -> torch.Tensor:
    if width != "mix":
        return torch.full((n,), int(width), dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    sens = torch.rand(n, generator=gen)
    import pyeditor
    return pyeditor.allocate_bits(sens, 0.125)


def _copies(nbytes: int, dram: bool) -> int:
    return max(1, -(-WORKING_SET // max(nbytes, 1))) if dram else 1


def _cycle(fns):
    it = itertools.cycle(fns)
    return lambda: next(it)()


@functools.lru_cache(maxsize=2)
def _quantized(n: int, k: int, width: str):
    """The layer's packed weight, shared by the cases of one shape and width (quantizing a
    4096x4096 layer with the reference quantizer takes seconds)."""
    from pyeditor import quant

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return quant.quantize_channelwise(w, _bits(width, n))


def _make(n: int, k: int, m: int, width: str, dram: bool, ctx: Context) -> Prepared:
    import pyeditor
    from bench import peers_bnb  # here, not at the top: it imports this module's _cycle
    from pyeditor import quant

    impls = _impls(m, width)
    gen = torch.Generator().manual_seed(1)  # not the weight's seed: x must not equal a weight row
    x = torch.randn(m, k, generator=gen)
    packed = _quantized(n, k, width)
    kw = {} if ctx.backend is None else {"backend": ctx.backend}
    copies = [packed] + [quant.PackedWeight(*(t.clone() for t in packed.tensors()), packed.buckets, packed.bits,
                                            k, n) for _ in range(_copies(packed.nbytes, dram) - 1)]
    ours = _cycle([functools.partial(pyeditor.packed_linear, x, p, **kw) for p in copies])
    fast = _cycle([functools.partial(pyeditor.packed_linear, x, p, fast=True, **kw) for p in copies])
    xb = x.bfloat16()
    ours_bf16x = _cycle([functools.partial(pyeditor.packed_linear, xb, p, **kw) for p in copies])
    ours_bf16 = _cycle([functools.partial(pyeditor.packed_linear, x, p, mode="bf16", **kw) for p in copies])

    dense = packed.dequantize()
    ws = [dense] + [dense.clone() for _ in range(_copies(dense.nbytes, dram) - 1)]
    fp32 = _cycle([functools.partial(torch.matmul, x, d.T) for d in ws])

    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s8 = (torch.rand(n, generator=gen) / 100).bfloat16()
    w8s = [w8] + [w8.clone() for _ in range(_copies(w8.nbytes, dram) - 1)]
    int8 = _cycle([functools.partial(torch.ops.aten._weight_int8pack_mm, xb, t, s8) for t in w8s])

    group = 128 if k % 128 == 0 else None
    if group:
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 2)
        sz = torch.rand(k // group, n, 2, generator=gen).bfloat16()
        w4s = [w4] + [w4.clone() for _ in range(_copies(w4.nbytes + sz.nbytes, dram) - 1)]
        int4 = _cycle([functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, xb, t, group, sz)
                       for t in w4s])
    else:
        int4 = f"K={k} is not a multiple of the int4 group size 128"

    # the peers of a user who casts the model to bf16 or quantizes it with bitsandbytes; built only
    # where the row has them (NF4 quantization of a 4096x4096 layer takes a while)
    peers, peer_notes = {}, []
    if "bf16" in impls:
        wb = dense.bfloat16()
        wbs = [wb] + [wb.clone() for _ in range(_copies(wb.nbytes, dram) - 1)]
        peers["bf16"] = _cycle([functools.partial(torch.nn.functional.linear, xb, t) for t in wbs])
        peer_notes.append("bf16: torch F.linear with the dequantized weight and x cast to bf16 (a model cast to bf16)")
    if "bnb-nf4" in impls:
        peers["bnb-nf4"] = peers_bnb.nf4(dense, x, _copies(peers_bnb.nf4_bytes(n, k), dram))
    if "bnb-w8a8" in impls:
        peers["bnb-w8a8"] = peers_bnb.w8a8(dense, x, _copies(peers_bnb.w8a8_bytes(n, k), dram))
    peer_notes += [peers_bnb.describe(p) for p in impls if p.startswith("bnb-")]

    reads = [torch.zeros(packed.nbytes // 4) for _ in copies]
    read_sum = _cycle([r.sum for r in reads])
    read_streams = (_cycle([functools.partial(torch.ops.pyeditor.read_probe, r, STREAMS) for r in reads])
                    if hasattr(torch.ops.pyeditor, "read_probe") else "read_probe needs the C++ extension")

    err = (pyeditor.packed_linear(x, packed, fast=True) - pyeditor.packed_linear(x, packed)).abs().max().item()
    ref = (x @ dense.T).abs().max().item()

    def derive(stats: dict) -> dict:
        t = {k: v["median_s"] for k, v in stats.items()}
        read = min((t[r] for r in READS if r in t), default=None)  # the faster read is the roofline
        if read is not None:
            t["weight-read"] = read
        out = {}
        for name, tag in ((OURS, ""), ("ours-fast", "_fast"), ("ours-bf16x", "_bf16x"), ("ours-bf16", "_bf16")):
            if name not in t:
                continue
            if "weight-read" in t:
                out[f"read_roofline_pct{tag}"] = 100.0 * t["weight-read"] / t[name]
            for peer in PEERS:
                if peer in t:
                    out[f"vs_{peer}{tag}"] = t[peer] / t[name]
        if "weight-read" in t:
            out["read_gbps"] = packed.nbytes / t["weight-read"] / 1e9
        out["summary"] = ", ".join(f"{k}={v:.2f}" for k, v in out.items())
        return out

    widths = {b: int((packed.bits == b).sum()) for b in (2, 4, 6, 8)}
    return Prepared(
        fns={OURS: ours, "ours-fast": fast, "ours-bf16x": ours_bf16x, "ours-bf16": ours_bf16, "fp32": fp32,
             "int8pack": int8,
             "int4pack": int4, "read-sum": read_sum, "read-streams": read_streams, **peers},
        bytes_moved=packed.nbytes, derive=derive, timing={"budget_s": GEMM_BUDGET_S} if m > 1 else {},
        flops=2 * m * n * k if m > 1 else None,  # GEMM rows are compute-bound: their roofline is the FMA peak
        notes=[f"packed {packed.nbytes} B ({packed.metadata_bytes} B metadata = "
               f"{100 * packed.metadata_bytes / packed.nbytes:.2f}%); channels per width {widths}; "
               f"{len(copies)} copies of ours, {len(ws)} of fp32, {len(w8s)} of int8pack per cycle",
               f"ours-fast (int8 activations) max|err| vs exact = {err:.3g} (max|y| = {ref:.3g})",
               "weight-read roofline: the faster of read-sum (torch .sum()) and read-streams (8 streams per "
               f"thread) over buffers of exactly the packed bytes; working set {WORKING_SET >> 20} MiB per impl",
               *peer_notes],
    )


def _case(n, k, m, width, dram, full):
    regime = "dram" if dram else "cache"
    shape = f"{n}x{k}"
    return Case(f"{FAMILY}/{regime}/M{m}/{shape}/{width}", f"packed_linear {regime} M={m} {shape} {width}-bit",
                FAMILY, _impls(m, width), functools.partial(_make, n, k, m, width, dram), full,
                {"out": n, "in": k, "M": m, "bits": width, "regime": regime})


def _make_module(n: int, k: int, ctx: Context) -> Prepared:
    """One M = 1 call of a drop-in layer as a decoder runs it (x [1, 1, in], no bias, inference:
    no parameter needs a gradient), cycling over copies from DRAM like one token through a model:
    ours = PackedLinear 4-bit groups of 64 (the real-LM rows' w4g64), ours-channel = the same
    codes' layer with one scale per channel, ours-op = the registered op on ours's buffers (the
    floor under the module's Python), fp32 = nn.Linear holding ours's dequantized weight."""
    from torch import nn

    from pyeditor import nn as pnn
    from pyeditor import quant

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    kw = {} if ctx.backend is None else {"backend": ctx.backend}

    def layers(group_size):
        p = quant.quantize_channelwise(w, 4, group_size=group_size).to(ctx.device)
        return [pnn.PackedLinear(quant.PackedWeight(*(t.clone() for t in p.tensors()), p.buckets, p.bits, k, n,
                                                    group_size), **kw)
                for _ in range(_copies(p.nbytes, True))]

    ours, channel = layers(64), layers(None)
    dense = ours[0].dequantize()
    fp32 = []
    for _ in range(_copies(dense.nbytes, True)):
        lin = nn.Linear(k, n, bias=False, device=ctx.device).requires_grad_(False)
        lin.weight.copy_(dense)
        fp32.append(lin)
    op = torch.ops.pyeditor.quant_linear.default if hasattr(torch.ops.pyeditor, "quant_linear") else None
    floor = (_cycle([functools.partial(op, x, *p.tensors(), p.flat_buckets, k, n, None, False,
                                       p.op_group_size)
                     for p in (m.packed for m in ours)])
             if op is not None and ctx.backend in (None, "cpu", "cuda") else "the C++ op (cpu/cuda backend) only")

    def derive(stats: dict) -> dict:
        t = {i: v["median_s"] for i, v in stats.items()}
        out = {f"vs_fp32{tag}": t["fp32"] / t[i] for i, tag in ((OURS, ""), ("ours-channel", "_channel"))
               if i in t and "fp32" in t}
        if OURS in t and "ours-op" in t:
            out["module_over_op_us"] = (t[OURS] - t["ours-op"]) * 1e6
        out["summary"] = ", ".join(f"{key}={v:.2f}" for key, v in out.items())
        return out

    return Prepared(
        fns={OURS: _cycle([functools.partial(m, x) for m in ours]),
             "ours-channel": _cycle([functools.partial(m, x) for m in channel]),
             "ours-op": floor, "fp32": _cycle([functools.partial(m, x) for m in fp32])},
        bytes_moved=ours[0].packed_bytes, derive=derive,
        notes=[f"per call of one layer, x [1, 1, {k}]; {len(ours)} copies of ours ({ours[0].packed_bytes} B each), "
               f"{len(channel)} of ours-channel, {len(fp32)} of fp32 per cycle (working set {WORKING_SET >> 20} MiB "
               "per impl); vs_fp32 > 1: the packed layer is faster (issue 25's decode target needs it)"])


def _cases() -> list:
    cases = [Case(f"{FAMILY}/module/M1/{n}x{k}/4-g64", f"PackedLinear module M=1 {n}x{k} 4-bit g64 vs nn.Linear",
                  FAMILY, (OURS, "ours-channel", "ours-op", "fp32"), functools.partial(_make_module, n, k), False,
                  {"out": n, "in": k, "M": 1, "bits": "4", "group_size": 64, "regime": "dram", "input": "module"})
             for n, k in ((576, 576), (1536, 576))]  # SmolLM2-135M's q/o and gate/up projections
    for width in WIDTHS:  # mix last, so the cache-resident and GEMM mix rows reuse its packing
        cases.append(_case(4096, 4096, 1, width, True, width in ("6", "8")))
    cases += [_case(4096, 4096, 1, "mix", False, True), _case(4096, 4096, 1, "4", False, True)]
    for m in (256, 16):
        for width in WIDTHS:
            cases.append(_case(4096, 4096, m, width, False, width != "mix"))
    cases += [_case(4096, 4096, 3, width, False, True) for width in ("4", "mix")]  # the few-row kernels
    for m in (1, 16, 256):
        for width in WIDTHS:
            cases.append(_case(384, 1536, m, width, m == 1, True))
    return cases


CASES: list = _cases()
