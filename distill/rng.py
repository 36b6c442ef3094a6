"""Explicit randomness: every stochastic function takes a seed or a ``torch.Generator``.

Seeds for sub-tasks (student ``i`` of an evaluation, class ``c`` of a selection) are derived by
hashing the parent seed with a label, so that adding a student or a class never shifts the
random streams of the others, and no library code ever touches the global RNG.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["child_seed", "generator"]


def child_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and any printable ``keys``."""
    text = "/".join([str(int(seed)), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    """A fresh CPU generator seeded with ``child_seed(seed, *keys)`` (or ``seed`` itself)."""
    g = torch.Generator()
    g.manual_seed(child_seed(seed, *keys) if keys else int(seed))
    return g
