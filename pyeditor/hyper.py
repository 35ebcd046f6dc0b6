"""Persona serving ops: edited linear layers, the editors' batched matmuls, prototype assignment.

Same names and arguments as their definitions in :mod:`pyeditor.reference`, plus ``backend=``
(see :mod:`pyeditor.backends`). ``assign_prototypes`` / ``edit_norms`` also take ``method=`` and
``gram=`` (the cached Gram form, see :func:`prototype_gram`).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends, ops, reference, validate

Number = Union[float, int]


def _dtype_device(ref: Tensor, ref_name: str, **others: Optional[Tensor]) -> None:
    validate.float_tensor(ref, ref_name)
    for name, t in others.items():
        if t is not None:
            validate.float_tensor(t, name)
            validate.same_dtype(ref, t, ref_name, name)
    validate.same_device(ref, ref_name, **others)


def edited_linear(
    x: Tensor,
    theta: Tensor,
    delta: Tensor,
    threshold: Union[Number, Tensor],
    bias: Optional[Tensor] = None,
    proto_index: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``y[b] = x[b] @ (theta[p_b] + clamp(delta[b], -T, T)) + bias[p_b]`` without forming K.

    Shapes as :func:`pyeditor.reference.edited_linear`: x [B, S, in], theta [in, out] or
    [P, in, out], delta [B, in, out] or [B, in*out], T a number, 0-d or [B], bias None / [out] /
    [P, out], proto_index None or [B] integers. Every tensor has x's dtype. Differentiable in x,
    theta, delta (where |delta| <= T) and bias. Extra memory: a few tiles per thread.
    """
    _dtype_device(x, "x", theta=theta, delta=delta, bias=bias)
    validate.same_device(x, "x", proto_index=proto_index)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, S, in], got shape {tuple(x.shape)}")
    if theta.dim() not in (2, 3):
        raise ValueError(f"theta must be [in, out] or [P, in, out], got shape {tuple(theta.shape)}")
    B, _, n_in = x.shape
    rows, n_out = theta.shape[-2:]
    if n_in != rows:
        raise ValueError(f"x has {n_in} input features but theta has {rows} rows")
    if delta.dim() == 2 and tuple(delta.shape) == (B, rows * n_out):
        delta = delta.reshape(B, rows, n_out)
    if delta.dim() != 3 or tuple(delta.shape[1:]) != (rows, n_out):
        raise ValueError(f"delta must hold one edit per sample: [{B}, {rows}, {n_out}] or "
                         f"[{B}, {rows * n_out}], got {tuple(delta.shape)}")
    if delta.shape[0] != B:
        raise ValueError(f"delta has {delta.shape[0]} edits but x has batch {B}")
    slots = theta.shape[0] if theta.dim() == 3 else 1
    if proto_index is not None:
        if theta.dim() != 3:
            raise ValueError("proto_index needs theta as a [P, in, out] prototype stack")
        proto_index = validate.index_tensor(proto_index, "proto_index", slots)
        if proto_index.shape[0] != B:
            raise ValueError(f"proto_index has {proto_index.shape[0]} entries but x has batch {B}")
    elif theta.dim() == 3 and slots != B:
        raise ValueError(f"theta of shape {tuple(theta.shape)} needs proto_index (or P == batch {B})")
    if bias is not None:
        ok = bias.shape[-1] == n_out and (bias.dim() == 1 or (bias.dim() == 2 and theta.dim() == 3
                                                             and bias.shape[0] == slots))
        if not ok:
            raise ValueError(f"bias must be [{n_out}] or [{slots}, {n_out}] (one row per prototype), "
                             f"got shape {tuple(bias.shape)}")
    t = validate.threshold(threshold, x)
    if t.dim() == 1 and t.shape[0] != B:
        raise ValueError(f"threshold has {t.shape[0]} values; expected one number or one per sample ({B})")
    name = backends.resolve(backend, x.device)
    if name == "reference":
        return reference.edited_linear(x, theta, delta, t, bias, proto_index)
    return ops.hyper_ops(name)[0](x, theta, delta, t, bias, proto_index)


