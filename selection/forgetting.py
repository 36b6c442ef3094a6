"""Forgetting events: keep the examples the network forgets most often while it learns.

Toneva, Sordoni, des Combes, Trischler, Bengio & Gordon, "An Empirical Study of Example
Forgetting during Deep Neural Network Learning", ICLR 2019. A forgetting event is a correct to
wrong transition between consecutive presentations; never-learned examples count as infinitely
forgotten. The counts come from :mod:`selection.signals`.

``order`` also takes ``hardest`` / ``easiest`` (Sorscher et al., NeurIPS 2022: easy examples
win at small budgets, hard ones at large). The most forgotten are the *hardest*.
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import score_order, top_k

__all__ = ["Forgetting"]


@register
class Forgetting:
    name = "forgetting"
    signal = "forgetting"

    def __init__(self, *, order: str = "most") -> None:
        self.order = score_order(order, "most", "least")

    def options(self) -> dict:
        return {"order": self.order}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        return top_k(values, k, generator, descending=self.order == "most")
