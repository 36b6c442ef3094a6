"""K-means representatives: the real example nearest to each of ``k`` k-means centroids.

Lloyd, "Least squares quantization in PCM", 1982; seeding by k-means++ (Arthur &
Vassilvitskii, SODA 2007). Returning real images (medoid-like) keeps the coreset a subset.
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import space_signal

__all__ = ["KMeans", "kmeans", "kmeans_objective", "representatives"]


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next seed drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        total = float(d2.sum())
        if total <= 0:  # all remaining points coincide with a center
            i = int(torch.randint(n, (1,), generator=generator))
        else:
            i = int(torch.multinomial(d2 / total, 1, generator=generator))
        centers.append(i)
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return x[centers].clone()


def kmeans(features: torch.Tensor, k: int, generator: torch.Generator,
           iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on (n, d) features. Returns centroids (k, d) and assignments (n,).

    Stops when the assignments no longer change or after ``iters`` rounds. Every round is two
    batched operations (an (n, k) distance matrix and a scatter-add of the members), so
    thousands of centroids cost no Python loop. Empty clusters are re-seeded at the points
    farthest from their centroids (the largest contributors to the objective), one each.
    """
    x = features.double()
    n = x.shape[0]
    centroids = kmeans_pp(x, k, generator)
    assign = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)
        nearest, new = dist.min(1)
        if torch.equal(new, assign):
            break
        assign = new
        sizes = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(sizes == 0).flatten()
        if empty.numel():
            far = torch.argsort(nearest, descending=True, stable=True)[:empty.numel()]
            assign[far] = empty
            sizes = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled].unsqueeze(1).to(x.dtype)
    return centroids.to(features.dtype), assign


def kmeans_objective(features: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum over points of the squared distance to the nearest centroid (Lloyd's objective)."""
    x, c = features.double(), centroids.double()
    return float(torch.cdist(x, c).min(1).values.pow(2).sum())


def representatives(features: torch.Tensor, centroids: torch.Tensor,
                    assign: torch.Tensor) -> torch.Tensor:
    """One real member per cluster, nearest its centroid, largest cluster first.

    Batched: the member of cluster ``j`` with the smallest distance to centroid ``j`` (a
    scatter-min over the assignments). Clusters left without a member (possible only when
    re-seeding emptied one) take the nearest point not yet used, in turn.
    """
    x, c = features.double(), centroids.double()
    n, k = x.shape[0], c.shape[0]
    own = (x - c[assign]).norm(dim=1)
    best = torch.full((k,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, assign, own, reduce="amin")
    # Lowest position among the members at the minimum distance (deterministic ties).
    at_min = own == best[assign]
    pos = torch.where(at_min, torch.arange(n), torch.full((n,), n))
    pick = torch.full((k,), n, dtype=torch.int64).scatter_reduce(0, assign, pos, reduce="amin")
    sizes = torch.bincount(assign, minlength=k)
    order = torch.argsort(sizes, descending=True, stable=True)
    used = torch.zeros(n, dtype=torch.bool)
    used[pick[pick < n]] = True
    for j in order[pick[order] >= n].tolist():   # rare: empty clusters only
        d = (x - c[j]).norm(dim=1)
        d[used] = float("inf")
        pick[j] = int(d.argmin())
        used[pick[j]] = True
    return pick[order]


@register
class KMeans:
    name = "kmeans"
    signal = "embedding"

    def __init__(self, *, space: str = "embedding", iters: int = 50) -> None:
        self.signal = space_signal(space)
        self.space, self.iters = space, int(iters)

    def options(self) -> dict:
        return {"space": self.space, "iters": self.iters}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        centroids, assign = kmeans(values, k, generator, self.iters)
        return representatives(values, centroids, assign)
