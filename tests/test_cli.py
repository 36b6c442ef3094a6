"""The CLI as a user meets it: help, the main job on real data, and one-line refusals that
write nothing."""

from __future__ import annotations

import gzip
import json

import pytest
from click.testing import CliRunner

from cli import main

COMMANDS = ["datasets", "select", "evaluate", "show", "distill", "compare", "gtn"]


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_missing_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("GTNKIT_DATA", raising=False)
    out = tmp_path / "o"
    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 1, "--out", out)
    assert_one_line_error(r, "GTNKIT_DATA")
    assert not out.exists()


def test_nonexistent_root(tmp_path):
    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 1,
            "--data-root", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_one_line_error(r, "nowhere")


def test_truncated_data_file(tmp_path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = (2051).to_bytes(4, "big") + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(1000))
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (60000).to_bytes(4, "big") + bytes(60000))
    out = tmp_path / "o"
    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 1,
            "--data-root", tmp_path / "root", "--out", out)
    assert_one_line_error(r, "train-images-idx3-ubyte")
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet", "--method", "random", "--ipc", "1"], "mnist"),
    (["--dataset", "mnist", "--method", "magic", "--ipc", "1"], "herding"),
    (["--dataset", "mnist", "--method", "random", "--ipc", "0"], "ipc"),
    (["--dataset", "mnist", "--method", "random", "--ipc", "-3"], "ipc"),
    (["--dataset", "mnist", "--method", "herding", "--ipc", "1", "--option", "x"], "KEY=VALUE"),
    (["--dataset", "mnist", "--method", "random", "--ipc", "1", "--feature-model", "gpt"],
     "convnet"),
])
def test_bad_select_input(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("select", *args, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_evaluate_refuses_bad_set_and_model(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert_one_line_error(run("evaluate", bad, "--out", tmp_path / "o"), "bad.pt")
    assert_one_line_error(run("evaluate", tmp_path / "none.pt", "--out", tmp_path / "o"),
                          "no saved set")
    assert_one_line_error(run("evaluate", bad, "--model", "gpt", "--out", tmp_path / "o"),
                          "convnet")
    assert not (tmp_path / "o").exists()


def test_existing_run_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 1, "--out", out,
            "--data-root", tmp_path)
    assert_one_line_error(r, "--force")
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.realdata
def test_main_job_on_mnist(tmp_path, data_root):
    """select -> evaluate -> show on real MNIST, with a cheap budget."""
    sel = tmp_path / "sel"
    r = run("-q", "select", "--dataset", "mnist", "--method", "kcenter", "--ipc", 2,
            "--pool-per-class", 40, "--signal-epochs", 1, "--feature-model",
            "convnet:width=16", "--data-root", data_root, "--out", sel)
    assert r.exit_code == 0, r.output
    results = json.loads((sel / "results.json").read_text())
    config = json.loads((sel / "config.json").read_text())
    assert len(results["indices"]) == 20 and config["method"] == "kcenter"

    ev = tmp_path / "ev"
    r = run("-q", "evaluate", sel, "--model", "convnet:width=16", "--students", 2,
            "--epochs", 20, "--test-limit", 500, "--data-root", data_root, "--out", ev)
    assert r.exit_code == 0, r.output
    res = json.loads((ev / "results.json").read_text())
    assert len(res["accuracies"]) == 2 and res["mean"] > 30.0  # 10 % is chance

    r = run("show", sel / "set.safetensors", "--out", tmp_path / "show", "--per-class", 2)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "show" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 41,
            "--pool-per-class", 40, "--data-root", data_root, "--out", tmp_path / "big")
    assert_one_line_error(r, "larger than class")


@pytest.mark.realdata
def test_datasets_lists_what_is_there(data_root):
    r = run("datasets", "--data-root", data_root)
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert "ok" in lines["mnist"] and "ok" in lines["cifar10"]
    assert "missing" in lines["fashion_mnist"]


@pytest.mark.determinism
@pytest.mark.realdata
def test_evaluate_resumes_after_a_kill(tmp_path, data_root, monkeypatch):
    import distill.engine as engine

    sel = tmp_path / "sel"
    assert run("-q", "select", "--dataset", "mnist", "--method", "random", "--ipc", 1,
               "--pool-per-class", 5, "--data-root", data_root, "--out", sel).exit_code == 0
    args = ["-q", "evaluate", sel / "set.safetensors", "--model", "mlp:width=16", "--students", 3,
            "--epochs", 3, "--test-limit", 200, "--data-root", data_root]
    assert run(*args, "--out", tmp_path / "full").exit_code == 0

    real_accuracy, calls = engine.accuracy, []

    def dies_on_second_student(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were killed
        return real_accuracy(*a, **k)

    monkeypatch.setattr(engine, "accuracy", dies_on_second_student)
    assert run(*args, "--out", tmp_path / "cut").exit_code != 0  # click: "Aborted!"
    monkeypatch.setattr(engine, "accuracy", real_accuracy)
    assert not (tmp_path / "cut" / "results.json").exists()
    assert len(json.loads((tmp_path / "cut" / "progress.json").read_text())["state"]
               ["accuracies"]) == 1
    assert run(*args, "--out", tmp_path / "cut", "--resume").exit_code == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["accuracies"] == full["accuracies"]
    assert not (tmp_path / "cut" / "progress.json").exists()
    r = run(*args, "--out", tmp_path / "other", "--resume")
    assert_one_line_error(r, "nothing to resume")
