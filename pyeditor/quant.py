"""CHORD's channel-wise 2/4/6/8-bit weights: packing, the packed matmul and the strategy codes.

quantize_channelwise(W, bits) -> PackedWeight: the reference quantizer (asymmetric min-max per
output channel, integer zero point), then channels grouped by width (a stable permutation),
each bucket padded to 16-channel tiles and bit-packed along K in the kernels' layout
(csrc/include/pyeditor/pack.h; 6 bits = a 4-bit and a 2-bit plane). dequantize() returns the
float32 weight in the original channel order, bit-identical to reference.dequantize.
packed_linear(x, packed, bias) = x @ dequantize(packed).T + bias, differentiable in x and bias.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends, ops, reference, validate

TILE_N = 16  # channels per tile (pack.h kTileN)
TILE_K = 16  # inputs per block (pack.h kTileK)
WIDTHS = (2, 4, 6, 8)
PERM_INT16_CHANNELS = 32767  # pack.h kPermInt16Channels


def perm_dtype(out_features: int) -> torch.dtype:
    """The permutation's dtype: int16 up to 32767 output channels (7 bytes of metadata per
    channel instead of 9), int32 beyond."""
    return torch.int16 if out_features <= PERM_INT16_CHANNELS else torch.int32


def padded_k(k: int) -> int:
    return -(-k // TILE_K) * TILE_K


# ---------------------------------------------------------------- the layout, in torch ops
def _pack_plane(codes: Tensor, w: int) -> Tensor:
    """[rows, Kp] codes < 2**w -> bytes [tiles, blocks, w/2, 16, 4] (pack.h: byte c*4+t of chunk j
    holds input 4g+t of channel c at shift f*w, g = j*(8/w) + f)."""
    rows, kp = codes.shape
    per = 8 // w
    v = codes.to(torch.int32).view(rows // TILE_N, TILE_N, kp // TILE_K, w // 2, per, 4)
    shifts = (torch.arange(per, dtype=torch.int32, device=codes.device) * w).view(per, 1)
    return (v << shifts).sum(4).permute(0, 2, 3, 1, 4).to(torch.uint8)


def _unpack_plane(planes: Tensor, w: int) -> Tensor:
    """Inverse of _pack_plane: [tiles, blocks, w/2, 16, 4] bytes -> [rows, Kp] codes."""
    tiles, blocks = planes.shape[:2]
    per = 8 // w
    shifts = (torch.arange(per, dtype=torch.int32, device=planes.device) * w).view(per, 1)
    v = (planes.to(torch.int32).unsqueeze(4) >> shifts) & ((1 << w) - 1)  # [T, S, J, 16, per, 4]
    return v.permute(0, 3, 1, 2, 4, 5).reshape(tiles * TILE_N, blocks * TILE_K)


def _pack_bucket(codes: Tensor, bits: int) -> Tensor:
    if bits == 6:
        lo, hi = _pack_plane(codes & 15, 4), _pack_plane(codes >> 4, 2)
        return torch.cat([lo, hi], dim=2).flatten()
    return _pack_plane(codes, bits).flatten()


def _unpack_bucket(data: Tensor, bits: int, rows: int, kp: int) -> Tensor:
    shape = (rows // TILE_N, kp // TILE_K, bits // 2, TILE_N, 4)
    if bits == 6:
        planes = data.view(shape)
        return _unpack_plane(planes[:, :, :2], 4) | (_unpack_plane(planes[:, :, 2:], 2) << 4)
    return _unpack_plane(data.view(shape), bits)


class PackedWeight:
    """A channel-wise quantized [out_features, in_features] weight in the kernels' layout.

    data:    uint8 [bytes], the buckets one after another
    scale:   float32 [rows], per packed row (rows = buckets padded to 16-channel tiles), or
             [G, rows] with group_size (G = ceil(in / group_size)): group-major, so the 16
             channels of a tile in one group are 16 consecutive floats
    zero:    uint8, same shape as scale: the integer zero point per packed row (and group)
    perm:    int16 (out_features <= 32767) or int32 [rows], the original channel of each packed
             row (-1: padding); see perm_dtype
    buckets: tuple of (bits, row_start, rows, byte_offset), widths ascending
    bits:    int64 [out_features], the width of every channel in original order
    group_size: None (one scale per channel) or 32, 64, 128 (inputs per scale along K)
    """

    def __init__(self, data: Tensor, scale: Tensor, zero: Tensor, perm: Tensor, buckets: Sequence[Sequence[int]],
                 bits: Tensor, in_features: int, out_features: int, group_size: Optional[int] = None) -> None:
        self.data, self.scale, self.zero, self.perm, self.bits = data, scale, zero, perm, bits
        self.group_size = reference.check_group_size(group_size)
        self.buckets = tuple(tuple(int(v) for v in b) for b in buckets)
        self._flat_buckets = [v for b in self.buckets for v in b]  # the ops' int[] argument, built once
        self.in_features, self.out_features = int(in_features), int(out_features)

    # -- views
    @property
    def shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def op_group_size(self) -> int:
        """group_size as the ops take it: 0 for one scale per channel."""
        return self.group_size or 0

    @property
    def flat_buckets(self) -> List[int]:
        return self._flat_buckets

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight: codes plus per-channel scale, zero point and permutation."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero, self.perm))

    @property
    def metadata_bytes(self) -> int:
        return self.nbytes - self.data.numel()

    def tensors(self) -> tuple:
        return self.data, self.scale, self.zero, self.perm

    def to(self, device) -> "PackedWeight":
        return PackedWeight(*(t.to(device) for t in self.tensors()), self.buckets, self.bits.to(device),
                            self.in_features, self.out_features, self.group_size)

    def quantized(self) -> reference.QuantizedWeight:
        """The codes, scales and zero points in original channel order (plain torch, from the
        layout): the reference's QuantizedWeight of this weight."""
        n = self.out_features
        keep = self.perm >= 0
        cols = self.perm[keep].long()
        groups = self.scale.shape[0] if self.group_size else 1
        scale = torch.zeros((groups, n), dtype=torch.float32, device=self.device)
        zero = torch.zeros((groups, n), dtype=torch.int32, device=self.device)
        rows = self.perm.numel()
        scale[:, cols] = self.scale.reshape(groups, rows)[:, keep]
        zero[:, cols] = self.zero.reshape(groups, rows)[:, keep].to(torch.int32)
        scale, zero = scale.T.contiguous(), zero.T.contiguous()
        if not self.group_size:
            scale, zero = scale[:, 0].contiguous(), zero[:, 0].contiguous()
        return reference.QuantizedWeight(self.codes(), scale, zero, self.bits, self.group_size)

    def codes(self) -> Tensor:
        """uint8 [out, in] codes in original channel order (plain torch, from the layout)."""
        n, k, kp = self.out_features, self.in_features, padded_k(self.in_features)
        out = torch.zeros((n, k), dtype=torch.uint8, device=self.device)
        for bits, start, rows, offset in self.buckets:
            size = rows // TILE_N * (kp // TILE_K) * bits * 32
            codes = _unpack_bucket(self.data[offset:offset + size], bits, rows, kp)[:, :k]
            p = self.perm[start:start + rows].long()
            keep = p >= 0
            out[p[keep]] = codes[keep].to(torch.uint8)
        return out

    def dequantize(self, backend: Optional[str] = None) -> Tensor:
        return dequantize(self, backend=backend)

    def __repr__(self) -> str:
        widths = {b: int((self.bits == b).sum()) for b in WIDTHS}
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"PackedWeight(out={self.out_features}, in={self.in_features}, channels per width={widths}"
                f"{group}, bytes={self.nbytes})")


