"""Cloud serving of many devices at once (issue 6): Persona's per-device edited layer.

Every device sends its embedding e [d] and S input rows x [S, in]. The cloud picks the device's
prototype (the one whose generated edit is smallest, Persona Eq. 12), generates that edit
G = e W_p + b_p (the editor head of prototype p, frozen while serving) and answers
y = x (Theta_p + clip(G, -T, T)) + bias_p.

Rows (default run, fp32; 512x512 adaptive layer, P = 8 prototypes, editor embedding d = 32):
  serve       4096 devices in batches of 256, S = 16 rows each; one timed call = one batch, cycling over
              the 16 batches. ours: assign_prototypes (cached Gram of the frozen editors) +
              generate_edit(index=chosen) + edited_linear. naive: a per-device loop that generates every
              prototype's edit, takes norms and argmin, materializes K and calls F.linear.
  adapt-256   adaptation: device embedding in, adaptive weights K out, for a batch of 256 devices
              (ours: assign + gathered hyper_matmul + apply_edit into a reused buffer; naive: per device).
  adapt-1     the same for one device (the single-device latency; the Persona paper reports 10.78 ms).
Derived: devices/s (batch / median), per-device latency, p50 / p99 per batch, and the throughput ratio.
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from bench.registry import OURS, Case, Context, Prepared

FAMILY = "serving"
T = 0.5
N_IN = N_OUT = 512
P = 8
D = 32
ROWS = 16
# slow peer (~1-4 s per 256-device batch): a few reps are enough for a stable median
NAIVE_TIMING = {"min_reps": 4, "budget_s": 1.0}


def _kw(ctx: Context) -> dict:
    return {} if ctx.backend is None else {"backend": ctx.backend}


class _Fleet:
    """The frozen serving state (prototypes, editor heads) and every device's request."""

    def __init__(self, devices: int, ctx: Context, with_inputs: bool, seed: int = 0):
        import pyeditor

        gen = torch.Generator().manual_seed(seed)
        n = N_IN * N_OUT

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(ctx.device)

        self.theta = randn(P, N_IN, N_OUT, scale=N_IN ** -0.5)
        self.bias = randn(P, N_OUT, scale=0.1)
        # heads scaled so that edits are O(T): the clip matters for some entries, not all
        self.w = randn(P, D, n, scale=0.4 * D ** -0.5)
        self.b = randn(P, n, scale=0.05)
        # device embeddings near one of P centres, so that assignments are spread over prototypes
        centres = randn(P, D)
        self.e = centres[torch.randint(0, P, (devices,), generator=gen)] + randn(devices, D, scale=0.5)
        self.x = randn(devices, ROWS, N_IN) if with_inputs else None
        self.gram = pyeditor.prototype_gram(self.w, self.b)  # once, while editors are frozen

    # -- ours -------------------------------------------------------------------------------
    def adapt(self, lo: int, hi: int, ctx: Context, out: torch.Tensor) -> torch.Tensor:
        import pyeditor

        e = self.e[lo:hi]
        chosen = pyeditor.assign_prototypes(e, self.w, self.b, gram=self.gram, **_kw(ctx)).chosen
        g = pyeditor.hyper_matmul(e, self.w, self.b, chosen, **_kw(ctx))
        return pyeditor.apply_edit(self.theta, g.view(-1, N_IN, N_OUT), T, proto_index=chosen, out=out,
                                   **_kw(ctx))

    def serve(self, lo: int, hi: int, ctx: Context) -> torch.Tensor:
        import pyeditor

        e = self.e[lo:hi]
        chosen = pyeditor.assign_prototypes(e, self.w, self.b, gram=self.gram, **_kw(ctx)).chosen
        g = pyeditor.hyper_matmul(e, self.w, self.b, chosen, **_kw(ctx))
        return pyeditor.edited_linear(self.x[lo:hi], self.theta, g.view(-1, N_IN, N_OUT), T, self.bias, chosen,
                                      **_kw(ctx))

    # -- naive: one device at a time, every prototype's edit materialized ---------------------
    def naive_adapt_one(self, i: int) -> tuple[int, torch.Tensor]:
        g = torch.baddbmm(self.b.unsqueeze(1), self.e[i].expand(P, 1, D), self.w)  # [P, 1, n]
        p = int(torch.linalg.vector_norm(g, dim=-1).argmin())
        return p, g[p, 0].view(N_IN, N_OUT).clamp(-T, T) + self.theta[p]

    def naive_adapt(self, lo: int, hi: int) -> torch.Tensor:
        return torch.stack([self.naive_adapt_one(i)[1] for i in range(lo, hi)])

    def naive_serve(self, lo: int, hi: int) -> torch.Tensor:
        ys = []
        for i in range(lo, hi):
            p, k = self.naive_adapt_one(i)
            ys.append(F.linear(self.x[i], k.t(), self.bias[p]))
        return torch.stack(ys)


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if not err <= 1e-3:
        raise AssertionError(f"{what}: ours and the naive loop differ by {err:.3g}")
    return err


