"""The training loop against an independent SGD reference, and the evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.engine import (
    EvalProtocol,
    TrainConfig,
    accuracy,
    evaluate_set,
    fixed_test_subset,
    mean_std,
    train,
)


class Flat(nn.Module):
    def __init__(self, d: int, k: int):
        super().__init__()
        self.lin = nn.Linear(d, k)

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.lin(self.embed(x))


def reference_sgd(w, b, x, y, cfg: TrainConfig, seed: int):
    """Plain-tensor SGD with momentum and L2 weight decay, written from the update equations."""
    g = torch.Generator().manual_seed(seed)
    bufs = [torch.zeros_like(w), torch.zeros_like(b)]
    lr = cfg.lr
    n = x.shape[0]
    for epoch in range(cfg.epochs):
        if cfg.decay_at is not None and epoch == int(cfg.epochs * cfg.decay_at) and epoch > 0:
            lr *= 0.1
        order = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
            loss = F.cross_entropy(x[idx].flatten(1) @ w_.T + b_, y[idx])
            gw, gb = torch.autograd.grad(loss, (w_, b_))
            for i, (p, gp) in enumerate(((w, gw), (b, gb))):
                d = gp + cfg.weight_decay * p
                bufs[i] = d if (epoch == 0 and s == 0) else cfg.momentum * bufs[i] + d
            w = w - lr * bufs[0]
            b = b - lr * bufs[1]
    return w, b


def test_train_matches_reference_sgd():
    torch.manual_seed(0)
    x, y = torch.randn(11, 1, 2, 3), torch.randint(0, 3, (11,))
    model = Flat(6, 3)
    w0, b0 = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    cfg = TrainConfig(epochs=4, lr=0.1, momentum=0.9, weight_decay=0.01, batch_size=4)
    stats = train(model, x, y, cfg, torch.Generator().manual_seed(5))
    w, b = reference_sgd(w0, b0, x, y, cfg, seed=5)
    assert stats.steps == 4 * math.ceil(11 / 4)
    torch.testing.assert_close(model.lin.weight.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lin.bias.detach(), b, rtol=1e-5, atol=1e-6)


def test_one_hot_soft_labels_train_exactly_like_hard_labels():
    torch.manual_seed(1)
    x, y = torch.randn(9, 1, 2, 2), torch.randint(0, 3, (9,))
    a, b = Flat(4, 3), Flat(4, 3)
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05)
    train(a, x, y, cfg, torch.Generator().manual_seed(0))
    train(b, x, F.one_hot(y, 3).float(), cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.lin.weight, b.lin.weight)


def test_hooks_see_every_example_once_per_epoch():
    seen: list[list[int]] = [[], [], []]
    ends = []

    class Hook:
        def on_batch(self, epoch, indices, logits, labels):
            assert logits.shape == (indices.numel(), 2)
            seen[epoch].extend(indices.tolist())

        def on_epoch_end(self, epoch, model):
            ends.append(epoch)

    x, y = torch.randn(7, 1, 1, 2), torch.randint(0, 2, (7,))
    train(Flat(2, 2), x, y, TrainConfig(epochs=3, batch_size=3), torch.Generator(), hooks=[Hook()])
    assert all(sorted(s) == list(range(7)) for s in seen)
    assert ends == [0, 1, 2]


def test_accuracy_closed_form():
    model = Flat(2, 2)
    with torch.no_grad():
        model.lin.weight.copy_(torch.eye(2))
        model.lin.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]]).view(4, 1, 1, 2)
    assert accuracy(model, x, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)


def test_mean_std_is_population_std():
    vals = [91.0, 93.5, 92.25]
    m, s = mean_std(vals)
    assert m == pytest.approx(np.mean(vals)) and s == pytest.approx(np.std(vals, ddof=0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_test_subset_is_fixed_and_sorted():
    a, b = fixed_test_subset(100, 10), fixed_test_subset(100, 10)
    assert torch.equal(a, b) and torch.equal(a, a.sort().values) and a.unique().numel() == 10
    assert fixed_test_subset(100, None) is None and fixed_test_subset(5, 10) is None


def test_dc_protocol_defaults():
    p = EvalProtocol.dc()
    assert (p.train.epochs, p.train.lr, p.train.momentum, p.train.weight_decay,
            p.train.batch_size, p.train.decay_at) == (300, 0.01, 0.9, 5e-4, 256, 0.5)
    assert EvalProtocol.dc(augment=True).train.epochs == 1000


@pytest.mark.determinism
def test_evaluate_set_learns_and_is_reproducible(tiny_set):
    protocol = EvalProtocol(model="convnet:width=8,depth=2", n_students=2,
                            train=TrainConfig(epochs=15, batch_size=32, lr=0.05))
    x, y = tiny_set.images, tiny_set.labels
    r1 = evaluate_set(x, y, x, y, protocol, seed=3, num_classes=10)
    r2 = evaluate_set(x, y, x, y, protocol, seed=3, num_classes=10)
    assert r1.accuracies == r2.accuracies
    assert len(r1.accuracies) == 2 and r1.mean > 50.0  # chance is 10 %
    assert r1.mean == pytest.approx(float(np.mean(r1.accuracies)))


@pytest.mark.determinism
def test_resumed_evaluation_equals_uninterrupted(tiny_set):
    protocol = EvalProtocol(model="convnet:width=8,depth=2", n_students=3,
                            train=TrainConfig(epochs=3, batch_size=32))
    x, y = tiny_set.images, tiny_set.labels
    seen = []
    full = evaluate_set(x, y, x, y, protocol, seed=4, num_classes=10,
                        on_student=lambda i, a: seen.append(i))
    resumed = evaluate_set(x, y, x, y, protocol, seed=4, num_classes=10,
                           done=full.accuracies[:1])
    assert seen == [0, 1, 2] and resumed.accuracies == full.accuracies
