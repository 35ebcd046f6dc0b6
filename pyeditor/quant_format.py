"""The quant family's formats, written once: the quantized weight and its packed layout.

Python packs with this module (pyeditor.quant), the Triton kernels decode with its constants
(kernels/quant.py), pyeditor.validate checks packed buffers against it and the oracle
(pyeditor.reference) takes its widths and group sizes from it. The C++ kernels read the same rule
from csrc/include/pyeditor/pack.h; tests/quant/test_quant_format.py parses that header and
cross-checks its constants and formulas against this module, so the two cannot drift apart
silently.

The packed layout: output channels are grouped by width into buckets (widths ascending); a
bucket is a run of tiles of TILE_N channels; along K a tile is a run of blocks of TILE_K inputs
(K padded to whole blocks). A block of a width-w plane is w/2 chunks of CHUNK_BYTES bytes, and
byte c * FIELD_INPUTS + t of chunk j holds, at bit shift f * w, the code of channel c for input
FIELD_INPUTS * g + t with g = j * (8 / w) + f. Width 6 is a 4-bit plane of the low bits followed
by a 2-bit plane of the high bits (SIX_BIT_HIGH_OFFSET bytes into the block), so no code
straddles a byte. Nothing here imports the package: the oracle may import it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

BIT_WIDTHS = (2, 4, 6, 8)  # the widths a channel may have (CHORD's strategy codes 0-3)
GROUP_SIZES = (32, 64, 128)  # inputs per scale along K; None (0 in the ops): one per channel

TILE_N = 16  # channels per tile
TILE_K = 16  # inputs per block
FIELD_INPUTS = 4  # consecutive inputs of one channel in one 4-byte field
CHUNK_BYTES = TILE_N * FIELD_INPUTS  # one chunk: every channel of the tile, FIELD_INPUTS inputs
SIX_BIT_PLANES = (4, 2)  # width 6: low plane, high plane
PERM_INT16_CHANNELS = 32767  # out_features up to this: int16 permutation entries, else int32


def block_bytes(bits: int) -> int:
    """Bytes of one TILE_N x TILE_K block at ``bits`` bits per code."""
    return bits * TILE_N * TILE_K // 8


SIX_BIT_HIGH_OFFSET = block_bytes(SIX_BIT_PLANES[0])  # where the high plane of a 6-bit block starts


def padded_k(k: int) -> int:
    """K rounded up to whole blocks."""
    return -(-k // TILE_K) * TILE_K


def tile_bytes(bits: int, k: int) -> int:
    """Bytes of one tile (TILE_N channels x padded K)."""
    return padded_k(k) // TILE_K * block_bytes(bits)


def n_groups(in_features: int, group_size: Optional[int]) -> int:
    """Scale groups per channel: ceil(in / group_size), or 1 (group_size None or 0)."""
    return -(-in_features // group_size) if group_size else 1


def group_of_column(in_features: int, group_size: Optional[int]) -> Tensor:
    """int64 [in]: the scale group of every input (all 0 for one scale per channel)."""
    if not group_size:
        return torch.zeros(in_features, dtype=torch.int64)
    return torch.arange(in_features) // group_size


def field_byte(w: int, c: int, kk: int) -> int:
    """Byte of a width-w plane block that holds channel c (< TILE_N), input kk (< TILE_K)."""
    g, t = divmod(kk, FIELD_INPUTS)
    return g // (8 // w) * CHUNK_BYTES + c * FIELD_INPUTS + t


def field_shift(w: int, kk: int) -> int:
    """Bit shift of input kk's field inside its byte."""
    return kk // FIELD_INPUTS % (8 // w) * w


def perm_dtype(out_features: int) -> torch.dtype:
    """The permutation's dtype: int16 up to PERM_INT16_CHANNELS output channels (7 bytes of
    metadata per channel instead of 9), int32 beyond."""
    return torch.int16 if out_features <= PERM_INT16_CHANNELS else torch.int32


class QuantizedWeight(NamedTuple):
    """A channel-wise (optionally group-wise) quantized [out, in] weight (CHORD Eq. 3).

    codes: uint8 [out, in], each in [0, 2**bits[o] - 1]
    scale: float32 [out] (group_size None) or [out, G] with G = ceil(in / group_size), > 0
    zero:  int32, same shape as scale: the integer zero point, in [0, 2**bits[o] - 1]
    bits:  int64 [out], each in BIT_WIDTHS
    group_size: None (one scale per channel) or one of GROUP_SIZES: input i of channel o uses
           scale[o, i // group_size] (the last group is ragged when in is not a multiple).
    Value: w[o, i] ~= (codes[o, i] - zero[o, g]) * scale[o, g], g = i // group_size.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: Tensor
    group_size: Optional[int] = None

    def dequantize(self) -> Tensor:
        """float32 [out, in] by the value rule above: one float32 multiply per element (codes -
        zero is an exact small integer). The oracle's checked twin is pyeditor.reference.dequantize."""
        n, k = self.codes.shape
        gid = group_of_column(k, self.group_size).to(self.codes.device)
        groups = n_groups(k, self.group_size)
        z = self.zero.to(torch.float32).reshape(n, groups)[:, gid]
        s = self.scale.to(torch.float32).reshape(n, groups)[:, gid]
        return (self.codes.to(torch.float32) - z) * s
