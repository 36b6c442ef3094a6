"""Welch's t-test table against the closed form, and the summary's mean/std."""

from __future__ import annotations

import math
import warnings

import pytest

from distill.stats import comparison_markdown, summarize, welch_pairs


def welch_closed_form(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, df


def test_welch_t_matches_the_closed_form():
    from scipy import stats

    groups = {"a": [91.0, 92.5, 90.8, 93.1], "b": [88.0, 87.2, 89.9], "c": [50.0, 51.0]}
    pairs = {(p.a, p.b): p for p in welch_pairs(groups)}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}  # best first
    for (x, y), p in pairs.items():
        t, df = welch_closed_form(groups[x], groups[y])
        assert p.t == pytest.approx(t, rel=1e-10)
        assert p.p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-8)
        assert p.difference == pytest.approx(sum(groups[x]) / len(groups[x])
                                             - sum(groups[y]) / len(groups[y]))


def test_summary_and_markdown():
    groups = {"lo": [1.0, 3.0], "hi": [10.0, 10.0, 10.0], "one": [5.0]}
    rows = summarize(groups)
    assert [r.name for r in rows] == ["hi", "one", "lo"]
    assert rows[2].mean == 2.0 and rows[2].std == 1.0  # population std, as the papers
    text = comparison_markdown(groups)
    assert "| lo | 2 | 2.00 ± 1.00 |" in text
    assert "| hi | lo |" in text and "one" not in text.split("Welch")[1]  # n=1: no test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant group is a legitimate input: no warning
        hi_lo = next(r for r in welch_pairs(groups) if (r.a, r.b) == ("hi", "lo"))
    # Welch by hand: (10 - 2) / sqrt(0 / 3 + s²_lo / 2), s²_lo = 2 (sample variance) -> t = 8
    assert math.isclose(hi_lo.t, 8.0)
    constant = welch_pairs({"x": [1.0, 1.0], "y": [1.0, 1.0]})[0]
    assert constant.t == 0.0 and constant.p == 1.0
