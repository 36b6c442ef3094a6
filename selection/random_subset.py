"""Random selection: ``k`` members of the class uniformly without replacement.

The baseline of every coreset and distillation paper (e.g. Zhao, Mopuri & Bilen, ICLR 2021).
"""

from __future__ import annotations

import torch

from .base import register

__all__ = ["RandomSubset"]


@register
class RandomSubset:
    name = "random"
    signal = "none"

    def options(self) -> dict:
        return {}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(values.shape[0], generator=generator)[:k]
