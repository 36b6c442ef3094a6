"""Never a false result, never a machine brought down: non-finite data and options are refused
before any training, a diverged student is an error instead of a score, devices this build
cannot run on are one line, and a meta-step that cannot fit in memory is refused before it is
allocated."""

from __future__ import annotations

import math
import time

import pytest
import torch

import distill.memory
import distill.metatrain
from distill.devices import DeviceError, available_devices, resolve_device
from distill.engine import EvalProtocol, TrainConfig, evaluate_set
from distill.errors import ConfigError, NonFiniteError
from distill.memory import MemoryBudgetError, check_fits
from distill.metatrain import MetaConfig
from distill.store import SavedSet, StoreError, count_non_finite, load_set, save_set
from gtn import GeneratorConfig, GTNConfig
from gtn.train import load_generator, save_generator, train_gtn

from .conftest import make_tiny_set

TINY_GEN = GeneratorConfig(noise_dim=4, width_fc=8, width_conv=4)


def test_count_non_finite_counts_every_floating_tensor_nested():
    a = torch.zeros(3, 4)
    a[0, 1], a[2, 3] = float("nan"), float("-inf")
    obj = {"x": a, "y": [torch.ones(5), {"z": torch.tensor([float("inf")])}],
           "labels": torch.arange(4), "meta": {"lr": float("nan")}}  # plain floats: metadata
    assert count_non_finite(obj) == (3, 12 + 5 + 1)


def test_a_set_with_one_nan_pixel_is_refused_naming_the_file_and_the_count(tmp_path):
    s = make_tiny_set(per_class=2)
    images = s.images.clone()
    images[3, 0, 5, 5] = float("nan")
    path = save_set(tmp_path / "set.pt", SavedSet(images, s.labels, {"dataset": "mnist"}))
    with pytest.raises(StoreError, match=r"set\.pt holds 1 non-finite value"):
        load_set(path)
    images[3, 0, 5, 5] = float("inf")
    save_set(path, SavedSet(images, s.labels, {"dataset": "mnist"}))
    with pytest.raises(StoreError, match="1 non-finite"):
        load_set(path)
    save_set(path, SavedSet(s.images, s.labels, {"dataset": "mnist"}))
    assert torch.equal(load_set(path).images, s.images)  # the clean set still loads


def test_a_set_with_negative_or_matrix_hard_labels_is_refused(tmp_path):
    s = make_tiny_set(per_class=2)
    path = tmp_path / "set.pt"
    labels = s.labels.clone()
    labels[0] = -1
    save_set(path, SavedSet(s.images, labels, {"dataset": "mnist"}))
    with pytest.raises(StoreError, match="class index"):
        load_set(path)


def test_a_generator_with_a_nan_weight_is_refused(tmp_path):
    cfg = GTNConfig(method="unrolled", inner_steps=2, batch_size=20, generator=TINY_GEN,
                    student="convnet:width=4,depth=1", meta_iterations=1, real_batch=8,
                    validation=6)
    teacher, _, _ = train_gtn(make_tiny_set(per_class=8), cfg, seed=0)
    save_generator(tmp_path / "generator.pt", teacher, cfg)
    load_generator(tmp_path / "generator.pt")  # the clean one loads
    with torch.no_grad():
        next(teacher.generator.parameters()).view(-1)[0] = float("nan")
    save_generator(tmp_path / "generator.pt", teacher, cfg)
    with pytest.raises(Exception, match="1 non-finite value"):
        load_generator(tmp_path / "generator.pt")


def _protocol(**train):
    return EvalProtocol(model="mlp:width=16", n_students=1,
                        train=TrainConfig(epochs=2, batch_size=16, decay_at=None, **train))


def test_non_finite_training_data_never_gets_a_score():
    s = make_tiny_set(per_class=4)
    bad = s.images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="training images hold 1 non-finite"):
        evaluate_set(bad, s.labels, s.images, s.labels, _protocol(), seed=0)
    soft = torch.full((s.labels.numel(), 10), 0.1)
    soft[2, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="labels hold 1"):
        evaluate_set(s.images, soft, s.images, s.labels, _protocol(), seed=0)


def test_a_diverged_student_is_an_error_not_a_chance_score():
    s = make_tiny_set(per_class=4)
    # the same set trains at a sane lr ...
    ok = evaluate_set(s.images, s.labels, s.images, s.labels, _protocol(lr=0.01), seed=0)
    assert math.isfinite(ok.mean)
    # ... and at 1e30 the weights overflow: refused, whatever accuracy argmax would give
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        evaluate_set(s.images, s.labels, s.images, s.labels, _protocol(lr=1e30), seed=0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=float("nan")), "lr"), (dict(lr=float("inf")), "lr"), (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=float("nan")), "momentum"), (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(weight_decay=float("inf")), "weight_decay"),
])
def test_training_options_must_be_finite_and_in_range(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0])
def test_meta_lr_must_be_finite_and_positive(lr):
    with pytest.raises(ConfigError, match="finite"):
        MetaConfig(lr=lr)


