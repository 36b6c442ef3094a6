"""``distribution``: embedding-mean matching on random networks (DM: Zhao & Bilen, WACV 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..distribution import distribution_loss
from ..teacher import Teacher
from .base import RealSampler, Strategy, StudentFactory, register_strategy

__all__ = ["Distribution"]

@register_strategy("distribution")
class Distribution(Strategy):
    """DM: match per-class embedding means of a random, untrained network."""

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        net = make_student(generator)
        net.train()
        net.requires_grad_(False)
        xr = [real.class_batch(c, self.config.per_class, generator)
              for c in range(real.num_classes)]
        xs = [x for x, _ in teacher.class_batches(generator)]
        loss = self._fast(
            lambda real_net, n: distribution_loss(n.embed, xr, xs, self.augment, generator,
                                                  embed_real=real_net,
                                                  real_chunk=self.config.real_chunk),
            _Embed(net), net)
        return {"loss": self._update(loss, teacher, optimizer)}


class _Embed(nn.Module):
    """``model.embed`` as a module (what ``torch.compile`` wraps for DM's real side)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a zoo model: it has ``embed``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)
