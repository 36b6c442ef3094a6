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

The default path goes through ``higher`` (Grefenstette et al., 2019). The checkpointed path
is our own functional SGD (``torch.func.functional_call``); it reproduces ``higher``'s
result, which the tests check.
"""

from __future__ import annotations

import copy
from typing import Sequence

import higher
import torch
from torch import nn
from torch.func import functional_call

from .engine import classification_loss

__all__ = ["unrolled_loss"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _per_step(lr: float | torch.Tensor, steps: int) -> list:
    """``lr`` as one value per step: a float, a scalar tensor, or a (T,) tensor."""
    if torch.is_tensor(lr) and lr.dim() == 1:
        if lr.numel() != steps:
            raise ValueError(f"{lr.numel()} learning rates for {steps} steps")
        return list(lr.unbind())
    return [lr] * steps


def unrolled_loss(model: nn.Module, batches: Sequence[Batch], real_images: torch.Tensor,
                  real_labels: torch.Tensor, lr: float | torch.Tensor,
                  momentum: float | torch.Tensor = 0.0, weight_decay: float = 0.0,
                  truncate: int | None = None,
                  checkpoint_every: int | None = None, score_every: int = 0,
                  score_weight: float = 1.0) -> torch.Tensor:
    """Train ``model`` on ``batches`` with differentiable SGD and return the real-data loss.

    Args:
        model: a fresh student; its own parameters are not modified.
        batches: T (images, targets) pairs from the teacher, with graphs to the teacher.
        real_images / real_labels: the real batch the trained student is scored on.
        lr: the student's learning rate: a float, a scalar tensor, or a (T,) tensor of
            per-step rates (GTN); tensors with a graph are learned.
        momentum: as in ``torch.optim.SGD``; a tensor with a graph is learned (GTN).
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
    lrs = _per_step(lr, len(batches))
    value = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    momentum_value = value(momentum)
    opt_model = model
    opt = torch.optim.SGD(opt_model.parameters(), lr=value(lrs[0]), momentum=momentum_value,
                          weight_decay=weight_decay)
    if truncate is not None and truncate < len(batches):
        head = len(batches) - truncate
        opt_model = copy.deepcopy(model)
        opt = torch.optim.SGD(opt_model.parameters(), lr=value(lrs[0]),
                              momentum=momentum_value, weight_decay=weight_decay)
        for (x, y), step_lr in zip(batches[:head], lrs[:head]):  # plain SGD: no graph
            for group in opt.param_groups:
                group["lr"] = value(step_lr)
            opt.zero_grad(set_to_none=True)
            classification_loss(opt_model(x.detach()), y.detach()).backward()
            opt.step()
        batches, lrs = batches[head:], lrs[head:]
    if score_every and checkpoint_every is not None:
        raise ValueError("intermediate losses are not supported with gradient checkpointing")
    if checkpoint_every is not None:
        return _functional_unroll(opt_model, opt, batches, real_images, real_labels, lrs,
                                  momentum, weight_decay, checkpoint_every)
    with higher.innerloop_ctx(opt_model, opt, copy_initial_weights=True,
                              track_higher_grads=True) as (fmodel, diffopt):
        scores = []
        for t, ((x, y), step_lr) in enumerate(zip(batches, lrs), start=1):
            override = {"lr": [step_lr]}
            if torch.is_tensor(momentum):
                override["momentum"] = [momentum]
            diffopt.step(classification_loss(fmodel(x), y), override=override)
            if score_every and t % score_every == 0 and t < len(batches):
                scores.append(classification_loss(fmodel(real_images), real_labels))
        final = classification_loss(fmodel(real_images), real_labels)
        if scores:
            final = final + score_weight * torch.stack(scores).mean()
        return final


# ------------------------------------------------------------------ functional, checkpointed
def _sgd_steps(model: nn.Module, names: list[str], params: list[torch.Tensor],
               bufs: list[torch.Tensor], batches: Sequence[Batch], lrs: Sequence[torch.Tensor],
               momentum: torch.Tensor, weight_decay: float, create_graph: bool):
    """SGD steps as torch.optim.SGD takes them (a zero buffer makes the first step d_p)."""
    for (x, y), lr in zip(batches, lrs):
        loss = classification_loss(functional_call(model, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        new_p, new_b = [], []
        for p, b, g in zip(params, bufs, grads):
            d = g + weight_decay * p if weight_decay else g
            b = momentum * b + d
            new_p.append(p - lr * b)
            new_b.append(b)
        params, bufs = new_p, new_b
    return params, bufs


class _Segment(torch.autograd.Function):
    """S student steps whose graph is rebuilt in the backward pass (reentrant checkpoint)."""

    @staticmethod
    def _split(spec, flat):
        model, names, n, momentum_is_input, weight_decay = spec
        k = len(names)
        params, bufs = list(flat[:k]), list(flat[k:2 * k])
        xs, ys = flat[2 * k:2 * k + n], flat[2 * k + n:2 * k + 2 * n]
        lrs = flat[2 * k + 2 * n:2 * k + 3 * n]
        return params, bufs, list(zip(xs, ys)), lrs, flat[-1]

    @staticmethod
    def forward(ctx, spec, *flat):
        model, names, _, _, weight_decay = spec
        params, bufs, batches, lrs, momentum = _Segment._split(spec, flat)
        ctx.spec = spec
        ctx.save_for_backward(*flat)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            out_p, out_b = _sgd_steps(model, names, leaves, [b.detach() for b in bufs],
                                      [(x.detach(), y.detach()) for x, y in batches],
                                      [lr.detach() for lr in lrs], momentum.detach(),
                                      weight_decay, create_graph=False)
        return tuple(t.detach() for t in out_p + out_b)

    @staticmethod
    def backward(ctx, *grad_out):
        model, names, _, _, weight_decay = ctx.spec
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.dtype.is_floating_point)
                      for t in ctx.saved_tensors]
            params, bufs, batches, lrs, momentum = _Segment._split(ctx.spec, inputs)
            out_p, out_b = _sgd_steps(model, names, params, bufs, batches, lrs, momentum,
                                      weight_decay, create_graph=True)
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            grads = torch.autograd.grad(out_p + out_b, [inputs[i] for i in wanted], grad_out,
                                        allow_unused=True)
        result: list = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)


def _functional_unroll(model: nn.Module, opt: torch.optim.SGD, batches: Sequence[Batch],
                       real_images: torch.Tensor, real_labels: torch.Tensor,
                       lrs: Sequence[float | torch.Tensor], momentum: float | torch.Tensor,
                       weight_decay: float, every: int) -> torch.Tensor:
    named = [(n, p) for n, p in model.named_parameters()]
    names = [n for n, _ in named]
    params = [p.detach() for _, p in named]
    like = params[0]
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for _, p in named]
    bufs = [torch.zeros_like(p) if b is None else b.detach() for p, b in zip(params, bufs)]
    as_tensor = lambda v: v if torch.is_tensor(v) else torch.tensor(  # noqa: E731
        float(v), device=like.device, dtype=like.dtype)
    lrs = [as_tensor(lr) for lr in lrs]
    momentum = as_tensor(momentum)
    k = len(names)
    for start in range(0, len(batches), every):
        seg = batches[start:start + every]
        spec = (model, names, len(seg), True, weight_decay)
        out = _Segment.apply(spec, *params, *bufs, *[x for x, _ in seg], *[y for _, y in seg],
                             *lrs[start:start + every], momentum)
        params, bufs = list(out[:k]), list(out[k:])
    logits = functional_call(model, dict(zip(names, params)), (real_images,))
    return classification_loss(logits, real_labels)
