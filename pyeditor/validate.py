"""Argument checks shared by the public API: clear Python errors that name the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str) -> Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def same_dtype(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} dtype {b.dtype} does not match {name_a} dtype {a.dtype}")


def same_device(ref: Tensor, name_ref: str, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {name_ref} is on {ref.device}")


def index_tensor(index, name: str, bound: int) -> Tensor:
    """An integer [B] index whose values lie in [0, bound); returned as int64."""
    tensor(index, name)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    index = index.long()
    if index.numel() and not compiling():
        if index.device.type == "cpu":
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= bound:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{name} value {bad} is out of range for {bound} entries")
        else:
            torch._assert_async(((index >= 0) & (index < bound)).all(), f"{name} out of range")
    return index


_scalar_thresholds: dict = {}


def threshold(t, like: Tensor, name: str = "threshold") -> Tensor:
    """T as a tensor of the kernels' accumulation dtype on like's device; T >= 0, never NaN."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
    if not isinstance(t, Tensor):
        if math.isnan(t) or t < 0:
            raise ValueError(f"{name} must be >= 0 and not NaN, got {t}")
        if compiling() or like.device.type != "cpu":
            return torch.full((), float(t), dtype=acc, device=like.device)
        # serving calls repeat the same T: keep its (read-only) 0-d CPU tensor
        key = (float(t), acc)
        cached = _scalar_thresholds.get(key)
        if cached is None:
            if len(_scalar_thresholds) > 256:
                _scalar_thresholds.clear()
            cached = _scalar_thresholds[key] = torch.full((), float(t), dtype=acc)
        return cached
    if not t.dtype.is_floating_point:
        t = t.to(acc)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a number, a 0-d tensor or a 1-D per-sample tensor, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the edit is on {like.device}")
    if t.numel() and not compiling():
        bad = torch.isnan(t) | (t < 0)
        if t.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(f"{name} must be >= 0 and not NaN, got {t.detach().flatten()[bad.flatten()][:4].tolist()}")
        else:
            torch._assert_async(~bad.any(), f"{name} must be >= 0 and not NaN")
    return t.detach().to(acc)


def _extent(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
    return start, start + (span + 1) * t.element_size()


def out_tensor(out, shape: tuple, like: Tensor, *inputs: Tensor) -> Tensor:
    """A caller's out= buffer: right shape, dtype and device, each element written once, and
    either identical to an input (in-place) or not overlapping it at all."""
    tensor(out, "out")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"out dtype {out.dtype} does not match {like.dtype}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {like.device}")
    if out.numel() == 0 or compiling():  # the C++ kernels re-check overlap on real tensors
        return out
    if any(st == 0 and n > 1 for n, st in zip(out.shape, out.stride())):
        raise ValueError("out has a broadcast (stride-0) dimension: it would be written more than once")
    lo, hi = _extent(out)
    for x in inputs:
        if x.numel() == 0 or x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        same = x.data_ptr() == out.data_ptr() and x.shape == out.shape and x.stride() == out.stride()
        xlo, xhi = _extent(x)
        if not same and xlo < hi and lo < xhi:
            raise ValueError("out partially overlaps an input; pass a separate buffer or the input itself")
    return out
