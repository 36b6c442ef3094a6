"""A set exported for other tools: safetensors, npz or an image folder, each with its card.

* ``safetensors``: ``set.safetensors`` (the format runs write; :mod:`distill.artefacts`).
* ``npz``: ``set.npz`` with float32 ``images`` (normalised as the card says), ``labels``,
  ``lr`` where learned, and ``card`` (the card's JSON as a 0-d unicode array): numpy reads it
  with ``allow_pickle=False``.
* ``imagefolder``: one folder per class (``<index>_<name>``, so the alphabetical order of
  torchvision's ``ImageFolder`` is the class order) of 8-bit PNGs named by the image's position
  in the set, ``card.json``, and ``set.safetensors`` with the exact tensors: PNG keeps 8 bits
  per channel in [0, 1], so a real image comes back exactly, a synthetic one to half a grey
  level (clipped values counted in ``card.json``), and a soft-labelled image sits in the folder
  of its most likely class.

Every export reads back (``load_set``) as the same images, labels and card, bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .artefacts import check_set_card, write_safetensors
from .data import get_info
from .errors import StoreError
from .files import atomic_write_bytes, atomic_write_json, count_non_finite, to_jsonable
from .saved import SavedSet

__all__ = ["EXPORT_FORMATS", "export_set", "class_folder", "read_npz"]

EXPORT_FORMATS = ("safetensors", "npz", "imagefolder")


def export_set(saved: SavedSet, fmt: str, out: str | os.PathLike) -> list[Path]:
    """Write ``saved`` into the folder ``out`` in format ``fmt``; returns the files written
    (PNGs of an image folder counted as their class folders)."""
    out = Path(out)
    if fmt == "safetensors":
        return [write_set(out / "set.safetensors", saved)]
    if fmt == "npz":
        return [write_npz(out / "set.npz", saved)]
    if fmt == "imagefolder":
        return write_imagefolder(out, saved)
    raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def write_set(path: Path, saved: SavedSet) -> Path:
    """``saved`` as safetensors + card (what ``save_set`` writes under that name)."""
    return write_safetensors(path, saved.tensors(), saved.card)


def write_npz(path: Path, saved: SavedSet) -> Path:
    arrays = {k: v.numpy() for k, v in saved.tensors().items()}
    arrays["card"] = np.array(json.dumps(to_jsonable(saved.card), sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buf.getvalue())


def read_npz(path: Path) -> SavedSet:
    """A gtnkit ``.npz`` export, its card checked against its arrays."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in z.files}
        card = json.loads(str(arrays.pop("card")))
    except Exception as exc:  # noqa: BLE001 - zip, format, json and pickle refusals
        raise StoreError(f"{path} is not a readable gtnkit npz ({type(exc).__name__})") from None
    if not isinstance(card, dict):
        raise StoreError(f"{path}: its card is not a JSON object")
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items() if v.dtype.kind in "fiub"}
    bad, total = count_non_finite(tensors)
    if bad:
        raise StoreError(f"{path} holds {bad} non-finite value(s) (NaN or inf) among {total}; "
                         f"refusing to use this gtnkit set")
    check_set_card(path, card, tensors)
    return SavedSet.from_file(tensors, card)


def class_folder(index: int, name: str, num_classes: int) -> str:
    """``07_horse``: the index zero-padded so that name order is class order; characters a
    file name cannot hold become ``-``."""
    width = len(str(num_classes - 1))
    return f"{index:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}"


def write_imagefolder(out: Path, saved: SavedSet) -> list[Path]:
    from PIL import Image

    info = get_info(saved.dataset)
    pixels = saved.denormalize().detach().cpu()
    half = 0.5 / 255  # beyond half a grey level outside [0, 1], rounding cannot hide it
    clipped = int(((pixels < -half) | (pixels > 1 + half)).sum())
    u8 = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = saved.labels if saved.labels.dim() == 1 else saved.labels.argmax(1)
    folders = [out / class_folder(c, n, info.num_classes) for c, n in
               enumerate(info.class_names)]
    width = len(str(max(len(saved) - 1, 0)))
    for i, c in enumerate(labels.tolist()):
        image = Image.fromarray(u8[i, :, :, 0] if u8.shape[3] == 1 else u8[i])
        buf = io.BytesIO()
        image.save(buf, format="png")
        atomic_write_bytes(folders[c] / f"{i:0{width}d}.png", buf.getvalue())
    card = {**saved.card, "export": {
        "format": "imagefolder", "png_bits": 8, "clipped_values": clipped,
        "classes": [f.name for f in folders], "exact_tensors": "set.safetensors",
        "labels_in_folders": "class index" if saved.labels.dim() == 1 else "argmax of the "
                             "soft labels (exact soft labels in set.safetensors)"}}
    return [*(f for f in folders if f.is_dir()), write_set(out / "set.safetensors", saved),
            atomic_write_json(out / "card.json", card)]
