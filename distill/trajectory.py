"""Trajectory matching (MTT) with two exact gradients: unrolled, and constant-memory (TESLA).

Cazenavette, Wang, Torralba, Efros & Zhu, "Dataset Distillation by Matching Training
Trajectories", CVPR 2022: a student starts at an expert's parameters ``θ*_t`` at a random
epoch ``t < max_start_epoch`` (:mod:`distill.experts`), takes N SGD steps on the teacher's
batches with the (learned) lr η, and the teacher minimises its normalised distance to the
expert M epochs later::

    θ_0 = θ*_t,    θ_{i+1} = θ_i − η_i · b_i,    b_i = g_i + μ b_{i−1}  (b_{−1} = 0),
    g_i = ∇_θ ℓ(θ_i; X_i) (+ wd · θ_i),
    L = ||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²                         (a scalar)

(MTT's students use plain SGD: μ = 0, wd = 0; momentum and weight decay are carried for
teachers that learn a momentum, a GTN). N is the teacher's T (``teacher.steps``: MTT's
``syn_steps``), ``X_i`` its step batches (a synthetic set: ``step_size`` random images,
``None``: all, MTT's default ``batch_syn``), augmented with DSA, parameters per image.

Two gradients of the same L:

* ``unrolled``: autograd through the N differentiable steps (:func:`unrolled_gradient`).
  Memory: the N steps' graphs (activations and the gradient graph of each), O(N).
* ``tesla``: constant memory in N (Cui, Wang, Si & Hsieh, "Scaling Up Dataset Distillation
  to ImageNet-1K with Constant Memory", ICML 2023) (:func:`tesla_gradient`). The forward
  pass runs without a graph and keeps only the states ``(θ_i, b_{i−1})`` (2N parameter
  vectors, no activations). The backward pass carries the adjoints ``a_i = ∂L/∂θ_i`` and
  ``c_i = ∂L/∂b_i`` from the end, ``a_N = 2 (θ_N − θ*_{t+M}) / D``, ``c_{N−1} = 0``; step i is
  rebuilt alone (its batch, with the same seed, so the same images and augmentation) and
  one vector-Jacobian product through it gives everything at once::

      u_i      = c_i − η_i a_{i+1}                  (∂L/∂b_i through θ_{i+1} and b_i)
      ∂L/∂X_i  = (∂g_i/∂X_i)ᵀ u_i                   (the teacher's batch)
      ∂L/∂η_i  = −a_{i+1} · b_i                     (the learned lr)
      ∂L/∂μ   += u_i · b_{i−1}                      (a learned momentum)
      a_i      = a_{i+1} + (∂g_i/∂θ_i)ᵀ u_i          (a Hessian-vector product, H_i u_i)
      c_{i−1}  = μ u_i

  With plain SGD (μ = 0) this is ``a_i = a_{i+1} − η_i H_i a_{i+1}`` and
  ``∂L/∂X_i = −η_i (∂g_i/∂X_i)ᵀ a_{i+1}``. Shapes: θ_i, b_i, a_i, c_i are lists of the
  student's parameter shapes; X_i is (B, C, H, W); η is () or (N,). Memory: one step's
  graph at a time (flat in N; the 2N kept states are parameter-sized and are not graph);
  time: one more forward and one double backward per step than the unroll's backward.

  TESLA's paper writes the same loss as ``||θ*_t − θ*_{t+M} − η Σ_i g_i||²`` and, for plain
  SGD, takes each batch's term ``2η (η Σ_j g_j − (θ*_{t+M} − θ*_t))ᵀ ∂g_i/∂X_i`` in a second
  pass after accumulating ``Σ_j g_j`` in a first. That per-batch form is the recursion above
  with the Hessian terms ``H_j`` of the later steps left out (each ``a_{i+1}`` replaced by
  ``a_N``); the recursion keeps them, so its gradient equals the unrolled one to float
  rounding (tests: both against each other and against finite differences in float64).

The learned lr's own step size: MTT steps the lr with its own SGD (lr 1e-5, momentum 0.5)
beside the pixels' (lr 1000). Here one optimiser steps every teacher parameter, so
``lr_lr`` rescales the gradient that reaches the teacher through η so that its step moves η
by ``lr_lr · ∂L/∂η`` (for a teacher that learns ``log η``, as every teacher here does:
``∂L/∂log η`` is scaled by ``lr_lr / (ε · η²)`` for the optimiser's step ε).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .augment import AugmentConfig, DiffAugment
from .experts import ExpertBuffer, ExpertConfig, ExpertError, train_trajectory
from .hypergrad import grad_or_zero
from .inner import Rate, rate_list, student_steps
from .rng import generator as make_generator
from .strategies import (
    ConfigError,
    RealSampler,
    Strategy,
    StrategyConfig,
    StudentFactory,
    register_strategy,
)
from .teacher import Batch, Teacher

__all__ = ["GRADIENTS", "TrajectoryConfig", "Trajectory", "trajectory_distance",
           "unrolled_gradient", "tesla_gradient"]

log = logging.getLogger("gtnkit")

#: The two gradients of MTT's loss.
GRADIENTS = ("unrolled", "tesla")

Tensors = Sequence[torch.Tensor]
BatchFn = Callable[[int], Batch]


def trajectory_distance(params: Tensors, start: Tensors, target: Tensors) -> torch.Tensor:
    """MTT's loss ``||θ − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²`` over all parameters (a scalar;
    MTT divides both by the parameter count, which cancels)."""
    num = sum(((p - q) ** 2).sum() for p, q in zip(params, target))
    den = sum(((p - q) ** 2).sum() for p, q in zip(start, target))
    return num / den  # type: ignore[return-value]


def _leaves(rate: Rate) -> list[torch.Tensor]:
    return [rate] if torch.is_tensor(rate) and rate.requires_grad else []


def unrolled_gradient(model: nn.Module, start: Tensors, target: Tensors, batch: BatchFn,
                      steps: int, lr: Rate, inputs: Tensors, momentum: Rate = 0.0,
                      weight_decay: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MTT's loss after ``steps`` differentiable student steps, and its gradient by autograd
    through all of them.

    Args:
        model: the student's architecture (its own parameters are not used).
        start, target: ``θ*_t`` and ``θ*_{t+M}`` (lists in ``model.parameters()`` order).
        batch: ``batch(i)`` builds step i's (images (B, C, H, W), targets) with a graph to
            ``inputs``; called once per step.
        lr: η, () or (steps,) (a leaf in ``inputs`` when learned); momentum: μ likewise.
        inputs: what to differentiate (the teacher's tensors, the lr / momentum leaves).

    Returns:
        ``(loss, [∂L/∂x for x in inputs])`` (zeros where L does not depend on x).
    """
    state = student_steps(model, [p.detach() for p in start], (batch(i) for i in range(steps)),
                          lr, momentum, weight_decay, differentiable=True)
    loss = trajectory_distance(state.params, start, target)
    return loss.detach(), grad_or_zero(loss, inputs)


