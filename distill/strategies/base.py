"""The strategies' common ground: the real-data sampler, the one configuration every
strategy reads its knobs from, the :class:`Strategy` protocol and the registry.

A strategy's :meth:`Strategy.step` runs one meta-iteration on a fresh student: it computes the
meta-loss, leaves the teacher's gradients in ``.grad``, checks them (:func:`check_finite`) and
steps the meta-optimiser (several times for DC's outer loop). Strategies hold no state across
iterations, so a run resumes from (teacher, optimiser, generator) alone.

A strategy is registered where it is defined, by name, with :func:`register_strategy`
(torchvision's ``register_model``): the meta-training loop builds it by that name
(:func:`make_strategy`) and the contract test (``tests/test_contract.py``) runs every
registered strategy with every teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..augment import AugmentConfig, DiffAugment
from ..data import ImageSet
from ..errors import ConfigError, NonFiniteError
from ..hypergrad import SOLVERS
from ..memory import saved_tensor_hooks_active
from ..store import ADDED_LATER
from ..teacher import Teacher

__all__ = ["RealSampler", "StrategyConfig", "Strategy", "STRATEGIES", "register_strategy",
           "make_strategy", "check_finite", "StudentFactory", "MIXED_AT"]

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

    name = ""  # set by :func:`register_strategy`
    config_class: type[StrategyConfig] = StrategyConfig  # what condense_config builds

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config
        self.augment = DiffAugment(AugmentConfig(strategy=config.augment)) if config.augment \
            else None
        self.compiled = config.compile  # becomes False if compilation fails

    def _fast(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(compiled_or_eager, *args)``: try the compiled path, fall back to eager once.
        Under saved-tensor hooks (the memory meter's) it runs eagerly: the compiled graph
        saves other tensors than the eager one, and the meter measures the eager path."""
        module = args[0]
        if self.compiled and not saved_tensor_hooks_active():
            from ..devices import silence_cuda_home_warning

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


#: Every registered strategy by name (filled by :func:`register_strategy` where each is defined).
STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Strategy` subclass as ``name`` (sets its ``name``).

    Raises:
        ValueError: ``name`` is already taken by another class.
    """
    def register(cls: S) -> S:
        old = STRATEGIES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != \
                (cls.__module__, cls.__qualname__):
            raise ValueError(f"strategy {name!r} is already registered ({old.__qualname__})")
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return register


def make_strategy(name: str, config: StrategyConfig) -> Strategy:
    """A registered strategy by its name (``matching``, ``distribution``, ``unrolled``,
    ``implicit``, ``kip``, ...)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](config)
