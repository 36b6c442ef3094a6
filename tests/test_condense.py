"""The meta-training loop: resume reproduces an uninterrupted run, the non-finite guard keeps
the last good checkpoint, checkpoints are validated, memory grows with T only for unrolled."""

from __future__ import annotations

import shutil

import pytest
import torch

from distill.condense import CheckpointError, ConfigError, NonFiniteError, condense, condense_config
from distill.matching import class_gradient
from distill.models import build_model
from distill.rng import generator
from distill.strategies import StrategyConfig, dc_loops

from .conftest import Kill, killer, make_tiny_set

MODEL = "convnet:width=4,depth=2"
SMALL = dict(real_batch=6, outer_loop=2, inner_loop=2)
T3 = dict(inner_steps=3)  # the synthetic set's inner schedule


def tiny():
    return make_tiny_set(per_class=8)


@pytest.mark.determinism
@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "dd", "ift"])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, method):
    data = tiny()
    cfg = condense_config(method, iterations=5, checkpoint_every=2, eval_every=1, **SMALL)
    full, r_full = condense(data, cfg, 2, model=MODEL, seed=3, **T3,
                            checkpoint=tmp_path / "a.pt", evaluate=lambda t, i: {})
    with pytest.raises(Kill):  # killed during iteration 3, after the checkpoint at 2
        condense(data, cfg, 2, model=MODEL, seed=3, **T3, checkpoint=tmp_path / "b.pt",
                 evaluate=killer(3))
    resumed, r_res = condense(data, cfg, 2, model=MODEL, seed=3, **T3,
                              checkpoint=tmp_path / "b.pt", resume=True,
                              evaluate=lambda t, i: {})
    assert r_res.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    assert r_res.losses == r_full.losses
    other = condense(data, cfg, 2, model=MODEL, seed=4, **T3)[0]
    assert not torch.equal(full.images, other.images)  # the seed matters


@pytest.mark.determinism
def test_learned_lr_and_labels_resume_too(tmp_path):
    data = tiny()
    cfg = condense_config("dd", iterations=4, checkpoint_every=2, eval_every=1, **SMALL)
    kw = dict(model=MODEL, seed=0, learn_lr=True, learn_labels=True, **T3)
    full, _ = condense(data, cfg, 1, **kw)
    assert full.lr != pytest.approx(cfg.strategy_config.inner_lr)  # the lr was learned
    with pytest.raises(Kill):
        condense(data, cfg, 1, checkpoint=tmp_path / "c.pt", evaluate=killer(3), **kw)
    resumed, _ = condense(data, cfg, 1, checkpoint=tmp_path / "c.pt", resume=True, **kw)
    assert torch.equal(resumed.log_lr, full.log_lr)
    assert torch.equal(resumed.label_logits, full.label_logits)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    data = tiny()
    cfg = condense_config("dc", iterations=6, checkpoint_every=2, eval_every=1, **SMALL)
    seen = {}

    def poison(teacher, iteration):
        if iteration == 3:
            with torch.no_grad():
                teacher.images[0] = float("nan")
            seen["images"] = teacher.images.detach().clone()
        return {}

    ckpt = tmp_path / "run.pt"
    with pytest.raises(NonFiniteError, match="iteration 4.*last good checkpoint") as info:
        condense(data, cfg, 2, model=MODEL, checkpoint=ckpt, evaluate=poison)
    assert "\n" not in str(info.value)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2
    assert torch.isfinite(state["teacher"]["images"]).all()


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path):
    data = tiny()
    cfg = condense_config("dm", iterations=2, **SMALL)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        condense(data, cfg, 1, model=MODEL, checkpoint=tmp_path / "none.pt",
                 resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        condense(data, cfg, 1, model=MODEL, checkpoint=tmp_path / "junk.pt",
                 resume=True)
    condense(data, cfg, 1, model=MODEL, seed=0, checkpoint=tmp_path / "ok.pt")
    shutil.copy(tmp_path / "ok.pt", tmp_path / "ok2.pt")
    with pytest.raises(CheckpointError, match="other options or seed"):
        condense(data, cfg, 1, model=MODEL, seed=1, checkpoint=tmp_path / "ok2.pt",
                 resume=True)


def test_bad_configuration_is_one_typed_line():
    data = tiny()
    with pytest.raises(ConfigError, match="unknown method"):
        condense_config("gan")
    with pytest.raises(ConfigError, match="ipc"):
        condense(data, condense_config("dc", iterations=1), 9, model=MODEL)
    with pytest.raises(ConfigError, match="init"):
        condense(data, "dc", 1, init="herding", model=MODEL)
    with pytest.raises(ConfigError, match="inner_steps"):
        condense(data, "dd", 1, model=MODEL, inner_steps=0)
    with pytest.raises(ConfigError, match="distance"):
        StrategyConfig(distance="l1")


def test_dc_loop_table():
    assert dc_loops(1) == (1, 1) and dc_loops(10) == (10, 50) and dc_loops(50) == (50, 10)
    assert dc_loops(12) == (10, 50)  # nearest tabulated IPC below


def test_selection_indices_seed_the_set():
    data = tiny()
    idx = torch.cat([data.class_indices(c)[:2] for c in range(10)])
    cfg = condense_config("dm", iterations=1, lr=1e-12, **SMALL)
    teacher, _ = condense(data, cfg, 2, init=idx, model=MODEL)
    torch.testing.assert_close(teacher.images, data.images[idx])  # tiny lr: still the coreset


def test_unrolled_memory_grows_with_steps_while_implicit_stays_flat():
    data = tiny()

    def saved(method, steps):
        cfg = condense_config(method, iterations=1, **SMALL)
        return condense(data, cfg, 1, model=MODEL, inner_steps=steps
                        )[1].memory["saved_peak_bytes"]

    assert saved("dd", 8) > 3 * saved("dd", 2)
    assert saved("ift", 8) == saved("ift", 2)  # no graph across the student steps
    cut = condense_config("dd", iterations=1, checkpoint_steps=2, **SMALL)
    cut = condense(data, cut, 1, model=MODEL, inner_steps=8
                   )[1].memory["saved_peak_bytes"]
    assert cut < saved("dd", 8) / 2


def test_chunked_real_gradient_is_the_whole_batch_gradient():
    data = tiny()
    model = build_model(MODEL, 1, 10, (28, 28), generator=generator(0)).double()
    x, y = data.images[:40].double(), data.labels[:40]
    whole = class_gradient(model, x, y)
    for chunk in (7, 16, 39):
        for a, b in zip(class_gradient(model, x, y, chunk=chunk), whole):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_real_side_matches_eager():
    data = tiny()
    results = {}
    for compiled in (False, True):
        cfg = condense_config("dc", iterations=2, compile=compiled, **SMALL)
        teacher, r = condense(data, cfg, 1, model=MODEL, seed=1)
        results[compiled] = teacher.images.detach()
    torch.testing.assert_close(results[True], results[False], rtol=1e-3, atol=1e-4)
