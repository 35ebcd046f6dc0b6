"""Plain-PyTorch definition of every pyeditor op: the numerics oracle.

Every kernel in the library is tested against these functions. They favour clarity
over speed, compute in float32 (float64 for float64 inputs) and round once to the
output dtype, which is what the kernels do too. The oracle imports nothing of the package
but the shared format constants (pyeditor.quant_format), and production code calls it only
as the "reference" backend (tests/test_reference_pure.py holds both rules).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .constants import LAYER_RULES
from .constants import METRICS as _METRICS
from .quant_format import BIT_WIDTHS as _BIT_WIDTHS
from .quant_format import GROUP_SIZES, QuantizedWeight, n_groups

ThresholdLike = Union[float, int, Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def edit_as_matrix(theta: Tensor, delta: Tensor) -> Tensor:
    """View ``delta`` with theta's matrix shape (Persona Eq. 6: Reshape(G; N_in, N_out)).

    ``delta`` is either one edit ([R, C] or flat [R*C]) or a batch of them
    ([B, R, C] or [B, R*C]); the result is [R, C] or [B, R, C].
    """
    rows, cols = theta.shape[-2], theta.shape[-1]
    numel = rows * cols
    if delta.dim() >= 1 and delta.shape[-2:] == (rows, cols) and delta.dim() in (2, 3):
        return delta
    if delta.dim() == 1 and delta.shape[0] == numel:
        return delta.reshape(rows, cols)
    if delta.dim() == 2 and delta.shape[1] == numel:
        return delta.reshape(delta.shape[0], rows, cols)
    raise ValueError(
        f"delta of shape {tuple(delta.shape)} cannot be read as edits of theta's "
        f"matrix shape ({rows}, {cols}): expected [{rows}, {cols}], [{numel}], "
        f"[B, {rows}, {cols}] or [B, {numel}]"
    )


def apply_edit(
    theta: Tensor,
    delta: Tensor,
    threshold: ThresholdLike,
    proto_index: Optional[Tensor] = None,
) -> Tensor:
    """Persona's edited weights K = clamp(delta, -T, T) + theta (Eq. 5-7).

    theta:       [R, C] one matrix, or [P, R, C] a stack of P prototype matrices.
    delta:       [R, C] / [R*C] one edit, or [B, R, C] / [B, R*C] one edit per sample.
    threshold:   T >= 0: a Python number, a 0-d tensor, or a [B] tensor (one T per sample).
    proto_index: optional [B] integer tensor; sample b then uses theta[proto_index[b]]
                 (theta must be [P, R, C]).

    Without proto_index, delta and theta broadcast like torch tensors: [R, C] + [R, C]
    gives [R, C]; a batch of edits on one theta gives [B, R, C]; a [P, R, C] theta
    with one edit gives [P, R, C]; [B, R, C] with [P, R, C] needs B == P.
    With proto_index the result is [B, R, C] (a single delta is shared by all samples).
    NaN in delta stays NaN (clamp propagates it); +-inf is clipped to +-T.
    The result has theta's dtype; clamp and add run in float32 (float64 for float64).
    """
    d = edit_as_matrix(theta, delta)
    acc = _acc_dtype(theta.dtype)
    if proto_index is not None:
        if theta.dim() != 3:
            raise ValueError("proto_index needs theta as a [P, R, C] prototype stack")
        base = theta.index_select(0, proto_index.long())
        if d.dim() == 2:
            d = d.expand_as(base)
    else:
        base = theta
    batch = max(d.dim(), base.dim()) == 3
    t = torch.as_tensor(threshold, dtype=acc, device=theta.device)
    if t.dim() == 1:
        if not batch:
            raise ValueError("a per-sample threshold [B] needs a batch of edits")
        t = t.view(-1, 1, 1)
    clipped = torch.clamp(d.to(acc), min=-t, max=t)
    return (clipped + base.to(acc)).to(theta.dtype)


# --------------------------------------------------------------------------------------
# Argument checks shared by the ops below. Bad input raises TypeError (wrong kind or
# dtype) or ValueError (wrong shape or value), always naming the argument.
# --------------------------------------------------------------------------------------



def _check_float(name: str, t: object, dims: Optional[tuple] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    return t


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_index(name: str, index: object, size: int, length: int) -> Tensor:
    """A [length] integer tensor with values in [0, size); returned as int64."""
    if not isinstance(index, Tensor) or not _is_integer(index):
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    if index.dim() != 1 or index.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"{name} values must be in [0, {size}), got min "
                         f"{int(index.min())} max {int(index.max())}")
    return index.long()


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_threshold(threshold: object, batch: int) -> Tensor:
    """T as a float64 tensor: 0-d, or [batch] (one T per sample). T must be >= 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, Tensor)):
        raise TypeError(f"threshold must be a number or a tensor, got {type(threshold).__name__}")
    t = torch.as_tensor(threshold, dtype=torch.float64)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
        raise ValueError(f"threshold must be a number, a 0-d tensor or a [{batch}] tensor, "
                         f"got shape {tuple(t.shape)}")
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise ValueError("threshold must be >= 0 (and not NaN)")
    return t


def _check_metric(metric: object) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric  # type: ignore[return-value]


