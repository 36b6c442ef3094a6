"""``unrolled``: backprop through T student steps (DD: Wang, Zhu, Torralba & Efros 2018;
the GTN paper's meta-gradient), functional SGD; ``recompute``: the same gradient, one step's
graph at a time."""

from __future__ import annotations

import torch

from ..teacher import Teacher
from ..unrolled import unrolled_loss
from .base import RealSampler, StudentFactory, register_strategy
from .stepwise import _plain_rates, _Stepwise

__all__ = ["Unrolled"]

@register_strategy("unrolled")
class Unrolled(_Stepwise):
    """DD: the real-data loss after T differentiable student steps on the teacher's data
    (``recompute``: the same gradient, one step's graph at a time)."""

    def steps_held(self, steps: int) -> int:
        cfg = self.config
        if cfg.recompute:
            return 1
        held = steps if cfg.truncate is None else min(steps, cfg.truncate)
        return held if cfg.checkpoint_steps is None else min(held, cfg.checkpoint_steps)

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.config
        net = make_student(generator)
        net.train()
        if cfg.recompute:
            order = teacher.order(generator)
            lrs, mu = _plain_rates(*self._rates(teacher), len(order))
            return self._tail_step(teacher, optimizer, real, net, order, lrs, mu, generator,
                                   tail=0, exact=True)
        batches = list(teacher.inner_batches(generator))
        xr, yr = real.batch(cfg.real_batch, generator)
        lr, momentum = self._rates(teacher)
        loss = unrolled_loss(net, batches, xr, yr, lr, momentum=momentum,
                             weight_decay=cfg.inner_weight_decay,
                             truncate=cfg.truncate, checkpoint_every=cfg.checkpoint_steps,
                             score_every=cfg.intermediate_every,
                             score_weight=cfg.intermediate_weight)
        return {"loss": self._update(loss, teacher, optimizer)}
