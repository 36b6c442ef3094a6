"""SyntheticSet initialisations, class layout, gradients and file round-trip."""

from __future__ import annotations

import pytest
import torch

from distill.store import load_set, save_set
from distill.synthetic import SyntheticSet

from .conftest import make_tiny_set


def test_from_noise_layout_and_reproducibility():
    a = SyntheticSet.from_noise((1, 28, 28), 10, 3, torch.Generator().manual_seed(0))
    b = SyntheticSet.from_noise((1, 28, 28), 10, 3, torch.Generator().manual_seed(0))
    assert a.images.shape == (30, 1, 28, 28) and torch.equal(a.images, b.images)
    assert a.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.equal(a.class_images(4), a.images[12:15])


def test_from_real_copies_real_images_of_each_class():
    data = make_tiny_set(per_class=6)
    s = SyntheticSet.from_real(data, 2, torch.Generator().manual_seed(1))
    for c in range(10):
        for img in s.class_images(c):
            matches = (data.images == img).flatten(1).all(1).nonzero().flatten()
            assert matches.numel() == 1 and int(data.labels[matches[0]]) == c
    with pytest.raises(ValueError, match="fewer than ipc"):
        SyntheticSet.from_real(data, 7, torch.Generator())


def test_from_indices_is_exact_and_checks_grouping():
    data = make_tiny_set(per_class=4)
    idx = torch.stack([data.class_indices(c)[:2] for c in range(10)]).flatten()
    s = SyntheticSet.from_indices(data, idx)
    assert torch.equal(s.images.detach(), data.images[idx])
    with pytest.raises(ValueError, match="grouped by class"):
        SyntheticSet.from_indices(data, idx.flip(0))


def test_learnable_parts_receive_gradients():
    s = SyntheticSet.from_noise((1, 4, 4), 3, 2, torch.Generator(), learn_labels=True, lr=0.02)
    assert s.lr == pytest.approx(0.02)
    soft = s.targets()
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.equal(soft.argmax(1), s.labels)
    loss = (s.images.sum() + (soft * torch.randn(6, 3)).sum() + s.log_lr.exp())
    loss.backward()
    assert all(p.grad is not None for p in s.parameters())


def test_saved_round_trip(tmp_path):
    s = SyntheticSet.from_noise((3, 8, 8), 2, 2, torch.Generator())
    save_set(tmp_path / "s.pt", s.to_saved({"dataset": "cifar10", "method": "dc"}))
    back = load_set(tmp_path / "s.pt")
    assert torch.equal(back.images, s.images.detach()) and torch.equal(back.labels, s.labels)
    assert back.meta["ipc"] == 2 and back.meta["kind"] == "synthetic"
