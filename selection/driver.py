"""The selection driver: validate the budget, gather each class's signal, apply the rule."""

from __future__ import annotations

from typing import Any

import torch

from distill.progress import Progress
from distill.rng import generator as make_generator

from .base import Selection, SelectionMethod, check_choice, get_method
from .budget import budget_counts
from .signals import SignalConfig, SignalProvider

__all__ = ["select", "check_ipc"]


def check_ipc(ipc: Any, class_counts: torch.Tensor) -> int:
    """Validate an images-per-class budget against the (pool's) class sizes."""
    budget_counts(class_counts, ipc=ipc)
    return ipc


def select(
    dataset: Any,
    method: str | SelectionMethod,
    ipc: int | None = None,
    seed: int = 0,
    options: dict | None = None,
    signals: SignalProvider | None = None,
    signal_config: SignalConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    fraction: float | None = None,
) -> Selection:
    """Select ``ipc`` images of every class of ``dataset``, or a class-balanced ``fraction``.

    Args:
        dataset: an ``ImageSet`` (normalised images, labels, ``info``, ``class_indices``).
        method: a registry name (options from ``options``) or a rule instance.
        ipc: images per class, 1 <= ipc <= the smallest class (of the pool).
        fraction: instead of ``ipc``: a fraction in (0, 1] of the pool, shared among classes in
            proportion to their size (rounding: :mod:`selection.budget`).
        seed: the only randomness: class ``c`` uses ``child_seed(seed, "select", name, c)``;
            the signal network and pool are seeded from ``seed`` too unless ``signals`` is
            given (pass one provider to several calls to train the signal network once).
        signal_config: how learned signals are obtained (ignored when ``signals`` is given).

    Returns:
        :class:`Selection` with indices into ``dataset``, grouped by class.

    Raises:
        SelectionError: unknown method or option, bad ``ipc`` / ``fraction`` (or both given).
    """
    rule = get_method(method, **(options or {})) if isinstance(method, str) else method
    if signals is None:
        signals = SignalProvider(dataset, signal_config or SignalConfig(), seed=seed, device=device,
                                 progress=progress)
    sizes = torch.bincount(signals.pool_labels, minlength=dataset.info.num_classes)
    counts = budget_counts(sizes, ipc=ipc, fraction=fraction)
    # Signals only when some class is cut (fraction 1 needs no training run).
    values = signals.get(rule.signal) if bool((counts < sizes).any()) else None
    picked, labels = [], []
    for c in range(dataset.info.num_classes):
        members = signals.class_positions(c)
        k = int(counts[c])
        g = make_generator(seed, "select", rule.name, c)
        if values is None or k == members.numel():  # the whole class: every rule agrees
            local = torch.arange(k)
        else:
            local = check_choice(rule.choose(values[members], k, g), members.numel(), k,
                                 rule.name)
        picked.append(signals.pool[members[local]])
        labels.append(torch.full((k,), c, dtype=torch.int64))
    opts = rule.options() if hasattr(rule, "options") else dict(options or {})
    return Selection(indices=torch.cat(picked), labels=torch.cat(labels), method=rule.name,
                     ipc=ipc, seed=int(seed), options=opts,
                     counts=tuple(int(k) for k in counts.tolist()),
                     fraction=None if fraction is None else float(fraction))
