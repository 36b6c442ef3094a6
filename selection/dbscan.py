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

__all__ = ["DBSCAN", "dbscan", "auto_eps", "neighbour_counts"]


def _within(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(len(a), len(b)) bool: which pairs lie within ``eps``."""
    return torch.cdist(a, b) <= eps


def neighbour_counts(x: torch.Tensor, eps: float, chunk: int = 2048) -> torch.Tensor:
    """(n,) number of points within ``eps`` of each point (itself included), in row chunks."""
    return torch.cat([_within(x[s:s + chunk], x, eps).sum(1)
                      for s in range(0, x.shape[0], chunk)])


def auto_eps(features: torch.Tensor, min_samples: int, quantile: float = 0.5,
             chunk: int = 2048) -> float:
    """The ``quantile`` of every point's distance to its ``min_samples``-th nearest point
    (itself counted first): the knee heuristic of Ester et al., made automatic."""
    x = features.double()
    m = min(min_samples, x.shape[0])
    kth = torch.cat([torch.cdist(x[s:s + chunk], x).kthvalue(m, dim=1).values
                     for s in range(0, x.shape[0], chunk)])
    return float(torch.quantile(kth, quantile))


def dbscan(features: torch.Tensor, eps: float, min_samples: int,
           chunk: int = 1024) -> torch.Tensor:
    """DBSCAN on (n, d) features: (n,) cluster labels 0..C-1, or -1 for noise.

    A core point has at least ``min_samples`` points (itself included) within ``eps``.
    Clusters are the connected components of the core points (edges: pairs within ``eps``),
    numbered in order of their lowest position; a border point joins the lowest-numbered
    cluster among its core neighbours. This is exactly what the sequential algorithm of Ester
    et al. returns when it grows clusters from core points in order of position, computed
    instead with batched tensor operations: min-label propagation over the core graph with
    pointer jumping (Shiloach & Vishkin, 1982, "hook and shortcut"), a few rounds of (m, m)
    work for m core points, in row chunks. Memory: an (m, m) bool adjacency.
    """
    x = features.double()
    n = x.shape[0]
    labels = torch.full((n,), -1, dtype=torch.int64)
    core = neighbour_counts(x, eps, chunk) >= min_samples
    core_pos = torch.nonzero(core).flatten()
    m = core_pos.numel()
    if m == 0:
        return labels
    xc = x[core_pos]
    adj = torch.cat([_within(xc[s:s + chunk], xc, eps) for s in range(0, m, chunk)])
    comp = torch.arange(m)
    big = torch.tensor(m)
    while True:
        hooked = torch.cat([torch.where(adj[s:s + chunk], comp, big).amin(1)
                            for s in range(0, m, chunk)])
        new = torch.minimum(comp, hooked)
        while True:   # shortcut: follow pointers to their roots
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, comp):
            break
        comp = new
    roots, cluster = torch.unique(comp, return_inverse=True)   # roots ascending = numbering
    labels[core_pos] = cluster
    border_pos = torch.nonzero(~core).flatten()
    n_clusters = torch.tensor(roots.numel())
    for s in range(0, border_pos.numel(), chunk):
        rows = border_pos[s:s + chunk]
        near = _within(x[rows], xc, eps)
        best = torch.where(near, cluster, n_clusters).amin(1)
        labels[rows] = torch.where(best < n_clusters, best, torch.tensor(-1))
    return labels


def _medoid(x: torch.Tensor, chunk: int = 1024) -> int:
    """Position of the member with the smallest summed distance to the others."""
    total = torch.cat([torch.cdist(x[s:s + chunk], x).sum(1) for s in range(0, x.shape[0], chunk)])
    return int(total.argmin())


def _farthest_fill(x: torch.Tensor, candidates: torch.Tensor, chosen: list[int], m: int
                   ) -> list[int]:
    """Add ``m`` of ``candidates`` by farthest-point traversal from ``chosen``."""
    if m <= 0:
        return []
    cand = candidates.clone()
    xc = x[cand]
    d = torch.cdist(xc, x[torch.tensor(chosen)]).min(1).values
    added = []
    for _ in range(min(m, cand.numel())):
        j = int(d.argmax())
        added.append(int(cand[j]))
        d = torch.minimum(d, (xc - xc[j]).norm(dim=1))
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
            raise SelectionError(f"option eps must be > 0, got {eps}")
        if int(min_samples) < 1:
            raise SelectionError(f"option min_samples must be >= 1, got {min_samples}")
        if not 0.0 < float(eps_quantile) <= 1.0:
            raise SelectionError(f"option eps_quantile must be in (0, 1], got {eps_quantile}")
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
        by_cluster = torch.argsort(labels, stable=True)
        sizes_all = torch.bincount(labels[labels >= 0], minlength=n_clusters)
        starts = (labels < 0).sum() + torch.cumsum(sizes_all, 0) - sizes_all
        members = [by_cluster[int(a):int(a) + int(b)] for a, b in zip(starts, sizes_all)]
        members.sort(key=lambda m: -m.numel())  # stable: equal sizes keep discovery order
        medoids = [int(m[_medoid(x[m])]) for m in members]
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
