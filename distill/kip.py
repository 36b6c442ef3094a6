"""Kernel Inducing Points (KIP) and Label Solve (LS): dataset distillation by kernel ridge
regression (Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021).

The regression itself (its formula, regulariser scaling and centred labels) is in
:mod:`distill.krr`.

* **KIP** learns ``X_s`` (and optionally ``y_s``) to minimise the KRR loss on random real target
  batches, ``L = 1/2 * mean((y_hat(X_t) - y_t)^2)`` (Algorithm 1). It runs as the ``kip``
  strategy of the one meta-training loop (:func:`~distill.condense.meta_train`: checkpoints,
  resume, the non-finite guard, memory and time), so it is initialised from noise, real images
  or any coreset like every other method.
* **LS** keeps ``X_s`` fixed and solves for the labels in closed form: ``y_s`` minimising
  ``||y_t - A y_s||^2`` with ``A = K_ts (K_ss + lam')^{-1}`` (n_t, n_s); we return the
  minimum-norm solution ``y_s = A^+ y_t`` (the paper's Label Solve).

Every solve runs in float64. Two scores for a learned set: :func:`krr_accuracy` (the paper's own
protocol: KRR with the kernel on the test set) and training finite networks
(:func:`~distill.engine.evaluate_set`, the DC protocol) on :func:`training_labels`.

This module gathers KIP's public names: the regression itself is :mod:`distill.krr`, the
strategy (registered as ``kip``) :mod:`distill.strategies.kip`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .krr import (
    kip_loss,
    krr_accuracy,
    krr_predict,
    label_solve,
    label_solve_set,
    one_hot_targets,
    regularise,
    training_labels,
)
from .methods import METHODS
from .strategies.kip import KipConfig, KipStrategy

if TYPE_CHECKING:
    from .metatrain import MetaConfig

__all__ = ["KipConfig", "KipStrategy", "regularise", "krr_predict", "kip_loss", "label_solve",
           "label_solve_set", "krr_accuracy", "one_hot_targets", "training_labels", "kip_config",
           "KIP_DEFAULTS"]


#: KIP's optimiser (the paper's released code: Adam, lr 0.01 on normalised pixels): the method
#: table's (:data:`distill.methods.METHODS`), as a dict.
KIP_DEFAULTS: dict[str, Any] = {k: getattr(METHODS["kip"], k)
                                for k in ("optimizer", "lr", "momentum")}


def kip_config(iterations: int = 1000, lr: float | None = None, checkpoint_every: int = 50,
               eval_every: int = 0, **knobs: Any) -> MetaConfig:
    """The :class:`~distill.condense.MetaConfig` of KIP (``knobs``: :class:`KipConfig` fields):
    :func:`~distill.condense.condense_config` of ``kip``.

    Raises:
        ConfigError / KernelError: an invalid option (one line).
    """
    from .condense import condense_config

    return condense_config("kip", iterations=iterations, lr=lr,
                           checkpoint_every=checkpoint_every, eval_every=eval_every, **knobs)
