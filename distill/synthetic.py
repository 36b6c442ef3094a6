"""``SyntheticSet``: the learnable-pixel teacher of dataset condensation.

``ipc`` images per class stored as one learnable tensor, class by class, optionally with
learnable soft labels (Sucholutsky & Schonlau, "Soft-Label Dataset Distillation", IJCNN 2021)
and a learnable student learning rate (Wang, Zhu, Torralba & Efros, "Dataset Distillation",
2018). It is initialised from Gaussian noise, from random real images, or from any given
indices into the real set: the latter is how a coreset (herding, k-center, forgetting, ...)
seeds condensation, the initialisation study of Zhao, Mopuri & Bilen (ICLR 2021). The caller
(CLI or ``selection``) computes the indices; ``distill`` never imports ``selection``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .errors import ConfigError
from .store import SavedSet
from .teacher import Batch, StepChoice, Teacher

__all__ = ["SyntheticSet", "dc_loops", "check_ipc"]


def check_ipc(train_set: ImageSet, ipc: int) -> None:
    """Refuse ``ipc`` images per class that ``train_set`` cannot give (the one place of the
    rule "1 <= ipc <= the smallest class").

    Raises:
        ConfigError: one line naming the smallest class's size.
    """
    smallest = int(train_set.class_counts().min())
    if not 1 <= ipc <= smallest:
        raise ConfigError(f"ipc must be between 1 and {smallest} (the smallest class), "
                          f"got {ipc}")

# DC's (outer, inner) loop table: Zhao, Mopuri & Bilen's released settings per IPC.
_DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer, inner) loops of DC for ``ipc`` (the nearest tabulated IPC not above it)."""
    key = max(k for k in _DC_LOOPS if k <= max(ipc, 1))
    return _DC_LOOPS[key]