def _check_hyper(e, weight, bias, index) -> Optional[Tensor]:
    _dtype_device(e, "e", weight=weight, bias=bias)
    validate.same_device(e, "e", index=index)
    if e.dim() != 2:
        raise ValueError(f"e must be [B, d], got shape {tuple(e.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must be [P, d, n], got shape {tuple(weight.shape)}")
    P, d, n = weight.shape
    if e.shape[1] != d:
        raise ValueError(f"e has {e.shape[1]} features but weight expects {d} (weight shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (P, n):
        raise ValueError(f"bias must have shape [{P}, {n}], got {tuple(bias.shape)}")
    if index is not None:
        index = validate.index_tensor(index, "index", P)
        if index.shape[0] != e.shape[0]:
            raise ValueError(f"index has {index.shape[0]} entries but e has batch {e.shape[0]}")
    return index


def hyper_matmul(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None, index: Optional[Tensor] = None,
                 *, backend: Optional[str] = None) -> Tensor:
    """P linear generators on embeddings: [P, B, n] without index, [B, n] with one generator
    per sample (segmented by index; no per-sample weight copy). Differentiable in e, weight, bias."""
    index = _check_hyper(e, weight, bias, index)
    name = backends.resolve(backend, e.device)
    if name == "reference":
        return reference.hyper_matmul(e, weight, bias, index)
    return ops.hyper_ops(name)[1](e, weight, bias, index)


def hyper_matmul_heads(e: Tensor, weight: Union[Tensor, Sequence[Tensor]], sizes: Optional[Sequence[int]] = None,
                       bias: Union[Tensor, Sequence[Tensor], None] = None, index: Optional[Tensor] = None,
                       *, backend: Optional[str] = None) -> List[Tensor]:
    """Every per-layer head of one editor in one kernel launch (a grouped matmul).

    e [L, B, d]: head l reads e[l] (``e.expand(L, B, d)`` shares one embedding without a copy).
    weight: the heads concatenated along n, [P, d, sum(sizes)], with ``sizes`` their widths; or
    a list of L heads [P, d, n_l] (concatenated here: a copy per call, so store the concatenated
    form, as :class:`pyeditor.nn.ParameterEditor` does). bias: None, [P, sum(sizes)] or a list of
    [P, n_l]. index as :func:`hyper_matmul`. Returns L views, [B, n_l] with index, [P, B, n_l]
    without. Differentiable in e, weight, bias.
    """
    if isinstance(weight, (list, tuple)):
        if sizes is not None:
            raise ValueError("pass sizes only with a concatenated weight tensor, not with a list of heads")
        if not weight:
            raise ValueError("weight must hold at least one head")
        for l, w in enumerate(weight):
            validate.float_tensor(w, f"weight[{l}]")
        sizes = [int(w.shape[-1]) for w in weight]
        weight = torch.cat(list(weight), dim=-1)
    elif sizes is None:
        raise ValueError("sizes is required with a concatenated weight: the width of each head")
    if isinstance(bias, (list, tuple)):
        bias = torch.cat(list(bias), dim=-1)
    sizes = list(sizes)
    validate.float_tensor(e, "e")
    if e.dim() != 3 or e.shape[0] < 1:
        raise ValueError(f"e must be [L >= 1, B, d] (one embedding per head), got shape {tuple(e.shape)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise TypeError(f"sizes must be ints >= 0 (one width per head), got {sizes!r}")
    if len(sizes) != e.shape[0]:
        raise ValueError(f"sizes has {len(sizes)} entries but e holds {e.shape[0]} heads")
    index = _check_hyper(e[0], weight, bias, index)
    if sum(sizes) != weight.shape[2]:
        raise ValueError(f"sizes sum to {sum(sizes)} but weight has {weight.shape[2]} columns")
    name = backends.resolve(backend, e.device)
    if name == "reference":
        return reference.hyper_matmul_heads(e, weight, sizes, bias, index)
    out = ops.heads_ops(name)[0](e, weight, sizes, bias, index)
    return list(out.split(sizes, dim=-1))


def generate_edit(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None, index: Optional[Tensor] = None,
                  threshold: Optional[Union[Number, Tensor]] = None, *, backend: Optional[str] = None) -> Tensor:
    """hyper_matmul then clamp(G, -T, T) if a threshold is given (Persona Eq. 6). With
    ``index=assign_prototypes(...).chosen`` only the chosen prototype's edit is generated."""
    out = hyper_matmul(e, weight, bias, index, backend=backend)
    if threshold is None:
        return out
    t = validate.threshold(threshold, e)
    if t.dim() == 1:
        if t.shape[0] != e.shape[0]:
            raise ValueError(f"threshold has {t.shape[0]} values; expected one or {e.shape[0]}")
        t = t.view(-1, 1)
    t = t.to(out.dtype)  # the clip runs on the rounded edit (exact for fp32 / fp64)
    return torch.clamp(out, min=-t, max=t)


# ------------------------------------------------------------------------ assignment


class PrototypeGram(NamedTuple):
    """Per-editor Gram of the augmented generator [W_p; b_p]: ``gram`` [P, d+1, d+1] (float64
    values of an fp32 / fp64 product), from which ||e W_p + b_p||^2 = [e,1] G_p [e,1]^T."""
    gram: Tensor
    abs_gram: Tensor  # |G_p|, bounds the terms of the quadratic form (cancellation check)
    source: tuple = ()  # validate.editor_fingerprint of the editors it was computed from


def prototype_gram(weight: Tensor, bias: Optional[Tensor] = None) -> PrototypeGram:
    """The Gram form of every editor, to keep while editor weights are frozen (serving)."""
    _check_hyper(weight.new_zeros(0, weight.shape[1]) if weight.dim() == 3 else weight, weight, bias, None)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)
    P, d, n = w.shape
    g = w.new_zeros((P, d + 1, d + 1), dtype=torch.float64)
    g[:, :d, :d] = torch.bmm(w, w.transpose(1, 2)).double()
    if bias is not None:
        b = bias.detach().to(acc)
        c = torch.bmm(w, b.unsqueeze(2)).squeeze(2).double()  # W_p b_p
        g[:, :d, d] = c
        g[:, d, :d] = c
        g[:, d, d] = b.double().square().sum(1)
    return PrototypeGram(g, g.abs(), validate.editor_fingerprint(weight, bias))


_CANCEL = {torch.float32: 2.0 ** -10, torch.float64: 2.0 ** -40}


def _gram_sumsq(e: Tensor, weight: Tensor, bias: Optional[Tensor], gram: PrototypeGram) -> Tensor:
    """sum of squares [B, P] float64 from the Gram form; pairs where the quadratic form may have
    cancelled (result small next to the sum of its terms' magnitudes) or met inf / NaN are
    recomputed directly in float64, so the answer keeps the reference's accuracy."""
    ea = torch.cat([e.detach().double(), e.new_ones((e.shape[0], 1), dtype=torch.float64)], 1)
    sq = (torch.matmul(ea, gram.gram) * ea).sum(-1).t()  # [P, B, d+1] -> [B, P]
    ab = ea.abs()
    bound = (torch.matmul(ab, gram.abs_gram) * ab).sum(-1).t()
    eps = _CANCEL[torch.float64 if weight.dtype == torch.float64 else torch.float32]
    redo = ~torch.isfinite(bound) | (sq < eps * bound)
    if bool(redo.any()):
        for p in redo.any(0).nonzero().flatten().tolist():
            rows = redo[:, p].nonzero().flatten()
            g = e.detach()[rows].double() @ weight.detach()[p].double()
            if bias is not None:
                g = g + bias.detach()[p].double()
            sq[rows, p] = g.square().sum(1)
    return sq.clamp_min(0)


def edit_norms(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               threshold: Optional[Union[Number, Tensor]] = None, *, backend: Optional[str] = None,
               method: str = "auto", gram: Optional[PrototypeGram] = None) -> Tensor:
    """[B, P] float64: ||clip(e_b W_p + b_p)||, never forming the [P, B, n] edits.

    method: "fused" -- the matmul with a sum-of-squares epilogue (edit_sumsq op; any threshold);
            "gram"  -- the quadratic form of each editor's Gram matrix (threshold must be None;
                       pass ``gram=prototype_gram(weight, bias)`` to reuse it across calls);
            "auto"  -- "gram" when there is no threshold and a gram is given or 2 (d + 1) < B (the
                       Gram product costs P d^2 n at about half the fused kernel's speed here),
                       else "fused".
    The fused kernels form each edit in float32 (float64 for float64 inputs); a (sample, prototype)
    pair whose sum of squares comes out inf or NaN is recomputed in float64 as the reference does
    (eager calls; an edit past the float32 maximum is finite there).
    Not differentiable (assignment is an argmin).
    """
    _check_hyper(e, weight, bias, None)
    if weight.shape[0] == 0:
        raise ValueError("weight must hold at least one prototype editor (P >= 1)")
    if method not in ("auto", "fused", "gram"):
        raise ValueError(f"method must be 'auto', 'fused' or 'gram', got {method!r}")
    if gram is not None:
        validate.gram_of(gram, e, weight, bias)
    t = None if threshold is None else validate.threshold(threshold, e)
    if t is not None and t.dim() == 1 and t.shape[0] != e.shape[0]:
        raise ValueError(f"threshold has {t.shape[0]} values; expected one or {e.shape[0]}")
    name = backends.resolve(backend, e.device)
    if method == "auto":
        cheap = gram is not None or 2 * (weight.shape[1] + 1) < e.shape[0]
        method = "gram" if t is None and cheap and not validate.compiling() else "fused"
    if method == "gram":
        if t is not None:
            raise ValueError("method='gram' needs threshold=None: the clip is not a quadratic form")
        if gram is None:
            gram = prototype_gram(weight, bias)
        return _gram_sumsq(e, weight, bias, gram).sqrt()
    if name == "reference":
        return reference.edit_norms(e, weight, bias, t)
    with torch.no_grad():
        sq = ops.hyper_ops(name)[2](e, weight, bias, t)
        if not validate.compiling():
            sq = _redo_nonfinite(sq, e, weight, bias, t)
        return sq.sqrt()


def _redo_nonfinite(sq: Tensor, e: Tensor, weight: Tensor, bias: Optional[Tensor], t: Optional[Tensor]) -> Tensor:
    """The fused kernels form each edit in float32 (fp64 for fp64 inputs), which overflows to inf
    (or NaN, inf - inf) where the reference's float64 edit is finite; those (sample, prototype)
    pairs are recomputed as the reference does. Inputs holding NaN / inf give the reference's
    NaN / inf again."""
    redo = ~torch.isfinite(sq)
    if not bool(redo.any()):
        return sq
    sq = sq.clone()
    for p in redo.any(0).nonzero().flatten().tolist():
        rows = redo[:, p].nonzero().flatten()
        g = e.detach()[rows].double() @ weight.detach()[p].double()
        if bias is not None:
            g = g + bias.detach()[p].double()
        if t is not None:
            tr = t.double()[rows].unsqueeze(1) if t.dim() == 1 else t.double()
            g = torch.clamp(g, min=-tr, max=tr)
        sq[rows, p] = g.square().sum(1)
    return sq


class Assignment(NamedTuple):
    norms: Tensor  # [B, P] float64
    chosen: Tensor  # [B] int64, -1 for a row whose norms are all NaN


def assign_prototypes(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      threshold: Optional[Union[Number, Tensor]] = None, *, backend: Optional[str] = None,
                      method: str = "auto", gram: Optional[PrototypeGram] = None) -> Assignment:
    """Persona Eq. 12: (norms [B, P] float64, chosen [B]) -- the prototype whose edit is smallest.
    NaN ranks after +inf, ties go to the lowest index, an all-NaN row gives -1. Norms as
    :func:`edit_norms` (``method=`` / ``gram=`` likewise)."""
    if isinstance(weight, Tensor) and weight.dim() == 3 and weight.shape[0] == 0:
        raise ValueError("weight must hold at least one prototype editor (P >= 1)")
    norms = edit_norms(e, weight, bias, threshold, backend=backend, method=method, gram=gram)
    return Assignment(norms, reference._argmin_nan_last(norms))
