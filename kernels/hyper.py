"""Triton kernels of the Persona serving ops.

* ``edited_linear``: y_b = x_b @ (theta[p_b] + clip(delta_b, -T, T)) + bias; the weight tile is
  edited in registers right after it is loaded (K is never written).
* ``hyper_matmul``: all-prototype form (program per prototype x row block x column block) and
  gathered form (rows stably sorted by index into segments; a program reads one generator's
  tile and the segment's rows through the sorted row list, so no per-sample weight copy).
* ``edit_sumsq``: the all-prototype product reduced in the epilogue to sum(clip(g)^2) per
  (sample, prototype); no [P, B, n] tensor.
* ``hyper_matmul_heads``: every head of an editor (weights concatenated along n, head l reading
  e[l]) in one launch over a table of column tiles, each inside one head; hyper_matmul is the
  one-head case of the same kernel.
* ``weight_grad``: dW_p = e[rows of p]^T @ grad[rows of p] per head, looping over p's segment only.

Every operand is addressed through its strides; offsets are int64. fp32 dots use
input_precision="ieee" (no TF32) so GPU results match the reference. Block sizes: the *_CONFIGS
tables (autotuned on a GPU by shape; the first of each under the interpreter). The column tile
of the head table, HEAD_TILE, is fixed: the host builds the table with it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .configs import Tuned, config

HEAD_TILE = 32  # BLOCK_N of the head-table kernels (hyper_matmul[_heads], edit_sumsq, weight_grad)

# every block >= 16 (tl.dot)
EDITED_LINEAR_CONFIGS = (
    config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
    config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
    config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8),
    config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_stages=3),
)
HYPER_CONFIGS = (  # BLOCK_N is HEAD_TILE
    config(BLOCK_M=16, BLOCK_K=16),
    config(BLOCK_M=32, BLOCK_K=32),
    config(BLOCK_M=64, BLOCK_K=32, num_warps=8),
    config(BLOCK_M=16, BLOCK_K=64, num_stages=3),
)
WEIGHT_GRAD_CONFIGS = (  # BLOCK_N is HEAD_TILE; BLOCK_K runs over a prototype's rows
    config(BLOCK_M=16, BLOCK_K=16),
    config(BLOCK_M=32, BLOCK_K=32),
    config(BLOCK_M=64, BLOCK_K=32, num_warps=8),
)


@triton.jit
def _clip(v, t):
    # comparisons (not min/max) so NaN passes through like torch.clamp / pe::clip
    return tl.where(v < -t, -t, tl.where(v > t, t, v))


@triton.jit
def _edited_linear_kernel(
    x_ptr, theta_ptr, delta_ptr, thr_ptr, bias_ptr, index_ptr, y_ptr,
    S, K, N, num_slots,
    x_bs, x_rs, x_ks, t_ps, t_ks, t_ns, d_bs, d_ks, d_ns, b_ps, b_ns, y_bs, y_rs, y_ns, thr_stride,
    HAS_INDEX: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    if HAS_INDEX:
        slot = tl.load(index_ptr + b)
        slot = tl.where((slot >= 0) & (slot < num_slots), slot, 0)  # never read outside theta (host-checked)
    elif PER_SAMPLE:
        slot = b
    else:
        slot = b * 0
    t = tl.load(thr_ptr + b * thr_stride)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=t.dtype)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xm = (rm[:, None] < S) & (kk[None, :] < K)
        xv = tl.load(x_ptr + b * x_bs + rm[:, None] * x_rs + kk[None, :] * x_ks, mask=xm, other=0.0).to(t.dtype)
        wm = (kk[:, None] < K) & (rn[None, :] < N)
        th = tl.load(theta_ptr + slot * t_ps + kk[:, None] * t_ks + rn[None, :] * t_ns, mask=wm, other=0.0)
        de = tl.load(delta_ptr + b * d_bs + kk[:, None] * d_ks + rn[None, :] * d_ns, mask=wm, other=0.0)
        w = _clip(de.to(t.dtype), t) + th.to(t.dtype)
        w = tl.where(wm, w, 0.0)
        acc = tl.dot(xv, w, acc, input_precision="ieee")
    if HAS_BIAS:
        bv = tl.load(bias_ptr + slot * b_ps + rn * b_ns, mask=rn < N, other=0.0)
        acc = acc + bv.to(t.dtype)[None, :]
    ym = (rm[:, None] < S) & (rn[None, :] < N)
    tl.store(y_ptr + b * y_bs + rm[:, None] * y_rs + rn[None, :] * y_ns, acc.to(y_ptr.dtype.element_ty), mask=ym)


def edited_linear(x, theta, delta, threshold, bias, proto_index) -> torch.Tensor:
    """Operands are read through their strides; threshold and proto_index are read densely, so
    they are made contiguous here (no-ops after pyeditor.validate.edited_linear_args)."""
    B, S, K = x.shape
    threshold = threshold.reshape(-1).contiguous()
    if proto_index is not None:
        proto_index = proto_index.contiguous()
    N = theta.shape[-1]
    y = torch.empty((B, S, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    per_sample = proto_index is None and theta.dim() == 3
    t_ps = theta.stride(0) if theta.dim() == 3 else 0
    b_ps = bias.stride(0) if bias is not None and bias.dim() == 2 else 0
    def grid(meta):
        return B, triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

    wrap_triton(_EDITED_LINEAR.on(y))[grid](
        x, theta, delta, threshold, bias if bias is not None else threshold,
        proto_index if proto_index is not None else threshold, y,
        S, K, N, theta.shape[0] if theta.dim() == 3 else 1,
        x.stride(0), x.stride(1), x.stride(2), t_ps, theta.stride(-2), theta.stride(-1),
        delta.stride(0), delta.stride(1), delta.stride(2), b_ps, bias.stride(-1) if bias is not None else 0,
        y.stride(0), y.stride(1), y.stride(2), 0 if threshold.numel() == 1 else 1,
        HAS_INDEX=proto_index is not None, PER_SAMPLE=per_sample, HAS_BIAS=bias is not None,
    )
    return y


@triton.jit
def _hyper_kernel(
    e_ptr, w_ptr, bias_ptr, offsets_ptr, rows_ptr, out_ptr, thr_ptr, tiles_ptr,
    B, D, N,
    e_ls, e_bs, e_ds, w_ps, w_ds, w_ns, b_ps, b_ns, o_ps, o_bs, o_ns, thr_stride,
    GATHERED: tl.constexpr, HAS_BIAS: tl.constexpr, SUMSQ: tl.constexpr, HAS_THR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    local = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    if GATHERED:
        start = tl.load(offsets_ptr + p)
        count = tl.load(offsets_ptr + p + 1) - start
        valid = local < count
        rows = tl.load(rows_ptr + start + local, mask=valid, other=0)
    else:
        valid = local < B
        rows = local
    acc_dtype = tl.float64 if e_ptr.dtype.element_ty == tl.float64 else tl.float32
    if SUMSQ:
        sq = tl.zeros([BLOCK_M], dtype=tl.float64)
        if HAS_THR:
            t = tl.load(thr_ptr + rows * thr_stride, mask=valid, other=0.0)
    n_blocks = tl.cdiv(N, BLOCK_N) if SUMSQ else 1
    head = 0
    n_end = N
    if not SUMSQ:  # one column tile of the head table: (head, first column, end column)
        tile = tl.program_id(2).to(tl.int64) * 3
        head = tl.load(tiles_ptr + tile)
        n_end = tl.load(tiles_ptr + tile + 2)
    for nb in range(0, n_blocks):
        if SUMSQ:
            rn = nb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        else:
            rn = tl.load(tiles_ptr + tile + 1) + tl.arange(0, BLOCK_N).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + rk
            ev = tl.load(e_ptr + head * e_ls + rows[:, None] * e_bs + kk[None, :] * e_ds,
                         mask=valid[:, None] & (kk[None, :] < D), other=0.0).to(acc_dtype)
            wv = tl.load(w_ptr + p * w_ps + kk[:, None] * w_ds + rn[None, :] * w_ns,
                         mask=(kk[:, None] < D) & (rn[None, :] < n_end), other=0.0).to(acc_dtype)
            acc = tl.dot(ev, wv, acc, input_precision="ieee")
        if HAS_BIAS:
            bv = tl.load(bias_ptr + p * b_ps + rn * b_ns, mask=rn < n_end, other=0.0)
            acc = acc + bv.to(acc_dtype)[None, :]
        m = valid[:, None] & (rn[None, :] < n_end)
        if SUMSQ:
            g = acc
            if HAS_THR:  # + (acc - acc): an overflowed (inf) element stays non-finite, not T
                g = _clip(g, t.to(acc_dtype)[:, None]) + (acc - acc)
            g = g.to(tl.float64)
            sq += tl.sum(tl.where(m, g * g, 0.0), axis=1)
        else:
            tl.store(out_ptr + p * o_ps + rows[:, None] * o_bs + rn[None, :] * o_ns,
                     acc.to(out_ptr.dtype.element_ty), mask=m)
    if SUMSQ:
        tl.store(out_ptr + rows * o_bs + p * o_ps, sq, mask=valid)


def segments(index: torch.Tensor, protos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [P+1], rows [B]): rows stably sorted by index, group p = rows[offsets[p]:offsets[p+1]]."""
    rows = torch.sort(index, stable=True).indices
    counts = torch.bincount(index, minlength=protos)
    offsets = torch.zeros(protos + 1, dtype=torch.int64, device=index.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, rows


def head_tiles(sizes, width: int, device) -> torch.Tensor:
    """[T, 3] int64 (head, first column, end column): column tiles of the heads concatenated along
    n, each inside one head and at most ``width`` wide (csrc/include/pyeditor/hyper_math.h's
    head_tiles); empty heads own none."""
    table, start = [], 0
    for head, n in enumerate(sizes):
        table += [(head, c, min(c + width, start + n)) for c in range(start, start + n, width)]
        start += n
    return torch.tensor(table, dtype=torch.int64, device=device).reshape(-1, 3)


def _launch_hyper(e, weight, bias, index, out, sumsq: bool, threshold=None, sizes=None) -> None:
    """e [B, d] (one head) or [L, B, d] with ``sizes`` (heads concatenated along weight's n)."""
    e3 = e if e.dim() == 3 else e.unsqueeze(0)
    _, B, D = e3.shape
    P, _, N = weight.shape
    if index is not None:
        offsets, rows = segments(index, P)
    else:
        offsets = rows = e  # unused
    if sumsq:
        o_ps, o_bs, o_ns = out.stride(1), out.stride(0), 0
    elif index is not None:
        o_ps, o_bs, o_ns = 0, out.stride(0), out.stride(1)
    else:
        o_ps, o_bs, o_ns = out.stride(0), out.stride(1), out.stride(2)
    tiles = offsets if sumsq else head_tiles([N] if sizes is None else sizes, HEAD_TILE, e.device)

    def grid(meta):
        return P, triton.cdiv(B, meta["BLOCK_M"]), 1 if sumsq else tiles.shape[0]

    thr = threshold.reshape(-1).contiguous() if threshold is not None else e  # read densely
    wrap_triton(_HYPER.on(out))[grid](
        e3, weight, bias if bias is not None else e, offsets, rows, out, thr, tiles,
        B, D, N,
        e3.stride(0), e3.stride(1), e3.stride(2), weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        o_ps, o_bs, o_ns, 0 if threshold is None or threshold.numel() == 1 else 1,
        GATHERED=index is not None, HAS_BIAS=bias is not None, SUMSQ=sumsq, HAS_THR=threshold is not None,
        BLOCK_N=HEAD_TILE,
    )


def hyper_matmul(e, weight, bias, index) -> torch.Tensor:
    B = e.shape[0]
    P, _, N = weight.shape
    shape = (B, N) if index is not None else (P, B, N)
    out = torch.empty(shape, dtype=e.dtype, device=e.device)
    if out.numel() and P:
        _launch_hyper(e, weight, bias, index, out, sumsq=False)
    return out


def hyper_matmul_heads(e, weight, sizes, bias, index) -> torch.Tensor:
    B = e.shape[1]
    P, _, N = weight.shape
    shape = (B, N) if index is not None else (P, B, N)
    out = torch.empty(shape, dtype=e.dtype, device=e.device)
    if out.numel() and P:
        _launch_hyper(e, weight, bias, index, out, sumsq=False, sizes=sizes)
    return out


@triton.jit
def _weight_grad_kernel(
    e_ptr, g_ptr, offsets_ptr, rows_ptr, tiles_ptr, out_ptr,
    D, e_ls, e_bs, e_ds, g_bs, g_ns, o_ps, o_ds, o_ns,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[p, dm, rn] = sum over p's segment rows r of e[head, r, dm] * grad[r, rn]
    p = tl.program_id(0).to(tl.int64)
    dm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    tile = tl.program_id(2).to(tl.int64) * 3
    head = tl.load(tiles_ptr + tile)
    rn = tl.load(tiles_ptr + tile + 1) + tl.arange(0, BLOCK_N).to(tl.int64)
    n_end = tl.load(tiles_ptr + tile + 2)
    start = tl.load(offsets_ptr + p)
    count = tl.load(offsets_ptr + p + 1) - start
    acc_dtype = tl.float64 if e_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, count, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        valid = kk < count
        rows = tl.load(rows_ptr + start + kk, mask=valid, other=0)
        ev = tl.load(e_ptr + head * e_ls + rows[None, :] * e_bs + dm[:, None] * e_ds,
                     mask=(dm[:, None] < D) & valid[None, :], other=0.0).to(acc_dtype)
        gv = tl.load(g_ptr + rows[:, None] * g_bs + rn[None, :] * g_ns,
                     mask=valid[:, None] & (rn[None, :] < n_end), other=0.0).to(acc_dtype)
        acc = tl.dot(ev, gv, acc, input_precision="ieee")
    tl.store(out_ptr + p * o_ps + dm[:, None] * o_ds + rn[None, :] * o_ns, acc.to(out_ptr.dtype.element_ty),
             mask=(dm[:, None] < D) & (rn[None, :] < n_end))


def weight_grad(e, grad, sizes, index, protos: int) -> torch.Tensor:
    """[P, d, N]: e [L, B, d], grad [B, N] split into heads by ``sizes``, index [B]."""
    _, B, D = e.shape
    N = grad.shape[1]
    out = torch.empty((protos, D, N), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    offsets, rows = segments(index, protos)
    tiles = head_tiles(sizes, HEAD_TILE, e.device)

    def grid(meta):
        return protos, triton.cdiv(D, meta["BLOCK_M"]), tiles.shape[0]

    wrap_triton(_WEIGHT_GRAD.on(out))[grid](
        e, grad, offsets, rows, tiles, out,
        D, e.stride(0), e.stride(1), e.stride(2), grad.stride(0), grad.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=HEAD_TILE,
    )
    return out


def edit_sumsq(e, weight, bias, threshold) -> torch.Tensor:
    B = e.shape[0]
    P, _, N = weight.shape
    out = torch.zeros((B, P), dtype=torch.float64, device=e.device)
    if out.numel() and N:
        _launch_hyper(e, weight, bias, None, out, sumsq=True,
                      threshold=None if threshold is None else threshold.reshape(-1))
    return out


# the config tables above, bound to their kernels
_EDITED_LINEAR = Tuned(_edited_linear_kernel, EDITED_LINEAR_CONFIGS, EDITED_LINEAR_CONFIGS[0],
                       key=["S", "K", "N", "HAS_INDEX", "PER_SAMPLE"])
_HYPER = Tuned(_hyper_kernel, HYPER_CONFIGS, HYPER_CONFIGS[0], key=["B", "D", "N", "GATHERED", "SUMSQ"])
_WEIGHT_GRAD = Tuned(_weight_grad_kernel, WEIGHT_GRAD_CONFIGS, WEIGHT_GRAD_CONFIGS[0], key=["D"])
