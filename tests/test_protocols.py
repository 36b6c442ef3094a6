"""Evaluation protocols after the papers: DC's augmentation ops against their closed forms, the
protocol each method's sets get, batch-norm statistics frozen from real images before matching,
and the protocol recorded by the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.augment import AugmentError, DCAugment, DCAugmentConfig, digit_strategy
from distill.condense import condense_config
from distill.engine import TrainConfig, train
from distill.models import build_model
from distill.protocols import (
    ProtocolError,
    default_protocol,
    describe_protocol,
    make_protocol,
    protocol_train_config,
)
from distill.store import SavedSet, load_set, save_set
from distill.strategies import RealSampler, freeze_batch_norm

from .conftest import make_tiny_set


def _images(n: int = 3, c: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ DC's augmentation ops
def test_crop_shifts_by_whole_pixels_with_the_mean_around():
    aug = DCAugment(DCAugmentConfig(crop=2))
    x = _images(2, 2, 6)
    mean = x.mean(dim=(0, 2, 3))
    r, c = torch.tensor([0, 3]), torch.tensor([2, 1])
    y = aug.crop(x, r, c, mean)
    for i in range(2):  # out[a, b] = x[a + r - crop, b + c - crop], the mean outside
        for a in range(6):
            for b in range(6):
                sa, sb = a + int(r[i]) - 2, b + int(c[i]) - 2
                want = x[i, :, sa, sb] if 0 <= sa < 6 and 0 <= sb < 6 else mean
                assert torch.equal(y[i, :, a, b], want)


def test_rotation_by_a_right_angle_is_exact_and_zero_is_the_identity():
    x = _images(2, 3, 7)
    assert torch.allclose(DCAugment.rotate(x, torch.tensor([90, 90]), 0.5),
                          torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(DCAugment.rotate(x, torch.tensor([-90, 180]), 0.0),
                          torch.stack([torch.rot90(x[0], -1, (1, 2)),
                                       torch.rot90(x[1], 2, (1, 2))]), atol=1e-5)
    assert torch.allclose(DCAugment.rotate(x, torch.tensor([0, 0]), 3.0), x, atol=1e-5)


def test_rotation_fills_with_the_given_value():
    x = torch.zeros(1, 1, 15, 15)  # a corner's source lies > 2 px outside: all taps are fill
    y = DCAugment.rotate(x, torch.tensor([45]), 2.0)
    assert y[0, 0, 0, 0] == pytest.approx(2.0) and y[0, 0, 7, 7] == pytest.approx(0.0, abs=1e-6)


def _reference_scale(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One image as DC's reference scales it: nearest resize, zero canvas, middle crop."""
    ch, hh, ww = img.shape
    tmp = F.interpolate(img[None], [h, w])[0]
    side = max(h, w, hh, ww)
    canvas = torch.zeros(ch, side, side)
    r, c = int((side - h) / 2), int((side - w) / 2)
    canvas[:, r:r + h, c:c + w] = tmp
    r, c = int((side - hh) / 2), int((side - ww) / 2)
    return canvas[:, r:r + hh, c:c + ww]


def test_scale_of_one_is_the_identity_and_others_match_the_reference_construction():
    aug = DCAugment(DCAugmentConfig(scale=0.2))
    x = _images(5, 2, 28)
    half = torch.full((5,), 0.5, dtype=torch.float64)
    assert torch.equal(aug.scale(x, half, half), x)
    u = torch.tensor([0.0, 0.1, 0.37, 0.8, 0.999], dtype=torch.float64)
    v = torch.tensor([0.9, 0.5, 0.02, 0.61, 0.3], dtype=torch.float64)
    y = aug.scale(x, u, v)
    for i in range(5):
        h, w = int((0.8 + 0.4 * float(u[i])) * 28), int((0.8 + 0.4 * float(v[i])) * 28)
        assert torch.equal(y[i], _reference_scale(x[i], h, w)), (i, h, w)


def test_each_image_gets_one_op_drawn_from_the_strategy():
    x = _images(64, 1, 8)
    g = torch.Generator().manual_seed(0)
    aug = DCAugment(DCAugmentConfig(strategy="noise", noise=0.001))
    d = aug(x, g) - x
    assert d.abs().max() < 0.01 and d.std().item() == pytest.approx(0.001, rel=0.1)
    both = DCAugment(DCAugmentConfig(strategy="crop_noise"))
    params = both.sample(64, torch.Generator().manual_seed(1))
    y = both.apply(x, params, torch.Generator().manual_seed(2))
    noised = params["op"] == 1
    assert 0 < int(noised.sum()) < 64
    assert (y[noised] - x[noised]).abs().max() < 0.01
    # a crop moves whole pixels: every value of a cropped image is a pixel of x or the mean
    pool = torch.cat([x.flatten(), x.mean().view(1)])
    for img in y[~noised]:
        assert torch.isin(img.flatten(), pool).all()


def test_dc_augment_refuses_unknown_ops():
    with pytest.raises(AugmentError, match="flip"):
        DCAugment(DCAugmentConfig(strategy="crop_flip"))