def pack(qw: reference.QuantizedWeight, device=None) -> PackedWeight:
    """Packs a reference QuantizedWeight (per channel or per group) into the kernels' layout,
    on ``device`` (default: the codes' device)."""
    codes, scale, zero, bits = (t.detach().cpu() for t in qw[:4])
    group_size = reference.check_group_size(qw[4] if len(qw) > 4 else None)
    device = qw[0].device if device is None else device
    n, k = codes.shape
    groups = reference.n_groups(k, group_size)
    scale = scale.reshape(n, groups).to(torch.float32)  # [n, G] (G = 1 per channel)
    zero = zero.reshape(n, groups)
    kp = padded_k(k)
    order = torch.sort(bits, stable=True).indices
    datas, scales, zeros, perms, buckets = [], [], [], [], []
    row = offset = 0
    for b in WIDTHS:
        idx = order[bits[order] == b]
        count = idx.numel()
        if count == 0:
            continue
        rows = -(-count // TILE_N) * TILE_N
        c = torch.zeros((rows, kp), dtype=torch.uint8)
        c[:count, :k] = codes[idx]
        datas.append(_pack_bucket(c, b))
        perms.append(torch.cat([idx.to(perm_dtype(n)), torch.full((rows - count,), -1, dtype=perm_dtype(n))]))
        scales.append(torch.cat([scale[idx], torch.zeros(rows - count, groups)]))
        zeros.append(torch.cat([zero[idx].to(torch.uint8), torch.zeros(rows - count, groups, dtype=torch.uint8)]))
        buckets.append((b, row, rows, offset))
        row += rows
        offset += datas[-1].numel()

    def cat(parts, dtype):
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)).to(device)

    def per_row(parts, dtype):  # [rows] per channel, [G, rows] (group-major) per group
        t = torch.cat(parts) if parts else torch.zeros(0, groups, dtype=dtype)
        return (t[:, 0] if group_size is None else t.T).contiguous().to(device)

    return PackedWeight(cat(datas, torch.uint8), per_row(scales, torch.float32), per_row(zeros, torch.uint8),
                        cat(perms, perm_dtype(n)), buckets, bits.to(device), k, n, group_size)


