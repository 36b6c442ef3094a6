"""One progress interface for every long loop in the library.

Library code reports ``(task, done, total)`` through a :class:`Progress`; it never prints. The CLI
passes an implementation that draws bars (click), tests pass nothing (:class:`NullProgress`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

__all__ = ["Progress", "NullProgress", "Task", "task"]


class Task(Protocol):
    def update(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Task]: ...


class _NullTask:
    def update(self, n: int = 1) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        yield _NullTask()


def task(progress: Progress | None, description: str, total: int
         ) -> contextlib.AbstractContextManager[Task]:
    """``progress.task(...)`` or a silent task when ``progress`` is None."""
    return (progress or NullProgress()).task(description, total)
