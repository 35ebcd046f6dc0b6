"""CHORD's channel-wise 2/4/6/8-bit weights: packing, the packed matmul and the strategy codes.

quantize_channelwise(W, bits) -> PackedWeight: the reference quantizer (asymmetric min-max per
output channel, integer zero point), then channels grouped by width (a stable permutation),
each bucket padded to 16-channel tiles and bit-packed along K in the kernels' layout
(pyeditor.quant_format, the one description of it; 6 bits = a 4-bit and a 2-bit plane). dequantize() returns the
float32 weight in the original channel order, bit-identical to reference.dequantize.
packed_linear(x, packed, bias) = x @ dequantize(packed).T + bias, differentiable in x and bias.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends, ops, reference, validate
from .quant_format import BIT_WIDTHS as WIDTHS
from .quant_format import (FIELD_INPUTS, PERM_INT16_CHANNELS, SIX_BIT_PLANES, TILE_K, TILE_N,  # noqa: F401
                           QuantizedWeight, block_bytes, n_groups, padded_k, perm_dtype)


# ---------------------------------------------------------------- the layout, in torch ops
def _pack_plane(codes: Tensor, w: int) -> Tensor:
    """[rows, Kp] codes < 2**w -> bytes [tiles, blocks, w/2, TILE_N, FIELD_INPUTS] (quant_format:
    byte c*4+t of chunk j holds input 4g+t of channel c at shift f*w, g = j*(8/w) + f)."""
    rows, kp = codes.shape
    per = 8 // w
    v = codes.to(torch.int32).view(rows // TILE_N, TILE_N, kp // TILE_K, w // 2, per, FIELD_INPUTS)
    shifts = (torch.arange(per, dtype=torch.int32, device=codes.device) * w).view(per, 1)
    return (v << shifts).sum(4).permute(0, 2, 3, 1, 4).to(torch.uint8)


def _unpack_plane(planes: Tensor, w: int) -> Tensor:
    """Inverse of _pack_plane: [tiles, blocks, w/2, TILE_N, FIELD_INPUTS] bytes -> [rows, Kp] codes."""
    tiles, blocks = planes.shape[:2]
    per = 8 // w
    shifts = (torch.arange(per, dtype=torch.int32, device=planes.device) * w).view(per, 1)
    v = (planes.to(torch.int32).unsqueeze(4) >> shifts) & ((1 << w) - 1)  # [T, S, J, 16, per, 4]
    return v.permute(0, 3, 1, 2, 4, 5).reshape(tiles * TILE_N, blocks * TILE_K)


def _pack_bucket(codes: Tensor, bits: int) -> Tensor:
    if bits == 6:  # the low plane's chunks, then the high plane's
        low, high = SIX_BIT_PLANES
        lo, hi = _pack_plane(codes & ((1 << low) - 1), low), _pack_plane(codes >> low, high)
        return torch.cat([lo, hi], dim=2).flatten()
    return _pack_plane(codes, bits).flatten()


def _unpack_bucket(data: Tensor, bits: int, rows: int, kp: int) -> Tensor:
    shape = (rows // TILE_N, kp // TILE_K, bits // 2, TILE_N, FIELD_INPUTS)
    if bits == 6:
        planes, (low, high) = data.view(shape), SIX_BIT_PLANES
        return _unpack_plane(planes[:, :, :low // 2], low) | (_unpack_plane(planes[:, :, low // 2:], high) << low)
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
        self.group_size = validate.group_size(group_size)
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

    def quantized(self) -> QuantizedWeight:
        """The codes, scales and zero points in original channel order (plain torch, from the
        layout): the QuantizedWeight of this weight."""
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
        return QuantizedWeight(self.codes(), scale, zero, self.bits, self.group_size)

    def codes(self) -> Tensor:
        """uint8 [out, in] codes in original channel order (plain torch, from the layout)."""
        n, k, kp = self.out_features, self.in_features, padded_k(self.in_features)
        out = torch.zeros((n, k), dtype=torch.uint8, device=self.device)
        for bits, start, rows, offset in self.buckets:
            size = rows // TILE_N * (kp // TILE_K) * block_bytes(bits)
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


def pack(qw: QuantizedWeight, device=None) -> PackedWeight:
    """Packs a QuantizedWeight (per channel or per group) into the kernels' layout,
    on ``device`` (default: the codes' device)."""
    codes, scale, zero, bits = (t.detach().cpu() for t in qw[:4])
    group_size = validate.group_size(qw[4] if len(qw) > 4 else None)
    device = qw[0].device if device is None else device
    n, k = codes.shape
    groups = n_groups(k, group_size)
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
                  mode: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """``x @ W.T + bias`` for the packed W (float32 accumulation, float64 for float64 x), in x's
    dtype, shape [..., out]. Differentiable in x and bias (the gradient is the exact layer's in
    every mode). ``mode`` is one of :data:`MODES` (default "exact"; the numerics of each are
    stated on :class:`pyeditor.nn.PackedLinear`); ``fast=True`` is mode="int8act".

    mode="int8act" (C++ CPU backend only; exact elsewhere): activations are quantized to int8 per
    row (x ~= round(x / s) * s, s = max|x_row| / 127) and multiplied with exact integer dot
    products (AVX-512 VNNI). Each activation then carries an error of at most s / 2, so
    |y - y_exact| <= (max|x_row| / 254) * sum_k |W[n, k]| per output. At most 65536 input features.

    mode="bf16" (every backend): x is rounded to bfloat16 (to nearest even), then multiplied as
    in exact mode; the output keeps x's dtype. |y - y_exact| <= sum_k (2^-8 |x_k| + 2^-134)
    |W[n, k]| (:func:`bf16_error_bound`) plus exact mode's float32 rounding.
    """
    p = _check_packed(packed)
    device = validate.packed_linear_inputs(x, p, bias, fast)
    fast, bf16 = _mode_flags(mode, fast)
    name = backends.resolve(backend, device)
    if name == "reference":
        if bf16:
            return reference.packed_linear(_RoundBF16.apply(x), p.quantized(), bias).to(x.dtype)
        return reference.packed_linear(x, p.quantized(), bias)
    return ops.quant_ops(name)[0](x, p.data, p.scale, p.zero, p.perm, p._flat_buckets, p.in_features, p.out_features,
                                  bias, fast, p.op_group_size, bf16)


class _RoundBF16(torch.autograd.Function):
    """x rounded to bfloat16 in its own dtype (float16 in float32: bfloat16 reaches past its
    range), with the kernels' straight-through gradient (a cast's backward would round the
    gradient to bfloat16 too)."""

    @staticmethod
    def forward(x):
        return x.to(torch.bfloat16).to(torch.float32 if x.dtype == torch.float16 else x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype)


# ---------------------------------------------------------------- compute modes (PackedLinear's mode=)
MODES = ("exact", "int8act", "bf16")


def check_mode(mode) -> str:
    """``mode`` checked against :data:`MODES` (TypeError / ValueError naming it)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {MODES}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def mode_flags(mode: str) -> tuple[bool, bool]:
    """The quant_linear op's (fast, bf16) flags of a checked mode."""
    return mode == "int8act", mode == "bf16"


def _mode_flags(mode, fast: bool) -> tuple[bool, bool]:
    if mode is None:
        return fast, False
    mode = check_mode(mode)
    if fast and mode != "int8act":
        raise ValueError(f"fast=True (mode 'int8act') conflicts with mode={mode!r}: pass mode only")
    return mode_flags(mode)


def bf16_error_bound(x: Tensor, weight: Union[Tensor, PackedWeight]) -> Tensor:
    """The bf16 mode's bound on its activation rounding, per output: float64 [..., out]
    ``sum_k (2^-8 |x[..., k]| + 2^-134) |W[n, k]|``. Rounding to bfloat16 (8 significant bits, to
    nearest even) moves each input by at most 2^-8 of its magnitude, or by 2^-134 (half the
    spacing of bfloat16 subnormals) below 2^-126; the products with the exact weight and their
    float32 sums are exact mode's (its rounding comes on top). It holds for inputs below
    bfloat16's overflow threshold, (2 - 2^-8) * 2^127 (about 3.396e38), from which they round
    to +-inf. float64 x is rounded by way of float32, as torch casts it (twice: within the same
    bound, plus 2^-24 of the input)."""
    w = _bound_weight(weight).detach().double().abs().to(x.device)
    _bound_x(x, w)
    return (x.detach().double().abs() * 2.0 ** -8 + 2.0 ** -134) @ w.T


def _bound_weight(weight) -> Tensor:
    w = dequantize(weight) if isinstance(weight, PackedWeight) else weight
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"weight must be a PackedWeight or a float [out, in] tensor, got "
                        f"{type(w).__name__ if not isinstance(w, Tensor) else f'{w.dtype} {tuple(w.shape)}'}")
    return w


def _bound_x(x, w: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must be a float tensor [..., {w.shape[1]}], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")


def int8act_error_bound(x: Tensor, weight: Union[Tensor, PackedWeight]) -> Tensor:
    """The int8act mode's bound on its activation rounding, per output: float64 [..., out]
    ``(max_k |x[..., k]| / 254) * sum_k |W[n, k]|``, with W the dequantized weight (a
    PackedWeight or the float [out, in] tensor). Each row of x is rounded to ``s * q``, q int8,
    s = max|row| / 127, so every input moves by at most s / 2 = max|row| / 254 and output n by at
    most that times sum_k |W[n, k]|. The float32 rounding of exact mode comes on top of it."""
    w = _bound_weight(weight)
    _bound_x(x, w)
    amax = x.detach().double().abs().amax(-1, keepdim=True)
    return amax / 254.0 * w.detach().double().abs().sum(1).to(amax.device)
