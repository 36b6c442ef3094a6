"""Uncertainty sampling: keep the examples whose predictive entropy is highest.

Settles, "Active Learning Literature Survey", 2009; as a coreset rule with a trained proxy
network in Coleman et al., "Selection via Proxy: Efficient Data Selection for Deep Learning",
ICLR 2020. Entropies come from :mod:`selection.signals`.

``order`` also takes ``hardest`` / ``easiest`` (Sorscher et al., NeurIPS 2022: easy examples
win at small budgets, hard ones at large). The most uncertain (highest entropy) are the *hardest*.
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import score_order, top_k

__all__ = ["Entropy"]


@register
class Entropy:
    name = "entropy"
    signal = "entropy"

    def __init__(self, *, order: str = "highest") -> None:
        self.order = score_order(order, "highest", "lowest")

    def options(self) -> dict:
        return {"order": self.order}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        return top_k(values, k, generator, descending=self.order == "highest")
