"""Training the candidates: one fresh student per (candidate, training set), seeded by the
candidate alone, cached one JSON file per result, optionally in a pool of spawned workers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from distill.data import ImageSet
from distill.engine import accuracy, train
from distill.models import build_model
from distill.progress import Progress, task
from distill.rng import generator as make_generator
from distill.store import atomic_write_json, to_jsonable

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


def _cache_path(cache: Path, dataset: str, label: str, fp: str, cand: Candidate, seed: int
                ) -> Path:
    return cache / dataset / f"{_safe(label)}-{fp}" / f"{cand.id}-s{seed}.json"


def _read_cached(path: Path, cand: Candidate, fp: str) -> dict | None:
    """A finished entry, or None when missing, unreadable, partial or for another key."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("spec") != cand.spec or \
            entry.get("fingerprint") != fp:
        return None
    if not all(isinstance(entry.get(k), (int, float))
               for k in ("accuracy", "seconds", "train_seconds", "steps")):
        return None
    return entry


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


_WORKER: dict = {}


def _worker_init(sets: dict, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
                 threads: int) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the pool (no traceback from
    # every worker); the finished candidates are in the cache already
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, threads))
    _WORKER.update(sets=sets, val_x=val_x, val_y=val_y, num_classes=num_classes)


def _worker_job(label: str, spec: str, seed: int, cand_id: str) -> dict:
    w = _WORKER
    return train_candidate(spec, w["sets"][label], w["val_x"], w["val_y"], w["num_classes"],
                           seed, cand_id)


def evaluate_candidates(candidates: Sequence[Candidate], sets: Sequence[TrainSet],
                        val: ImageSet, seed: int, cache: str | os.PathLike | None = None,
                        workers: int = 1, progress: Progress | None = None,
                        log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Accuracy of every candidate trained on every set, reading and filling the cache.

    Args:
        candidates: from :func:`sample_candidates`.
        sets: :class:`TrainSet` per kind (ground truth and proxies), on one device with
            ``val``.
        cache: folder of finished entries (one JSON file per data set / kind fingerprint /
            candidate / seed, written atomically as each finishes). ``None``: no cache.
        workers: processes (spawned; each trains whole candidates on the sets' device with
            ``torch.get_num_threads() // workers`` threads); 1 trains in-process. Results
            equal those of 1 worker when the thread counts match (float reductions may
            otherwise differ in the last bits).

    Returns:
        ``{set label: {candidate id: {"accuracy", "seconds", "steps", "cached", ...}}}``.
    """
    if workers < 1:
        raise NASError(f"workers must be >= 1, got {workers}")
    labels = [ts.label for ts in sets]
    if len(set(labels)) != len(labels):
        raise NASError(f"a proxy is given twice: {', '.join(labels)}")
    dataset = val.info.name
    cache_dir = Path(cache) if cache is not None else None
    results: dict[str, dict] = {ts.label: {} for ts in sets}
    jobs: list[tuple[TrainSet, Candidate, Path | None, str, dict]] = []
    for ts in sets:
        fp, fp_dict = _fingerprint(ts, val, dataset)
        for cand in candidates:
            # folder: the kind (gtn, dc, ...) and the fingerprint, which holds the full label
            path = (_cache_path(cache_dir, dataset, ts.meta.get("kind") or ts.label, fp, cand,
                                seed) if cache_dir else None)
            entry = _read_cached(path, cand, fp) if path is not None else None
            if entry is not None:
                results[ts.label][cand.id] = {**entry, "cached": True}
            else:
                jobs.append((ts, cand, path, fp, fp_dict))
    if jobs:
        log(f"training {len(jobs)} student(s) ({sum(len(r) for r in results.values())} cached)"
            f" with {workers} worker(s)")

    def finish(ts: TrainSet, cand: Candidate, path: Path | None, fp: str, fp_dict: dict,
               out: dict) -> None:
        entry = {"id": cand.id, "spec": cand.spec, "kind": ts.label, "seed": seed,
                 "fingerprint": fp, "budget": fp_dict, **out}
        if path is not None:
            atomic_write_json(path, entry)
        results[ts.label][cand.id] = {**entry, "cached": False}
        log(f"{ts.label:<14} {cand.spec:<48} {out['accuracy']:6.2f} %  {out['seconds']:6.1f} s")

    num_classes = val.info.num_classes
    with task(progress, "candidates", len(jobs)) as bar:
        if workers == 1 or len(jobs) <= 1:
            for ts, cand, path, fp, fp_dict in jobs:
                out = train_candidate(cand.spec, ts, val.images, val.labels, num_classes, seed,
                                      cand.id)
                finish(ts, cand, path, fp, fp_dict, out)
                bar.update(1)
        elif jobs:
            import multiprocessing as mp

            threads = max(1, torch.get_num_threads() // workers)
            payload = {ts.label: ts for ts in sets}
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init,
                                     initargs=(payload, val.images, val.labels, num_classes,
                                               threads)) as pool:
                futures = {pool.submit(_worker_job, ts.label, cand.spec, seed, cand.id):
                           (ts, cand, path, fp, fp_dict) for ts, cand, path, fp, fp_dict in jobs}
                try:
                    for fut in as_completed(futures):
                        finish(*futures[fut], fut.result())
                        bar.update(1)
                except KeyboardInterrupt:  # stop now, not after the running candidates
                    for proc in list(getattr(pool, "_processes", {}).values()):
                        proc.terminate()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    return results
