"""Triton kernel of ``edit_norms_layers`` (Persona Eq. 11-12 over every edited layer).

One launch per kept layer folds that layer's edit norms into a running [B, P] float64 state by
the rule (csrc/include/pyeditor/layer_norms.h: sumsq 0, sum 1, max 2, weighted 3); the last
launch finishes it (the square root of the quadratic rules). A program owns a block of samples
of one prototype and walks the layer's columns in blocks, so neither a [P, B, n] edit nor a
per-layer [B, P] is written. Edit elements are formed in float64 (k ascending, bias last), as
the reference and the C++ kernels do. Offsets are int64; every operand goes by its strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK_B, BLOCK_N = 16, 32


@triton.jit
def _fold_layer_kernel(
    e_ptr, w_ptr, b_ptr, t_ptr, lam_ptr, state_ptr,
    B, P, D, N, layer,
    e_bs, e_ks, w_ps, w_ks, w_ns, b_ps, b_ns, t_s,
    RULE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_THR: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    rmask = rows < B
    if HAS_THR:
        t = tl.load(t_ptr + rows * t_s, mask=rmask, other=0.0)[:, None]
    sq = tl.zeros([BLOCK_B], dtype=tl.float64)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        g = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float64)
        for k in range(0, D):
            ek = tl.load(e_ptr + rows * e_bs + k * e_ks, mask=rmask, other=0.0).to(tl.float64)
            wk = tl.load(w_ptr + p * w_ps + k * w_ks + cols * w_ns, mask=cmask, other=0.0).to(tl.float64)
            g += ek[:, None] * wk[None, :]
        if HAS_BIAS:
            g += tl.load(b_ptr + p * b_ps + cols * b_ns, mask=cmask, other=0.0).to(tl.float64)[None, :]
        if HAS_THR:
            # comparisons (not min/max) so NaN passes through like torch.clamp / pe::clip
            g = tl.where(g < -t, -t, tl.where(g > t, t, g))
        g = tl.where(cmask[None, :], g, 0.0)
        sq += tl.sum(g * g, axis=1)
    out = state_ptr + rows * P + p
    if FIRST:
        state = tl.zeros([BLOCK_B], dtype=tl.float64)
    else:
        state = tl.load(out, mask=rmask, other=0.0)
    if RULE == 0:
        state = state + sq
    elif RULE == 3:
        state = state + tl.load(lam_ptr + layer) * sq
    else:
        norm = tl.sqrt(sq)
        if RULE == 1:
            state = state + norm
        else:  # max; a NaN state stays NaN (neither comparison holds)
            state = tl.where((norm > state) | (norm != norm), norm, state)
    if LAST:
        if RULE == 0 or RULE == 3:
            state = tl.sqrt(state)
    tl.store(out, state, mask=rmask)


def edit_norms_layers(e: torch.Tensor, weights, biases, threshold, rule: int, kept, lam) -> torch.Tensor:
    """[B, P] float64 from validated arguments (validate.layer_norms_args: rule code, kept layers,
    lambda per layer, threshold float64 [1 or B] or None)."""
    B, P = e.shape[1], weights[0].shape[0]
    out = torch.empty((B, P), dtype=torch.float64, device=e.device)
    if out.numel() == 0:
        return out
    lam_t = torch.tensor(lam, dtype=torch.float64, device=e.device)
    thr = threshold if threshold is not None else lam_t  # unread without HAS_THR
    grid = (triton.cdiv(B, BLOCK_B), P)
    for i, l in enumerate(kept):
        w, b = weights[l], biases[l]
        wrap_triton(_fold_layer_kernel)[grid](
            e[l], w, b if b is not None else w, thr, lam_t, out,
            B, P, e.shape[2], w.shape[2], l,
            e.stride(1), e.stride(2), w.stride(0), w.stride(1), w.stride(2),
            b.stride(0) if b is not None else 0, b.stride(1) if b is not None else 0,
            1 if threshold is not None and threshold.numel() > 1 else 0,
            RULE=rule, HAS_BIAS=b is not None, HAS_THR=threshold is not None, FIRST=i == 0,
            LAST=i == len(kept) - 1, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N,
        )
    return out
