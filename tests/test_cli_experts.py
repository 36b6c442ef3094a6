"""`gtnkit experts`: expert trajectories through the CLI on a tiny MNIST-shaped set."""

from __future__ import annotations

import json

import pytest
import torch

import distill.data

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run


@pytest.fixture
def tiny_mnist(monkeypatch):
    monkeypatch.setattr(distill.data, "load_dataset",
                        lambda name, split="train", root=None, download=False:
                        make_tiny_set(per_class=6, name=name))


def test_experts_write_one_file_per_expert_and_resume_to_the_same_files(tmp_path, tiny_mnist):
    out = tmp_path / "experts"
    args = ["-q", "experts", "--dataset", "mnist", "--model", "mlp:width=8", "--experts", 2,
            "--epochs", 2, "--batch-size", 16, "--augment", "", "--data-root", tmp_path,
            "--out", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.glob("expert_*.pt"))
    assert files == ["expert_0000.pt", "expert_0001.pt"]
    assert json.loads((out / "results.json").read_text())["files"] == files
    expert = torch.load(out / files[0], weights_only=True)
    assert len(expert["epochs"]) == 3  # the initialisation and after each of 2 epochs
    before = {f: (out / f).read_bytes() for f in files}
    assert_one_line_error(run(*args), "already holds a run")
    # as if stopped during the second expert: its file and the run's records are not there
    for name in ("expert_0001.pt", "config.json", "results.json"):
        (out / name).unlink()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert {f: (out / f).read_bytes() for f in files} == before  # kept, and retrained alike


@pytest.mark.parametrize("extra,needle", [
    (["--momentum", "1"], "--momentum"), (["--lr", "nan"], "--lr"),
    (["--model", "convnet:width=x"], "width of convnet wants an integer"),
])
def test_bad_expert_options_are_one_line(tmp_path, extra, needle):
    out = tmp_path / "o"
    r = run("experts", "--dataset", "mnist", *extra, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


@pytest.mark.parametrize("gradient", ["unrolled", "tesla"])
def test_distill_mtt_from_experts_on_the_command_line(tmp_path, tiny_mnist, gradient):
    experts = tmp_path / "experts"
    r = run("-q", "experts", "--dataset", "mnist", "--model", "mlp:width=8", "--experts", 2,
            "--epochs", 3, "--batch-size", 16, "--augment", "", "--data-root", tmp_path,
            "--out", experts)
    assert r.exit_code == 0, r.output
    out = tmp_path / gradient
    r = run("-q", "distill", "--dataset", "mnist", "--method", "mtt", "--ipc", 1, "--model",
            "mlp:width=8", "--experts", experts, "--expert-epochs", 1, "--max-start-epoch", 2,
            "--inner-steps", 3, "--gradient", gradient, "--iterations", 2, "--students", 1,
            "--eval-epochs", 1, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    strategy = config["meta"]["strategy_config"]
    assert (strategy["gradient"], strategy["expert_epochs"], config["learn_lr"]) == \
        (gradient, 1, True)
    assert len(json.loads((out / "results.json").read_text())["accuracies"]) == 1


def test_ift_with_the_conjugate_gradient_solver(tmp_path, tiny_mnist):
    out = tmp_path / "cg"
    r = run("-q", "distill", "--dataset", "mnist", "--method", "ift", "--ipc", 1, "--model",
            "mlp:width=8", "--ift-solver", "cg", "--neumann-terms", 3, "--inner-steps", 2,
            "--iterations", 2, "--students", 1, "--eval-epochs", 1, "--data-root", tmp_path,
            "--out", out)
    assert r.exit_code == 0, r.output
    strategy = json.loads((out / "config.json").read_text())["meta"]["strategy_config"]
    assert strategy["ift_solver"] == "cg"
