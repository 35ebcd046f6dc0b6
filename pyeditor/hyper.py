"""Persona serving ops: edited linear layers, the editors' batched matmuls, prototype assignment.

Same names and arguments as their definitions in :mod:`pyeditor.reference`, plus ``backend=``
(see :mod:`pyeditor.backends`). ``assign_prototypes`` / ``edit_norms`` also take ``method=`` and
``gram=`` (the cached Gram form, see :func:`prototype_gram`). The assignment over every edited
layer at once is in :mod:`pyeditor.assign_layers`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

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
            if w.dim() != 3 or w.shape[:2] != weight[0].shape[:2]:
                raise ValueError(f"weight[{l}] must be [P, d, n_l] with the P and d of weight[0] "
                                 f"{tuple(weight[0].shape[:2])}, got shape {tuple(w.shape)}")
        sizes = [int(w.shape[-1]) for w in weight]
        weight = torch.cat(list(weight), dim=-1)
    elif sizes is None:
        raise ValueError("sizes is required with a concatenated weight: the width of each head")
    if isinstance(bias, (list, tuple)):
        for l, b in enumerate(bias):
            validate.float_tensor(b, f"bias[{l}]")  # a head without bias: pass zeros
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
    values of an fp32 / fp64 product), from which ||e W_p + b_p||^2 = [e,1] G_p [e,1]^T.
    :func:`pyeditor.assign_layers.prototype_gram_layers` stacks one per layer: [L, P, d+1, d+1]."""
    gram: Tensor
    abs_gram: Tensor  # |G_p|, bounds the terms of the quadratic form (cancellation check)
    source: tuple = ()  # validate.editor_fingerprint of the editors it was computed from
    forms: Optional[tuple] = None  # _forms(gram, abs_gram, ...), kept so that serving calls skip the layout


def prototype_gram(weight: Tensor, bias: Optional[Tensor] = None) -> PrototypeGram:
    """The Gram form of every editor, to keep while editor weights are frozen (serving).

    assign_prototypes / edit_norms refuse it for other tensors and after in-place changes that
    PyTorch records (the tensors' version counters). Changes it cannot see: writes through
    ``.data``, a NumPy view or a raw pointer, and any change to inference-mode tensors (they
    keep no counter). After such a change compute the Gram again: checking the contents on
    every call would cost the pass over the editors that the cache exists to save."""
    _check_hyper(weight.new_zeros(0, weight.shape[1]) if weight.dim() == 3 else weight, weight, bias, None)
    P, d, _ = weight.shape
    g = weight.new_zeros((P, d + 1, d + 1), dtype=torch.float64)
    _fill_gram(g, weight, bias)
    a = g.abs()
    return PrototypeGram(g, a, validate.editor_fingerprint(weight, bias), _forms(g[None], a[None], _acc_of(weight)))


