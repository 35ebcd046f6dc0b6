"""Shapes and per-sample strides of the edit ops, for the fake kernels and the Triton launchers.

The C++ side computes the same in csrc/edit_args.cpp; tests hold the two to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class EditGeometry:
    samples: int
    rows: int
    cols: int
    out_shape: tuple
    theta_sample_stride: int  # 0: one theta matrix serves every sample
    delta_sample_stride: int  # 0: one delta serves every sample
    thr_stride: int           # 0: one threshold for every sample


def edit_geometry(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor]) -> EditGeometry:
    rows, cols = theta.shape[-2], theta.shape[-1]
    theta3, delta3 = theta.dim() == 3, delta.dim() == 3
    P = theta.shape[0] if theta3 else 1
    B = delta.shape[0] if delta3 else 1
    if proto_index is not None:
        samples = proto_index.shape[0]
        theta_stride = theta.stride(0)
    else:
        samples = (max(P, B) if delta3 else P) if theta3 else B
        theta_stride = theta.stride(0) if theta3 and P != 1 else 0
    delta_stride = delta.stride(0) if delta3 and B != 1 else 0
    batched = theta3 or delta3
    out_shape = (samples, rows, cols) if batched else (rows, cols)
    thr_stride = 0 if threshold.numel() == 1 else 1
    return EditGeometry(samples, rows, cols, out_shape, theta_stride, delta_stride, thr_stride)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def edit_as_matrix(theta: Tensor, delta: Tensor) -> Tensor:
    """delta read with theta's matrix shape [R, C] (Persona Eq. 6): one edit ([R, C] or flat
    [R*C]) or a batch ([B, R, C] or [B, R*C]) -> [R, C] or [B, R, C]; ValueError otherwise."""
    rows, cols = theta.shape[-2], theta.shape[-1]
    flat = rows * cols
    if delta.dim() in (2, 3) and tuple(delta.shape[-2:]) == (rows, cols):
        return delta
    if delta.dim() == 1 and delta.shape[0] == flat:
        return delta.reshape(rows, cols)
    if delta.dim() == 2 and delta.shape[1] == flat:
        return delta.reshape(delta.shape[0], rows, cols)
    raise ValueError(f"delta of shape {tuple(delta.shape)} cannot be read as edits of theta's matrix shape "
                     f"({rows}, {cols}): expected [{rows}, {cols}], [{flat}], [B, {rows}, {cols}] or [B, {flat}]")
