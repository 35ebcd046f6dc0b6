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

from . import _ext, backends, ops, reference, validate
from .constants import METRICS  # noqa: F401  (pyeditor.search.METRICS, as before)
from .lloyd import lloyd


def nearest_prototype(
    x: Tensor, prototypes: Tensor, k: int = 1, metric: str = "l2", *, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """The k nearest prototypes of every row of x: (distances [B, k] in x's dtype, indices [B, k] int64).

    Semantics, metrics and NaN rules as :func:`pyeditor.reference.nearest_prototype`:
    "l2" squared Euclidean distance ascending, "ip" inner product / "cosine" similarity
    descending. Any strides are accepted. Not differentiable (indices are discrete).
    """
    # eager CPU calls first try the C++ kernel without the dispatcher (csrc/eager_call.cpp; it
    # saves the dispatcher's boxing on one-device calls). It answers None for anything but a valid call on
    # plain CPU tensors outside modes and functorch, which then takes the checked path below.
    if (type(x) is Tensor and type(prototypes) is Tensor
            and (backend == "cpu" or (backend is None and not backends.env_set(backends.ENV_VAR)))
            and not _is_compiling()):
        out = _ext.search_cpu_eager(x, prototypes, k, metric)
        if out is not None:
            return out
    validate.search_inputs(x, prototypes, k, metric)
    name = backends.resolve(backend, x.device) if _is_compiling() else _resolve(backend, x)
    if name == "reference":
        return reference.nearest_prototype(x, prototypes, k, metric)
    if name == "cuda" and k > 32:
        raise NotImplementedError(f"the cuda backend supports k <= 32, got {k}; use backend='cpu' or 'triton'")
    if x.requires_grad or prototypes.requires_grad:
        x, prototypes = x.detach(), prototypes.detach()
    return ops.search_op(name)(x, prototypes, k, metric)


_RESOLVED: dict = {}
_is_compiling = torch.compiler.is_compiling


def _resolve(backend: Optional[str], x: Tensor) -> str:
    """backends.resolve for x's device (eager only), memoised on everything it reads (one device
    is served millions of times; resolving costs more than a small search)."""
    device = "cpu" if x.is_cpu else x.device.type  # x.is_cpu is the cheaper test
    key = (backend, device, backends.env(backends.ENV_VAR), backends.env("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = backends.resolve(backend, x.device)
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
    Points below float64 are fitted in float32, so points whose sums (B * max|x|), ip inner
    products (sqrt(d) * max|x|) or l2 squared distances (x's bounding-box diagonal, squared)
    could reach 2^127 are refused with a ValueError: pass them as float64.
    """
    n_clusters, n_iter, seed = validate.kmeans_args(x, n_clusters, n_iter, init, seed, metric, tol)
    bar = _Progress(progress, n_iter)

    def search(pts, c, k, m):
        return nearest_prototype(pts, c, k, m, backend=backend)

    try:
        return lloyd(x, n_clusters, n_iter, init, seed, metric, tol, search, on_iteration=bar.update)
    finally:
        bar.close()
