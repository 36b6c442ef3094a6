"""The search: sample candidates (one or several independent draws), train the truth and
every proxy once per distinct candidate, compare the rankings per draw, pooled, and between
proxies."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from distill.data import ImageSet
from distill.executor import Executor, ExecutorConfig, executor_scope, item_device
from distill.progress import Progress
from distill.store import to_jsonable

from .budgets import NASBudget
from .candidates import evaluate_candidates
from .compare import compare_proxies, mean_interval
from .errors import NASError
from .proxies import ProxySpec, TrainSet, build_proxy_set, nas_split, truth_set
from .ranking import rank_quality
from .space import Candidate, SearchSpace, sample_candidates

__all__ = ["run_search", "ACROSS_METRICS"]

ACROSS_METRICS = ("spearman_top", "spearman", "kendall_top", "kendall", "top_k_overlap",
                  "picked")
"""The per-draw figures summarised across draws (mean and t interval)."""


def _winner(proxies: dict) -> str:
    """Highest top-half Spearman, then all-candidate Spearman (nan counts as -2)."""
    def score(q: dict) -> tuple[float, float]:
        top, every = (v if math.isfinite(v) else -2.0
                      for v in (q["spearman_top"], q["spearman"]))
        return top, every

    return max(proxies, key=lambda k: score(proxies[k]))


def _proxy_quality(candidates: Sequence[Candidate], sets: Sequence[TrainSet],
                   results: dict[str, dict], top_k: int | None, seed: int, resamples: int
                   ) -> tuple[list[dict], dict]:
    """(candidate rows, {proxy label: rank_quality + provenance}) of ``candidates``."""
    truth = results["truth"]
    t_acc = [truth[c.id]["accuracy"] for c in candidates]
    t_sec = sum(truth[c.id]["train_seconds"] for c in candidates)
    t_wall = sum(truth[c.id]["seconds"] for c in candidates)
    rows = []
    for i, c in enumerate(candidates):
        row = {**c.as_dict(), "truth": t_acc[i],
               "truth_seconds": truth[c.id]["train_seconds"], "proxies": {}}
        for ts in sets[1:]:
            r = results[ts.label][c.id]
            row["proxies"][ts.label] = {"accuracy": r["accuracy"],
                                        "seconds": r["train_seconds"]}
        rows.append(row)
    quality = {}
    for ts in sets[1:]:
        res = results[ts.label]
        p_acc = [res[c.id]["accuracy"] for c in candidates]
        p_sec = sum(res[c.id]["train_seconds"] for c in candidates)
        p_wall = sum(res[c.id]["seconds"] for c in candidates)
        q = rank_quality(t_acc, p_acc, t_sec, p_sec, top_k, seed, resamples, t_wall, p_wall)
        q.update(label=ts.label, kind=ts.meta["kind"], size=ts.meta["size"],
                 steps=res[candidates[0].id]["steps"], seconds=p_sec, wall_seconds=p_wall,
                 setup_seconds=ts.setup_seconds, train=asdict(ts.train), meta=ts.meta)
        quality[ts.label] = q
    return rows, quality


def _top_half(truth: Sequence[float]) -> list[int]:
    """Positions of the ``max(2, n // 2)`` best true accuracies (as :func:`rank_quality`)."""
    n = len(truth)
    return sorted(sorted(range(n), key=lambda i: (-truth[i], i))[:max(2, n // 2)])


def summarize_draws(draws: Sequence[dict], labels: Sequence[str], seed: int,
                    resamples: int, alpha: float = 0.05) -> dict:
    """Across draws: per proxy and metric the per-draw values, their mean and t interval and
    how often the proxy ranks first; and the paired comparison (:func:`compare_proxies`) of
    the top-half and the all-candidate Spearman.

    Args:
        draws: per-draw reports, each ``{"candidates": rows with "truth" and "proxies",
            "proxies": {label: rank_quality}}``.
    """
    across: dict = {}
    for label in labels:
        across[label] = {}
        for metric in ACROSS_METRICS:
            values = [float(d["proxies"][label][metric]) for d in draws]
            mean, lo, hi = mean_interval(values)
            across[label][metric] = {"per_draw": values, "mean": mean, "ci": (lo, hi)}
    first: dict = {}
    for metric in ("spearman_top", "spearman"):
        counts = {label: 0 for label in labels}
        for d in draws:
            counts[_winner({k: {"spearman_top": d["proxies"][k][metric],
                                "spearman": d["proxies"][k]["spearman"]}
                            for k in labels})] += 1
        first[metric] = counts
    comparison = {}
    for name, pick in (("spearman_top", _top_half), ("spearman", None)):
        rows_of = []
        for d in draws:
            truth = [c["truth"] for c in d["candidates"]]
            keep = pick(truth) if pick else list(range(len(truth)))
            rows_of.append(([truth[i] for i in keep],
                            {label: [d["candidates"][i]["proxies"][label]["accuracy"]
                                     for i in keep] for label in labels}))
        comparison[name] = compare_proxies(rows_of, seed, resamples, alpha)
    return {"across": across, "first": first, "comparison": comparison}


def run_search(train_set: ImageSet, proxies: Sequence[tuple[ProxySpec, object]],
               budget: NASBudget, n_candidates: int, seed: int = 0,
               cache: str | os.PathLike | None = None, workers: int = 1,
               device: torch.device | str = "cpu", space: SearchSpace | None = None,
               top_k: int | None = None, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None, draws: int = 1,
               on_draw: Callable[[dict], None] | None = None, alpha: float = 0.05,
               executor: Executor | ExecutorConfig | None = None) -> dict:
    """Sample candidates, compute the ground truth and every proxy, compare the rankings.

    With ``draws = K``, draw d samples its own ``n_candidates`` with seed ``seed + d``
    (:func:`sample_candidates`; independent draws from the space, so two draws may share a
    candidate). Everything else is fixed across draws and seeded by ``seed``: the proxy sets
    (built once) and every student's initialisation and batch order (``child_seed(seed,
    "nas", candidate id)``), so a candidate in several draws is trained once per set, in
    this process or earlier through the ``cache``; ``report["training"]`` counts what was
    trained and what was reused.

    Args:
        train_set: the real training split (validation is held out of it here).
        proxies: ``(spec, source)`` pairs from :func:`parse_proxy` / :func:`resolve_proxy`.
        space: overrides ``budget.space``.
        on_draw: called with the report so far after every finished draw (to write
            partial results).
        alpha: family-wise error of the paired comparison (Holm).
        workers, executor: where every (set, candidate) student trains
            (:func:`evaluate_candidates`): ``workers`` local processes, or the
            :class:`~distill.executor.ExecutorConfig` (local pool or Ray; one executor for
            every draw), which overrides ``workers``.

    Returns:
        The report. Its top level is the **pooled** search over the distinct candidates of
        all draws (for one draw: that draw): budget, candidates (with true and proxy
        accuracies and seconds), one :func:`rank_quality` dict per proxy (plus set size,
        steps and setup seconds), and ``winner`` (the nominal leader: highest top-half
        Spearman, then all-candidate Spearman). Besides: ``draws`` (per draw: seed,
        candidate ids, proxies' :func:`rank_quality`, nominal winner), ``across``
        (:func:`summarize_draws`: per-draw values, mean and t interval, ranks first,
        ``comparison``: the paired comparison of proxies), and ``training``.
    """
    if draws < 1:
        raise NASError(f"draws must be >= 1, got {draws}")
    if executor is None:
        if workers < 1:
            raise NASError(f"workers must be >= 1, got {workers}")
        executor = ExecutorConfig(workers=workers)
    with executor_scope(executor) as ex:
        return _search(train_set, proxies, budget, n_candidates, seed, cache, ex, device,
                       space, top_k, progress, log, draws, on_draw, alpha)


def _search(train_set: ImageSet, proxies: Sequence[tuple[ProxySpec, object]],
            budget: NASBudget, n_candidates: int, seed: int,
            cache: str | os.PathLike | None, ex: Executor, device: torch.device | str,
            space: SearchSpace | None, top_k: int | None, progress: Progress | None,
            log: Callable[[str], None], draws: int,
            on_draw: Callable[[dict], None] | None, alpha: float) -> dict:
    workers = ex.config.workers or 1
    item_device(ex.config, device)  # a CUDA device Ray would hide: refused before any work
    device = torch.device(device)
    space = space or budget.space
    samples = [sample_candidates(n_candidates, seed + d, train_set.info, space)
               for d in range(draws)]
    fit, val = nas_split(train_set, budget)
    fit, val = fit.to(device), val.to(device)
    sets = [truth_set(fit, budget)]
    for spec, source in proxies:
        log(f"building the {spec.label} proxy set")
        sets.append(build_proxy_set(spec, source, fit, budget, seed, device, progress))
    labels = [ts.label for ts in sets[1:]]
    results: dict[str, dict] = {ts.label: {} for ts in sets}
    trained = {ts.label: 0 for ts in sets}
    reused = {ts.label: 0 for ts in sets}
    pool: dict[str, Candidate] = {}
    draw_reports: list[dict] = []
    report: dict = {}
    for d, cands in enumerate(samples):
        new = [c for c in cands if c.id not in pool]
        pool.update((c.id, c) for c in new)
        if len(samples) > 1:
            log(f"draw {d + 1}/{draws} (seed {seed + d}): {len(cands)} candidates, "
                f"{len(cands) - len(new)} already in an earlier draw")
        if new:
            got = evaluate_candidates(new, sets, val, seed, cache, progress=progress, log=log,
                                      executor=ex)
            for label, entries in got.items():
                results[label].update(entries)
                for entry in entries.values():
                    if entry["cached"]:
                        reused[label] += 1
                    else:
                        trained[label] += 1
        rows, quality = _proxy_quality(cands, sets, results, top_k, seed + d,
                                       budget.resamples)
        draw_reports.append({"seed": seed + d, "ids": [c.id for c in cands],
                             "candidates": rows, "proxies": quality,
                             "winner": _winner(quality) if quality else None})
        report = _report(train_set, budget, seed, workers, device, val, sets, results,
                         list(pool.values()), draw_reports, labels, top_k, alpha)
        report["executor"] = ex.config.kind
        report["training"] = {"distinct": len(pool), "trained": dict(trained),
                              "cached": dict(reused),
                              "draw_sizes": [len(s) for s in samples[:d + 1]],
                              "draws_planned": draws}
        if on_draw is not None:
            on_draw(report)
    return report


def _report(train_set: ImageSet, budget: NASBudget, seed: int, workers: int,
            device: torch.device, val: ImageSet, sets: Sequence[TrainSet],
            results: dict[str, dict], pool: Sequence[Candidate], draw_reports: list[dict],
            labels: Sequence[str], top_k: int | None, alpha: float) -> dict:
    truth = results["truth"]
    t_sec = sum(truth[c.id]["train_seconds"] for c in pool)
    t_wall = sum(truth[c.id]["seconds"] for c in pool)
    rows, quality = _proxy_quality(pool, sets, results, top_k, seed, budget.resamples)
    report: dict = {
        "dataset": train_set.info.name, "budget": to_jsonable(asdict(budget)),
        "seed": seed, "workers": workers, "device": str(device),
        "threads": torch.get_num_threads(), "validation": len(val),
        "truth": {"size": sets[0].meta["size"], "train": asdict(budget.truth),
                  "steps": truth[pool[0].id]["steps"], "seconds": t_sec,
                  "wall_seconds": t_wall},
        "candidates": rows, "proxies": quality}
    if quality:
        report["winner"] = _winner(quality)
    report["draws"] = [{k: v for k, v in d.items() if k != "candidates"} for d in draw_reports]
    if labels:
        report["across"] = summarize_draws(draw_reports, labels, seed, budget.resamples, alpha)
    return report
