"""The parts of a sweep every executor shares (:mod:`distill.executor`): the work item, its
config and result, the errors, the result cache, and the :class:`Executor` base whose
backends (:class:`distill.executor.LocalExecutor`, :class:`distill.executor_ray.RayExecutor`)
only say how items run."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .store import atomic_write_json

__all__ = ["KINDS", "RAY_MISSING", "ExecutorConfig", "WorkItem", "SweepResult", "Executor",
           "ExecutorError", "RayNotInstalled", "SweepError", "item_device", "move_tensors",
           "shared_on"]

log = logging.getLogger("gtnkit")

KINDS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install 'gtnkit[ray]'"


class ExecutorError(Exception):
    """A bad executor option, or a Ray runtime that cannot be started or reached. One line."""


class RayNotInstalled(ExecutorError):
    """``kind="ray"`` without Ray installed: says how to install it."""

    def __init__(self) -> None:
        super().__init__(RAY_MISSING)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SweepError(ExecutorError):
    """Some items raised (each was logged with its key and error); the others finished and are
    cached. ``failures`` maps every failed key to its one-line error."""

    def __init__(self, failures: Mapping[str, str], total: int) -> None:
        self.failures = dict(failures)
        first = next(iter(self.failures))
        more = [k for k in self.failures if k != first]
        rest = f"; also failed: {', '.join(more[:8])}{', ...' if len(more) > 8 else ''}" \
            if more else ""
        super().__init__(f"{len(self.failures)} of {total} work item(s) failed: {first}: "
                         f"{self.failures[first]}{rest}")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the items of a sweep run (the CLI's ``--executor``, ``--workers``,
    ``--ray-address``, ``--cpus-per-item``, ``--gpus-per-item``).

    Attributes:
        kind: ``"local"`` (this machine) or ``"ray"`` (Ray tasks).
        workers: local: processes (``None``: 1, in this process). Ray: at most this many items
            in flight (``None``: as many as the cluster's free resources allow); a local Ray
            runtime started for the sweep gets ``workers x cpus_per_item`` CPUs (``None``:
            every CPU of the machine).
        ray_address: a running cluster (``ray://host:10001`` or ``host:6379``); ``None``:
            ``RAY_ADDRESS`` if set, else a local runtime for the sweep.
        cpus_per_item, gpus_per_item: the Ray resources one item holds (fractions allowed).
        threads: torch threads of an item, in every backend; ``None``: local, the driver's
            threads divided by the workers; Ray, ``max(1, floor(cpus_per_item))``.
        max_retries: times an item whose worker process died is run again (Ray: a task's
            ``max_retries``; local: the pool is rebuilt). An item that raises is not retried.
    """

    kind: Literal["local", "ray"] = "local"
    workers: int | None = None
    ray_address: str | None = None
    cpus_per_item: float = 1.0
    gpus_per_item: float = 0.0
    threads: int | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExecutorError(f"unknown executor {self.kind!r}; choose from "
                                f"{', '.join(KINDS)}")
        if self.workers is not None and self.workers < 1:
            raise ExecutorError(f"workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ExecutorError(f"threads must be >= 1, got {self.threads}")
        if self.max_retries < 0:
            raise ExecutorError(f"max_retries must be >= 0, got {self.max_retries}")
        if not (math.isfinite(self.cpus_per_item) and self.cpus_per_item > 0):
            raise ExecutorError(f"cpus per item must be > 0, got {self.cpus_per_item}")
        if not (math.isfinite(self.gpus_per_item) and self.gpus_per_item >= 0):
            raise ExecutorError(f"gpus per item must be >= 0, got {self.gpus_per_item}")
        if self.kind == "local" and self.gpus_per_item > 0:
            raise ExecutorError("--gpus-per-item needs --executor ray (the local pool shares "
                                "the machine's devices; choose them with --device)")
        if self.kind == "local" and self.ray_address:
            raise ExecutorError("--ray-address needs --executor ray")

    @property
    def in_process(self) -> bool:
        """Items run in the calling process (local, one worker)."""
        return self.kind == "local" and (self.workers or 1) == 1

    def item_threads(self) -> int:
        """The torch thread count every item runs with."""
        if self.threads is not None:
            return self.threads
        if self.kind == "ray":
            return max(1, int(self.cpus_per_item))
        return max(1, torch.get_num_threads() // (self.workers or 1))


@dataclass(frozen=True)
class WorkItem:
    """One independent piece of a sweep.

    Attributes:
        key: unique in the sweep; ``/`` separates folders of its cache file
            (``CACHE/KEY.json``).
        fn: a module-level (picklable) function, called ``fn(*args, **kwargs)``, or
            ``fn(shared, *args, **kwargs)`` when the sweep has ``shared`` inputs. Its result
            must be JSON-able when the sweep is cached.
        accept: a cached value is reused only when ``accept(value)`` is true (checked in the
            driver, never pickled); ``None``: any readable value.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    accept: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class SweepResult:
    """``values``: every item's result by key, in the items' order; ``cached``: the keys read
    from the cache (the others were computed now)."""

    values: dict[str, Any]
    cached: frozenset[str]


# --------------------------------------------------------------- what runs in a worker
_NOTHING = object()
_WORKER: dict[str, Any] = {"shared": _NOTHING, "threads": None}


def _call(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
          shared: Any, threads: int) -> Any:
    """``fn`` with the item's torch thread count (restored afterwards)."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        if shared is _NOTHING:
            return fn(*args, **kwargs)
        return fn(shared, *args, **kwargs)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def start_worker(keep_freed: bool) -> None:
    """What a worker process (a local pool's or Ray's) sets as the process that started the
    sweep did: glibc keeping freed memory where the driver's did (:mod:`distill.allocator`),
    and torch's CUDA_HOME warning silenced (a worker's first ``torch.compile`` logs it).
    Idempotent."""
    from .allocator import keep_freed_memory, kept
    from .devices import silence_cuda_home_warning

    if keep_freed and not kept():
        keep_freed_memory()
    silence_cuda_home_warning()


def _pool_init(has_shared: bool, shared: Any, threads: int, keep_freed: bool = False) -> None:
    import signal

    start_worker(keep_freed)

    # Ctrl-C reaches the whole process group: the driver stops the pool (no traceback from
    # every worker); finished items are in the cache already
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER.update(shared=shared if has_shared else _NOTHING, threads=threads)


def _pool_item(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    return _call(fn, args, kwargs, _WORKER["shared"], _WORKER["threads"])


def move_tensors(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with its tensors on ``device``: tensors and objects with a ``to(device)``
    method, inside dicts, lists, tuples and dataclasses (fields replaced)."""
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_tensors(v, device) for v in obj)
    if isinstance(obj, torch.Tensor) or callable(getattr(obj, "to", None)):
        return obj.to(device)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: move_tensors(getattr(obj, f.name), device)
                               for f in fields(obj) if f.init})
    return obj


_MOVED: list[tuple[Any, str, Any]] = []


def shared_on(shared: Any, device: torch.device | str) -> Any:
    """The sweep's shared inputs on ``device``, moved once per worker process (an item calls
    this first; in the driver's process it returns ``shared`` itself when already there)."""
    if not (_MOVED and _MOVED[0][0] is shared and _MOVED[0][1] == str(device)):
        _MOVED[:] = [(shared, str(device), move_tensors(shared, device))]
    return _MOVED[0][2]


def item_device(config: ExecutorConfig, device: torch.device | str) -> str:
    """The device name to give items: ``device`` for the local backend; its type for Ray,
    which hands a task its GPUs as the visible ones (``cuda`` is the first of them).

    Raises:
        ExecutorError: a CUDA device on Ray without ``gpus_per_item`` (Ray hides every GPU
            from a task that holds none).
    """
    device = torch.device(device)
    if config.kind != "ray":
        return str(device)
    if device.type == "cuda" and config.gpus_per_item <= 0:
        raise ExecutorError("--device cuda with --executor ray needs --gpus-per-item > 0 "
                            "(Ray hides the GPUs from a task that holds none)")
    return device.type


# --------------------------------------------------------------- the driver
Outcome = tuple[str, bool, Any]  # (key, finished, value or the exception)


def _cache_path(cache: Path, key: str) -> Path:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ExecutorError(f"work item key {key!r} is not a relative cache path")
    return cache.joinpath(*parts[:-1], parts[-1] + ".json")


def _read_cached(path: Path, accept: Callable[[Any], bool] | None) -> Any:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or torn: compute it again
        return _NOTHING
    if accept is not None and not accept(value):
        return _NOTHING
    return value


class Executor:
    """Runs the items of a sweep (:meth:`run`); a context manager that releases its workers
    (and a Ray runtime it started) on leaving."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    @property
    def in_process(self) -> bool:
        return self.config.in_process

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the executor holds (nothing for the local backend)."""

    def _execute(self, items: list[WorkItem], shared: Any, threads: int
                 ) -> Generator[Outcome, None, None]:
        raise NotImplementedError

    def missing(self, items: Sequence[WorkItem], cache: str | os.PathLike | None
                ) -> list[WorkItem]:
        """The items without a usable entry in ``cache`` (every item when ``None``)."""
        if cache is None:
            return list(items)
        return [it for it in items
                if _read_cached(_cache_path(Path(cache), it.key), it.accept) is _NOTHING]

    def run(self, items: Sequence[WorkItem], *, shared: Any = None,
            cache: str | os.PathLike | None = None, fresh: bool = False,
            on_result: Callable[[str, Any], None] | None = None) -> SweepResult:
        """Run every item not in the cache; results in the items' order.

        Args:
            shared: inputs every item reads (passed as the items' first argument); ``None``:
                none. Give CPU tensors unless :attr:`in_process`: the item moves them to
                its device.
            cache: folder of finished results (``KEY.json``, written atomically by this
                process as each item finishes); ``None``: no cache.
            fresh: compute every item even when cached (and overwrite its entry).
            on_result: called ``(key, value)`` in this process after each computed item is
                cached; an exception from it stops the sweep (the items finished so far
                stay cached).

        Raises:
            SweepError: items raised; every other item finished (and is cached).
        """
        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ExecutorError(f"work item keys must be unique: {', '.join(dup)}")
        folder = Path(cache) if cache is not None else None
        values: dict[str, Any] = {}
        pending: list[WorkItem] = []
        for it in items:
            value = (_read_cached(_cache_path(folder, it.key), it.accept)
                     if folder is not None and not fresh else _NOTHING)
            if value is _NOTHING:
                pending.append(it)
            else:
                values[it.key] = value  # read once here: a later torn write cannot lose it
        cached = frozenset(values)
        failures: dict[str, str] = {}
        first: BaseException | None = None
        if pending:
            outcomes = self._execute(pending, _NOTHING if shared is None else shared,
                                     self.config.item_threads())
            try:
                for key, ok, value in outcomes:
                    if not ok:
                        failures[key] = _one_line(value)
                        first = first or value
                        log.error("work item %s failed: %s", key, failures[key])
                        continue
                    if folder is not None:
                        atomic_write_json(_cache_path(folder, key), value)
                    values[key] = value
                    if on_result is not None:
                        on_result(key, value)
            finally:
                outcomes.close()
                _MOVED.clear()  # in-process items may have held the shared inputs there
        if failures:
            raise SweepError(failures, len(items)) from first
        return SweepResult({k: values[k] for k in keys}, cached)
