"""One executor for independent work items: every sweep of gtnkit (architecture-search
candidates x training sets, the GTN comparison's (method, T) cells, benchmark cells) is a list
of :class:`WorkItem` s, each a pure function of its inputs and seed, run by one
:class:`Executor`:

* ``local`` (the default): in this process for one worker, else a pool of ``workers`` spawned
  processes (a dead worker process is replaced and its items run again);
* ``ray``: one Ray task per item with ``num_cpus`` / ``num_gpus`` from the config on a running
  cluster (``ray_address`` or ``RAY_ADDRESS``) or on a local Ray runtime started for the sweep
  (``pip install 'gtnkit[ray]'``); a task whose worker process dies is retried
  (``max_retries``) by Ray (:mod:`distill.executor_ray`).

Every backend runs an item with the same torch thread count (:meth:`ExecutorConfig.
item_threads`) and the item's own seed, so the numbers do not depend on the backend or on the
order of completion. A finished item's result is written atomically (by the driver) to
``CACHE/KEY.json`` before anything else sees it, so a rerun, or a driver that was killed and
started again, computes only the missing items. An item that raises is reported in one line
(its key and the error) while the others finish; the sweep then raises one
:class:`SweepError` naming the failed items.

Large inputs that every item reads (training sets, validation tensors) travel once per
worker process as ``shared`` (a pool initialiser; one ``ray.put`` per sweep, fetched once
per Ray worker), and the item function receives them as its first argument.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from . import allocator
from .workitems import (
    _NOTHING,
    KINDS,
    RAY_MISSING,
    Executor,
    ExecutorConfig,
    ExecutorError,
    Outcome,
    RayNotInstalled,
    SweepError,
    SweepResult,
    WorkItem,
    _call,
    _pool_init,
    _pool_item,
    item_device,
    move_tensors,
    shared_on,
)

__all__ = ["KINDS", "RAY_MISSING", "ExecutorConfig", "WorkItem", "SweepResult", "Executor",
           "LocalExecutor", "ExecutorError", "RayNotInstalled", "SweepError",
           "make_executor", "executor_scope", "run_items", "item_device", "move_tensors",
           "shared_on"]

log = logging.getLogger("gtnkit")

class LocalExecutor(Executor):
    """In this process (one worker, or one item to do), else a pool of spawned processes."""

    def _execute(self, items: list[WorkItem], shared: Any, threads: int
                 ) -> Generator[Outcome, None, None]:
        if self.in_process or len(items) == 1:
            for it in items:
                try:
                    value = _call(it.fn, it.args, it.kwargs, shared, threads)
                except Exception as exc:  # Ctrl-C and exits pass
                    yield it.key, False, exc
                    continue
                yield it.key, True, value
            return
        todo, attempts = list(items), 0
        while todo:
            done: set[str] = set()
            broken = False
            with contextlib.closing(self._pool_round(todo, shared, threads)) as round_:
                for outcome in round_:
                    if outcome is None:
                        broken = True
                        continue
                    done.add(outcome[0])
                    yield outcome
            todo = [it for it in todo if it.key not in done]
            if not (broken and todo):
                return
            attempts += 1
            if attempts > self.config.max_retries:
                for it in todo:
                    yield it.key, False, ExecutorError(
                        f"its worker process died {attempts} time(s)")
                return
            log.warning("a worker process died; running %d unfinished item(s) again "
                        "(attempt %d of %d)", len(todo), attempts + 1,
                        self.config.max_retries + 1)

    def _pool_round(self, items: list[WorkItem], shared: Any, threads: int
                    ) -> Generator[Outcome | None, None, None]:
        """One pool over ``items``; yields None once if a worker process died."""
        import multiprocessing as mp
        from concurrent.futures import Future, ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        workers = min(self.config.workers or 1, len(items))
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_pool_init,
                                   initargs=(shared is not _NOTHING,
                                             None if shared is _NOTHING else shared, threads,
                                             allocator.kept()))
        clean = False
        try:
            futures: dict[Future, WorkItem] = {
                pool.submit(_pool_item, it.fn, it.args, dict(it.kwargs)): it for it in items}
            seen: set[Future] = set()
            try:
                for fut in as_completed(futures):
                    seen.add(fut)
                    exc = fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        raise exc
                    yield (futures[fut].key, False, exc) if exc is not None else \
                        (futures[fut].key, True, fut.result())
            except BrokenProcessPool:
                for fut, it in futures.items():  # finished before the death: keep them
                    if fut not in seen and fut.done() and not fut.cancelled() and \
                            fut.exception() is None:
                        yield it.key, True, fut.result()
                yield None
            clean = True
        finally:
            if not clean:  # stopped (Ctrl-C, a failing callback): now, not after the items
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    with contextlib.suppress(Exception):
                        proc.terminate()
            pool.shutdown(wait=clean, cancel_futures=True)


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """The executor of ``config`` (default: local, in this process).

    Raises:
        RayNotInstalled: ``kind="ray"`` without Ray (one line saying how to install it).
        ExecutorError: the Ray cluster cannot be reached or the local runtime started.
    """
    config = config or ExecutorConfig()
    if config.kind == "ray":
        from .executor_ray import RayExecutor

        return RayExecutor(config)
    return LocalExecutor(config)


@contextlib.contextmanager
def executor_scope(spec: Executor | ExecutorConfig | None) -> Iterator[Executor]:
    """An executor for a ``with`` block: ``spec`` itself when it is one (left open), else a
    new one from the config (closed on leaving)."""
    if isinstance(spec, Executor):
        yield spec
        return
    with make_executor(spec) as ex:
        yield ex


def run_items(items: Sequence[WorkItem], config: ExecutorConfig | None = None, *,
              shared: Any = None, cache: str | os.PathLike | None = None,
              fresh: bool = False, on_result: Callable[[str, Any], None] | None = None
              ) -> SweepResult:
    """One sweep with a new executor of ``config`` (see :meth:`Executor.run`)."""
    with make_executor(config) as ex:
        return ex.run(items, shared=shared, cache=cache, fresh=fresh, on_result=on_result)
