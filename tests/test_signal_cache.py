"""The signal cache: reused without training (counted), invalidated by its fingerprint, and a
killed signal training resumes to the very same signals."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from distill.engine import TrainConfig
from selection import SignalConfig, SignalProvider, select

from .conftest import Kill, make_tiny_set

CFG = SignalConfig(model="convnet:width=8,depth=2",
                   train=TrainConfig(epochs=3, batch_size=32, decay_at=0.5))
LEARNED = ("embedding", "forgetting", "el2n", "entropy")


@pytest.fixture(scope="module")
def data():
    return make_tiny_set(per_class=10)


def signals(provider: SignalProvider, names=LEARNED) -> dict:
    return {n: provider.get(n) for n in names}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def test_second_provider_reads_the_cache_and_trains_nothing(data, tmp_path):
    first = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    a = signals(first, LEARNED + ("grand",))
    assert first.epochs_trained == 3 and not first.cache_hit
    before = SignalProvider.total_epochs_trained
    second = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    b = signals(second, LEARNED + ("grand",))
    assert second.cache_hit and second.epochs_trained == 0
    assert SignalProvider.total_epochs_trained == before     # nothing trained anywhere
    assert_same(a, b)
    # every rule, IPC and fraction reuses it
    for method, kw in [("herding", {"ipc": 2}), ("kcenter", {"fraction": 0.5}),
                       ("gradnorm", {"fraction": 0.3})]:
        select(data, method, seed=0, signals=second, **kw)
    assert SignalProvider.total_epochs_trained == before


def test_grand_later_comes_from_the_stored_early_weights(data, tmp_path):
    first = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    first.get("embedding")                               # no GraNd asked yet
    second = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    grand = second.get("grand")                          # computed, not trained
    assert second.epochs_trained == 0 and grand.shape == (len(data),)
    reference = SignalProvider(data, CFG, seed=0).get("grand")   # memory only, trains
    torch.testing.assert_close(grand, reference)


@pytest.mark.parametrize("change", [
    {"seed": 1},
    {"config": replace(CFG, train=replace(CFG.train, epochs=2))},
    {"config": replace(CFG, model="convnet:width=4,depth=2")},
    {"data": True},
])
def test_fingerprint_change_misses_the_cache(data, tmp_path, change):
    SignalProvider(data, CFG, seed=0, cache_root=tmp_path).get("embedding")
    other = make_tiny_set(per_class=10, seed=5) if change.get("data") else data
    p = SignalProvider(other, change.get("config", CFG), seed=change.get("seed", 0),
                       cache_root=tmp_path)
    p.get("embedding")
    assert not p.cache_hit and p.epochs_trained > 0


def test_a_torn_cache_file_is_rebuilt(data, tmp_path):
    p = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    p.get("entropy")
    p.disk.signals_path.write_bytes(b"torn")
    q = SignalProvider(data, CFG, seed=0, cache_root=tmp_path)
    torch.testing.assert_close(q.get("entropy"), p.get("entropy"))
    assert not q.cache_hit


class KillingProgress:
    """Counts SGD steps through the progress interface and kills the run at step ``at``."""

    def __init__(self, at: int):
        self.at, self.steps = at, 0

    @contextlib.contextmanager
    def task(self, description, total):
        outer = self

        class T:
            def update(self, n=1):
                outer.steps += n
                if outer.steps == outer.at:
                    raise Kill

        yield T()


@pytest.mark.determinism
def test_killed_signal_training_resumes_to_the_same_signals(data, tmp_path):
    reference = signals(SignalProvider(data, CFG, seed=0, cache_root=tmp_path / "ref"))
    steps_per_epoch = -(-len(data) // CFG.train.batch_size)
    killed = SignalProvider(data, CFG, seed=0, cache_root=tmp_path / "run",
                            progress=KillingProgress(at=steps_per_epoch + 2))  # inside epoch 2
    with pytest.raises(Kill):
        killed.get("embedding")
    assert killed.disk.checkpoint_path.is_file()
    resumed = SignalProvider(data, CFG, seed=0, cache_root=tmp_path / "run")
    got = signals(resumed)
    assert resumed.epochs_trained == 2          # epoch 1 came from the checkpoint
    assert not resumed.disk.checkpoint_path.exists()
    assert_same(reference, got)
