"""Triton kernels for packed channel-wise 2/4/6/8-bit weights (layout: csrc/include/pyeditor/pack.h).

One launch per width bucket (BITS is a compile-time constant). A program owns one 16-channel
tile and BLOCK_M activation rows; it walks K in blocks of 16 inputs, decodes the block's codes
with one gather, shift and mask per plane, and accumulates sum_k q x_k and sum_k x_k in fp32;
scale and zero point are applied once at the end: y = s * (acc - z * sum x) + bias, stored in
the channel's original column. GEMV (M small): a multiply-and-reduce; GEMM: tl.dot in exact
fp32 (input_precision="ieee"). Offsets are int64. A tile whose factored result is not finite
(an inf input) is recomputed in the reference's order.

Group-wise scales (group_size 32, 64, 128; GROUP_BLOCKS = group_size / 16 blocks, 0 for one scale
per channel): scale and zero are [G, rows] group-major (entry g of packed row r at g * rows + r);
the sums restart at each group and y += s_g * (acc_g - z_g * sum_g x) at its end (a block never
straddles two groups; the last group may have fewer blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

TILE_N = 16
TILE_K = 16


@triton.jit
def _plane(data_ptr, base, c, kk, W: tl.constexpr):
    """Codes [16 channels, 16 inputs] of one plane block of width W (8, 4 or 2)."""
    PER: tl.constexpr = 8 // W
    g = kk // 4
    byte = (g // PER) * 64 + c[:, None] * 4 + (kk % 4)[None, :]
    v = tl.load(data_ptr + base + byte).to(tl.int32)
    return (v >> ((g % PER) * W)[None, :]) & ((1 << W) - 1)


@triton.jit
def _block_codes(data_ptr, base, c, kk, BITS: tl.constexpr):
    if BITS == 6:
        return _plane(data_ptr, base, c, kk, 4) | (_plane(data_ptr, base + 128, c, kk, 2) << 4)
    else:
        return _plane(data_ptr, base, c, kk, BITS)


@triton.jit
def _block_sums(x_ptr, data_ptr, tile_base, blk0, blk1, m, c, kk, M, K, sx_m, sx_k,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr):
    """sum_k q x_k [BLOCK_M, 16] and sum_k x_k [BLOCK_M] over blocks [blk0, blk1) of one tile."""
    block_bytes = BITS * 32
    acc = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for blk in range(blk0, blk1):
        q = _block_codes(data_ptr, tile_base + blk * block_bytes, c, kk, BITS).to(tl.float32)  # [c, kk]
        k = blk * 16 + kk.to(tl.int64)
        x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :] * sx_k,
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(q), input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * q[None, :, :], axis=2)
        xsum += tl.sum(x, axis=1)
    return acc, xsum


@triton.jit
def _linear_tile(
    x_ptr, data_ptr, scale_ptr, zero_ptr, perm_ptr, bias_ptr, y_ptr,
    M, K, N, row_start, byte_offset, blocks, srows,
    sx_m, sx_k, sy_m,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
    GROUP_BLOCKS: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = tl.arange(0, 16)
    kk = tl.arange(0, 16)
    block_bytes = BITS * 32
    tile_base = byte_offset + tile * blocks * block_bytes
    rows = row_start + tile * 16 + c.to(tl.int64)
    if GROUP_BLOCKS == 0:
        acc, xsum = _block_sums(x_ptr, data_ptr, tile_base, 0, blocks, m, c, kk, M, K, sx_m, sx_k,
                                BITS, BLOCK_M, USE_DOT)
        s = tl.load(scale_ptr + rows)
        z = tl.load(zero_ptr + rows).to(tl.float32)
        y = s[None, :] * (acc - z[None, :] * xsum[:, None])
    else:
        # one scale and zero point per group of GROUP_BLOCKS blocks: the group's sums, then
        # y += s_g * (acc_g - z_g * sum_g x) at its end (the last group may be ragged)
        y = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        for g in range(0, tl.cdiv(blocks, GROUP_BLOCKS)):
            acc, xsum = _block_sums(x_ptr, data_ptr, tile_base, g * GROUP_BLOCKS,
                                    tl.minimum(g * GROUP_BLOCKS + GROUP_BLOCKS, blocks), m, c, kk, M, K, sx_m, sx_k,
                                    BITS, BLOCK_M, USE_DOT)
            gs = tl.cast(g, tl.int64) * srows + rows
            s_g = tl.load(scale_ptr + gs)
            z_g = tl.load(zero_ptr + gs).to(tl.float32)
            y += s_g[None, :] * (acc - z_g[None, :] * xsum[:, None])
    col = tl.load(perm_ptr + rows).to(tl.int64)
    ok = (col >= 0) & (col < N)
    # s * (sum q x - z * sum x) turns an inf input (or a sum that overflows) into inf - inf = NaN
    # where the reference's sum of ((q - z) * s) * x gives +-inf: a tile with any non-finite
    # result redoes it in the reference's order (rare; costs nothing otherwise).
    finite = tl.abs(y) < float("inf")
    if tl.min(tl.min(finite.to(tl.int32), axis=1), axis=0) == 0:
        ref = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        for blk in range(0, blocks):
            q = _block_codes(data_ptr, tile_base + blk * block_bytes, c, kk, BITS).to(tl.float32)
            if GROUP_BLOCKS == 0:
                w = (q - z[:, None]) * s[:, None]
            else:  # the block's group's scale and zero point
                gs = tl.cast(blk // GROUP_BLOCKS, tl.int64) * srows + rows
                w = (q - tl.load(zero_ptr + gs).to(tl.float32)[:, None]) * tl.load(scale_ptr + gs)[:, None]
            k = blk * 16 + kk.to(tl.int64)
            x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :] * sx_k,
                        mask=(m[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
            ref += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        y = tl.where(finite, y, ref)
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)[None, :]
    col = tl.where(ok, col, 0)
    tl.store(y_ptr + m[:, None] * sy_m + col[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & ok[None, :])


@triton.jit
def _dequant_tile(data_ptr, scale_ptr, zero_ptr, perm_ptr, w_ptr, K, N, row_start, byte_offset, blocks, srows,
                  BITS: tl.constexpr, GROUP_BLOCKS: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, 16)
    kk = tl.arange(0, 16)
    block_bytes = BITS * 32
    q = _block_codes(data_ptr, byte_offset + (tile * blocks + blk) * block_bytes, c, kk, BITS).to(tl.float32)
    rows = row_start + tile * 16 + c.to(tl.int64)
    if GROUP_BLOCKS == 0:
        s = tl.load(scale_ptr + rows)
        z = tl.load(zero_ptr + rows).to(tl.float32)
    else:  # the block's group (group-major [G, srows])
        gs = (blk // GROUP_BLOCKS) * srows + rows
        s = tl.load(scale_ptr + gs)
        z = tl.load(zero_ptr + gs).to(tl.float32)
    col = tl.load(perm_ptr + rows).to(tl.int64)
    k = blk * 16 + kk.to(tl.int64)
    ok = (col[:, None] >= 0) & (col[:, None] < N) & (k[None, :] < K)
    w = (q - z[:, None]) * s[:, None]
    tl.store(w_ptr + tl.where(ok, col[:, None] * K + k[None, :], 0), w, mask=ok)


def _buckets(flat):
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]


def _group_blocks(scale, zero, buckets, k, group_size) -> int:
    """Blocks of 16 inputs per scale group (0: one scale per channel), after checking that scale
    and zero are contiguous [rows] (group_size 0) or [G, rows] (G = ceil(k / group_size)): the
    kernels index them unchecked (RuntimeError, like the C++ ops' checks)."""
    if group_size not in (0, 32, 64, 128):
        raise RuntimeError(f"pyeditor: group_size must be 0 (per channel), 32, 64 or 128, got {group_size}")
    rows = sum(buckets[2::4])
    shape = (-(-k // group_size), rows) if group_size else (rows,)
    for t, name, dtype in ((scale, "scale", torch.float32), (zero, "zero", torch.uint8)):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise RuntimeError(f"pyeditor: packed {name} must be a contiguous {list(shape)} {dtype} tensor "
                               f"(group_size {group_size}), got {t.dtype} {list(t.shape)}")
    return group_size // TILE_K


def linear(x2, data, scale, zero, perm, buckets, n, bias, y, group_size=0) -> None:
    """y[M, n] = x2[M, K] @ W.T (+ bias) for the packed W; y preallocated (zeros not needed).
    group_size 0: scale/zero [rows]; 32, 64, 128: [G, rows] group-major."""
    m, k = x2.shape
    group_blocks = _group_blocks(scale, zero, buckets, k, group_size)
    blocks = (k + TILE_K - 1) // TILE_K
    use_dot = m >= 16
    block_m = 16 if use_dot else max(1, triton.next_power_of_2(m))
    for bits, row_start, rows, offset in _buckets(buckets):
        if rows == 0 or m == 0:
            continue
        grid = (rows // TILE_N, triton.cdiv(m, block_m))
        wrap_triton(_linear_tile)[grid](
            x2, data, scale, zero, perm, bias if bias is not None else scale, y,
            m, k, n, row_start, offset, blocks, scale.shape[-1], x2.stride(0), x2.stride(1), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, USE_DOT=use_dot, GROUP_BLOCKS=group_blocks,
        )


def dequantize(data, scale, zero, perm, buckets, k, n, w, group_size=0) -> None:
    """w[n, k] (float32, preallocated) = the packed weight in original channel order."""
    group_blocks = _group_blocks(scale, zero, buckets, k, group_size)
    blocks = (k + TILE_K - 1) // TILE_K
    for bits, row_start, rows, offset in _buckets(buckets):
        if rows == 0 or blocks == 0:
            continue
        wrap_triton(_dequant_tile)[(rows // TILE_N, blocks)](
            data, scale, zero, perm, w, k, n, row_start, offset, blocks, scale.shape[-1],
            BITS=bits, GROUP_BLOCKS=group_blocks)
