"""Distances between two lists of gradients (one tensor per parameter), for gradient matching.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021, Eq. 10: per
layer, the sum over output units of ``1 - cos`` between the rows of the two gradients (a conv
weight (out, in, h, w) is read as ``out`` rows of ``in*h*w``); 1-D parameters (biases, norm
scales) are ignored, as in the paper. ``mse`` and flat ``cosine`` (one cosine over all
parameters concatenated) are the alternatives the paper compares against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch

__all__ = ["gradient_distance", "DISTANCES", "layerwise_cosine", "mse", "flat_cosine"]

_EPS = 1e-6


def _rows(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)


def layerwise_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over multi-dimensional parameters and their output units of ``1 - cos(a_i, b_i)``."""
    total = a[0].new_zeros(())
    for ga, gb in zip(a, b):
        if ga.dim() < 2:
            continue
        ra, rb = _rows(ga), _rows(gb)
        cos = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1) + _EPS)
        total = total + (1.0 - cos).sum()
    return total


def mse(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences over every parameter."""
    return cast(torch.Tensor, sum(((ga - gb) ** 2).sum() for ga, gb in zip(a, b)))


def flat_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between all gradients flattened into one vector each."""
    va = torch.cat([g.flatten() for g in a])
    vb = torch.cat([g.flatten() for g in b])
    return 1.0 - (va * vb).sum() / (va.norm() * vb.norm() + _EPS)


DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "layerwise": layerwise_cosine, "mse": mse, "cosine": flat_cosine}


def gradient_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                      kind: str = "layerwise") -> torch.Tensor:
    """Distance ``kind`` (layerwise | mse | cosine) between gradient lists of equal shapes."""
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; choose one of: {', '.join(DISTANCES)}")
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("gradient lists differ in length or shapes")
    return DISTANCES[kind](a, b)
