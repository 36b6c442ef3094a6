"""The student zoo, built by name for any data set's shape.

Every model is a plain ``nn.Module`` (usable with ``higher`` and ``torch.func``) with
``embed(x) -> (N, feature_dim)`` (what the last linear layer sees) and
``forward(x) = classifier(embed(x))``. Specs are strings so the CLI can pass them through:
``"convnet"``, ``"convnet:width=64,depth=4,norm=batch,act=leakyrelu,pool=max"``.

References:
    ConvNet: Gidaris & Komodakis, CVPR 2018; as the DC student in Zhao, Mopuri & Bilen, ICLR
    2021. LeNet: LeCun et al., Proc. IEEE 1998. AlexNet: Krizhevsky, Sutskever & Hinton,
    NeurIPS 2012. VGG: Simonyan & Zisserman, ICLR 2015. ResNet: He et al., CVPR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .memory import saved_tensor_hooks_active

__all__ = ["ModelError", "available_models", "parse_model_spec", "build_model",
           "init_parameters", "ConvNet", "AvgPool2x2", "InstanceNorm", "fast_path", "plain_path",
           "fused_norm_derivatives", "instance_norm_second"]


class ModelError(ValueError):
    """Unknown model, option or option value. One line."""


NORMS = ("none", "batch", "instance", "group", "layer")
ACTS: dict[str, Callable[[], nn.Module]] = {
    # in place, as the DC reference's ConvNet (saves a copy per activation: ~7 % of a DC step)
    "relu": lambda: nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}
POOLS = ("avg", "max", "none")

# The fast path (the layers below, and the chunked real-data scoring of ``distill.inner``)
# computes what the plain torch layers compute, up to float rounding; ``plain_path()`` turns
# it off, so the benchmark (bench/metastep.py) and the equivalence tests
# (tests/test_speed_equivalence.py) can run both in one process.
_FAST = [True]


def fast_path() -> bool:
    """Whether the fast layers and the chunked scoring are on (default: yes)."""
    return _FAST[0]


@contextmanager
def plain_path(plain: bool = True) -> Iterator[None]:
    """Within the block, every module and scoring takes torch's plain path (``plain=False``:
    the fast one). Restores the previous setting on exit."""
    was = _FAST[0]
    _FAST[0] = not plain
    try:
        yield
    finally:
        _FAST[0] = was


class _Pool2x2(torch.autograd.Function):
    """2x2 average pooling of an even-sized (N, C, H, W) tensor; backward: :class:`_Unpool2x2`.

    ``F.avg_pool2d``'s CPU kernel (and its zero-filled backward) is a generic windowed loop:
    on the DC ConvNet's first block it took a quarter of a GTN meta-step. Three strided adds
    compute the same mean, bit for bit on a CPU (on 83 x 16 x 28 x 28 floats, 1 thread:
    0.74 ms against 1.7 ms). The operator is linear, so its backward is its transpose
    (spread and scale by 1/4, exactly torch's values: 1.3 ms against about 2.9 ms with the
    zero fill) and the transpose's backward is the pooling again: every order of derivative
    the inner loop takes stays in these two functions. (Written with ``setup_context`` and a
    generated vmap rule, so ``torch.func`` transforms - the NTK's ``vmap(jacrev)``,
    per-example gradients - work too.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pairs = x.reshape(n, c, h // 2, 2 * w)       # rows 2i and 2i+1 side by side
        top, bottom = pairs[..., :w], pairs[..., w:]
        # summed in the order of torch's CPU kernel (the window row by row), so the result
        # is bit for bit F.avg_pool2d's
        s = top[..., 0::2] + top[..., 1::2]
        s += bottom[..., 0::2]
        s += bottom[..., 1::2]
        return s * 0.25

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _Unpool2x2.apply(grad)


class _Unpool2x2(torch.autograd.Function):
    """The transpose of :class:`_Pool2x2`: each value / 4, spread over its 2x2 window."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: torch.Tensor) -> torch.Tensor:
        n, c, h, w = g.shape
        wide = (g * 0.25).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
        # each widened row twice; stacking writes them in one pass (1.5x the speed of a
        # reshape of an expand on a 64 x 16 x 14 x 14 gradient, 1 thread), same values
        return torch.stack((wide, wide), dim=3).view(n, c, 2 * h, 2 * w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _Pool2x2.apply(grad)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2)`` (same module type, state and result up to float rounding), faster
    on even-sized inputs (:class:`_Pool2x2`); odd sizes and :func:`plain_path` take torch's."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FAST[0] and x.dim() == 4 and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
            return _Pool2x2.apply(x)
        return super().forward(x)


# Instance norm's second derivative, fused (``fused_norm_derivatives``; ``gtn train --compile``)
_FUSED_NORM = [False]
#: the compiled second derivative; None until first used, False once its compilation failed
_SECOND: list[Any] = [None]


@contextmanager
def fused_norm_derivatives(on: bool = True) -> Iterator[None]:
    """Within the block, instance norm on the fast path (:class:`InstanceNorm`) takes its
    second derivative - what the inner loop's double backward spends most of its
    normalisation time on - from one ``torch.compile``-d function of the closed form
    (:func:`instance_norm_second`) instead of autograd's graph of the native backward
    (one thread, 100 x 32 x 32 x 32: about 15 ms against 35-60 ms). The forward and first
    derivative stay torch's native kernels. Same values up to float rounding; not under
    ``torch.func`` transforms, ``torch.compile`` tracing or saved-tensor hooks (there the
    native path runs); a compilation that fails logs one warning and the closed form runs
    eagerly (correct, slower) until the process ends. Restores the previous setting on
    exit."""
    was = _FUSED_NORM[0]
    _FUSED_NORM[0] = on
    try:
        yield
    finally:
        _FUSED_NORM[0] = was


def instance_norm_second(x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, g: torch.Tensor, gdx: torch.Tensor,
                         gdw: torch.Tensor, gdb: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance norm's second derivative in closed form.

    For ``y = weight * xh + bias`` with ``xh = (x - mean) * rstd`` per sample and channel
    (biased variance, as ``nn.GroupNorm(C, C)``), the backward maps the output gradient
    ``g`` to ``dx = rstd * P(a)``, ``dweight = sum(g * xh)``, ``dbias = sum(g)``, where
    ``a = weight * g`` and ``P(v) = v - mean(v) - xh * mean(v * xh)`` (means over the
    spatial positions; ``P`` is symmetric). Given cotangents ``gdx``, ``gdw``, ``gdb`` of
    those three, returns their gradients to ``x``, ``weight`` and ``g``::

        d/dg      = gdb + gdw * xh + weight * rstd * P(gdx)
        d/dweight = sum(g * rstd * P(gdx))
        d/dx      = rstd * P(gdw * g)
                    + rstd^2 * (xh * (3 sh wh - wa) - wh * (a - mean(a)) - sh * (gdx - mean(gdx)))

    with ``sh = mean(a * xh)``, ``wh = mean(gdx * xh)``, ``wa = mean(gdx * a) - mean(gdx)
    mean(a)``: the first from ``dweight``'s dependence on ``xh``, the second from ``rstd``
    and ``xh`` inside ``dx`` (derivative of ``rstd`` is ``-rstd^3 (x - mean) / M``). ``mean``
    and ``rstd`` are the forward's per-(sample, channel) statistics, shape (N, C)."""
    n, c = x.shape[:2]
    dims = (2, 3)
    mean, rstd = mean.view(n, c, 1, 1), rstd.view(n, c, 1, 1)
    xh = (x - mean) * rstd
    gam = weight.view(1, c, 1, 1)
    a = g * gam
    a_bar = a.mean(dims, keepdim=True)
    sh = (a * xh).mean(dims, keepdim=True)
    w_bar = gdx.mean(dims, keepdim=True)
    wh = (gdx * xh).mean(dims, keepdim=True)
    wa = (gdx * a).mean(dims, keepdim=True) - w_bar * a_bar
    p_w = gdx - w_bar - xh * wh
    ddw = gdw.view(1, c, 1, 1)
    u = ddw * g
    p_u = u - u.mean(dims, keepdim=True) - xh * (u * xh).mean(dims, keepdim=True)
    grad_g = gdb.view(1, c, 1, 1) + ddw * xh + gam * rstd * p_w
    grad_w = (g * rstd * p_w).sum((0, 2, 3))
    grad_x = rstd * p_u + rstd * rstd * (xh * (3 * sh * wh - wa) - wh * (a - a_bar)
                                         - sh * (gdx - w_bar))
    return grad_x, grad_w, grad_g


def _second(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`instance_norm_second`, compiled once per process (inductor re-specialises on
    new shapes, then compiles dynamic ones); eager after a failed compilation."""
    if _SECOND[0] is None:
        from .devices import silence_cuda_home_warning

        silence_cuda_home_warning()
        _SECOND[0] = torch.compile(instance_norm_second)
    if _SECOND[0] is not False:
        try:
            return _SECOND[0](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly
            import logging

            logging.getLogger("gtnkit").warning(
                "instance norm's fused second derivative did not compile (%s: %s); it runs "
                "eagerly from now on", type(err).__name__, str(err).splitlines()[0][:200])
            _SECOND[0] = False
    return instance_norm_second(*args)


class _InstanceNormFn(torch.autograd.Function):
    """Instance norm (torch's native kernel) whose backward is :class:`_InstanceNormGrad`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _InstanceNormGrad.apply(g, x, weight, mean, rstd)
        return dx, dw, db, None


class _InstanceNormGrad(torch.autograd.Function):
    """Instance norm's first derivative (torch's native kernel); its own derivative is the
    fused closed form (:func:`instance_norm_second`), differentiable once."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
        n, c, h, w = x.shape
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), x, mean, rstd, weight, n, c, h * w, c, [True, True, True])
        ctx.save_for_backward(g, x, weight, mean, rstd)
        return dx, dw, db

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gdx: torch.Tensor | None, gdw: torch.Tensor | None,
                 gdb: torch.Tensor | None) -> tuple:
        g, x, weight, mean, rstd = ctx.saved_tensors
        c = x.shape[1]
        gdx = torch.zeros_like(x) if gdx is None else gdx
        gdw = x.new_zeros(c) if gdw is None else gdw
        gdb = x.new_zeros(c) if gdb is None else gdb
        grad_x, grad_w, grad_g = _second(x, weight, mean, rstd, g, gdx, gdw, gdb)
        return grad_g, grad_x, grad_w, None, None


class InstanceNorm(nn.GroupNorm):
    """Instance norm with a learnable affine: ``nn.GroupNorm(C, C)`` (same module type,
    state and result up to float rounding), whose second derivative is fused under
    :func:`fused_norm_derivatives`."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FAST[0] and _FUSED_NORM[0] and x.dim() == 4 and torch.is_grad_enabled() \
                and not torch.compiler.is_compiling() \
                and not torch._C._are_functorch_transforms_active() \
                and not saved_tensor_hooks_active():
            return _InstanceNormFn.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def _norm(kind: str, channels: int, hw: tuple[int, int]) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":  # instance norm with a learnable affine, as the DC code does
        return InstanceNorm(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(4, channels), channels, affine=True)
    if kind == "layer":
        return nn.LayerNorm([channels, *hw])
    raise ModelError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")


def _act(kind: str) -> nn.Module:
    if kind not in ACTS:
        raise ModelError(f"unknown act {kind!r}; choose one of: {', '.join(ACTS)}")
    return ACTS[kind]()


class _Student(nn.Module):
    """features -> flatten -> linear; subclasses build ``self.features`` and call ``_finish``."""

    features: nn.Module

    def _finish(self, channels: int, num_classes: int, im_size: tuple[int, int]) -> None:
        with torch.no_grad():  # eval: the shape probe must not touch batch-norm running stats
            dim = self.features.eval()(torch.zeros(1, channels, *im_size)).flatten(1).shape[1]
        self.features.train()
        self.feature_dim = int(dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(_Student):
    """The DC ConvNet: ``depth`` x [conv3x3(width) -> norm -> act -> 2x2 pool] -> linear.

    As published (``ConvNet`` in ``networks.py`` of VICO-UoE/DatasetCondensation, built by
    ``get_network`` in its ``utils.py`` with ``get_default_convnet_setting``: width 128, depth
    3, ReLU, instance norm as ``GroupNorm(C, C)``, 2x2 average pooling), the first convolution
    pads single-channel images by 3 pixels (``padding=3 if channel == 1 and d == 0``), so a
    1x28x28 digit is seen as 32x32: feature maps 32 -> 16 -> 8 -> 4 and a 128*4*4 = 2048-d
    embedding (the reference sizes its norms and classifier for 32 px when ``im_size`` is 28).
    Every other convolution pads by 1; 3x32x32 images give 128*4*4 = 2048 too.

    ``first_pad`` overrides the first convolution's padding (``None``: the published rule;
    ``first_pad=1`` on 28 px is gtnkit's earlier 1152-d variant).
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 width: int = 128, depth: int = 3, norm: str = "instance", act: str = "relu",
                 pool: str = "avg", first_pad: int | None = None) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ModelError(f"unknown pool {pool!r}; choose one of: {', '.join(POOLS)}")
        if width < 1 or depth < 1:
            raise ModelError(f"width and depth must be >= 1, got {width}, {depth}")
        if first_pad is None:
            first_pad = 3 if channels == 1 else 1
        if not isinstance(first_pad, int) or first_pad < 0:
            raise ModelError(f"first_pad must be an integer >= 0, got {first_pad!r}")
        layers: list[nn.Module] = []
        hw, ch = (im_size[0] + 2 * first_pad - 2, im_size[1] + 2 * first_pad - 2), channels
        for d in range(depth):
            layers += [nn.Conv2d(ch, width, 3, padding=first_pad if d == 0 else 1),
                       _norm(norm, width, hw), _act(act)]
            if pool != "none":
                if min(hw) < 2:
                    raise ModelError(f"depth {depth} pools {im_size} images below 1 pixel")
                layers.append(AvgPool2x2() if pool == "avg" else nn.MaxPool2d(2))
                hw = (hw[0] // 2, hw[1] // 2)
            ch = width
        self.features = nn.Sequential(*layers)
        self._finish(channels, num_classes, im_size)


class MLP(_Student):
    """flatten -> width -> act -> width -> act -> linear (DC's MLP: 128, 128, ReLU)."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 width: int = 128, act: str = "relu") -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(channels * im_size[0] * im_size[1],
                                                               width), _act(act),
                                      nn.Linear(width, width), _act(act))
        self._finish(channels, num_classes, im_size)


class LeNet(_Student):
    """LeNet-5: conv5(6) relu maxpool, conv5(16) relu maxpool, fc 120, fc 84; the first conv
    pads single-channel images by 2 (a 28 px digit gives 16*5*5 = 400 features), as ``LeNet``
    in the DC reference's ``networks.py``."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 act: str = "relu") -> None:
        super().__init__()
        pad = 2 if channels == 1 else 0  # the reference: padding=2 if channel == 1 else 0
        conv = nn.Sequential(nn.Conv2d(channels, 6, 5, padding=pad), _act(act), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5), _act(act), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = conv(torch.zeros(1, channels, *im_size)).shape[1]
        self.features = nn.Sequential(conv, nn.Linear(flat, 120), _act(act), nn.Linear(120, 84),
                                      _act(act))
        self._finish(channels, num_classes, im_size)


class AlexNet(_Student):
    """The small 32-px AlexNet of the DC code: five convs (128,192,256,192,192), three pools."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 norm: str = "none") -> None:
        super().__init__()
        pad = 4 if (channels == 1 and tuple(im_size) == (28, 28)) else 2
        hw = [im_size[0] + 2 * pad - 4, im_size[1] + 2 * pad - 4]

        def block(cin: int, cout: int, k: int, p: int, pool: bool) -> list[nn.Module]:
            nonlocal hw
            mods = [nn.Conv2d(cin, cout, k, padding=p), _norm(norm, cout, (hw[0], hw[1])),
                    nn.ReLU(inplace=True)]
            if pool:
                mods.append(nn.MaxPool2d(2))
                hw = [hw[0] // 2, hw[1] // 2]
            return mods

        layers = block(channels, 128, 5, pad, True)
        layers += block(128, 192, 5, 2, True)
        layers += block(192, 256, 3, 1, False) + block(256, 192, 3, 1, False)
        layers += block(192, 192, 3, 1, True)
        self.features = nn.Sequential(*layers)
        self._finish(channels, num_classes, im_size)


class VGG11(_Student):
    """VGG-11 (cfg A) with a configurable norm (DC default: instance): the first conv pads
    single-channel images by 3 (28 px seen as 32), as ``VGG`` in the DC reference's
    ``networks.py``; 512-d embedding on MNIST and CIFAR-10."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 width: int = 64, norm: str = "instance") -> None:
        super().__init__()
        cfg: list[int | str] = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers: list[nn.Module] = []
        pad = 3 if channels == 1 else 1  # the reference: padding=3 if channel == 1 and first
        hw = (im_size[0] + 2 * pad - 2, im_size[1] + 2 * pad - 2)
        ch, first = channels, True
        for v in cfg:
            if isinstance(v, str):  # "M": a max pool
                if min(hw) < 2:
                    break
                layers.append(nn.MaxPool2d(2))
                hw = (hw[0] // 2, hw[1] // 2)
                continue
            out = width * v
            layers += [nn.Conv2d(ch, out, 3, padding=pad if first else 1),
                       _norm(norm, out, hw), nn.ReLU(inplace=True)]
            ch, first = out, False
        self.features = nn.Sequential(*layers)
        self._finish(channels, num_classes, im_size)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, hw: tuple[int, int]
                 ) -> None:
        super().__init__()
        out_hw = ((hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout, out_hw)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout, out_hw)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       _norm(norm, cout, out_hw))
        self.out_hw = out_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(y)) + self.short(x))


class ResNet18(_Student):
    """CIFAR-style ResNet-18: 3x3 stem, BasicBlocks [2, 2, 2, 2], no max pool."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int],
                 width: int = 64, norm: str = "instance") -> None:
        super().__init__()
        hw = (im_size[0], im_size[1])
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                   _norm(norm, width, hw), nn.ReLU(inplace=True)]
        cin = width
        for stage, mult in enumerate((1, 2, 4, 8)):
            for b in range(2):
                block = _BasicBlock(cin, width * mult, 2 if (b == 0 and stage > 0) else 1,
                                    norm, hw)
                layers.append(block)
                hw, cin = block.out_hw, width * mult
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self._finish(channels, num_classes, im_size)


_ZOO: dict[str, Callable[..., nn.Module]] = {
    "alexnet": AlexNet, "convnet": ConvNet, "lenet": LeNet, "mlp": MLP, "resnet18": ResNet18,
    "vgg11": VGG11,
}


def available_models() -> list[str]:
    return sorted(_ZOO)


def _value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"convnet:width=64,norm=batch"`` -> ``("convnet", {"width": 64, "norm": "batch"})``."""
    name, _, rest = str(spec).partition(":")
    name = name.strip().lower()
    if name not in _ZOO:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")
    options = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ModelError(f"bad model option {item!r} in {spec!r}; expected KEY=VALUE")
        options[key.strip()] = _value(raw.strip())
    known = model_options(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ModelError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; its "
                         f"options are: {', '.join(known) or 'none'} (e.g. {name}:"
                         f"{known[0] if known else 'KEY'}=VALUE)")
    _check_option_types(name, spec, options)
    return name, options


def _check_option_types(name: str, spec: str, options: dict) -> None:
    """Each option's value has the type of its default (an integer where the model takes an
    integer, ...), so a typo is one line naming the option, not an error deep in a layer."""
    import inspect

    defaults = {p.name: p.default for p in inspect.signature(_ZOO[name]).parameters.values()}
    wants: dict[type, tuple[type | tuple[type, ...], str]] = {
        bool: (bool, "true or false"), int: (int, "an integer"),
        float: ((int, float), "a number"), str: (str, "a word")}
    for key, value in options.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if default is None or default is inspect.Parameter.empty:
            continue
        kinds, words = wants.get(type(default), (object, ""))
        if not isinstance(value, kinds) or (type(default) is not bool and isinstance(value, bool)):
            raise ModelError(f"model option {key} of {name} wants {words}, got {value!r} in "
                             f"{spec!r}")


def model_options(name: str) -> list[str]:
    """The options a zoo model takes in a spec (its constructor's keywords after the shape)."""
    import inspect

    params = list(inspect.signature(_ZOO[name]).parameters.values())[3:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def build_model(spec: str, channels: int, num_classes: int, im_size: tuple[int, int],
                generator: torch.Generator | None = None, **overrides: Any) -> nn.Module:
    """Build a zoo model for inputs (N, channels, *im_size) and ``num_classes`` outputs.

    Args:
        spec: ``name`` or ``name:key=value,...`` (see module docstring).
        generator: when given, parameters are initialised from it (torch's default
            distributions), so the global RNG is never touched; otherwise torch's default init.
        overrides: options that take precedence over the spec's.

    Raises:
        ModelError: unknown model, option or option value.
    """
    name, options = parse_model_spec(spec)
    options.update(overrides)
    try:
        # With a generator, torch's construction-time init is overwritten below; fork_rng keeps
        # it from consuming the caller's global RNG state.
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            model = _ZOO[name](channels, num_classes, tuple(im_size), **options)
    except TypeError as exc:
        raise ModelError(f"bad option for model {name!r} ({spec!r}): "
                         f"{str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:  # e.g. a shape that pools away
        raise ModelError(f"model {spec!r} does not fit {channels}x{im_size[0]}x{im_size[1]} "
                         f"inputs: {str(exc).splitlines()[0]}") from None
    if generator is not None:
        init_parameters(model, generator)
    return model


@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise ``module`` from ``generator`` with torch's default distributions.

    Conv / linear weights: kaiming-uniform with a = sqrt(5), i.e. U(-b, b) with
    b = 1 / sqrt(fan_in); biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales 1, shifts 0.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 2 * bound - bound)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return module
