"""``kip``: Kernel Inducing Points (Nguyen, Chen & Lee, ICLR 2021, Algorithm 1) as a strategy
of the one meta-training loop: the teacher's support images (and labels) learn by the kernel
ridge regression loss on random real target batches (:func:`distill.krr.kip_loss`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..errors import ConfigError
from ..kernels import KernelConfig, kernel_matrix
from ..krr import _check_reg, kip_loss, one_hot_targets
from ..teacher import Teacher
from .base import RealSampler, Strategy, StrategyConfig, StudentFactory, register_strategy

__all__ = ["KipConfig", "KipStrategy"]


@dataclass(frozen=True)
class KipConfig(StrategyConfig):
    """KIP's knobs (a :class:`~distill.strategies.StrategyConfig`, so the loop takes it).

    Attributes:
        kernel: ``ntk`` | ``nngp``; kernel_depth: hidden layers of the FC network (>= 1).
        w_var, b_var: weight / bias variances of the kernel.
        family: draw the depth uniformly from ``1..kernel_depth`` each iteration.
        reg: lam > 0 of the KRR (scaled by tr(K_ss)/n_s); the paper: 1e-6.
        target_batch: real target images per iteration (>= the number of classes).
        center_labels: centre one-hot labels by 1/K (changes the loss's scale and which
            directions it weighs, never the argmax of a KRR prediction).
        balanced_targets: draw every target batch class-balanced, as the paper does
            (``False``: uniformly from the whole training set).
    """

    kernel: str = "ntk"
    kernel_depth: int = 1
    w_var: float = 2.0
    b_var: float = 0.01
    family: bool = False
    reg: float = 1e-6
    target_batch: int = 1000
    center_labels: bool = True
    balanced_targets: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kernel_config()  # raises KernelError
        _check_reg(self.reg)
        if self.target_batch < 1:
            raise ConfigError(f"target_batch must be >= 1, got {self.target_batch}")

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(name=self.kernel, depth=self.kernel_depth, w_var=self.w_var,
                            b_var=self.b_var, family=self.family)


@register_strategy("kip")
class KipStrategy(Strategy):
    """KIP: one Adam/SGD step on the teacher per random real target batch (Algorithm 1).

    Uses only the teacher protocol's ``batch(None, generator)`` (all support images and
    their, possibly learnable, labels) and ``parameters()``; no student network is trained
    (the infinitely wide network's kernel stands in for it), so ``make_student`` is unused.
    """

    config_class = KipConfig

    def __init__(self, config: StrategyConfig) -> None:
        kip = config if isinstance(config, KipConfig) else KipConfig(
            **{f.name: getattr(config, f.name) for f in fields(config)})  # KIP's other defaults
        super().__init__(kip)
        self.kip = kip
        self.kernel = kip.kernel_config()

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.kip
        k = real.num_classes
        if cfg.target_batch < k:
            raise ConfigError(f"target_batch ({cfg.target_batch}) must be >= the number of "
                              f"classes ({k})")
        depth = self.kernel.sample_depth(generator)
        x_s, y_s = teacher.batch(None, generator)
        x_t, y_t = (real.balanced_batch if cfg.balanced_targets else real.batch)(
            cfg.target_batch, generator)
        loss = kip_loss(x_s, one_hot_targets(y_s, k, cfg.center_labels), x_t,
                        one_hot_targets(y_t, k, cfg.center_labels),
                        lambda a, b: kernel_matrix(a, b, self.kernel, depth), cfg.reg)
        return {"loss": self._update(loss, teacher, optimizer), "depth": depth}
