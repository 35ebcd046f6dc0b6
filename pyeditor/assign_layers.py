"""Persona Eq. 11-12 over every edited layer at once, and how an assignment agrees with k-means.

``edit_norms_layers`` / ``assign_prototypes_layers`` combine the edit norms of all layers by a
rule (the whole edit's Frobenius norm, the sum or the max of the layers' norms, or a weighted
sum of squares), clipped or not, without forming any [P, B, n] edits: by the layers' Gram forms
(:mod:`pyeditor.hyper`'s, block-diagonal over per-layer embeddings, summed into one for a shared
embedding) or by one call of the all-layer fused op; :func:`layers_plan` picks.
``assignment_agreement`` reports how often an assignment matches the k-means partition.
Definitions in :mod:`pyeditor.reference` (``edit_norms_layers``, ``assign_prototypes_layers``).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import backends, hyper, ops, reference, validate
from .constants import LAYER_RULES
from .hyper import (_CANCEL, Assignment, Number, PrototypeGram, _acc_of, _direct_sumsq, _dtype_device, _fill_gram,
                    _forms, _quad_sumsq)


def _layer_generators(weights, biases, sizes) -> tuple:
    """(L weights [P, d, n_l], L biases None / [P, n_l], fingerprint source) from a list of layers
    or from one [P, d, sum(sizes)] tensor split by sizes (views, no copy)."""
    if isinstance(weights, Tensor):
        validate.float_tensor(weights, "weights")
        if weights.dim() != 3:
            raise ValueError(f"weights must be [P, d, N] (with sizes) or a list of [P, d, n_l], "
                             f"got shape {tuple(weights.shape)}")
        if sizes is None:
            raise ValueError("sizes is required with a concatenated weights tensor: the width n_l of each layer")
        sizes = list(sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
            raise TypeError(f"sizes must be one int >= 0 per layer, got {sizes!r}")
        if sum(sizes) != weights.shape[2]:
            raise ValueError(f"sizes sum to {sum(sizes)} but weights has {weights.shape[2]} columns")
        ws = list(weights.split_with_sizes(sizes, 2))
        if biases is None:
            return ws, [None] * len(ws), (weights, None, tuple(sizes))
        if not isinstance(biases, Tensor):
            raise TypeError("biases must be None or one [P, N] tensor with a concatenated weights tensor, "
                            f"got {type(biases).__name__}")
        validate.float_tensor(biases, "biases")
        if tuple(biases.shape) != (weights.shape[0], weights.shape[2]):
            raise ValueError(f"biases must have shape [{weights.shape[0]}, {weights.shape[2]}], "
                             f"got {tuple(biases.shape)}")
        return ws, list(biases.split_with_sizes(sizes, 1)), (weights, biases, tuple(sizes))
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of [P, d, n_l] tensors or one [P, d, N] tensor with sizes, "
                        f"got {type(weights).__name__}")
    if sizes is not None:
        raise ValueError("pass sizes only with a concatenated weights tensor, not with a list of layers")
    if not weights:
        raise ValueError("weights must hold at least one layer")
    ws = list(weights)
    for l, w in enumerate(ws):
        validate.float_tensor(w, f"weights[{l}]")
    if biases is None:
        bs = [None] * len(ws)
    elif isinstance(biases, (list, tuple)):
        bs = list(biases)
        if len(bs) != len(ws):
            raise ValueError(f"biases has {len(bs)} entries but weights has {len(ws)} layers")
    else:
        raise TypeError(f"biases must be None or a list (one None / [P, n_l] per layer) with a list of weights, "
                        f"got {type(biases).__name__}")
    return ws, bs, tuple(zip(ws, bs))


def _check_layers(e: Tensor, ws: list, bs: list) -> Tuple[Tensor, bool]:
    """Validated (embeddings, shared): [B, d] and True when every layer reads the same rows (e is
    [B, d], or [L, B, d] with a stride-0 layer axis as e.expand(L, B, d) gives), else [L, B, d]."""
    validate.float_tensor(e, "e")
    L = len(ws)
    if e.dim() == 3 and e.shape[0] != L:
        raise ValueError(f"e holds {e.shape[0]} layer embeddings but weights has {L} layers")
    if e.dim() not in (2, 3):
        raise ValueError(f"e must be [B, d] (shared by every layer) or [L, B, d] (one per layer), "
                         f"got shape {tuple(e.shape)}")
    dtype, device = e.dtype, e.device
    for l, (w, b) in enumerate(zip(ws, bs)):
        # names are spelled out only when something is wrong (a serving call checks every layer)
        if not (isinstance(w, Tensor) and w.dtype == dtype and w.device == device and
                (b is None or (isinstance(b, Tensor) and b.dtype == dtype and b.device == device))):
            _dtype_device(e, "e", **{f"weights[{l}]": w, f"biases[{l}]": b})
        if w.dim() != 3:
            raise ValueError(f"weights[{l}] must be [P, d, n], got shape {tuple(w.shape)}")
        if w.shape[:2] != ws[0].shape[:2]:
            raise ValueError(f"weights[{l}] has shape {tuple(w.shape)} but weights[0] has {tuple(ws[0].shape)}: "
                             "every layer needs the same P prototypes and embedding width d")
        if b is not None and tuple(b.shape) != (w.shape[0], w.shape[2]):
            raise ValueError(f"biases[{l}] must have shape [{w.shape[0]}, {w.shape[2]}], got {tuple(b.shape)}")
    if ws[0].shape[0] == 0:
        raise ValueError("weights must hold at least one prototype editor (P >= 1)")
    if e.shape[-1] != ws[0].shape[1]:
        raise ValueError(f"e has {e.shape[-1]} features but weights expect {ws[0].shape[1]}")
    if e.dim() == 2:
        return e, True
    if L == 1 or (e.stride(0) == 0 and e.shape[1] > 0):
        return e[0], True
    return e, False


def _layer_rule(rule, L: int) -> Tuple[str, Optional[List[float]]]:
    """("sumsq" | "sum" | "max" | "weighted", per-layer weights for "weighted")."""
    if isinstance(rule, str):
        if rule not in LAYER_RULES:
            raise ValueError(f"rule must be 'sumsq', 'sum', 'max' or a list of {L} per-layer weights, got {rule!r}")
        return rule, None
    if isinstance(rule, Tensor):
        if rule.dim() != 1 or rule.dtype == torch.bool or rule.is_complex():
            raise TypeError(f"rule as a tensor must be 1-D real per-layer weights, "
                            f"got {rule.dtype} {tuple(rule.shape)}")
        rule = rule.tolist()
    if not isinstance(rule, (list, tuple)):
        raise TypeError(f"rule must be 'sumsq', 'sum', 'max' or a list of per-layer weights, got {type(rule).__name__}")
    if len(rule) != L:
        raise ValueError(f"rule has {len(rule)} weights but weights has {L} layers")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in rule):
        raise TypeError(f"rule weights must be real numbers, got {rule!r}")
    lam = [float(x) for x in rule]
    if any(not math.isfinite(x) or x < 0 for x in lam) or not any(lam):
        raise ValueError(f"rule weights must be finite and >= 0, not all 0, got {lam}")
    return "weighted", lam


def _layers_gram(ws: list, bs: list) -> Tuple[Tensor, Tensor]:
    """Every layer's augmented Gram [L, P, d+1, d+1] float64 and its magnitude."""
    P, d = ws[0].shape[:2]
    g = ws[0].new_zeros((len(ws), P, d + 1, d + 1), dtype=torch.float64)
    for l, (w, b) in enumerate(zip(ws, bs)):
        _fill_gram(g[l], w, b)
    return g, g.abs()


