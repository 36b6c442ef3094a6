"""Gradient-matching distances against their definitions on hand-sized tensors."""

from __future__ import annotations

import math

import pytest
import torch

from distill.distances import gradient_distance


def grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g),
            torch.randn(10, 36, generator=g)]


@pytest.mark.parametrize("kind", ["layerwise", "mse", "cosine"])
def test_zero_for_identical_gradients(kind):
    a = grads()
    assert gradient_distance(a, [t.clone() for t in a], kind).item() == pytest.approx(0, abs=1e-5)


def test_layerwise_is_invariant_to_per_row_positive_scale_and_ignores_biases():
    a, b = grads(0), grads(1)
    # each output row of the conv scaled by its own positive factor; the bias flipped and
    # blown up (1-D parameters do not count); the linear layer scaled as a whole
    scaled = [b[0] * torch.arange(1, 5).view(4, 1, 1, 1).float(), b[1] * -100.0, b[2] * 3.0]
    d1 = gradient_distance(a, b, "layerwise")
    d2 = gradient_distance(a, scaled, "layerwise")
    assert d1.item() == pytest.approx(d2.item(), rel=1e-5)


def test_layerwise_closed_form():
    a = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    b = [torch.tensor([[0.0, 1.0], [0.0, 2.0]])]  # rows: orthogonal (1 - 0), parallel (1 - 1)
    assert gradient_distance(a, b, "layerwise").item() == pytest.approx(1.0, abs=1e-5)
    b = [torch.tensor([[-1.0, 0.0], [1.0, 1.0]])]  # opposite (2), 45 degrees (1 - 1/sqrt 2)
    assert gradient_distance(a, b, "layerwise").item() == pytest.approx(
        2 + 1 - 1 / math.sqrt(2), abs=1e-5)


def test_mse_and_flat_cosine_closed_forms():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], [torch.tensor([0.0, 2.0]),
                                                               torch.tensor([[1.0]])]
    assert gradient_distance(a, b, "mse").item() == pytest.approx(1 + 0 + 4)
    cos = (0 + 4 + 3) / (math.sqrt(14) * math.sqrt(5))
    assert gradient_distance(a, b, "cosine").item() == pytest.approx(1 - cos, abs=1e-6)
    assert gradient_distance(a, [2 * t for t in a], "cosine").item() == pytest.approx(0, abs=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="layerwise"):
        gradient_distance(grads(), grads(), "l1")
    with pytest.raises(ValueError, match="shapes"):
        gradient_distance(grads(), grads()[:2])
