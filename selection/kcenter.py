"""K-center greedy: repeatedly pick the example farthest from everything picked so far.

Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach",
ICLR 2018. The greedy rule is a 2-approximation of the minimum covering radius (Gonzalez 1985).
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import check_choice_option, space_signal

__all__ = ["KCenter", "kcenter_greedy"]


def kcenter_greedy(features: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy k-center on (n, d) features from center ``first``; (k,) positions in pick order.

    Keeps each point's distance to its nearest center and updates it with one new center per
    step: O(n k d), every step one batched (n, d) operation (the greedy is sequential in its
    picks, never in the points). Ties: lowest index.
    """
    x = features.double()
    picks = [int(first)]
    nearest = (x - x[first]).norm(dim=1)
    for _ in range(k - 1):
        i = int(torch.argmax(nearest))
        picks.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).norm(dim=1))
    return torch.tensor(picks, dtype=torch.int64)


@register
class KCenter:
    name = "kcenter"
    signal = "embedding"

    def __init__(self, *, space: str = "embedding", first: str = "mean") -> None:
        self.signal = space_signal(space)
        self.space, self.first = space, check_choice_option("first", first, ("mean", "random"))

    def options(self) -> dict:
        return {"space": self.space, "first": self.first}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        if self.first == "mean":
            start = int((values - values.mean(0)).norm(dim=1).argmin())
        else:
            start = int(torch.randint(values.shape[0], (1,), generator=generator))
        return kcenter_greedy(values, k, start)
