"""How many images each class gets: a fixed ``ipc``, or a class-balanced ``fraction``.

A fraction ``f`` of a pool with class sizes ``n_c`` (total ``N``) keeps

* ``total = floor(f * N + 1/2)`` images (round half up), shared out
* in proportion to the class sizes (a stratified sample: every class keeps its share of the
  data, as in the selection article), by the largest-remainder (Hamilton) rule: class ``c``
  first gets ``floor(f * n_c)``; the ``total - sum_c floor(f * n_c)`` images left go one each to
  the classes with the largest remainders ``f * n_c - floor(f * n_c)``, ties to the lower
  class index.

The arithmetic is exact on the decimal value of ``f`` (its shortest ``repr``, so 0.29 means
29/100). So the counts always sum to ``total``, differ from ``f * n_c`` by less than one, and never
exceed ``n_c``. ``f = 1`` keeps everything. A fraction that leaves some class with no image
is refused (a coreset must cover every class).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from .base import SelectionError

__all__ = ["check_fraction", "fraction_counts", "budget_counts"]


def check_fraction(fraction: Any) -> float:
    """A fraction of the data in (0, 1]; anything else is a one-line :class:`SelectionError`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise SelectionError(f"fraction must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise SelectionError(f"fraction must be in (0, 1], got {fraction}")
    return f


def fraction_counts(fraction: float, class_counts: torch.Tensor) -> torch.Tensor:
    """Per-class budget for a class-balanced ``fraction`` (rounding in the module docstring).

    Args:
        fraction: in (0, 1].
        class_counts: (C,) int64 class sizes of the pool.

    Returns:
        (C,) int64 counts with ``counts.sum() == floor(fraction * N + 1/2)`` and
        ``0 < counts <= class_counts``.

    Raises:
        SelectionError: bad fraction, or a class that would get no image.
    """
    f = check_fraction(fraction)
    sizes = torch.as_tensor(class_counts, dtype=torch.int64).cpu()
    # Exact rational arithmetic on the decimal the user typed (the shortest repr of the
    # float): in float64, 0.29 * 100 is 28.999999999999996, whose floor is 28, not 29.
    q = Fraction(repr(f))
    num, den = q.numerator, q.denominator
    exact = [(num * int(n), den) for n in sizes.tolist()]
    floors = [a // b for a, b in exact]
    total = (2 * num * int(sizes.sum()) + den) // (2 * den)       # round half up
    remainders = [(a - fl * b) for (a, b), fl in zip(exact, floors)]
    order = sorted(range(len(floors)), key=lambda c: (-remainders[c], c))
    counts = list(floors)
    for c in order[:total - sum(floors)]:
        counts[c] += 1
    out = torch.tensor(counts, dtype=torch.int64)
    if (out < 1).any():
        c = int(torch.nonzero(out < 1)[0])
        raise SelectionError(
            f"fraction {fraction} leaves class {c} ({int(sizes[c])} candidate images) empty; "
            f"use a fraction of at least {1 / int(sizes.min()):.2g} or --ipc")
    return out


def budget_counts(class_counts: torch.Tensor, ipc: Any = None,
                  fraction: Any = None) -> torch.Tensor:
    """Per-class counts for exactly one of ``ipc`` (same for every class) or ``fraction``.

    Raises:
        SelectionError: neither or both given, a bad ``ipc`` or ``fraction``, or a budget larger
            than a class.
    """
    if (ipc is None) == (fraction is None):
        raise SelectionError("give exactly one of ipc (images per class) and fraction")
    sizes = torch.as_tensor(class_counts, dtype=torch.int64).cpu()
    if fraction is not None:
        return fraction_counts(fraction, sizes)
    if isinstance(ipc, bool) or not isinstance(ipc, int):
        raise SelectionError(f"ipc must be an integer, got {ipc!r}")
    if ipc < 1:
        raise SelectionError(f"ipc must be at least 1, got {ipc}")
    smallest = int(sizes.min())
    if ipc > smallest:
        c = int(sizes.argmin())
        raise SelectionError(
            f"ipc {ipc} is larger than class {c}, which has {smallest} candidate images")
    return torch.full_like(sizes, ipc)
