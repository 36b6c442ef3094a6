"""How much every student trains: the ``smoke`` / ``short`` / ``paper`` budgets of a search
(ground truth, proxies, coreset signals, search space)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from distill.engine import TrainConfig

from .errors import NASError
from .space import SearchSpace

__all__ = ["NASBudget", "NAS_BUDGETS"]


@dataclass(frozen=True)
class NASBudget:
    """How much every student trains (ground truth and proxies) and what the proxies hold.

    Attributes:
        validation: training images held out by :func:`gtn.train.split_validation` (at most a
            fifth of the training set is used); every accuracy is measured on them.
        truth_train: ground truth trains on a fixed random subset of this many of the rest
            (``None``: all of it), for ``truth.epochs`` epochs with ``truth``'s schedule.
        proxy_steps, proxy_batch, proxy_lr: every proxy student takes about ``proxy_steps``
            SGD steps of batch ``min(proxy_batch, set size)`` at constant lr ``proxy_lr``.
        ipc: images per class of the ``real-subset`` and ``coreset`` proxies.
        pool_per_class, signal_model, signal_epochs: the coreset's candidate pool and the
            network that gives selection signals (:class:`selection.SignalConfig`).
        space: the search space (families, cost limits).
        resamples: bootstrap resamples of the confidence intervals.
    """

    name: str
    validation: int
    truth_train: int | None
    truth: TrainConfig
    proxy_steps: int
    proxy_batch: int
    proxy_lr: float
    ipc: int
    pool_per_class: int
    signal_model: str
    signal_epochs: int
    space: SearchSpace = field(default_factory=SearchSpace)
    resamples: int = 1000
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("validation", "proxy_steps", "proxy_batch", "ipc", "pool_per_class",
                     "signal_epochs", "resamples"):
            if getattr(self, name) < 1:
                raise NASError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.truth_train is not None and self.truth_train < 1:
            raise NASError(f"truth_train must be >= 1, got {self.truth_train}")

    def search_space(self, families: str | Sequence[str] | None = None,
                     max_params: int | None = None) -> SearchSpace:
        """The budget's search space, with other families (a comma-separated string or a
        sequence) and/or another parameter limit where given."""
        space = self.space
        if families:
            names = families.split(",") if isinstance(families, str) else families
            space = replace(space, families=tuple(f.strip().lower() for f in names
                                                  if f.strip()))
        if max_params:
            space = replace(space, max_params=max_params)
        return space

    def proxy_train(self, set_size: int) -> TrainConfig:
        """The proxy schedule for a set of ``set_size`` images (about ``proxy_steps`` steps)."""
        batch = min(self.proxy_batch, set_size)
        per_epoch = math.ceil(set_size / batch)
        epochs = max(1, round(self.proxy_steps / per_epoch))
        return TrainConfig(epochs=epochs, lr=self.proxy_lr, batch_size=batch, decay_at=None)


_CHEAP = ("convnet", "mlp", "lenet")
NAS_BUDGETS = {
    "smoke": NASBudget(
        "smoke", validation=500, truth_train=1000,
        truth=TrainConfig(epochs=1, lr=0.01, batch_size=64, decay_at=None),
        proxy_steps=4, proxy_batch=64, proxy_lr=0.01, ipc=2, pool_per_class=20,
        signal_model="convnet:width=8,depth=2", signal_epochs=1,
        space=SearchSpace(families=("convnet", "mlp"), max_params=60_000, max_macs=1_000_000),
        resamples=200, notes="proves the path only; figures mean nothing"),
    "short": NASBudget(
        "short", validation=5000, truth_train=20000,
        truth=TrainConfig(epochs=3, lr=0.01, batch_size=128),
        proxy_steps=52, proxy_batch=128, proxy_lr=0.01, ipc=10, pool_per_class=200,
        signal_model="convnet:width=16,depth=2", signal_epochs=3,
        space=SearchSpace(families=_CHEAP, max_params=250_000, max_macs=6_000_000),
        notes="ConvNet / MLP / LeNet up to 250k parameters and 6M MACs per image; ground truth "
              "3 epochs (471 steps of 128) on 20 000 training images, lr 0.01 (x0.1 after "
              "epoch 1); proxies ~52 steps (9x fewer) at lr 0.01; 5000 held-out training "
              "images for validation"),
    "paper": NASBudget(
        "paper", validation=10000, truth_train=None,
        truth=TrainConfig(epochs=20, lr=0.01, batch_size=128),
        proxy_steps=128, proxy_batch=128, proxy_lr=0.02, ipc=50, pool_per_class=1000,
        signal_model="convnet", signal_epochs=10, space=SearchSpace(),
        notes="every family; ground truth 20 epochs on all remaining training images; "
              "proxies 128 steps; 10 000 validation images (wants a GPU)"),
}
