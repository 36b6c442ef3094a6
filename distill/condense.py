"""The one meta-training loop: a teacher improved by a meta-gradient strategy.

Every condensation method (DC, DSA, DM, DD, IFT) and, in ``gtn``, every generative teaching
network runs through :func:`meta_train`:

* each iteration draws a **fresh student** (and every other random choice) from one
  ``torch.Generator`` whose state is checkpointed, so ``resume`` continues the very same
  random stream: an interrupted run ends with the same teacher as an uninterrupted one;
* **periodic evaluation** through a callback that derives its own seeds (it never touches
  the run's stream);
* **checkpoints** every N iterations, written atomically (teacher, meta-optimiser, generator
  state, history, timings, memory);
* a **non-finite guard**: a NaN/inf meta-loss or gradient stops the run with
  :class:`NonFiniteError` before the update; the last good checkpoint on disk is kept;
* **memory and time accounting**: seconds per iteration (strategy work only, not evaluation
  or checkpoints); peak bytes autograd saves during the first ``memory_iterations``
  iterations (their shapes repeat, so the peak does too), the process peak RSS, and the
  CUDA allocator peak on GPU.

The DC defaults (Zhao, Mopuri & Bilen, ICLR 2021) are :func:`condense_config`'s: image lr 0.1
with momentum 0.5, 1000 iterations, real batch 256 per class, (outer, inner) loops by IPC.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .memory import SavedTensorMeter, peak_rss_bytes
from .progress import Progress, task
from .rng import generator as make_generator
from .store import StoreError, atomic_write_bytes, read_tagged, to_jsonable
from .strategies import (METHODS, ConfigError, NonFiniteError, RealSampler, Strategy,
                         StrategyConfig, Teacher, make_strategy)

__all__ = ["ConfigError", "MetaConfig", "MetaResult", "CheckpointError", "NonFiniteError",
           "meta_train", "condense", "condense_config", "METHOD_DEFAULTS", "SCHEDULES",
           "scheduled_lr"]

CHECKPOINT_FORMAT = "gtnkit.meta-checkpoint"


class CheckpointError(StoreError):
    """A checkpoint that cannot be read, or belongs to another configuration."""


SCHEDULES = ("constant", "cosine")


def scheduled_lr(lr: float, iteration: int, iterations: int, schedule: str = "constant",
                 floor: float = 0.1) -> float:
    """The teacher's lr at 0-based ``iteration`` of ``iterations``.

    ``cosine``: ``lr · (floor + (1 − floor) · (1 + cos(π · it / (n − 1))) / 2)``, i.e. ``lr``
    at the first iteration and ``floor · lr`` at the last. A pure function of the iteration,
    so a resumed run follows the same schedule.
    """
    if schedule == "constant" or iterations <= 1:
        return lr
    frac = iteration / (iterations - 1)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


@dataclass(frozen=True)
class MetaConfig:
    """The meta-training loop.

    Attributes:
        strategy: ``matching`` | ``distribution`` | ``unrolled`` | ``implicit``.
        iterations: meta-iterations (fresh students).
        optimizer: ``sgd`` (with ``momentum``) or ``adam`` for the teacher.
        lr, momentum: the teacher's optimiser.
        checkpoint_every: write a checkpoint every this many iterations (and at the end).
        eval_every: call the evaluation callback every this many iterations (0: never).
        memory_iterations: iterations run under the saved-tensor meter.
        schedule: the teacher's lr over the run: ``constant``, or ``cosine`` from ``lr`` down
            to ``lr_floor`` x ``lr`` at the last iteration (the official GTN code: cosine to
            10 %, Such et al., ICML 2020; Loshchilov & Hutter, ICLR 2017).
        lr_floor: the cosine schedule's final fraction of ``lr``, in [0, 1].
        strategy_config: the strategy's knobs.
    """

    strategy: str = "matching"
    iterations: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.5
    checkpoint_every: int = 50
    eval_every: int = 0
    memory_iterations: int = 1
    schedule: str = "constant"
    lr_floor: float = 0.1
    strategy_config: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.schedule!r}; choose from "
                              f"{', '.join(SCHEDULES)}")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ConfigError(f"lr_floor is a fraction of the lr in [0, 1], got {self.lr_floor}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"the teacher's lr must be > 0, got {self.lr}")
        if self.checkpoint_every < 1 or self.eval_every < 0:
            raise ConfigError("checkpoint_every must be >= 1 and eval_every >= 0")


# Per-method defaults: DC/DSA (image lr 0.1, SGD momentum 0.5), DM (lr 1.0), DD and IFT
# (Adam 0.01: their meta-gradients' scale varies with T and the student, Adam is scale-free).
METHOD_DEFAULTS = {
    "dc": dict(optimizer="sgd", lr=0.1, momentum=0.5),
    "dsa": dict(optimizer="sgd", lr=0.1, momentum=0.5),
    "dm": dict(optimizer="sgd", lr=1.0, momentum=0.5),
    "dd": dict(optimizer="adam", lr=0.01, momentum=0.0),
    "ift": dict(optimizer="adam", lr=0.01, momentum=0.0),
}


def condense_config(method: str, iterations: int = 1000, lr: float | None = None,
                    **strategy_overrides) -> MetaConfig:
    """The :class:`MetaConfig` of a paper method (``dc``, ``dsa``, ``dm``, ``dd``, ``ift``)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    strategy, augment = METHODS[method]
    defaults = dict(METHOD_DEFAULTS[method])
    if lr is not None:
        defaults["lr"] = lr
    extra = {k: strategy_overrides.pop(k) for k in ("checkpoint_every", "eval_every",
                                                    "memory_iterations", "optimizer",
                                                    "momentum") if k in strategy_overrides}
    defaults.update(extra)
    strategy_overrides.setdefault("augment", augment)
    return MetaConfig(strategy=strategy, iterations=iterations,
                      strategy_config=StrategyConfig(**strategy_overrides), **defaults)


