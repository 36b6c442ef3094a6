"""Differentiable siamese augmentation (DSA).

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021.
Every transform is differentiable with respect to the images, and its random parameters are
drawn *once* (:meth:`DiffAugment.sample`) and then applied to as many batches as needed
(:meth:`DiffAugment.apply`): with ``per_sample=False`` one transform is shared by a whole batch
of any size, so a real batch and a synthetic batch see exactly the same augmentation (the
"siamese" property DSA relies on). With ``per_sample=True`` each image gets its own draw, as
in DSA's student training.

Ranges follow the DSA paper's defaults: scale factors per axis in [1/1.2, 1.2]; rotation in
±15°; horizontal flip with probability 1/2; brightness shift in ±0.5 (x1.0), saturation factor
in [0, 2], contrast factor in [0.5, 1.5] (colour acts on normalised tensors); translation by up
to 1/8 of the size (integer pixels, zero padding); cutout of a square half the image side. As
in DSA, ``mode="one"`` applies one operation drawn from the strategy per call; ``mode="all"``
applies them all in the order written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["AugmentError", "AugmentConfig", "AugmentParams", "DiffAugment", "DEFAULT_STRATEGY",
           "OPS"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


class AugmentError(ValueError):
    """Unknown augmentation token or bad configuration. One line."""


@dataclass(frozen=True)
class AugmentConfig:
    strategy: str = DEFAULT_STRATEGY
    mode: str = "one"
    scale: float = 1.2
    rotate_degrees: float = 15.0
    flip_prob: float = 0.5
    crop_ratio: float = 0.125
    cutout_ratio: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    per_sample: bool = False


@dataclass(frozen=True)
class AugmentParams:
    """Sampled parameters: for each applied op, a dict of CPU tensors of length n (or 1)."""

    ops: tuple[str, ...]
    values: tuple[dict, ...] = field(default_factory=tuple)
    n: int = 1


class DiffAugment:
    """Sample-then-apply differentiable augmentation (see module docstring)."""

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        tokens = tuple(t for t in config.strategy.split("_") if t)
        bad = [t for t in tokens if t not in OPS]
        if bad or not tokens:
            raise AugmentError(f"unknown augmentation {', '.join(bad) or '(empty)'}; "
                               f"valid tokens: {', '.join(OPS)}")
        if config.mode not in ("one", "all"):
            raise AugmentError(f"mode must be one or all, got {config.mode!r}")
        self.config = config
        self.tokens: tuple[str, ...] = tokens

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None) -> AugmentParams:
        """Draw parameters for ``n`` images (``n`` is ignored unless ``per_sample``)."""
        cfg = self.config
        m = n if cfg.per_sample else 1
        if cfg.mode == "one":
            pick = int(torch.randint(len(self.tokens), (1,), generator=generator))
            ops: tuple[str, ...] = (self.tokens[pick],)
        else:
            ops = self.tokens
        u = lambda: torch.rand(m, generator=generator)  # noqa: E731
        values = []
        for op in ops:
            if op == "color":
                values.append({"brightness": (u() - 0.5) * cfg.brightness,
                               "saturation": u() * cfg.saturation,
                               "contrast": u() + cfg.contrast})
            elif op == "scale":
                lo, hi = 1.0 / cfg.scale, cfg.scale
                values.append({"sx": u() * (hi - lo) + lo, "sy": u() * (hi - lo) + lo})
            elif op == "rotate":
                values.append({"theta": (u() - 0.5) * 2 * math.radians(cfg.rotate_degrees)})
            elif op == "flip":
                values.append({"flip": u() < cfg.flip_prob})
            elif op == "crop":  # translation as a fraction in [-ratio, ratio]
                values.append({"tx": (u() * 2 - 1) * cfg.crop_ratio,
                               "ty": (u() * 2 - 1) * cfg.crop_ratio})
            elif op == "cutout":  # centre position as a fraction of the size
                values.append({"cx": u(), "cy": u()})
        return AugmentParams(ops=ops, values=tuple(values), n=m)

    # ------------------------------------------------------------------ applying
    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply sampled parameters to (N, C, H, W) images; differentiable in ``x``."""
        if params.n not in (1, x.shape[0]):
            raise AugmentError(f"parameters were sampled for {params.n} images, got {x.shape[0]}")
        for op, v in zip(params.ops, params.values):
            v = {k: t.to(x.device) for k, t in v.items()}
            x = getattr(self, f"_{op}")(x, v)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], generator))

    @staticmethod
    def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).view(-1, 1, 1, 1)

    def _color(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        x = x + self._col(v["brightness"], x)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * self._col(v["saturation"], x) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * self._col(v["contrast"], x) + mean

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        sx, sy = v["sx"], v["sy"]
        z = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
        return self._warp(x, theta)

    def _rotate(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        c, s = torch.cos(v["theta"]), torch.sin(v["theta"])
        z = torch.zeros_like(c)
        theta = torch.stack([torch.stack([c, s, z], 1), torch.stack([-s, c, z], 1)], 1)
        return self._warp(x, theta)

    def _flip(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    def _crop(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        # Integer pixel shifts; with align_corners=True a shift of k pixels is 2k/(size-1).
        kx = torch.round(v["tx"] * w)
        ky = torch.round(v["ty"] * h)
        one, z = torch.ones_like(kx), torch.zeros_like(kx)
        theta = torch.stack([torch.stack([one, z, -2 * kx / max(w - 1, 1)], 1),
                             torch.stack([z, one, -2 * ky / max(h - 1, 1)], 1)], 1)
        return self._warp(x, theta)

    def _cutout(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        sh = int(self.config.cutout_ratio * h + 0.5)
        sw = int(self.config.cutout_ratio * w + 0.5)
        cy = torch.floor(v["cy"] * h).view(-1, 1, 1)
        cx = torch.floor(v["cx"] * w).view(-1, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= cy - sh // 2) & (rows < cy - sh // 2 + sh)
                  & (cols >= cx - sw // 2) & (cols < cx - sw // 2 + sw))
        return x * (~inside).unsqueeze(1).to(x.dtype)
