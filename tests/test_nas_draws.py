"""Several draws of candidates (gtn.nas): the paired comparison of proxies against a brute-force
bootstrap on tiny examples, Holm and the t interval against their closed forms, and
draws that are reproducible by seed and share their trained students (a counter)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from gtn import nas
from gtn.nas import candidates as nas_candidates

from .conftest import make_tiny_set
from .test_nas import BUDGET, CountingTrain, brute_spearman


def rho(x, y):
    """Spearman of two sequences, nan when either is constant (brute force)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return brute_spearman(list(x), list(y))


def test_spearman_rows_equal_scipy_with_ties_and_constant_rows():
    g = np.random.default_rng(0)
    x = g.integers(0, 4, size=(50, 7)).astype(float)
    y = g.integers(0, 4, size=(50, 7)).astype(float)
    x[3] = 2.0  # a constant row
    got = nas.spearman_rows(x, y)
    for r in range(50):
        want = rho(x[r], y[r])
        assert (math.isnan(got[r]) and math.isnan(want)) or got[r] == pytest.approx(want,
                                                                                   abs=1e-12)
    assert math.isnan(got[3])


def exact_bootstrap(draws, a, b):
    """Every stratified resample, enumerated: the differences of the mean per-draw rho
    (a - b), one per equally likely resample where both are defined."""
    diffs = []
    per_draw = [list(itertools.product(range(len(t)), repeat=len(t))) for t, _ in draws]
    for combo in itertools.product(*per_draw):
        total, ok = 0.0, True
        for (t, p), idx in zip(draws, combo):
            tt = [t[i] for i in idx]
            ra, rb = rho(tt, [p[a][i] for i in idx]), rho(tt, [p[b][i] for i in idx])
            if math.isnan(ra) or math.isnan(rb):
                ok = False
                break
            total += (ra - rb) / len(draws)
        if ok:
            diffs.append(total)
    return np.array(diffs)


TINY = {
    "one draw of 4": [([1.0, 2.0, 3.0, 4.0], {"a": [1.0, 3.0, 2.0, 4.0],
                                               "b": [4.0, 1.0, 3.0, 2.0]})],
    "two draws of 3": [([1.0, 2.0, 3.0], {"a": [1.0, 2.0, 3.0], "b": [2.0, 3.0, 1.0]}),
                       ([5.0, 4.0, 6.0], {"a": [2.0, 1.0, 1.5], "b": [1.0, 3.0, 2.0]})],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_paired_bootstrap_matches_the_enumerated_bootstrap(name):
    draws = TINY[name]
    exact = exact_bootstrap(draws, "a", "b")
    le, ge = float((exact <= 1e-12).mean()), float((exact >= -1e-12).mean())
    resamples = 20000
    labels, est, boot = nas.bootstrap_draws(draws, seed=1, resamples=resamples)
    assert labels == ["a", "b"]
    want = np.mean([rho(t, p["a"]) - rho(t, p["b"]) for t, p in draws])
    assert est[0] - est[1] == pytest.approx(want, abs=1e-12)
    diff = boot[:, 0] - boot[:, 1]
    diff = diff[np.isfinite(diff)]
    # the fraction of defined resamples, and the two tails, within 5 standard errors
    ok = np.isfinite(boot).all(axis=1).mean()
    defined = len(exact) / np.prod([len(t) ** len(t) for t, _ in draws])
    assert abs(ok - defined) < 5 * math.sqrt(defined * (1 - defined) / resamples) + 1e-9
    for got, p in ((float((diff <= 1e-12).mean()), le), (float((diff >= -1e-12).mean()), ge)):
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / diff.size) + 1e-9
    assert float(diff.mean()) == pytest.approx(float(exact.mean()),
                                               abs=5 * exact.std() / math.sqrt(diff.size))
    comp = nas.compare_proxies(draws, seed=1, resamples=resamples)
    (pair,) = comp["pairs"]
    first = "a" if want >= 0 else "b"
    assert pair["a"] == first and pair["difference"] == pytest.approx(abs(want))
    assert pair["p"] == pytest.approx(min(1.0, 2 * min(le, ge)), abs=0.02)
    assert pair["p_holm"] == pair["p"]  # one pair: nothing to adjust


def test_holm_by_hand():
    got = nas.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> 0.06
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert nas.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert nas.holm([]) == []


