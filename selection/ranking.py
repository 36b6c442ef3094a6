"""Shared pieces of the rules: ordering by a score with random tie-breaks, feature spaces."""

from __future__ import annotations

import torch

from .base import SelectionError

__all__ = ["top_k", "space_signal", "check_choice_option", "score_order", "ORDERS"]

#: The two orders every score-based rule takes, beside its own names for them. Sorscher,
#: Geirhos, Shekhar, Ganguli & Morcos, "Beyond neural scaling laws: beating power law scaling
#: via data pruning", NeurIPS 2022: keep the *easiest* examples when little data is kept, the
#: *hardest* when much is.
ORDERS = ("hardest", "easiest")

SPACES = ("embedding", "pixels")


def top_k(scores: torch.Tensor, k: int, generator: torch.Generator,
          descending: bool = True) -> torch.Tensor:
    """Positions of the ``k`` highest (or lowest) scores; ties broken at random.

    A random permutation first, then a *stable* sort, so equal scores keep the random order
    (reproducible from ``generator``). ``+inf`` sorts first when descending.
    """
    perm = torch.randperm(scores.numel(), generator=generator)
    order = torch.sort(scores[perm], descending=descending, stable=True).indices
    return perm[order[:k]]


def check_choice_option(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise SelectionError(f"option {name} must be one of {', '.join(valid)}, got {value!r}")
    return value


def score_order(value: str, hard: str, easy: str) -> str:
    """Map ``hardest`` / ``easiest`` (or the rule's own names ``hard`` / ``easy``) to the
    rule's own name."""
    check_choice_option("order", value, (hard, easy) + ORDERS)
    return {"hardest": hard, "easiest": easy}.get(value, value)


def space_signal(space: str) -> str:
    """The signal a feature-space option maps to."""
    return check_choice_option("space", space, SPACES)
