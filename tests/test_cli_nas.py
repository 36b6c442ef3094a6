"""`gtnkit nas`: one-line refusals that write nothing, and a tiny end-to-end search on a
synthetic MNIST-shaped set (every proxy kind), rerun from the cache."""

from __future__ import annotations

import json

import pytest

import distill.data
from distill.store import SavedSet, save_set

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run
from .test_nas import tiny_generator


@pytest.fixture
def runs(tmp_path):
    """A tiny generator and a tiny saved set of MNIST and of Fashion-MNIST."""
    out = {}
    for name in ("mnist", "fashion_mnist"):
        folder = tmp_path / f"gtn-{name}"
        folder.mkdir()
        tiny_generator(folder / "generator.pt", name)
        s = make_tiny_set(per_class=2, name=name)
        save_set(tmp_path / f"dc-{name}" / "set.pt",
                 SavedSet(s.images, s.labels, {"dataset": name, "method": "dm", "ipc": 2}))
        out[name] = (folder, tmp_path / f"dc-{name}")
    return out


@pytest.fixture
def tiny_mnist(monkeypatch):
    """`load_dataset` answers with a small learnable synthetic set (no files needed)."""
    calls = []

    def fake(name, split="train", root=None, download=False):
        calls.append((name, split))
        return make_tiny_set(per_class=20, name=name)

    monkeypatch.setattr(distill.data, "load_dataset", fake)
    return calls


@pytest.mark.parametrize("extra,needle", [
    (["--proxy", "magic"], "unknown proxy kind"),
    (["--proxy", "coreset:nosuch"], "nosuch"),
    (["--proxy", "dc:{fashion_dc}"], "fashion_mnist, not of mnist"),
    (["--proxy", "gtn:{fashion_gtn}"], "fashion_mnist, not of mnist"),
    (["--proxy", "gtn:{missing}"], "no generator"),
    (["--proxy", "real-subset", "--n-candidates", "1"], "--n-candidates"),
    (["--proxy", "real-subset", "--workers", "0"], "--workers"),
    (["--proxy", "real-subset", "--draws", "0"], "--draws"),
    (["--proxy", "real-subset", "--families", "convnet,gpt"], "gpt"),
    (["--proxy", "real-subset", "--proxy", "real-subset"], "twice"),
])
def test_bad_nas_input(tmp_path, runs, tiny_mnist, extra, needle):
    paths = {"fashion_dc": runs["fashion_mnist"][1], "fashion_gtn": runs["fashion_mnist"][0],
             "missing": tmp_path / "nowhere.pt"}
    extra = [e.format(**paths) for e in extra]
    out = tmp_path / "o"
    r = run("nas", "--dataset", "mnist", *extra, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert r.exit_code == 2
    assert not out.exists()
    assert not tiny_mnist  # refused before loading any data


def test_nas_end_to_end_and_cache(tmp_path, runs, tiny_mnist):
    gen, dc = runs["mnist"]
    out = tmp_path / "o"
    args = ["-q", "nas", "--dataset", "mnist", "--n-candidates", 4, "--proxy", f"gtn:{gen}",
            "--proxy", f"dc:{dc}", "--proxy", "coreset:herding", "--proxy", "real-subset",
            "--proxy", "real-steps", "--budget", "smoke", "--seed", 1, "--data-root", tmp_path,
            "--out", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "nas" and cfg["n_candidates"] == 4
    assert set(res["proxies"]) == {f"gtn:{gen}", f"dc:{dc}", "coreset:herding", "real-subset",
                                   "real-steps"}
    assert res["validation"] == 40  # a fifth of the 200 training images, never the test set
    assert ("mnist", "test") not in tiny_mnist
    for q in res["proxies"].values():
        assert -1 <= q["spearman"] <= 1 and q["speedup"] > 0 and q["picked"] <= q["best"]
    assert res["proxies"][f"dc:{dc}"]["size"] == 20
    assert res["proxies"][f"gtn:{gen}"]["size"] == 20  # T x batch = 2 x 10
    assert (out / "nas.md").read_text().startswith("Architecture-search proxies on mnist")
    assert (out / "nas.png").read_bytes()[:4] == b"\x89PNG"
    first = {c["id"]: c["truth"] for c in res["candidates"]}
    n_cached = len(list((out / "cache").rglob("*.json")))
    assert n_cached == 4 * 6

    r = run(*args)  # refused: the folder holds a run
    assert_one_line_error(r, "--force")
    r = run(*args, "--force")  # rerun: every entry comes from the cache
    assert r.exit_code == 0, r.output
    res2 = json.loads((out / "results.json").read_text())
    assert {c["id"]: c["truth"] for c in res2["candidates"]} == first
    assert len(list((out / "cache").rglob("*.json"))) == n_cached


def test_nas_draws(tmp_path, tiny_mnist):
    out = tmp_path / "o"
    r = run("-q", "nas", "--dataset", "mnist", "--n-candidates", 3, "--proxy", "real-subset",
            "--proxy", "real-steps", "--budget", "smoke", "--families", "mlp", "--draws", 2,
            "--seed", 2, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert json.loads((out / "config.json").read_text())["draws"] == 2
    assert [d["seed"] for d in res["draws"]] == [2, 3]
    distinct = {i for d in res["draws"] for i in d["ids"]}
    assert len(res["candidates"]) == res["training"]["distinct"] == len(distinct)
    assert len(list((out / "cache").rglob("*.json"))) == 3 * len(distinct)  # once each
    comp = res["across"]["comparison"]["spearman_top"]
    assert [(q["a"], q["b"]) for q in comp["pairs"]] in ([("real-subset", "real-steps")],
                                                         [("real-steps", "real-subset")])
    assert "Paired comparison, top-half Spearman" in (out / "nas.md").read_text()


@pytest.mark.realdata
def test_nas_on_real_mnist(tmp_path, data_root):
    out = tmp_path / "o"
    r = run("-q", "nas", "--dataset", "mnist", "--n-candidates", 3, "--proxy", "real-subset",
            "--proxy", "real-steps", "--budget", "smoke", "--data-root", data_root, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["validation"] == 500 and res["truth"]["size"] == 1000