def test_mean_interval_is_students_t():
    v = [0.2, 0.5, 0.35]
    mean, lo, hi = nas.mean_interval(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(0.35) and (lo, hi) == pytest.approx((0.35 - half, 0.35 + half))
    m1, lo1, hi1 = nas.mean_interval([0.4, math.nan])
    assert m1 == 0.4 and math.isnan(lo1) and math.isnan(hi1)


def test_a_proxy_is_separable_only_when_it_beats_every_other():
    g = np.random.default_rng(3)
    draws = []
    for _ in range(3):
        t = g.normal(size=30)
        draws.append((t.tolist(), {"exact": (t + 0.05 * g.normal(size=30)).tolist(),
                                   "twin": (t + 0.05 * g.normal(size=30)).tolist(),
                                   "noise": g.normal(size=30).tolist()}))
    comp = nas.compare_proxies(draws, seed=0, resamples=500)
    assert comp["winner"] is None                       # exact and twin cannot be separated
    assert set(comp["top_group"]) == {"exact", "twin"}
    assert all(q["significant"] for q in comp["pairs"] if q["b"] == "noise")
    assert comp["p_best"]["noise"] == 0.0
    assert sum(comp["p_best"].values()) == pytest.approx(1.0)
    solo = nas.compare_proxies([(t, {k: p[k] for k in ("exact", "noise")}) for t, p in draws],
                               seed=0, resamples=500)
    assert solo["winner"] == "exact" and solo["top_group"] == ["exact"]
    assert nas.compare_proxies(draws, seed=0, resamples=500) == comp  # reproducible
    with pytest.raises(nas.NASError, match="same proxies"):
        nas.compare_proxies([draws[0], (draws[1][0], {"exact": draws[1][1]["exact"]})])


# ------------------------------------------------------------------ draws of a search
SPACE = nas.SearchSpace(families=("mlp",), mlp_widths=(32,))  # 6 MLPs: draws of 3 overlap
CHEAP = replace(BUDGET, resamples=20)


@pytest.mark.determinism
def test_draws_are_reproducible_and_share_their_students(tmp_path, monkeypatch):
    data = make_tiny_set(per_class=20)
    proxies = [(nas.parse_proxy(t), None) for t in ("real-subset", "real-steps")]
    counter = CountingTrain()
    monkeypatch.setattr(nas_candidates, "train", counter)
    partial = []
    report = nas.run_search(data, proxies, CHEAP, 3, seed=4, cache=tmp_path, space=SPACE,
                            draws=3, on_draw=lambda r: partial.append(len(r["draws"])))
    assert partial == [1, 2, 3]
    ids = [d["ids"] for d in report["draws"]]
    assert ids == [[c.id for c in nas.sample_candidates(3, 4 + d, "mnist", SPACE)]
                   for d in range(3)]
    distinct = {i for draw in ids for i in draw}
    assert len(distinct) < 9                             # the draws overlap ...
    assert counter.calls == 3 * len(distinct)            # ... and nothing is trained twice
    tr = report["training"]
    assert tr["distinct"] == len(distinct) == len(report["candidates"])
    assert tr["trained"] == {"truth": len(distinct), "real-subset": len(distinct),
                             "real-steps": len(distinct)}
    assert set(tr["cached"].values()) == {0}
    # the per-draw figures are those of the draw's own candidates
    truth = {c["id"]: c["truth"] for c in report["candidates"]}
    proxy = {c["id"]: c["proxies"]["real-steps"]["accuracy"] for c in report["candidates"]}
    for d, draw in enumerate(report["draws"]):
        want = rho([truth[i] for i in draw["ids"]], [proxy[i] for i in draw["ids"]])
        got = draw["proxies"]["real-steps"]["spearman"]
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
        per_draw = report["across"]["across"]["real-steps"]["spearman"]["per_draw"][d]
        assert (math.isnan(got) and math.isnan(per_draw)) or per_draw == got
    assert sum(report["across"]["first"]["spearman_top"].values()) == 3
    text = nas.draws_markdown(report)
    assert "| real-steps |" in text and "Paired comparison" in text

    counter.calls = 0                                    # again: all from the cache
    again = nas.run_search(data, proxies, CHEAP, 3, seed=4, cache=tmp_path, space=SPACE,
                           draws=3)
    assert counter.calls == 0
    assert again["training"]["cached"]["truth"] == len(distinct)
    assert [c["truth"] for c in again["candidates"]] == [c["truth"]
                                                         for c in report["candidates"]]
    with pytest.raises(nas.NASError, match="draws"):
        nas.run_search(data, proxies, CHEAP, 3, draws=0)
