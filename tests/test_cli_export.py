"""The artefact commands as a user meets them: `export`, `evaluate` on other tools' sets (scored
with the same number as the same images saved by gtnkit), `show` with the card, and the sets
that `select`, `distill` and `gtn sample` write, each a Dataset that survives every export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import distill.data
from distill.exports import EXPORT_FORMATS
from distill.store import SavedSet, load_set, save_set

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run

EVAL = ["-q", "evaluate", "--model", "mlp:width=8", "--students", 2, "--epochs", 3,
        "--test-limit", 60, "--device", "cpu", "--no-krr"]


@pytest.fixture
def tiny_data(monkeypatch):
    """The commands read a tiny stand-in of MNIST (seconds, no files)."""
    sets = {"train": make_tiny_set(per_class=12, seed=0), "test": make_tiny_set(per_class=8,
                                                                                 seed=1)}
    monkeypatch.setattr(distill.data, "load_dataset",
                        lambda name, split="train", root=None, download=False: sets[split])
    return sets


def the_set() -> SavedSet:
    s = make_tiny_set(per_class=3, seed=4)
    return SavedSet(s.images, s.labels, {"dataset": "mnist", "method": "herding", "ipc": 3})


def accuracies(out):
    return json.loads((out / "results.json").read_text())["accuracies"]


def test_a_set_in_the_dd_ranking_layout_scores_as_the_same_images_saved_by_gtnkit(
        tmp_path, tiny_data):
    s = the_set()
    ours = save_set(tmp_path / "ours" / "set.safetensors", s)
    theirs = tmp_path / "theirs"  # written as DD-Ranking / MTT release sets: plain tensors
    theirs.mkdir()
    torch.save(s.images.clone(), theirs / "images.pt")
    torch.save(s.labels.clone(), theirs / "labels.pt")
    torch.save(torch.tensor(0.01), theirs / "lr.pt")
    np.savez(tmp_path / "theirs.npz", images=s.images.numpy(), labels=s.labels.numpy())

    r = run(*EVAL, ours, "--out", tmp_path / "e-ours")
    assert r.exit_code == 0, r.output
    for name, src in (("tensors", theirs), ("npz", tmp_path / "theirs.npz")):
        r = run(*EVAL, src, "--dataset", "mnist", "--normalization", "dataset",
                "--out", tmp_path / f"e-{name}")
        assert r.exit_code == 0, r.output
        assert accuracies(tmp_path / f"e-{name}") == accuracies(tmp_path / "e-ours")
    # the set scored is kept as an artefact, this evaluation in its card
    scored = load_set(tmp_path / "e-tensors")
    assert torch.equal(scored.images, s.images) and scored.meta["method"] == "imported"
    ev = scored.card["evaluations"][-1]
    assert ev["accuracies"] == accuracies(tmp_path / "e-ours")
    assert ev["student"] == "mlp:width=8" and ev["epochs"] == 3 and ev["protocol"] == "dc"


@pytest.mark.parametrize("args,needle", [
    ([], "normalisation"),
    (["--normalization", "none"], "data set"),
    (["--dataset", "mnist", "--normalization", "zca"], "MEAN/STD"),
    (["--dataset", "cifar10", "--normalization", "none"], "not (3, 32, 32)"),
])
def test_a_foreign_set_without_what_it_holds_is_refused_in_one_line(tmp_path, args, needle):
    s = the_set()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    torch.save(s.images, theirs / "images.pt")
    torch.save(s.labels, theirs / "labels.pt")
    out = tmp_path / "o"
    assert_one_line_error(run(*EVAL, theirs, *args, "--out", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("labels,needle", [
    (torch.arange(30) % 11, "classes 0..9"),
    (torch.rand(30, 7), "soft labels over 7 classes"),
])
def test_a_class_count_that_does_not_match_the_data_set_is_one_line(tmp_path, labels, needle):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    torch.save(the_set().images, theirs / "images.pt")
    torch.save(labels, theirs / "labels.pt")
    assert_one_line_error(run(*EVAL, theirs, "--dataset", "mnist", "--normalization",
                              "dataset", "--out", tmp_path / "o"), needle)


def test_a_gtnkit_set_refuses_a_normalization_and_another_dataset(tmp_path):
    path = save_set(tmp_path / "set.safetensors", the_set())
    assert_one_line_error(run(*EVAL, path, "--normalization", "none", "--out", tmp_path / "o"),
                          "card")
    assert_one_line_error(run(*EVAL, path, "--dataset", "cifar10", "--out", tmp_path / "o"),
                          "not of cifar10")


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_round_trips_and_evaluate_reads_the_export(tmp_path, tiny_data, fmt):
    path = save_set(tmp_path / "set.safetensors", the_set())
    out = tmp_path / fmt
    r = run("export", path, "--format", fmt, "--out", out)
    assert r.exit_code == 0, r.output
    back = load_set(out / "set.npz" if fmt == "npz" else out)
    s = load_set(path)
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    assert back.card == s.card
    assert json.loads((out / "results.json").read_text())["sha256"] == s.card["sha256"]
    r = run(*EVAL, out / "set.npz" if fmt == "npz" else out, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output


def test_export_of_a_foreign_set_makes_it_an_artefact(tmp_path):
    s = the_set()
    np.savez(tmp_path / "theirs.npz", images=s.denormalize().numpy(), labels=s.labels.numpy())
    r = run("export", tmp_path / "theirs.npz", "--dataset", "mnist", "--normalization", "none",
            "--format", "safetensors", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    back = load_set(tmp_path / "o")
    assert torch.allclose(back.images, s.images, atol=1e-5)
    assert back.card["source"]["normalization"] == {"mean": [0.0], "std": [1.0]}


def test_help_and_an_empty_folder(tmp_path):
    r = run("export", "--help")
    assert r.exit_code == 0 and "imagefolder" in r.output
    assert "--normalization" in run("evaluate", "--help").output
    assert_one_line_error(run(*EVAL, tmp_path, "--out", tmp_path / "o"), "images.pt")


def test_export_refuses_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert_one_line_error(run("export", bad, "--format", "npz", "--out", tmp_path / "o"),
                          "bad.safetensors")
    path = save_set(tmp_path / "set.safetensors", the_set())
    r = run("export", path, "--format", "tiff", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "imagefolder" in r.output
    assert not (tmp_path / "o").exists()


def test_show_draws_the_card_beside_the_grid(tmp_path, tiny_data):
    path = save_set(tmp_path / "set.safetensors", the_set())
    r = run(*EVAL, path, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    r = run("show", tmp_path / "e", "--out", tmp_path / "with")
    assert r.exit_code == 0, r.output
    r = run("show", tmp_path / "e", "--no-card", "--out", tmp_path / "without")
    assert r.exit_code == 0, r.output
    with_card = Image.open(tmp_path / "with" / "grid.png")
    without = Image.open(tmp_path / "without" / "grid.png")
    assert with_card.width > without.width + 100 and with_card.height >= without.height
    from distill.grid import card_lines

    lines = " ".join(card_lines(load_set(tmp_path / "e").card))
    for needle in ("herding", "IPC 3", "DC protocol:", "mlp:width=8", "student(s)", "sha256"):
        assert needle in lines, lines


# ------------------------------------------------------------------ what the runs write
def check_artefact(folder, tmp_path):
    """The run's set loads as a Dataset, round-trips through every export, and any
    safetensors reader reads it."""
    from safetensors.torch import load_file

    s = load_set(folder)
    x, y = next(iter(DataLoader(s, batch_size=4)))
    assert x.shape[1:] == (1, 28, 28) and len(y) == 4
    assert set(load_file(folder / "set.safetensors")) >= {"images", "labels"}
    for fmt in EXPORT_FORMATS:
        out = tmp_path / f"x-{folder.name}-{fmt}"
        assert run("export", folder, "--format", fmt, "--out", out).exit_code == 0
        back = load_set(out / "set.npz" if fmt == "npz" else out)
        assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
        assert back.card == s.card
    return s


def test_select_distill_and_gtn_sample_write_artefacts_with_their_cards(tmp_path, tiny_data):
    from gtn import GeneratorConfig, GTNConfig
    from gtn.train import make_teacher, save_generator

    r = run("-q", "select", "--dataset", "mnist", "--method", "random", "--ipc", 2,
            "--device", "cpu", "--no-cache", "--out", tmp_path / "sel")
    assert r.exit_code == 0, r.output
    card = check_artefact(tmp_path / "sel", tmp_path).card
    assert card["method"] == "random" and card["ipc"] == 2 and len(card["indices"]) == 20

    r = run("-q", "distill", "--dataset", "mnist", "--method", "dc", "--ipc", 1,
            "--model", "convnet:width=4,depth=1", "--iterations", 2, "--real-batch", 4,
            "--students", 1, "--eval-epochs", 2, "--eval-model", "mlp:width=8", "--eager",
            "--device", "cpu", "--no-memory-check", "--out", tmp_path / "dc")
    assert r.exit_code == 0, r.output
    card = check_artefact(tmp_path / "dc", tmp_path).card
    results = json.loads((tmp_path / "dc" / "results.json").read_text())
    assert card["method"] == "dc" and card["ipc"] == 1 and card["init"] == "real"
    assert card["evaluations"][0]["accuracies"] == results["accuracies"]
    assert card["evaluations"][0]["student"] == "mlp:width=8"

    config = GTNConfig(inner_steps=2, batch_size=10, student="convnet:width=4,depth=1",
                       meta_iterations=1, generator=GeneratorConfig(noise_dim=4, width_fc=8,
                                                                    width_conv=4))
    save_generator(tmp_path / "gen" / "generator.safetensors",
                   make_teacher(distill.data.get_info("mnist"), config, seed=0), config)
    for name, extra in (("sample", ["--per-class", 2]), ("curriculum", ["--curriculum"])):
        r = run("gtn", "sample", tmp_path / "gen", *extra, "--device", "cpu",
                "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        card = check_artefact(tmp_path / name, tmp_path).card
        assert card["method"] == "gtn-unrolled"
    assert card["curriculum"]["steps"] == 2 and card["count"] == 20