# ---------------------------------------------------------------- public functions
def quantize_channelwise(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None, *,
                         method: str = "minmax", activations: Optional[Tensor] = None) -> PackedWeight:
    """Quantize an [out, in] weight per output channel to ``bits`` (an int or [out] in {2,4,6,8}),
    with one scale per channel (group_size None) or per group of 32, 64 or 128 inputs, and pack
    it for the kernels. NaN/inf weights raise ValueError. The result lives on weight's device.

    method (see :mod:`pyeditor.quantizers`): "minmax" (default) is bit-identical to
    :func:`pyeditor.reference.quantize_channelwise`; "search" minimizes ||W - Q(W)||^2 per group
    without data (never worse than min-max); "calibrated" needs ``activations`` [n_samples, in]
    (this layer's inputs) and minimizes the output error ||X W^T - X Q(W)^T|| per output channel
    (never worse than min-max on those activations). All give the same packed format."""
    from . import quantizers

    validate.float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if isinstance(bits, Tensor):
        bits = bits.detach().cpu()  # a few bytes; may live anywhere
    qw = quantizers.quantize(weight.detach().cpu(), bits, group_size, method=method, activations=activations)
    return pack(qw, weight.device)


def _check_packed(packed) -> PackedWeight:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a pyeditor.quant.PackedWeight, got {type(packed).__name__}")
    return packed


def dequantize(packed: PackedWeight, *, backend: Optional[str] = None) -> Tensor:
    """float32 [out, in] in original channel order, bit-identical to reference.dequantize of the
    same quantization: (codes - zero) * scale, one float32 multiply per element."""
    p = _check_packed(packed)
    name = backends.resolve(backend, p.device)
    if name == "reference":
        return reference.dequantize(p.quantized())
    return ops.quant_ops(name)[1](*p.tensors(), p.flat_buckets, p.in_features, p.out_features, p.op_group_size)


def packed_linear(x: Tensor, packed: PackedWeight, bias: Optional[Tensor] = None, *, fast: bool = False,
                  backend: Optional[str] = None) -> Tensor:
    """``x @ W.T + bias`` for the packed W (float32 accumulation, float64 for float64 x), in x's
    dtype, shape [..., out]. Differentiable in x and bias.

    fast=True (C++ CPU backend only; ignored elsewhere): activations are quantized to int8 per
    row (x ~= round(x / s) * s, s = max|x_row| / 127) and multiplied with exact integer dot
    products (AVX-512 VNNI). Each activation then carries an error of at most s / 2, so
    |y - y_exact| <= (max|x_row| / 254) * sum_k |W[n, k]| per output; the gradient is that of
    the exact layer. At most 65536 input features.
    """
    # The checks written out (no helper calls, no kwargs dict, x.device read once): this wrapper
    # runs on every layer of every token, and on the caches a GEMV has flushed each Python step
    # counts. Its time over the bare op, interleaved: a cold 4096x4096 call 15-43 -> 7-27 us, a
    # warm 16x64 one 3.9-4.7 -> 2.9-3.0 us.
    p = packed
    if not isinstance(p, PackedWeight):
        raise TypeError(f"packed must be a pyeditor.quant.PackedWeight, got {type(p).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in validate.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in]")
    if x.size(-1) != p.in_features:
        raise ValueError(f"x has {x.size(-1)} input features but the packed weight has {p.in_features} "
                         f"(shape {p.shape})")
    device = x.device
    if device != p.data.device:
        raise ValueError(f"x is on {device} but packed is on {p.data.device}")
    if bias is not None:
        validate.float_tensor(bias, "bias")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but packed is on {p.data.device}")
        if bias.dim() != 1 or bias.shape[0] != p.out_features:
            raise ValueError(f"bias must have shape [{p.out_features}], got {tuple(bias.shape)}")
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
    name = backends.resolve(backend, device)
    if name == "reference":
        return reference.packed_linear(x, p.quantized(), bias)
    return ops.quant_ops(name)[0](x, p.data, p.scale, p.zero, p.perm, p._flat_buckets, p.out_features, bias, fast,
                                  p.op_group_size)
