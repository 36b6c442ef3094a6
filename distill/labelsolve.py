"""Label Solve as one call: a support of fixed images, labels solved in closed form.

Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021 (LS):
the support images stay as they are (random real images, noise, a coreset or any saved set)
and their labels are the minimum-norm least-squares solution of kernel ridge regression onto
real targets (:func:`distill.kip.label_solve_set`). :func:`solve_labels` is to LS what
:func:`~distill.condense.condense` is to the learned methods: it picks the support like every
method's ``init`` and returns the set as an artefact.
"""

from __future__ import annotations

import torch

from .data import ImageSet
from .kernels import KernelConfig
from .kip import label_solve_set
from .rng import generator
from .store import SavedSet
from .strategies import ConfigError
from .synthetic import SyntheticSet

__all__ = ["solve_labels"]


def solve_labels(train_set: ImageSet, ipc: int, init: str | torch.Tensor = "real", *,
                 support: torch.Tensor | None = None, kernel: KernelConfig | None = None,
                 reg: float = 1e-6, targets: int | None = 10000, seed: int = 0) -> SavedSet:
    """Label Solve on ``train_set``: ``ipc`` support images per class, KRR labels.

    Args:
        train_set: the real training set (its device is where the solve runs).
        ipc: support images per class (ignored with ``support``).
        init: the support: ``"noise"``, ``"real"`` (random real images) or indices into
            ``train_set`` (``ipc`` per class, grouped by class), e.g. a coreset.
        support: (n_s, C, H, W) given support images instead (e.g. a condensed set's).
        kernel: the FC kernel (its name and depth; default: the NTK of one hidden layer).
        reg: the ridge lambda, scaled by tr(K_ss)/n_s.
        targets: random real training images the labels are fitted to (``None``: all).
        seed: draws the support (``init``) and the targets, from independent streams.

    Returns:
        a :class:`~distill.store.SavedSet` with (n_s, K) float labels on the one-hot scale
        (``meta``: dataset, method ``ls``, ipc, seed, kind ``label-solve``, label_kind ``krr``).

    Raises:
        ConfigError: an unknown ``init``, or indices that are not ``ipc`` per class.
    """
    info = train_set.info
    device = train_set.images.device
    if support is not None:
        images = support
        ipc = max(1, support.shape[0] // info.num_classes)
    elif isinstance(init, str) and init == "noise":
        images = SyntheticSet.from_noise((info.channels, *info.im_size), info.num_classes, ipc,
                                         generator(seed, "init")).images.detach()
    elif isinstance(init, str) and init == "real":
        images = SyntheticSet.from_real(train_set, ipc, generator(seed, "init")).images.detach()
    elif torch.is_tensor(init):
        try:
            images = SyntheticSet.from_indices(train_set, init).images.detach()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    else:
        raise ConfigError(f"unknown init {init!r}; use noise, real or a tensor of indices")
    labels = label_solve_set(images.to(device), train_set, kernel or KernelConfig(), reg,
                             targets, generator(seed, "ls-targets"))
    return SavedSet(images.cpu(), labels.cpu(), {"dataset": info.name, "method": "ls",
                                                 "ipc": ipc, "seed": seed,
                                                 "kind": "label-solve", "label_kind": "krr"})
