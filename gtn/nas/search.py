"""The search: sample candidates, train the truth and every proxy, compare the rankings."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from distill.data import ImageSet
from distill.progress import Progress
from distill.store import to_jsonable

from .budgets import NASBudget
from .candidates import evaluate_candidates
from .proxies import ProxySpec, build_proxy_set, nas_split, truth_set
from .ranking import rank_quality
from .space import SearchSpace, sample_candidates

__all__ = ["run_search"]


def run_search(train_set: ImageSet, proxies: Sequence[tuple[ProxySpec, object]],
               budget: NASBudget, n_candidates: int, seed: int = 0,
               cache: str | os.PathLike | None = None, workers: int = 1,
               device: torch.device | str = "cpu", space: SearchSpace | None = None,
               top_k: int | None = None, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Sample candidates, compute the ground truth and every proxy, compare the rankings.

    Args:
        train_set: the real training split (validation is held out of it here).
        proxies: ``(spec, source)`` pairs from :func:`parse_proxy` / :func:`resolve_proxy`.
        space: overrides ``budget.space``.

    Returns:
        The report: budget, candidates (with true and proxy accuracies and seconds), one
        :func:`rank_quality` dict per proxy (plus set size, steps and setup seconds), and
        the winner (highest top-half Spearman, then all-candidate Spearman).
    """
    device = torch.device(device)
    space = space or budget.space
    candidates = sample_candidates(n_candidates, seed, train_set.info, space)
    fit, val = nas_split(train_set, budget)
    fit, val = fit.to(device), val.to(device)
    sets = [truth_set(fit, budget)]
    for spec, source in proxies:
        log(f"building the {spec.label} proxy set")
        sets.append(build_proxy_set(spec, source, fit, budget, seed, device, progress))
    results = evaluate_candidates(candidates, sets, val, seed, cache, workers, progress, log)
    truth = results["truth"]
    t_acc = [truth[c.id]["accuracy"] for c in candidates]
    t_sec = sum(truth[c.id]["train_seconds"] for c in candidates)
    t_wall = sum(truth[c.id]["seconds"] for c in candidates)
    report: dict = {
        "dataset": train_set.info.name, "budget": to_jsonable(asdict(budget)),
        "seed": seed, "workers": workers, "device": str(device),
        "threads": torch.get_num_threads(), "validation": len(val),
        "truth": {"size": sets[0].meta["size"], "train": asdict(budget.truth),
                  "steps": truth[candidates[0].id]["steps"], "seconds": t_sec,
                  "wall_seconds": t_wall},
        "candidates": [], "proxies": {}}
    for i, c in enumerate(candidates):
        row = {**c.as_dict(), "truth": t_acc[i],
               "truth_seconds": truth[c.id]["train_seconds"], "proxies": {}}
        for ts in sets[1:]:
            r = results[ts.label][c.id]
            row["proxies"][ts.label] = {"accuracy": r["accuracy"],
                                        "seconds": r["train_seconds"]}
        report["candidates"].append(row)
    for ts in sets[1:]:
        res = results[ts.label]
        p_acc = [res[c.id]["accuracy"] for c in candidates]
        p_sec = sum(res[c.id]["train_seconds"] for c in candidates)
        p_wall = sum(res[c.id]["seconds"] for c in candidates)
        q = rank_quality(t_acc, p_acc, t_sec, p_sec, top_k, seed, budget.resamples, t_wall,
                         p_wall)
        q.update(label=ts.label, kind=ts.meta["kind"], size=ts.meta["size"],
                 steps=res[candidates[0].id]["steps"], seconds=p_sec, wall_seconds=p_wall,
                 setup_seconds=ts.setup_seconds, train=asdict(ts.train), meta=ts.meta)
        report["proxies"][ts.label] = q
    if report["proxies"]:
        def score(q: dict) -> tuple[float, float]:
            top, every = (v if math.isfinite(v) else -2.0
                          for v in (q["spearman_top"], q["spearman"]))
            return top, every

        report["winner"] = max(report["proxies"], key=lambda k: score(report["proxies"][k]))
    return report
