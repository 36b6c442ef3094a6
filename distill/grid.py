"""A saved set drawn as a PNG grid: one row per class, black cells where a class has fewer
images than the widest row. Pixels are mapped back from the data set's normalised space. With
``card=True`` the set's card (data set, method, IPC, protocol and score) is drawn beside it."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import DatasetInfo, get_info
from .store import SavedSet, atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["card_lines", "write_grid"]


def write_grid(path: str | Path, saved: SavedSet, per_class: int = 10, card: bool = False
               ) -> tuple[int, int]:
    """Write ``saved`` (images (N, C, H, W), hard (N,) or soft (N, K) labels) as a PNG grid of
    at most ``per_class`` images per class row, atomically; returns (images shown, columns).
    ``card``: draw :func:`card_lines` to the right of the grid."""
    from torchvision.utils import make_grid

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
    pixels = make_grid((grid * std + mean).clamp(0, 1), nrow=ncol, padding=2)
    image = _to_pil(pixels)
    if card:
        image = _beside(image, card_lines(saved.card))
    buf = io.BytesIO()
    image.save(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return shown, ncol


def card_lines(card: dict, width: int = 46) -> list[str]:
    """What ``show`` writes beside the grid: the set, its origin, how it was scored, its
    score, version and hash (the last evaluation of the card's ``evaluations``)."""
    ipc = card.get("ipc")
    head = [f"{card.get('dataset', '?')}: {card.get('method', '?')}"
            + (f", IPC {ipc}" if ipc is not None else "")
            + (f", init {card['init']}" if card.get("init") else ""),
            f"{card.get('count', '?')} images {'x'.join(map(str, card.get('image_shape', [])))}"
            f", {card.get('labels', '?')} labels"]
    if card.get("lr") is not None:
        head.append(f"learned lr {card['lr']}")
    evaluations = card.get("evaluations") or []
    if evaluations:
        ev = evaluations[-1]
        head.append(ev.get("description") or f"protocol {ev.get('protocol', '?')}")
        head.append(f"score: {ev['mean']:.2f} ± {ev['std']:.2f} % over "
                    f"{len(ev.get('accuracies', []))} student(s)")
        if len(evaluations) > 1:
            head.append(f"({len(evaluations) - 1} earlier evaluation(s) in the card)")
    else:
        head.append("not evaluated")
    head.append(f"gtnkit {card.get('gtnkit', '?')}, sha256 {str(card.get('sha256', '?'))[:12]}")
    return [line for text in head for line in textwrap.wrap(text, width) or [""]]


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    from PIL import Image

    array = (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _beside(image: Image.Image, lines: list[str]) -> Image.Image:
    """``image`` with ``lines`` of text on a white panel to its right."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    boxes = [probe.textbbox((0, 0), line or " ", font=font) for line in lines]
    line_h = int(max(b[3] - b[1] for b in boxes)) + 4
    text_w = int(max(b[2] - b[0] for b in boxes)) + 16
    out = Image.new("RGB", (image.width + text_w, max(image.height, line_h * len(lines) + 16)),
                    "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((image.width + 8, 8 + i * line_h), line, fill="black", font=font)
    return out


def _blank(info: DatasetInfo) -> torch.Tensor:
    """(1, C, 1, 1): the normalised value of a black pixel, so padding cells render black."""
    return (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
