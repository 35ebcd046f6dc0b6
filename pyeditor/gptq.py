"""Error-feedback (GPTQ-style) quantization of one [out, in] weight from its layer's Hessian
H = X^T X / n of calibration inputs X, for :func:`pyeditor.quantizers.gptq`.

The inputs are quantized one at a time, in order; after each, the error it left is fed forward
into the inputs not yet quantized, so that the layer's output error ||X (w - deq)^T||^2 stays
small (Frantar et al., "GPTQ", 2022). Written here from the algorithm, in a form that needs one
factorization of the damped Hessian and no inverse:

  H + lambda I = R R^T with R upper triangular (the Cholesky factor of the Hessian with its
  inputs in reverse order, flipped back). With D = w - deq (the total error so far, one row per
  output channel), input i is quantized from  w_i + (sum_{j<i} D_j R_ji) / R_ii,  which is the
  value GPTQ's update with the inverse Hessian's factor gives it, and the objective is
  D (H + lambda I) D^T = sum_i (sum_{j<=i} D_j R_ji)^2, read off the same running sums.

Updates are lazy: inside a block of columns the running sums are rank-1 updated, and one
float32 matmul per block brings in the blocks before it. With groups along the input, a group's
scale and zero point are chosen when the loop reaches its first column, from the group's weights
as the error feedback has left them (the optimal update of a whole group needs a small
triangular solve with R's diagonal block), by a clipping search that weighs each input's error
by its H_ii. Per channel (no groups) the scales come from the unmodified weight, the same way.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny
DAMP = 0.01  # lambda = DAMP * mean(diag H): keeps the factorization stable, the update short
BLOCK = 128  # columns per lazy-update block (a multiple of the group size)
# clip ratios of the per-group scale search: the range [r * lo, r * hi], r = 1 being min-max
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def factor(h: Tensor, dtype: torch.dtype = torch.float32) -> Optional[Tuple[Tensor, float]]:
    """(R, lambda) with h + lambda I = R R^T, R upper triangular in ``dtype``; None when h has no
    positive diagonal (the calibration inputs were all zero). lambda grows tenfold (up to three
    times) if the factorization still fails in float64."""
    diag = h.diagonal()
    mean = float(diag.mean()) if diag.numel() else 0.0
    if not mean > 0.0:
        return None
    lam = DAMP * mean
    for _ in range(4):
        hd = h.flip(0, 1).clone()
        hd.diagonal().add_(lam)
        for work in (dtype, torch.float64):
            lower, info = torch.linalg.cholesky_ex(hd.to(work))
            if int(info) == 0 and bool(torch.isfinite(lower).all()):
                return lower.flip(0, 1).to(dtype).contiguous(), lam
        lam *= 10.0
    return None


def group_params(wg: Tensor, qmax: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Scale and zero point (float32, the zero integral) per column of wg [m, n] (m inputs of one
    group, n output channels): the clip ratio whose asymmetric grid has the least
    sum_i weight_i (w_i - deq_i)^2. qmax [n] float32, weight [m]."""
    lo = wg.amin(0).clamp_max(0.0)
    hi = wg.amax(0).clamp_min(0.0)
    wt = weight[:, None]
    best_e = best_s = best_z = None
    for r in CLIP_RATIOS:
        s = ((hi - lo) * (r / qmax)).clamp_min(TINY)
        z = torch.round(lo * (-r) / s).clamp_min_(0.0)
        z = torch.minimum(z, qmax)
        q = torch.round(wg / s).add_(z).clamp_min_(0.0)
        q = torch.minimum(q, qmax, out=q)
        e = q.sub_(z).mul_(s).sub_(wg).square_().mul_(wt).sum(0)
        if best_e is None:
            best_e, best_s, best_z = e, s, z
        else:
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def run(w: Tensor, qmax: Tensor, group_size: Optional[int], r: Tensor, lam: float):
    """GPTQ of w [n, k] (float32, or float64 for checking) with per-channel qmax [n] (2^bits - 1,
    w's dtype), groups of
    group_size inputs (None: one per channel; the last group may be shorter) and the factor R of
    H + lam I (w's dtype). Returns codes uint8 [n, k], scale [n, G], zero [n, G] (integral, w's dtype),
    and per channel the objective D H D^T (lambda's part removed), float64 [n]."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    groups = -(-k // gs) if k else 0
    wt = w.t().contiguous()  # [k, n]: one input's weights are a contiguous row
    hdiag = (r * r).sum(1)  # diag(R R^T) = diag(H) + lambda: the search's per-input weights
    dt = w.dtype
    delta = torch.empty(k, n, dtype=dt)  # D^T
    codes = torch.empty(k, n, dtype=dt)
    scale = torch.empty(groups, n, dtype=dt)
    zero = torch.empty(groups, n, dtype=dt)
    obj = torch.zeros(n, dtype=torch.float64)
    if group_size is None and k:
        scale[0], zero[0] = group_params(wt, qmax, hdiag)
    block = max(1, BLOCK // gs) * gs if group_size is not None else BLOCK
    zeros = torch.zeros(n, dtype=dt)
    s = z = None  # set at every group's first column
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        rb = r[i1:i2, i1:i2]
        # running sums sum_{j<i} D_j R_ji for the block's columns: earlier blocks in one matmul
        acc = r[:i1, i1:i2].t() @ delta[:i1] if i1 else torch.zeros(i2 - i1, n, dtype=dt)
        rdiag = rb.diagonal().tolist()
        for i in range(i2 - i1):
            c = i1 + i
            if c % gs == 0:
                g = c // gs
                if group_size is not None:  # the group as GPTQ's update leaves it: w + acc R_GG^-1
                    e = min(i + gs, i2 - i1)
                    inv = torch.linalg.solve_triangular(rb[i:e, i:e], torch.eye(e - i, dtype=dt), upper=True)
                    wg = torch.addmm(wt[c:i1 + e], inv.t(), acc[i:e])
                    scale[g], zero[g] = group_params(wg, qmax, hdiag[c:i1 + e])
                s, z = scale[g], zero[g]
            q = torch.add(wt[c], acc[i], alpha=1.0 / rdiag[i]).div_(s).round_().add_(z)
            torch.clamp(q, zeros, qmax, out=q)
            codes[c] = q
            d = torch.sub(wt[c], q.sub_(z).mul_(s), out=delta[c])
            # acc[i] becomes sum_{j<=i} D_j R_ji: this input's term of the objective
            acc[i].add_(d, alpha=rdiag[i])
            if i + 1 < i2 - i1:
                acc[i + 1:].addr_(rb[i, i + 1:], d)
        obj += acc.square_().sum(0, dtype=torch.float64)
    obj -= lam * delta.square().sum(0, dtype=torch.float64)
    return codes.t().to(torch.uint8), scale.t().contiguous(), zero.t().contiguous(), obj


def objective(delta: Tensor, r: Tensor, lam: float) -> Tensor:
    """D H D^T per row of delta [n, k] (float64 [n]) from H + lam I = R R^T: ||D R||^2 (R upper
    triangular, so a block of columns of D R needs only the columns of D up to the block's end)
    minus lambda ||D||^2."""
    n, k = delta.shape
    out = -lam * delta.square().sum(1, dtype=torch.float64)
    for j1 in range(0, k, 4 * BLOCK):
        j2 = min(j1 + 4 * BLOCK, k)
        out += (delta[:, :j2] @ r[:j2, j1:j2]).square_().sum(1, dtype=torch.float64)
    return out
