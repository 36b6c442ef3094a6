"""`gtnkit gtn train | sample | compare` on real MNIST with tiny budgets, and one-line
refusals."""

from __future__ import annotations

import json

import pytest

from .test_cli import assert_one_line_error, run

TINY = ["--inner-steps", 2, "--batch-size", 20, "--student", "convnet:width=4,depth=2",
        "--meta-iterations", 2, "--real-batch", 20, "--validation", 500, "--noise-dim", 8,
        "--width-fc", 16, "--width-conv", 8, "--students", 1]


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "mnist", "--inner-steps", "0"], "--inner-steps"),
    (["train", "--dataset", "mnist", "--inner-steps", "-4"], "--inner-steps"),
    (["train", "--dataset", "mnist", "--method", "evolution"], "unrolled"),
    (["train", "--dataset", "mnist", "--curriculum", "zigzag"], "shuffled-batch"),
    (["train", "--dataset", "mnist", "--student", "gpt"], "convnet"),
    (["train", "--dataset", "mnist", "--method", "matching", "--batch-size", "10"],
     "batch size (--batch-size) must be >= 20"),
    (["train", "--dataset", "mnist", "--batch-size", "1"], "(--batch-size) must be >= 2"),
    (["train", "--dataset", "mnist", "--unroll-tail", "2"], "--method implicit"),
    (["train", "--dataset", "mnist", "--method", "implicit", "--mixed-at", "final",
      "--unroll-tail", "2"], "--mixed-at trajectory"),
    (["train", "--dataset", "mnist", "--method", "implicit", "--recompute"],
     "needs --method unrolled"),
    (["train", "--dataset", "mnist", "--recompute", "--checkpoint-steps", "2"],
     "does not combine"),
    (["train", "--dataset", "mnist", "--method", "implicit", "--intermediate-every", "1"],
     "need --method unrolled"),
    (["train", "--dataset", "mnist", "--match-curriculum"], "--method matching"),
    (["train", "--dataset", "mnist", "--method", "implicit", "--match-fresh"],
     "--method matching"),
    (["train", "--dataset", "mnist", "--grad-clip", "-0.5"], "--grad-clip"),
    (["train", "--dataset", "mnist", "--method", "implicit", "--unroll-tail", "-1"],
     "--unroll-tail"),
    (["train", "--dataset", "mnist", "--inner-lr", "0"], "--inner-lr"),
    (["train", "--dataset", "mnist", "--inner-momentum", "1"], "--inner-momentum"),
    (["compare", "--dataset", "mnist", "--methods", "unrolled,magic"], "magic"),
    (["compare", "--dataset", "mnist", "--inner-steps", "8,0"], "--inner-steps"),
    (["compare", "--dataset", "svhn"], "mnist"),
])
def test_bad_gtn_input(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("gtn", *args, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


@pytest.mark.realdata
def test_gtn_train_sample_evaluate(tmp_path, data_root):
    out = tmp_path / "g"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "implicit", *TINY,
            "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert len(res["accuracies"]) == 1 and res["memory"]["saved_peak_bytes"] > 0
    assert (out / "grid.png").exists()
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    # the implicit recipe by default, and an explicit option over it
    assert (gtn["mixed_at"], gtn["step_size_grad"], gtn["meta_lr"], gtn["meta_schedule"],
            gtn["real_batch"], gtn["grad_clip"], gtn["unroll_tail"]) == \
        ("trajectory", True, 5e-3, "cosine", 20, 0.5, 5)

    s = tmp_path / "s"
    r = run("gtn", "sample", out / "generator.safetensors", "--per-class", 3, "--out", s)
    assert r.exit_code == 0, r.output
    r = run("-q", "evaluate", s, "--model", "convnet:width=4,depth=2", "--students",
            1, "--epochs", 2, "--test-limit", 100, "--data-root", data_root, "--out",
            tmp_path / "e")
    assert r.exit_code == 0, r.output

    r = run("gtn", "sample", out / "generator.safetensors", "--dataset", "cifar10", "--out",
            tmp_path / "bad")
    assert_one_line_error(r, "cifar10")
    assert not (tmp_path / "bad").exists()


@pytest.mark.realdata
def test_gtn_train_no_recipe_takes_the_bare_defaults(tmp_path, data_root):
    from gtn import GTNConfig

    out = tmp_path / "g"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--no-recipe", "--meta-schedule",
            "cosine", *TINY, "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    bare = GTNConfig()
    assert (gtn["meta_lr"], gtn["intermediate_every"], gtn["meta_schedule"]) == \
        (bare.meta_lr, bare.intermediate_every, "cosine")


@pytest.mark.realdata
@pytest.mark.parametrize("args,expected", [
    (["--grad-clip", 0], dict(grad_clip=None, unroll_tail=5)),  # 0 turns the recipe's clip off
    (["--grad-clip", 2.5], dict(grad_clip=2.5, unroll_tail=5)),
    (["--unroll-tail", 0], dict(grad_clip=0.5, unroll_tail=0, mixed_at="trajectory")),
    # the implicit function theorem as published: no tail, the rest of the recipe kept
    (["--mixed-at", "final"], dict(grad_clip=0.5, unroll_tail=0, mixed_at="final")),
])
def test_gtn_train_options_override_the_implicit_recipe(tmp_path, data_root, args, expected):
    out = tmp_path / "g"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "implicit", *TINY,
            "--meta-iterations", 1, *args, "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    assert {k: gtn[k] for k in expected} == expected
    assert gtn["step_size_grad"] and gtn["meta_schedule"] == "cosine"


@pytest.mark.realdata
def test_gtn_train_recompute_keeps_less_and_scores_the_same(tmp_path, data_root):
    # the unrolled recipe stored and recomputed: the same meta-gradient, so the same students
    # up to rounding, with less saved for backward
    res = {}
    for name, extra in (("stored", []), ("rebuilt", ["--recompute"])):
        out = tmp_path / name
        r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "unrolled", *TINY,
                *extra, "--data-root", data_root, "--out", out)
        assert r.exit_code == 0, r.output
        res[name] = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "rebuilt" / "config.json").read_text())["gtn"]["recompute"]
    assert res["rebuilt"]["memory"]["saved_peak_bytes"] < \
        res["stored"]["memory"]["saved_peak_bytes"]
    assert res["rebuilt"]["accuracies"] == pytest.approx(res["stored"]["accuracies"], abs=0.5)


def test_the_recipes_in_gtn_train_help_are_the_library_table():
    from gtn import RECIPES
    from gtn.commands import RECIPES_HELP

    text = RECIPES_HELP.split("gtn.md): ", 1)[1]
    for method, options in RECIPES.items():
        start = text.index(f"{method}: ")
        chunk = text[start + len(method) + 2:].split(";")[0].rstrip(".")
        for name, value in options.items():
            assert f"{name}={value}" in chunk, (method, name)
        assert chunk.count("=") == len(options), method


@pytest.mark.realdata
def test_gtn_train_matching_options_reach_the_config(tmp_path, data_root):
    out = tmp_path / "m"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "matching", *TINY,
            "--match-fresh", "--inner-lr", 0.05,
            "--inner-momentum", 0.8, "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    assert (gtn["match_curriculum"], gtn["inner_lr"], gtn["inner_momentum"]) == \
        (False, 0.05, 0.8)
