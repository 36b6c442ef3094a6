"""Unrolled meta-gradients: backpropagate through T differentiable student SGD steps.

Wang, Zhu, Torralba & Efros, "Dataset Distillation", 2018 (and Maclaurin, Duvenaud & Adams,
ICML 2015): train a fresh student for T steps on the teacher's data with a differentiable
optimiser, evaluate it on real data, and differentiate that loss with respect to the teacher's
data (and a learnable student learning rate) through every step.

Memory grows linearly in T: every step's activations and its gradient graph are kept. Two
ways to trade that memory for time:

* ``truncate=K``: only the last K steps are differentiated (truncated backprop through time,
  Shaban, Cheng, Hatch & Boots, AISTATS 2019); the first T − K run as plain SGD.
* ``checkpoint_every=S``: the unroll is cut into segments of S steps; only the student state
  at segment boundaries is kept and each segment is recomputed during the backward pass
  (gradient checkpointing, Chen, Xu, Zhang & Guestrin, 2016). Same gradient, memory about
  O(T/S + S) steps instead of O(T), one extra forward of the unroll.

Every path runs the student through :func:`distill.inner.student_steps` (functional SGD
with :func:`torch.func.functional_call`); the tests check it against ``higher``
(Grefenstette et al., 2019), which this module used before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .engine import classification_loss
from .inner import Rate, forward, rate_list, real_loss, student_steps
from .teacher import Batch

__all__ = ["unrolled_loss"]

Scalar = float | torch.Tensor


def _value(v: Scalar) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def unrolled_loss(model: nn.Module, batches: Sequence[Batch], real_images: torch.Tensor,
                  real_labels: torch.Tensor, lr: Rate, momentum: Rate = 0.0,
                  weight_decay: float = 0.0, truncate: int | None = None,
                  checkpoint_every: int | None = None, score_every: int = 0,
                  score_weight: float = 1.0) -> torch.Tensor:
    """Train ``model`` on ``batches`` with differentiable SGD and return the real-data loss.

    Args:
        model: a fresh student; its own parameters are not modified.
        batches: T (images, targets) pairs from the teacher, with graphs to the teacher.
        real_images / real_labels: the real batch the trained student is scored on.
        lr: the student's learning rate: a float, a scalar tensor, or a (T,) tensor of
            per-step rates (GTN); tensors with a graph are learned.
        momentum: as in ``torch.optim.SGD``, one or T values; a tensor with a graph is
            learned (GTN).
        weight_decay: as in ``torch.optim.SGD`` (makes a linear student strongly convex).
        truncate: differentiate only the last ``truncate`` steps (``None``: all).
        checkpoint_every: recompute segments of this many steps in the backward pass
            instead of storing them (``None``: store everything).
        score_every, score_weight: intermediate losses (Such et al., ICML 2020): the student
            is also scored on the real batch after every ``score_every``-th differentiated
            step before the last; the result is ``final + score_weight · mean(those)``
            (0: only the final loss).

    Returns:
        The scalar real-data loss after T steps (plus the weighted intermediate losses);
        ``backward()`` reaches the teacher.
    """
    batches = list(batches)
    if truncate is not None and truncate < 1:
        raise ValueError(f"truncate must be >= 1, got {truncate}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    lrs = rate_list(lr, len(batches), "learning rates")
    moms = rate_list(momentum, len(batches), "momenta")
    params = [p.detach() for p in model.parameters()]
    bufs: list[torch.Tensor | None] | None = None
    if truncate is not None and truncate < len(batches):
        head = len(batches) - truncate  # plain SGD: no graph
        state = student_steps(model, params, [(x.detach(), y.detach()) for x, y in
                                              batches[:head]],
                              [_value(v) for v in lrs[:head]], [_value(v) for v in moms[:head]],
                              weight_decay)
        params, bufs = state.params, state.buffers
        batches, lrs, moms = batches[head:], lrs[head:], moms[head:]
    if score_every and checkpoint_every is not None:
        raise ValueError("intermediate losses are not supported with gradient checkpointing")
    if checkpoint_every is not None:
        return _checkpointed(model, params, bufs, batches, real_images, real_labels, lrs,
                             moms, weight_decay, checkpoint_every)
    n = len(batches)

    def score(t: int, p: list[torch.Tensor]) -> torch.Tensor | None:
        if (t + 1) % score_every == 0 and t + 1 < n:
            return real_loss(model, p, real_images, real_labels)
        return None

    state = student_steps(model, params, batches, lrs, moms, weight_decay, differentiable=True,
                          buffers=bufs, after_step=score if score_every else None)
    final = real_loss(model, state.params, real_images, real_labels)
    if state.losses:
        final = final + score_weight * torch.stack(state.losses).mean()
    return final


# ------------------------------------------------------------------ checkpointed segments
class _Segment(torch.autograd.Function):
    """S student steps whose graph is rebuilt in the backward pass (reentrant checkpoint).

    Inputs, flat: k parameters, k momentum buffers, S images, S targets, S learning rates,
    then one momentum (shared by the S steps) or S momenta.
    """

    @staticmethod
    def _split(spec: tuple[Any, ...], flat: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        _, k, n, per_step_momentum, _ = spec
        params, bufs = list(flat[:k]), list(flat[k:2 * k])
        xs, ys = flat[2 * k:2 * k + n], flat[2 * k + n:2 * k + 2 * n]
        lrs = list(flat[2 * k + 2 * n:2 * k + 3 * n])
        moms = list(flat[2 * k + 3 * n:]) if per_step_momentum else flat[-1]
        return params, bufs, list(zip(xs, ys)), lrs, moms

    @staticmethod
    def forward(ctx: Any, spec: tuple[Any, ...], *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, _, _, _, weight_decay = spec
        params, bufs, batches, lrs, moms = _Segment._split(spec, flat)
        ctx.spec = spec
        ctx.save_for_backward(*flat)
        detach = (lambda v: [t.detach() for t in v]) if isinstance(moms, list) else \
            (lambda v: v.detach())
        state = student_steps(model, [p.detach() for p in params], [(x.detach(), y.detach())
                                                                     for x, y in batches],
                              [lr.detach() for lr in lrs], detach(moms), weight_decay,
                              buffers=[b.detach() for b in bufs])
        out = state.params + state.buffers
        return tuple(t.detach() for t in out)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx: Any, *grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        model, _, _, _, weight_decay = ctx.spec
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.dtype.is_floating_point)
                      for t in ctx.saved_tensors]
            params, bufs, batches, lrs, moms = _Segment._split(ctx.spec, inputs)
            state = student_steps(model, params, batches, lrs, moms, weight_decay,
                                  differentiable=True, buffers=bufs)
            outputs = state.params + [b for b in state.buffers if b is not None]
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            grads = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_out,
                                        allow_unused=True)
        result: list[torch.Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)


def _checkpointed(model: nn.Module, params: list[torch.Tensor],
                  bufs: Sequence[torch.Tensor | None] | None, batches: Sequence[Batch],
                  real_images: torch.Tensor, real_labels: torch.Tensor, lrs: Sequence[Scalar],
                  moms: Sequence[Scalar], weight_decay: float, every: int) -> torch.Tensor:
    """The unroll in segments of ``every`` steps (zero momentum buffers to start with)."""
    like = params[0]

    def as_tensor(v: Scalar) -> torch.Tensor:
        return v if torch.is_tensor(v) else torch.tensor(float(v), device=like.device,
                                                         dtype=like.dtype)

    start_bufs = [torch.zeros_like(p) if b is None else b.detach()
                  for p, b in zip(params, bufs or [None] * len(params))]
    lr_t = [as_tensor(v) for v in lrs]
    shared = all(m is moms[0] for m in moms)  # one momentum for every step (or a float)
    mom_t = [as_tensor(moms[0])] if shared else [as_tensor(m) for m in moms]
    k = len(params)
    state: list[torch.Tensor] = list(params) + start_bufs
    for start in range(0, len(batches), every):
        seg = batches[start:start + every]
        spec = (model, k, len(seg), not shared, weight_decay)
        seg_moms = mom_t if shared else mom_t[start:start + every]
        state = list(_Segment.apply(spec, *state, *[x for x, _ in seg], *[y for _, y in seg],
                                    *lr_t[start:start + every], *seg_moms))
    return classification_loss(forward(model, state[:k], real_images), real_labels)
