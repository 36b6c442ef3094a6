"""The selection driver and signals: contract tests over every registered rule, and oracles
for the learned signals (forgetting counts, per-example gradient norms)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.engine import TrainConfig
from selection import (
    SelectionError,
    SignalConfig,
    SignalProvider,
    available_methods,
    get_method,
    select,
)
from selection.signals import _ForgettingTracker, per_example_grad_norm

from .conftest import make_tiny_set

FAST = SignalConfig(model="convnet:width=8,depth=2", train=TrainConfig(epochs=2, batch_size=32,
                                                                      decay_at=None))
EXPECTED = {"random", "herding", "kcenter", "forgetting", "gradnorm", "entropy", "kmeans",
            "dbscan"}


@pytest.fixture(scope="module")
def data():
    return make_tiny_set(per_class=12)


@pytest.fixture(scope="module")
def provider(data):
    return SignalProvider(data, FAST, seed=0)


def test_every_method_of_the_brief_is_registered():
    assert EXPECTED <= set(available_methods())


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("ipc", [1, 5])
def test_contract(data, provider, method, ipc):
    sel = select(data, method, ipc, seed=7, signals=provider)
    assert sel.indices.shape == (10 * ipc,) and sel.labels.shape == (10 * ipc,)
    assert sel.indices.unique().numel() == 10 * ipc
    assert int(sel.indices.min()) >= 0 and int(sel.indices.max()) < len(data)
    assert torch.equal(data.labels[sel.indices], sel.labels)
    assert torch.equal(sel.labels, torch.arange(10).repeat_interleave(ipc))
    again = select(data, method, ipc, seed=7, signals=provider)
    assert torch.equal(sel.indices, again.indices)
    assert sel.method == method and sel.ipc == ipc


@pytest.mark.determinism
def test_same_seed_same_selection_from_scratch(data):
    a = select(data, "kcenter", 2, seed=1, signal_config=FAST)
    b = select(data, "kcenter", 2, seed=1, signal_config=FAST)
    assert torch.equal(a.indices, b.indices)


def test_random_depends_on_seed(data, provider):
    a = select(data, "random", 3, seed=0, signals=provider)
    b = select(data, "random", 3, seed=1, signals=provider)
    assert not torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("ipc", [0, -1, 13, 2.5, True])
def test_bad_ipc(data, provider, ipc):
    with pytest.raises(SelectionError) as err:
        select(data, "random", ipc, signals=provider)
    assert "\n" not in str(err.value)


def test_unknown_method_lists_valid_names():
    with pytest.raises(SelectionError, match="herding"):
        get_method("nope")
    with pytest.raises(SelectionError, match="no option 'colour'"):
        get_method("random", colour="blue")


def test_pool_is_per_class_and_reproducible(data):
    cfg = replace(FAST, pool_per_class=5)
    p1, p2 = SignalProvider(data, cfg, seed=3), SignalProvider(data, cfg, seed=3)
    assert torch.equal(p1.pool, p2.pool)
    assert torch.equal(data.labels[p1.pool].bincount(), torch.full((10,), 5))
    with pytest.raises(SelectionError, match="larger than class"):
        select(data, "random", 6, signals=p1)


def test_herding_in_pixel_space_starts_nearest_the_class_mean(data, provider):
    sel = select(data, "herding", 1, options={"space": "pixels"}, signals=provider)
    for c in range(10):
        members = data.class_indices(c)
        x = data.images[members].flatten(1)
        nearest = members[(x - x.mean(0)).norm(dim=1).argmin()]
        assert int(sel.indices[c]) == int(nearest)


def test_learned_signals_have_the_pool_shape(provider):
    n = provider.pool.numel()
    assert provider.get("embedding").shape[0] == n and provider.get("embedding").dim() == 2
    for s in ("forgetting", "el2n", "entropy", "grand"):
        assert provider.get(s).shape == (n,)
    ent = provider.get("entropy")
    assert (ent >= 0).all() and (ent <= torch.log(torch.tensor(10.0)) + 1e-5).all()
    el2n = provider.get("el2n")
    assert (el2n >= 0).all() and (el2n <= 2 ** 0.5 + 1e-5).all()  # ||p - onehot|| <= sqrt 2


def test_forgetting_tracker_counts_transitions():
    t = _ForgettingTracker(3)
    labels = torch.tensor([0, 0, 0])
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    seq = {0: [right, wrong, right, wrong], 1: [right, right, right, right],
           2: [wrong, wrong, wrong, wrong]}
    for step in range(4):
        for i in range(3):
            t.on_batch(0, torch.tensor([i]), seq[i][step], labels[i:i + 1])
    assert t.counts().tolist() == [2.0, 0.0, float("inf")]


def test_per_example_grad_norm_matches_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 1, 2, 3), torch.randint(0, 3, (5,))
    fast = per_example_grad_norm(model, x, y, chunk=2)
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    list(model.parameters()))
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert fast[i].item() == pytest.approx(expected.item(), rel=1e-5)
