"""Dataset condensation: a :class:`~distill.synthetic.SyntheticSet` improved by a paper
method through the one meta-training loop (:func:`distill.metatrain.meta_train`).

The methods and their defaults are :data:`distill.methods.METHODS`; the DC defaults (Zhao,
Mopuri & Bilen, ICLR 2021) are image lr 0.1 with momentum 0.5, 1000 iterations, real batch 256
per class, (outer, inner) loops by IPC. The loop's names (``MetaConfig``, ``meta_train``, ...)
are also importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .augment import digit_strategy
from .data import ImageSet
from .metatrain import SCHEDULES, CheckpointError, MetaConfig, MetaResult, meta_train, scheduled_lr
from .methods import METHODS, get_method
from .progress import Progress
from .rng import generator as make_generator
from .strategies import STRATEGIES, ConfigError, NonFiniteError, RealSampler
from .synthetic import SyntheticSet

__all__ = ["ConfigError", "MetaConfig", "MetaResult", "CheckpointError", "NonFiniteError",
           "meta_train", "condense", "condense_config", "METHODS", "SCHEDULES",
           "scheduled_lr"]


def condense_config(method: str, iterations: int = 1000, lr: float | None = None,
                    dataset: str | None = None, **overrides: Any) -> MetaConfig:
    """The :class:`MetaConfig` of a paper method (:data:`~distill.methods.METHODS`) with its
    defaults; ``overrides`` set :class:`MetaConfig` fields (``optimizer``, ``momentum``,
    ``checkpoint_every``, ...) or :class:`~distill.strategies.StrategyConfig` fields.

    ``dataset``: the data set it will condense; on digits (MNIST, SVHN) the DSA augmentation
    of dsa / dm drops ``flip``, as the DSA reference prescribes
    (:func:`distill.augment.digit_strategy`).

    Raises:
        ConfigError: an unknown method, or an option its strategy does not have.
    """
    m = get_method(method)
    loop_keys = ("checkpoint_every", "eval_every", "memory_iterations", "optimizer", "momentum",
                 "memory_check")
    loop: dict[str, Any] = {k: overrides.pop(k) for k in loop_keys if k in overrides}
    if m.strategy != "unrolled" and (overrides.get("truncate") or
                                     overrides.get("checkpoint_steps")):
        raise ConfigError(f"truncate and checkpoint_steps apply to dd only (unrolled "
                          f"backprop), not to {method}")
    overrides.setdefault("augment", digit_strategy(m.augment, dataset) if m.augment else "")
    settings: dict[str, Any] = {"optimizer": m.optimizer, "lr": m.lr, "momentum": m.momentum,
                                **loop}
    if lr is not None:
        settings["lr"] = lr
    return MetaConfig(strategy=m.strategy, method=m.name, iterations=iterations,
                      strategy_config=STRATEGIES[m.strategy].config_class(**overrides),
                      **settings)


def condense(
    train_set: ImageSet,
    method: str | MetaConfig,
    ipc: int,
    init: str | torch.Tensor = "real",
    model: str = "convnet",
    seed: int = 0,
    device: torch.device | str = "cpu",
    learn_labels: bool | str = False,
    learn_lr: bool = False,
    inner_steps: int = 10,
    inner_batch: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    evaluate: Callable[[SyntheticSet, int], dict] | None = None,
) -> tuple[SyntheticSet, MetaResult]:
    """Condense ``train_set`` into ``ipc`` learnable images per class with a paper method.

    Args:
        train_set: the real :class:`~distill.data.ImageSet` (training split).
        method: a method's name (``dc`` | ``dsa`` | ``dm`` | ``dd`` | ``ift``: its defaults),
            or its configuration from :func:`condense_config`.
        init: ``"noise"``, ``"real"`` (random real images) or indices into ``train_set``
            (``ipc`` per class, grouped by class), e.g. a coreset from ``selection``.
        model: the zoo spec of the students the teacher is meta-trained against.
        learn_labels / learn_lr: also learn soft labels / the student lr (``dd``);
            ``learn_labels="free"``: unconstrained label vectors (KIP's label learning).
        inner_steps / inner_batch: the set's inner schedule for ``dd`` / ``ift``: T student
            steps on random batches of this many images (``None``: all of them).
        evaluate: ``evaluate(teacher, iteration) -> dict`` for periodic evaluation.

    Returns:
        ``(SyntheticSet, MetaResult)``.

    Raises:
        ConfigError: a bad option (one line).
    """
    from .models import build_model, parse_model_spec

    parse_model_spec(model)
    info = train_set.info
    config = condense_config(method, dataset=info.name) if isinstance(method, str) else method
    if not config.method:
        raise ConfigError("condense needs a paper method's configuration (condense_config)")
    counts = train_set.class_counts()
    if ipc < 1 or ipc > int(min(counts)):
        raise ConfigError(f"ipc must be between 1 and {int(min(counts))} (the smallest class), "
                         f"got {ipc}")
    g = make_generator(seed, "init")
    lr = config.strategy_config.inner_lr if learn_lr else None
    if inner_steps < 1 or (inner_batch is not None and inner_batch < 1):
        raise ConfigError(f"inner_steps and inner_batch must be >= 1, got {inner_steps}, "
                          f"{inner_batch}")
    kw = dict(learn_labels=learn_labels, lr=lr, steps=inner_steps, step_size=inner_batch)
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

    extra = {"dataset": info.name, "method": config.method, "ipc": ipc, "model": model,
             "init": init if isinstance(init, str) else init.tolist(),
             "learn_labels": learn_labels, "learn_lr": learn_lr, "inner_steps": inner_steps,
             "inner_batch": inner_batch}
    result = meta_train(teacher, RealSampler(train_set, device), make_student, config, seed,
                        checkpoint=checkpoint, resume=resume, progress=progress,
                        evaluate=(lambda it: evaluate(teacher, it)) if evaluate else None,
                        fingerprint_extra=extra, device=device)
    return teacher, result
