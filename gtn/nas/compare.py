"""Comparing proxies with each other, on the same candidates and over several draws.

Every proxy of a search ranks the *same* candidates, so two proxies' rank correlations with
the truth are dependent: their difference is judged by a **paired, stratified bootstrap**
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 16; Davison & Hinkley,
"Bootstrap Methods and their Application", 1997, §4.4 for the p-value): one resample draws
the candidates of every draw with replacement (within the draw), and every proxy is scored
on that same resample, so the difference keeps the pairing. The statistic is the mean over
draws of the per-draw Spearman rho with the truth, the figure reported per draw. The many
pairwise p-values of a comparison are adjusted with Holm's step-down method (Holm, "A simple
sequentially rejective multiple test procedure", Scand. J. Statistics 1979), which controls
the family-wise error at ``alpha`` without assuming independence.

A proxy is called *separable* only when it beats every other proxy with a Holm-adjusted
p-value below ``alpha``; otherwise the comparison names the group that cannot be told apart
from the leader.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from distill.rng import generator as make_generator

from .errors import NASError

__all__ = ["spearman_rows", "bootstrap_draws", "holm", "mean_interval", "compare_proxies"]

Draw = tuple[Sequence[float], Mapping[str, Sequence[float]]]


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row pair of two (R, n) arrays: Pearson's r of the average
    ranks (as ``scipy.stats.spearmanr``); nan for a row where either side is constant."""
    from scipy.stats import rankdata

    rx = rankdata(np.asarray(x, dtype=float), axis=1)
    ry = rankdata(np.asarray(y, dtype=float), axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    num = (rx * ry).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den <= 1e-12 * max(1.0, float(rx.shape[1]) ** 3)] = np.nan
    return np.clip(out, -1.0, 1.0)


def _check(draws: Sequence[Draw]) -> list[str]:
    if not draws:
        raise NASError("a comparison needs at least one draw")
    labels = list(draws[0][1])
    for truth, proxies in draws:
        if list(proxies) != labels:
            raise NASError("every draw must hold the same proxies")
        if len(truth) < 2:
            raise NASError(f"a draw needs at least 2 candidates, got {len(truth)}")
        for label, values in proxies.items():
            if len(values) != len(truth):
                raise NASError(f"{label}: {len(values)} accuracies for {len(truth)} candidates")
    return labels


def bootstrap_draws(draws: Sequence[Draw], seed: int = 0, resamples: int = 1000
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The mean over draws of every proxy's Spearman rho with the truth, on the data and on
    ``resamples`` paired stratified bootstrap resamples.

    Args:
        draws: one ``(truth, {proxy label: accuracies})`` per draw, the accuracies in the
            order of ``truth`` (the same candidates for every proxy of a draw).

    Returns:
        ``(labels, estimate (P,), resampled (resamples, P))``: resample r draws the
        candidates of draw d with ``generator(seed, "paired-bootstrap", d)`` (one index
        vector per draw and resample, shared by every proxy). Entries are nan where a
        resampled ranking is constant.
    """
    labels = _check(draws)
    if resamples < 1:
        raise NASError(f"resamples must be >= 1, got {resamples}")
    k = len(draws)
    estimate = np.zeros(len(labels))
    resampled = np.zeros((resamples, len(labels)))
    for d, (truth, proxies) in enumerate(draws):
        t = np.asarray(truth, dtype=float)
        n = t.size
        idx = torch.randint(n, (resamples, n),
                            generator=make_generator(seed, "paired-bootstrap", d)).numpy()
        for j, label in enumerate(labels):
            p = np.asarray(proxies[label], dtype=float)
            estimate[j] += spearman_rows(t[None], p[None])[0] / k
            resampled[:, j] += spearman_rows(t[idx], p[idx]) / k
    return labels, estimate, resampled


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times
    (m - i + 1), made non-decreasing, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student's t interval of the mean of independent values (the draws);
    nan bounds for fewer than two finite values."""
    from scipy import stats

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def compare_proxies(draws: Sequence[Draw], seed: int = 0, resamples: int = 1000,
                    alpha: float = 0.05, level: float = 0.95) -> dict:
    """Which proxies rank the candidates better than which, over one or more draws.

    Every pair (a, b) gets the difference of the mean per-draw Spearman rho (a - b), its
    percentile interval and a two-sided bootstrap p-value ``2 (min(#{d* <= 0}, #{d* >= 0})
    + 1) / (R + 1)`` (capped at 1) from :func:`bootstrap_draws`, and Holm's adjustment over
    all pairs.

    Returns:
        ``{"labels", "estimate": {label: mean rho}, "p_best": {label: fraction of resamples
        where it leads (ties shared)}, "pairs": [{"a", "b", "difference", "ci", "p", "p_holm",
        "significant"}] (a = the better estimate), "leader", "winner" (the leader when it
        beats every other proxy significantly, else None), "top_group" (the leader and every
        proxy not significantly worse), "alpha", "resamples", "draws"}``.
    """
    labels, est, boot = bootstrap_draws(draws, seed, resamples)
    ok = np.isfinite(boot).all(axis=1)
    finite = boot[ok]
    p_best = {lab: 0.0 for lab in labels}
    if finite.shape[0]:
        best = finite >= finite.max(axis=1, keepdims=True)  # ties share the lead
        wins = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
        p_best = {lab: float(w) for lab, w in zip(labels, wins)}
    pairs = []
    for i, j in itertools.combinations(range(len(labels)), 2):
        if est[j] > est[i]:
            i, j = j, i
        diff = boot[:, i] - boot[:, j]
        diff = diff[np.isfinite(diff)]
        r = diff.size
        if r:
            lo, hi = np.percentile(diff, [50 * (1 - level), 100 - 50 * (1 - level)])
            tail = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
            p = min(1.0, 2 * (tail + 1) / (r + 1))
        else:
            lo = hi = math.nan
            p = 1.0
        pairs.append({"a": labels[i], "b": labels[j], "difference": float(est[i] - est[j]),
                      "ci": (float(lo), float(hi)), "p": p})
    for pair, adj in zip(pairs, holm([q["p"] for q in pairs])):
        pair["p_holm"] = adj
        pair["significant"] = bool(adj < alpha and pair["difference"] > 0)
    pairs.sort(key=lambda q: (q["p"], q["a"], q["b"]))
    leader = labels[int(np.nanargmax(est))] if np.isfinite(est).any() else None
    beaten = {q["b"] for q in pairs if q["a"] == leader and q["significant"]}
    top_group = [lab for lab in sorted(labels, key=lambda lab: -est[labels.index(lab)])
                 if lab == leader or lab not in beaten]
    winner = leader if leader is not None and len(beaten) == len(labels) - 1 else None
    return {"labels": labels, "estimate": {lab: float(e) for lab, e in zip(labels, est)},
            "p_best": p_best, "pairs": pairs, "leader": leader, "winner": winner,
            "top_group": top_group, "alpha": alpha, "resamples": int(ok.sum()),
            "draws": len(draws)}
