"""Training the candidates: one fresh student per (candidate, training set), seeded by the
candidate alone, cached one JSON file per result; each pair is a work item of
:mod:`distill.executor` (in-process, a local pool or Ray tasks)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from distill.data import ImageSet
from distill.engine import accuracy, train
from distill.executor import (
    Executor,
    ExecutorConfig,
    WorkItem,
    executor_scope,
    item_device,
    move_tensors,
    shared_on,
)
from distill.models import build_model
from distill.progress import Progress, task
from distill.rng import generator as make_generator
from distill.store import to_jsonable

from .errors import NASError
from .proxies import TrainSet, tensor_digest
from .space import Candidate

__all__ = ["train_candidate", "evaluate_candidates"]


def _fingerprint(ts: TrainSet, val: ImageSet, dataset: str) -> tuple[str, dict]:
    """What a cached accuracy depends on (besides candidate and seed): data set, training
    data, schedule and validation data."""
    # version 3: the zoo's 28-pixel ConvNet became the published DC one (first padding 3)
    # under the same spec, so entries of version 2 trained another network.
    fp = {"version": 3, "dataset": dataset, "kind": ts.label, "train": asdict(ts.train),
          "data": ts.digest(), "validation": tensor_digest(val.images, val.labels)}
    if ts.step_lrs is not None:
        fp.update(step_lrs=list(ts.step_lrs), momentum=ts.momentum)
    text = json.dumps(to_jsonable(fp), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest(), fp


def _safe(label: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return keep[:40]


def _cache_key(dataset: str, label: str, fp: str, cand: Candidate, seed: int) -> str:
    """The work item's key: its cache file is ``CACHE/KEY.json``."""
    return f"{dataset}/{_safe(label)}-{fp}/{cand.id}-s{seed}"


def _valid_entry(cand: Candidate, fp: str, entry: object) -> bool:
    """A finished entry for this key (not partial, not another candidate or fingerprint)."""
    if not isinstance(entry, dict) or entry.get("spec") != cand.spec or \
            entry.get("fingerprint") != fp:
        return False
    return all(isinstance(entry.get(k), (int, float))
               for k in ("accuracy", "seconds", "train_seconds", "steps"))


def train_candidate(spec: str, ts: TrainSet, val_x: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, seed: int, cand_id: str) -> dict:
    """Train one fresh candidate on ``ts`` and score it on the validation split.

    The initialisation and batch order come from ``child_seed(seed, "nas", cand_id)`` only.

    Returns:
        ``{"accuracy": % on validation, "seconds": wall time (build, train and score),
        "train_seconds": the training loop's time, "steps": SGD steps, "final_loss"}``.
    """
    start = time.perf_counter()
    g = make_generator(seed, "nas", cand_id)
    c, h, w = ts.images.shape[1:]
    model = build_model(spec, int(c), num_classes, (int(h), int(w)), generator=g)
    model = model.to(ts.images.device)
    if ts.step_lrs is not None:
        train_seconds, steps, final_loss = _few_steps(model, ts)
    else:
        stats = train(model, ts.images, ts.labels, ts.train, g)
        train_seconds, steps, final_loss = stats.seconds, stats.steps, stats.final_loss
    acc = 100.0 * accuracy(model, val_x, val_y)
    return {"accuracy": acc, "seconds": time.perf_counter() - start,
            "train_seconds": train_seconds, "steps": steps, "final_loss": final_loss}


def _few_steps(model: torch.nn.Module, ts: TrainSet) -> tuple[float, int, float]:
    """A GTN's own protocol: batch t (consecutive ``batch_size`` images) at lr ``step_lrs[t]``,
    SGD with the learned momentum. Returns (seconds, steps, last loss)."""
    from distill.inner import load_params, student_steps

    assert ts.step_lrs is not None
    t0 = time.perf_counter()
    b = ts.train.batch_size
    model.train()
    batches = [(ts.images[i * b:(i + 1) * b], ts.labels[i * b:(i + 1) * b])
               for i in range(len(ts.step_lrs))]
    state = student_steps(model, [p.detach() for p in model.parameters()], batches,
                          list(ts.step_lrs), ts.momentum or 0.0)
    load_params(model, state.params)
    return time.perf_counter() - t0, len(ts.step_lrs), float(state.step_losses[-1])


