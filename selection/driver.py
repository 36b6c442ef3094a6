"""The selection driver: validate the budget, gather each class's signal, apply the rule."""

from __future__ import annotations

from typing import Any

import torch

from distill.progress import Progress
from distill.rng import generator as make_generator

from .base import Selection, SelectionError, SelectionMethod, check_choice, get_method
from .signals import SignalConfig, SignalProvider

__all__ = ["select", "check_ipc"]


def check_ipc(ipc: Any, class_counts: torch.Tensor) -> int:
    """Validate an images-per-class budget against the (pool's) class sizes."""
    if isinstance(ipc, bool) or not isinstance(ipc, int):
        raise SelectionError(f"ipc must be an integer, got {ipc!r}")
    if ipc < 1:
        raise SelectionError(f"ipc must be at least 1, got {ipc}")
    smallest = int(class_counts.min())
    if ipc > smallest:
        c = int(class_counts.argmin())
        raise SelectionError(
            f"ipc {ipc} is larger than class {c}, which has {smallest} candidate images")
    return ipc


def select(
    dataset: Any,
    method: str | SelectionMethod,
    ipc: int,
    seed: int = 0,
    options: dict | None = None,
    signals: SignalProvider | None = None,
    signal_config: SignalConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Selection:
    """Select ``ipc`` images of every class of ``dataset``.

    Args:
        dataset: an ``ImageSet`` (normalised images, labels, ``info``, ``class_indices``).
        method: a registry name (options from ``options``) or a rule instance.
        ipc: images per class, 1 <= ipc <= the smallest class (of the pool).
        seed: the only randomness: class ``c`` uses ``child_seed(seed, "select", name, c)``;
            the signal network and pool are seeded from ``seed`` too unless ``signals`` is
            given (pass one provider to several calls to train the signal network once).
        signal_config: how learned signals are obtained (ignored when ``signals`` is given).

    Returns:
        :class:`Selection` with indices into ``dataset``, grouped by class.

    Raises:
        SelectionError: unknown method or option, bad ``ipc``.
    """
    rule = get_method(method, **(options or {})) if isinstance(method, str) else method
    if signals is None:
        signals = SignalProvider(dataset, signal_config or SignalConfig(), seed=seed, device=device,
                                 progress=progress)
    counts = torch.bincount(signals.pool_labels, minlength=dataset.info.num_classes)
    check_ipc(ipc, counts)
    values = signals.get(rule.signal)
    picked, labels = [], []
    for c in range(dataset.info.num_classes):
        members = signals.class_positions(c)
        g = make_generator(seed, "select", rule.name, c)
        local = check_choice(rule.choose(values[members], ipc, g), members.numel(), ipc, rule.name)
        picked.append(signals.pool[members[local]])
        labels.append(torch.full((ipc,), c, dtype=torch.int64))
    opts = rule.options() if hasattr(rule, "options") else dict(options or {})
    return Selection(indices=torch.cat(picked), labels=torch.cat(labels), method=rule.name,
                     ipc=ipc, seed=int(seed),
                     options=opts)
