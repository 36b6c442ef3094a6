"""K-means representatives: the real example nearest to each of ``k`` k-means centroids.

Lloyd, "Least squares quantization in PCM", 1982; seeding by k-means++ (Arthur &
Vassilvitskii, SODA 2007). Returning real images (medoid-like) keeps the coreset a subset.
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import space_signal

__all__ = ["KMeans", "kmeans"]


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

    Stops when the assignments no longer change or after ``iters`` rounds. An empty cluster
    is re-seeded at the point farthest from its current centroid.
    """
    x = features.double()
    centroids = kmeans_pp(x, k, generator)
    assign = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)
        new = dist.argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = assign == j
            if members.any():
                centroids[j] = x[members].mean(0)
            else:
                far = int(dist.min(1).values.argmax())
                centroids[j] = x[far]
                assign[far] = j
    return centroids.to(features.dtype), assign


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
        sizes = torch.bincount(assign, minlength=k)
        dist = torch.cdist(values.double(), centroids.double())
        used = torch.zeros(values.shape[0], dtype=torch.bool)
        picks = []
        for j in torch.argsort(sizes, descending=True, stable=True).tolist():
            d = dist[:, j].clone()
            d[used] = float("inf")
            i = int(d.argmin())
            picks.append(i)
            used[i] = True
        return torch.tensor(picks, dtype=torch.int64)