def _train_item(shared: dict, label: str, spec: str, seed: int, cand_id: str, device: str,
                entry: dict) -> dict:
    """One work item: candidate ``spec`` trained on the set ``label`` of the sweep's shared
    inputs (moved to ``device`` once per worker process); the cache entry."""
    on = shared_on(shared, device)
    out = train_candidate(spec, on["sets"][label], on["val_x"], on["val_y"],
                          on["num_classes"], seed, cand_id)
    return {**entry, **out}


def evaluate_candidates(candidates: Sequence[Candidate], sets: Sequence[TrainSet],
                        val: ImageSet, seed: int, cache: str | os.PathLike | None = None,
                        workers: int = 1, progress: Progress | None = None,
                        log: Callable[[str], None] = lambda s: None,
                        executor: Executor | ExecutorConfig | None = None) -> dict[str, dict]:
    """Accuracy of every candidate trained on every set, reading and filling the cache.

    Every (set, candidate) pair is one work item of :mod:`distill.executor`.

    Args:
        candidates: from :func:`sample_candidates`.
        sets: :class:`TrainSet` per kind (ground truth and proxies), on one device with
            ``val``.
        cache: folder of finished entries (one JSON file per data set / kind fingerprint /
            candidate / seed, written atomically as each finishes). ``None``: no cache.
        workers: local processes when ``executor`` is not given (spawned; each trains whole
            candidates on the sets' device with ``torch.get_num_threads() // workers``
            threads); 1 trains in-process.
        executor: where the items run (:class:`~distill.executor.ExecutorConfig`, or an open
            executor shared by several calls); overrides ``workers``. Results equal those of
            1 worker when the thread counts match (float reductions may otherwise differ in
            the last bits).

    Returns:
        ``{set label: {candidate id: {"accuracy", "seconds", "steps", "cached", ...}}}``.
    """
    if executor is None:
        if workers < 1:
            raise NASError(f"workers must be >= 1, got {workers}")
        executor = ExecutorConfig(workers=workers)
    labels = [ts.label for ts in sets]
    if len(set(labels)) != len(labels):
        raise NASError(f"a proxy is given twice: {', '.join(labels)}")
    dataset = val.info.name
    results: dict[str, dict] = {ts.label: {} for ts in sets}
    items: list[WorkItem] = []
    where: dict[str, tuple[TrainSet, Candidate]] = {}
    with executor_scope(executor) as ex:
        device = item_device(ex.config, val.images.device)
        for ts in sets:
            fp, fp_dict = _fingerprint(ts, val, dataset)
            for cand in candidates:
                # folder: the kind (gtn, dc, ...) and the fingerprint, which holds the label
                key = _cache_key(dataset, ts.meta.get("kind") or ts.label, fp, cand, seed)
                entry = {"id": cand.id, "spec": cand.spec, "kind": ts.label, "seed": seed,
                         "fingerprint": fp, "budget": fp_dict}
                items.append(WorkItem(key, _train_item,
                                      (ts.label, cand.spec, seed, cand.id, device, entry),
                                      accept=functools.partial(_valid_entry, cand, fp)))
                where[key] = ts, cand
        shared = {"sets": {ts.label: ts for ts in sets}, "val_x": val.images,
                  "val_y": val.labels, "num_classes": val.info.num_classes}
        if not ex.in_process:
            shared = move_tensors(shared, "cpu")  # each worker moves them to its device
        todo = ex.missing(items, cache)
        if todo:
            log(f"training {len(todo)} student(s) ({len(items) - len(todo)} cached) with "
                f"{_describe(ex.config)}")
        with task(progress, "candidates", len(todo)) as bar:
            def finish(key: str, entry: dict) -> None:
                ts, cand = where[key]
                log(f"{ts.label:<14} {cand.spec:<48} {entry['accuracy']:6.2f} %  "
                    f"{entry['seconds']:6.1f} s")
                bar.update(1)

            sweep = ex.run(items, shared=shared, cache=cache, on_result=finish)
    for key, entry in sweep.values.items():
        ts, cand = where[key]
        results[ts.label][cand.id] = {**entry, "cached": key in sweep.cached}
    return results


def _describe(config: ExecutorConfig) -> str:
    if config.kind == "ray":
        return f"Ray ({config.workers or 'all free'} worker(s))"
    return f"{config.workers or 1} worker(s)"
