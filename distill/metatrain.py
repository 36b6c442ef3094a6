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

Dataset condensation (:mod:`distill.condense`) and GTN training (:mod:`gtn.train`) are its
two users.
"""
from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .engine import classification_loss
from .inner import compiled_scoring
from .memory import SavedTensorMeter, available_bytes, check_fits, peak_rss_bytes
from .progress import Progress, task
from .rng import generator as make_generator
from .store import (
    NOT_IN_RESULT,
    StoreError,
    atomic_write_bytes,
    fingerprint_of,
    fingerprint_repr,
    read_tagged,
    to_jsonable,
)
from .strategies import (
    ConfigError,
    NonFiniteError,
    RealSampler,
    Strategy,
    StrategyConfig,
    make_strategy,
)
from .teacher import Teacher

__all__ = ["CheckpointError", "MetaConfig", "MetaResult", "meta_train", "SCHEDULES", "scheduled_lr"]

CHECKPOINT_FORMAT = "gtnkit.meta-checkpoint"


class CheckpointError(StoreError):
    """A checkpoint that cannot be read, or belongs to another configuration."""


SCHEDULES = ("constant", "cosine")


def scheduled_lr(lr: float, iteration: int, iterations: int, schedule: str = "constant",
                 floor: float = 0.1) -> float:
    """The teacher's lr at 0-based ``iteration`` of ``iterations``.

    ``cosine``: ``lr · (floor + (1 − floor) · (1 + cos(π · it / (n − 1))) / 2)``, i.e. ``lr``
    at the first iteration and ``floor · lr`` at the last (Loshchilov & Hutter, ICLR 2017; the
    official GTN code decays to 10 %). A pure function of the iteration, so a resumed run
    follows the same schedule.
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
        method: the paper method it configures (:data:`~distill.methods.METHODS`; set by
            :func:`condense_config`), "" for none (a GTN).
        iterations: meta-iterations (fresh students).
        optimizer: ``sgd`` (with ``momentum``) or ``adam`` for the teacher.
        lr, momentum: the teacher's optimiser.
        checkpoint_every: write a checkpoint every this many iterations (and at the end).
        eval_every: call the evaluation callback every this many iterations (0: never).
        memory_iterations: iterations run under the saved-tensor meter.
        schedule: the teacher's lr over the run: ``constant``, or ``cosine`` from ``lr`` down
            to ``lr_floor`` x ``lr`` at the last iteration (:func:`scheduled_lr`).
        lr_floor: the cosine schedule's final fraction of ``lr``, in [0, 1].
        strategy_config: the strategy's knobs.
        memory_check: before the first iteration, estimate the peak memory of a meta-step
            (one differentiable student step measured, times the steps the strategy holds)
            and refuse a run that cannot fit in the memory free on the device
            (:func:`~distill.memory.check_fits`); ``False`` runs it anyway.
    """

    strategy: str = "matching"
    method: str = ""
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
    memory_check: bool = field(default=True, repr=False, metadata=NOT_IN_RESULT)

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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the teacher's lr must be a finite number > 0, got {self.lr}")
        if self.checkpoint_every < 1 or self.eval_every < 0:
            raise ConfigError("checkpoint_every must be >= 1 and eval_every >= 0")


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


def _make_optimizer(config: MetaConfig, params: Sequence[torch.Tensor]
                    ) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _fingerprint(config: MetaConfig, seed: int, extra: dict | None,
                 legacy: bool = False) -> dict:
    """What a checkpoint must match: the configuration, the seed and ``extra`` (a dataclass
    there counts by its ``repr``). Options marked :data:`~distill.store.ADDED_LATER` are left
    out at their default; ``legacy`` renders every field, the form checkpoints had before."""
    as_dict, as_repr = (asdict, repr) if legacy else (fingerprint_of, fingerprint_repr)
    extra = {k: as_repr(v) if is_dataclass(v) and not isinstance(v, type) else v
             for k, v in (extra or {}).items()}
    rendered = as_dict(config)
    for f in fields(config):  # never part of a fingerprint, the legacy form included
        if f.metadata.get("fingerprint") == NOT_IN_RESULT["fingerprint"]:
            rendered.pop(f.name, None)
    return to_jsonable({"config": rendered, "seed": seed, "extra": extra})


def _check_memory(strategy: Strategy, teacher: Teacher,
                  make_student: Callable[[torch.Generator], torch.nn.Module], seed: int,
                  device: torch.device) -> None:
    """Refuse a meta-step that cannot fit, before any work (:func:`check_fits`): one
    differentiable student step on a teacher batch is measured with the saved-tensor meter,
    on its own random stream (the run's is untouched) and with the teacher's buffers (batch
    norm statistics) restored after it."""
    held = strategy.steps_held(teacher.steps)
    if held <= 1:
        return
    g = make_generator(seed, "memory-probe")
    buffers = {name: b.clone() for name, b in teacher.named_buffers()}
    try:
        net = make_student(g)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        with SavedTensorMeter() as meter:
            x, y = teacher.batch(None, g)
            grads = torch.autograd.grad(classification_loss(net(x), y), params,
                                        create_graph=True)
            del grads, x, y
    finally:
        with torch.no_grad():
            for name, b in teacher.named_buffers():
                b.copy_(buffers[name])
    step = max(meter.peak, 1)
    fit = (available_bytes(device) or 0) // step
    shorter = f", or T <= {fit}" if held == teacher.steps and fit >= 1 else ""
    check_fits(step * held, device,
               f"a meta-step of {strategy.name} at T = {teacher.steps} holds {held} inner "
               f"steps of about {step / 2**20:.2f} MiB each: it",
               f"--recompute (unrolled: the same gradient at one step's memory), "
               f"--method implicit{shorter}")


def _load_checkpoint(path: Path, fingerprints: Sequence[dict]) -> dict:
    state = read_tagged(path, CHECKPOINT_FORMAT, "gtnkit meta-training checkpoint",
                        CheckpointError, missing="nothing to resume: {path} does not exist")
    if state.get("fingerprint") not in fingerprints:
        changed = _differences(state.get("fingerprint"), fingerprints[0])
        what = f" ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})" \
            if changed else ""
        raise CheckpointError(f"{path} was written by a run with other options or seed"
                              f"{what}; rerun with the same options, or without --resume")
    return state


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """The options (dotted paths) whose values differ between two fingerprints, each as
    ``name: saved -> now``; a dataclass rendered by its repr counts as one value."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(now), key=str):
            if key in ("config", "extra"):
                out += _differences(saved.get(key), now.get(key), prefix)
            else:
                out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    if saved == now:
        return []
    name = prefix.rstrip(".") or "the run"
    if isinstance(saved, str) and isinstance(now, str) and "(" in saved and "(" in now:
        # a dataclass repr: name its fields that differ
        a, b = _repr_fields(saved), _repr_fields(now)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            return [f"{name}.{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in diff]
    return [f"{name}: {saved!r} -> {now!r}"]


def _repr_fields(text: str) -> dict[str, str]:
    """``Cls(a=1, b=X(c=2))`` -> ``{"a": "1", "b": "X(c=2)"}`` (top-level fields only)."""
    body = text[text.find("(") + 1:text.rfind(")")]
    fields_, depth, current = {}, 0, ""
    for ch in body + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            key, _, value = current.strip().partition("=")
            if key:
                fields_[key] = value
            current = ""
        else:
            current += ch
    return fields_


def meta_train(
    teacher: Teacher,
    real: RealSampler,
    make_student: Callable[[torch.Generator], torch.nn.Module],
    config: MetaConfig,
    seed: int,
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
        checkpoint: file for periodic checkpoints (``None``: none).
        resume: continue from ``checkpoint`` (it must exist and match the configuration).
        evaluate: called as ``evaluate(iteration)`` every ``config.eval_every`` iterations;
            returns a dict stored in the history. It must use its own seeds.
        fingerprint_extra: anything else the checkpoint must match (data set, model, ...;
            a dataclass there counts by its ``repr``).

    Raises:
        NonFiniteError: a non-finite meta-loss or gradient (the teacher update is skipped,
            the checkpoint on disk is the last good one).
        CheckpointError: ``resume`` with a missing, unreadable or foreign checkpoint.
    """
    device = torch.device(device)
    strategy: Strategy = make_strategy(config.strategy, config.strategy_config)
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
        state = _load_checkpoint(path, [fingerprint, _fingerprint(
            config, seed, fingerprint_extra, legacy=True)])
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

    if config.memory_check and start_it < config.iterations:
        _check_memory(strategy, teacher, make_student, seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with task(progress, f"{config.strategy}", config.iterations - start_it) as bar:
        for it in range(start_it, config.iterations):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(config.lr, it, config.iterations, config.schedule,
                                           config.lr_floor)
            try:
                with compiled_scoring(strategy.compiled):
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