@dataclass
class MetaResult:
    iterations: int
    losses: list[float]
    evals: list[dict]
    seconds: float                 # strategy work only, summed over all iterations
    seconds_per_iteration: float
    memory: dict
    resumed_from: int | None = None

    def as_dict(self) -> dict:
        return {"iterations": self.iterations, "final_loss": self.losses[-1],
                "losses": self.losses, "evals": self.evals, "seconds": self.seconds,
                "seconds_per_iteration": self.seconds_per_iteration, "memory": self.memory,
                "resumed_from": self.resumed_from}


def _make_optimizer(config: MetaConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _fingerprint(config: MetaConfig, seed: int, extra: dict | None) -> dict:
    return to_jsonable({"config": asdict(config), "seed": seed, "extra": extra or {}})


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    state = read_tagged(path, CHECKPOINT_FORMAT, "gtnkit meta-training checkpoint",
                        CheckpointError, missing="nothing to resume: {path} does not exist")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} was written by a run with other options or seed; "
                              f"rerun with the same options, or without --resume")
    return state


def meta_train(
    teacher: Teacher,
    real: RealSampler,
    make_student: Callable[[torch.Generator], torch.nn.Module],
    config: MetaConfig,
    seed: int,
    ipc: int,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    evaluate: Callable[[int], dict] | None = None,
    fingerprint_extra: dict | None = None,
    device: torch.device | str = "cpu",
) -> MetaResult:
    """Improve ``teacher`` in place for ``config.iterations`` meta-iterations.

    Args:
        teacher: see :class:`~distill.strategies.Teacher`; its parameters are updated.
        real: the real training data sampler.
        make_student: builds a fresh student from a generator (on the right device).
        seed: the run's seed: all randomness comes from ``generator(seed, "meta")``.
        ipc: images per class (DC's loop table).
        checkpoint: file for periodic checkpoints (``None``: none).
        resume: continue from ``checkpoint`` (it must exist and match the configuration).
        evaluate: called as ``evaluate(iteration)`` every ``config.eval_every`` iterations;
            returns a dict stored in the history. It must use its own seeds.
        fingerprint_extra: anything else the checkpoint must match (data set, model, ...).

    Raises:
        NonFiniteError: a non-finite meta-loss or gradient (the teacher update is skipped,
            the checkpoint on disk is the last good one).
        CheckpointError: ``resume`` with a missing, unreadable or foreign checkpoint.
    """
    device = torch.device(device)
    strategy: Strategy = make_strategy(config.strategy, config.strategy_config, ipc)
    params = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, params)
    gen = make_generator(seed, "meta")
    fingerprint = _fingerprint(config, seed, fingerprint_extra)
    path = Path(checkpoint) if checkpoint is not None else None
    losses: list[float] = []
    evals: list[dict] = []
    seconds, saved_peak, start_it, resumed_from = 0.0, 0, 0, None
    if resume:
        if path is None:
            raise CheckpointError("resume needs a checkpoint path")
        state = _load_checkpoint(path, fingerprint)
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        losses, evals = list(state["losses"]), list(state["evals"])
        seconds, saved_peak = float(state["seconds"]), int(state["saved_peak_bytes"])
        start_it = resumed_from = int(state["iteration"])

    def save(iteration: int) -> None:
        if path is None:
            return
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "fingerprint": fingerprint,
                    "iteration": iteration, "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                    "losses": losses, "evals": evals, "seconds": seconds,
                    "saved_peak_bytes": saved_peak}, buf)
        atomic_write_bytes(path, buf.getvalue())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with task(progress, f"{config.strategy}", config.iterations - start_it) as bar:
        for it in range(start_it, config.iterations):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(config.lr, it, config.iterations, config.schedule,
                                           config.lr_floor)
            try:
                if it < config.memory_iterations or (it == start_it and saved_peak == 0):
                    with SavedTensorMeter() as meter:
                        stats = strategy.step(teacher, optimizer, real, make_student, gen)
                    saved_peak = max(saved_peak, meter.peak)
                else:
                    stats = strategy.step(teacher, optimizer, real, make_student, gen)
            except NonFiniteError as exc:
                kept = f"; the last good checkpoint is {path}" if path is not None and \
                    path.exists() else ""
                raise NonFiniteError(f"stopped at iteration {it + 1}: {exc}{kept}") from None
            seconds += time.perf_counter() - t0
            losses.append(stats["loss"])
            done = it + 1
            if evaluate is not None and config.eval_every and done % config.eval_every == 0:
                evals.append({"iteration": done, **evaluate(done)})
            if done % config.checkpoint_every == 0 or done == config.iterations:
                save(done)
            bar.update(1)
    memory = {"saved_peak_bytes": saved_peak, "rss_peak_bytes": peak_rss_bytes(),
              "cuda_peak_bytes": int(torch.cuda.max_memory_allocated(device))
              if device.type == "cuda" else None,
              "measured_iterations": config.memory_iterations}
    n = config.iterations
    return MetaResult(iterations=n, losses=losses, evals=evals, seconds=seconds,
                      seconds_per_iteration=seconds / n, memory=memory,
                      resumed_from=resumed_from)