# ------------------------------------------------------------------ protocols
def test_each_method_gets_its_papers_protocol():
    assert [default_protocol(m) for m in ("dc", "dsa", "dm", "dd", "kcenter", None)] == \
        ["dc", "dsa", "dsa", "dc", "dc", "dc"]
    mnist = protocol_train_config("dc", "mnist")
    assert (mnist.epochs, mnist.augmentation) == (1000, "dc:crop_scale_rotate")
    assert (mnist.lr, mnist.batch_size, mnist.momentum, mnist.weight_decay, mnist.decay_at) == \
        (0.01, 256, 0.9, 5e-4, 0.5)
    cifar = protocol_train_config("dc", "cifar10")
    assert (cifar.epochs, cifar.augmentation, cifar.augment) == (300, "", False)
    assert protocol_train_config("dc", "mnist", "convnet:norm=batch").augmentation == \
        "dc:crop_noise"
    assert protocol_train_config("dsa", "mnist").augmentation == \
        "dsa:color_crop_cutout_scale_rotate"
    assert protocol_train_config("dsa", "cifar10").augmentation == \
        "dsa:color_crop_cutout_flip_scale_rotate"
    assert protocol_train_config("none", "mnist").epochs == 300
    with pytest.raises(ProtocolError, match="dsa"):
        protocol_train_config("kip", "mnist")
    p = make_protocol("dc", "mnist", n_students=2, epochs=7)
    assert p.name == "dc" and p.train.epochs == 7
    assert "DC protocol" in describe_protocol(p) and "crop_scale_rotate" in describe_protocol(p)


def test_dsa_drops_flip_on_digits_in_condensation_too():
    assert digit_strategy("color_crop_cutout_flip_scale_rotate", "mnist") == \
        "color_crop_cutout_scale_rotate"
    assert digit_strategy("crop_flip", "fashion_mnist") == "crop_flip"
    assert "flip" not in condense_config("dsa", dataset="mnist").strategy_config.augment
    assert "flip" in condense_config("dm", dataset="cifar10").strategy_config.augment
    assert "flip" in condense_config("dsa").strategy_config.augment  # no data set: as written


def test_named_augmentation_trains():
    data = make_tiny_set(per_class=2)
    model = build_model("convnet:width=4,depth=1", 1, 10, (28, 28),
                        generator=torch.Generator().manual_seed(0))
    for spec in ("dc:crop_scale_rotate", "dsa:crop_scale"):
        stats = train(model, data.images, data.labels,
                      TrainConfig(epochs=2, augmentation=spec), torch.Generator().manual_seed(0))
        assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.final_loss))
    with pytest.raises(AugmentError, match="dsa:OPS"):
        train(model, data.images, data.labels, TrainConfig(epochs=1, augmentation="crop"),
              torch.Generator())


# ------------------------------------------------------------------ batch norm before matching
def test_batch_norm_statistics_come_from_real_images_and_are_frozen():
    data = make_tiny_set(per_class=20)
    net = build_model("convnet:width=4,depth=1,norm=batch", 1, 10, (28, 28),
                      generator=torch.Generator().manual_seed(0))
    real = RealSampler(data, "cpu")
    g = torch.Generator().manual_seed(5)
    freeze_batch_norm(net, real, g, per_class=16)
    # the same draws again: the batch the statistics came from
    g2 = torch.Generator().manual_seed(5)
    x = torch.cat([real.class_batch(c, 16, g2) for c in range(10)])
    bn = net.features[1]
    with torch.no_grad():
        z = net.features[0](x)
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, 0.1 * z.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var,
                               0.9 + 0.1 * z.var(dim=(0, 2, 3), unbiased=True))
    before = bn.running_mean.clone()
    net(x[:3])  # frozen: a forward pass leaves the statistics alone
    assert torch.equal(bn.running_mean, before)


# ------------------------------------------------------------------ the CLI records it
@pytest.mark.realdata
def test_evaluate_names_its_protocol(tmp_path, data_root):
    from click.testing import CliRunner

    from cli import main

    images = _images(10, 1, 28)
    save_set(tmp_path / "set.pt", SavedSet(images, torch.arange(10),
                                           {"dataset": "mnist", "method": "dm"}))
    base = ["-q", "evaluate", tmp_path / "set.pt", "--model", "mlp:width=8", "--students", 1,
            "--epochs", 2, "--test-limit", 100, "--no-krr", "--data-root", data_root]
    for extra, name, aug in (([], "dsa", "color_crop_cutout_scale_rotate"),
                             (["--protocol", "dc"], "dc", "crop_scale_rotate"),
                             (["--protocol", "none"], "none", "no augmentation")):
        out = tmp_path / name
        r = CliRunner().invoke(main, [str(a) for a in [*base, *extra, "--out", out]],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        res = json.loads((out / "results.json").read_text())
        assert res["protocol_name"] == name and aug in res["protocol"]
        assert res["protocol_changes"] == ["epochs"]
        assert json.loads((out / "config.json").read_text())["protocol"]["name"] == name
    assert load_set(tmp_path / "set.pt").meta["method"] == "dm"
