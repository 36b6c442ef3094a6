"""Shared fixtures: tiny synthetic image sets (seconds, not minutes) and the real-data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distill.data import ImageSet, get_info


def make_tiny_set(per_class: int = 12, seed: int = 0, name: str = "mnist") -> ImageSet:
    """A learnable toy set with the shape of ``name``: class c is a bright blob at a c-position."""
    info = get_info(name)
    g = torch.Generator().manual_seed(seed)
    h, w = info.im_size
    images, labels = [], []
    for c in range(info.num_classes):
        x = 0.3 * torch.randn(per_class, info.channels, h, w, generator=g)
        r, col = 4 + 2 * (c // 5) * 4, 3 + (c % 5) * 5
        x[:, :, r:r + 6, col:col + 4] += 2.0
        images.append(x)
        labels.append(torch.full((per_class,), c, dtype=torch.int64))
    return ImageSet(images=torch.cat(images), labels=torch.cat(labels), info=info)


@pytest.fixture(autouse=True)
def _private_signal_cache(tmp_path_factory, monkeypatch):
    """Signal caches of the tests live in a temporary folder, never in the user's home."""
    monkeypatch.setenv("GTNKIT_CACHE", str(tmp_path_factory.getbasetemp() / "gtnkit-cache"))


@pytest.fixture
def tiny_set() -> ImageSet:
    return make_tiny_set()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The offline data root (``GTNKIT_DATA``); real-data tests skip, saying why, without it."""
    root = os.environ.get("GTNKIT_DATA")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("real data not available: set GTNKIT_DATA to a root holding MNIST/raw "
                    "(CI sets it to ../shared/data)")
    return Path(root)


class Kill(Exception):
    """Stands for a kill in the middle of a run."""


def killer(at):
    """An ``evaluate`` hook of the meta-training loop that kills the run at iteration ``at``."""
    def evaluate(teacher, iteration):
        if iteration == at:
            raise Kill
        return {}
    return evaluate
