"""Meta-gradient strategies: how a teacher is told to improve, one protocol, chosen by name.

A *teacher* (:class:`~distill.teacher.Teacher`: a :class:`~distill.synthetic.SyntheticSet`, or a
generator in ``gtn``) makes training batches with a graph to its parameters; strategies ask it
only what its protocol says (per-class batches, the inner schedule, the learned lr and
momentum), so every strategy trains every teacher. The T student steps of ``unrolled`` and
``implicit`` are :func:`distill.inner.student_steps`.

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
unrolled     backprop through T student steps (DD: Wang et al. 2018), functional SGD
implicit     implicit function theorem + Neumann series (Lorraine, Vicol & Duvenaud,
             AISTATS 2020); no graph across the T student steps
===========  =====================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .augment import AugmentConfig, DiffAugment
from .data import ImageSet
from .distribution import distribution_loss
from .engine import TrainConfig, classification_loss, train
from .errors import ConfigError, NonFiniteError
from .hypergrad import (
    SOLVERS,
    StepRecord,
    grad_or_zero,
    implicit_hypergradient,
    sampled_parts,
    step_size_hypergradient,
    trajectory_coefficients,
    trajectory_hypergradient,
)
from .inner import load_params, rate_list, real_loss, student_steps
from .matching import matching_loss
from .store import ADDED_LATER
from .synthetic import dc_loops
from .teacher import Batch, StepChoice, Teacher
from .unrolled import unrolled_loss

__all__ = ["ConfigError", "Teacher", "RealSampler", "NonFiniteError", "StrategyConfig", "Strategy",
           "STRATEGIES", "make_strategy", "check_finite", "dc_loops"]

log = logging.getLogger("gtnkit")

StudentFactory = Callable[[torch.Generator], nn.Module]

class RealSampler:
    """Random real batches, per class or mixed, drawn from a passed generator."""

    def __init__(self, dataset: ImageSet, device: torch.device | str = "cpu") -> None:
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.num_classes = dataset.info.num_classes
        self._members = [dataset.class_indices(c).cpu() for c in range(self.num_classes)]

    def _draw(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` random distinct images of class ``c`` (CPU)."""
        m = self._members[c]
        return m[torch.randperm(m.numel(), generator=generator)[:n]]

    def class_batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.images[self._draw(c, n, generator).to(self.images.device)]

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(self.labels.numel(), generator=generator)[:n].to(self.images.device)
        return self.images[idx], self.labels[idx]

    def balanced_batch(self, n: int, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images, ``n // K`` from every class and one more from each of ``n % K``
        classes drawn at random; in class order. Raises ``ConfigError`` for ``n < K``."""
        k = self.num_classes
        if n < k:
            raise ConfigError(f"a class-balanced batch of {n} images needs at least one per "
                              f"class ({k})")
        extra = set(torch.randperm(k, generator=generator)[:n % k].tolist())
        idx = torch.cat([self._draw(c, n // k + (c in extra), generator)
                         for c in range(k)]).to(self.images.device)
        return self.images[idx], self.labels[idx]


MIXED_AT = ("final", "trajectory")


@dataclass(frozen=True)
class StrategyConfig:
    """Every strategy knob (each strategy reads the ones it uses).

    Attributes:
        real_batch: real images per class per matching step (DC: 256); for ``unrolled`` /
            ``implicit`` the size of the real batch the student is scored on.
        real_per_class: real images per class of ``matching`` / ``distribution`` when it
            differs from ``real_batch`` (``None``: ``real_batch``).
        outer_loop / inner_loop: matching's loops; ``None`` takes the teacher's
            (:meth:`~distill.teacher.Teacher.matching_loops`: DC's by IPC for a synthetic set).
        net_lr: lr of the student trained between outer loops (DC: 0.01, no momentum).
        distance: ``layerwise`` | ``mse`` | ``cosine`` (see :mod:`distill.distances`).
        augment: DSA op string for ``dsa`` / ``distribution`` ("" = none).
        inner_lr, inner_momentum, inner_weight_decay: the student's SGD in ``unrolled`` /
            ``implicit`` (lr and momentum where the teacher does not learn them). The number
            of steps T and their batches are the teacher's (its ``steps`` and ``order``).
        truncate, checkpoint_steps: memory/time trade-offs of ``unrolled`` (truncated
            backprop; gradient checkpointing in segments of this many steps).
        recompute: ``unrolled`` keeps only each step's student parameters and momentum
            buffer (no graph) and, in the backward pass, rebuilds one step at a time with its
            graph (its batch from the teacher, its learned lr and momentum) and pulls the
            gradient back through it: the same gradient as storing every step, memory of one
            step (flat in T) for one extra plain student step per inner step. Reverse-mode
            with stored states (Maclaurin, Duvenaud & Adams, ICML 2015, store the trajectory
            by reversing it instead) and checkpointing at every step (Griewank, 1992); unlike
            ``checkpoint_steps`` the teacher's batches are rebuilt too, not kept. Random
            batches (fresh noise, random subsets) come from one seed per step drawn from the
            meta-step's generator, so they are other draws than the stored unroll's; on the
            same batches the gradient is the same (a learned curriculum draws nothing).
        neumann_terms, neumann_alpha: K and α of ``implicit``.
        ift_solver: ``implicit``'s linear solver for ``H⁻¹ v``: ``neumann`` (K terms of the
            series, step α) or ``cg`` (K conjugate-gradient iterations; α unused).
        compile: compute the real-data side (gradients for ``matching``, embeddings for
            ``distribution``) with ``torch.compile``'d students: fused kernels, same result
            up to float rounding. The synthetic side stays eager (it needs double backward).
            Falls back to eager, with a warning, where compilation fails.
        real_chunk: ``matching`` computes each real gradient, ``distribution`` each real
            embedding mean, in pieces of this many images (same result up to rounding;
            cache-sized pieces are faster on a CPU: :func:`distill.devices.real_chunk_for`).
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
        match_curriculum: ``matching`` with a teacher that has a curriculum (a GTN): match
            each of the T curriculum batches in order, class by class, at the student state
            the few-step protocol reaches there, and step the student on that batch with the
            teacher's per-step lr and momentum (``False``: DC's rounds on fresh per-class
            batches with a plain SGD student at ``net_lr``).
        unroll_tail: ``implicit`` with ``mixed_at="trajectory"``: backpropagate exactly
            through the last this many of the T steps (their batches, learned lr and
            momentum, the student state and momentum buffer that enter them), and use the
            first-order trajectory gradient only for the steps before, driven by the exact
            gradient at the start of the tail. Memory grows with the tail, not with T; a
            tail of T is unrolled backprop and 0 the plain trajectory gradient (truncated
            backpropagation, Shaban et al., AISTATS 2019, with a first-order head).
    """

    real_batch: int = 256
    real_per_class: int | None = None
    outer_loop: int | None = None
    inner_loop: int | None = None
    net_lr: float = 0.01
    distance: str = "layerwise"
    augment: str = ""
    inner_lr: float = 0.01
    inner_momentum: float = 0.0
    inner_weight_decay: float = 0.0
    truncate: int | None = None
    checkpoint_steps: int | None = None
    recompute: bool = field(default=False, metadata=ADDED_LATER)
    neumann_terms: int = 5
    neumann_alpha: float = 0.01
    ift_solver: str = field(default="neumann", metadata=ADDED_LATER)
    compile: bool = False
    real_chunk: int | None = None
    mixed_sample: int | None = None
    mixed_at: str = "final"
    step_size_grad: bool = False
    grad_clip: float | None = None
    intermediate_every: int = 0
    intermediate_weight: float = 1.0
    unroll_tail: int = 0
    match_curriculum: bool = False

    def __post_init__(self) -> None:
        if self.unroll_tail < 0:
            raise ConfigError(f"unroll_tail must be >= 0 (0: off), got {self.unroll_tail}")
        if self.unroll_tail and self.mixed_at != "trajectory":
            raise ConfigError("unroll_tail needs mixed_at='trajectory' (the steps before the "
                              "tail take the trajectory gradient)")
        if self.recompute and (self.truncate is not None or self.checkpoint_steps is not None):
            raise ConfigError("recompute rebuilds every step already: it does not combine "
                              "with truncate or checkpoint_steps")
        if self.mixed_sample is not None and self.mixed_sample < 1:
            raise ConfigError(f"mixed_sample must be >= 1 (None: every batch), got "
                              f"{self.mixed_sample}")
        if self.ift_solver not in SOLVERS:
            raise ConfigError(f"unknown ift_solver {self.ift_solver!r}; choose from "
                              f"{', '.join(SOLVERS)}")
        if self.ift_solver != "neumann" and self.mixed_at == "trajectory":
            raise ConfigError("ift_solver solves the implicit system of mixed_at='final'; the "
                              "trajectory gradient has no linear system to solve")
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
        for name, value, least in (("real_batch", self.real_batch, 1),
                                   ("neumann_terms", self.neumann_terms, 0)):
            if value < least:
                raise ConfigError(f"{name} must be positive, got {value}")
        optional = {"real_per_class": self.real_per_class, "outer_loop": self.outer_loop,
                    "inner_loop": self.inner_loop, "truncate": self.truncate,
                    "checkpoint_steps": self.checkpoint_steps, "real_chunk": self.real_chunk}
        for name, v in optional.items():
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.distance not in ("layerwise", "mse", "cosine"):
            raise ConfigError(f"unknown distance {self.distance!r}; use layerwise, mse or cosine")

    @property
    def per_class(self) -> int:
        """Real images per class of the per-class strategies."""
        return self.real_per_class or self.real_batch


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
    config_class: type[StrategyConfig] = StrategyConfig  # what condense_config builds

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config
        self.augment = DiffAugment(AugmentConfig(strategy=config.augment)) if config.augment \
            else None
        self.compiled = config.compile  # becomes False if compilation fails

    def _fast(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(compiled_or_eager, *args)``: try the compiled path, fall back to eager once."""
        module = args[0]
        if self.compiled:
            from .devices import silence_cuda_home_warning

            silence_cuda_home_warning()
            try:
                return fn(torch.compile(module, dynamic=False), *args[1:])
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "use eager"
                log.warning("torch.compile failed (%s); continuing eagerly",
                            str(exc).splitlines()[0][:200])
                self.compiled = False
        return fn(module, *args[1:])

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        """One meta-iteration on a fresh student; updates the teacher through ``optimizer``."""
        raise NotImplementedError

    def steps_held(self, steps: int) -> int:
        """How many inner steps' graphs a meta-step of T = ``steps`` keeps alive at once (its
        memory in units of one differentiable student step; the memory guard's estimate)."""
        return 1

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

    def _rates(self, teacher: Teacher) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The student's (lr, momentum): the teacher's learned ones, else the config's."""
        lr, momentum = teacher.lr_tensor(), teacher.momentum_tensor()
        return (self.config.inner_lr if lr is None else lr,
                self.config.inner_momentum if momentum is None else momentum)


