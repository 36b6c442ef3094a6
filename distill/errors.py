"""The typed one-line errors the library raises where a user's input or a run goes wrong.

Each becomes one line at the CLI's edge (never a traceback). They live in one module so that
any layer can raise them without importing the layer that defined them first.
"""

from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteError", "StoreError"]


class ConfigError(ValueError):
    """An invalid strategy/loop option (one line)."""


class NonFiniteError(ArithmeticError):
    """A value became NaN/inf (a meta-loss, a teacher gradient, a student's weights) or was
    read non-finite; nothing computed from it is kept or reported."""


class StoreError(Exception):
    """An unreadable or invalid file, or an output folder that may not be written. One line."""
