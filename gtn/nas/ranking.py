"""Rank statistics: how well a proxy's accuracies order the candidates like the truth
(Spearman, Kendall tau-b, bootstrap intervals, top-k overlap, the picked architecture)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from distill.rng import generator as make_generator

from .errors import NASError

__all__ = ["spearman", "kendall", "bootstrap_ci", "rank_quality"]


def _as_float(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values]


def _correlation(name: str, x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats

    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan
        warnings.simplefilter("ignore")
        return float(getattr(stats, name)(_as_float(x), _as_float(y)).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties; ``scipy.stats.spearmanr``); nan if constant."""
    return _correlation("spearmanr", x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``); nan if either side is constant."""
    return _correlation("kendalltau", x, y)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], statistic: Callable, seed: int = 0,
                 resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)``, resampling the (x, y) pairs
    (candidates) with replacement from ``child_seed(seed, "bootstrap")``. Resamples whose
    statistic is undefined (all ties) are left out; (nan, nan) when none is defined."""
    import numpy as np

    n = len(x)
    if n < 2:
        return float("nan"), float("nan")
    xs, ys = np.asarray(_as_float(x)), np.asarray(_as_float(y))
    idx = torch.randint(n, (resamples, n), generator=make_generator(seed, "bootstrap")).numpy()
    values = np.array([statistic(xs[i], ys[i]) for i in idx], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


def _top(values: Sequence[float], k: int) -> list[int]:
    """Positions of the ``k`` largest values (ties: the earlier position first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def rank_quality(truth: Sequence[float], proxy: Sequence[float],
                 truth_seconds: float | None = None, proxy_seconds: float | None = None,
                 top_k: int | None = None, seed: int = 0, resamples: int = 1000,
                 truth_wall: float | None = None, proxy_wall: float | None = None) -> dict:
    """How well ``proxy`` (accuracy per candidate) ranks the candidates like ``truth``.

    Returns a dict: ``spearman``, ``kendall`` (with ``*_ci`` 95 % percentile bootstrap
    intervals) over all candidates; ``spearman_top``, ``kendall_top`` (+ CIs) over the top
    half by true accuracy (``n // 2`` candidates, at least 2); ``top_k`` (default
    ``max(1, n // 4)``) and ``top_k_overlap`` (fraction of the proxy's top k in the true top
    k); ``picked`` (true accuracy of the proxy's best candidate, ties: first),
    ``best`` (the best true accuracy); ``speedup`` = truth_seconds / proxy_seconds (training
    time, summed over candidates) and ``speedup_wall`` = truth_wall / proxy_wall (with
    building and scoring each student).
    """
    if len(truth) != len(proxy):
        raise NASError(f"{len(truth)} true accuracies but {len(proxy)} proxy accuracies")
    n = len(truth)
    if n < 2:
        raise NASError(f"rank quality needs at least 2 candidates, got {n}")
    t, p = _as_float(truth), _as_float(proxy)
    k = max(1, n // 4) if top_k is None else max(1, min(int(top_k), n))
    top = sorted(_top(t, max(2, n // 2)))
    tt, pt = [t[i] for i in top], [p[i] for i in top]
    out = {"n": n, "spearman": spearman(t, p), "kendall": kendall(t, p),
           "spearman_ci": bootstrap_ci(t, p, spearman, seed, resamples),
           "kendall_ci": bootstrap_ci(t, p, kendall, seed, resamples),
           "n_top": len(top), "spearman_top": spearman(tt, pt), "kendall_top": kendall(tt, pt),
           "spearman_top_ci": bootstrap_ci(tt, pt, spearman, seed, resamples),
           "kendall_top_ci": bootstrap_ci(tt, pt, kendall, seed, resamples),
           "top_k": k, "top_k_overlap": len(set(_top(t, k)) & set(_top(p, k))) / k,
           "picked": t[_top(p, 1)[0]], "best": max(t)}
    if truth_seconds is not None and proxy_seconds:
        out["speedup"] = float(truth_seconds) / float(proxy_seconds)
    if truth_wall is not None and proxy_wall:
        out["speedup_wall"] = float(truth_wall) / float(proxy_wall)
    return out