class Matching(Strategy):
    """DC / DSA: per-class gradient matching with DC's outer/inner loops."""

    name = "matching"

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.config
        if cfg.match_curriculum and teacher.has_curriculum:
            return self._along_curriculum(teacher, optimizer, real, make_student, generator)
        outer, inner = teacher.matching_loops()
        outer, inner = cfg.outer_loop or outer, cfg.inner_loop or inner
        net = make_student(generator)
        net.train()
        batch_norm = _has_batch_norm(net)
        losses = []
        for ol in range(outer):
            if batch_norm:
                freeze_batch_norm(net, real, generator)
            xr = [real.class_batch(c, cfg.per_class, generator) for c in range(real.num_classes)]
            syn = teacher.class_batches(generator)
            loss = self._fast(
                lambda real_net, n, xr=xr, syn=syn: matching_loss(
                    n, xr, [x for x, _ in syn], [y for _, y in syn], cfg.distance, self.augment,
                    generator, real_model=real_net, real_chunk=cfg.real_chunk),
                net, net)
            losses.append(self._update(loss, teacher, optimizer))
            if ol == outer - 1:
                break
            with torch.no_grad():  # the student trains on constants
                x, y = teacher.batch(None, generator)
            # DSA trains the student with its own strategy, parameters per image (DSA's
            # main.py: epoch(..., aug=True) -> DiffAugment(img, args.dsa_strategy, param))
            inner_cfg = TrainConfig(epochs=inner, lr=cfg.net_lr, momentum=0.0, weight_decay=0.0,
                                    batch_size=256, decay_at=None,
                                    augmentation=f"dsa:{cfg.augment}" if cfg.augment else "")
            self._fast(lambda m, x=x, y=y, c=inner_cfg: train(m, x.detach(), y.detach(), c,
                                                               generator), net)
        return {"loss": sum(losses) / len(losses)}

    def _along_curriculum(self, teacher: Teacher, optimizer: torch.optim.Optimizer,
                          real: RealSampler, make_student: StudentFactory,
                          generator: torch.Generator) -> dict[str, float]:
        """Match the T curriculum batches in order at the states the student visits.

        Gradient matching for a generative teacher (Medvedev & D'yakonov, AIST 2021) made to
        follow the few-step protocol the teacher is scored by: step t matches the gradient of
        curriculum batch t, class by class, against a real batch of each class present, at
        the student after steps 0..t-1 (taken on the earlier curriculum batches with the
        teacher's lr and momentum), updates the teacher, then takes step t itself. So the
        states where gradients are compared are those a student trained on the curriculum
        passes through, and the learned noise of every step is trained.
        """
        cfg = self.config
        net = make_student(generator)
        net.train()
        batch_norm = _has_batch_norm(net)
        order = teacher.order(generator)
        lr, momentum = (torch.as_tensor(r).detach() for r in self._rates(teacher))
        lrs = [float(v) for v in rate_list(lr, len(order), "learning rates")]
        mu = float(momentum)
        params = [p.detach() for p in net.parameters()]
        buffers: list[torch.Tensor | None] | None = None
        losses = []
        for t, choice in enumerate(order):
            load_params(net, params)
            if batch_norm:
                freeze_batch_norm(net, real, generator)
            x, y = teacher.step_batch(choice, generator)
            hard = y if y.dim() == 1 else y.argmax(1)
            present = [c for c in range(real.num_classes) if bool((hard == c).any())]
            picks = [(hard == c).nonzero().flatten() for c in present]
            xr = [real.class_batch(c, cfg.per_class, generator) for c in present]
            xs, ys = [x[i] for i in picks], [y[i] for i in picks]
            loss = self._fast(
                lambda real_net, n, xr=xr, xs=xs, ys=ys, present=present: matching_loss(
                    n, xr, xs, ys, cfg.distance, self.augment, generator, real_model=real_net,
                    real_chunk=cfg.real_chunk, classes=present),
                net, net)
            losses.append(self._update(loss, teacher, optimizer))
            net.train()
            state = student_steps(net, params, [(x.detach(), y.detach())],
                                  lrs[t], mu, cfg.inner_weight_decay,
                                  buffers=buffers)
            params, buffers = state.params, state.buffers
        return {"loss": sum(losses) / len(losses)}


