"""Gradient matching: zero when the synthetic batch is the real one; a few steps on the
synthetic pixels lower the matching loss; the siamese augmentation keeps identical sides equal;
the fast path's batched synthetic side equals one call per class."""

from __future__ import annotations

import pytest
import torch

from distill.augment import AugmentConfig, DiffAugment
from distill.matching import matching_loss
from distill.models import build_model, plain_path

from .conftest import make_tiny_set


def setup(seed=0):
    data = make_tiny_set(per_class=8, seed=seed)
    model = build_model("convnet:width=8,depth=2", 1, 10, (28, 28),
                        generator=torch.Generator().manual_seed(seed))
    real = [data.images[data.class_indices(c)] for c in range(10)]
    return data, model, real


def test_zero_when_synthetic_equals_real():
    _, model, real = setup()
    labels = [torch.full((r.shape[0],), c) for c, r in enumerate(real)]
    syn = [r.clone().requires_grad_() for r in real]
    # float32 rounding only
    assert matching_loss(model, real, syn, labels, distance="mse").item() < 1e-9
    noise = [torch.randn_like(r) for r in real]
    # layer-wise cosine: zero up to the epsilon that guards near-zero gradient rows
    base = matching_loss(model, real, noise, labels).item()
    assert matching_loss(model, real, syn, labels).item() < 1e-2 * base
    aug = DiffAugment(AugmentConfig(mode="all"))
    loss = matching_loss(model, real, syn, labels, distance="mse", augment=aug,
                         generator=torch.Generator())
    assert loss.item() < 1e-9  # float32 rounding only


def test_a_few_steps_on_the_pixels_lower_the_matching_loss():
    _, model, real = setup(1)
    syn = torch.randn(10, 1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    syn.requires_grad_()
    labels = [torch.tensor([c]) for c in range(10)]
    opt = torch.optim.SGD([syn], lr=0.1, momentum=0.5)
    losses = []
    for _ in range(8):
        loss = matching_loss(model, real, list(syn), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert syn.grad is not None and losses[-1] < 0.9 * losses[0]


def _matched(model, real, syn, labels, plain, **kw):
    """The matching loss and its gradient to the synthetic images, on one path."""
    x = torch.cat(syn).detach().requires_grad_()
    parts = list(x.split([s.shape[0] for s in syn]))
    with plain_path(plain):
        loss = matching_loss(model, real, parts, labels, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("soft,augment", [(False, False), (True, False), (False, True)])
def test_batched_synthetic_side_is_the_per_class_one(soft, augment):
    """The fast path's one batched pass of per-image gradients gives the loss and the image
    gradient of one call per class (float64, uneven class sizes, soft labels, DSA)."""
    _, model, real = setup(3)
    model = model.double()
    real = [r.double() for r in real]
    g = torch.Generator().manual_seed(4)
    sizes = [1, 3, 2, 1, 4, 2, 1, 1, 3, 2]
    syn = [torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64) for n in sizes]
    if soft:
        labels = [torch.softmax(torch.randn(n, 10, generator=g, dtype=torch.float64), 1)
                  for n in sizes]
    else:
        labels = [torch.full((n,), c) for c, n in enumerate(sizes)]
    kw = {}
    runs = []
    for plain in (True, False):
        if augment:
            kw = {"augment": DiffAugment(AugmentConfig(mode="all")),
                  "generator": torch.Generator().manual_seed(5)}
        runs.append(_matched(model, real, syn, labels, plain, **kw))
    (lp, gp), (lf, gf) = runs
    assert torch.allclose(lf, lp, rtol=1e-10, atol=0)
    assert torch.allclose(gf, gp, rtol=1e-8, atol=1e-12 * gp.abs().max().item())
    assert gp.abs().sum() > 0


def test_batched_side_is_used_only_where_images_are_independent(monkeypatch):
    """A student whose batch norm is in training mode (batch statistics) takes one call per
    class; so does a batch whose per-image gradients exceed the memory bound."""
    import distill.matching as matching

    calls = []
    real_batched = matching.batched_class_gradients
    monkeypatch.setattr(matching, "batched_class_gradients",
                        lambda *a: calls.append(1) or real_batched(*a))
    _, model, real = setup(0)
    syn = [r[:2].clone() for r in real]
    labels = [torch.full((2,), c) for c in range(10)]
    matching_loss(model, real, syn, labels)
    assert calls == [1]
    bn = build_model("convnet:width=8,depth=2,norm=batch", 1, 10, (28, 28),
                     generator=torch.Generator().manual_seed(0))
    matching_loss(bn, real, syn, labels)
    assert calls == [1]
    bn.eval()  # running statistics: images independent again
    matching_loss(bn, real, syn, labels)
    assert calls == [1, 1]
    monkeypatch.setattr(matching, "BATCHED_FLOATS", 10)
    matching_loss(model, real, syn, labels)
    assert calls == [1, 1]
