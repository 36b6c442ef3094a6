"""Each selection rule against an independent answer on a tiny problem: brute force, the
greedy rule written out directly, approximation guarantees, hand-derived clusterings."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
import torch

from selection import SelectionError, available_methods, get_method
from selection.dbscan import auto_eps, dbscan
from selection.herding import herding_order
from selection.kcenter import kcenter_greedy
from selection.kmeans import kmeans


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blobs(k=3, per=6, d=2, spread=0.1, seed=0):
    g = gen(seed)
    centres = torch.arange(k, dtype=torch.float32).unsqueeze(1).repeat(1, d) * 10.0
    x = torch.cat([c + spread * torch.randn(per, d, generator=g) for c in centres])
    return x, centres


# ------------------------------------------------------------------------ herding
def test_herding_greedy_equals_brute_force_steps():
    x = torch.randn(8, 3, generator=gen(1))
    order = herding_order(x, 8)
    mu, chosen = x.mean(0), []
    for step in range(8):
        cands = [i for i in range(8) if i not in chosen]
        errs = [((x[chosen + [i]].mean(0) - mu).norm(), i) for i in cands]
        best = min(errs)[1]
        assert int(order[step]) == best
        chosen.append(best)
    assert sorted(order.tolist()) == list(range(8))


def test_herding_first_pick_is_nearest_the_mean():
    x = torch.randn(50, 4, generator=gen(2))
    assert int(herding_order(x, 1)[0]) == int((x - x.mean(0)).norm(dim=1).argmin())


# ------------------------------------------------------------------------ k-center
def radius(x, picks):
    return float(torch.cdist(x, x[list(picks)]).min(1).values.max())


def test_kcenter_each_step_is_the_farthest_point():
    x = torch.randn(10, 2, generator=gen(3))
    picks = kcenter_greedy(x, 5, first=0).tolist()
    for t in range(1, 5):
        d = torch.cdist(x, x[picks[:t]]).min(1).values
        assert picks[t] == int(d.argmax())


def test_kcenter_is_a_2_approximation_of_the_optimal_radius():
    x = torch.randn(9, 2, generator=gen(4))
    optimal = min(radius(x, s) for s in itertools.combinations(range(9), 3))
    for first in range(9):
        assert radius(x, kcenter_greedy(x, 3, first).tolist()) <= 2 * optimal + 1e-9


def test_kcenter_covers_better_than_random():
    """Greedy radius <= 2 x optimal <= 2 x any random draw, and below the random average."""
    x, _ = blobs(k=4, per=20, spread=0.5)
    rule = get_method("kcenter", space="pixels")
    r_kc = radius(x, rule.choose(x, 4, gen()).tolist())
    r_random = [radius(x, torch.randperm(80, generator=gen(s))[:4].tolist()) for s in range(20)]
    assert r_kc <= 2 * min(r_random) + 1e-9
    assert r_kc < sum(r_random) / len(r_random)


# ------------------------------------------------------------------------ score rules
@pytest.mark.parametrize("name,opts,descending", [
    ("forgetting", {"order": "most"}, True), ("forgetting", {"order": "least"}, False),
    ("entropy", {}, True), ("entropy", {"order": "lowest"}, False),
    ("gradnorm", {}, True), ("gradnorm", {"order": "lowest"}, False),
])
def test_score_rules_pick_the_top_k(name, opts, descending):
    scores = torch.randperm(20, generator=gen(5)).float()
    picks = get_method(name, **opts).choose(scores, 6, gen())
    expected = torch.sort(scores, descending=descending).indices[:6]
    assert picks.tolist() == expected.tolist()


def test_forgetting_puts_never_learned_first_and_breaks_ties_by_seed():
    scores = torch.tensor([1.0, float("inf"), 3.0, 3.0, 3.0, 0.0])
    rule = get_method("forgetting")
    picks = rule.choose(scores, 3, gen(0))
    assert int(picks[0]) == 1 and set(picks[1:].tolist()) <= {2, 3, 4}
    assert torch.equal(picks, rule.choose(scores, 3, gen(0)))
    draws = {tuple(rule.choose(scores, 2, gen(s)).tolist()) for s in range(20)}
    assert len(draws) > 1  # the tie among 2, 3, 4 is broken at random


def test_gradnorm_skip_fraction_skips_the_hardest():
    scores = torch.arange(10, dtype=torch.float32)  # 9 is the hardest
    picks = get_method("gradnorm", skip_fraction=0.2).choose(scores, 3, gen())
    assert picks.tolist() == [7, 6, 5]
    picks = get_method("gradnorm", skip_fraction=0.9).choose(scores, 3, gen())
    assert sorted(picks.tolist()) == [0, 1, 2]  # skipping capped so k stays feasible


# ------------------------------------------------------------------------ k-means
def test_kmeans_picks_one_point_per_blob_nearest_its_centre():
    x, centres = blobs(k=4, per=15, spread=0.3, seed=6)
    picks = get_method("kmeans", space="pixels").choose(x, 4, gen())
    assert sorted((picks // 15).tolist()) == [0, 1, 2, 3]
    for p in picks.tolist():
        blob = p // 15
        members = x[blob * 15:(blob + 1) * 15]
        assert p == blob * 15 + int((members - members.mean(0)).norm(dim=1).argmin())


def test_kmeans_converged_assignments_are_nearest_centroids():
    x = torch.randn(40, 3, generator=gen(7))
    centroids, assign = kmeans(x, 5, gen(1), iters=100)
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(1))
    for j in range(5):
        torch.testing.assert_close(centroids[j], x[assign == j].mean(0))


# ------------------------------------------------------------------------ DBSCAN
def brute_dbscan(x, eps, min_samples):
    """Reference DBSCAN: breadth-first expansion over an explicit neighbour matrix."""
    n = len(x)
    nb = [[j for j in range(n) if float((x[i] - x[j]).norm()) <= eps] for i in range(n)]
    core = [len(v) >= min_samples for v in nb]
    labels, c = [-1] * n, 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        labels[i], queue = c, deque([i])
        while queue:
            p = queue.popleft()
            if core[p]:
                for q in nb[p]:
                    if labels[q] == -1:
                        labels[q] = c
                        queue.append(q)
        c += 1
    return labels


def test_dbscan_hand_derived_example():
    # a tight line of 4 points (cores), a border point 1.0 from its end, an isolated point
    x = torch.tensor([[0.0, 0], [0.5, 0], [1.0, 0], [1.5, 0], [2.5, 0], [10.0, 10.0],
                      [20.0, 0], [20.4, 0], [20.8, 0]])
    labels = dbscan(x, eps=1.0, min_samples=3).tolist()
    assert labels == [0, 0, 0, 0, 0, -1, 1, 1, 1]
    assert labels == brute_dbscan(x, 1.0, 3)


@pytest.mark.parametrize("seed", range(5))
def test_dbscan_matches_brute_force_on_random_points(seed):
    x = torch.rand(30, 2, generator=gen(seed)) * 4
    assert dbscan(x, 0.6, 3).tolist() == brute_dbscan(x, 0.6, 3)


def test_dbscan_auto_eps_finds_the_blobs():
    x, _ = blobs(k=3, per=12, spread=0.2)
    labels = dbscan(x, auto_eps(x, 5), 5)
    assert int(labels.max()) + 1 == 3
    picks = get_method("dbscan", space="pixels").choose(x, 3, gen())
    assert sorted((picks // 12).tolist()) == [0, 1, 2]  # one medoid per blob


def test_dbscan_all_noise_still_returns_k_distinct():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1) * 100
    picks = get_method("dbscan", space="pixels", eps=1.0).choose(x, 4, gen())
    assert picks.unique().numel() == 4


# ------------------------------------------------------------------------ every rule
@pytest.mark.parametrize("name", available_methods())
@pytest.mark.parametrize("k", [1, 7, 12])
def test_rule_contract_on_raw_values(name, k):
    rule = get_method(name)
    values = torch.rand(12, 5, generator=gen(8))
    if rule.signal in ("forgetting", "el2n", "grand", "entropy", "none"):
        values = values[:, 0]
    a, b = rule.choose(values, k, gen(9)), rule.choose(values, k, gen(9))
    assert torch.equal(a, b) and a.numel() == k and a.unique().numel() == k
    assert int(a.min()) >= 0 and int(a.max()) < 12


@pytest.mark.parametrize("name,opts", [("herding", {"space": "colour"}),
                                       ("gradnorm", {"score": "loss"}),
                                       ("dbscan", {"eps": -1}), ("entropy", {"order": "up"})])
def test_bad_rule_options(name, opts):
    with pytest.raises(SelectionError):
        get_method(name, **opts)