@pytest.mark.parametrize("name", ["xpu", "meta", "mps", "cuda:7", "gpu", "cpu:x"])
def test_devices_this_machine_cannot_run_on_are_one_line_listing_the_choices(name):
    if name == "mps" and "mps" in available_devices():
        pytest.skip("this machine has an Apple GPU")
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(DeviceError) as err:
        resolve_device(name)
    assert "cpu" in str(err.value) and "\n" not in str(err.value)


def test_devices_this_machine_runs_on_resolve():
    for name in available_devices():
        assert resolve_device(name).type in ("cpu", "cuda", "mps")


def test_check_fits_is_a_closed_comparison():
    check_fits(100, "cpu", "x", "y", available=100)  # equal fits
    with pytest.raises(MemoryBudgetError, match="needs about 2.0 GiB, but 1.0 GiB are free"):
        check_fits(2 * 2**30, "cpu", "x", "use less", available=2**30)


def _long_unrolled(t: int, **kw) -> GTNConfig:
    return GTNConfig(method="unrolled", inner_steps=t, batch_size=20, curriculum="none",
                     generator=TINY_GEN, student="convnet:width=4,depth=1", meta_iterations=1,
                     real_batch=8, validation=6, eval_every=0, **kw)


def test_a_meta_step_that_cannot_fit_is_refused_before_it_runs(monkeypatch):
    data = make_tiny_set(per_class=8)
    # 64 MiB free: a tiny student's step saves well under 1 MiB, so T = 100000 cannot fit
    monkeypatch.setattr(distill.memory, "available_bytes", lambda device="cpu": 64 * 2**20)
    monkeypatch.setattr(distill.metatrain, "available_bytes", lambda device="cpu": 64 * 2**20)
    t0 = time.process_time()
    with pytest.raises(MemoryBudgetError) as err:
        train_gtn(data, _long_unrolled(100_000), seed=0)
    assert time.process_time() - t0 < 10
    msg = str(err.value)
    assert "T = 100000" in msg and "--recompute" in msg and "T <= " in msg
    fit = int(msg.split("T <= ")[1].split(";")[0].split(",")[0])
    assert 1 <= fit < 100_000
    # what the message offers does fit: the recomputed unroll holds one step whatever T, and
    # a T the message names runs
    from distill.strategies import StrategyConfig, make_strategy

    assert make_strategy("unrolled", StrategyConfig(recompute=True)).steps_held(100_000) == 1
    train_gtn(data, _long_unrolled(min(fit, 4)), seed=0)
    # and the guard can be turned off (a short run, so it is cheap to prove)
    train_gtn(data, _long_unrolled(4, memory_check=False), seed=0)


def test_a_curriculum_that_cannot_fit_is_refused_before_it_is_allocated(monkeypatch):
    monkeypatch.setattr(distill.memory, "available_bytes", lambda device="cpu": 2**30)
    cfg = GTNConfig(method="unrolled", inner_steps=100_000, batch_size=128, curriculum="full",
                    student="convnet:width=4,depth=1", meta_iterations=1, validation=6)
    t0 = time.process_time()
    with pytest.raises(MemoryBudgetError, match="learned curriculum of T = 100000"):
        train_gtn(make_tiny_set(per_class=8), cfg, seed=0)
    assert time.process_time() - t0 < 10


def test_the_memory_check_is_not_part_of_a_runs_fingerprint():
    from distill.store import fingerprint_of

    assert fingerprint_of(MetaConfig()) == fingerprint_of(MetaConfig(memory_check=False))


@pytest.mark.parametrize("spec,needle", [
    ("convnet:width=abc", "width of convnet wants an integer, got 'abc'"),
    ("convnet:depth=2.5", "depth of convnet wants an integer"),
    ("mlp:act=3", "act of mlp wants a word"),
])
def test_a_model_option_of_the_wrong_type_names_the_option_and_the_type(spec, needle):
    from distill.models import ModelError, parse_model_spec

    with pytest.raises(ModelError, match=needle):
        parse_model_spec(spec)
    parse_model_spec(spec.split(":")[0])  # the model itself is fine


def test_resume_with_a_changed_option_names_it(tmp_path):
    from distill.metatrain import CheckpointError

    data = make_tiny_set(per_class=8)
    cfg = GTNConfig(method="unrolled", inner_steps=2, batch_size=20, generator=TINY_GEN,
                    student="convnet:width=4,depth=1", meta_iterations=2, real_batch=8,
                    validation=6, checkpoint_every=1)
    train_gtn(data, cfg, seed=0, checkpoint=tmp_path / "c.pt")
    changed = GTNConfig(**{**cfg.__dict__, "batch_size": 30, "meta_iterations": 3})
    with pytest.raises(CheckpointError, match=r"batch_size: 20 -> 30"):
        train_gtn(data, changed, seed=0, checkpoint=tmp_path / "c.pt", resume=True)
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 1"):
        train_gtn(data, cfg, seed=1, checkpoint=tmp_path / "c.pt", resume=True)
