"""Herding: greedily keep the mean of the chosen examples as close as possible to the class mean.

Welling, "Herding Dynamical Weights to Learn", ICML 2009; used for exemplar selection by
Rebuffi et al., iCaRL, CVPR 2017, and as a coreset baseline in Zhao, Mopuri & Bilen, ICLR 2021
(in the feature space of a trained ConvNet, which is our default ``space="embedding"``).
"""

from __future__ import annotations

import torch

from .base import register
from .ranking import space_signal

__all__ = ["Herding", "herding_order"]


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding on (n, d) features: at step t pick the unused i minimising
    ``|| (S_t + x_i) / (t + 1) - mu ||``, S_t the sum of the picks so far. Ties: lowest index.

    Returns (k,) int64 positions in pick order. O(n k d) with one matrix-vector product a step.
    """
    x = features.double()
    mu = x.mean(0)
    total = torch.zeros_like(mu)
    sq = (x * x).sum(1)
    used = torch.zeros(x.shape[0], dtype=torch.bool)
    picks = []
    for t in range(k):
        # || (S + x_i)/(t+1) - mu ||^2 * (t+1)^2 = || x_i - ((t+1) mu - S) ||^2
        target = (t + 1) * mu - total
        dist = sq - 2 * (x @ target)            # + ||target||^2, the same for every i
        dist[used] = float("inf")
        i = int(torch.argmin(dist))
        picks.append(i)
        used[i] = True
        total += x[i]
    return torch.tensor(picks, dtype=torch.int64)


@register
class Herding:
    name = "herding"
    signal = "embedding"

    def __init__(self, *, space: str = "embedding", normalize: bool = False) -> None:
        self.signal = space_signal(space)
        self.space, self.normalize = space, bool(normalize)

    def options(self) -> dict:
        return {"space": self.space, "normalize": self.normalize}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.nn.functional.normalize(values, dim=1) if self.normalize else values
        return herding_order(x, k)
