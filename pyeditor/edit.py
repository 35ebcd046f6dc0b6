"""The edit family's public function: validate, pick a backend, call the registered op."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, ops, reference, validate
from ._geometry import edit_as_matrix

Number = Union[float, int]


def apply_edit(
    theta: Tensor,
    delta: Tensor,
    threshold: Union[Number, Tensor],
    proto_index: Optional[Tensor] = None,
    *,
    out: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """K = clamp(delta, -T, T) + theta, per sample from theta[proto_index[b]] (Persona Eq. 5-7).

    Shapes and broadcasting as :func:`pyeditor.reference.apply_edit`. ``out=`` writes K into
    an existing tensor of the result's shape and dtype (e.g. the device model's own weight,
    which may be theta itself when P = 1) and returns it; it does not support autograd.
    Aliasing: ``out`` may be theta itself (the very same view) when no ``proto_index`` is given,
    or delta itself -- each element is then read before it is written. Any other overlap raises
    ValueError (RuntimeError from the registered ops called directly): a partial overlap with
    theta or delta, ``out`` being theta together with ``proto_index`` (a sample could read a
    prototype that another sample has already overwritten), and any overlap with ``threshold``
    or ``proto_index``.
    Differentiable in theta (gradient summed over the samples using each prototype) and
    delta (gradient where |delta| <= T); the threshold gets no gradient.
    threshold: a real number or a floating / integer tensor (bool and complex raise TypeError).
    A T beyond the range of the accumulation dtype (float32, float64 for float64 edits; e.g.
    T = 1e39 with float32 tensors) becomes +inf, which clips exactly as T would: nothing, since
    every finite edit lies inside [-T, T].
    """
    validate.float_tensor(theta, "theta")
    validate.float_tensor(delta, "delta")
    validate.same_dtype(theta, delta, "theta", "delta")
    validate.same_device(theta, "theta", delta=delta, proto_index=proto_index, out=out)
    if theta.dim() not in (2, 3):
        raise ValueError(f"theta must be [R, C] or [P, R, C], got shape {tuple(theta.shape)}")
    delta = edit_as_matrix(theta, delta)
    if proto_index is not None:
        if theta.dim() != 3:
            raise ValueError("proto_index needs theta as a [P, R, C] prototype stack")
        proto_index = validate.index_tensor(proto_index, "proto_index", theta.shape[0])
        if delta.dim() == 3 and delta.shape[0] != proto_index.shape[0]:
            raise ValueError(f"delta has {delta.shape[0]} samples but proto_index has {proto_index.shape[0]}")
    elif theta.dim() == 3 and delta.dim() == 3:
        p, b = theta.shape[0], delta.shape[0]
        if p != b and 1 not in (p, b):
            raise ValueError(f"theta has {p} matrices and delta {b}; pass proto_index to pick one per sample")
    t = validate.threshold(threshold, theta)
    samples = _samples(theta, delta, proto_index)
    if t.dim() == 1 and (t.shape[0] != samples or (theta.dim() == 2 and delta.dim() == 2)):
        raise ValueError(f"threshold has {t.shape[0]} values; expected one number or one per sample ({samples})")

    name = backends.resolve(backend, theta.device)
    if out is not None:
        validate.out_tensor(out, _out_shape(theta, delta, samples), theta, theta, delta)
        if not validate.compiling():  # data pointers: eager only (the ops re-check real tensors)
            validate.edit_out_aliasing(out, theta, delta, threshold if isinstance(threshold, Tensor) else t,
                                       proto_index)
        if torch.is_grad_enabled() and (theta.requires_grad or delta.requires_grad):
            raise RuntimeError("apply_edit(out=...) does not support autograd; call it without out=")
        if name == "reference":
            return out.copy_(reference.apply_edit(theta, delta, t, proto_index))
        ops.edit_ops(name)[1](theta, delta, t, proto_index, out)
        return out
    if name == "reference":
        return reference.apply_edit(theta, delta, t, proto_index)
    return ops.call_differentiable(ops.edit_ops(name)[0], theta, delta, t, proto_index)


def _samples(theta: Tensor, delta: Tensor, proto_index: Optional[Tensor]) -> int:
    if proto_index is not None:
        return proto_index.shape[0]
    p = theta.shape[0] if theta.dim() == 3 else 1
    b = delta.shape[0] if delta.dim() == 3 else 1
    return max(p, b) if (theta.dim() == 3 and delta.dim() == 3) else (p if theta.dim() == 3 else b)


def _out_shape(theta: Tensor, delta: Tensor, samples: int) -> tuple:
    rows, cols = theta.shape[-2:]
    return (samples, rows, cols) if max(theta.dim(), delta.dim()) == 3 else (rows, cols)
