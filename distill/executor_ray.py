"""The Ray backend of :mod:`distill.executor`: one Ray task per work item, holding
``cpus_per_item`` CPUs and ``gpus_per_item`` GPUs, on a running cluster (``ray_address`` or
``RAY_ADDRESS``), on a Ray runtime this process already started, or on a local runtime started
for the executor (no dashboard; shut down by :meth:`RayExecutor.close`).

A task whose worker process dies is run again by Ray (``max_retries``); one whose item raises is
not (the driver reports it). The sweep's shared inputs are put in Ray's object store once and
fetched once per worker process. Imported only for ``kind="ray"``: Ray is optional
(``pip install 'gtnkit[ray]'``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from .allocator import kept as allocator_kept
from .workitems import (
    _NOTHING,
    _WORKER,
    Executor,
    ExecutorConfig,
    ExecutorError,
    Outcome,
    RayNotInstalled,
    WorkItem,
    _call,
    _one_line,
    log,
    start_worker,
)

__all__ = ["RayExecutor"]


def _ray_item(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
              threads: int, box: list, keep_freed: bool = False) -> Any:
    """A Ray task: ``box`` holds the sweep's shared ObjectRef (not resolved by Ray, so this
    worker process fetches it once per sweep, not once per item); ``keep_freed``: the
    driver's allocator setting (:mod:`distill.allocator`), taken by the worker process."""
    start_worker(keep_freed)
    shared = _NOTHING
    if box:
        import ray

        ref = box[0]
        if _WORKER.get("ref") != ref.hex():
            _WORKER.update(ref=ref.hex(), ray_shared=None)  # drop the last sweep's first
            _WORKER["ray_shared"] = ray.get(ref)
        shared = _WORKER["ray_shared"]
    return _call(fn, args, kwargs, shared, threads)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayNotInstalled() from None
    return ray


def _worker_path() -> str:
    """The driver's own import paths (a source checkout, ``bench/``) for the workers of a
    local Ray runtime, before theirs."""
    prefixes = tuple({sys.prefix, sys.base_prefix})
    own = [p for p in (os.path.abspath(q) for q in sys.path if q)
           if os.path.isdir(p) and not p.startswith(prefixes)]
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(dict.fromkeys([*own, *(p for p in rest.split(os.pathsep) if p)]))


class RayExecutor(Executor):
    """One Ray task per item, on the cluster at ``ray_address`` / ``RAY_ADDRESS``, on a Ray
    runtime this process already started, or on a local runtime started here (and shut down
    by :meth:`close`)."""

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        ray = _import_ray()
        self._ray = ray
        self._owns = False
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
        if ray.is_initialized():
            if config.ray_address:
                log.warning("Ray is already running in this process; %s is not used",
                            config.ray_address)
            return
        try:
            if address:
                ray.init(address=address, include_dashboard=False,
                         log_to_driver=True)
            else:
                cpus = (math.ceil(config.workers * config.cpus_per_item)
                        if config.workers else None)
                ray.init(num_cpus=cpus, include_dashboard=False,
                         log_to_driver=True,
                         runtime_env={"env_vars": {"PYTHONPATH": _worker_path()}})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
            raise ExecutorError(f"cannot start or reach {where}: {_one_line(exc)}") from None
        self._owns = True

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()
            self._owns = False

    def _execute(self, items: list[WorkItem], shared: Any, threads: int
                 ) -> Generator[Outcome, None, None]:
        ray = self._ray
        c = self.config
        task = ray.remote(_ray_item).options(num_cpus=c.cpus_per_item,
                                             num_gpus=c.gpus_per_item,
                                             max_retries=c.max_retries, retry_exceptions=False)
        box = [] if shared is _NOTHING else [ray.put(shared)]
        cap = c.workers or len(items)
        todo = list(items)
        inflight: dict[Any, WorkItem] = {}
        keep = allocator_kept()
        try:
            while todo or inflight:
                while todo and len(inflight) < cap:
                    it = todo.pop(0)
                    inflight[task.remote(it.fn, tuple(it.args), dict(it.kwargs), threads,
                                         box, keep)] = it
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    it = inflight.pop(ref)
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the item raised
                        cause = getattr(exc, "cause", None)
                        yield it.key, False, cause if isinstance(cause, Exception) else exc
                        continue
                    except ray.exceptions.RayError as exc:  # its worker died too often
                        yield it.key, False, exc
                        continue
                    yield it.key, True, value
        finally:
            for ref in inflight:  # stopped early: do not leave the cluster busy
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
