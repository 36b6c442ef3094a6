"""`gtnkit distill` and `gtnkit compare` as a user meets them: the job on real MNIST, resume
after a kill, and one-line refusals that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .test_cli import assert_one_line_error, run

TINY = ["--model", "convnet:width=8,depth=2", "--iterations", 4, "--real-batch", 8,
        "--students", 1, "--eval-epochs", 3, "--test-limit", 200, "--eager", "-q"]


class Killed(Exception):
    """Stands for SIGKILL: the process stops mid-iteration."""


def distill(tmp_path, data_root, name, *extra):
    out = tmp_path / name
    args = [a for a in TINY if a != "-q"]
    return out, run("-q", "distill", "--dataset", "mnist", "--ipc", 1, *args, *extra,
                    "--data-root", data_root, "--out", out)


@pytest.mark.parametrize("args,needle", [
    (["--method", "gan", "--ipc", "1"], "dc"),
    (["--method", "dc", "--ipc", "0"], "ipc"),
    (["--method", "dc", "--ipc", "1", "--init", "magic"], "herding"),
    (["--method", "dc", "--ipc", "1", "--model", "gpt"], "convnet"),
    (["--method", "dc", "--ipc", "1", "--learn-lr"], "dd"),
    (["--method", "dm", "--ipc", "1", "--truncate", "2"], "dd only"),
    (["--method", "dd", "--ipc", "1", "--inner-steps", "0"], "inner-steps"),
    (["--method", "dd", "--ipc", "1", "--real-chunk", "4"], "dc, dsa and dm"),
    (["--method", "dc", "--ipc", "1", "--real-chunk", "-1"], "real-chunk"),
])
def test_bad_distill_input(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("distill", "--dataset", "mnist", *args, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


@pytest.mark.determinism
@pytest.mark.realdata
def test_distill_on_mnist_resume_and_compare(tmp_path, data_root, monkeypatch):
    out, r = distill(tmp_path, data_root, "dc", "--method", "dc", "--checkpoint-every", 2)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert len(res["accuracies"]) == 1 and res["meta"]["iterations"] == 4
    # the real gradients come in cache-sized pieces on a CPU, whole on a GPU
    config = json.loads((out / "config.json").read_text())
    assert config["meta"]["strategy_config"]["real_chunk"] == (
        16 if config["device"] == "cpu" else None)
    assert res["seconds_per_iteration"] > 0 and res["memory"]["saved_peak_bytes"] > 0
    saved = load_file(out / "set.safetensors")
    assert saved["images"].shape == (10, 1, 28, 28)
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"

    # a kill during iteration 3 (after the checkpoint at 2), then --resume: the same set
    import distill.strategies as strategies

    calls = {"n": 0}
    original = strategies.Matching.step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return original(self, *a, **k)

    monkeypatch.setattr(strategies.Matching, "step", dying)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        distill(tmp_path, data_root, "killed", "--method", "dc", "--checkpoint-every", 2)
    monkeypatch.setattr(strategies.Matching, "step", original)
    assert not (killed / "results.json").exists() and (killed / "checkpoint.pt").exists()
    _, r = distill(tmp_path, data_root, "killed", "--method", "dc", "--checkpoint-every", 2,
                   "--resume")
    assert r.exit_code == 0, r.output
    resumed = load_file(killed / "set.safetensors")
    assert torch.equal(resumed["images"], saved["images"])

    # an unreadable checkpoint is one line
    (killed / "checkpoint.pt").write_bytes(b"junk")
    (killed / "results.json").unlink()
    (killed / "config.json").unlink()
    _, r = distill(tmp_path, data_root, "killed", "--method", "dc", "--resume")
    assert_one_line_error(r, "checkpoint")

    # a second method and the comparison
    out2, r = distill(tmp_path, data_root, "dm", "--method", "dm", "--students", 2)
    assert r.exit_code == 0, r.output
    out3, r = distill(tmp_path, data_root, "dm2", "--method", "dm", "--students", 2,
                      "--seed", 1)
    assert r.exit_code == 0, r.output
    table = tmp_path / "cmp.md"
    r = run("compare", out, out2, out3, "--by", "method")
    assert r.exit_code == 0, r.output
    assert "| dm | 4 |" in r.output and "| dc | 1 |" in r.output
    r = run("compare", out2, out3, "--by", "run", "--out", table)
    assert "| dm | dm2 |" in r.output or "| dm2 | dm |" in r.output
    assert "Welch" in r.output and table.read_text() == r.output
    assert_one_line_error(run("compare", tmp_path), "results.json")


@pytest.mark.realdata
def test_non_finite_loss_is_one_line_and_writes_no_results(tmp_path, data_root):
    out, r = distill(tmp_path, data_root, "nf", "--method", "dm", "--lr", "1e30",
                     "--iterations", 30)
    assert_one_line_error(r, "non-finite meta-loss", "iteration")
    assert not (out / "results.json").exists() and not (out / "set.safetensors").exists()
