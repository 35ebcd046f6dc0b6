"""Triton kernels for nearest-prototype search.

One kernel, `_next_best`, finds for every query the best candidate strictly after a given
(key, index) in (key, index) order, so k + 1 launches give the k + 1 best with ties to the
lowest index, and no B x N matrix is ever written. Keys: smaller is better.
  FAST:  key = bias[n] - SCALE * x'.p'  (float32 tl.dot, input_precision="ieee"): l2 on
         centred rows (bias = ||p'||^2, SCALE = 2), ip / cosine (bias = 0, SCALE = 1).
         bias NaN marks a prototype that may not be chosen.
  EXACT: float64 direct difference sum (x - p)^2 (l2) or -x.p (ip, and cosine on unit rows);
         NaN keys are never chosen. Rows whose `need` flag is 0 skip the work.
The host (pyeditor.ops) accepts a fast top-k only where the error bound proves it, like the
C++ kernels (csrc/include/pyeditor/search_math.h), and runs EXACT passes for the rest.
Offsets are int64; strides are arguments.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton


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


def next_best(x, p, bias, need, prev_key, prev_idx, out_key, out_idx, *, l2: bool, scale: float, exact: bool,
              first: bool) -> None:
    """One pass: out_key/out_idx[q] = best candidate of query q after (prev_key, prev_idx)[q]."""
    B, D = x.shape
    N = p.shape[0]
    if B == 0:
        return
    block_q, block_n = 16, 32
    block_d = 16 if exact else 32
    grid = (triton.cdiv(B, block_q),)
    wrap_triton(_next_best)[grid](
        x, p, bias, need, prev_key, prev_idx, out_key, out_idx,
        B, N, D, x.stride(0), x.stride(1), p.stride(0), p.stride(1),
        SCALE=scale, L2=l2, EXACT=exact, FIRST=first, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
    )
