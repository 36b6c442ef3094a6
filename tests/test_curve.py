"""The data-budget curve on a tiny set: every cell, the budgets it trains on, resumption per
cell (same numbers as a straight run), refusals and the reports."""

from __future__ import annotations

import pytest

from distill.engine import TrainConfig
from distill.store import save_figure
from selection import SelectionError, SignalConfig, SignalProvider
from selection.curve import (
    WHOLE,
    CurveConfig,
    curve_figure,
    curve_markdown,
    parse_rule,
    run_curve,
    summarise,
)

from .conftest import Kill, make_tiny_set

SIG = SignalConfig(model="convnet:width=8,depth=2", train=TrainConfig(epochs=2, batch_size=32))
CFG = CurveConfig(fractions=(0.25, 0.5, 1.0), rules=("random", "herding", "gradnorm:easiest"),
                  seeds=(0, 1), model="mlp:width=16", train=TrainConfig(epochs=2, batch_size=16))


@pytest.fixture(scope="module")
def sets():
    return make_tiny_set(per_class=8, seed=0), make_tiny_set(per_class=4, seed=1)


@pytest.fixture(scope="module")
def straight(sets):
    train, test = sets
    return run_curve(train, test, CFG, SignalProvider(train, SIG, seed=0))


def test_every_cell_once_with_its_budget(straight):
    cells = straight["cells"]
    assert len(cells) == 2 + 3 * 2 * 2
    assert [c["rule"] for c in cells[:2]] == [WHOLE, WHOLE]       # reference first
    sizes = {0.25: 20, 0.5: 40, 1.0: 80}                          # 10 classes x 8 images
    for c in cells:
        assert c["n"] == sizes[c["fraction"]] and 0.0 <= c["accuracy"] <= 1.0
    # the same epochs for every fraction: steps scale with the data
    by = {(c["rule"], c["fraction"], c["seed"]): c for c in cells}
    assert by[(WHOLE, 1.0, 0)]["steps"] == 2 * 5 and by[("random", 0.25, 0)]["steps"] == 2 * 2


@pytest.mark.determinism
def test_killed_curve_resumes_per_cell_to_the_same_numbers(sets, straight, tmp_path):
    train, test = sets
    path = tmp_path / "curve.json"
    ran = []

    def kill_after_five(record, state):
        ran.append(record)
        if len(ran) == 5:
            raise Kill

    with pytest.raises(Kill):
        run_curve(train, test, CFG, SignalProvider(train, SIG, seed=0), state_path=path,
                  on_cell=kill_after_five)
    resumed_cells = []
    state = run_curve(train, test, CFG, SignalProvider(train, SIG, seed=0), state_path=path,
                      on_cell=lambda r, s: resumed_cells.append(r))
    assert len(resumed_cells) == len(straight["cells"]) - 5
    strip = [{k: v for k, v in c.items() if not k.endswith("seconds")} for c in state["cells"]]
    want = [{k: v for k, v in c.items() if not k.endswith("seconds")} for c in straight["cells"]]
    assert strip == want


def test_a_state_of_other_options_is_refused(sets, tmp_path):
    train, test = sets
    path = tmp_path / "curve.json"
    small = CurveConfig(fractions=(0.5,), rules=("random",), seeds=(0,), model="mlp:width=8",
                        train=TrainConfig(epochs=1))
    run_curve(train, test, small, SignalProvider(train, SIG), state_path=path)
    from dataclasses import replace

    with pytest.raises(SelectionError, match="other options"):
        run_curve(train, test, replace(small, seeds=(0, 1)), SignalProvider(train, SIG),
                  state_path=path)


def test_summary_markdown_and_figure(straight, tmp_path):
    s = summarise(straight)
    assert set(s["rules"]) == {"random", "herding", "gradnorm:easiest"}
    row = s["rules"]["random"]["fractions"][0.5]
    assert row["points_lost"] == pytest.approx(s["whole"]["accuracy"] - row["accuracy"])
    text = curve_markdown(straight, "tiny")
    assert "| random |" in text and "saturates at" in text and "8.0x" in text
    save_figure(curve_figure(straight, "tiny"), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("spec,needle", [("magic", "herding"), ("gradnorm:middle", "hardest"),
                                         ("random:hardest", "not a score rule")])
def test_bad_rule_spec_is_one_line(spec, needle):
    with pytest.raises(SelectionError, match=needle) as err:
        parse_rule(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,needle", [({"fractions": (0.0, 1.0)}, "(0, 1]"),
                                           ({"fractions": (1.5,)}, "(0, 1]"),
                                           ({"seeds": (0, 0)}, "distinct"),
                                           ({"rules": ()}, "at least one")])
def test_bad_curve_config(kwargs, needle):
    with pytest.raises(SelectionError) as err:
        CurveConfig(**kwargs)
    assert needle in str(err.value)


def test_score_rules_take_both_orders():
    assert parse_rule("forgetting:easiest") == ("forgetting", {"order": "easiest"})
    from selection import get_method

    assert get_method("forgetting", order="easiest").order == "least"
    assert get_method("entropy", order="hardest").order == "highest"
    assert get_method("gradnorm", order="easiest").order == "lowest"