def _has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


#: Real images per class the DC reference passes through a batch-norm student before matching.
BN_REAL_PER_CLASS = 16


@torch.no_grad()
def freeze_batch_norm(net: nn.Module, real: RealSampler, generator: torch.Generator,
                      per_class: int = BN_REAL_PER_CLASS) -> None:
    """Update the running statistics of ``net``'s batch norms with one forward pass of
    ``per_class`` real images of every class (train mode: momentum 0.1), then freeze them
    (eval mode) for the matching that follows; the student's own training (``train``) puts
    them back in train mode. As the DC reference's ``main.py`` does before every outer step
    ("Synthetic data batch, e.g. only 1 image/batch, is too small to obtain stable mu and
    sigma", BNSizePC = 16)."""
    x = torch.cat([real.class_batch(c, per_class, generator) for c in range(real.num_classes)])
    net.train()
    net(x)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Distribution(Strategy):
    """DM: match per-class embedding means of a random, untrained network."""

    name = "distribution"

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


def _mean_part(teacher: Teacher, net: nn.Module, choice: StepChoice, t: int,
               generator: torch.Generator) -> Callable[[], torch.Tensor]:
    """A callable: the loss of one of the T curriculum batches, / T (a part of the mean)."""
    def loss() -> torch.Tensor:
        x, y = teacher.step_batch(choice, generator)
        return classification_loss(net(x), y) / t
    return loss


