"""Gradient-norm scores: keep the examples with the largest EL2N or GraNd score.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", NeurIPS 2021. GraNd is the norm of the per-example loss gradient, EL2N the norm of
the error vector softmax(f(x)) - onehot(y), both early in training and averaged over
initialisations (:mod:`selection.signals`). ``skip_fraction`` drops the very hardest first, as
the paper suggests when labels are noisy.

``order`` also takes ``hardest`` / ``easiest`` (Sorscher et al., NeurIPS 2022: easy examples
win at small budgets, hard ones at large). The largest scores are the *hardest*.
"""

from __future__ import annotations

import torch

from .base import SelectionError, register
from .ranking import check_choice_option, score_order, top_k

__all__ = ["GradNorm"]


@register
class GradNorm:
    name = "gradnorm"
    signal = "el2n"

    def __init__(self, *, score: str = "el2n", order: str = "highest",
                 skip_fraction: float = 0.0) -> None:
        self.signal = check_choice_option("score", score, ("el2n", "grand"))
        self.order = score_order(order, "highest", "lowest")
        if not 0.0 <= float(skip_fraction) < 1.0:
            raise SelectionError(f"option skip_fraction must be in [0, 1), got {skip_fraction}")
        self.skip_fraction = float(skip_fraction)

    def options(self) -> dict:
        return {"score": self.signal, "order": self.order, "skip_fraction": self.skip_fraction}

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        ranked = top_k(values, values.shape[0], generator, descending=self.order == "highest")
        skip = min(int(self.skip_fraction * values.shape[0]), values.shape[0] - k)
        return ranked[skip:skip + k]
