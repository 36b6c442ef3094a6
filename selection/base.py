"""The selection contract: a registry of per-class selection rules and the typed result.

A selection method is a *rule* that, given what it needs to know about the members of one class
(raw pixels, an embedding, a per-example score), returns the positions of ``k`` of them. The
driver :func:`selection.select` loops over classes, asks the signal provider for exactly the
signal the rule declares, calls the rule and maps positions back to data-set indices. Rules are
therefore pure functions of tensors and are tested as such (oracle tests on tiny inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

__all__ = [
    "Selection",
    "SelectionError",
    "SelectionMethod",
    "SIGNALS",
    "register",
    "get_method",
    "available_methods",
]

#: Signals a rule may ask for, per class member:
#:  ``none``       nothing (the rule only needs the count),
#:  ``pixels``     flattened normalised images, shape (n, C*H*W),
#:  ``embedding``  penultimate features of a network trained on the data, shape (n, d),
#:  ``forgetting`` forgetting-event counts over training, shape (n,) (never-learned = +inf),
#:  ``el2n``       mean L2 norm of the error vector early in training, shape (n,),
#:  ``grand``      mean per-example gradient norm early in training, shape (n,),
#:  ``entropy``    predictive entropy of the trained network, shape (n,).
SIGNALS = ("none", "pixels", "embedding", "forgetting", "el2n", "grand", "entropy")


class SelectionError(ValueError):
    """Bad selection request: unknown method, impossible budget, wrong option. One line."""


@dataclass(frozen=True)
class Selection:
    """The result of a selection: indices into a data set, class by class.

    Attributes:
        indices: (sum(counts),) int64 indices into the source data set, grouped by class
            in increasing class order, each group in the rule's pick order.
        labels: (sum(counts),) int64 class of each picked example.
        method: registry name of the rule that produced it.
        ipc: images per class, or ``None`` when the budget was a fraction.
        seed: the seed the selection was drawn with.
        options: the rule's options, for provenance (written into saved sets).
        counts: images picked per class (all equal to ``ipc`` for an ipc budget).
        fraction: the class-balanced fraction of the pool asked for, or ``None``.
    """

    indices: torch.Tensor
    labels: torch.Tensor
    method: str
    ipc: int | None
    seed: int
    options: dict = field(default_factory=dict)
    counts: tuple[int, ...] = ()
    fraction: float | None = None

    def __len__(self) -> int:
        return int(self.indices.numel())


class SelectionMethod(Protocol):
    """What a registered rule provides.

    ``signal`` names what :meth:`choose` receives (one of :data:`SIGNALS`). Options are
    keyword-only constructor arguments with defaults; :func:`get_method` forwards user options.
    """

    name: ClassVar[str]
    signal: ClassVar[str]

    def choose(self, values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """Pick ``k`` distinct positions out of ``values.shape[0]`` class members.

        Args:
            values: the class members' signal, (n, d) for feature signals, (n,) for scores,
                (n,) zeros for ``none``. On CPU, float32 (scores may hold +inf).
            k: how many to pick, 1 <= k <= n.
            generator: the only source of randomness (CPU generator).

        Returns:
            (k,) int64 tensor of distinct positions in [0, n), in pick order.
        """
        ...


_REGISTRY: dict[str, type[Any]] = {}


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: add a rule to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY:
        raise RuntimeError(f"selection method {name!r} registered twice")
    if cls.signal not in SIGNALS:
        raise RuntimeError(f"selection method {name!r} asks for unknown signal {cls.signal!r}")
    _REGISTRY[name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str, **options: Any) -> SelectionMethod:
    """Instantiate a registered rule with its options.

    Raises:
        SelectionError: unknown name (the message lists the valid ones) or unknown option.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise SelectionError(
            f"unknown selection method {name!r}; choose one of: {', '.join(available_methods())}"
        ) from None
    known = rule_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise SelectionError(
            f"selection method {name!r} has no option {', '.join(map(repr, unknown))}; its "
            f"options (--option KEY=VALUE) are: {valid}")
    try:
        return cls(**options)
    except SelectionError as exc:  # the rule refused a value
        raise SelectionError(f"selection method {name!r}: {exc} (--option KEY=VALUE)") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type
        raise SelectionError(f"bad option value for selection method {name!r} "
                             f"({', '.join(f'{k}={v!r}' for k, v in options.items())}): "
                             f"{str(exc).splitlines()[0]}") from None


def rule_options(cls: type) -> list[str]:
    """The keyword options a rule's constructor takes (what ``--option KEY=VALUE`` accepts)."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_choice(picked: torch.Tensor, n: int, k: int, name: str) -> torch.Tensor:
    """Validate a rule's output (distinct, in range, right count); returns it as int64 CPU."""
    picked = torch.as_tensor(picked).to(device="cpu", dtype=torch.int64).flatten()
    if picked.numel() != k or picked.unique().numel() != k or (picked < 0).any() or \
            (picked >= n).any():
        raise RuntimeError(f"selection rule {name!r} returned an invalid choice of {k} out of {n}")
    return picked


ProgressFn = Callable[[str, int, int], None]
