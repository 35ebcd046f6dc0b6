"""Triton kernels for packed channel-wise 2/4/6/8-bit weights (layout: pyeditor.quant_format).

One launch per width bucket (BITS is a compile-time constant). A program owns one 16-channel
tile and BLOCK_M activation rows; it walks K in blocks of 16 inputs, decodes the block's codes
with one gather, shift and mask per plane, subtracts the zero point (q - z is an exact small
integer, so a code at its zero point adds nothing, as in the reference) and accumulates
sum_k (q - z) x_k in fp32; the scale is applied once at the end: y = s * acc + bias, stored in
the channel's original column. GEMV (M small): a multiply-and-reduce; GEMM: tl.dot in exact
fp32 (input_precision="ieee"), or in bf16 / fp16 for such activations (the same exact
products, on tensor cores). The bf16 mode rounds x to bf16 as it loads it. Offsets are int64.
A tile whose result is not finite (an inf input, an overflowing sum) is recomputed in the reference's order.

Group-wise scales (group_size 32, 64, 128; GROUP_BLOCKS = group_size / 16 blocks, 0 for one scale
per channel): scale and zero are [G, rows] group-major (entry g of packed row r at g * rows + r);
the sums restart at each group and y += s_g * acc_g at its end (a block never straddles two
groups; the last group may have fewer blocks).

The layout's sizes come from pyeditor.quant_format (as constexprs); block sizes of the launch from
LINEAR_GEMM_CONFIGS / LINEAR_GEMV_CONFIGS / DEQUANT_CONFIGS (autotuned on a GPU by shape; the
first of each under the interpreter). Arguments arrive checked (pyeditor.validate.packed_args).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from pyeditor import quant_format as fmt

from .configs import Tuned, config, interpreting

TILE_N, TILE_K = fmt.TILE_N, fmt.TILE_K
# the same numbers as constexprs, which a jit function may read as globals
_TN: tl.constexpr = fmt.TILE_N
_TK: tl.constexpr = fmt.TILE_K
_FIELD: tl.constexpr = fmt.FIELD_INPUTS
_CHUNK: tl.constexpr = fmt.CHUNK_BYTES
_BYTES_PER_BIT: tl.constexpr = fmt.block_bytes(1)  # block bytes = BITS * this
_SIX_LOW: tl.constexpr = fmt.SIX_BIT_PLANES[0]
_SIX_HIGH: tl.constexpr = fmt.SIX_BIT_PLANES[1]
_SIX_HIGH_AT: tl.constexpr = fmt.SIX_BIT_HIGH_OFFSET


@triton.jit
def _plane(data_ptr, base, c, kk, W: tl.constexpr):
    """Codes [TILE_N channels, TILE_K inputs] of one plane block of width W (8, 4 or 2)."""
    PER: tl.constexpr = 8 // W
    g = kk // _FIELD
    byte = (g // PER) * _CHUNK + c[:, None] * _FIELD + (kk % _FIELD)[None, :]
    v = tl.load(data_ptr + base + byte).to(tl.int32)
    return (v >> ((g % PER) * W)[None, :]) & ((1 << W) - 1)


@triton.jit
def _block_codes(data_ptr, base, c, kk, BITS: tl.constexpr):
    if BITS == 6:
        high = _plane(data_ptr, base + _SIX_HIGH_AT, c, kk, _SIX_HIGH)
        return _plane(data_ptr, base, c, kk, _SIX_LOW) | (high << _SIX_LOW)
    else:
        return _plane(data_ptr, base, c, kk, BITS)


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even; NaN kept), as float32: integer
    steps on the bits, which the interpreter runs as a GPU does (its float casts to bf16 do not
    round to nearest)."""
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def _load_x(x_ptr, m, k, M, K, sx_m, sx_k, ROUND_BF16: tl.constexpr):
    """Activations [BLOCK_M, TILE_K] of block inputs k, in x's dtype (bf16 mode: float32 holding
    x rounded to bf16)."""
    x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :] * sx_k, mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
    if ROUND_BF16:
        x = _round_bf16(x.to(tl.float32))
    return x


