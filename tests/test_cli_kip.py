"""`gtnkit distill --method kip|ls` and the KRR score of `gtnkit evaluate`: one-line refusals
that write nothing, and the job on real MNIST with both protocols named in the results."""

from __future__ import annotations

import json

import pytest
import torch

from distill.store import load_set

from .test_cli import assert_one_line_error, run

#: label solve's options: one closed-form solve (--iterations and --target-batch are refused)
TINY_LS = ["--ipc", 1, "--students", 1, "--eval-model", "convnet:width=8,depth=2",
           "--eval-epochs", 2, "--test-limit", 200]
TINY = [*TINY_LS, "--iterations", 3, "--target-batch", 50]


@pytest.mark.parametrize("args,needle", [
    (["--kernel", "rbf"], "unknown kernel 'rbf'; choose from ntk, nngp"),
    (["--kernel-depth", "0"], "depth must be an integer >= 1"),
    (["--reg", "0"], "regulariser must be > 0"),
    (["--reg", "-1e-3"], "regulariser must be > 0"),
    (["--target-batch", "5"], "at least the number of classes (10)"),
])
def test_bad_kip_input(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("distill", "--dataset", "mnist", "--method", "kip", "--ipc", "1", *args,
            "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_bad_krr_options_of_evaluate(tmp_path):
    out = tmp_path / "o"
    r = run("evaluate", tmp_path / "missing.pt", "--kernel", "rbf", "--out", out)
    assert_one_line_error(r, "unknown kernel")
    assert not out.exists()


@pytest.mark.realdata
def test_kip_and_ls_on_mnist_scored_by_both_protocols(tmp_path, data_root):
    kip = tmp_path / "kip"
    r = run("-q", "distill", "--dataset", "mnist", "--method", "kip", *TINY, "--learn-labels",
            "--data-root", data_root, "--out", kip)
    assert r.exit_code == 0, r.output
    assert "KRR (FC1 NTK, KIP paper protocol)" in r.output and "DC protocol" in r.output
    res = json.loads((kip / "results.json").read_text())
    assert res["krr"]["protocol"].startswith("KRR") and 0 <= res["krr"]["accuracy"] <= 100
    assert res["protocol"].startswith("DC protocol") and len(res["accuracies"]) == 1
    assert res["meta"]["iterations"] == 3 and (kip / "checkpoint.pt").exists()
    assert (kip / "grid.png").exists()

    ls = tmp_path / "ls"  # label solve on the KIP set's images
    r = run("-q", "distill", "--dataset", "mnist", "--method", "ls", *TINY_LS, "--support",
            kip / "set.safetensors", "--ls-targets", 500, "--data-root", data_root, "--out", ls)
    assert r.exit_code == 0, r.output
    saved, kip_saved = load_set(ls / "set.safetensors"), load_set(kip / "set.safetensors")
    assert torch.equal(saved.images, kip_saved.images)
    assert saved.labels.shape == (10, 10) and saved.meta["label_kind"] == "krr"

    ev = tmp_path / "ev"
    r = run("-q", "evaluate", ls / "set.safetensors", "--model", "convnet:width=8,depth=2",
            "--students", 1, "--epochs", 2, "--test-limit", 200, "--kernel", "nngp",
            "--kernel-depth", 2, "--data-root", data_root, "--out", ev)
    assert r.exit_code == 0, r.output
    res = json.loads((ev / "results.json").read_text())
    assert res["krr"]["kernel"] == "nngp" and res["krr"]["kernel_depth"] == 2
    assert "KRR (FC2 NNGP" in r.output