def _per_batch_metrics(batch: int, stats: dict) -> dict:
    out = {}
    for name, s in stats.items():
        out[f"{name}_devices_per_s"] = batch / s["median_s"]
        out[f"{name}_ms_per_device"] = 1e3 * s["median_s"] / batch
        out[f"{name}_p50_ms"] = 1e3 * s["median_s"]
        out[f"{name}_p99_ms"] = 1e3 * s["p99_s"]
    if OURS in stats and "naive" in stats:
        out["throughput_ratio"] = stats["naive"]["median_s"] / stats[OURS]["median_s"]
    parts = [f"{n}: {out[f'{n}_devices_per_s']:.0f} devices/s, {out[f'{n}_ms_per_device']:.3f} ms/device, "
             f"batch p50 {out[f'{n}_p50_ms']:.1f} ms p99 {out[f'{n}_p99_ms']:.1f} ms" for n in stats]
    if "throughput_ratio" in out:
        parts.append(f"ours/naive throughput {out['throughput_ratio']:.1f}x")
    out["summary"] = "; ".join(parts)
    return out


def _make_serve(devices: int, batch: int, ctx: Context) -> Prepared:
    fleet = _Fleet(devices, ctx, with_inputs=True)
    starts = list(range(0, devices, batch))
    ours_next, naive_next = itertools.cycle(starts), itertools.cycle(starts)
    err = _check(fleet.serve(0, batch, ctx), fleet.naive_serve(0, batch), "serve")

    def ours():
        lo = next(ours_next)
        return fleet.serve(lo, min(lo + batch, devices), ctx)

    def naive():
        lo = next(naive_next)
        return fleet.naive_serve(lo, min(lo + batch, devices))

    return Prepared(
        fns={OURS: ours, "naive": naive}, timing=NAIVE_TIMING,
        derive=functools.partial(_per_batch_metrics, batch),
        notes=[f"{devices} devices, batches of {batch}, {ROWS} rows each; one timed call serves the next batch",
               "ours: assign_prototypes(gram=prototype_gram(W, b)) + hyper_matmul(index=chosen) + edited_linear",
               "naive: per device baddbmm of all P edits, vector_norm, argmin, clamp + add (K), F.linear",
               f"batch 0 checked: max|ours - naive| = {err:.2g}"],
    )


def _make_adapt(batch: int, ctx: Context) -> Prepared:
    fleet = _Fleet(max(batch, 1), ctx, with_inputs=False)
    out = torch.empty(batch, N_IN, N_OUT, device=ctx.device)
    err = _check(fleet.adapt(0, batch, ctx, out), fleet.naive_adapt(0, batch), "adapt")
    return Prepared(
        fns={OURS: lambda: fleet.adapt(0, batch, ctx, out), "naive": lambda: fleet.naive_adapt(0, batch)},
        timing=NAIVE_TIMING if batch > 1 else {},
        derive=functools.partial(_per_batch_metrics, batch),
        notes=[f"device embedding [{D}] in, adaptive weights K [{N_IN}x{N_OUT}] out, {batch} device(s) per call",
               "ours: assign_prototypes (cached Gram) + hyper_matmul(index=chosen) + apply_edit(out=reused buffer)",
               f"max|ours - naive| = {err:.2g}; Persona paper: 10.78 ms per device"],
    )


def _serve(devices: int, batch: int, full: bool = False) -> Case:
    shape = f"{devices}dev-B{batch}-S{ROWS}-{N_IN}x{N_OUT}-P{P}-d{D}"
    return Case(f"{FAMILY}/serve/{shape}/fp32", f"serve {shape} fp32", FAMILY, (OURS, "naive"),
                functools.partial(_make_serve, devices, batch), full,
                {"devices": devices, "batch": batch, "S": ROWS, "in": N_IN, "out": N_OUT, "P": P, "d": D})


def _adapt(batch: int, full: bool = False) -> Case:
    shape = f"B{batch}-{N_IN}x{N_OUT}-P{P}-d{D}"
    return Case(f"{FAMILY}/adapt/{shape}/fp32", f"adaptation {shape} fp32", FAMILY, (OURS, "naive"),
                functools.partial(_make_adapt, batch), full,
                {"batch": batch, "in": N_IN, "out": N_OUT, "P": P, "d": D})


CASES: list[Case] = [
    _serve(4096, 256),
    _adapt(256),
    _adapt(1),
    # --full
    _serve(4096, 64, full=True),
]
