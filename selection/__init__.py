"""Coreset selection: pick ``ipc`` real images per class, or a class-balanced fraction of the
data, with a registered rule.

>>> from distill.data import load_dataset
>>> from selection import select
>>> sel = select(load_dataset("mnist"), "herding", ipc=10, seed=0)   # doctest: +SKIP
>>> sel = select(load_dataset("mnist"), "kcenter", fraction=0.1)     # doctest: +SKIP

The data-budget curve (accuracy and training time against the fraction kept) is
:func:`selection.curve.run_curve`.

Rules (one per module, see :func:`available_methods`): random, herding, k-center greedy,
forgetting events, gradient norm (EL2N / GraNd), entropy, k-means and DBSCAN representatives.
"""

from __future__ import annotations

# Importing the rule modules registers them.
from . import dbscan, entropy, forgetting, gradnorm, herding, kcenter, kmeans, random_subset  # noqa: F401,E402
from .base import (
                   SIGNALS,
                   Selection,
                   SelectionError,
                   SelectionMethod,
                   available_methods,
                   check_choice,
                   get_method,
                   register,
)
from .budget import budget_counts, fraction_counts
from .curve import CurveConfig, run_curve
from .driver import select
from .signals import SignalConfig, SignalProvider

__all__ = [
    "CurveConfig",
    "SIGNALS",
    "Selection",
    "SelectionError",
    "SelectionMethod",
    "SignalConfig",
    "SignalProvider",
    "available_methods",
    "budget_counts",
    "fraction_counts",
    "run_curve",
    "check_choice",
    "get_method",
    "register",
    "select",
]