def _fill_gram(g: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """g [P, d+1, d+1] float64 (zeros) := the Gram of [W_p; b_p], products in float32 (float64
    for float64 editors)."""
    w = weight.detach().to(_acc_of(weight))
    P, d, n = w.shape
    b = None if bias is None else bias.detach().to(w.dtype)
    if d * n < _GRAM_PER_EDITOR:
        g[:, :d, :d] = torch.bmm(w, w.transpose(1, 2))
        if b is not None:
            # b_p W_p^T as a [1, n] x [n, d] product: bmm(W, b[..., None]) runs a slow matrix-vector path
            g[:, :d, d] = torch.bmm(b.unsqueeze(1), w.transpose(1, 2)).squeeze(1)
    else:
        # large editors one at a time: each product gets every thread, and W_p b_p reads W_p
        # while the last-level cache may still hold it (bench: hyper/assign-auto)
        for p in range(P):
            g[p, :d, :d] = torch.mm(w[p], w[p].T)
            if b is not None:
                g[p, :d, d] = torch.mv(w[p], b[p])
    if b is not None:
        g[:, d, :d] = g[:, :d, d]
        g[:, d, d] = b.double().square().sum(1)


# elements of one editor's W_p from which _fill_gram forms the Grams one editor at a time
_GRAM_PER_EDITOR = 1 << 20


def _forms(gram: Tensor, abs_gram: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """K stacks of Grams [K, P, d+1, d+1] laid out for one wide batched product per call: every
    prototype's form side by side, [K, d+1, P (d+1)] (a broadcast matmul would copy the
    embeddings P times). The value in float64; the bound in the editors' accumulation dtype
    ``acc``: for float32 / 16-bit editors, whose Gram entries are float32 products, only the
    bound's magnitude counts (it meets a 2^-10 margin; an overflow to inf sends the pair to the
    redo), so a float32 product is enough and cheaper."""
    K, P, d1, _ = gram.shape
    return (gram.transpose(1, 2).reshape(K, d1, P * d1),
            abs_gram.transpose(1, 2).reshape(K, d1, P * d1).to(acc))


_CANCEL = {torch.float32: 2.0 ** -10, torch.float64: 2.0 ** -40}


def _gram_sumsq(e: Tensor, weight: Tensor, bias: Optional[Tensor], gram: PrototypeGram) -> Tensor:
    """sum of squares [B, P] float64 from the Gram form; pairs where the quadratic form may have
    cancelled (result small next to the sum of its terms' magnitudes) or met inf / NaN are
    recomputed directly in float64, so the answer keeps the reference's accuracy."""
    def direct(_block: int, p: int, rows: Tensor) -> Tensor:
        return _direct_sumsq(e, weight, bias, p, rows)

    forms = getattr(gram, "forms", None)
    if forms is None:
        forms = _forms(gram.gram[None], gram.abs_gram[None], _acc_of(weight))
    return _quad_sumsq(e[None], forms, _CANCEL[_acc_of(weight)], direct)[0]


def _acc_of(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _augment(e: Tensor, dtype: torch.dtype) -> Tensor:
    """[..., B, d] -> [..., B, d+1] rows [e_b, 1] (the bias column of the Gram form)."""
    e = e.detach().to(dtype)
    return torch.cat([e, e.new_ones(e.shape[:-1] + (1,))], -1)


def _direct_sumsq(e: Tensor, weight: Tensor, bias: Optional[Tensor], p: int, rows: Tensor) -> Tensor:
    """||e_b W_p + b_p||^2 in float64 for the given rows, as the reference computes it."""
    g = e.detach()[rows].double() @ weight.detach()[p].double()
    if bias is not None:
        g = g + bias.detach()[p].double()
    return g.square().sum(1)


def _quad_sumsq(e: Tensor, forms: Tuple[Tensor, Tensor], eps: float, direct) -> Tensor:
    """[K, B, P] float64 sums of squares from K quadratic forms: e [K, B, d], forms from
    :func:`_forms`. A (k, b, p) whose value is small next to its bound (the sum of its terms'
    magnitudes: the form may have cancelled) or not finite is recomputed by
    ``direct(k, p, rows)`` in float64, which keeps the reference's accuracy."""
    value, bound_form = forms
    K, d1, width = value.shape
    B, P = e.shape[1], width // d1
    ea = _augment(e, torch.float64)
    sq = (torch.bmm(ea, value).view(K, B, P, d1) * ea.unsqueeze(2)).sum(-1)
    ab = ea.abs().to(bound_form.dtype)
    bound = (torch.bmm(ab, bound_form).view(K, B, P, d1) * ab.unsqueeze(2)).sum(-1)
    redo = ~torch.isfinite(bound) | (sq < eps * bound)
    if bool(redo.any()):
        for k, p in redo.any(1).nonzero().tolist():
            rows = redo[k, :, p].nonzero().flatten()
            sq[k, rows, p] = direct(k, p, rows)
    return sq.clamp_min(0)


# The plan's cost model, in units of one multiply-add of the fused kernel (matmul + sum-of-squares
# epilogue, P B d n of them). Fitted on the CPU backend, one thread, over the bench assign shapes,
# the Persona example's and small ones: torch.bmm forming W W^T runs a little faster per
# multiply-add; W b is a matrix-vector product at memory speed; the float64 quadratic form with its
# bound costs several fused multiply-adds per (b, p, i, j); and each call of either form pays a
# fixed cost of small torch ops, which decides at small shapes.
_MAC_GRAM, _MAC_GEMV, _MAC_QUAD = 0.9, 6.0, 3.2
_CALL_FUSED, _CALL_GRAM, _CALL_GRAM_LAYER = 2.4e6, 5.0e6, 3.0e6


def norms_plan(B: int, d: int, sizes: Sequence[int], P: int, *, clipped: bool = False, cached: bool = False,
               forms: int = 1) -> str:
    """method="auto" of :func:`edit_norms` / :func:`edit_norms_layers`: "gram" or "fused".

    The fused kernel costs P B d n multiply-adds per layer of width n. The Gram form costs
    P d^2 n (+ P d n for the bias) per layer to form the Grams, unless they are cached, then
    P B (d+1)^2 per quadratic form evaluated (``forms``: 1 for one layer or layers sharing their
    embedding, L for per-layer embeddings). So the Gram form wins when B is large next to d and
    n next to d; neither inequality alone decides (n < d makes even a cached Gram dearer), hence
    the model rather than a threshold on B. A clip is not a quadratic form, and traced calls
    (torch.compile) take the fused form: the Gram form's accuracy repair is data-dependent.
    """
    if clipped or validate.compiling():
        return "fused"
    n = sum(sizes)
    fused = P * B * d * n + _CALL_FUSED * len(sizes)
    gram = _MAC_QUAD * forms * P * B * (d + 1) ** 2 + _CALL_GRAM
    if not cached:
        gram += P * (_MAC_GRAM * d * d + _MAC_GEMV * d) * n + _CALL_GRAM_LAYER * len(sizes)
    return "gram" if gram < fused else "fused"


def edit_norms(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               threshold: Optional[Union[Number, Tensor]] = None, *, backend: Optional[str] = None,
               method: str = "auto", gram: Optional[PrototypeGram] = None) -> Tensor:
    """[B, P] float64: ||clip(e_b W_p + b_p)||, never forming the [P, B, n] edits.

    method: "fused" -- the matmul with a sum-of-squares epilogue (edit_sumsq op; any threshold);
            "gram"  -- the quadratic form of each editor's Gram matrix (threshold must be None;
                       pass ``gram=prototype_gram(weight, bias)`` to reuse it across calls);
            "auto"  -- "gram" when there is no threshold and :func:`norms_plan` finds it the
                       cheaper of the two for these shapes (and a cached ``gram``), else "fused".
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
        P, d, n = weight.shape
        method = norms_plan(e.shape[0], d, [n], P, clipped=t is not None, cached=gram is not None)
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


def argmin_nan_last(values: Tensor) -> Tensor:
    """Row-wise argmin of [B, P >= 1] norms: NaN ranks after +inf, ties go to the lowest index,
    an all-NaN row gives -1."""
    finite_best = values.masked_fill(torch.isnan(values), float("inf")).amin(1, keepdim=True)
    hit = values == finite_best  # NaN equals nothing, so only real values are hits
    first = hit.to(torch.int8).argmax(1)  # argmax returns the first of equal maxima
    return torch.where(hit.any(1), first, torch.full_like(first, -1))


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
    return Assignment(norms, argmin_nan_last(norms))

