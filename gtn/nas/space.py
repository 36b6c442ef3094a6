"""The search space over the student zoo: candidates with a stable id, their cost, and a
seeded draw (Such et al., ICML 2020 search over architectures of one zoo)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

from distill.data import DatasetInfo, get_info
from distill.models import ACTS, NORMS, POOLS, ModelError, build_model, parse_model_spec
from distill.rng import generator as make_generator

from .errors import NASError

__all__ = ["FAMILIES", "Candidate", "SearchSpace", "canonical_spec", "model_cost",
           "sample_candidates"]


FAMILIES = ("convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18")


@dataclass(frozen=True)
class Candidate:
    """One architecture: ``id`` (10 hex digits of the canonical spec's hash), the zoo
    ``spec``, its ``family``, ``params`` and ``macs`` (multiply-accumulates per image of
    the data set's shape)."""

    id: str
    spec: str
    family: str
    params: int
    macs: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    """The choices :func:`sample_candidates` draws from (a family first, then its options).

    Attributes:
        families: allowed zoo families (subset of :data:`FAMILIES`).
        max_params / max_macs: drop candidates above this parameter count / multiply-
            accumulates per image (``None``: no limit), so a CPU budget stays cheap.
        conv_widths, conv_depths, norms, acts, pools: ConvNet options.
        mlp_widths: MLP hidden widths; big_widths: VGG-11 / ResNet-18 base widths.
    """

    families: tuple[str, ...] = FAMILIES
    max_params: int | None = None
    max_macs: int | None = None
    conv_widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    conv_depths: tuple[int, ...] = (1, 2, 3, 4)
    norms: tuple[str, ...] = NORMS
    acts: tuple[str, ...] = tuple(ACTS)
    pools: tuple[str, ...] = POOLS
    mlp_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    big_widths: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise NASError(f"unknown model famil{'ies' if len(bad) > 1 else 'y'} "
                           f"{', '.join(bad) or '(none)'}; choose from {', '.join(FAMILIES)}")
        for name in ("max_params", "max_macs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise NASError(f"{name} must be >= 1, got {getattr(self, name)}")

    def options(self, family: str) -> dict[str, tuple]:
        """The option grid of ``family`` (keys sorted: the draw order is fixed)."""
        grids: dict[str, dict[str, tuple]] = {
            "convnet": {"act": self.acts, "depth": self.conv_depths, "norm": self.norms,
                        "pool": self.pools, "width": self.conv_widths},
            "mlp": {"act": self.acts, "width": self.mlp_widths},
            "lenet": {"act": self.acts},
            "alexnet": {"norm": self.norms},
            "vgg11": {"norm": self.norms, "width": self.big_widths},
            "resnet18": {"norm": self.norms, "width": self.big_widths}}
        return grids[family]


def canonical_spec(spec: str) -> str:
    """``"convnet:width=64,depth=2"`` -> ``"convnet:depth=2,width=64"`` (options sorted)."""
    name, options = parse_model_spec(spec)
    return name + (":" + ",".join(f"{k}={options[k]}" for k in sorted(options)) if options
                   else "")


def _candidate_id(spec: str) -> str:
    return hashlib.blake2b(canonical_spec(spec).encode(), digest_size=5).hexdigest()


@lru_cache(maxsize=4096)
def model_cost(spec: str, channels: int, num_classes: int, im_size: tuple[int, int]
               ) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a zoo model, built on the ``meta``
    device (no memory, no randomness). MACs count convolutions and linear layers only.

    Raises:
        ModelError: the spec does not build for this shape.
    """
    macs = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += output[0].numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    with torch.device("meta"):
        model = build_model(spec, channels, num_classes, (im_size[0], im_size[1]))
        handles = [m.register_forward_hook(count) for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, *im_size))
    for h in handles:
        h.remove()
    return sum(p.numel() for p in model.parameters()), int(macs)


def sample_candidates(n: int, seed: int, info: DatasetInfo | str,
                      space: SearchSpace = SearchSpace(), max_tries: int = 200
                      ) -> list[Candidate]:
    """``n`` distinct candidates drawn from ``space`` for ``info``'s image shape.

    The draw depends on ``seed`` alone (``child_seed(seed, "nas-sample")``): the same seed
    gives the same candidates in the same order. A draw repeating an earlier spec, not
    building for the shape, or over the cost limits is discarded and redrawn.

    Raises:
        NASError: ``n < 2``, or fewer than ``n`` admissible candidates after
            ``max_tries * n`` draws (the limits are too tight for the space).
    """
    if isinstance(info, str):
        info = get_info(info)
    if n < 2:
        raise NASError(f"the number of candidates must be at least 2, got {n}")
    g = make_generator(seed, "nas-sample")
    families = tuple(space.families)
    found: dict[str, Candidate] = {}
    for _ in range(max_tries * n):
        if len(found) == n:
            break
        family = families[int(torch.randint(len(families), (1,), generator=g))]
        options = {k: v[int(torch.randint(len(v), (1,), generator=g))]
                   for k, v in space.options(family).items()}
        spec = canonical_spec(family + (":" + ",".join(f"{k}={v}" for k, v in options.items())
                                        if options else ""))
        if spec in found:
            continue
        try:
            params, macs = model_cost(spec, info.channels, info.num_classes, info.im_size)
        except ModelError:
            continue
        if (space.max_params is not None and params > space.max_params) or \
                (space.max_macs is not None and macs > space.max_macs):
            continue
        found[spec] = Candidate(_candidate_id(spec), spec, family, params, macs)
    if len(found) < n:
        raise NASError(f"found only {len(found)} distinct candidates within the limits "
                       f"(families {', '.join(families)}, max params {space.max_params}, max "
                       f"MACs {space.max_macs}); ask for fewer or relax the limits")
    return list(found.values())