class _Stepwise(Strategy):
    """The meta-gradient through T student steps taken one graph at a time: the steps run
    without a graph (their states kept), an exactly differentiated tail of them, and the
    steps before it either first-order (implicit) or rebuilt one by one (unrolled)."""

    def _tail_step(self, teacher: Teacher, optimizer: torch.optim.Optimizer,
                   real: RealSampler, net: nn.Module, order: list[StepChoice],
                   lrs: list[float], momentum: float, generator: torch.Generator, tail: int,
                   exact: bool) -> dict[str, float]:
        """The first T − ``tail`` steps plain (states kept), the last ``tail`` with their
        graph; the exact gradient through the tail reaches the teacher
        (its batches, lr and momentum) and, as ``v`` (the parameters) and ``u`` (the
        momentum buffer) at the tail's start, drives the head: the first-order trajectory
        gradient (implicit's ``unroll_tail``) or, ``exact``, the step-by-step backward pass
        (unrolled's ``recompute``)."""
        cfg = self.config
        t_count = len(order)
        h = t_count - min(tail, t_count)
        batch = _replayable(teacher, order, generator)
        xr, yr = real.batch(cfg.real_batch, generator)
        # intermediate losses (``exact``: unrolled's): the student scored after these steps
        every = cfg.intermediate_every if exact else 0
        scored = {t for t in range(t_count - 1) if every and (t + 1) % every == 0}
        weight = cfg.intermediate_weight / len(scored) if scored else 0.0
        trainable = [p.requires_grad for p in net.parameters()]
        if exact and not all(trainable):
            raise ConfigError("recompute needs a student whose parameters all train")
        snapshots: list[list[torch.Tensor]] = []
        states: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]] = []

        def remember(t: int, ps: list[torch.Tensor]) -> None:
            snapshots.append([q.detach().clone() for q, keep_q in zip(ps, trainable) if keep_q])

        params0 = [p.detach() for p in net.parameters()]
        if not exact:  # the first-order head reads consecutive snapshots
            remember(-1, params0)
        head_params = params0
        head_bufs: list[torch.Tensor | None] = [None] * len(params0)
        if exact:  # step by step, keeping each step's parameters and momentum buffers
            for t in range(h):
                states.append((head_params, head_bufs))
                with torch.no_grad():
                    xb = batch(t)()
                st = student_steps(net, head_params, [xb], lrs[t:t + 1], momentum,
                                   cfg.inner_weight_decay, buffers=head_bufs)
                head_params, head_bufs = st.params, list(st.buffers)
        elif h:
            head = student_steps(net, params0, (_no_graph(batch(t)) for t in range(h)),
                                 lrs[:h], momentum, cfg.inner_weight_decay,
                                 after_step=remember)
            head_params, head_bufs = head.params, list(head.buffers)
        lr, mom = self._rates(teacher)
        tail_lr = lr[h:] if torch.is_tensor(lr) and lr.dim() == 1 else lr
        w = [p.detach().requires_grad_() for p in head_params]
        bufs = [None if b is None else b.detach().requires_grad_() for b in head_bufs]

        def score(t: int, ps: list[torch.Tensor]) -> torch.Tensor | None:
            return real_loss(net, ps, xr, yr) if h + t in scored else None

        last = student_steps(net, w, (batch(t)() for t in range(h, t_count)),
                             tail_lr, mom, cfg.inner_weight_decay, differentiable=True,
                             buffers=bufs, after_step=score if scored else None)
        outer = real_loss(net, last.params, xr, yr)
        if last.losses:
            outer = outer + weight * torch.stack(last.losses).sum()
        hparams = [p for p in teacher.parameters() if p.requires_grad]
        buf_leaves: list[torch.Tensor] = [b for b in bufs if b is not None]
        full = grad_or_zero(outer, [*hparams, *w, *buf_leaves])
        grads = full[:len(hparams)]
        v = [g for g, keep_q in zip(full[len(hparams):len(hparams) + len(w)], trainable)
             if keep_q]
        if exact and h:
            scores = {t: weight for t in scored if t < h}
            head_grads, head_loss = self._exact_head(
                teacher, net, states, head_params, batch, v, full[len(hparams) + len(w):],
                hparams, scores, (xr, yr))
            grads = [a + b for a, b in zip(grads, head_grads)]
            outer = outer.detach() + head_loss
        elif h:
            picks = list(range(h))
            if cfg.mixed_sample is not None and cfg.mixed_sample < h:
                picks = torch.randperm(h, generator=generator)[:cfg.mixed_sample].tolist()
            scale = h / len(picks)
            coeffs = trajectory_coefficients(lrs[:h], momentum)
            extra = None
            if buf_leaves:  # buf_{h-1} = Σ_t m^{h-1-t} g_t reaches the tail too
                u = [g for g, keep_q in zip(full[len(hparams) + len(w):], trainable) if keep_q]
                extra = ([-scale * momentum ** (h - 1 - t) for t in picks], u)
            head_grads = trajectory_hypergradient(
                net, [snapshots[t] for t in picks], [batch(t) for t in picks],
                [scale * coeffs[t] for t in picks], v, hparams, classification_loss,
                extra=extra)
            grads = [a + b for a, b in zip(grads, head_grads)]
            if cfg.step_size_grad:
                record = StepRecord(momentum)
                for t in range(h):
                    record.add([(a - b) / lrs[t] for a, b in zip(snapshots[t], snapshots[t + 1])])
                fresh = self._rates(teacher)[0]  # the tail's backward freed lr's graph
                head_lr = fresh[:h] if torch.is_tensor(fresh) and fresh.dim() == 1 else fresh
                step_grads = step_size_hypergradient(record, v, head_lr,
                                                     teacher.momentum_tensor(), hparams)
                grads = [g + s for g, s in zip(grads, step_grads)]
        return {"loss": self._update(outer, teacher, optimizer, grads)}

    def _exact_head(self, teacher: Teacher, net: nn.Module,
                    states: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]],
                    end: list[torch.Tensor], batch: Callable[[int], Callable[[], Batch]],
                    v: list[torch.Tensor], u: list[torch.Tensor], hparams: Sequence[torch.Tensor],
                    scores: dict[int, float], real: Batch
                    ) -> tuple[list[torch.Tensor], float]:
        """The backward pass through the head steps, last first: each step is rebuilt from its
        kept parameters and momentum buffer with its graph (batch, learned lr and momentum),
        and the gradient with respect to its outputs (``v`` for the parameters, ``u`` for the
        non-empty momentum buffers) is pulled back through it to the teacher and to the
        step's inputs (a Hessian-vector product), which the step before receives. Step t in
        ``scores`` adds ``scores[t]`` x the gradient of the real-batch loss after it (an
        intermediate loss) to what its output parameters receive (``end``: after the head).
        Returns the teacher's gradient and the weighted intermediate losses' value."""
        cfg = self.config
        total = [torch.zeros_like(p) for p in hparams]
        scored = 0.0
        grad_w, grad_b = list(v), list(u)
        for t in reversed(range(len(states))):
            params, bufs = states[t]
            if t in scores:
                after = [p.detach().requires_grad_()
                         for p in (states[t + 1][0] if t + 1 < len(states) else end)]
                loss = real_loss(net, after, real[0], real[1])
                g = torch.autograd.grad(loss, after)
                scored += scores[t] * float(loss.detach())
                grad_w = [a + scores[t] * b for a, b in zip(grad_w, g)]
            lr, mom = self._rates(teacher)
            lr_t = lr[t:t + 1] if torch.is_tensor(lr) and lr.dim() == 1 else lr
            w = [p.detach().requires_grad_() for p in params]
            b_in = [None if b is None else b.detach().requires_grad_() for b in bufs]
            st = student_steps(net, w, [batch(t)()], lr_t, mom, cfg.inner_weight_decay,
                               differentiable=True, buffers=b_in)
            outs = [*st.params, *[b for b in st.buffers if b is not None]]
            if len(outs) != len(grad_w) + len(grad_b):
                raise RuntimeError("momentum buffers appeared or vanished between steps")
            b_leaves = [b for b in b_in if b is not None]
            got = grad_or_zero(outs, [*hparams, *w, *b_leaves], [*grad_w, *grad_b])
            total = [a + g for a, g in zip(total, got[:len(hparams)])]
            grad_w = got[len(hparams):len(hparams) + len(w)]
            grad_b = got[len(hparams) + len(w):]
        return total, scored



