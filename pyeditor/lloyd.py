"""The k-means loop of :func:`pyeditor.search.kmeans`, on any nearest-prototype search.

Same algorithm and random draws as the oracle's :func:`pyeditor.reference.kmeans` (which the
tests hold it to): k-means++ or random init from one CPU generator, index_add_ centroid updates,
spherical for ip / cosine, empty clusters re-seeded with the farthest points, early stop at
relative change < tol. Arguments arrive checked (pyeditor.validate.kmeans_args).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def _unit_rows(v: Tensor) -> Tensor:
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n == 0, torch.zeros_like(v), v / n)


def assign(search: Callable, x: Tensor, centroids: Tensor, metric: str) -> tuple:
    """(labels [B] int64, loss [B] float64 >= 0) of x against centroids through ``search``
    (nearest_prototype's signature): l2 ||x - c||^2, ip ||x|| - x.c, cosine 1 - cos(x, c)."""
    score, idx = search(x, centroids, 1, metric)
    s = score[:, 0].to(torch.float64)
    if metric == "ip":
        s = x.to(torch.float64).norm(dim=1) - s
    elif metric == "cosine":
        s = 1.0 - s
    return idx[:, 0], s.clamp_min(0.0)


def _init_centres(xs: Tensor, pts: Tensor, n_clusters: int, init: str, metric: str, gen, assign_to, as_centroid):
    B = xs.shape[0]
    if init == "random":
        return torch.randperm(B, generator=gen)[:n_clusters].tolist()
    chosen = [int(torch.randint(B, (1,), generator=gen))]
    best = assign_to(xs, as_centroid(pts[chosen]), metric)[1]
    for _ in range(1, n_clusters):
        weight = best.clone()
        weight[chosen] = 0.0
        if not bool(weight.sum() > 0):  # every remaining point sits on a chosen centre
            weight = torch.ones_like(weight)
            weight[chosen] = 0.0
        # drawn on the CPU generator: CPU and CUDA inputs choose the same centres
        pick = int(torch.multinomial(weight.cpu(), 1, generator=gen))
        chosen.append(pick)
        best = torch.minimum(best, assign_to(xs, as_centroid(pts[[pick]]), metric)[1])
    return chosen


def lloyd(x: Tensor, n_clusters: int, n_iter: int, init: str, seed: int, metric: str, tol: float,
          search: Callable, on_iteration: Optional[Callable] = None) -> tuple:
    """(centroids [K, d] in x's dtype, labels [B], inertia) with ``search`` for every assignment;
    ``on_iteration(i, inertia)`` after each update round."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc).contiguous()
    pts = _unit_rows(xs) if metric == "cosine" else xs  # what the update averages / sums

    def as_centroid(v: Tensor) -> Tensor:
        return v if metric == "l2" else _unit_rows(v)

    def assign_to(p: Tensor, c: Tensor, m: str) -> tuple:
        return assign(search, p, c, m)

    gen = torch.Generator().manual_seed(seed)
    c = as_centroid(pts[_init_centres(xs, pts, n_clusters, init, metric, gen, assign_to, as_centroid)])
    labels, loss = assign_to(xs, c, metric)
    inertia = float(loss.sum())
    for it in range(n_iter):
        sums = torch.zeros_like(c).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=n_clusters).to(acc)
        if metric == "l2":
            new = sums / counts.clamp_min(1.0).unsqueeze(1)
        else:  # spherical: a zero sum keeps the previous centroid
            norm = sums.norm(dim=1, keepdim=True)
            new = torch.where(norm == 0, c, sums / norm)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            farthest = torch.sort(loss, descending=True, stable=True).indices[: empty.numel()]
            new[empty] = as_centroid(pts[farthest])
        c = new
        labels, loss = assign_to(xs, c, metric)
        prev, inertia = inertia, float(loss.sum())
        if on_iteration is not None:
            on_iteration(it + 1, inertia)
        if (abs(prev - inertia) / prev if prev > 0 else 0.0) < tol:
            break
    centroids = c.to(x.dtype)
    if centroids.dtype != acc:  # rounding moved the centroids: label and score what is returned
        labels, loss = assign_to(xs, centroids.to(acc), metric)
    return centroids, labels, float(loss.sum())
