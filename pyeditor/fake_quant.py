"""Differentiable fake quantization at given per-channel bit widths (CHORD Eq. 3) for training:
the forward is the dequantized min-max weight that pyeditor's packed layers serve, the backward a
straight-through estimator to the weight and a surrogate gradient to the bits.
The plain-PyTorch oracle is :func:`pyeditor.reference.fake_quantize`."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .validate import group_size as _check_group_size

_F32_MAX = torch.finfo(torch.float32).max
_TINY = torch.finfo(torch.float32).tiny


def _check_bits(bits: object, n_out: int) -> Tensor:
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = torch.full((n_out,), bits, dtype=torch.int64)
    if not isinstance(bits, Tensor) or bits.dtype == torch.bool or bits.is_complex():
        got = bits.dtype if isinstance(bits, Tensor) else type(bits).__name__
        raise TypeError(f"bits must be an int or an integer (or integral float) tensor, got {got}")
    if bits.dim() < 1 or bits.shape[-1] != n_out:
        raise ValueError(f"bits must have shape [{n_out}] or [..., {n_out}] (one width per output channel), "
                         f"got {tuple(bits.shape)}")
    b = bits.detach()
    bad = (b < 1) | (b > 8)
    if b.is_floating_point():
        bad = bad | (b != b.round()) | torch.isnan(b)
    if bool(bad.any()):
        raise ValueError(f"bits must be whole numbers in [1, 8], got {b[bad][0].item()}")
    return b.to(torch.int64)


def _ranges(weight: Tensor, group_size: Optional[int]):
    """float32 values as float64 [out, in], per-group min and max [out, G] and each column's group."""
    n_out, n_in = weight.shape
    w = weight.detach().to(torch.float32).to(torch.float64)  # float32 values, float64 arithmetic
    gs = n_in if group_size is None else group_size
    groups = -(-n_in // gs)
    # the ragged last group is padded with NaN, which the masks skip
    padded = torch.nn.functional.pad(w, (0, groups * gs - n_in), value=math.nan).view(n_out, groups, gs)
    wmin = torch.where(torch.isnan(padded), math.inf, padded).amin(2)
    wmax = torch.where(torch.isnan(padded), -math.inf, padded).amax(2)
    return w, wmin, wmax, torch.arange(n_in, device=w.device) // gs


def _at_width(w: Tensor, wmin: Tensor, wmax: Tensor, gid: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Every channel at ``bits``: float32 dequantized [out, in] and the in-range mask."""
    q_max = 2.0 ** bits - 1.0
    lo, hi = wmin.clamp_max(0.0), wmax.clamp_min(0.0)
    scale = ((hi - lo) / q_max).to(torch.float32).clamp_min(_TINY)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight's range per channel (or group) must fit float32 (max - min overflows)")
    s = scale.to(torch.float64)
    zero = torch.round(-lo / s).clamp(min=0.0, max=q_max)
    reach = torch.floor(_F32_MAX / s)  # no code may dequantize past the float32 maximum
    c_lo, c_hi = (zero - reach).clamp(min=0.0)[:, gid], (zero + reach).clamp(max=q_max)[:, gid]
    s, zero = s[:, gid], zero[:, gid]
    u = torch.round(w / s) + zero
    inside = (u >= c_lo) & (u <= c_hi)
    deq = ((u.maximum(c_lo).minimum(c_hi) - zero) * s).to(torch.float32)
    const = (wmax == wmin)[:, gid]  # constant channels / groups are exact
    return torch.where(const, w.to(torch.float32), deq), inside | const


def _values(weight: Tensor, bits: Tensor, group_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """float32 dequantized weight [..., out, in] and the in-range mask, for int64 bits [..., out]:
    each width present is computed once for all channels, then every channel picks its row."""
    n_out, n_in = weight.shape
    if n_in == 0:
        empty = torch.zeros(*bits.shape, 0, dtype=torch.float32, device=weight.device)
        return empty, empty.bool()
    w, wmin, wmax, gid = _ranges(weight, group_size)
    present = torch.unique(bits)
    tables = [_at_width(w, wmin, wmax, gid, int(b)) for b in present.tolist()]
    which = torch.searchsorted(present, bits.contiguous())
    rows = torch.arange(n_out, device=weight.device)
    deq = torch.stack([t[0] for t in tables])[which, rows]
    inside = torch.stack([t[1] for t in tables])[which, rows]
    return deq, inside


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bits: Tensor, levels: Tensor,  # type: ignore[override]
                group_size: Optional[int]) -> Tensor:
        deq, inside = _values(weight, levels, group_size)
        out = deq.to(weight.dtype)
        ctx.save_for_backward(weight, out, inside)
        ctx.bits_dtype = bits.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, out, inside = ctx.saved_tensors
        g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g = grad * inside
            g_w = g.reshape(-1, *weight.shape).sum(0) if g.dim() > 2 else g
        if ctx.needs_input_grad[1]:
            err = (out - weight.detach()).to(grad.dtype)
            g_b = (-math.log(2.0) * grad * err).sum(-1).to(ctx.bits_dtype)
        return g_w, g_b, None, None


def fake_quantize(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None) -> Tensor:
    """The weight as the device will see it after min-max quantization at ``bits`` per output
    channel, differentiable for quantization-aware training (CHORD Eq. 3).

    weight: [out, in] finite floating. bits: an int, [out] or [..., out] whole numbers in
    [1, 8] (integer, or float such as allocate_bits(..., straight_through=True) returns); a
    batch of strategies gives [..., out, in]. group_size: None (one scale per channel) or 32, 64,
    128 (one scale per that many consecutive inputs, the last group ragged).

    Forward, in weight's dtype: pyeditor.reference.quantize_channelwise's asymmetric min-max
    format dequantized (range holding 0, float32 scale, integer zero point, round half to even,
    constant channels exact), for any width 1..8; for 2/4/6/8 bit-identical to
    quantize_channelwise(weight, bits, group_size).dequantize().
    Backward (straight-through): d out / d weight = identity for every element whose code lies
    inside the representable range [max(0, zero - reach), min(2**b - 1, zero + reach)] and 0 for
    one clipped at its ends (min-max puts every element inside except where the rounded zero point
    pushes an end element one code out); scale and zero point are treated as constants. To the
    bits, the gradient of the model "a b-bit quantizer's error halves per extra bit",
    out(b') = weight + (out - weight) * 2**(b - b'), at b' = b:
    d out[o, i] / d bits[o] = -ln 2 * (out[o, i] - weight[o, i]).
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (no NaN or inf)")
    group_size = _check_group_size(group_size)
    if isinstance(bits, Tensor) and bits.device != weight.device:
        raise ValueError(f"bits is on {bits.device} but weight is on {weight.device}")
    levels = _check_bits(bits, weight.shape[0]).to(weight.device)  # an int bits is made on the CPU
    if isinstance(bits, Tensor) and bits.is_floating_point():
        return _FakeQuant.apply(weight, bits, levels, group_size)
    return _FakeQuant.apply(weight, levels.to(weight.dtype), levels, group_size)
