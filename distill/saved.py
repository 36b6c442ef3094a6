"""A saved set in memory: images, labels and provenance, and the torch ``Dataset`` view of
them (:class:`SavedSet`). How it is written and read: :mod:`distill.store`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from .artefacts import make_set_card
from .data import get_info
from .errors import StoreError

__all__ = ["SavedSet"]


@dataclass(eq=False)
class SavedSet(Dataset):
    """A small training set and where it came from; a torch ``Dataset`` of (image, target).

    ``saved[i]`` is ``(transform(images[i]), target_transform(labels[i]))``: a normalised
    (C, H, W) image and a class index (hard labels) or a (K,) vector (soft labels), so a
    ``DataLoader`` batches it as it would a torchvision data set.

    Attributes:
        images: (N, C, H, W) float32, normalised like the source data set (:attr:`card`
            ``normalization``; :meth:`denormalize` gives pixels in [0, 1]).
        labels: (N,) int64 hard labels, or (N, K) float soft labels.
        meta: provenance; at least ``dataset`` (registry name). Conventionally also
            ``method``, ``ipc``, ``init``, ``seed``, ``config``, ``evaluations`` and, for
            selections, ``indices``; a learned student lr under ``lr``.
        transform / target_transform: applied per item (not to :attr:`images`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)
    transform: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)
    target_transform: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise StoreError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise StoreError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    @property
    def dataset(self) -> str:
        return str(self.meta.get("dataset", "?"))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.images[i], self.labels[i]
        return (x if self.transform is None else self.transform(x),
                y if self.target_transform is None else self.target_transform(y))

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a file holds: ``images``, ``labels`` and, where learned, ``lr``."""
        out = {"images": self.images.detach().cpu().float().contiguous(),
               "labels": self.labels.detach().cpu().contiguous()}
        if self.meta.get("lr") is not None:
            out["lr"] = torch.as_tensor(self.meta["lr"], dtype=torch.float32)
        return out

    @property
    def card(self) -> dict:
        """How to use the set (:func:`distill.artefacts.make_set_card`): data set, class
        names, image shape, normalisation, label kind, provenance, evaluations, version and
        the sha256 of :meth:`tensors`."""
        meta = {k: v for k, v in self.meta.items() if k != "lr"}
        return make_set_card(self.images, self.labels, meta, self.tensors())

    def denormalize(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (default: all of :attr:`images`) back to pixels in [0, 1]
        (unclipped: a synthetic set may leave the range)."""
        x = self.images if x is None else x
        info = get_info(self.dataset)
        shape = (-1, 1, 1)
        mean = torch.tensor(info.mean, device=x.device, dtype=x.dtype).view(shape)
        std = torch.tensor(info.std, device=x.device, dtype=x.dtype).view(shape)
        return x * std + mean

    @classmethod
    def from_file(cls, tensors: Mapping[str, torch.Tensor], card: Mapping[str, Any]
                  ) -> SavedSet:
        """The set of a checked file: its card is the metadata (``lr`` from its tensor), so
        the card written again is the card read."""
        meta = dict(card)
        if "lr" in tensors:
            lr = tensors["lr"]
            meta["lr"] = float(lr) if lr.dim() == 0 else lr.tolist()
        return cls(tensors["images"], tensors["labels"], meta)
