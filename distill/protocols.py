"""Evaluation protocols named after their papers: how a small training set is scored.

A set's accuracy depends as much on how its students are trained as on the set, so gtnkit
scores a set the way the paper of its method does, names the protocol in every result, and
lets the user choose another (``gtnkit evaluate --protocol``):

* ``dc`` — Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021.
  ``evaluate_synset`` and ``get_daparam`` in ``utils.py`` of VICO-UoE/DatasetCondensation:
  SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 half-way; MNIST with DC's
  own per-image augmentation ``crop_scale_rotate`` (crop 4 px, scale ±20 %, rotate ±45°,
  :class:`~distill.augment.DCAugment`) for 1000 epochs, every other data set without
  augmentation for 300 epochs (``main.py``: "Training with data augmentation needs more
  epochs"); a batch-norm ConvNet student gets ``crop_noise`` (``get_daparam``: "Data
  augmentation makes model training with Batch Norm layer easier").
* ``dsa`` — Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
  ICML 2021, and DM (Zhao & Bilen, WACV 2023): DSA's augmentation
  ``color_crop_cutout_flip_scale_rotate`` (one op per batch, parameters per image) for 1000
  epochs, without ``flip`` on digit data sets, as the reference's readme prescribes ("flip
  augmentation is not good for digit datasets (MNIST and SVHN)").
* ``none`` — the DC optimiser, 300 epochs, no augmentation.

Differences that remain from the reference: it trains ``epochs + 1`` passes and divides the lr
after pass ``epochs // 2 + 1`` (gtnkit: ``epochs`` passes, divided after ``epochs / 2``), and
its rotation is scipy's cubic spline (gtnkit: bicubic, see :class:`~distill.augment.DCAugment`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .augment import DEFAULT_STRATEGY as DSA_OPS
from .augment import digit_strategy
from .engine import EvalProtocol, EvalResult, TrainConfig
from .strategies import ConfigError

__all__ = ["PROTOCOLS", "ProtocolError", "default_protocol", "protocol_train_config",
           "make_protocol", "describe_protocol", "protocol_label", "evaluation_record"]

PROTOCOLS = ("dc", "dsa", "none")
#: Methods whose papers score with DSA's augmentation; every other set is scored as DC does.
_DSA_METHODS = ("dsa", "dm")
#: Data sets the DC reference trains its evaluation students on with DC's augmentation.
_DC_AUGMENTED = ("mnist",)


_LABELS = {"dc": "DC protocol", "dsa": "DSA protocol", "none": "plain protocol (none)"}


def protocol_label(name: str) -> str:
    """``"dc"`` -> ``"DC protocol"``: how results name a protocol."""
    return _LABELS.get(name, f"{name or 'custom'} protocol")


class ProtocolError(ConfigError):
    """An unknown protocol name. One line."""


def default_protocol(method: str | None) -> str:
    """The protocol a set made by ``method`` is scored with: ``dsa`` for DSA and DM, ``dc``
    for every other method (DC, DD, IFT, KIP, coresets, generated sets)."""
    return "dsa" if (method or "").lower() in _DSA_METHODS else "dc"


def _batch_norm_convnet(model: str) -> bool:
    name, _, rest = model.partition(":")
    return name.strip().lower() == "convnet" and "norm=batch" in rest.replace(" ", "")


def protocol_train_config(name: str, dataset: str, model: str = "convnet") -> TrainConfig:
    """How protocol ``name`` trains a ``model`` student on a set of ``dataset``.

    Raises:
        ProtocolError: an unknown protocol.
    """
    dataset = dataset.lower()
    if name == "dc":
        if _batch_norm_convnet(model):
            return TrainConfig(epochs=1000, augmentation="dc:crop_noise")
        if dataset in _DC_AUGMENTED:
            return TrainConfig(epochs=1000, augmentation="dc:crop_scale_rotate")
        return TrainConfig(epochs=300)
    if name == "dsa":
        return TrainConfig(epochs=1000, augmentation="dsa:" + digit_strategy(DSA_OPS, dataset))
    if name == "none":
        return TrainConfig(epochs=300)
    raise ProtocolError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")


def make_protocol(name: str, dataset: str, model: str = "convnet", n_students: int = 5,
                  test_limit: int | None = None, **train_overrides: Any) -> EvalProtocol:
    """The :class:`~distill.engine.EvalProtocol` ``name`` for sets of ``dataset``;
    ``train_overrides`` change :class:`~distill.engine.TrainConfig` fields (e.g. ``epochs``),
    and the result then says so in :func:`describe_protocol`."""
    train = protocol_train_config(name, dataset, model)
    if train_overrides:
        train = replace(train, **train_overrides)
    return EvalProtocol(model=model, n_students=n_students, train=train, test_limit=test_limit,
                        name=name)


def describe_protocol(protocol: EvalProtocol) -> str:
    """One line: the protocol's name and what it does, e.g. ``DC protocol: 5 fresh convnet
    student(s), SGD lr 0.01, 1000 epochs, DC augmentation crop_scale_rotate``."""
    t = protocol.train
    if t.augmentation:
        family, _, ops = t.augmentation.partition(":")
        aug = f"{family.upper()} augmentation {ops}"
    elif t.augment:
        aug = f"DSA augmentation {DSA_OPS}"
    else:
        aug = "no augmentation"
    head = protocol_label(protocol.name)
    limit = f", {protocol.test_limit} test images" if protocol.test_limit else ""
    return (f"{head}: {protocol.n_students} fresh {protocol.model} student(s), SGD lr "
            f"{t.lr:g}, {t.epochs} epochs, {aug}{limit}")


def evaluation_record(protocol: EvalProtocol, result: EvalResult, seed: int) -> dict:
    """One entry of a set card's ``evaluations``: the protocol (name, student, augmentation,
    epochs, lr, students, test subset), the seed and the accuracies it gave."""
    t = protocol.train
    augmentation = t.augmentation or ("dsa" if t.augment else "none")
    return {"protocol": protocol.name or "custom", "description": describe_protocol(protocol),
            "student": protocol.model, "augmentation": augmentation, "epochs": t.epochs,
            "lr": t.lr, "batch_size": t.batch_size, "students": protocol.n_students,
            "test_limit": protocol.test_limit, "seed": seed,
            "accuracies": list(result.accuracies), "mean": result.mean, "std": result.std}
