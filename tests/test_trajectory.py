"""Trajectory matching (MTT): its two gradients (unrolled; TESLA's constant-memory recursion)
against each other and against finite differences, their saved memory in the number of
student steps, and the strategy in the meta-training loop (online and on-disk experts)."""

from __future__ import annotations

import pytest
import torch

from distill.augment import AugmentConfig, DiffAugment
from distill.condense import condense_config
from distill.experts import ExpertConfig, train_expert
from distill.memory import SavedTensorMeter
from distill.metatrain import meta_train
from distill.models import build_model
from distill.rng import generator
from distill.strategies import STRATEGIES, ConfigError, RealSampler, StrategyConfig, make_strategy
from distill.synthetic import SyntheticSet
from distill.trajectory import (
    Trajectory,
    TrajectoryConfig,
    tesla_gradient,
    trajectory_distance,
    unrolled_gradient,
)
from gtn import GeneratorConfig, GeneratorTeacher

from .conftest import make_tiny_set
from .test_contract import Recorder

DATA = make_tiny_set(per_class=4)
INFO = DATA.info
CONV = "convnet:width=4,depth=1"


def problem(dtype=torch.float32, steps=4, spec=CONV, seed=0, augment=False):
    """A student, an expert segment, learnable pixels and per-step batches (fixed seeds)."""
    g = generator(seed, "problem")
    net = build_model(spec, 1, 10, (28, 28), generator=g).to(dtype)
    start = [p.detach().clone() for p in net.parameters()]
    target = [p + 0.05 * torch.randn(p.shape, generator=g, dtype=dtype) for p in start]
    pixels = (0.5 * torch.randn(10, 1, 28, 28, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.arange(10)
    picks = [torch.randperm(10, generator=g)[:6] for _ in range(steps)]
    seeds = [1000 + i for i in range(steps)]
    aug = DiffAugment(AugmentConfig(strategy="crop_scale_rotate", per_sample=True)) \
        if augment else None

    def batch(i):
        x = pixels[picks[i]]
        if aug is not None:
            x = aug(x, torch.Generator().manual_seed(seeds[i]))
        return x, labels[picks[i]]

    return net, start, target, pixels, batch


@pytest.mark.parametrize("augment", [False, True])
def test_tesla_equals_unrolled_for_pixels_and_lr(augment):
    net, start, target, pixels, batch = problem(augment=augment)
    lr = torch.tensor(0.05, requires_grad=True)
    lu, gu = unrolled_gradient(net, start, target, batch, 4, lr, [pixels, lr])
    lt, gt = tesla_gradient(net, start, target, batch, 4, lr, [pixels, lr])
    torch.testing.assert_close(lt, lu, rtol=1e-5, atol=0)
    torch.testing.assert_close(gt[0], gu[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gt[1], gu[1], rtol=1e-4, atol=1e-7)
    assert float(gu[0].abs().sum()) > 0 and float(gu[1].abs()) > 0


def test_tesla_equals_unrolled_with_per_step_lr_momentum_and_weight_decay():
    net, start, target, pixels, batch = problem(steps=3, spec="mlp:width=8")
    lr = torch.tensor([0.05, 0.03, 0.04], requires_grad=True)
    mom = torch.tensor(0.6, requires_grad=True)
    args = (net, start, target, batch, 3, lr, [pixels, lr, mom], mom, 1e-3)
    lu, gu = unrolled_gradient(*args)
    lt, gt = tesla_gradient(*args)
    torch.testing.assert_close(lt, lu, rtol=1e-5, atol=0)
    for a, b in zip(gt, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert float(gu[2].abs()) > 0


def test_both_gradients_match_central_finite_differences_in_float64():
    net, start, target, pixels, batch = problem(torch.float64, steps=3)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    _, gu = unrolled_gradient(net, start, target, batch, 3, lr, [pixels, lr])
    _, gt = tesla_gradient(net, start, target, batch, 3, lr, [pixels, lr])

    def loss(px, rate):
        from distill.inner import student_steps

        with torch.no_grad():
            saved = pixels.detach().clone()
            pixels.copy_(px)
            batches = [tuple(t.detach() for t in batch(i)) for i in range(3)]
            pixels.copy_(saved)
            st = student_steps(net, start, batches, float(rate))
        return float(trajectory_distance(st.params, start, target))

    eps = 1e-6
    for idx in [(0, 0, 14, 14), (3, 0, 10, 20), (7, 0, 5, 5)]:
        plus, minus = pixels.detach().clone(), pixels.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (loss(plus, lr) - loss(minus, lr)) / (2 * eps)
        assert abs(fd) > 1e-7  # a pixel the steps use
        for g in (gu[0], gt[0]):
            assert float(g[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    fd = (loss(pixels.detach(), lr + eps) - loss(pixels.detach(), lr - eps)) / (2 * eps)
    for g in (gu[1], gt[1]):
        assert float(g) == pytest.approx(fd, rel=1e-6)


def saved_peak(fn, steps):
    net, start, target, pixels, batch = problem(steps=steps)
    lr = torch.tensor(0.05, requires_grad=True)
    with SavedTensorMeter() as meter:
        fn(net, start, target, batch, steps, lr, [pixels, lr])
    return meter.peak


def test_tesla_saved_memory_is_flat_in_the_steps_and_unrolled_grows():
    tesla = [saved_peak(tesla_gradient, n) for n in (4, 16)]
    unrolled = [saved_peak(unrolled_gradient, n) for n in (4, 16)]
    assert tesla[1] <= 1.1 * tesla[0]
    assert unrolled[1] >= 3 * unrolled[0]
    assert tesla[1] < unrolled[1] / 4


def make_teacher(kind):
    g = generator(0, "trajectory")
    if kind == "synthetic":
        return SyntheticSet.from_real(DATA, 1, g, steps=3, step_size=6, lr=0.02)
    return GeneratorTeacher(INFO, steps=3, batch_size=20, curriculum="full",
                            config=GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4),
                            generator=g)


def student(g):
    return build_model(CONV, INFO.channels, INFO.num_classes, INFO.im_size, generator=g)


@pytest.mark.parametrize("kind", ["synthetic", "generator"])
def test_the_strategy_gives_the_same_update_by_either_gradient(kind):
    seen = {}
    for gradient in ("unrolled", "tesla"):
        teacher = make_teacher(kind)
        opt = Recorder([p for p in teacher.parameters() if p.requires_grad], lr=1e-3)
        cfg = TrajectoryConfig(gradient=gradient, expert_epochs=2, max_start_epoch=3,
                               augment="crop_scale", lr_lr=None)
        stats = make_strategy("trajectory", cfg).step(teacher, opt, RealSampler(DATA), student,
                                                      generator(1, "step"))
        seen[gradient] = (stats["loss"], opt.seen)
    assert seen["tesla"][0] == pytest.approx(seen["unrolled"][0], rel=1e-5)
    for a, b in zip(seen["tesla"][1], seen["unrolled"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_lr_lr_gives_the_learned_lr_its_own_step():
    grads = {}
    for lr_lr in (None, 1e-5):
        teacher = make_teacher("synthetic")
        opt = Recorder([p for p in teacher.parameters() if p.requires_grad], lr=1000.0)
        cfg = TrajectoryConfig(expert_epochs=2, max_start_epoch=3, lr_lr=lr_lr)
        make_strategy("trajectory", cfg).step(teacher, opt, RealSampler(DATA), student,
                                              generator(1, "step"))
        grads[lr_lr] = opt.seen[-1]  # log_lr is the set's last parameter
    scale = 1e-5 / (1000.0 * 0.02 ** 2)
    torch.testing.assert_close(grads[1e-5], grads[None] * scale, rtol=1e-4, atol=0)


def test_registered_configured_and_refused():
    assert STRATEGIES["trajectory"] is Trajectory
    assert isinstance(make_strategy("trajectory", StrategyConfig()).config, TrajectoryConfig)
    cfg = condense_config("mtt", iterations=5, dataset="mnist", gradient="tesla")
    assert cfg.strategy == "trajectory" and cfg.optimizer == "sgd" and cfg.lr == 1000.0
    assert isinstance(cfg.strategy_config, TrajectoryConfig)
    assert cfg.strategy_config.gradient == "tesla" and "flip" not in cfg.strategy_config.augment
    with pytest.raises(ConfigError, match="unrolled, tesla"):
        TrajectoryConfig(gradient="exact")
    with pytest.raises(ConfigError, match="max_start_epoch"):
        TrajectoryConfig(max_start_epoch=0)


def test_mtt_runs_in_the_loop_on_experts_from_disk(tmp_path):
    conf = ExpertConfig(model=CONV, epochs=3, batch_size=16, augment="")
    for i in range(2):
        train_expert(DATA, tmp_path / "experts", i, conf, seed=0)
    teacher = SyntheticSet.from_real(DATA, 1, generator(0, "init"), steps=3, lr=0.01)
    cfg = condense_config("mtt", iterations=3, dataset="mnist", experts=str(tmp_path / "experts"),
                          expert_epochs=2, max_start_epoch=2, gradient="tesla")
    before = teacher.images.detach().clone()
    result = meta_train(teacher, RealSampler(DATA), student, cfg, seed=0)
    assert len(result.losses) == 3 and all(0 < x < 10 for x in result.losses)
    assert not torch.equal(before, teacher.images.detach())
    assert teacher.lr != pytest.approx(0.01, rel=1e-9)

    with pytest.raises(Exception, match="do not fit"):
        wide = lambda g: build_model("convnet:width=8,depth=1", 1, 10, (28, 28), generator=g)  # noqa: E731
        meta_train(SyntheticSet.from_real(DATA, 1, generator(0, "init"), steps=2),
                   RealSampler(DATA), wide, cfg, seed=0)