@triton.jit
def _block_sums(x_ptr, data_ptr, tile_base, blk0, blk1, z, m, c, kk, M, K, sx_m, sx_k,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
                HALF_DOT: tl.constexpr):
    """sum_k (q - z) x_k [BLOCK_M, TILE_N] over blocks [blk0, blk1) of one tile (z: the tile's
    zero points, int32 [TILE_N]). HALF_DOT 1 / 2 (x values exact in bf16 / fp16): tl.dot in that
    type with fp32 accumulation, the same exact products as the fp32 dot (q - z in -255..255 is
    exact in both, and a product of two such values is exact in fp32), on the tensor cores (whose
    fp32 sums may round differently from IEEE adds: within the reduction tolerance of the tests)."""
    block_bytes = BITS * _BYTES_PER_BIT
    acc = tl.zeros([BLOCK_M, _TN], dtype=tl.float32)
    for blk in range(blk0, blk1):
        q = _block_codes(data_ptr, tile_base + blk * block_bytes, c, kk, BITS) - z[:, None]  # [c, kk] int32
        k = blk * _TK + kk.to(tl.int64)
        x = _load_x(x_ptr, m, k, M, K, sx_m, sx_k, ROUND_BF16)
        if USE_DOT and HALF_DOT == 1:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(q.to(tl.bfloat16)), out_dtype=tl.float32)
        elif USE_DOT and HALF_DOT == 2:
            acc += tl.dot(x.to(tl.float16), tl.trans(q.to(tl.float16)), out_dtype=tl.float32)
        elif USE_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _linear_tile(
    x_ptr, data_ptr, scale_ptr, zero_ptr, perm_ptr, bias_ptr, y_ptr,
    M, K, N, row_start, byte_offset, blocks, srows,
    sx_m, sx_k, sy_m,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
    GROUP_BLOCKS: tl.constexpr, ROUND_BF16: tl.constexpr, HALF_DOT: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = tl.arange(0, _TN)
    kk = tl.arange(0, _TK)
    block_bytes = BITS * _BYTES_PER_BIT
    tile_base = byte_offset + tile * blocks * block_bytes
    rows = row_start + tile * _TN + c.to(tl.int64)
    if GROUP_BLOCKS == 0:
        s = tl.load(scale_ptr + rows)
        z = tl.load(zero_ptr + rows).to(tl.int32)
        y = s[None, :] * _block_sums(x_ptr, data_ptr, tile_base, 0, blocks, z, m, c, kk, M, K, sx_m, sx_k,
                                     BITS, BLOCK_M, USE_DOT, ROUND_BF16, HALF_DOT)
    else:
        # one scale and zero point per group of GROUP_BLOCKS blocks: the group's sums, then
        # y += s_g * acc_g at its end (the last group may be ragged)
        y = tl.zeros([BLOCK_M, _TN], dtype=tl.float32)
        for g in range(0, tl.cdiv(blocks, GROUP_BLOCKS)):
            gs = tl.cast(g, tl.int64) * srows + rows
            s_g = tl.load(scale_ptr + gs)
            z_g = tl.load(zero_ptr + gs).to(tl.int32)
            y += s_g[None, :] * _block_sums(x_ptr, data_ptr, tile_base, g * GROUP_BLOCKS,
                                            tl.minimum(g * GROUP_BLOCKS + GROUP_BLOCKS, blocks), z_g, m, c, kk, M, K,
                                            sx_m, sx_k, BITS, BLOCK_M, USE_DOT, ROUND_BF16, HALF_DOT)
    col = tl.load(perm_ptr + rows).to(tl.int64)
    ok = (col >= 0) & (col < N)
    # s * sum (q - z) x can overflow to inf (or meet an inf input) where the reference's sum of
    # ((q - z) * s) * x stays finite or gives a different inf: a tile with any non-finite result
    # redoes it in the reference's order (rare; costs nothing otherwise).
    finite = tl.abs(y) < float("inf")
    if tl.min(tl.min(finite.to(tl.int32), axis=1), axis=0) == 0:
        ref = tl.zeros([BLOCK_M, _TN], dtype=tl.float32)
        for blk in range(0, blocks):
            q = _block_codes(data_ptr, tile_base + blk * block_bytes, c, kk, BITS).to(tl.float32)
            if GROUP_BLOCKS == 0:
                w = (q - z.to(tl.float32)[:, None]) * s[:, None]
            else:  # the block's group's scale and zero point
                gs = tl.cast(blk // GROUP_BLOCKS, tl.int64) * srows + rows
                w = (q - tl.load(zero_ptr + gs).to(tl.float32)[:, None]) * tl.load(scale_ptr + gs)[:, None]
            k = blk * _TK + kk.to(tl.int64)
            x = _load_x(x_ptr, m, k, M, K, sx_m, sx_k, ROUND_BF16).to(tl.float32)
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
    c = tl.arange(0, _TN)
    kk = tl.arange(0, _TK)
    block_bytes = BITS * _BYTES_PER_BIT
    q = _block_codes(data_ptr, byte_offset + (tile * blocks + blk) * block_bytes, c, kk, BITS).to(tl.float32)
    rows = row_start + tile * _TN + c.to(tl.int64)
    if GROUP_BLOCKS == 0:
        s = tl.load(scale_ptr + rows)
        z = tl.load(zero_ptr + rows).to(tl.float32)
    else:  # the block's group (group-major [G, srows])
        gs = (blk // GROUP_BLOCKS) * srows + rows
        s = tl.load(scale_ptr + gs)
        z = tl.load(zero_ptr + gs).to(tl.float32)
    col = tl.load(perm_ptr + rows).to(tl.int64)
    k = blk * _TK + kk.to(tl.int64)
    ok = (col[:, None] >= 0) & (col[:, None] < N) & (k[None, :] < K)
    w = (q - z[:, None]) * s[:, None]
    tl.store(w_ptr + tl.where(ok, col[:, None] * K + k[None, :], 0), w, mask=ok)


def _half_dot(x2, bf16: bool) -> int:
    """The GEMM's dot type: 1 bf16 (bf16 x or the bf16 mode), 2 fp16 (fp16 x), 0 fp32. The
    interpreter multiplies bf16 dots wrongly (NumPy has no bf16): there the bf16 case takes the
    fp32 dot of the same values, which sums the same exact products."""
    if x2.dtype == torch.float16 and not bf16:
        return 2
    if (bf16 or x2.dtype == torch.bfloat16) and not interpreting(x2):
        return 1
    return 0


def _buckets(flat):
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]


def _group_blocks(group_size: int) -> int:
    """Blocks of TILE_K inputs per scale group (0: one scale per channel)."""
    return group_size // TILE_K


# GEMM (M >= 16): [BLOCK_M, TILE_N] tiles of tl.dot; GEMV: BLOCK_M = M rounded up to a power of 2
LINEAR_GEMM_CONFIGS = (
    config(BLOCK_M=16),
    config(BLOCK_M=32),
    config(BLOCK_M=64, num_warps=8),
    config(BLOCK_M=16, num_warps=2, num_stages=3),
    config(BLOCK_M=32, num_stages=3),
)
LINEAR_GEMV_CONFIGS = (config(num_warps=4), config(num_warps=1), config(num_warps=2))
DEQUANT_CONFIGS = (config(num_warps=4), config(num_warps=1), config(num_warps=2))
_KEY = ["M", "K", "N", "BITS", "GROUP_BLOCKS", "ROUND_BF16", "HALF_DOT"]
_GEMM = Tuned(_linear_tile, LINEAR_GEMM_CONFIGS, LINEAR_GEMM_CONFIGS[0], key=_KEY)
_GEMV = Tuned(_linear_tile, LINEAR_GEMV_CONFIGS, LINEAR_GEMV_CONFIGS[0], key=_KEY)
_DEQUANT = Tuned(_dequant_tile, DEQUANT_CONFIGS, DEQUANT_CONFIGS[0], key=["K", "N", "BITS", "GROUP_BLOCKS"])


def linear(x2, data, scale, zero, perm, buckets, n, bias, y, group_size=0, bf16=False) -> None:
    """y[M, n] = x2[M, K] @ W.T (+ bias) for the packed W; y preallocated (zeros not needed).
    group_size 0: scale/zero [rows]; 32, 64, 128: [G, rows] group-major. bf16: x rounded to
    bfloat16 as it is loaded (the bf16 mode)."""
    m, k = x2.shape
    group_blocks = _group_blocks(group_size)
    blocks = fmt.padded_k(k) // TILE_K
    use_dot = m >= 16  # tl.dot needs 16 rows
    # GEMV: the row block is the rows themselves (no config chooses it); GEMM: the table does
    gemv_rows = {} if use_dot else {"BLOCK_M": max(1, triton.next_power_of_2(m))}
    kernel = (_GEMM if use_dot else _GEMV).on(x2)
    for bits, row_start, rows, offset in _buckets(buckets):
        if rows == 0 or m == 0:
            continue

        def grid(meta, tiles=rows // TILE_N):
            return tiles, triton.cdiv(m, meta["BLOCK_M"])

        wrap_triton(kernel)[grid](
            x2, data, scale, zero, perm, bias if bias is not None else scale, y,
            m, k, n, row_start, offset, blocks, scale.shape[-1], x2.stride(0), x2.stride(1), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None, USE_DOT=use_dot, GROUP_BLOCKS=group_blocks,
            ROUND_BF16=bf16, HALF_DOT=_half_dot(x2, bf16), **gemv_rows,
        )


def dequantize(data, scale, zero, perm, buckets, k, n, w, group_size=0) -> None:
    """w[n, k] (float32, preallocated) = the packed weight in original channel order."""
    group_blocks = _group_blocks(group_size)
    blocks = fmt.padded_k(k) // TILE_K
    kernel = _DEQUANT.on(data)
    for bits, row_start, rows, offset in _buckets(buckets):
        if rows == 0 or blocks == 0:
            continue
        wrap_triton(kernel)[(rows // TILE_N, blocks)](
            data, scale, zero, perm, w, k, n, row_start, offset, blocks, scale.shape[-1],
            BITS=bits, GROUP_BLOCKS=group_blocks)