def _acc_of(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _clip(values: Tensor, threshold: Optional[Tensor], batch_dim: int) -> Tensor:
    """clamp(values, -T, T); a [B] T applies along ``batch_dim``."""
    if threshold is None:
        return values
    t = threshold.to(values.dtype)
    if t.dim() == 1:
        shape = [1] * values.dim()
        shape[batch_dim] = -1
        t = t.view(shape)
    return torch.clamp(values, min=-t, max=t)


# --------------------------------------------------------------------------------------
# Persona: edited linear layer, hypernetwork editors, prototype assignment
# --------------------------------------------------------------------------------------


def edited_linear(
    x: Tensor,
    theta: Tensor,
    delta: Tensor,
    threshold: ThresholdLike,
    bias: Optional[Tensor] = None,
    proto_index: Optional[Tensor] = None,
) -> Tensor:
    """Linear layer with per-sample edited weights (Persona Eq. 6):
    ``y[b] = x[b] @ (theta[p_b] + clamp(delta[b], -T_b, T_b)) + bias[p_b]``.

    x:           [B, S, in] floating.
    theta:       [in, out] shared by all samples, or [P, in, out] prototype stack.
    delta:       one edit per sample: [B, in, out] or flat [B, in*out] (Persona's
                 Reshape(G; N_in, N_out), row-major, see ``edit_as_matrix``).
    threshold:   T >= 0: a number, a 0-d tensor, or [B] (one T per sample).
    bias:        None, [out], or [P, out] (picked per sample like theta).
    proto_index: optional [B] integers in [0, P): sample b uses theta[proto_index[b]]
                 (and bias[proto_index[b]] for a [P, out] bias). Without it, a [P, in, out]
                 theta / [P, out] bias needs P == B and sample b uses row b.

    Returns [B, S, out] in x's dtype. The edited weight K = apply_edit(...) is formed,
    clamp + add, in float32 (float64 if any input is float64) and is never rounded to a
    low-precision dtype; the matmul and bias add run in that dtype too, and the result
    is rounded once (T is rounded to that dtype too). NaN in delta propagates; +-inf in
    delta is clipped to +-T. Differentiable in x, theta, delta and bias.
    """
    _check_float("x", x, (3,))
    _check_float("theta", theta, (2, 3))
    _check_float("delta", delta)
    if bias is not None:
        _check_float("bias", bias, (1, 2))
    B, _, n_in = x.shape
    rows, n_out = theta.shape[-2:]
    if n_in != rows:
        raise ValueError(f"x has {n_in} input features but theta has {rows} rows")
    d = edit_as_matrix(theta, delta)
    if d.dim() == 2:  # read as one [in, out] edit; only per-sample edits are accepted
        if tuple(delta.shape) != (B, rows * n_out):
            raise ValueError(f"delta must hold one edit per sample: [{B}, {rows}, {n_out}] "
                             f"or [{B}, {rows * n_out}], got {tuple(delta.shape)}")
        d = delta.reshape(B, rows, n_out)
    if d.shape[0] != B:
        raise ValueError(f"delta has {d.shape[0]} edits but x has batch {B}")
    t = _check_threshold(threshold, B)
    if proto_index is not None:
        if theta.dim() != 3:
            raise ValueError("proto_index needs theta as a [P, in, out] prototype stack")
        proto_index = _check_index("proto_index", proto_index, theta.shape[0], B)
    elif theta.dim() == 3 and theta.shape[0] != B:
        raise ValueError(f"theta of shape {tuple(theta.shape)} needs proto_index "
                         f"(or P == batch {B})")
    if bias is not None:
        if bias.shape[-1] != n_out:
            raise ValueError(f"bias must have {n_out} outputs, got shape {tuple(bias.shape)}")
        if bias.dim() == 2:
            rows_needed = theta.shape[0] if proto_index is not None else B
            if bias.shape[0] != rows_needed:
                what = f"P = {rows_needed}" if proto_index is not None else f"batch {B}"
                raise ValueError(f"a 2-D bias must have one row per prototype ({what}), "
                                 f"got shape {tuple(bias.shape)}")
    acc = _acc_of(x, theta, delta, bias)
    k = apply_edit(theta.to(acc), d, t, proto_index)  # [B, in, out] in acc
    y = torch.bmm(x.to(acc), k)
    if bias is not None:
        b = bias.to(acc)
        if b.dim() == 2:
            b = b.index_select(0, proto_index) if proto_index is not None else b
            b = b.unsqueeze(1)  # [B, 1, out]
        y = y + b
    return y.to(x.dtype)


def _hyper_matmul_acc(e, weight, bias, index, acc) -> Tensor:
    """hyper_matmul's value in ``acc`` (validated inputs)."""
    e, w = e.to(acc), weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if index is None:
        out = torch.einsum("bd,pdn->pbn", e, w)
        return out if b is None else out + b.unsqueeze(1)
    out = torch.einsum("bd,bdn->bn", e, w.index_select(0, index))
    return out if b is None else out + b.index_select(0, index)


def _check_hyper(e, weight, bias, index) -> Optional[Tensor]:
    _check_float("e", e, (2,))
    _check_float("weight", weight, (3,))
    P, d, n = weight.shape
    if e.shape[1] != d:
        raise ValueError(f"e has {e.shape[1]} features but weight expects {d} "
                         f"(weight shape {tuple(weight.shape)})")
    if bias is not None:
        _check_float("bias", bias, (2,))
        if tuple(bias.shape) != (P, n):
            raise ValueError(f"bias must have shape [{P}, {n}], got {tuple(bias.shape)}")
    if index is not None:
        return _check_index("index", index, P, e.shape[0])
    return None


def hyper_matmul(
    e: Tensor, weight: Tensor, bias: Optional[Tensor] = None, index: Optional[Tensor] = None
) -> Tensor:
    """P linear generators (Persona's editors, Eq. 5-6 / 11) applied to embeddings.

    e:      [B, d] floating embeddings.
    weight: [P, d, n] one generator per prototype; bias: None or [P, n].
    index:  None -> every generator on every sample: [P, B, n], out[p, b] = e_b @ W_p + b_p.
            [B] integers in [0, P) -> [B, n], out[b] = e_b @ W[index_b] + bias[index_b].
    Computed in float32 (float64 if any input is float64); returned in e's dtype.
    """
    index = _check_hyper(e, weight, bias, index)
    acc = _acc_of(e, weight, bias)
    return _hyper_matmul_acc(e, weight, bias, index, acc).to(e.dtype)


def _check_heads(e, weight, sizes, bias, index) -> Optional[Tensor]:
    _check_float("e", e, (3,))
    if e.shape[0] < 1:
        raise ValueError(f"e must hold at least one head: [L >= 1, B, d], got shape {tuple(e.shape)}")
    if not isinstance(sizes, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                                                   for n in sizes):
        raise TypeError(f"sizes must be a list of ints >= 0 (one width per head), got {sizes!r}")
    if len(sizes) != e.shape[0]:
        raise ValueError(f"sizes has {len(sizes)} entries but e holds {e.shape[0]} heads")
    _check_float("weight", weight, (3,))
    if sum(sizes) != weight.shape[2]:
        raise ValueError(f"sizes sum to {sum(sizes)} but weight has {weight.shape[2]} columns")
    return _check_hyper(e[0], weight, bias, index)


def hyper_matmul_heads(
    e: Tensor, weight: Tensor, sizes: Sequence[int], bias: Optional[Tensor] = None, index: Optional[Tensor] = None
) -> List[Tensor]:
    """The per-layer heads of one editor: ``hyper_matmul`` of head l on its own embeddings.

    e:      [L, B, d], e[l] feeds head l.
    weight: [P, d, sum(sizes)], the L heads' generators concatenated along n (head l owns
            columns [sum(sizes[:l]), sum(sizes[:l+1]))); bias None or [P, sum(sizes)].
    index:  as hyper_matmul. Returns L tensors: [B, n_l] with index, [P, B, n_l] without.
    """
    index = _check_heads(e, weight, sizes, bias, index)
    acc = _acc_of(e, weight, bias)
    out, start = [], 0
    for l, n in enumerate(sizes):
        b = None if bias is None else bias[:, start:start + n]
        out.append(_hyper_matmul_acc(e[l], weight[:, :, start:start + n], b, index, acc).to(e.dtype))
        start += n
    return out


def generate_edit(
    e: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
    threshold: Optional[ThresholdLike] = None,
) -> Tensor:
    """``hyper_matmul(e, weight, bias, index)`` then, if threshold is given, the clip
    clamp(G, -T, T) of Persona Eq. 6 (T: number, 0-d or [B] per sample, T >= 0).

    Shapes as hyper_matmul: [P, B, n] without index, [B, n] with it. The clamp runs in
    the accumulation dtype before the single rounding to e's dtype.
    """
    index = _check_hyper(e, weight, bias, index)
    t = None if threshold is None else _check_threshold(threshold, e.shape[0])
    acc = _acc_of(e, weight, bias)
    g = _hyper_matmul_acc(e, weight, bias, index, acc)
    return _clip(g, t, batch_dim=g.dim() - 2).to(e.dtype)


def edit_norms(
    e: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    threshold: Optional[ThresholdLike] = None,
) -> Tensor:
    """[B, P] float64: ||clip(e_b @ W_p + bias_p)||_2, the Frobenius norm of the edit
    every prototype editor p generates for sample b (Persona Eq. 11-12), clipped to
    [-T, T] first if threshold is given (number, 0-d or [B]).

    Everything is computed in float64 and the result stays float64 (the oracle value;
    compare kernels after casting). A NaN anywhere in an edit gives a NaN norm; an
    unclipped +-inf gives +inf.
    """
    _check_hyper(e, weight, bias, None)
    t = None if threshold is None else _check_threshold(threshold, e.shape[0])
    g = _hyper_matmul_acc(e, weight, bias, None, torch.float64)  # [P, B, n]
    g = _clip(g, t, batch_dim=1)
    # not differentiable, as the kernels' (an argmin's input): no graph for a caller to follow
    return g.square().sum(-1).sqrt().transpose(0, 1).contiguous().detach()


def assign_prototypes(
    e: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    threshold: Optional[ThresholdLike] = None,
) -> tuple:
    """Persona's dynamic assignment (Eq. 12): the prototype needing the smallest edit.

    Returns (norms, chosen): norms = edit_norms(...) [B, P] float64; chosen [B] int64 =
    argmin over P of norms with NaN ranked above every number (+inf included), ties
    going to the lowest index; a row whose norms are all NaN gives -1.
    """
    if isinstance(weight, Tensor) and weight.dim() == 3 and weight.shape[0] == 0:
        raise ValueError("weight must hold at least one prototype editor (P >= 1)")
    norms = edit_norms(e, weight, bias, threshold)
    return norms, _argmin_nan_last(norms)


def _argmin_nan_last(values: Tensor) -> Tensor:
    """Row-wise argmin of a [B, P >= 1] tensor: NaN ranks last (after +inf), ties ->
    lowest index, all-NaN row -> -1."""
    best = values.masked_fill(torch.isnan(values), float("inf")).amin(1, keepdim=True)
    hit = values == best  # NaN never compares equal, so only real values can be hits
    first = hit.to(torch.int8).argmax(1)  # first True (argmax returns the first maximum)
    return torch.where(hit.any(1), first, torch.full_like(first, -1))


# --------------------------------------------------------------------------------------
# Nearest prototype search and k-means (Persona Eq. 9 clustering, device assignment)
# --------------------------------------------------------------------------------------


def _unit_rows(v: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (computed in float64, rounded once to v's dtype); all-zero
    rows stay zero; NaN rows stay NaN."""
    n = v.to(torch.float64).norm(dim=1, keepdim=True)
    return torch.where(n == 0, torch.zeros_like(v), (v.to(torch.float64) / n).to(v.dtype))


def _pairwise_scores(x: Tensor, p: Tensor, metric: str) -> Tensor:
    """[B, N] float64 scores: squared L2 by direct difference, inner product, or cosine."""
    x, p = x.to(torch.float64), p.to(torch.float64)
    if metric == "cosine":
        x, p = _unit_rows(x), _unit_rows(p)
    out = x.new_empty(x.shape[0], p.shape[0])
    step = max(1, (1 << 22) // max(1, p.shape[0] * p.shape[1]))  # bound the [b, N, d] temp
    for i in range(0, x.shape[0], step):
        xb = x[i:i + step, None, :]
        out[i:i + step] = ((xb - p).square() if metric == "l2" else xb * p).sum(-1)
    return out


def nearest_prototype(x: Tensor, prototypes: Tensor, k: int = 1, metric: str = "l2") -> tuple:
    """The k best prototypes for every query row: (distances [B, k], indices [B, k] int64).

    x: [B, d] and prototypes: [N, d], floating (any float dtypes; scored in float64).
    metric:
      "l2"     squared Euclidean distance sum_j (x_j - p_j)^2 by direct difference (never
               the ||x||^2 - 2x.p + ||p||^2 expansion), so never negative; ascending
               (FAISS IndexFlatL2 convention).
      "ip"     inner product x.p, descending.
      "cosine" x.p / (||x|| ||p||), descending; a zero vector has similarity 0 to all.
    Ties go to the lowest prototype index (stable sort).
    NaN rules: a query row containing NaN gets NaN distances and index -1 in every slot;
    a prototype containing NaN is never chosen, nor is any pair whose score is NaN (e.g.
    from inf - inf); if fewer than k prototypes are eligible the remaining slots get index
    -1 and distance +inf ("l2") or -inf ("ip", "cosine").
    distances are rounded once to x's dtype. Empty x gives [0, k] results.
    Errors: non-float dtypes (TypeError); non-2-D inputs, d mismatch, k < 1, k > N, unknown
    metric (ValueError).
    """
    _check_float("x", x, (2,))
    _check_float("prototypes", prototypes, (2,))
    _check_metric(metric)
    if x.shape[1] != prototypes.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but prototypes have {prototypes.shape[1]}")
    n = prototypes.shape[0]
    k = _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"k must be <= the number of prototypes ({n}), got {k}")
    scores = _pairwise_scores(x, prototypes, metric)
    bad = torch.isnan(scores)
    key = (scores if metric == "l2" else -scores).masked_fill(bad, float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices  # by score, ties by index
    # then move ineligible (NaN) pairs behind all eligible ones, keeping that order
    order = order.gather(1, torch.sort(bad.gather(1, order).to(torch.int8), dim=1,
                                       stable=True).indices)
    top = order[:, :k]
    invalid = bad.gather(1, top)
    fill = float("inf") if metric == "l2" else float("-inf")
    dist = scores.gather(1, top).masked_fill(invalid, fill)
    idx = top.masked_fill(invalid, -1)
    nan_query = torch.isnan(x).any(1, keepdim=True)
    dist = dist.masked_fill(nan_query, float("nan"))
    idx = idx.masked_fill(nan_query, -1)
    return dist.to(x.dtype).detach(), idx  # not differentiable, as the kernels' search


def _kmeans_assign(x: Tensor, centroids: Tensor, metric: str, search=None) -> tuple:
    """(labels [B] int64, loss [B] float64 >= 0): l2 -> ||x - c||^2, ip -> ||x|| - x.c,
    cosine -> 1 - cos(x, c), each against the chosen centroid. ``search`` replaces
    nearest_prototype (the kernels' k-means passes its own)."""
    score, idx = (search or nearest_prototype)(x, centroids, 1, metric)
    s = score[:, 0].to(torch.float64)
    if metric == "ip":
        s = x.to(torch.float64).norm(dim=1) - s
    elif metric == "cosine":
        s = 1.0 - s
    return idx[:, 0], s.clamp_min(0.0)


def kmeans(
    x: Tensor,
    n_clusters: int,
    n_iter: int = 25,
    init: str = "k-means++",
    seed: int = 0,
    metric: str = "l2",
    tol: float = 1e-4,
) -> tuple:
    """Lloyd's k-means (Persona Eq. 9: Cluster{G}): (centroids [K, d] in x's dtype,
    labels [B] int64, inertia float).

    x: [B, d] finite floating points, 1 <= n_clusters <= B, n_iter >= 0 update rounds.
    init: "k-means++" (first centre uniform, then D^2 sampling: probability proportional
    to each point's loss to its nearest chosen centre, uniform over unchosen points if all
    losses are 0) or "random" (n_clusters distinct points). All randomness comes from
    torch.Generator().manual_seed(seed), so results are deterministic given the seed.
    Assignment: nearest_prototype(x, centroids, 1, metric). Update (index_add_):
      "l2":     centroid = mean of its points; loss = ||x - c||^2.
      "ip":     spherical: centroid = unit-normalised sum of its points; loss = ||x|| - x.c.
      "cosine": spherical on unit-normalised points; loss = 1 - cos(x, c).
    A spherical centroid whose sum is the zero vector keeps its previous value. An empty
    cluster is re-seeded with the point farthest from its centroid (largest loss in the
    previous assignment; several empty clusters take the next-farthest points in cluster
    order, ties to the lowest point index). inertia = sum of losses (never increases in
    exact arithmetic). Stops early when |old - new| / old < tol (never when tol == 0).
    The returned labels and inertia are for the returned (dtype-rounded) centroids, so
    ``kmeans_predict(x, centroids, metric)`` equals labels.
    """
    _check_float("x", x, (2,))
    _check_metric(metric)
    n_clusters, n_iter, seed = _check_kmeans_args(x, n_clusters, n_iter, init, seed, tol, metric)
    return lloyd(x, n_clusters, n_iter, init, seed, metric, tol, _kmeans_assign)


def _check_kmeans_args(x: Tensor, n_clusters, n_iter, init, seed, tol, metric) -> tuple:
    """Validated (n_clusters, n_iter, seed) for a k-means fit of x [B, d]."""
    B = x.shape[0]
    n_clusters = _check_int("n_clusters", n_clusters, 1)
    if n_clusters > B:
        raise ValueError(f"n_clusters must be <= the number of points ({B}), got {n_clusters}")
    n_iter = _check_int("n_iter", n_iter, 0)
    seed = _check_int("seed", seed, 0)
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    # min and max are finite exactly when every entry is (NaN propagates): one pass, no mask
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise ValueError("x must be finite (no NaN or inf)")
    if x.dtype != torch.float64 and x.numel():
        _check_float32_range(x.to(torch.float64), metric)
    return n_clusters, n_iter, seed


def _check_float32_range(x: Tensor, metric: str) -> None:
    """Below float64 the fit runs in float32. Bounds on what it computes: a cluster's sum of
    points, B * max|x|; an inner product with a unit centroid, ||x|| <= sqrt(d) * max|x|; a
    squared distance between points or their means, the squared diagonal of x's bounding box.
    Refused when one could reach 2^127."""
    B, d = x.shape
    top = float(x.abs().max())
    diagonal2 = float(((x.max(0).values - x.min(0).values) ** 2).sum())
    fix = "; pass x as float64 or rescale it"
    if metric in ("l2", "ip") and top * B >= 2.0 ** 127:
        raise ValueError(f"x holds magnitudes up to {top:.3g}: the sum of its {B} points could overflow float32{fix}")
    if metric == "ip" and top * d ** 0.5 >= 2.0 ** 127:
        raise ValueError(f"x holds magnitudes up to {top:.3g}: ip k-means would overflow its float32 inner products{fix}")
    if metric == "l2" and diagonal2 >= 2.0 ** 127:
        raise ValueError(f"x spans {diagonal2 ** 0.5:.3g} (its bounding box's diagonal): l2 k-means would overflow "
                         f"its float32 squared distances{fix}")


def lloyd(x: Tensor, n_clusters: int, n_iter: int, init: str, seed: int, metric: str, tol: float,
          assign, on_iteration=None) -> tuple:
    """The k-means algorithm of :func:`kmeans` on validated arguments, with the assignment
    step given: ``assign(points, centroids, metric) -> (labels, loss float64 >= 0)``. The
    production k-means (pyeditor.lloyd) is written separately and tested against this one;
    ``on_iteration(i, inertia)`` is called after each update round."""
    B = x.shape[0]
    acc = _acc_dtype(x.dtype)
    xs = x.to(acc).contiguous()
    pts = _unit_rows(xs) if metric == "cosine" else xs  # what the update averages / sums

    def as_centroid(v: Tensor) -> Tensor:
        return v if metric == "l2" else _unit_rows(v)

    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        chosen = torch.randperm(B, generator=gen)[:n_clusters].tolist()
    else:
        chosen = [int(torch.randint(B, (1,), generator=gen))]
        best = assign(xs, as_centroid(pts[chosen]), metric)[1]
        for _ in range(1, n_clusters):
            w = best.clone()
            w[chosen] = 0.0
            if not bool(w.sum() > 0):  # every remaining point sits on a chosen centre
                w = torch.ones_like(w)
                w[chosen] = 0.0
            # the CPU generator draws on CPU: the same choice for CPU and CUDA inputs
            nxt = int(torch.multinomial(w.cpu(), 1, generator=gen))
            chosen.append(nxt)
            loss = assign(xs, as_centroid(pts[[nxt]]), metric)[1]
            best = torch.minimum(best, loss)
    c = as_centroid(pts[chosen])

    labels, loss = assign(xs, c, metric)
    inertia = float(loss.sum())
    for it in range(n_iter):
        sums = torch.zeros_like(c).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=n_clusters).to(acc)
        if metric == "l2":
            new = sums / counts.clamp_min(1.0).unsqueeze(1)
        else:
            norm = sums.to(torch.float64).norm(dim=1, keepdim=True)
            new = torch.where(norm == 0, c, (sums.to(torch.float64) / norm).to(acc))
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = torch.sort(loss, descending=True, stable=True).indices[: empty.numel()]
            new[empty] = as_centroid(pts[far])
        c = new
        labels, loss = assign(xs, c, metric)
        prev, inertia = inertia, float(loss.sum())
        if on_iteration is not None:
            on_iteration(it + 1, inertia)
        change = abs(prev - inertia) / prev if prev > 0 else 0.0
        if change < tol:
            break
    centroids = c.to(x.dtype)
    if centroids.dtype != acc:  # rounding moved the centroids: label and score what is returned
        labels, loss = assign(xs, centroids.to(acc), metric)
    return centroids, labels, float(loss.sum())


def kmeans_predict(x: Tensor, centroids: Tensor, metric: str = "l2") -> Tensor:
    """[B] int64: index of the nearest centroid, ``nearest_prototype(x, centroids, 1,
    metric)`` (ties -> lowest index; a NaN row -> -1)."""
    return nearest_prototype(x, centroids, 1, metric)[1][:, 0]


# --------------------------------------------------------------------------------------
# CHORD: channel-wise mixed-precision quantization (Eq. 3) and strategy codes (Eq. 12-13)
# --------------------------------------------------------------------------------------


def _check_bits(name: str, bits: object, length: Optional[int] = None) -> Tensor:
    """Bit widths as int64 [C], each in {2, 4, 6, 8}. A Python int is broadcast to length."""
    if isinstance(bits, int) and not isinstance(bits, bool) and length is not None:
        return _check_bits(name, torch.full((length,), bits), length)
    if not isinstance(bits, Tensor) or bits.dtype == torch.bool or bits.is_complex():
        raise TypeError(f"{name} must be an integer (or integral float) tensor, got {bits!r:.60}")
    one_per_channel = bits.dim() == 1 and length in (None, bits.shape[0])
    if not one_per_channel:
        raise ValueError(f"{name} must have shape {'1-D' if length is None else [length]} (one width per channel), "
                         f"got {tuple(bits.shape)}")
    outside = [v for v in bits.tolist() if v not in _BIT_WIDTHS]
    if outside:
        raise ValueError(f"{name} must be in {{2, 4, 6, 8}}, got {outside[0]}")
    return bits.to(torch.int64)


def check_group_size(group_size: object) -> Optional[int]:
    """None (per channel) or one of GROUP_SIZES; anything else raises naming group_size."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be None or an int in {GROUP_SIZES}, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be None (per channel) or one of {GROUP_SIZES}, got {group_size}")
    return group_size


def _group_of_column(in_features: int, group_size: Optional[int]) -> Tensor:
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.int64)
    return torch.arange(in_features) // group_size


def quantize_channelwise(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None) -> QuantizedWeight:
    """Asymmetric min-max quantization per output channel (CHORD Eq. 3, with the uniform
    affine scheme of its "Quant" baseline [Krishnamoorthi 2018]), or per group of
    ``group_size`` consecutive inputs of each channel (the last group ragged).

    weight: [out, in] finite floating (NaN/inf -> ValueError); quantized from its float32
            value. bits: int or [out] integers in {2, 4, 6, 8}.
    For each channel o (or group) with q_max = 2**bits[o] - 1, lo = min(min_i w, 0),
    hi = max(max_i w, 0) over the channel's (group's) inputs (the range always holds 0, so
    zero is exactly representable):
        scale = float32((hi - lo) / q_max)   (at least the smallest normal float32)
        zero  = clamp(round(-lo / scale), 0, q_max)                      (integer)
        reach = floor(float32_max / scale)
        codes = clamp(round(w / scale) + zero, max(0, zero - reach), min(q_max, zero + reach))
    evaluated in float64 with the stored float32 scale; round = half to even. Every
    element then dequantizes to within scale / 2 of its float32 value (up to rounding of
    scale itself), except that no code dequantizes past the float32 maximum: reach only
    binds for scales above float32_max / q_max (|w| near 3e38), where an element near
    +-float32_max may be off by up to one scale instead of dequantizing to +-inf. Constant channels or groups (max == min == c, or in == 0 with c = 0) are
    exact: scale = |c| (1 if c == 0), zero = 1 if c < 0 else 0, codes = zero + sign(c).
    A range whose float32 scale would overflow (|w| near the float32 maximum) is refused.
    """
    _check_float("weight", weight, (2,))
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (no NaN or inf)")
    group_size = check_group_size(group_size)
    n_out, n_in = weight.shape
    b = _check_bits("bits", bits, n_out)
    w = weight.to(torch.float32).to(torch.float64)  # float32 values, float64 arithmetic
    q_max = ((2.0 ** b.to(torch.float64)) - 1.0)[:, None]
    groups = n_groups(n_in, group_size)
    gid = _group_of_column(n_in, group_size)
    if n_in:
        index = gid.expand(n_out, n_in)
        init = torch.zeros(n_out, groups, dtype=torch.float64)
        wmin = init.scatter_reduce(1, index, w, "amin", include_self=False)
        wmax = init.scatter_reduce(1, index, w, "amax", include_self=False)
    else:
        wmin = wmax = torch.zeros(n_out, groups, dtype=torch.float64)
    lo, hi = wmin.clamp_max(0.0), wmax.clamp_min(0.0)
    tiny = torch.finfo(torch.float32).tiny
    scale = ((hi - lo) / q_max).to(torch.float32).clamp_min(tiny)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight's range per channel (or group) must fit float32 (max - min overflows)")
    s = scale.to(torch.float64)
    zero = torch.round(-lo / s).clamp(min=0.0).minimum(q_max)
    # near the float32 maximum the rounded zero can put an end code past it: (code - zero) * scale
    # would dequantize to inf, so codes stop at the last one that stays finite
    reach = torch.floor(torch.finfo(torch.float32).max / s)
    c_lo, c_hi = (zero - reach).clamp(min=0.0), (zero + reach).minimum(q_max)
    codes = (torch.round(w / s[:, gid]) + zero[:, gid]).maximum(c_lo[:, gid]).minimum(c_hi[:, gid])
    # constant channels / groups: exact by construction
    const = wmax == wmin
    c = wmin
    c_zero = (c < 0).to(torch.float64)
    scale = torch.where(const, torch.where(c == 0, 1.0, c.abs()).to(torch.float32), scale)
    zero = torch.where(const, c_zero, zero)
    codes = torch.where(const[:, gid], (c_zero + torch.sign(c))[:, gid], codes)
    zero = zero.to(torch.int32)
    if group_size is None:
        scale, zero = scale[:, 0].contiguous(), zero[:, 0].contiguous()
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, b, group_size)


def dequantize(qw: QuantizedWeight) -> Tensor:
    """float32 [out, in]: (codes - zero) * scale, per channel or per group, one float32
    multiply per element (codes - zero is an exact small integer)."""
    codes, scale, zero, bits = qw[:4]
    group_size = check_group_size(qw[4] if len(qw) > 4 else None)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError("qw.codes must be a 2-D uint8 tensor")
    n_out, n_in = codes.shape
    b = _check_bits("qw.bits", bits, n_out)
    shape = (n_out,) if group_size is None else (n_out, n_groups(n_in, group_size))
    for name, t in (("qw.scale", scale), ("qw.zero", zero)):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a tensor of shape {list(shape)}")
    q_max = (1 << b) - 1
    if codes.numel() and bool((codes.to(torch.int64) > q_max[:, None]).any()):
        raise ValueError("qw.codes exceed 2**bits - 1 for their channel")
    gid = _group_of_column(n_in, group_size)
    groups = n_groups(n_in, group_size)
    z = zero.to(torch.float32).reshape(n_out, groups)[:, gid]
    s = scale.to(torch.float32).reshape(n_out, groups)[:, gid]
    return (codes.to(torch.float32) - z) * s


def packed_linear(x: Tensor, packed: object, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` with W = packed.dequantize() (float32 [out, in]).

    x: [..., in] floating; packed: a QuantizedWeight or anything with a dequantize()
    method returning [out, in]; bias: None or [out]. Computed in float32 (float64 for
    float64 x) and returned in x's dtype, shape [..., out].
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in]")
    if not callable(getattr(packed, "dequantize", None)) or isinstance(packed, Tensor):
        raise TypeError(f"packed must have a dequantize() method, got {type(packed).__name__}")
    # a QuantizedWeight dequantizes here, in the oracle; anything else by its own method
    w = _check_float("packed.dequantize()", dequantize(packed) if isinstance(packed, QuantizedWeight)
                     else packed.dequantize(), (2,))
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} input features but the packed weight has "
                         f"{w.shape[1]} (shape {tuple(w.shape)})")
    acc = _acc_dtype(x.dtype)
    y = x.to(acc) @ w.to(acc).T
    if bias is not None:
        _check_float("bias", bias, (1,))
        if bias.shape[0] != w.shape[0]:
            raise ValueError(f"bias must have shape [{w.shape[0]}], got {tuple(bias.shape)}")
        y = y + bias.to(acc)
    return y.to(x.dtype)


def encode_strategy(bits: Tensor) -> Tensor:
    """CHORD's 2-bit-per-channel strategy code (Sec. 3.2, Eq. 12).

    bits: [C] in {2, 4, 6, 8} (integer tensor, or float with exactly those values).
    Returns uint8 [ceil(C / 4)]: code = bits / 2 - 1 (2->0, 4->1, 6->2, 8->3); channel i
    lives in byte i // 4 at bit offset 2 * (i % 4), least significant bits first; padding
    bits of the last byte are zero. C == 0 gives an empty tensor.
    """
    b = _check_bits("bits", bits)
    codes = b // 2 - 1
    n_bytes = (codes.shape[0] + 3) // 4
    codes = torch.cat([codes, codes.new_zeros(4 * n_bytes - codes.shape[0])]).view(n_bytes, 4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int64)
    return (codes << shifts).sum(1).to(torch.uint8)


def decode_strategy(codes: Tensor, n_channels: int) -> Tensor:
    """Inverse of encode_strategy: int64 bits [n_channels] in {2, 4, 6, 8}.

    codes must be uint8 of shape [ceil(n_channels / 4)] with zero padding bits
    (ValueError otherwise).
    """
    n = _check_int("n_channels", n_channels, 0)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 tensor, got {got}")
    if codes.dim() != 1 or codes.shape[0] != (n + 3) // 4:
        raise ValueError(f"codes must have shape [{(n + 3) // 4}] for {n} channels, "
                         f"got {tuple(codes.shape)}")
    shifts = torch.arange(0, 8, 2, dtype=torch.int64)
    fields = ((codes.to(torch.int64)[:, None] >> shifts) & 3).flatten()
    if bool((fields[n:] != 0).any()):
        raise ValueError("codes has non-zero padding bits after the last channel")
    return 2 * (fields[:n] + 1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the discrete bits. Backward: identity to the sensitivity and, summed over the
    layer's channels, to the layer's importance minus the mean importance."""

    @staticmethod
    def forward(ctx, sensitivity: Tensor, shift: Optional[Tensor], bits: Tensor) -> Tensor:  # type: ignore[override]
        ctx.has_shift = shift is not None
        return bits.to(sensitivity.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, (grad.sum(-1, keepdim=True) if ctx.has_shift else None), None


def _check_widths(widths: object) -> tuple:
    if not isinstance(widths, (tuple, list)) or len(widths) != 4 or any(
            isinstance(w, bool) or not isinstance(w, int) for w in widths):
        raise TypeError(f"widths must be four ints (the bit widths codes 0-3 name), got {widths!r}")
    if not all(1 <= w <= 8 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"widths must be strictly increasing and in [1, 8], got {tuple(widths)}")
    return tuple(widths)


def _allocate_user(sens: List[list], beta: float, lam: Optional[list], budget, widths: tuple) -> List[list]:
    """One user's ladder levels per layer (0..3), by the rules of allocate_bits, in plain Python."""
    levels, frac = [], []
    for s in sens:
        c = len(s)
        ranked = sorted(range(c), key=lambda i: (-s[i], i))
        n8, n84 = math.floor(beta * c + 0.5), math.floor(2 * beta * c + 0.5)
        lv, fr = [0] * c, [Fraction(0)] * c
        for r, i in enumerate(ranked):
            lv[i] = 3 if r < n8 else (1 if r < n84 else 0)
            fr[i] = Fraction(r, c)
        levels.append(lv)
        frac.append(fr)
    gamma_total = sum(widths[v] for lv in levels for v in lv)
    imp = [Fraction(0)] * len(sens)
    if lam is not None:
        imp = [Fraction(v) for v in lam]
        mean = sum(imp) / len(imp)
        for layer, lv in enumerate(levels):
            step = (imp[layer] > mean) - (imp[layer] < mean)
            levels[layer] = [min(3, max(0, v + step)) for v in lv]
    n = sum(len(lv) for lv in levels)
    if budget is not None:
        target = math.floor(Fraction(budget) * n)
        steps = {b - a for a, b in zip(widths, widths[1:])}
        if len(steps) == 1:
            target -= (target - widths[0] * n) % steps.pop()
    elif lam is not None:
        target = gamma_total
    else:
        return levels
    order = sorted(((layer, i) for layer, lv in enumerate(levels) for i in range(len(lv))),
                   key=lambda t: (frac[t[0]][t[1]], -imp[t[0]], t[0], t[1]))
    left = target - sum(widths[v] for lv in levels for v in lv)
    if left > 0:
        for layer, i in order:
            cur = levels[layer][i]
            new = max(j for j in range(cur, 4) if widths[j] - widths[cur] <= left)
            left -= widths[new] - widths[cur]
            levels[layer][i] = new
    elif left < 0:
        left = -left
        for layer, i in reversed(order):
            cur = levels[layer][i]
            new = min(j for j in range(cur + 1) if widths[cur] - widths[j] <= left)
            left -= widths[cur] - widths[new]
            levels[layer][i] = new
        if left > 0:  # uneven ladder: one more rung down, least important channel that can go
            layer, i = next((layer, i) for layer, i in reversed(order) if levels[layer][i] > 0)
            levels[layer][i] -= 1
    return levels


def allocate_bits(
    sensitivity: Union[Tensor, Sequence[Tensor]],
    beta: float,
    layer_importance: Optional[Tensor] = None,
    straight_through: bool = False,
    budget: Optional[float] = None,
    widths: Sequence[int] = (2, 4, 6, 8),
) -> Union[Tensor, List[Tensor]]:
    """CHORD's strategy functions Gamma (Eq. 12) and Lambda (Eq. 13) with an average-bits budget,
    one user at a time in plain Python (the rules are pyeditor.allocate_bits's, stated there).

    sensitivity: [C] or [B, C] floating (no NaN), or a list of them, one per layer (same B).
    beta in [0, 0.5]; layer_importance: None, [L] or [B, L] finite floating; budget: None or a
    number in [widths[0], widths[3]] (average bits per channel); widths: the four-rung ladder.
    Gamma: per layer the first floor(beta*C + 1/2) channels by descending sensitivity (ties: lower
    index) get widths[3], the next floor(2*beta*C + 1/2) minus those widths[1], the rest widths[0].
    Lambda: every layer whose importance is above the mean goes one rung up, below it one down.
    Budget (or, without one but with layer_importance, Gamma's own total): target floor(budget*N)
    bits, lowered to the ladder's grid when its steps are even; bits added from the most important
    channel (rank / C in its layer asc, layer importance desc, layer, channel), each as high as fits, or
    removed from the least important, each as low as fits (one rung more if still over).
    Returns int64 bits in sensitivity's structure, or with straight_through=True bits in its
    dtype whose gradient is 1 to each channel's sensitivity and, summed over the layer's channels,
    1 - 1/L to its own importance and -1/L to every other layer's.
    """
    single = isinstance(sensitivity, Tensor)
    layers = [sensitivity] if single else list(sensitivity)  # type: ignore[arg-type]
    if not layers:
        raise ValueError("sensitivity must hold at least one layer")
    for i, s in enumerate(layers):
        name = "sensitivity" if single else f"sensitivity[{i}]"
        _check_float(name, s, (1, 2))
        if bool(torch.isnan(s).any()):
            raise ValueError(f"{name} must not contain NaN")
        if s.shape[:-1] != layers[0].shape[:-1]:
            raise ValueError(f"{name} has batch shape {tuple(s.shape[:-1])} but sensitivity[0] has "
                             f"{tuple(layers[0].shape[:-1])}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5], got {beta!r}")
    widths = _check_widths(widths)
    lead, n_layers = tuple(layers[0].shape[:-1]), len(layers)
    rows = lead[0] if lead else 1
    lam_rows = None
    if layer_importance is not None:
        _check_float("layer_importance", layer_importance, (1, 2))
        if tuple(layer_importance.shape) not in ((n_layers,), lead + (n_layers,)):
            raise ValueError(f"layer_importance must have shape [{n_layers}] (one per layer), "
                             f"got {tuple(layer_importance.shape)}")
        if bool(torch.isnan(layer_importance).any()):
            raise ValueError("layer_importance must not contain NaN")
        if not bool(torch.isfinite(layer_importance).all()):
            raise ValueError("layer_importance must be finite")
        lam_rows = layer_importance.detach().expand(rows, n_layers).tolist()
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be a number (average bits per channel), got {type(budget).__name__}")
        if not math.isfinite(budget) or not widths[0] <= budget <= widths[3]:
            raise ValueError(f"budget must be in [{widths[0]}, {widths[3]}], got {budget}")
    sens_rows = [s.detach().reshape(rows, s.shape[-1]).tolist() for s in layers]
    per_user = [_allocate_user([s[r] for s in sens_rows], float(beta), None if lam_rows is None else lam_rows[r],
                               budget, widths) for r in range(rows)]
    bits = [torch.tensor([[widths[v] for v in per_user[r][layer]] for r in range(rows)],
                         dtype=torch.int64).reshape(s.shape).to(s.device) for layer, s in enumerate(layers)]
    if straight_through:
        lam = layer_importance
        centred = None if lam is None else lam - lam.mean(-1, keepdim=True)
        bits = [_StraightThrough.apply(s, None if centred is None else centred[..., i:i + 1].expand(*lead, 1), b)
                for i, (s, b) in enumerate(zip(layers, bits))]
    return bits[0] if single else bits


def fake_quantize(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None) -> Tensor:
    """float32 [..., out, in]: weight min-max quantized at bits[..., o] (whole numbers 1..8) per
    output channel (per group of group_size inputs) and dequantized, channel by channel and group
    by group, with quantize_channelwise's formulas; for 2/4/6/8 it equals
    dequantize(quantize_channelwise(weight, bits, group_size)). Values only (the training
    gradients are pyeditor.fake_quantize's)."""
    _check_float("weight", weight, (2,))
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (no NaN or inf)")
    group_size = check_group_size(group_size)
    n_out, n_in = weight.shape
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = torch.full((n_out,), bits)
    if not isinstance(bits, Tensor) or bits.dim() < 1 or bits.shape[-1] != n_out:
        raise ValueError(f"bits must be an int or a [..., {n_out}] tensor")
    b = bits.detach().cpu().reshape(-1, n_out).tolist()
    if any(v != int(v) or not 1 <= v <= 8 for row in b for v in row):
        raise ValueError("bits must be whole numbers in [1, 8]")
    w = weight.detach().cpu().to(torch.float32)
    out = torch.empty(len(b), n_out, n_in, dtype=torch.float32)
    gs = group_size or max(n_in, 1)
    f32 = torch.finfo(torch.float32)
    for r, row in enumerate(b):
        for o, width in enumerate(row):
            q_max = 2.0 ** int(width) - 1.0
            for g0 in range(0, n_in, gs):
                vals = w[o, g0:g0 + gs].to(torch.float64)
                mn, mx = float(vals.min()), float(vals.max())
                if mn == mx:
                    out[r, o, g0:g0 + gs] = w[o, g0:g0 + gs]
                    continue
                lo, hi = min(mn, 0.0), max(mx, 0.0)
                scale = max(torch.tensor((hi - lo) / q_max, dtype=torch.float64).to(torch.float32).item(), f32.tiny)
                if not math.isfinite(scale):
                    raise ValueError("weight's range per channel (or group) must fit float32")
                zero = min(max(round(-lo / scale), 0), q_max)
                reach = math.floor(f32.max / scale)
                codes = (torch.round(vals / scale) + zero).clamp(max(0.0, zero - reach), min(q_max, zero + reach))
                out[r, o, g0:g0 + gs] = ((codes - zero) * scale).to(torch.float32)
    return out.reshape(*bits.shape, n_in).to(weight.device)


def read_probe(data: Tensor, streams: int = 4) -> Tensor:
    """The benchmarks' read probe: the largest int32 word of data's bytes (the order of reading,
    `streams`, does not change it)."""
    return data.reshape(-1).view(torch.uint8).view(torch.int32).amax()


def copy_probe(src: Tensor, dst: Tensor, streams: int = 4) -> None:
    """The benchmarks' copy probe: dst's bytes become src's."""
    dst.reshape(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8))


def fma_probe(x: Tensor, a: float, b: float, rounds: int) -> Tensor:
    """The benchmarks' compute probe: x (float32) after `rounds` steps of v = fma(v, a, b), one
    rounding per step, with a and b rounded to float32. The float64 steps are exact fused
    multiply-adds when v * a + b is exact in float64 (a a power of two, say), as the tests pick."""
    a32 = float(torch.tensor(a, dtype=torch.float32))
    b32 = float(torch.tensor(b, dtype=torch.float32))
    v = x.to(torch.float32)
    for _ in range(rounds):
        v = (v.double() * a32 + b32).to(torch.float32)
    return v.clone()


# --------------------------------------------------------------------------------------
# Persona Eq. 11-12 over every edited layer at once
# --------------------------------------------------------------------------------------



def _layers_of(weights: object, biases: object, sizes: object) -> tuple:
    """(L generators [P, d, n_l], L biases None / [P, n_l]) from a list of layers, or from one
    [P, d, sum(sizes)] tensor split by ``sizes`` (ParameterEditor's concatenated heads)."""
    if isinstance(weights, Tensor):
        if sizes is None:
            raise ValueError("sizes is required with a concatenated weights tensor")
        sizes = [int(n) for n in sizes]
        _check_float("weights", weights, (3,))
        if not sizes or sum(sizes) != weights.shape[2] or min(sizes) < 0:
            raise ValueError(f"sizes {sizes} must be >= 0 and sum to weights' {weights.shape[2]} columns")
        ws = list(weights.split(sizes, dim=2))
        if biases is None:
            return ws, [None] * len(ws)
        _check_float("biases", biases, (2,))
        if biases.shape[1] != weights.shape[2]:
            raise ValueError(f"biases must be [P, {weights.shape[2]}], got {tuple(biases.shape)}")
        return ws, list(biases.split(sizes, dim=1))
    if sizes is not None:
        raise ValueError("sizes goes with a concatenated weights tensor, not a list of layers")
    ws = list(weights)
    if not ws:
        raise ValueError("weights must hold at least one layer")
    bs = [None] * len(ws) if biases is None else list(biases)
    if len(bs) != len(ws):
        raise ValueError(f"biases has {len(bs)} entries but weights has {len(ws)} layers")
    return ws, bs


def edit_norms_layers(
    e: Tensor,
    weights: Union[Tensor, Sequence[Tensor]],
    biases: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
    threshold: Optional[ThresholdLike] = None,
    rule: Union[str, Sequence[float]] = "sumsq",
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """[B, P] float64: the size of the whole edit prototype p's editors generate for sample b,
    over every edited layer (Persona Eq. 11-12 with the layers' edits G_l = clip(e_l W_l + b_l)).

    e:         [B, d] shared by every layer, or [L, B, d] (layer l reads e[l]).
    weights:   a list of L generators [P, d, n_l], or one [P, d, sum(sizes)] tensor with
               ``sizes`` = [n_0, ..., n_{L-1}] (ParameterEditor's concatenated heads).
    biases:    None; a list of L (None or [P, n_l]) with a list of weights; [P, sum(sizes)] with
               a concatenated weights tensor.
    threshold: None (unclipped) or T (number, 0-d or [B]) clipping every layer's edit.
    rule:      "sumsq": sqrt(sum_l ||G_l||^2), the Frobenius norm of the whole edit;
               "sum":   sum_l ||G_l||;   "max": max_l ||G_l||;
               L numbers lambda_l >= 0 (not all 0): sqrt(sum_l lambda_l ||G_l||^2); a layer with
               lambda_l = 0 is left out.
    Every rule is a norm of the per-layer norms, so the values scale with the edits. Each layer's
    norm is :func:`edit_norms` (float64, NaN propagates, unclipped inf gives inf).
    """
    ws, bs = _layers_of(weights, biases, sizes)
    L = len(ws)
    _check_float("e", e, (2, 3))
    if e.dim() == 3 and e.shape[0] != L:
        raise ValueError(f"e holds {e.shape[0]} layer embeddings but weights has {L} layers")
    if isinstance(rule, str):
        if rule not in LAYER_RULES:
            raise ValueError(f"rule must be one of {LAYER_RULES} or a list of per-layer weights, got {rule!r}")
        lam = None
    else:
        lam = [float(x) for x in rule]
        if len(lam) != L or any(not math.isfinite(x) or x < 0 for x in lam) or not any(lam):
            raise ValueError(f"rule weights must be {L} finite numbers >= 0, not all 0, got {lam}")
    norms = []
    for l in range(L):
        if lam is not None and lam[l] == 0:
            continue
        norms.append(edit_norms(e if e.dim() == 2 else e[l], ws[l], bs[l], threshold))
    per = torch.stack(norms)  # [L used, B, P]
    if rule == "sum":
        return per.sum(0)
    if rule == "max":
        return per.amax(0)
    w = torch.ones(L, dtype=torch.float64) if lam is None else torch.tensor([x for x in lam if x], dtype=torch.float64)
    return (per.square() * w.to(per.device).view(-1, 1, 1)).sum(0).sqrt()


def assign_prototypes_layers(
    e: Tensor,
    weights: Union[Tensor, Sequence[Tensor]],
    biases: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
    threshold: Optional[ThresholdLike] = None,
    rule: Union[str, Sequence[float]] = "sumsq",
    sizes: Optional[Sequence[int]] = None,
) -> tuple:
    """Persona Eq. 12 over every layer: (norms = edit_norms_layers(...) [B, P] float64,
    chosen [B] int64 = the row-wise argmin, NaN last, ties to the lowest index, -1 for an
    all-NaN row), as :func:`assign_prototypes`."""
    norms = edit_norms_layers(e, weights, biases, threshold, rule, sizes)
    return norms, _argmin_nan_last(norms)