def prototype_gram_layers(weights: Union[Tensor, Sequence[Tensor]],
                          biases: Union[Tensor, Sequence[Optional[Tensor]], None] = None, *,
                          sizes: Optional[Sequence[int]] = None) -> PrototypeGram:
    """:func:`pyeditor.hyper.prototype_gram` of every layer, to keep while the editors are frozen (serving):
    ``gram`` [L, P, d+1, d+1], the diagonal blocks of the block-diagonal form that
    :func:`edit_norms_layers` evaluates (arguments as there)."""
    ws, bs, source = _layer_generators(weights, biases, sizes)
    _check_layers(ws[0].new_zeros(0, ws[0].shape[1] if ws[0].dim() == 3 else 0), ws, bs)
    g, a = _layers_gram(ws, bs)
    return PrototypeGram(g, a, _layers_fingerprint(source), _forms(g, a, _acc_of(ws[0])))


def _layers_fingerprint(source: tuple) -> tuple:
    if len(source) == 3 and isinstance(source[0], Tensor):  # one concatenated tensor and sizes
        return ("concatenated", validate.editor_fingerprint(source[0], source[1]), source[2])
    return ("layers",) + tuple(validate.editor_fingerprint(w, b) for w, b in source)


def _check_layer_gram(gram, e: Tensor, ws: list, source: tuple) -> None:
    g, a = getattr(gram, "gram", None), getattr(gram, "abs_gram", None)
    if not (isinstance(g, Tensor) and isinstance(a, Tensor)):
        raise TypeError(f"gram must be a PrototypeGram from pyeditor.prototype_gram_layers(weights, biases), "
                        f"got {type(gram).__name__}")
    L, (P, d) = len(ws), ws[0].shape[:2]
    if tuple(g.shape) != (L, P, d + 1, d + 1) or g.shape != a.shape or g.dtype != torch.float64:
        raise ValueError(f"gram holds {g.dtype} {tuple(g.shape)}, expected float64 {(L, P, d + 1, d + 1)} "
                         "(pyeditor.prototype_gram_layers of these layers)")
    if g.device != e.device or a.device != e.device:
        raise ValueError(f"gram is on {g.device} but e is on {e.device}")
    if not validate.compiling() and getattr(gram, "source", None) != _layers_fingerprint(source):
        raise ValueError("gram was not computed from these weights and biases, or they changed since "
                         "(in place); compute it again with pyeditor.prototype_gram_layers(...)")