def condense(
    train_set,
    method: str,
    ipc: int,
    init: str | torch.Tensor = "real",
    model: str = "convnet",
    config: MetaConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    learn_labels: bool = False,
    learn_lr: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    evaluate: Callable[[object, int], dict] | None = None,
):
    """Condense ``train_set`` into ``ipc`` learnable images per class with a paper method.

    Args:
        train_set: the real :class:`~distill.data.ImageSet` (training split).
        method: ``dc`` | ``dsa`` | ``dm`` | ``dd`` | ``ift``.
        init: ``"noise"``, ``"real"`` (random real images) or indices into ``train_set``
            (``ipc`` per class, grouped by class), e.g. a coreset from ``selection``.
        model: the zoo spec of the students the teacher is meta-trained against.
        config: the loop's configuration (default: :func:`condense_config` of ``method``).
        learn_labels / learn_lr: also learn soft labels / the student lr (``dd``).
        evaluate: ``evaluate(teacher, iteration) -> dict`` for periodic evaluation.

    Returns:
        ``(SyntheticSet, MetaResult)``.
    """
    from .models import build_model, parse_model_spec
    from .synthetic import SyntheticSet

    parse_model_spec(model)
    info = train_set.info
    config = config or condense_config(method)
    counts = train_set.class_counts() if hasattr(train_set, "class_counts") else None
    if ipc < 1 or (counts is not None and ipc > int(min(counts))):
        raise ConfigError(f"ipc must be between 1 and {int(min(counts))} (the smallest class), "
                         f"got {ipc}")
    g = make_generator(seed, "init")
    lr = config.strategy_config.inner_lr if learn_lr else None
    kw = dict(learn_labels=learn_labels, lr=lr)
    if isinstance(init, str) and init == "noise":
        teacher = SyntheticSet.from_noise((info.channels, *info.im_size), info.num_classes, ipc,
                                          g, **kw)
    elif isinstance(init, str) and init == "real":
        teacher = SyntheticSet.from_real(train_set, ipc, g, **kw)
    elif torch.is_tensor(init):
        teacher = SyntheticSet.from_indices(train_set, init, **kw)
        if teacher.ipc != ipc:
            raise ConfigError(f"the initial indices hold {teacher.ipc} images per class, "
                              f"not {ipc}")
    else:
        raise ConfigError(f"unknown init {init!r}; use noise, real or a tensor of indices")
    device = torch.device(device)
    teacher = teacher.to(device)

    def make_student(gen: torch.Generator) -> torch.nn.Module:
        return build_model(model, info.channels, info.num_classes, info.im_size,
                           generator=gen).to(device)

    extra = {"dataset": info.name, "method": method, "ipc": ipc, "model": model,
             "init": init if isinstance(init, str) else init.tolist(),
             "learn_labels": learn_labels, "learn_lr": learn_lr}
    result = meta_train(teacher, RealSampler(train_set, device), make_student, config, seed, ipc,
                        checkpoint=checkpoint, resume=resume, progress=progress,
                        evaluate=(lambda it: evaluate(teacher, it)) if evaluate else None,
                        fingerprint_extra=extra, device=device)
    return teacher, result
