"""A saved set drawn as a PNG grid: one row per class, black cells where a class has fewer
images than the widest row. Pixels are mapped back from the data set's normalised space."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .data import DatasetInfo, get_info
from .store import SavedSet, atomic_write_bytes

__all__ = ["write_grid"]


def write_grid(path: str | Path, saved: SavedSet, per_class: int = 10) -> tuple[int, int]:
    """Write ``saved`` (images (N, C, H, W), hard (N,) or soft (N, K) labels) as a PNG grid of
    at most ``per_class`` images per class row, atomically; returns (images shown, columns)."""
    from torchvision.utils import save_image

    info = get_info(saved.dataset)
    labels = saved.labels if saved.labels.dim() == 1 else saved.labels.argmax(1)
    rows, shown = [], 0
    ncol = min(per_class, max(int((labels == c).sum()) for c in range(info.num_classes)))
    for c in range(info.num_classes):
        imgs = saved.images[labels == c][:ncol].detach().cpu()
        pad = torch.zeros((ncol - imgs.shape[0], *saved.images.shape[1:]))
        rows.append(torch.cat([imgs, pad + _blank(info)]))
        shown += imgs.shape[0]
    grid = torch.cat(rows)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    buf = io.BytesIO()
    save_image((grid * std + mean).clamp(0, 1), buf, nrow=ncol, padding=2, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return shown, ncol


def _blank(info: DatasetInfo) -> torch.Tensor:
    """(1, C, 1, 1): the normalised value of a black pixel, so padding cells render black."""
    return (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