class Unrolled(_Stepwise):
    """DD: the real-data loss after T differentiable student steps on the teacher's data
    (``recompute``: the same gradient, one step's graph at a time)."""

    name = "unrolled"

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

    name = "implicit"

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


def _plain_rates(lr: float | torch.Tensor, momentum: float | torch.Tensor, steps: int
                 ) -> tuple[list[float], float]:
    """The student's per-step learning rates and momentum as plain numbers."""
    lrs = [float(lr)] * steps if not torch.is_tensor(lr) else \
        (lr.detach().expand(steps) if lr.dim() == 0 else lr.detach()).tolist()
    return lrs, float(momentum.detach()) if torch.is_tensor(momentum) else float(momentum)


def _replayable(teacher: Teacher, order: list[StepChoice], generator: torch.Generator
                ) -> Callable[[int], Callable[[], Batch]]:
    """``batch(t)()`` builds step t's batch, the same one every time it is called (a step
    recomputed in a backward pass must see the batch it trained on). Fresh-noise steps
    (curriculum ``none``) get a seed each, drawn once from ``generator``; steps on learned
    noise draw nothing."""
    seeds = [None if c is not None else
             int(torch.randint(2 ** 62, (1,), generator=generator)) for c in order]

    def batch(t: int) -> Callable[[], Batch]:
        def build() -> Batch:
            seed = seeds[t]
            if seed is None:
                return teacher.step_batch(order[t], generator)
            g = torch.Generator()
            g.manual_seed(seed)
            return teacher.step_batch(order[t], g)
        return build
    return batch


def _no_graph(build: Callable[[], Batch]) -> Batch:
    with torch.no_grad():
        return build()


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Matching, Distribution, Unrolled,
                                                              Implicit)}

def make_strategy(name: str, config: StrategyConfig) -> Strategy:
    """A strategy by its name (``matching``, ``distribution``, ``unrolled``, ``implicit``)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](config)

