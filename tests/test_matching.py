"""Gradient matching: zero when the synthetic batch is the real one; a few steps on the
synthetic pixels lower the matching loss; the siamese augmentation keeps identical sides equal."""

from __future__ import annotations

import torch

from distill.augment import AugmentConfig, DiffAugment
from distill.matching import matching_loss
from distill.models import build_model

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
