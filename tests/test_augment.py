"""DSA augmentation against closed forms: identities, flips, 90-degree rotation, cutout area,
the siamese property, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from distill.augment import AugmentConfig, AugmentError, AugmentParams, DiffAugment


def params(op: str, **values) -> AugmentParams:
    return AugmentParams(ops=(op,), values=({k: torch.tensor([v]) for k, v in values.items()},))


@pytest.fixture
def x():
    return torch.randn(3, 2, 7, 7, generator=torch.Generator().manual_seed(0))


def test_identities(x):
    aug = DiffAugment()
    for p in (params("scale", sx=1.0, sy=1.0), params("rotate", theta=0.0),
              params("crop", tx=0.0, ty=0.0), params("flip", flip=False)):
        torch.testing.assert_close(aug.apply(x, p), x, atol=1e-5, rtol=0)


def test_flip_is_mirror_and_involution(x):
    aug = DiffAugment()
    p = params("flip", flip=True)
    assert torch.equal(aug.apply(x, p), torch.flip(x, dims=[3]))
    assert torch.equal(aug.apply(aug.apply(x, p), p), x)


def test_rotate_90_degrees_equals_rot90(x):
    out = DiffAugment().apply(x, params("rotate", theta=math.pi / 2))
    expected = torch.rot90(x, k=1, dims=(2, 3))
    if not torch.allclose(out, expected, atol=1e-5):
        expected = torch.rot90(x, k=-1, dims=(2, 3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_crop_shifts_by_whole_pixels(x):
    out = DiffAugment().apply(x, params("crop", tx=1 / 7, ty=0.0))  # one pixel
    torch.testing.assert_close(out[..., 1:], x[..., :-1], atol=1e-5, rtol=0)
    assert torch.all(out[..., 0] == 0)


def test_cutout_zeroes_a_square_of_the_expected_area():
    x = torch.ones(1, 1, 8, 8)
    out = DiffAugment(AugmentConfig(cutout_ratio=0.5)).apply(x, params("cutout", cx=0.5, cy=0.5))
    assert int((out == 0).sum()) == 16


def test_brightness_alone_adds_a_constant(x):
    p = params("color", brightness=0.3, saturation=1.0, contrast=1.0)
    torch.testing.assert_close(DiffAugment().apply(x, p), x + 0.3)


def test_siamese_shared_params_apply_the_same_transform():
    a, b = torch.randn(2, 1, 6, 6), torch.randn(5, 1, 6, 6)
    aug = DiffAugment(AugmentConfig(mode="all"))
    p = aug.sample(1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(aug.apply(torch.cat([a, b]), p)[:2], aug.apply(a, p))


def test_per_sample_params_need_the_right_batch():
    aug = DiffAugment(AugmentConfig(per_sample=True))
    p = aug.sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(AugmentError):
        aug.apply(torch.zeros(3, 1, 5, 5), p)


@pytest.mark.determinism
def test_same_seed_same_output_and_no_global_rng(x):
    state = torch.random.get_rng_state()
    aug = DiffAugment(AugmentConfig(mode="all", per_sample=True))
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_gradcheck(op):
    aug = DiffAugment(AugmentConfig(strategy=op, per_sample=True))
    p = aug.sample(2, torch.Generator().manual_seed(4))
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))


def test_unknown_token_lists_valid():
    with pytest.raises(AugmentError, match="rotate"):
        DiffAugment(AugmentConfig(strategy="color_blur"))
