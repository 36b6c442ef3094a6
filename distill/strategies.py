"""Meta-gradient strategies: how a teacher is told to improve, one protocol, chosen by name.

A *teacher* makes training batches with a graph to its parameters (a
:class:`~distill.synthetic.SyntheticSet`, or a generator in ``gtn``). It provides

* ``class_batch(c, generator) -> (images, targets)``: a batch of class ``c``;
* ``batch(size, generator) -> (images, targets)``: a batch of any classes (``None``: all);
* ``lr_tensor() -> Tensor | None``: a learnable student learning rate, if it has one;
* ``parameters()``: what the meta-optimiser updates.

A strategy's :meth:`Strategy.step` runs one meta-iteration on a fresh student: it computes the
meta-loss, leaves the teacher's gradients in ``.grad``, checks them (:func:`check_finite`) and
steps the meta-optimiser (several times for DC's outer loop). Strategies hold no state across
iterations, so a run resumes from (teacher, optimiser, generator) alone.

===========  =====================================================================
name         meta-gradient
===========  =====================================================================
matching     per-class gradient matching (DC: Zhao, Mopuri & Bilen, ICLR 2021)
             — ``dc``; with siamese augmentation ``dsa`` (Zhao & Bilen, ICML 2021)
distribution embedding-mean matching on random networks (DM: Zhao & Bilen, WACV 2023)
unrolled     backprop through T student steps (DD: Wang et al. 2018), via ``higher``
implicit     implicit function theorem + Neumann series (Lorraine, Vicol & Duvenaud,
             AISTATS 2020); no graph across the T student steps
===========  =====================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .augment import AugmentConfig, DiffAugment
from .data import ImageSet
from .distribution import distribution_loss
from .engine import TrainConfig, classification_loss, train
from .hypergrad import (StepRecord, implicit_hypergradient, sampled_parts,
                        step_size_hypergradient, trajectory_coefficients,
                        trajectory_hypergradient)
from .matching import matching_loss
from .unrolled import unrolled_loss

__all__ = ["ConfigError", "Teacher", "RealSampler", "NonFiniteError", "StrategyConfig", "Strategy",
           "STRATEGIES", "METHODS", "make_strategy", "check_finite", "dc_loops"]

log = logging.getLogger("gtnkit")

StudentFactory = Callable[[torch.Generator], nn.Module]

# DC's (outer, inner) loop table: Zhao, Mopuri & Bilen's released settings per IPC.
_DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer, inner) loops of DC for ``ipc`` (the nearest tabulated IPC not above it)."""
    key = max(k for k in _DC_LOOPS if k <= max(ipc, 1))
    return _DC_LOOPS[key]


class ConfigError(ValueError):
    """An invalid strategy/loop option (one line)."""


class NonFiniteError(ArithmeticError):
    """A meta-loss or a teacher gradient became NaN/inf; the update was not applied."""


