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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["AugmentError", "AugmentConfig", "AugmentParams", "DiffAugment", "DEFAULT_STRATEGY",
           "DCAugment", "DCAugmentConfig", "DC_OPS", "make_train_augment", "digit_strategy",
           "DIGIT_DATASETS", "OPS"]

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


# ---------------------------------------------------------------------------- DC's augmentation
DC_OPS = ("crop", "scale", "rotate", "noise")


@dataclass(frozen=True)
class DCAugmentConfig:
    """DC's evaluation augmentation (``augment`` / ``get_daparam`` in ``utils.py`` of
    VICO-UoE/DatasetCondensation): crop 4 px, scale ±20 %, rotate ±45°, noise std 0.001; the
    strategy MNIST is scored with is ``crop_scale_rotate``."""

    strategy: str = "crop_scale_rotate"
    crop: int = 4
    scale: float = 0.2
    rotate: int = 45
    noise: float = 0.001


class DCAugment:
    """The per-image augmentation DC trains its evaluation students with (Zhao, Mopuri & Bilen,
    ICLR 2021; ``augment`` in the reference's ``utils.py``), batched.

    Each image gets one op drawn uniformly from the strategy, with its own parameters:

    * ``crop``: pad ``crop`` px with the batch's per-channel mean, take the window at offset
      ``(r, c)``, each uniform in ``{0, ..., 2 crop - 1}``: a whole-pixel shift by
      ``crop - r`` rows and ``crop - c`` columns (so in ``[-crop + 1, crop]``, as the
      reference's ``np.random.permutation(crop * 2)[0]``).
    * ``scale``: resize by nearest neighbour to ``h = int(u H)``, ``w = int(v H)`` with
      ``u, v ~ U(1 - scale, 1 + scale)`` (``F.interpolate``'s rule ``floor(i * H / h)``), set
      it in the middle of a zero canvas of side ``max(h, w, H, W)`` and cut the middle
      ``H x W`` (offsets ``int((side - size) / 2)``).
    * ``rotate``: rotate about the image centre by a whole number of degrees drawn from
      ``{-rotate, ..., rotate - 1}`` (``np.random.randint``), filling with the mean of the
      channel means. The reference rotates with ``scipy.ndimage.rotate`` (cubic spline,
      enlarged canvas, middle crop); here bicubic ``grid_sample`` on the same canvas, which
      agrees with it up to interpolation (and, when the enlarged side minus the image side is
      odd, the half-pixel its integer crop offset drops).
    * ``noise``: add ``noise`` x N(0, 1).

    All randomness comes from the ``torch.Generator`` passed in (the reference uses NumPy's
    global state). Not differentiable through the choices; it is for training students.
    """

    def __init__(self, config: DCAugmentConfig = DCAugmentConfig()) -> None:
        tokens = tuple(t for t in config.strategy.split("_") if t)
        bad = [t for t in tokens if t not in DC_OPS]
        if bad or not tokens:
            raise AugmentError(f"unknown DC augmentation {', '.join(bad) or '(empty)'}; "
                               f"valid tokens: {', '.join(DC_OPS)}")
        if config.crop < 1 or not 0 <= config.scale < 1 or config.rotate < 1:
            raise AugmentError("DC augmentation needs crop >= 1, 0 <= scale < 1, rotate >= 1")
        self.config = config
        self.tokens: tuple[str, ...] = tokens

    def sample(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Parameters for ``n`` images: the op of each and every op's values (CPU tensors)."""
        cfg = self.config
        return {"op": torch.randint(len(self.tokens), (n,), generator=generator),
                "r": torch.randint(2 * cfg.crop, (n,), generator=generator),
                "c": torch.randint(2 * cfg.crop, (n,), generator=generator),
                "u": torch.rand(n, generator=generator, dtype=torch.float64),
                "v": torch.rand(n, generator=generator, dtype=torch.float64),
                "deg": torch.randint(-cfg.rotate, cfg.rotate, (n,), generator=generator),
                "z": torch.randn(n, generator=generator)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], generator), generator)

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor],
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply sampled parameters to (N, C, H, W) images (a new tensor)."""
        if params["op"].shape[0] != x.shape[0]:
            raise AugmentError(f"parameters were sampled for {params['op'].shape[0]} images, "
                               f"got {x.shape[0]}")
        mean = x.detach().mean(dim=(0, 2, 3))  # the batch's channel means, before any op
        out = x.clone()
        for k, op in enumerate(self.tokens):
            idx = (params["op"] == k).nonzero().flatten()
            if idx.numel() == 0:
                continue
            p = {name: t[idx] for name, t in params.items()}
            sel = idx.to(x.device)
            if op == "crop":
                out[sel] = self.crop(x[sel], p["r"], p["c"], mean)
            elif op == "scale":
                out[sel] = self.scale(x[sel], p["u"], p["v"])
            elif op == "rotate":
                out[sel] = self.rotate(x[sel], p["deg"], float(mean.mean()))
            else:
                noise = torch.randn(x[sel].shape, generator=generator).to(x)
                out[sel] = x[sel] + self.config.noise * noise
        return out

    def crop(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
             fill: torch.Tensor) -> torch.Tensor:
        """Window ``(r, c)`` of ``x`` padded by ``crop`` px of ``fill`` (per channel)."""
        n, _, h, w = x.shape
        pad = self.config.crop
        xp = fill.to(x).view(1, -1, 1, 1).repeat(n, 1, h + 2 * pad, w + 2 * pad)
        xp[:, :, pad:pad + h, pad:pad + w] = x
        rows = (torch.arange(h).view(1, h, 1) + r.view(n, 1, 1)).expand(n, h, w)
        cols = (torch.arange(w).view(1, 1, w) + c.view(n, 1, 1)).expand(n, h, w)
        b = torch.arange(n).view(n, 1, 1).expand(n, h, w)
        dev = x.device
        return xp.permute(0, 2, 3, 1)[b.to(dev), rows.to(dev), cols.to(dev)].permute(0, 3, 1, 2)

    def scale(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour resize to ``(int(u' H), int(v' H))`` with ``u' = 1 - s + 2 s u``,
        centred on a zero canvas, middle ``H x W`` cut (see the class docstring)."""
        n, ch, h, w = x.shape
        s = self.config.scale
        hs = ((1 - s + 2 * s * u) * h).long().clamp(min=1)  # int() of a positive number
        ws = ((1 - s + 2 * s * v) * h).long().clamp(min=1)  # the reference scales both by H
        side = torch.maximum(torch.maximum(hs, ws), torch.tensor(max(h, w)))
        r1, c1 = (side - hs) // 2, (side - ws) // 2
        r2, c2 = (side - h) // 2, (side - w) // 2
        # output pixel (a, b) <- canvas (a + r2, b + c2) <- resized (a + r2 - r1, b + c2 - c1)
        a = torch.arange(h).view(1, h) + (r2 - r1).view(n, 1)           # (n, h)
        b = torch.arange(w).view(1, w) + (c2 - c1).view(n, 1)           # (n, w)
        ok_a, ok_b = (a >= 0) & (a < hs.view(n, 1)), (b >= 0) & (b < ws.view(n, 1))
        # F.interpolate(nearest): source index floor(i * (in / out)) in float32, capped
        fa = (h / hs.to(torch.float32)).view(n, 1)
        fb = (w / ws.to(torch.float32)).view(n, 1)
        src_a = torch.floor(a.clamp(min=0).to(torch.float32) * fa).long().clamp(max=h - 1)
        src_b = torch.floor(b.clamp(min=0).to(torch.float32) * fb).long().clamp(max=w - 1)
        bi = torch.arange(n).view(n, 1, 1).expand(n, h, w)
        dev = x.device
        picked = x.permute(0, 2, 3, 1)[bi.to(dev), src_a.view(n, h, 1).expand(n, h, w).to(dev),
                                       src_b.view(n, 1, w).expand(n, h, w).to(dev)]
        mask = (ok_a.view(n, h, 1) & ok_b.view(n, 1, w)).to(dev)
        return (picked * mask.unsqueeze(-1).to(x.dtype)).permute(0, 3, 1, 2)

    @staticmethod
    def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float) -> torch.Tensor:
        """Rotate each image by ``degrees`` (anticlockwise on screen, rows down) about its
        centre; bicubic, ``fill`` outside."""
        n, _, h, w = x.shape
        t = torch.deg2rad(degrees.to(torch.float64)).view(n, 1, 1)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        yy = torch.arange(h, dtype=torch.float64).view(1, h, 1) - cy
        xx = torch.arange(w, dtype=torch.float64).view(1, 1, w) - cx
        # source of output pixel p: R(-theta) p, in pixel units about the centre
        sx = torch.cos(t) * xx - torch.sin(t) * yy + cx
        sy = torch.sin(t) * xx + torch.cos(t) * yy + cy
        grid = torch.stack([sx / max(w - 1, 1) * 2 - 1, sy / max(h - 1, 1) * 2 - 1], dim=-1)
        y = F.grid_sample(x - fill, grid.to(x), mode="bicubic", padding_mode="zeros",
                          align_corners=True)
        return y + fill


#: Data sets of digits: DSA's reference drops ``flip`` for them ("flip augmentation is not good
#: for digit datasets (MNIST and SVHN)", readme.md of VICO-UoE/DatasetCondensation).
DIGIT_DATASETS = ("mnist", "svhn")


def digit_strategy(strategy: str, dataset: str | None) -> str:
    """``strategy`` without ``flip`` on digit data sets (see :data:`DIGIT_DATASETS`)."""
    if dataset is None or dataset.lower() not in DIGIT_DATASETS:
        return strategy
    return "_".join(t for t in strategy.split("_") if t and t != "flip")


def make_train_augment(spec: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The per-image training augmentation named ``family:ops``: ``dsa:<DSA ops>`` (one op per
    batch, parameters per image, as DSA's student training) or ``dc:<DC ops>``
    (:class:`DCAugment`).

    Raises:
        AugmentError: an unknown family or op.
    """
    family, sep, ops = spec.partition(":")
    if not sep or family not in ("dsa", "dc"):
        raise AugmentError(f"unknown augmentation {spec!r}; expected dsa:OPS or dc:OPS")
    if family == "dsa":
        return DiffAugment(AugmentConfig(strategy=ops, per_sample=True))
    return DCAugment(DCAugmentConfig(strategy=ops))
