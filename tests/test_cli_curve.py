"""`select --fraction/--order` and `curve` from the command line: refusals are one line and
write nothing; on real MNIST the cache is hit the second time and a tiny curve runs."""

from __future__ import annotations

import json

import pytest

from .test_cli import assert_one_line_error, run


def test_curve_help_states_the_schedule():
    r = run("curve", "--help")
    assert r.exit_code == 0 and "same schedule" in r.output
    r = run("select", "--help")
    assert "--fraction" in r.output and "cold cache" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--fraction", "0"], "(0, 1]"),
    (["--fraction", "-0.5"], "(0, 1]"),
    (["--fraction", "1.5"], "(0, 1]"),
    (["--fraction", "0.1", "--ipc", "3"], "exactly one"),
    ([], "exactly one"),
    (["--ipc", "2", "--order", "hardest"], "score rule"),
    (["--ipc", "2", "--order", "middle"], "hardest"),
])
def test_bad_select_budget(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("select", "--dataset", "mnist", "--method", "herding", *args,
            "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--fractions", "0,0.1"], "(0, 1]"),
    (["--fractions", "0.1,x"], "numbers"),
    (["--methods", "random,magic"], "herding"),
    (["--methods", "gradnorm:middle"], "hardest"),
    (["--lr", "0"], ">0"),
])
def test_bad_curve_input(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("curve", "--dataset", "mnist", *args, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


CHEAP = ["--feature-model", "mlp:width=16", "--signal-epochs", "1"]


@pytest.mark.realdata
def test_select_fraction_cold_then_warm_cache(tmp_path, data_root):
    cache = tmp_path / "cache"
    common = [*CHEAP, "--cache-dir", cache, "--data-root", data_root]
    r = run("-q", "select", "--dataset", "mnist", "--method", "gradnorm", "--order", "easiest",
            "--fraction", "0.01", *common, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    cold = json.loads((tmp_path / "a" / "results.json").read_text())
    assert cold["n_images"] == 600 and sum(cold["counts"]) == 600
    assert cold["signal_cache"]["epochs_trained"] == 1 and not cold["signal_cache"]["hit"]
    r = run("-q", "select", "--dataset", "mnist", "--method", "kcenter", "--fraction", "0.02",
            *common, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    warm = json.loads((tmp_path / "b" / "results.json").read_text())
    assert warm["signal_cache"] == {**cold["signal_cache"], "hit": True, "epochs_trained": 0}
    assert warm["n_images"] == 1200

    r = run("select", "--dataset", "mnist", "--method", "random", "--fraction", "0.0001",
            "--data-root", data_root, "--out", tmp_path / "c")
    assert_one_line_error(r, "empty")
    assert not (tmp_path / "c").exists()


@pytest.mark.realdata
def test_tiny_curve_on_mnist(tmp_path, data_root):
    out = tmp_path / "curve"
    r = run("-q", "curve", "--dataset", "mnist", "--fractions", "0.01,1", "--methods",
            "random,herding", "--seeds", 1, "--model", "mlp:width=16", "--epochs", 1,
            "--test-limit", 500, *CHEAP, "--cache-dir", tmp_path / "cache",
            "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    state = json.loads((out / "curve.json").read_text())
    assert len(state["cells"]) == 3
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| herding |" in (out / "curve.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["whole"]["n"] == 60000