def tesla_gradient(model: nn.Module, start: Tensors, target: Tensors, batch: BatchFn,
                   steps: int, lr: Rate, inputs: Tensors, momentum: Rate = 0.0,
                   weight_decay: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same loss and gradient as :func:`unrolled_gradient` at the memory of one step:
    the states are kept without graph and the steps are rebuilt one at a time, last first
    (the recursion of the module docstring). ``batch(i)`` must build the same batch every
    time it is called (it is called twice per step: once without a graph)."""
    lrs = rate_list(lr, steps, "learning rates")
    inputs = list(inputs)
    params: list[torch.Tensor] = [p.detach() for p in start]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    states: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]] = []
    with torch.no_grad():
        detached = [v.detach() if torch.is_tensor(v) else v for v in lrs]
        mom = momentum.detach() if torch.is_tensor(momentum) else momentum
        for i in range(steps):
            states.append((params, bufs))
            x, y = batch(i)
            # tensor rates: the same arithmetic as the rebuilt step (not SGD's fused one)
            st = student_steps(model, params, [(x, y)],
                               [torch.as_tensor(detached[i], dtype=params[0].dtype,
                                                device=params[0].device)],
                               mom, weight_decay, buffers=bufs)
            params, bufs = st.params, list(st.buffers)
    final = [p.detach().requires_grad_() for p in params]
    loss = trajectory_distance(final, start, target)
    adj_p = list(torch.autograd.grad(loss, final))
    adj_b: list[torch.Tensor] = [torch.zeros_like(p) for p in params] \
        if any(b is not None for b in bufs) else []
    total = [torch.zeros_like(x) for x in inputs]
    for i in reversed(range(steps)):
        w0, b0 = states[i]
        w = [p.detach().requires_grad_() for p in w0]
        b_in = [None if b is None else b.detach().requires_grad_() for b in b0]
        st = student_steps(model, w, [batch(i)], [lrs[i]], momentum, weight_decay,
                           differentiable=True, buffers=b_in)
        outs = [*st.params, *[b for b in st.buffers if b is not None]]
        if len(outs) != len(adj_p) + len(adj_b):
            raise RuntimeError("momentum buffers appeared or vanished between steps")
        b_leaves = [b for b in b_in if b is not None]
        got = grad_or_zero(outs, [*inputs, *w, *b_leaves], [*adj_p, *adj_b])
        total = [a + g for a, g in zip(total, got[:len(inputs)])]
        adj_p = got[len(inputs):len(inputs) + len(w)]
        adj_b = got[len(inputs) + len(w):]
    return loss.detach(), total


_GRADIENT_FNS = {"unrolled": unrolled_gradient, "tesla": tesla_gradient}


@dataclass(frozen=True)
class TrajectoryConfig(StrategyConfig):
    """MTT's knobs (a :class:`~distill.strategies.StrategyConfig`, so the loop takes it).

    The number of student steps N (MTT's ``syn_steps``) and the images per step (its
    ``batch_syn``) are the teacher's ``steps`` and ``step_size``; the initial student lr is
    the teacher's learned lr (or ``inner_lr``); ``augment`` the DSA ops of every step batch.

    Attributes:
        experts: folder of expert files (:mod:`distill.experts`); "" trains
            ``online_experts`` in memory at the first meta-iteration (from real data, on the
            run's student architecture, ``max_start_epoch - 1 + expert_epochs`` epochs of
            :class:`~distill.experts.ExpertConfig`'s schedule): for tests and small runs.
        expert_epochs: M, how many expert epochs the student's N steps must cover.
        max_start_epoch: the start epoch t is drawn uniformly from ``0 .. max_start_epoch-1``
            (1: always the expert's initialisation, the GTN setting), clipped to what the
            experts hold.
        gradient: ``unrolled`` (memory O(N)) or ``tesla`` (the same gradient, memory O(1)
            in N).
        lr_lr: the learned lr's own SGD step (MTT: 1e-5, its default); ``None``: the
            teacher optimiser steps it like every other parameter (right for Adam, which is
            blind to the scale of a gradient).
        online_experts: how many in-memory experts (``experts`` = "").
    """

    experts: str = ""
    expert_epochs: int = 3
    max_start_epoch: int = 25
    gradient: str = "unrolled"
    lr_lr: float | None = 1e-5
    online_experts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gradient not in GRADIENTS:
            raise ConfigError(f"unknown gradient {self.gradient!r}; choose from "
                              f"{', '.join(GRADIENTS)}")
        if self.expert_epochs < 1 or self.max_start_epoch < 1 or self.online_experts < 1:
            raise ConfigError(f"expert_epochs, max_start_epoch and online_experts must be "
                              f">= 1, got {self.expert_epochs}, {self.max_start_epoch}, "
                              f"{self.online_experts}")
        if self.lr_lr is not None and not self.lr_lr > 0:
            raise ConfigError(f"lr_lr must be > 0 (None: the teacher's optimiser), got "
                              f"{self.lr_lr}")


@register_strategy("trajectory")
class Trajectory(Strategy):
    """MTT: match the expert's parameters M epochs on (see the module docstring).

    Each meta-iteration draws an expert, a start epoch, and one seed per student step (its
    batch and augmentation, rebuilt identically by ``tesla``'s backward pass), so the two
    gradients see the same draws and give the same update.
    """

    config_class = TrajectoryConfig

    def __init__(self, config: StrategyConfig) -> None:
        traj = config if isinstance(config, TrajectoryConfig) else TrajectoryConfig(
            **{f.name: getattr(config, f.name) for f in fields(config)})  # MTT's defaults
        super().__init__(traj)
        self.traj = traj
        self.augment_each = DiffAugment(AugmentConfig(strategy=traj.augment, per_sample=True)) \
            if traj.augment else None
        self._buffer: ExpertBuffer | None = None

    def steps_held(self, steps: int) -> int:
        """The unroll keeps every step's graph; TESLA one step's (and the states)."""
        return steps if self.traj.gradient == "unrolled" else 1

    def buffer(self, real: RealSampler, make_student: StudentFactory) -> ExpertBuffer:
        """The experts: read from ``experts``, or trained once in memory (deterministic: their
        own seeds, never the run's stream, so a resumed run trains the same ones)."""
        cfg = self.traj
        if self._buffer is None:
            if cfg.experts:
                self._buffer = ExpertBuffer.from_folder(cfg.experts)
            else:
                epochs = cfg.max_start_epoch - 1 + cfg.expert_epochs  # the last target
                log.info("trajectory: training %d expert(s) of %d epochs in memory (no "
                         "experts folder given)", cfg.online_experts, epochs)
                conf = ExpertConfig(epochs=epochs, augment="")
                runs = []
                for i in range(cfg.online_experts):
                    net = make_student(make_generator(0, "trajectory-expert-init", i))
                    runs.append(train_trajectory(net, real.images, real.labels, conf,
                                                 make_generator(0, "trajectory-expert", i)))
                self._buffer = ExpertBuffer(runs)
            if self._buffer.epochs < cfg.expert_epochs:
                raise ConfigError(f"the experts hold {self._buffer.epochs} epochs, fewer than "
                                  f"expert_epochs ({cfg.expert_epochs})")
        return self._buffer

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.traj
        buf = self.buffer(real, make_student)
        net = make_student(generator)
        net.train()
        device = next(net.parameters()).device
        expert = int(torch.randint(len(buf), (1,), generator=generator))
        starts = min(cfg.max_start_epoch, buf.epochs - cfg.expert_epochs + 1)
        t = int(torch.randint(starts, (1,), generator=generator))
        start = [p.to(device) for p in buf.epoch(expert, t)]
        target = [p.to(device) for p in buf.epoch(expert, t + cfg.expert_epochs)]
        shapes = [tuple(p.shape) for p in net.parameters()]
        if [tuple(p.shape) for p in start] != shapes:
            raise ExpertError("the experts' parameters do not fit the student: train the "
                              "experts with the student's model")
        order = teacher.order(generator)
        seeds = [int(torch.randint(2 ** 62, (1,), generator=generator)) for _ in order]

        def batch(i: int) -> Batch:
            g = torch.Generator()
            g.manual_seed(seeds[i])
            x, y = teacher.step_batch(order[i], g)
            return (self.augment_each(x, g) if self.augment_each is not None else x), y

        lr_full, mom_full = self._rates(teacher)
        lr = lr_full.detach().requires_grad_() if torch.is_tensor(lr_full) and \
            lr_full.requires_grad else lr_full
        mom = mom_full.detach().requires_grad_() if torch.is_tensor(mom_full) and \
            mom_full.requires_grad else mom_full
        hparams = [p for p in teacher.parameters() if p.requires_grad]
        rates = [*_leaves(lr), *_leaves(mom)]
        loss, grads = _GRADIENT_FNS[cfg.gradient](
            net, start, target, batch, len(order), lr, [*hparams, *rates], mom,
            cfg.inner_weight_decay)
        teacher_grads, rate_grads = grads[:len(hparams)], grads[len(hparams):]
        if rates:  # through the learned lr / momentum to the teacher's parameters
            outs: list[torch.Tensor] = []
            adjs: list[torch.Tensor] = []
            if torch.is_tensor(lr) and torch.is_tensor(lr_full) and lr.requires_grad:
                g_lr = rate_grads[0]
                if cfg.lr_lr is not None:
                    step = float(optimizer.param_groups[0]["lr"])
                    g_lr = g_lr * cfg.lr_lr / (step * lr.detach() ** 2)
                outs.append(lr_full)
                adjs.append(g_lr)
            if torch.is_tensor(mom) and torch.is_tensor(mom_full) and mom.requires_grad:
                outs.append(mom_full)
                adjs.append(rate_grads[-1])
            extra = grad_or_zero(outs, hparams, adjs)
            teacher_grads = [a + b for a, b in zip(teacher_grads, extra)]
        return {"loss": self._update(loss, teacher, optimizer, teacher_grads),
                "start_epoch": float(t)}



#: MTT's teacher optimiser (the released ``distill.py``: SGD on the pixels, lr 1000, momentum
#: 0.5; the lr's own SGD at 1e-5 is ``lr_lr``) and the strategy defaults of that script.
MTT_DEFAULTS: dict[str, Any] = dict(optimizer="sgd", lr=1000.0, momentum=0.5)