class Teacher(Protocol):
    def class_batch(self, c: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batch(self, size: int | None, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def lr_tensor(self) -> torch.Tensor | None: ...

    def parameters(self): ...


class RealSampler:
    """Random real batches, per class or mixed, drawn from a passed generator."""

    def __init__(self, dataset: ImageSet, device: torch.device | str = "cpu"):
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.num_classes = dataset.info.num_classes
        self._members = [dataset.class_indices(c).cpu() for c in range(self.num_classes)]

    def class_batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        m = self._members[c]
        idx = m[torch.randperm(m.numel(), generator=generator)[:n]]
        return self.images[idx.to(self.images.device)]

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(self.labels.numel(), generator=generator)[:n].to(self.images.device)
        return self.images[idx], self.labels[idx]


MIXED_AT = ("final", "trajectory")


@dataclass(frozen=True)
class StrategyConfig:
    """Every strategy knob (each strategy reads the ones it uses).

    Attributes:
        real_batch: real images per class per matching step (DC: 256); for ``unrolled`` /
            ``implicit`` the size of the real batch the student is scored on.
        outer_loop / inner_loop: DC's loops; ``None`` takes :func:`dc_loops` (IPC).
        net_lr: lr of the student trained between outer loops (DC: 0.01, no momentum).
        distance: ``layerwise`` | ``mse`` | ``cosine`` (see :mod:`distill.distances`).
        augment: DSA op string for ``dsa`` / ``distribution`` ("" = none).
        inner_steps: T student steps of ``unrolled`` / ``implicit``.
        inner_lr, inner_momentum, inner_weight_decay: the student's SGD there.
        inner_batch: teacher images per student step (``None``: all of them).
        truncate, checkpoint_steps: memory/time trade-offs of ``unrolled`` (truncated
            backprop; gradient checkpointing in segments of this many steps).
        neumann_terms, neumann_alpha: K and α of ``implicit``.
        compile: compute the real-data side (gradients for ``matching``, embeddings for
            ``distribution``) with ``torch.compile``'d students: fused kernels, same result
            up to float rounding. The synthetic side stays eager (it needs double backward).
            Falls back to eager, with a warning, where compilation fails.
        real_chunk: ``matching`` computes each real gradient in pieces of this many images
            (same gradient up to rounding; smaller batches can be faster on a CPU).
        mixed_sample: ``implicit`` with a curriculum: compute the mixed term of only this many
            of the T batches, drawn without replacement and scaled by T / k (an unbiased
            estimate of the sum; ``None``: all T). Cuts the time of a meta-step.
        mixed_at: ``implicit``: where each batch's mixed term is evaluated: ``final`` (the
            implicit function theorem at the trained student, Neumann-series inverse
            Hessian) or ``trajectory`` (at the student state where the batch was trained
            on, first-order through the trajectory; no Hessian: see
            :func:`distill.hypergrad.trajectory_hypergradient`).
        step_size_grad: ``implicit`` also learns the student's learned step sizes (per-step
            lr, momentum) by the first-order trajectory hypergradient (see
            :func:`distill.hypergrad.step_size_hypergradient`); the implicit gradient itself
            never reaches them (the inner optimum does not depend on the step size).
        grad_clip: clip the teacher's gradient to this global L2 norm before each update
            (``None``: no clipping).
        intermediate_every, intermediate_weight: ``unrolled``'s *intermediate losses* (the
            official GTN code, Such et al., ICML 2020): the student is also scored on the real
            batch after every ``intermediate_every``-th inner step before the last, and the
            meta-loss is ``final + intermediate_weight · mean(intermediate)``; 0 turns them off.
    """

    real_batch: int = 256
    outer_loop: int | None = None
    inner_loop: int | None = None
    net_lr: float = 0.01
    distance: str = "layerwise"
    augment: str = ""
    inner_steps: int = 10
    inner_lr: float = 0.01
    inner_momentum: float = 0.0
    inner_weight_decay: float = 0.0
    inner_batch: int | None = None
    truncate: int | None = None
    checkpoint_steps: int | None = None
    neumann_terms: int = 5
    neumann_alpha: float = 0.01
    compile: bool = False
    real_chunk: int | None = None
    mixed_sample: int | None = None
    mixed_at: str = "final"
    step_size_grad: bool = False
    grad_clip: float | None = None
    intermediate_every: int = 0
    intermediate_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mixed_sample is not None and self.mixed_sample < 1:
            raise ConfigError(f"mixed_sample must be >= 1 (None: every batch), got "
                              f"{self.mixed_sample}")
        if self.mixed_at not in MIXED_AT:
            raise ConfigError(f"unknown mixed_at {self.mixed_at!r}; choose from "
                              f"{', '.join(MIXED_AT)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip is a gradient norm and must be > 0, got "
                              f"{self.grad_clip}")
        if self.intermediate_every < 0:
            raise ConfigError(f"intermediate_every must be >= 0 (0: off), got "
                              f"{self.intermediate_every}")
        if not self.intermediate_weight >= 0:
            raise ConfigError(f"intermediate_weight must be >= 0, got "
                              f"{self.intermediate_weight}")
        for name in ("real_batch", "inner_steps", "neumann_terms"):
            if getattr(self, name) < (0 if name == "neumann_terms" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("outer_loop", "inner_loop", "inner_batch", "truncate", "checkpoint_steps",
                     "real_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.distance not in ("layerwise", "mse", "cosine"):
            raise ConfigError(f"unknown distance {self.distance!r}; use layerwise, mse or cosine")


def check_finite(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Raise :class:`NonFiniteError` when the loss or any ``.grad`` is NaN/inf."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"non-finite meta-loss ({float(loss.detach())})")
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise NonFiniteError("non-finite teacher gradient")


class Strategy:
    """One meta-iteration: ``step(...)`` returns ``{"loss": float}``."""

    name = ""

    def __init__(self, config: StrategyConfig, ipc: int):
        self.config, self.ipc = config, ipc
        self.augment = DiffAugment(AugmentConfig(strategy=config.augment)) if config.augment \
            else None
        self.compiled = config.compile  # becomes False if compilation fails

    def _fast(self, fn: Callable, *args):
        """``fn(compiled_or_eager, *args)``: try the compiled path, fall back to eager once."""
        module = args[0]
        if self.compiled:
            try:
                return fn(torch.compile(module, dynamic=False), *args[1:])
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "use eager"
                log.warning("torch.compile failed (%s); continuing eagerly",
                            str(exc).splitlines()[0][:200])
                self.compiled = False
        return fn(module, *args[1:])

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def _update(self, loss: torch.Tensor, teacher: Teacher, optimizer: torch.optim.Optimizer,
                grads: Sequence[torch.Tensor] | None = None) -> float:
        params = [p for p in teacher.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        if grads is None:
            loss.backward()
        else:
            for p, g in zip(params, grads):
                p.grad = g
        check_finite(loss, params)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        optimizer.step()
        return float(loss.detach())


def _class_batches(teacher, num_classes: int, generator: torch.Generator) -> list:
    """Every class's batch: in one call where the teacher offers it (a generator with batch
    norm must see all classes at once), else class by class."""
    if hasattr(teacher, "class_batches"):
        return teacher.class_batches(generator)
    return [teacher.class_batch(c, generator) for c in range(num_classes)]


class Matching(Strategy):
    """DC / DSA: per-class gradient matching with DC's outer/inner loops."""

    name = "matching"

    def step(self, teacher, optimizer, real, make_student, generator):
        cfg = self.config
        outer, inner = dc_loops(self.ipc)
        outer, inner = cfg.outer_loop or outer, cfg.inner_loop or inner
        net = make_student(generator)
        net.train()
        losses = []
        for ol in range(outer):
            xr = [real.class_batch(c, cfg.real_batch, generator) for c in range(real.num_classes)]
            syn = _class_batches(teacher, real.num_classes, generator)
            loss = self._fast(
                lambda real_net, n: matching_loss(n, xr, [x for x, _ in syn],
                                                  [y for _, y in syn], cfg.distance,
                                                  self.augment, generator, real_model=real_net,
                                                  real_chunk=cfg.real_chunk),
                net, net)
            losses.append(self._update(loss, teacher, optimizer))
            if ol == outer - 1:
                break
            with torch.no_grad():  # the student trains on constants
                x, y = teacher.batch(None, generator)
            inner_cfg = TrainConfig(epochs=inner, lr=cfg.net_lr, momentum=0.0, weight_decay=0.0,
                                    batch_size=256, decay_at=None,
                                    augment=self.augment is not None)
            self._fast(lambda m: train(m, x.detach(), y.detach(), inner_cfg, generator), net)
        return {"loss": sum(losses) / len(losses)}


class Distribution(Strategy):
    """DM: match per-class embedding means of a random, untrained network."""

    name = "distribution"

    def step(self, teacher, optimizer, real, make_student, generator):
        net = make_student(generator)
        net.train()
        net.requires_grad_(False)
        xr = [real.class_batch(c, self.config.real_batch, generator)
              for c in range(real.num_classes)]
        xs = [x for x, _ in _class_batches(teacher, real.num_classes, generator)]
        loss = self._fast(
            lambda real_net, n: distribution_loss(n.embed, xr, xs, self.augment, generator,
                                                  embed_real=real_net),
            _Embed(net), net)
        return {"loss": self._update(loss, teacher, optimizer)}


class _Embed(nn.Module):
    """``model.embed`` as a module (what ``torch.compile`` wraps for DM's real side)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.embed(x)


def _inner_order(teacher, cfg: StrategyConfig, generator: torch.Generator) -> list:
    """What each of the T student steps trains on: a teacher's own curriculum (a GTN's
    ``order``) or T random batches (``None`` entries, drawn by ``batch``)."""
    if hasattr(teacher, "order"):
        return list(teacher.order(generator))
    return [None] * cfg.inner_steps


def _inner_batch(teacher, cfg: StrategyConfig, choice, generator: torch.Generator):
    if hasattr(teacher, "step_batch"):
        return teacher.step_batch(choice, generator)
    return teacher.batch(cfg.inner_batch, generator)


def _mean_part(teacher, cfg: StrategyConfig, net, choice, t: int, generator):
    """A callable: the loss of one of the T curriculum batches, / T (a part of the mean)."""
    def loss():
        x, y = _inner_batch(teacher, cfg, choice, generator)
        return classification_loss(net(x), y) / t
    return loss


def _inner_momentum(teacher, cfg: StrategyConfig):
    """A teacher's learned momentum (GTN) or the configured one."""
    fn = getattr(teacher, "momentum_tensor", None)
    return fn() if fn is not None else cfg.inner_momentum


class Unrolled(Strategy):
    """DD: the real-data loss after T differentiable student steps on the teacher's data."""

    name = "unrolled"

    def step(self, teacher, optimizer, real, make_student, generator):
        cfg = self.config
        net = make_student(generator)
        net.train()
        batches = [_inner_batch(teacher, cfg, c, generator)
                   for c in _inner_order(teacher, cfg, generator)]
        xr, yr = real.batch(cfg.real_batch, generator)
        lr = teacher.lr_tensor()
        loss = unrolled_loss(net, batches, xr, yr, cfg.inner_lr if lr is None else lr,
                             momentum=_inner_momentum(teacher, cfg),
                             weight_decay=cfg.inner_weight_decay,
                             truncate=cfg.truncate, checkpoint_every=cfg.checkpoint_steps,
                             score_every=cfg.intermediate_every,
                             score_weight=cfg.intermediate_weight)
        return {"loss": self._update(loss, teacher, optimizer)}


class Implicit(Strategy):
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

    name = "implicit"

    def step(self, teacher, optimizer, real, make_student, generator):
        cfg = self.config
        net = make_student(generator)
        net.train()
        lr = teacher.lr_tensor()
        order = _inner_order(teacher, cfg, generator)
        lrs = [cfg.inner_lr] * len(order) if lr is None else \
            (lr.detach().expand(len(order)) if lr.dim() == 0 else lr.detach()).tolist()
        momentum = _inner_momentum(teacher, cfg)
        momentum = float(momentum.detach()) if torch.is_tensor(momentum) else momentum
        opt = torch.optim.SGD(net.parameters(), lr=lrs[0], momentum=momentum,
                              weight_decay=cfg.inner_weight_decay)
        record = StepRecord(momentum) if cfg.step_size_grad else None
        trainable = [p for p in net.parameters() if p.requires_grad]
        snapshots = []
        for choice, step_lr in zip(order, lrs):
            if cfg.mixed_at == "trajectory":
                snapshots.append([p.detach().clone() for p in trainable])
            with torch.no_grad():
                x, y = _inner_batch(teacher, cfg, choice, generator)
            for group in opt.param_groups:
                group["lr"] = step_lr
            opt.zero_grad(set_to_none=True)
            classification_loss(net(x), y).backward()
            opt.step()
            if record is not None:
                wd = cfg.inner_weight_decay
                record.add([opt.state[p]["momentum_buffer"] if momentum else p.grad + wd * p
                            for p in trainable])
        params = trainable
        t_count = len(order)
        picks = list(range(t_count))
        if cfg.mixed_sample is not None and cfg.mixed_sample < t_count:
            picks = torch.randperm(t_count, generator=generator)[:cfg.mixed_sample].tolist()
        hparams = [p for p in teacher.parameters() if p.requires_grad]
        if cfg.mixed_at == "trajectory":
            xr, yr = real.batch(cfg.real_batch, generator)
            outer = classification_loss(net(xr), yr)
            v = torch.autograd.grad(outer, params, retain_graph=True)
            coeffs = trajectory_coefficients(lrs, momentum)
            scale = t_count / len(picks)
            grads = trajectory_hypergradient(
                net, [snapshots[t] for t in picks],
                [(lambda c=order[t]: _inner_batch(teacher, cfg, c, generator)) for t in picks],
                [scale * coeffs[t] for t in picks], v, hparams, classification_loss)
        else:
            k = int(torch.randint(t_count, (1,), generator=generator))
            x, y = _inner_batch(teacher, cfg, order[k], generator)
            inner = classification_loss(net(x), y)
            if cfg.inner_weight_decay:
                inner = inner + cfg.inner_weight_decay / 2 * sum((p ** 2).sum() for p in params)
            xr, yr = real.batch(cfg.real_batch, generator)
            outer = classification_loss(net(xr), yr)
            mixed = None
            if hasattr(teacher, "order"):  # a curriculum: the student minimised the mean loss
                # over all T batches, so each of them (its learned noise) gets its mixed term.
                mixed = sampled_parts([_mean_part(teacher, cfg, net, c, t_count, generator)
                                       for c in order], picks)
            grads = implicit_hypergradient(inner, outer, params, hparams, cfg.neumann_terms,
                                           cfg.neumann_alpha, mixed_losses=mixed)
        if record is not None:
            v = torch.autograd.grad(outer, params, retain_graph=True, allow_unused=True)
            v = [torch.zeros_like(p) if g is None else g for p, g in zip(params, v)]
            step_grads = step_size_hypergradient(record, v, cfg.inner_lr if lr is None else lr,
                                                 _inner_momentum(teacher, cfg),
                                                 hparams)
            grads = [g + s for g, s in zip(grads, step_grads)]
        return {"loss": self._update(outer, teacher, optimizer, grads)}


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Matching, Distribution, Unrolled,
                                                              Implicit)}

# The method names of the papers -> (strategy, default augmentation).
METHODS = {
    "dc": ("matching", ""),
    "dsa": ("matching", "color_crop_cutout_flip_scale_rotate"),
    "dm": ("distribution", "color_crop_cutout_flip_scale_rotate"),
    "dd": ("unrolled", ""),
    "ift": ("implicit", ""),
}


def make_strategy(name: str, config: StrategyConfig, ipc: int) -> Strategy:
    """A strategy by its name (``matching``, ``distribution``, ``unrolled``, ``implicit``)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](config, ipc)

