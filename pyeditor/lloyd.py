"""The k-means loop of :func:`pyeditor.search.kmeans`, on any nearest-prototype search.

The oracle, :func:`pyeditor.reference.kmeans`, is written separately (it imports nothing of the
package) and the tests hold this one to it: same centres from the same seed (k-means++ or
random init, drawn from one CPU generator in the oracle's order), index_add_ centroid updates,
spherical for ip / cosine, empty clusters re-seeded with the farthest points, early stop at
relative change < tol. Arguments arrive checked (pyeditor.validate.kmeans_args).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor


def _normalised(v: Tensor) -> Tensor:
    """Rows scaled to unit length; zero rows stay zero. The length in float64: a float32 row
    near the top of its range would overflow it (and come out zero)."""
    length = v.double().norm(dim=1, keepdim=True)
    return (v.double() / length).to(v.dtype).masked_fill(length == 0, 0.0)


def assign(search: Callable, x: Tensor, centroids: Tensor, metric: str) -> tuple:
    """(labels [B] int64, loss [B] float64 >= 0) of x against centroids through ``search``
    (nearest_prototype's signature): l2 ||x - c||^2, ip ||x|| - x.c, cosine 1 - cos(x, c)."""
    score, idx = search(x, centroids, 1, metric)
    best = score.select(1, 0).double()
    if metric == "l2":
        loss = best
    elif metric == "ip":
        loss = torch.linalg.vector_norm(x.double(), dim=1) - best
    else:
        loss = 1.0 - best
    return idx.select(1, 0), loss.clamp_min(0.0)


class _Fit:
    """One k-means fit's fixed state: the points in the accumulation dtype, what the update
    sums (unit rows for cosine), the metric and the assignment step."""

    def __init__(self, x: Tensor, metric: str, search: Callable) -> None:
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.points = x.to(self.acc).contiguous()
        self.summed = _normalised(self.points) if metric == "cosine" else self.points
        self.metric, self.search = metric, search

    def centre(self, v: Tensor) -> Tensor:
        """v as a centroid: itself for l2, its unit rows for the spherical metrics."""
        return v if self.metric == "l2" else _normalised(v)

    def losses(self, centres: Tensor) -> tuple:
        return assign(self.search, self.points, centres, self.metric)

    def seeds(self, k: int, init: str, gen: torch.Generator) -> List[int]:
        """The row indices of the first centres. Draw order (the oracle's, so the same seed
        gives the same rows): one randperm for "random"; for "k-means++" one randint, then one
        multinomial over D^2 weights per further centre, on the CPU generator whatever the
        points' device."""
        n = self.points.shape[0]
        if init == "random":
            return torch.randperm(n, generator=gen)[:k].tolist()
        picked = [int(torch.randint(n, (1,), generator=gen))]
        used = torch.zeros(n, dtype=torch.bool, device=self.points.device)
        used[picked[0]] = True
        nearest = self.losses(self.centre(self.summed[picked]))[1]  # D^2 of every point
        while len(picked) < k:
            weight = nearest.masked_fill(used, 0.0)
            if not bool(weight.sum() > 0):  # all that is left sits on a chosen centre: uniform
                weight = (~used).to(nearest.dtype)
            row = int(torch.multinomial(weight.cpu(), 1, generator=gen))
            picked.append(row)
            used[row] = True
            nearest = torch.minimum(nearest, self.losses(self.centre(self.summed[[row]]))[1])
        return picked

    def moved(self, centres: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        """One update: each centroid from its members (mean, or unit sum; a zero sum keeps the
        old one), each empty cluster re-seeded with the next farthest point."""
        k = centres.shape[0]
        total = centres.new_zeros(centres.shape).index_add_(0, labels, self.summed)
        members = torch.bincount(labels, minlength=k).to(self.acc)
        if self.metric == "l2":
            out = total / members.clamp_min(1.0)[:, None]
        else:
            length = total.double().norm(dim=1, keepdim=True)  # float64: see _normalised
            out = torch.where(length == 0, centres, (total.double() / length).to(total.dtype))
        empty = members == 0
        n_empty = int(empty.sum())
        if n_empty:
            far = torch.argsort(loss, descending=True, stable=True)[:n_empty]
            out[empty] = self.centre(self.summed[far])
        return out


def _settled(before: float, after: float, tol: float) -> bool:
    change = abs(before - after) / before if before > 0 else 0.0
    return change < tol


def lloyd(x: Tensor, n_clusters: int, n_iter: int, init: str, seed: int, metric: str, tol: float,
          search: Callable, on_iteration: Optional[Callable] = None) -> tuple:
    """(centroids [K, d] in x's dtype, labels [B], inertia) with ``search`` for every assignment;
    ``on_iteration(i, inertia)`` after each update round."""
    fit = _Fit(x, metric, search)
    gen = torch.Generator().manual_seed(seed)
    centres = fit.centre(fit.summed[fit.seeds(n_clusters, init, gen)])
    labels, loss = fit.losses(centres)
    inertia = float(loss.sum())
    for done in range(1, n_iter + 1):
        centres = fit.moved(centres, labels, loss)
        labels, loss = fit.losses(centres)
        before, inertia = inertia, float(loss.sum())
        if on_iteration is not None:
            on_iteration(done, inertia)
        if _settled(before, inertia, tol):
            break
    out = centres.to(x.dtype)
    if out.dtype != fit.acc:  # rounding moved the centroids: label and score what is returned
        labels, loss = fit.losses(out.to(fit.acc))
    return out, labels, float(loss.sum())
