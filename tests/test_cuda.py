"""The same paths on a CUDA device: every command at a tiny budget, memory as the CUDA
allocator's peak, kill and ``--resume``, and same seed, same result.

Marked ``cuda`` and skipped, saying why, where no CUDA device is present (``make test-gpu``
runs them). The data are small synthetic sets with the shape of MNIST, so the tests need no
files; every comparison is between two runs made in the test.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import distill.data
from distill.condense import condense, condense_config
from distill.devices import deterministic_cuda
from distill.metatrain import MetaResult
from gtn import GeneratorConfig, GTNConfig
from gtn.train import RECIPES, train_gtn

from .conftest import Kill, killer, make_tiny_set
from .test_cli import run

DEVICE = "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device on this machine (torch.cuda.is_available() is "
                              "False); make test-gpu runs these where there is one"),
]

MODEL = "convnet:width=4,depth=2"


@pytest.fixture(autouse=True)
def _reproducible_cuda():
    """The library functions take a device as it is; the CLI's edge (resolve_device) makes
    CUDA deterministic, and so do these tests for the library calls."""
    deterministic_cuda()
GEN = ["--noise-dim", 8, "--width-fc", 16, "--width-conv", 8]


@pytest.fixture
def tiny_mnist(monkeypatch):
    """`load_dataset` answers with a small learnable MNIST-shaped set (no files needed)."""
    monkeypatch.setattr(distill.data, "load_dataset",
                        lambda name, split="train", root=None, download=False:
                        make_tiny_set(per_class=150 if split == "train" else 10, name=name))


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _cuda_peak(meta: MetaResult | dict) -> int:
    memory = meta.memory if isinstance(meta, MetaResult) else meta["memory"]
    return int(memory["cuda_peak_bytes"] or 0)


def test_evaluate_and_select_on_cuda(tmp_path, tiny_mnist):
    sel = tmp_path / "sel"
    r = run("-q", "select", "--dataset", "mnist", "--method", "herding", "--ipc", 2,
            "--pool-per-class", 10, "--signal-epochs", 1, "--device", DEVICE,
            "--data-root", tmp_path, "--out", sel)
    assert r.exit_code == 0, r.output
    args = ["-q", "evaluate", sel, "--model", MODEL, "--students", 2, "--epochs", 3,
            "--device", DEVICE, "--data-root", tmp_path]
    assert run(*args, "--out", tmp_path / "a").exit_code == 0
    assert run(*args, "--out", tmp_path / "b").exit_code == 0
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["device"].startswith("cuda")
    assert a["accuracies"] == b["accuracies"]  # same seed, same result


@pytest.mark.parametrize("method", ["dc", "dm", "dd"])
def test_distill_on_cuda_records_the_allocator_peak_and_repeats(tmp_path, tiny_mnist, method):
    args = ["-q", "distill", "--dataset", "mnist", "--method", method, "--ipc", 1, "--model",
            MODEL, "--iterations", 3, "--real-batch", 8, "--students", 1, "--eval-epochs", 2,
            "--device", DEVICE, "--data-root", tmp_path]
    for name in ("a", "b"):
        r = run(*args, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert _cuda_peak(a) > 0 and a["accuracies"] == b["accuracies"]
    sa = load_file(tmp_path / "a" / "set.safetensors")
    sb = load_file(tmp_path / "b" / "set.safetensors")
    assert torch.equal(sa["images"], sb["images"])


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gtn_train_on_cuda_records_the_allocator_peak(tmp_path, tiny_mnist, method):
    out = tmp_path / method
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", method, "--inner-steps", 2,
            "--batch-size", 20, "--student", MODEL, "--meta-iterations", 2, "--real-batch", 20,
            "--validation", 50, *GEN, "--students", 1, "--device", DEVICE,
            "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    res = _results(out)
    assert _cuda_peak(res) > 0 and len(res["accuracies"]) == 1


def test_unrolled_cuda_memory_grows_with_t_and_recomputed_stays_flat():
    data = make_tiny_set(per_class=12)

    def peak(t: int, **kw: object) -> int:
        cfg = GTNConfig(method="unrolled", inner_steps=t, batch_size=20,
                        generator=GeneratorConfig(4, 8, 4), student=MODEL, meta_iterations=1,
                        real_batch=8, validation=6, **kw)
        return _cuda_peak(train_gtn(data, cfg, seed=0, device=DEVICE)[1])

    assert peak(8) > 1.5 * peak(2)
    assert peak(8, recompute=True) < 1.5 * peak(2, recompute=True)


def test_gtn_compare_and_nas_smoke_on_cuda(tmp_path, tiny_mnist):
    out = tmp_path / "cmp"
    r = run("-q", "gtn", "compare", "--dataset", "mnist", "--budget", "smoke",
            "--inner-steps", "2,4", "--device", DEVICE, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    cells = json.loads((out / "gtn-compare.json").read_text())["cells"]
    assert cells and all(_cuda_peak(c) > 0 for c in cells.values())
    out = tmp_path / "nas"
    r = run("-q", "nas", "--dataset", "mnist", "--n-candidates", 3, "--proxy", "real-subset",
            "--proxy", "real-steps", "--budget", "smoke", "--families", "mlp",
            "--device", DEVICE, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    assert len(_results(out)["candidates"]) == 3


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gtn_kill_and_resume_on_cuda_reproduce_the_uninterrupted_run(tmp_path, method):
    data = make_tiny_set(per_class=12)
    recipe = {**RECIPES[method], "real_batch": 8}
    cfg = GTNConfig(method=method, inner_steps=3, batch_size=20, generator=GeneratorConfig(4, 8, 4),
                    student=MODEL, meta_iterations=5, match_real_per_class=4, validation=6,
                    checkpoint_every=2, eval_every=1, **recipe)
    full, r_full, _ = train_gtn(data, cfg, seed=2, device=DEVICE, checkpoint=tmp_path / "a.pt",
                                evaluate=lambda t, i: {})
    with pytest.raises(Kill):  # killed during iteration 3, after the checkpoint at 2
        train_gtn(data, cfg, seed=2, device=DEVICE, checkpoint=tmp_path / "b.pt",
                  evaluate=killer(3))
    resumed, r_res, _ = train_gtn(data, cfg, seed=2, device=DEVICE,
                                  checkpoint=tmp_path / "b.pt", resume=True,
                                  evaluate=lambda t, i: {})
    assert r_res.resumed_from == 2 and r_res.losses == r_full.losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert a.device.type == "cuda" and torch.equal(a, b), name


@pytest.mark.parametrize("method", ["dc", "dd"])
def test_condense_kill_and_resume_on_cuda(tmp_path, method):
    data = make_tiny_set(per_class=8)
    cfg = condense_config(method, iterations=5, checkpoint_every=2, eval_every=1, real_batch=6)
    kw = dict(model=MODEL, seed=3, inner_steps=3, device=DEVICE)
    full, r_full = condense(data, cfg, 2, **kw, checkpoint=tmp_path / "a.pt",
                            evaluate=lambda t, i: {})
    with pytest.raises(Kill):
        condense(data, cfg, 2, **kw, checkpoint=tmp_path / "b.pt", evaluate=killer(3))
    resumed, r_res = condense(data, cfg, 2, **kw, checkpoint=tmp_path / "b.pt", resume=True,
                              evaluate=lambda t, i: {})
    assert r_res.resumed_from == 2 and r_res.losses == r_full.losses
    assert torch.equal(resumed.images, full.images)
