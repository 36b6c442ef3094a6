"""Expert trajectories: per-epoch parameter files, resumable to the byte, read back lazily."""

from __future__ import annotations

import pytest
import torch

from distill import experts as ex
from distill.experts import ExpertBuffer, ExpertConfig, ExpertError, expert_path, train_expert
from distill.models import build_model

from .conftest import Kill, make_tiny_set

DATA = make_tiny_set(per_class=6)
CONFIG = ExpertConfig(model="convnet:width=4,depth=1", epochs=3, batch_size=16,
                      augment="crop_scale")


def test_a_file_holds_the_parameters_after_every_epoch(tmp_path):
    path = train_expert(DATA, tmp_path, 0, CONFIG, seed=3)
    assert path == expert_path(tmp_path, 0)
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "gtnkit.expert" and obj["complete"]
    assert len(obj["epochs"]) == CONFIG.epochs + 1
    net = build_model(CONFIG.model, 1, 10, (28, 28))
    shapes = [p.shape for p in net.parameters()]
    for params in obj["epochs"]:
        assert [p.shape for p in params] == shapes
    assert not torch.equal(obj["epochs"][0][0], obj["epochs"][-1][0])  # it trained


@pytest.mark.determinism
def test_killed_after_an_epoch_and_resumed_gives_the_same_bytes(tmp_path, monkeypatch):
    whole = train_expert(DATA, tmp_path / "whole", 0, CONFIG, seed=1).read_bytes()
    original = ex._Recorder.on_epoch_state

    def die_after_first(self, epoch, model, optimizer):
        original(self, epoch, model, optimizer)
        if epoch == 0:
            raise Kill

    monkeypatch.setattr(ex._Recorder, "on_epoch_state", die_after_first)
    with pytest.raises(Kill):
        train_expert(DATA, tmp_path / "cut", 0, CONFIG, seed=1)
    partial = torch.load(expert_path(tmp_path / "cut", 0), weights_only=True)
    assert not partial["complete"] and len(partial["epochs"]) == 2
    monkeypatch.setattr(ex._Recorder, "on_epoch_state", original)
    resumed = train_expert(DATA, tmp_path / "cut", 0, CONFIG, seed=1).read_bytes()
    assert resumed == whole


def test_experts_are_independent_and_a_foreign_file_is_refused(tmp_path):
    a = train_expert(DATA, tmp_path, 0, CONFIG, seed=0)
    b = train_expert(DATA, tmp_path, 1, CONFIG, seed=0)
    ea, eb = (torch.load(p, weights_only=True)["epochs"] for p in (a, b))
    assert not torch.equal(ea[0][0], eb[0][0])
    with pytest.raises(ExpertError, match="other options"):
        train_expert(DATA, tmp_path, 0, ExpertConfig(model=CONFIG.model, epochs=4,
                                                     batch_size=16), seed=0)


def test_the_buffer_reads_finished_experts_only(tmp_path, monkeypatch):
    train_expert(DATA, tmp_path, 0, CONFIG, seed=0)
    original = ex._Recorder.on_epoch_state

    def die(self, epoch, model, optimizer):
        original(self, epoch, model, optimizer)
        raise Kill

    monkeypatch.setattr(ex._Recorder, "on_epoch_state", die)
    with pytest.raises(Kill):
        train_expert(DATA, tmp_path, 1, CONFIG, seed=0)
    buf = ExpertBuffer.from_folder(tmp_path)
    assert len(buf) == 1 and buf.epochs == CONFIG.epochs
    stored = torch.load(expert_path(tmp_path, 0), weights_only=True)["epochs"]
    for a, b in zip(buf.epoch(0, 2), stored[2]):
        assert torch.equal(a, b)
    with pytest.raises(ExpertError, match="outside"):
        buf.epoch(0, CONFIG.epochs + 1)
    with pytest.raises(ExpertError, match="no finished expert"):
        ExpertBuffer.from_folder(tmp_path / "empty")