class SyntheticSet(Teacher):
    """Learnable images (N, C, H, W) with labels grouped by class (``ipc`` per class).

    As a :class:`~distill.teacher.Teacher`: its inner schedule is ``steps`` (T) random batches
    of ``step_size`` images (``None``: all of them) and its matching loops are DC's by IPC.

    Attributes:
        images: ``nn.Parameter`` (num_classes * ipc, C, H, W), class ``c`` in rows
            ``c*ipc .. (c+1)*ipc-1``, in the data set's normalised space.
        labels: (N,) int64 buffer.
        label_logits: optional ``nn.Parameter`` (N, num_classes) for learnable labels:
            logits of soft labels (``learn_labels=True`` or ``"softmax"``), or the label
            vectors themselves, unconstrained (``"free"``, as KIP learns them: kernel ridge
            regression takes any real-valued targets).
        log_lr: optional ``nn.Parameter`` () for a learnable student learning rate.
        steps: T, the student steps of one meta-iteration (unrolled / implicit strategies).
        step_size: images per student step (``None``: the whole set every step).
    """

    labels: torch.Tensor  # (N,) buffer
    label_logits: nn.Parameter | None
    log_lr: nn.Parameter | None

    def __init__(self, images: torch.Tensor, num_classes: int, learn_labels: bool | str = False,
                 lr: float | None = None, steps: int = 10, step_size: int | None = None) -> None:
        super().__init__()
        n = images.shape[0]
        mode = {False: None, True: "softmax"}.get(learn_labels, learn_labels)  # type: ignore
        if mode not in (None, "softmax", "free"):
            raise ValueError(f"learn_labels must be False, True, 'softmax' or 'free', got "
                             f"{learn_labels!r}")
        self.label_mode: str | None = mode
        if n % num_classes:
            raise ValueError(f"{n} images do not split into {num_classes} equal classes")
        if steps < 1 or (step_size is not None and step_size < 1):
            raise ValueError(f"need steps >= 1 and step_size >= 1, got {steps}, {step_size}")
        self.num_classes, self.ipc = num_classes, n // num_classes
        self.steps, self.step_size = steps, step_size
        self.images = nn.Parameter(images.detach().clone().float())
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(self.ipc))
        self.label_logits = None
        if mode == "softmax":  # start at a sharp version of the hard labels
            self.label_logits = nn.Parameter(
                F.one_hot(self.labels, num_classes).float() * math.log(100.0))
        elif mode == "free":  # start at the one-hot labels themselves
            self.label_logits = nn.Parameter(F.one_hot(self.labels, num_classes).float())
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr))) if lr is not None else None

    # ------------------------------------------------------------------ initialisation
    @classmethod
    def from_noise(cls, shape: tuple[int, int, int], num_classes: int, ipc: int,
                   generator: torch.Generator, **kw: Any) -> SyntheticSet:
        """Standard-normal pixels (in the normalised space)."""
        images = torch.randn(num_classes * ipc, *shape, generator=generator)
        return cls(images, num_classes, **kw)

    @classmethod
    def from_real(cls, dataset: ImageSet, ipc: int, generator: torch.Generator,
                  **kw: Any) -> SyntheticSet:
        """``ipc`` random real images of every class."""
        idx = []
        for c in range(dataset.info.num_classes):
            members = dataset.class_indices(c).cpu()
            if members.numel() < ipc:
                raise ValueError(f"class {c} has {members.numel()} images, fewer than ipc {ipc}")
            idx.append(members[torch.randperm(members.numel(), generator=generator)[:ipc]])
        return cls.from_indices(dataset, torch.cat(idx), **kw)

    @classmethod
    def from_indices(cls, dataset: ImageSet, indices: torch.Tensor, **kw: Any
                     ) -> SyntheticSet:
        """Copies of ``dataset`` images at ``indices`` (grouped by class, ipc per class)."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        labels = dataset.labels.cpu()[indices]
        k = dataset.info.num_classes
        ipc = indices.numel() // k
        expected = torch.arange(k).repeat_interleave(ipc)
        if indices.numel() != k * ipc or not torch.equal(labels, expected):
            raise ValueError("indices must hold the same number of images of every class, "
                             "grouped by class in increasing order")
        return cls(dataset.images[indices.to(dataset.images.device)].cpu(), k, **kw)

    # ------------------------------------------------------------------ views
    def class_images(self, c: int) -> torch.Tensor:
        """(ipc, C, H, W) view of class ``c`` (differentiable)."""
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def class_targets(self, c: int) -> torch.Tensor:
        """Targets of class ``c``'s images: (ipc,) hard or (ipc, K) soft."""
        return self.targets()[c * self.ipc:(c + 1) * self.ipc]

    def class_batch(self, c: int, generator: torch.Generator | None = None) -> Batch:
        """Teacher protocol: every image of class ``c`` and its targets (with graph)."""
        return self.class_images(c), self.class_targets(c)

    def batch(self, size: int | None, generator: torch.Generator) -> Batch:
        """Teacher protocol: ``size`` random images of any class (all when ``None``)."""
        x, y = self.images, self.targets()
        n = x.shape[0]
        if size is None or size >= n:
            return x, y
        idx = torch.randperm(n, generator=generator)[:size].to(x.device)
        return x[idx], y[idx]

    def step_batch(self, choice: StepChoice, generator: torch.Generator) -> Batch:
        """Teacher protocol: one inner step's batch, ``step_size`` random images."""
        return self.batch(self.step_size, generator)

    def lr_tensor(self) -> torch.Tensor | None:
        """The learnable student learning rate as a tensor with graph (or ``None``)."""
        return None if self.log_lr is None else self.log_lr.exp()

    def matching_loops(self) -> tuple[int, int]:
        """DC's (outer, inner) loops for this set's IPC (:func:`dc_loops`)."""
        return dc_loops(self.ipc)

    def targets(self) -> torch.Tensor:
        """(N,) hard labels, or (N, num_classes) learned labels: probabilities (softmax
        mode) or free real vectors."""
        if self.label_logits is None:
            return self.labels
        if self.label_mode == "free":
            return self.label_logits
        return F.softmax(self.label_logits, dim=1)

    @property
    def lr(self) -> float | None:
        """The learnable student lr as a float (``None`` when not learned)."""
        return None if self.log_lr is None else float(self.log_lr.detach().exp())

    # ------------------------------------------------------------------ files
    def to_saved(self, meta: dict) -> SavedSet:
        """A :class:`SavedSet` of the current images and (hard or soft) labels."""
        meta = {**meta, "ipc": self.ipc, "kind": "synthetic"}
        if self.lr is not None:
            meta["lr"] = self.lr
        return SavedSet(self.images.detach().cpu(), self.targets().detach().cpu(), meta)
