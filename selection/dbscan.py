"""DBSCAN representatives: the medoids of density clusters, largest cluster first.

Ester, Kriegel, Sander & Xu, "A Density-Based Algorithm for Discovering Clusters in Large
Spatial Databases with Noise", KDD 1996. When the class has fewer clusters than the budget,
the remaining picks are shared among clusters in proportion to their size and filled by
farthest-point traversal (so they spread over each cluster), then from the noise points.
"""

from __future__ import annotations

import torch

from .base import SelectionError, register
from .ranking import space_signal

__all__ = ["DBSCAN", "dbscan", "auto_eps"]


def _neighbours(x: torch.Tensor, eps: float, chunk: int = 2048) -> list[torch.Tensor]:
    """For every point, the positions within distance ``eps`` (itself included)."""
    out: list[torch.Tensor] = []
    for s in range(0, x.shape[0], chunk):
        close = torch.cdist(x[s:s + chunk], x) <= eps
        out.extend(torch.nonzero(row).flatten() for row in close)
    return out


def auto_eps(features: torch.Tensor, min_samples: int, quantile: float = 0.5,
             chunk: int = 2048) -> float:
    """The ``quantile`` of every point's distance to its ``min_samples``-th nearest point
    (itself counted first): the knee heuristic of Ester et al., made automatic."""
    x = features.double()
    m = min(min_samples, x.shape[0])
    kth = torch.cat([torch.cdist(x[s:s + chunk], x).kthvalue(m, dim=1).values
                     for s in range(0, x.shape[0], chunk)])
    return float(torch.quantile(kth, quantile))


def dbscan(features: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN on (n, d) features: (n,) cluster labels 0..C-1, or -1 for noise.

    A core point has at least ``min_samples`` points (itself included) within ``eps``.
    Clusters grow from core points in order of position; border points join the first
    cluster that reaches them.
    """
    x = features.double()
    n = x.shape[0]
    neigh = _neighbours(x, eps)
    core = torch.tensor([nb.numel() >= min_samples for nb in neigh], dtype=torch.bool)
    labels = torch.full((n,), -1, dtype=torch.int64)
    cluster = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        labels[i] = cluster
        frontier = [i]
        while frontier:
            p = frontier.pop()
            if not core[p]:
                continue
            for q in neigh[p].tolist():
                if labels[q] == -1:
                    labels[q] = cluster
                    frontier.append(q)
        cluster += 1
    return labels


def _farthest_fill(x: torch.Tensor, candidates: torch.Tensor, chosen: list[int], m: int
                   ) -> list[int]:
    """Add ``m`` of ``candidates`` by farthest-point traversal from ``chosen``."""
    if m <= 0:
        return []
    cand = candidates.clone()
    d = torch.cdist(x[cand], x[torch.tensor(chosen)]).min(1).values
    added = []
    for _ in range(min(m, cand.numel())):
        j = int(d.argmax())
        i = int(cand[j])
        added.append(i)
        d = torch.minimum(d, (x[cand] - x[i]).norm(dim=1))
        d[j] = -1.0
    return added


@register
class DBSCAN:
    name = "dbscan"
    signal = "embedding"

    def __init__(self, *, space: str = "embedding", eps: float | None = None,
                 min_samples: int = 5, eps_quantile: float = 0.5) -> None:
        self.signal = space_signal(space)
        if eps is not None and float(eps) <= 0:
            raise SelectionError(f"eps must be > 0, got {eps}")
        if int(min_samples) < 1:
            raise SelectionError(f"min_samples must be >= 1, got {min_samples}")
        if not 0.0 < float(eps_quantile) <= 1.0:
            raise SelectionError(f"eps_quantile must be in (0, 1], got {eps_quantile}")
        self.space, self.eps = space, (None if eps is None else float(eps))
        self.min_samples, self.eps_quantile = int(min_samples), float(eps_quantile)

    def options(self) -> dict:
        return {"space": self.space, "eps": self.eps, "min_samples": self.min_samples,
                "eps_quantile": self.eps_quantile}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        x = values.double()
        eps = self.eps if self.eps is not None else auto_eps(x, self.min_samples,
                                                             self.eps_quantile)
        labels = dbscan(x, eps, self.min_samples)
        n_clusters = int(labels.max()) + 1
        members = [torch.nonzero(labels == c).flatten() for c in range(n_clusters)]
        members.sort(key=lambda m: -m.numel())  # stable: equal sizes keep discovery order
        medoids = []
        for m in members:
            d = torch.cdist(x[m], x[m]).sum(1)
            medoids.append(int(m[d.argmin()]))
        picks = medoids[:k]
        if len(picks) < k:
            sizes = torch.tensor([m.numel() - 1 for m in members], dtype=torch.float64)
            extra = k - len(picks)
            if sizes.sum() > 0:
                share = sizes / sizes.sum() * extra
                alloc = torch.minimum(share.floor(), sizes)
                for j in torch.argsort(share - share.floor(), descending=True, stable=True):
                    if int(alloc.sum()) >= extra:
                        break
                    if alloc[j] < sizes[j]:
                        alloc[j] += 1
                for m, med, a in zip(members, medoids, alloc.tolist()):
                    rest = m[m != med]
                    picks += _farthest_fill(x, rest, [med], int(a))
            if len(picks) < k:  # noise points, or every point is noise
                used = torch.zeros(x.shape[0], dtype=torch.bool)
                used[picks] = True
                rest = torch.nonzero(~used).flatten()
                if not picks:
                    picks = [int((x - x.mean(0)).norm(dim=1).argmin())]
                    rest = rest[rest != picks[0]]
                picks += _farthest_fill(x, rest, picks, k - len(picks))
        return torch.tensor(picks[:k], dtype=torch.int64)
