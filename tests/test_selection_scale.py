"""The batched rules at a large budget (k ~ n / 2) against slow reference implementations."""

from __future__ import annotations

import pytest
import torch

from selection import get_method
from selection.dbscan import dbscan, neighbour_counts
from selection.herding import herding_order
from selection.kcenter import kcenter_greedy
from selection.kmeans import kmeans, kmeans_objective, representatives

from .test_selection_rules import brute_dbscan


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(n: int, d: int, centres: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    c = 4 * torch.randn(centres, d, generator=g)
    return c[torch.randint(centres, (n,), generator=g)] + torch.randn(n, d, generator=g)


def loop_herding(x: torch.Tensor, k: int) -> list[int]:
    """Reference: at each step try every unused point and measure the mean's distance."""
    x = x.double()
    mu, picks = x.mean(0), []
    for _ in range(k):
        best, best_i = float("inf"), -1
        for i in range(x.shape[0]):
            if i in picks:
                continue
            d = float((x[picks + [i]].mean(0) - mu).norm())
            if d < best - 1e-12:
                best, best_i = d, i
        picks.append(best_i)
    return picks


def test_herding_large_k_equals_the_loop():
    x = blobs(120, 4, 6, seed=1)
    assert herding_order(x, 60).tolist() == loop_herding(x, 60)


def brute_kcenter(x: torch.Tensor, k: int, first: int) -> list[int]:
    """Reference: O(n^2) distance matrix, each step the point farthest from the chosen set."""
    dist = torch.cdist(x.double(), x.double())
    picks = [first]
    for _ in range(k - 1):
        cover = dist[:, picks].min(1).values
        picks.append(int(cover.argmax()))
    return picks


def test_kcenter_large_k_equals_brute_force():
    x = blobs(300, 5, 8, seed=2)
    assert kcenter_greedy(x, 150, first=7).tolist() == brute_kcenter(x, 150, 7)


def test_kmeans_large_k_objective_matches_scipy():
    from scipy.cluster.vq import kmeans2

    x = blobs(400, 3, 10, seed=3)
    ours = kmeans_objective(x, kmeans(x, 100, gen(0), iters=100)[0])
    theirs = []
    for s in range(3):
        c, _ = kmeans2(x.double().numpy(), 100, minit="++", iter=100, seed=s)
        theirs.append(kmeans_objective(x, torch.from_numpy(c)))
    # Same algorithm (k-means++ then Lloyd): a comparable local optimum.
    assert ours <= 1.15 * (sum(theirs) / len(theirs))


def test_kmeans_representatives_are_each_clusters_nearest_member():
    x = blobs(400, 3, 10, seed=4)
    centroids, assign = kmeans(x, 120, gen(1))
    picks = representatives(x, centroids, assign)
    assert picks.unique().numel() == 120
    sizes = torch.bincount(assign, minlength=120)
    for rank, p in enumerate(picks.tolist()):
        j = int(assign[p])
        members = torch.nonzero(assign == j).flatten()
        d = (x[members].double() - centroids[j].double()).norm(dim=1)
        assert p == int(members[d.argmin()])
        if rank:
            assert sizes[j] <= sizes[int(assign[picks[rank - 1]])]   # largest clusters first


@pytest.mark.parametrize("eps,min_samples", [(0.8, 4), (1.2, 5), (2.5, 10)])
def test_dbscan_large_matches_brute_force(eps, min_samples):
    x = blobs(300, 2, 6, seed=5).double()
    brute_counts = torch.tensor([int(((x - x[i]).norm(dim=1) <= eps).sum())
                                 for i in range(len(x))])
    assert torch.equal(neighbour_counts(x, eps, chunk=64), brute_counts)
    assert dbscan(x, eps, min_samples, chunk=64).tolist() == brute_dbscan(x, eps, min_samples)


@pytest.mark.parametrize("name", ["herding", "kcenter", "kmeans", "dbscan"])
def test_rules_pick_half_of_a_class(name):
    x = blobs(400, 8, 12, seed=6).float()
    picks = get_method(name).choose(x, 200, gen(2))
    assert picks.shape == (200,) and picks.unique().numel() == 200
    assert int(picks.min()) >= 0 and int(picks.max()) < 400
