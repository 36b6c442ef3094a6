"""Comparing groups of accuracies: mean ± std per group and Welch's t-test between pairs.

Welch, "The generalization of 'Student's' problem when several different population variances
are involved", Biometrika 1947: the two-sample t-test without assuming equal variances, as the
DC thesis used for its initialisation study. Computed with ``scipy.stats.ttest_ind``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

from .engine import mean_std

__all__ = ["GroupSummary", "PairTest", "summarize", "welch_pairs", "comparison_markdown"]


@dataclass(frozen=True)
class GroupSummary:
    name: str
    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class PairTest:
    a: str
    b: str
    difference: float  # mean(a) - mean(b)
    t: float
    p: float


def summarize(groups: Mapping[str, Sequence[float]]) -> list[GroupSummary]:
    """Mean and population std (ddof 0, as the papers report) per group, best first."""
    rows = [GroupSummary(k, len(v), *mean_std(v)) for k, v in groups.items() if len(v)]
    return sorted(rows, key=lambda r: -r.mean)


def welch_pairs(groups: Mapping[str, Sequence[float]]) -> list[PairTest]:
    """Welch's t-test for every pair of groups with at least two values each."""
    out = []
    names = [g.name for g in summarize(groups)]
    for a, b in itertools.combinations(names, 2):
        va, vb = list(map(float, groups[a])), list(map(float, groups[b]))
        if len(va) < 2 or len(vb) < 2:
            continue
        with warnings.catch_warnings():
            # a constant group (e.g. students that all score the same) makes scipy warn of
            # "catastrophic cancellation"; its variance is exactly 0 and the test is exact
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            res = stats.ttest_ind(va, vb, equal_var=False)
        t, p = float(res.statistic), float(res.pvalue)
        if math.isnan(t):  # both groups constant
            t, p = (0.0, 1.0) if sum(va) / len(va) == sum(vb) / len(vb) else (math.inf, 0.0)
        out.append(PairTest(a, b, sum(va) / len(va) - sum(vb) / len(vb), t, p))
    return out


def comparison_markdown(groups: Mapping[str, Sequence[float]], alpha: float = 0.05) -> str:
    """Markdown: a mean ± std table, then the Welch t-test of every pair."""
    lines = ["| group | n | accuracy (%) |", "|---|---|---|"]
    lines += [f"| {g.name} | {g.n} | {g.mean:.2f} ± {g.std:.2f} |" for g in summarize(groups)]
    pairs = welch_pairs(groups)
    if pairs:
        lines += ["", "| a | b | mean(a) − mean(b) | Welch t | p | significant (p < "
                  f"{alpha:g}) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.a} | {r.b} | {r.difference:+.2f} | {r.t:.2f} | {r.p:.3g} | "
                  f"{'yes' if r.p < alpha else 'no'} |" for r in pairs]
    return "\n".join(lines) + "\n"
