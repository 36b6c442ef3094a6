"""``implicit``: the implicit function theorem + Neumann series (Lorraine, Vicol & Duvenaud,
AISTATS 2020): no graph across the T student steps; with ``mixed_at="trajectory"`` the
first-order trajectory hypergradient instead (no Hessian), optionally with an exact tail."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..engine import classification_loss
from ..hypergrad import (
    StepRecord,
    grad_or_zero,
    implicit_hypergradient,
    sampled_parts,
    step_size_hypergradient,
    trajectory_coefficients,
    trajectory_hypergradient,
)
from ..inner import load_params, real_loss, student_steps
from ..teacher import StepChoice, Teacher
from .base import RealSampler, StudentFactory, register_strategy
from .stepwise import _no_graph, _plain_rates, _replayable, _Stepwise

__all__ = ["Implicit"]

def _mean_part(teacher: Teacher, net: nn.Module, choice: StepChoice, t: int,
               generator: torch.Generator) -> Callable[[], torch.Tensor]:
    """A callable: the loss of one of the T curriculum batches, / T (a part of the mean)."""
    def loss() -> torch.Tensor:
        x, y = teacher.step_batch(choice, generator)
        return classification_loss(net(x), y) / t
    return loss


@register_strategy("implicit")
class Implicit(_Stepwise):
    """IFT: train T plain steps (no graph), then the implicit hypergradient at the result.

    The Hessian is taken on one of the T training batches, chosen at random (a stochastic
    estimate of the Hessian of the mean inner loss). For a teacher with a curriculum (a GTN)
    the mixed derivative is that of the mean loss over all T batches, built batch by batch
    (memory of one batch), so every learned noise batch gets a gradient; for a synthetic set
    it is taken on the same batch as the Hessian. The learning rate and momentum are used but
    not learned by the implicit gradient (it does not reach them); ``step_size_grad`` learns
    them by the first-order trajectory hypergradient.

    Options (see :class:`StrategyConfig`): ``mixed_sample`` estimates the mixed term from a
    sample of the T batches (unbiased; fewer double-backward passes per meta-step);
    ``mixed_at="trajectory"`` replaces the implicit gradient by the first-order gradient
    through the trajectory, each batch at the student state it trained (no Hessian).
    """

    def steps_held(self, steps: int) -> int:
        return max(1, min(steps, self.config.unroll_tail))

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.config
        net = make_student(generator)
        net.train()
        order = teacher.order(generator)
        lr, rate_momentum = self._rates(teacher)
        lrs, momentum = _plain_rates(lr, rate_momentum, len(order))
        if cfg.unroll_tail:
            return self._tail_step(teacher, optimizer, real, net, order, lrs, momentum,
                                   generator, tail=cfg.unroll_tail, exact=False)
        keep = cfg.mixed_at == "trajectory" or cfg.step_size_grad
        trainable = [p.requires_grad for p in net.parameters()]
        snapshots: list[list[torch.Tensor]] = []

        def remember(t: int, ps: list[torch.Tensor]) -> None:
            snapshots.append([q.detach().clone() for q, keep_q in zip(ps, trainable) if keep_q])

        params0 = [p.detach() for p in net.parameters()]
        if keep:
            remember(-1, params0)
        # the trajectory rebuilds each batch where it was trained: the same noise both times
        batch = _replayable(teacher, order, generator) if cfg.mixed_at == "trajectory" \
            else None
        head = teacher.inner_batches(generator, order, graph=False) if batch is None else \
            (_no_graph(batch(t)) for t in range(len(order)))
        state = student_steps(net, params0, head,
                              lrs, momentum, cfg.inner_weight_decay,
                              after_step=remember if keep else None)
        load_params(net, state.params)
        params = [p for p in net.parameters() if p.requires_grad]
        t_count = len(order)
        picks = list(range(t_count))
        if cfg.mixed_sample is not None and cfg.mixed_sample < t_count:
            picks = torch.randperm(t_count, generator=generator)[:cfg.mixed_sample].tolist()
        hparams = [p for p in teacher.parameters() if p.requires_grad]
        v: list[torch.Tensor] | None = None  # dL_V/dw at the trained student, when needed
        if batch is not None:  # the trajectory gradient
            xr, yr = real.batch(cfg.real_batch, generator)
            outer = real_loss(net, list(net.parameters()), xr, yr)
            v = list(torch.autograd.grad(outer, params, retain_graph=True))
            coeffs = trajectory_coefficients(lrs, momentum)
            scale = t_count / len(picks)
            grads = trajectory_hypergradient(
                net, [snapshots[t] for t in picks],
                [batch(t) for t in picks],
                [scale * coeffs[t] for t in picks], v, hparams, classification_loss)
        else:
            k = int(torch.randint(t_count, (1,), generator=generator))
            x, y = teacher.step_batch(order[k], generator)
            inner = classification_loss(net(x), y)
            if cfg.inner_weight_decay:
                inner = inner + cfg.inner_weight_decay / 2 * sum((p ** 2).sum() for p in params)
            xr, yr = real.batch(cfg.real_batch, generator)
            outer = real_loss(net, list(net.parameters()), xr, yr)
            mixed = None
            if teacher.has_curriculum:  # the student minimised the mean loss over all T
                # batches, so each of them (its learned noise) gets its mixed term.
                mixed = sampled_parts([_mean_part(teacher, net, c, t_count, generator)
                                       for c in order], picks)
            grads = implicit_hypergradient(inner, outer, params, hparams, cfg.neumann_terms,
                                           cfg.neumann_alpha, mixed_losses=mixed,
                                           solver=cfg.ift_solver)
        if cfg.step_size_grad:
            # the update directions, from consecutive snapshots: w_t - w_{t+1} = lr_t · buf_t
            record = StepRecord(momentum)
            for t in range(t_count):
                record.add([(a - b) / lrs[t] for a, b in zip(snapshots[t], snapshots[t + 1])])
            if v is None:  # the trajectory branch computed it already
                v = grad_or_zero(outer, params, retain_graph=True)
            step_grads = step_size_hypergradient(record, v, lr, teacher.momentum_tensor(),
                                                 hparams)
            grads = [g + s for g, s in zip(grads, step_grads)]
        return {"loss": self._update(outer, teacher, optimizer, grads)}
