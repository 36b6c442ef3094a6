"""The one error of architecture search: a bad request, one line."""

from __future__ import annotations

__all__ = ["NASError"]


class NASError(ValueError):
    """Bad search request: unknown proxy kind, a run of another data set, N < 2, ... One line."""
