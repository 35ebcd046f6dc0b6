"""Nearest-prototype search and k-means (Persona Eq. 9 clustering and device assignment).

``nearest_prototype`` is exact: it returns the same prototypes as a float64 direct-difference
scan (:func:`pyeditor.reference.nearest_prototype`) even far from the origin, where the
||x||^2 - 2 x.p + ||p||^2 expansion of FAISS and torch.cdist picks wrong ones. The kernels rank
with float32 keys and a proven error bound, recompute the winners in float64, and rescan in
float64 the rare queries whose ranking the bound cannot settle (near-ties, duplicates).
Results are deterministic whatever the thread count; ties go to the lowest index.
NaN rule: a query row with NaN gets NaN distances and index -1; a prototype with NaN is never
chosen; slots no eligible prototype can fill get index -1 and distance +inf (l2) / -inf.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops, reference, validate

METRICS = ("l2", "ip", "cosine")


def _check_search(x, prototypes, k, metric) -> None:
    validate.float_tensor(x, "x")
    validate.float_tensor(prototypes, "prototypes")
    validate.same_device(x, "x", prototypes=prototypes)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, d], got shape {tuple(x.shape)}")
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be 2-D [N, d], got shape {tuple(prototypes.shape)}")
    if x.shape[1] != prototypes.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but prototypes have {prototypes.shape[1]}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    n = prototypes.shape[0]
    if n == 0:
        raise ValueError("prototypes must hold at least one row (N >= 1)")
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")


def nearest_prototype(
    x: Tensor, prototypes: Tensor, k: int = 1, metric: str = "l2", *, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """The k nearest prototypes of every row of x: (distances [B, k] in x's dtype, indices [B, k] int64).

    Semantics, metrics and NaN rules as :func:`pyeditor.reference.nearest_prototype`:
    "l2" squared Euclidean distance ascending, "ip" inner product / "cosine" similarity
    descending. Any strides are accepted. Not differentiable (indices are discrete).
    """
    _check_search(x, prototypes, k, metric)
    name = _resolve(backend, x.device)
    if name == "reference":
        return reference.nearest_prototype(x, prototypes, k, metric)
    if name == "cuda" and k > 32:
        raise NotImplementedError(f"the cuda backend supports k <= 32, got {k}; use backend='cpu' or 'triton'")
    if x.requires_grad or prototypes.requires_grad:
        x, prototypes = x.detach(), prototypes.detach()
    return ops.search_op(name)(x, prototypes, k, metric)


_RESOLVED: dict = {}


def _resolve(backend: Optional[str], device: torch.device) -> str:
    """backends.resolve, memoised on everything it reads (one device is served millions of
    times; resolving costs more than a small search)."""
    if validate.compiling():
        return backends.resolve(backend, device)
    key = (backend, device, os.environ.get(backends.ENV_VAR), os.environ.get("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = backends.resolve(backend, device)
    return name


def kmeans_predict(x: Tensor, centroids: Tensor, metric: str = "l2", *, backend: Optional[str] = None) -> Tensor:
    """[B] int64: index of the nearest centroid (ties -> lowest index; a NaN row -> -1)."""
    return nearest_prototype(x, centroids, 1, metric, backend=backend)[1][:, 0]


class _Progress:
    """One self-overwriting stderr line, only when asked for and stderr is a terminal."""

    def __init__(self, enabled: Optional[bool], total: int):
        self.on = bool(enabled) and (enabled == "always" or sys.stderr.isatty())
        self.total, self.start = total, time.perf_counter()

    def update(self, it: int, inertia: float) -> None:
        if self.on:
            sys.stderr.write(f"\rkmeans {it}/{self.total}  inertia {inertia:.6g}  "
                             f"{time.perf_counter() - self.start:.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def _assign(x: Tensor, c: Tensor, metric: str, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """(labels, loss float64 >= 0) as reference._kmeans_assign, on the chosen backend."""
    score, idx = nearest_prototype(x, c, 1, metric, backend=backend)
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
    *,
    backend: Optional[str] = None,
    progress: Optional[bool] = None,
) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means on the search kernels: (centroids [K, d] in x's dtype, labels [B], inertia).

    Same algorithm, arguments and results as :func:`pyeditor.reference.kmeans` (k-means++ or
    random init from ``seed``, index_add_ centroid updates, spherical for ip / cosine,
    empty clusters re-seeded with the farthest points, early stop at relative change < tol).
    ``progress=True`` prints one updating stderr line per iteration when stderr is a terminal
    (``"always"``: even when it is not); off by default.
    """
    validate.float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, d], got shape {tuple(x.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    B = x.shape[0]
    n_clusters = reference._check_int("n_clusters", n_clusters, 1)
    if n_clusters > B:
        raise ValueError(f"n_clusters must be <= the number of points ({B}), got {n_clusters}")
    n_iter = reference._check_int("n_iter", n_iter, 0)
    seed = reference._check_int("seed", seed, 0)
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (no NaN or inf)")

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc).contiguous()
    pts = reference._unit_rows(xs) if metric == "cosine" else xs
    unit = reference._unit_rows

    def as_centroid(v: Tensor) -> Tensor:
        return v if metric == "l2" else unit(v)

    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        chosen = torch.randperm(B, generator=gen)[:n_clusters].tolist()
    else:
        chosen = [int(torch.randint(B, (1,), generator=gen))]
        best = _assign(xs, as_centroid(pts[chosen]), metric, backend)[1]
        for _ in range(1, n_clusters):
            w = best.clone()
            w[chosen] = 0.0
            if not bool(w.sum() > 0):
                w = torch.ones_like(w)
                w[chosen] = 0.0
            nxt = int(torch.multinomial(w, 1, generator=gen))
            chosen.append(nxt)
            best = torch.minimum(best, _assign(xs, as_centroid(pts[[nxt]]), metric, backend)[1])
    c = as_centroid(pts[chosen])

    bar = _Progress(progress, n_iter)
    labels, loss = _assign(xs, c, metric, backend)
    inertia = float(loss.sum())
    ones = torch.ones(B, dtype=acc, device=x.device)
    for it in range(n_iter):
        sums = torch.zeros_like(c).index_add_(0, labels, pts)
        counts = torch.zeros(n_clusters, dtype=acc, device=x.device).index_add_(0, labels, ones)
        if metric == "l2":
            new = sums / counts.clamp_min(1.0).unsqueeze(1)
        else:
            norm = sums.norm(dim=1, keepdim=True)
            new = torch.where(norm == 0, c, sums / norm)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = torch.sort(loss, descending=True, stable=True).indices[: empty.numel()]
            new[empty] = as_centroid(pts[far])
        c = new
        labels, loss = _assign(xs, c, metric, backend)
        prev, inertia = inertia, float(loss.sum())
        bar.update(it + 1, inertia)
        change = abs(prev - inertia) / prev if prev > 0 else 0.0
        if change < tol:
            break
    bar.close()
    centroids = c.to(x.dtype)
    labels, loss = _assign(xs, centroids.to(acc), metric, backend)
    return centroids, labels, float(loss.sum())
