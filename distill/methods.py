"""The paper methods of dataset condensation: one table, read by the library and the CLI.

Each :class:`Method` names its meta-gradient strategy (:mod:`distill.strategies`), the
augmentation its strategy applies (DSA's op string, "" for none; a method that augments is
also *evaluated* with augmentation, as its paper does), the teacher's optimiser defaults and a
help line. ``gtnkit distill --method`` takes its choices and help from here, and
:func:`distill.condense.condense_config` its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from .strategies import ConfigError

__all__ = ["DSA_OPS", "METHODS", "Method", "get_method"]

DSA_OPS = "color_crop_cutout_flip_scale_rotate"  # Zhao & Bilen, ICML 2021


@dataclass(frozen=True)
class Method:
    """A condensation method of the literature.

    Attributes:
        name: its CLI / config name.
        strategy: the meta-gradient strategy's name.
        augment: DSA op string applied by the strategy ("": none).
        optimizer, lr, momentum: the teacher's (image) optimiser. DC/DSA: SGD 0.1 with momentum
            0.5; DM: SGD 1.0; DD and IFT: Adam 0.01 (their meta-gradients' scale varies with T
            and the student; Adam is scale-free); MTT: SGD 1000 with momentum 0.5 (its loss is
            a ratio of squared distances; its lr's own step is the strategy's ``lr_lr``).
        help: one line for ``--help``.
        reference: the paper.
    """

    name: str
    strategy: str
    augment: str
    optimizer: str
    lr: float
    momentum: float
    help: str
    reference: str

    @property
    def learns_lr(self) -> bool:
        """Whether its strategy can learn the student lr (unrolled backprop, trajectory
        matching)."""
        return self.strategy in ("unrolled", "trajectory")

    @property
    def augments(self) -> bool:
        """Whether the method trains (and is evaluated) with augmentation."""
        return bool(self.augment)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dc", "matching", "", "sgd", 0.1, 0.5, "gradient matching",
           "Zhao, Mopuri & Bilen, ICLR 2021"),
    Method("dsa", "matching", DSA_OPS, "sgd", 0.1, 0.5,
           "gradient matching with siamese augmentation", "Zhao & Bilen, ICML 2021"),
    Method("dm", "distribution", DSA_OPS, "sgd", 1.0, 0.5, "distribution matching",
           "Zhao & Bilen, WACV 2023"),
    Method("dd", "unrolled", "", "adam", 0.01, 0.0, "unrolled backprop",
           "Wang, Zhu, Torralba & Efros 2018"),
    Method("ift", "implicit", "", "adam", 0.01, 0.0, "implicit function theorem",
           "Lorraine, Vicol & Duvenaud, AISTATS 2020"),
    Method("mtt", "trajectory", DSA_OPS, "sgd", 1000.0, 0.5,
           "matching training trajectories of experts (--gradient tesla: constant memory)",
           "Cazenavette et al., CVPR 2022; TESLA: Cui et al., ICML 2023"),
)}


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
