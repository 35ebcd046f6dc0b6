"""Triton kernels for nearest-prototype search.

One kernel, `_next_best`, finds for every query the best candidate strictly after a given
(key, index) in (key, index) order, so k + 1 launches give the k + 1 best with ties to the
lowest index, and no B x N matrix is ever written. Keys: smaller is better.
  FAST:  key = bias[n] - SCALE * x'.p'  (float32 tl.dot, input_precision="ieee"): l2 on
         centred rows (bias = ||p'||^2, SCALE = 2), ip / cosine (bias = 0, SCALE = 1).
         bias NaN marks a prototype that may not be chosen.
  EXACT: float64 direct difference sum (x - p)^2 (l2) or -x.p (ip, and cosine on unit rows);
         NaN keys are never chosen. Rows whose `need` flag is 0 skip the work.
The host algorithm, `search` (called by the pyeditor::nearest_prototype_triton op in
pyeditor.ops), accepts a fast top-k only where the error bound proves it, like the C++ kernels
(csrc/include/pyeditor/search_math.h), and runs EXACT passes for the rest.
Offsets are int64; strides are arguments. Block sizes: FAST_CONFIGS / EXACT_CONFIGS
(autotuned on a GPU by shape; the first of each under the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .configs import Tuned, config


@triton.jit
def _next_best(
    x_ptr, p_ptr, bias_ptr, need_ptr, prev_key_ptr, prev_idx_ptr, out_key_ptr, out_idx_ptr,
    B, N, D, sxb, sxd, spn, spd,
    SCALE: tl.constexpr, L2: tl.constexpr, EXACT: tl.constexpr, FIRST: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    qmask = q < B
    big = 9223372036854775807
    if FIRST:
        prev_key = tl.full([BLOCK_Q], float("-inf"), dtype=out_key_ptr.dtype.element_ty)
        prev_idx = tl.full([BLOCK_Q], -1, dtype=tl.int64)
    else:
        prev_key = tl.load(prev_key_ptr + q, mask=qmask, other=0.0)
        prev_idx = tl.load(prev_idx_ptr + q, mask=qmask, other=big)
    best_key = tl.full([BLOCK_Q], float("inf"), dtype=out_key_ptr.dtype.element_ty)
    best_idx = tl.full([BLOCK_Q], big, dtype=tl.int64)
    n_end = N
    if EXACT:
        need = tl.load(need_ptr + q, mask=qmask, other=0)
        n_end = tl.where(tl.max(need, axis=0) > 0, N, 0)
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        nmask = n < N
        if EXACT:
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float64)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                dmask = dd < D
                xt = tl.load(x_ptr + q[:, None] * sxb + dd[None, :] * sxd, mask=qmask[:, None] & dmask[None, :], other=0.0)
                pt = tl.load(p_ptr + n[:, None] * spn + dd[None, :] * spd, mask=nmask[:, None] & dmask[None, :], other=0.0)
                if L2:
                    diff = xt[:, None, :] - pt[None, :, :]
                    acc += tl.sum(diff * diff, axis=2)
                else:
                    acc += tl.sum(xt[:, None, :] * pt[None, :, :], axis=2)
            key = acc if L2 else -acc
        else:
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                dmask = dd < D
                xt = tl.load(x_ptr + q[:, None] * sxb + dd[None, :] * sxd, mask=qmask[:, None] & dmask[None, :], other=0.0)
                pt = tl.load(p_ptr + n[None, :] * spn + dd[:, None] * spd, mask=nmask[None, :] & dmask[:, None], other=0.0)
                acc = tl.dot(xt, pt, acc, input_precision="ieee")
            bias = tl.load(bias_ptr + n, mask=nmask, other=0.0)
            key = bias[None, :] - SCALE * acc
        after = (key > prev_key[:, None]) | ((key == prev_key[:, None]) & (n[None, :] > prev_idx[:, None]))
        if not FIRST:  # the previous pass found nothing: nothing is left
            after = after & (prev_idx[:, None] >= 0)
        ok = (key == key) & nmask[None, :] & after
        masked = tl.where(ok, key, float("inf"))
        m = tl.min(masked, axis=1)
        hit = ok & (masked == m[:, None])
        mi = tl.min(tl.where(hit, n[None, :], big), axis=1)
        better = (mi != big) & ((m < best_key) | ((m == best_key) & (mi < best_idx)))
        best_key = tl.where(better, m, best_key)
        best_idx = tl.where(better, mi, best_idx)
    best_idx = tl.where(best_idx == big, -1, best_idx)
    tl.store(out_key_ptr + q, best_key, mask=qmask)
    tl.store(out_idx_ptr + q, best_idx, mask=qmask)


# FAST: [BLOCK_Q, BLOCK_D] x [BLOCK_D, BLOCK_N] float32 dots (every block >= 16 for tl.dot).
FAST_CONFIGS = (
    config(BLOCK_Q=16, BLOCK_N=32, BLOCK_D=32),
    config(BLOCK_Q=32, BLOCK_N=64, BLOCK_D=32),
    config(BLOCK_Q=16, BLOCK_N=64, BLOCK_D=64),
    config(BLOCK_Q=64, BLOCK_N=64, BLOCK_D=32, num_warps=8),
    config(BLOCK_Q=32, BLOCK_N=128, BLOCK_D=32, num_warps=8),
    config(BLOCK_Q=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3),
)
# EXACT: a [BLOCK_Q, BLOCK_N, BLOCK_D] float64 broadcast in registers: products stay small.
EXACT_CONFIGS = (
    config(BLOCK_Q=16, BLOCK_N=32, BLOCK_D=16),
    config(BLOCK_Q=16, BLOCK_N=16, BLOCK_D=16),
    config(BLOCK_Q=32, BLOCK_N=32, BLOCK_D=8),
    config(BLOCK_Q=8, BLOCK_N=64, BLOCK_D=16),
)
_KEY = ["B", "N", "D", "L2", "FIRST"]
_FAST = Tuned(_next_best, FAST_CONFIGS, FAST_CONFIGS[0], key=_KEY)
_EXACT = Tuned(_next_best, EXACT_CONFIGS, EXACT_CONFIGS[0], key=_KEY)


def next_best(x, p, bias, need, prev_key, prev_idx, out_key, out_idx, *, l2: bool, scale: float, exact: bool,
              first: bool) -> None:
    """One pass: out_key/out_idx[q] = best candidate of query q after (prev_key, prev_idx)[q]."""
    B, D = x.shape
    N = p.shape[0]
    if B == 0:
        return
    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_Q"]),)

    wrap_triton((_EXACT if exact else _FAST).on(x))[grid](
        x, p, bias, need, prev_key, prev_idx, out_key, out_idx,
        B, N, D, x.stride(0), x.stride(1), p.stride(0), p.stride(1),
        SCALE=scale, L2=l2, EXACT=exact, FIRST=first,
    )


# ---------------------------------------------------------------- the host algorithm
def _unit_rows64(v: Tensor) -> Tensor:
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n == 0, torch.zeros_like(v), v / n)


def _gamma32(n: int) -> float:
    # search_math.h gamma32: infinite once the bound would reach 1
    nu = n * 2.0 ** -24
    return 2.0 * nu / (1.0 - nu) if nu < 1.0 / 3.0 else float("inf")


def _underflow_err(n: int) -> float:
    # search_math.h underflow_err: float32 products below the normal range err absolutely
    return (n + 4) * 2.0 ** -148


def search(x: Tensor, prototypes: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """The k nearest prototypes of every row of x (arguments already checked, B >= 1): k + 1
    float32 passes, the error-bound acceptance of csrc/include/pyeditor/search_math.h, float64
    passes for the queries it cannot accept."""
    B, d = x.shape
    N = prototypes.shape[0]
    dev = x.device
    l2 = metric == "l2"
    x64, p64 = x.to(torch.float64), prototypes.to(torch.float64)
    xe, pe = (_unit_rows64(x64), _unit_rows64(p64)) if metric == "cosine" else (x64, p64)
    wide = x.dtype == torch.float64 or prototypes.dtype == torch.float64
    p_valid = torch.isfinite(prototypes).all(1)
    any_inf = (~p_valid & ~torch.isnan(prototypes).any(1)).any()
    x_finite = torch.isfinite(x).all(1)
    fk = torch.empty(B, k, dtype=torch.float64, device=dev)
    fi = torch.full((B, k), -1, dtype=torch.long, device=dev)
    certain = torch.zeros(B, dtype=torch.bool, device=dev)
    if not wide:
        xf, pf = x.to(torch.float32), prototypes.to(torch.float32)
        if l2:
            cnt = p_valid.sum().clamp_min(1)
            mu = (torch.where(p_valid[:, None], p64, 0.0).sum(0) / cnt).to(torch.float32)
            xs, ps = xf - mu, pf - mu
        elif metric == "cosine":
            xs, ps = xf, pe.to(torch.float32)
        else:
            xs, ps = xf, pf
        ps = torch.where(p_valid[:, None], ps, 0.0).contiguous()
        pn2 = ps.to(torch.float64).square().sum(1)
        bias = (pn2.to(torch.float32) if l2 else torch.zeros(N, device=dev)).masked_fill(~p_valid, float("nan"))
        pmax = pn2.max().sqrt()
        nx = xs.to(torch.float64).square().sum(1).sqrt()
        xs = xs.contiguous()
        kk = min(k + 1, N)
        keys = torch.empty(B, kk, dtype=torch.float32, device=dev)
        ids = torch.empty(B, kk, dtype=torch.long, device=dev)
        for j in range(kk):
            prev_k = keys[:, j - 1] if j else keys[:, 0]
            prev_i = ids[:, j - 1] if j else ids[:, 0]
            out_k, out_i = torch.empty(B, dtype=torch.float32, device=dev), torch.empty(B, dtype=torch.long, device=dev)
            next_best(xs, ps, bias, bias, prev_k.contiguous(), prev_i.contiguous(), out_k, out_i,
                          l2=l2, scale=2.0 if l2 else 1.0, exact=False, first=j == 0)
            keys[:, j], ids[:, j] = out_k, out_i
        span = (nx + pmax).square() if l2 else nx * pmax
        bound = torch.where(span < 1e36, _gamma32(d + 8) * span + _underflow_err(d), float("inf"))
        ak = keys[:, k - 1].to(torch.float64)
        # an unbounded pass (float32 overflow) proves nothing, also when it found fewer than k
        # keys: the pairs it skipped as NaN may be overflowed ones, not NaN prototypes
        ok = (bound < float("inf")) & ((ids[:, k - 1] == -1) | (ak.abs() < 1e36))
        if kk > k:
            ak1 = keys[:, k].to(torch.float64)
            ok = ok & ((ids[:, k] == -1) | (ak1 - bound > ak + bound))
        top = ids[:, :k]
        have = top >= 0
        pg = pe.index_select(0, top.clamp_min(0).flatten()).view(B, k, d)
        if l2:
            ex = (x64[:, None, :] - pg).square().sum(-1)
        else:
            ex = -(xe[:, None, :] * pg).sum(-1)
        ok = ok & ~(torch.isnan(ex) & have).any(1) & x_finite & ~any_inf
        ex = ex.masked_fill(~have, float("inf"))
        big = torch.iinfo(torch.long).max
        order_i = torch.where(have, top, big)
        o1 = torch.sort(order_i, dim=1, stable=True).indices
        ex, order_i = ex.gather(1, o1), order_i.gather(1, o1)
        o2 = torch.sort(ex, dim=1, stable=True).indices
        fk, fi = ex.gather(1, o2), torch.where(order_i == big, -1, order_i).gather(1, o2)
        certain = ok
    # float64 passes for every query the float32 pass could not settle
    need = (~certain).to(torch.int32).contiguous()
    xe_c, pe_c = xe.contiguous(), pe.contiguous()
    ek = torch.empty(B, k, dtype=torch.float64, device=dev)
    ei = torch.empty(B, k, dtype=torch.long, device=dev)
    dummy = torch.zeros(1, dtype=torch.float64, device=dev)
    for j in range(k):
        prev_k = ek[:, j - 1].contiguous() if j else dummy
        prev_i = ei[:, j - 1].contiguous() if j else ei[:, 0]
        out_k, out_i = torch.empty(B, dtype=torch.float64, device=dev), torch.empty(B, dtype=torch.long, device=dev)
        next_best(xe_c, pe_c, dummy, need, prev_k, prev_i, out_k, out_i,
                      l2=l2, scale=1.0, exact=True, first=j == 0)
        ek[:, j], ei[:, j] = out_k, out_i
    keys = torch.where(certain[:, None], fk, ek)
    idx = torch.where(certain[:, None], fi, ei)
    dist = keys if l2 else -keys
    dist = dist.masked_fill(idx == -1, float("inf") if l2 else float("-inf"))
    nanq = torch.isnan(x).any(1, keepdim=True)
    dist = dist.masked_fill(nanq, float("nan"))
    idx = idx.masked_fill(nanq, -1)
    return dist.to(x.dtype), idx