def _cached_forms(gram: PrototypeGram, sel, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The laid-out forms of the selected layers of a validated layer Gram."""
    forms = getattr(gram, "forms", None)
    if forms is None:
        forms = _forms(gram.gram, gram.abs_gram, acc)
    return forms[0][sel], forms[1][sel]


def edit_norms_layers(e: Tensor, weights: Union[Tensor, Sequence[Tensor]],
                      biases: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
                      threshold: Optional[Union[Number, Tensor]] = None, *,
                      rule: Union[str, Sequence[float], Tensor] = "sumsq", sizes: Optional[Sequence[int]] = None,
                      backend: Optional[str] = None, method: str = "auto",
                      gram: Optional[PrototypeGram] = None) -> Tensor:
    """[B, P] float64: Persona Eq. 11-12 over every edited layer at once, never forming the
    [P, B, n_l] edits. Arguments and rules as :func:`pyeditor.reference.edit_norms_layers`:

    e [B, d] shared by every layer (or [L, B, d] expanded from one, stride 0) or [L, B, d] per
    layer; weights a list of L [P, d, n_l] or one [P, d, sum(sizes)] tensor with ``sizes``
    (``ParameterEditor.head_weight`` / ``head_bias`` / ``head_sizes``); biases to match;
    threshold None (unclipped) or T for every layer; rule "sumsq" (the whole edit's Frobenius
    norm), "sum", "max" or L weights lambda_l >= 0 (sqrt(sum_l lambda_l ||G_l||^2)).

    method "gram" (unclipped only): each layer's ||G_l||^2 is the quadratic form of its augmented
    Gram [W_l; b_l], so with per-layer embeddings the whole edit's sum of squares is one
    block-diagonal form in [e_0, .., e_{L-1}, 1]; its L diagonal blocks are evaluated in one
    batched product. With a shared embedding and a sum-of-squares rule the blocks add up (weighted)
    to one [P, d+1, d+1] form: one layer's evaluation for the whole model. Pass
    ``gram=prototype_gram_layers(...)`` to keep the Grams across calls. Accuracy as
    :func:`pyeditor.hyper.edit_norms`' Gram form (pairs that may have cancelled are recomputed in float64).
    method "fused": one call of the all-layer op (``pyeditor::edit_norms_layers``, any threshold,
    any rule, shared or per-layer embeddings): each (sample, prototype) pair's layers are
    evaluated in turn and folded by the rule, so only the [B, P] result is written. A layer's
    edit elements are formed in float64 (clipped layers always); on CPU an unclipped layer whose
    Gram form is cheaper (csrc/include/pyeditor/layer_norms.h layer_prefers_gram) goes through it
    (``gram`` if given, else formed in the call) with the same accuracy repair as method "gram".
    method "auto": :func:`layers_plan` (:func:`pyeditor.hyper.norms_plan`'s cost model) by shapes.
    Not differentiable (assignment is an argmin).
    """
    ws, bs, source = _layer_generators(weights, biases, sizes)
    es, shared = _check_layers(e, ws, bs)
    kind, lam = _layer_rule(rule, len(ws))
    if method not in ("auto", "fused", "gram"):
        raise ValueError(f"method must be 'auto', 'fused' or 'gram', got {method!r}")
    if gram is not None:
        _check_layer_gram(gram, es, ws, source)
    B = es.shape[-2]
    t = None if threshold is None else _threshold64(threshold, es)
    if t is not None and t.dim() == 1 and t.shape[0] != B:
        raise ValueError(f"threshold has {t.shape[0]} values; expected one or {B}")
    name = backends.resolve(backend, es.device)
    keep = list(range(len(ws))) if lam is None else [l for l, x in enumerate(lam) if x > 0]
    lam_keep = None if lam is None else [lam[l] for l in keep]
    quadratic = kind in ("sumsq", "weighted")
    P, d = ws[0].shape[:2]
    method = layers_plan(method, name, B, d, [ws[l].shape[2] for l in keep], P, clipped=t is not None,
                         cached=gram is not None, forms=1 if shared and quadratic else len(keep))
    if method == "reference":
        return reference.edit_norms_layers(e, weights, biases, threshold, rule, sizes)
    if method == "fused":
        el = es.expand(len(ws), *es.shape) if shared else es
        with torch.no_grad():
            return ops.layer_norms_op(name)(el, ws, bs, t, kind, lam, None if gram is None else gram.gram)
    if t is not None:
        raise ValueError("method='gram' needs threshold=None: the clip is not a quadratic form")
    combined = shared and quadratic  # the blocks add up to one form
    sel = slice(None) if len(keep) == len(ws) else keep
    forms = None if gram is None else _cached_forms(gram, sel, _acc_of(ws[0]))
    if forms is None and combined and kind == "sumsq" and isinstance(source[0], Tensor):
        # the concatenated heads' Gram is the sum of the layers' Grams: one product forms it
        g = es.new_zeros((1, ws[0].shape[0], es.shape[-1] + 1, es.shape[-1] + 1), dtype=torch.float64)
        _fill_gram(g[0], source[0], source[1])
        forms = _forms(g, g.abs(), _acc_of(ws[0]))
    sq = _layers_gram_sumsq(es if shared else es[sel], shared, combined, [ws[l] for l in keep],
                            [bs[l] for l in keep], lam_keep, forms)
    # sq [K, B, P]: one row per kept layer, or one row already combined by the rule
    if quadratic:
        if not combined and lam_keep is not None:
            sq = sq * sq.new_tensor(lam_keep).view(-1, 1, 1)
        return sq.sum(0).sqrt()
    norms = sq.sqrt()
    return norms.sum(0) if kind == "sum" else norms.amax(0)


def layers_plan(method: str, backend: str, B: int, d: int, sizes: Sequence[int], P: int, *, clipped: bool,
                cached: bool, forms: int) -> str:
    """How :func:`edit_norms_layers` evaluates: "fused" (one call of the all-layer op on
    ``backend``, which itself takes each unclipped layer's Gram form where that is cheaper),
    "gram" (the layers' Gram forms by torch ops) or "reference" (the oracle). ``method`` "auto"
    takes the op on every native backend; on backend "reference" it asks
    :func:`pyeditor.hyper.norms_plan` whether the torch Gram form beats the oracle. ``sizes``
    are the widths of the layers the rule reads."""
    if method == "auto" and backend == "reference":
        method = hyper.norms_plan(B, d, sizes, P, clipped=clipped, cached=cached, forms=forms)
    if method == "gram":
        return "gram"
    return "reference" if backend == "reference" else "fused"


_CPU_FLOAT64 = torch.empty(0, dtype=torch.float64)


def _threshold64(threshold, es: Tensor) -> Tensor:
    """T as float64 (0-d or [B]) on e's device: the all-layer op clips in double, as the reference."""
    like = _CPU_FLOAT64 if es.device.type == "cpu" else es.new_empty(0, dtype=torch.float64)
    return validate.threshold(threshold, like).to(torch.float64)


def _layers_gram_sumsq(es: Tensor, shared: bool, combined: bool, ws: list, bs: list, lam: Optional[list],
                       forms: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """[K, B, P] float64 sums of squares of the layers ws / bs by their Gram forms (block l of the
    block-diagonal form reads layer l's embedding): one row per layer, or with ``combined`` (a
    shared embedding) one row from the Grams summed with the weights ``lam`` (None: all 1)."""
    value, bound = forms if forms is not None else _forms(*_layers_gram(ws, bs), _acc_of(ws[0]))
    if combined:
        if value.shape[0] > 1:  # else already one form
            wl = [1.0] * len(ws) if lam is None else lam
            value = (value * value.new_tensor(wl).view(-1, 1, 1)).sum(0, keepdim=True)
            bound = (bound * bound.new_tensor(wl).view(-1, 1, 1)).sum(0, keepdim=True)
        e = es[None]
    else:
        e = es.expand(len(ws), *es.shape) if shared else es

    def direct(k: int, p: int, rows: Tensor) -> Tensor:
        if not combined:
            return _direct_sumsq(es if shared else es[k], ws[k], bs[k], p, rows)
        return sum((1.0 if lam is None else lam[l]) * _direct_sumsq(es, ws[l], bs[l], p, rows) for l in range(len(ws)))

    return _quad_sumsq(e, (value, bound), _CANCEL[_acc_of(ws[0])], direct)


def assign_prototypes_layers(e: Tensor, weights: Union[Tensor, Sequence[Tensor]],
                             biases: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
                             threshold: Optional[Union[Number, Tensor]] = None, *,
                             rule: Union[str, Sequence[float], Tensor] = "sumsq",
                             sizes: Optional[Sequence[int]] = None, backend: Optional[str] = None,
                             method: str = "auto", gram: Optional[PrototypeGram] = None) -> Assignment:
    """Persona Eq. 12 over the whole model: (norms [B, P] float64 from :func:`edit_norms_layers`,
    chosen [B]), the prototype whose edit over every layer is smallest by ``rule``. NaN ranks
    after +inf, ties go to the lowest index, an all-NaN row gives -1.

    With a ParameterEditor: ``assign_prototypes_layers(editor.layer_embeddings(emb),
    editor.head_weight, editor.head_bias, sizes=editor.head_sizes)``. Not differentiable."""
    norms = edit_norms_layers(e, weights, biases, threshold, rule=rule, sizes=sizes, backend=backend,
                              method=method, gram=gram)
    return Assignment(norms, _argmin(norms))


def _argmin(norms: Tensor) -> Tensor:
    """hyper.argmin_nan_last (NaN after +inf, ties to the lowest index, all-NaN -> -1); without
    NaN that is torch's argmin (first minimum), one op instead of several on small serving calls.
    Norms are >= 0, +inf or NaN, so their sum is NaN exactly when one of them is."""
    if validate.compiling() or norms.shape[1] == 0 or math.isnan(norms.sum().item()):
        return hyper.argmin_nan_last(norms)
    return norms.argmin(1)


class Agreement(NamedTuple):
    rate: float  # fraction of samples whose prototype is matched to their k-means cluster
    matching: Tensor  # [P] int64: the cluster matched to each prototype, -1 for none
    confusion: Tensor  # [P, K] int64: samples per (chosen prototype, k-means label)


def assignment_agreement(chosen: Tensor, labels: Tensor, prototypes: Optional[int] = None,
                         clusters: Optional[int] = None) -> Agreement:
    """How often the assignment (Eq. 12) agrees with the k-means partition (Eq. 9), up to a
    renaming of the labels: the one-to-one matching of prototypes to clusters that agrees on the
    most samples (an optimal assignment on the [P, K] confusion matrix, Kuhn-Munkres, exact), and
    the fraction of samples it covers. A sample with chosen = -1 (all norms NaN) never agrees.

    chosen [B] (from assign_prototypes*), labels [B] (from kmeans), integers; ``prototypes`` /
    ``clusters`` default to one more than the largest value seen. Reporting only (host sync).
    """
    validate.tensor(chosen, "chosen")
    validate.tensor(labels, "labels")
    for name, t in (("chosen", chosen), ("labels", labels)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    if chosen.shape[0] != labels.shape[0]:
        raise ValueError(f"chosen has {chosen.shape[0]} samples but labels has {labels.shape[0]}")
    if chosen.shape[0] == 0:
        raise ValueError("chosen must hold at least one sample")
    c, k = chosen.detach().long().cpu(), labels.detach().long().cpu()
    if int(c.min()) < -1:
        raise ValueError(f"chosen value {int(c.min())} is out of range (-1 marks an all-NaN row)")
    if int(k.min()) < 0:
        raise ValueError(f"labels value {int(k.min())} is negative")
    P = int(c.max()) + 1 if prototypes is None else int(prototypes)
    K = int(k.max()) + 1 if clusters is None else int(clusters)
    if int(c.max()) >= P:
        raise ValueError(f"chosen value {int(c.max())} is out of range for prototypes={P}")
    if int(k.max()) >= K:
        raise ValueError(f"labels value {int(k.max())} is out of range for clusters={K}")
    ok = c >= 0
    confusion = torch.bincount(c[ok] * K + k[ok], minlength=P * K).view(P, K)
    match = _best_matching(confusion.tolist())
    hits = sum(confusion[p, q].item() for p, q in enumerate(match) if q >= 0)
    return Agreement(hits / c.shape[0], torch.tensor(match, dtype=torch.int64), confusion)


def _best_matching(weight: List[List[int]]) -> List[int]:
    """Kuhn-Munkres on a rows x cols table: each row's column (-1 for none) in a one-to-one
    matching of largest total. The table is padded to a square of zeros and turned into a
    minimisation of (max - weight); potentials u (rows) and v (columns) keep every reduced cost
    >= 0 while one row at a time joins along a shortest augmenting path (O(n^3))."""
    rows, cols = len(weight), len(weight[0]) if weight else 0
    n = max(rows, cols)
    top = max((x for r in weight for x in r), default=0)
    cost = [[top - (weight[i][j] if i < rows and j < cols else 0) for j in range(n)] for i in range(n)]
    u, v = [0] * (n + 1), [0] * (n + 1)
    owner = [0] * (n + 1)  # owner[j]: the row (1-based) holding column j; column 0 is the free root
    for i in range(1, n + 1):
        owner[0], col = i, 0
        dist, prev, done = [math.inf] * (n + 1), [0] * (n + 1), [False] * (n + 1)
        while owner[col]:
            done[col] = True
            row, step, nxt = owner[col], math.inf, 0
            for j in range(1, n + 1):
                if not done[j]:
                    reduced = cost[row - 1][j - 1] - u[row] - v[j]
                    if reduced < dist[j]:
                        dist[j], prev[j] = reduced, col
                    if dist[j] < step:
                        step, nxt = dist[j], j
            for j in range(n + 1):
                if done[j]:
                    u[owner[j]] += step
                    v[j] -= step
                else:
                    dist[j] -= step
            col = nxt
        while col:  # flip the path back to the root
            owner[col] = owner[prev[col]]
            col = prev[col]
    match = [-1] * rows
    for j in range(1, n + 1):
        if owner[j] - 1 < rows and j - 1 < cols:
            match[owner[j] - 1] = j - 1
    return match
