"""Other tools' distilled sets, read into gtnkit's normalised space so that gtnkit's protocols
score them like its own.

Two layouts, as the DD-Ranking and MTT/DATM code release sets: a folder of plain tensors
(``images.pt`` (N, C, H, W), ``labels.pt`` (N,) class indices or (N, K) soft labels, optional
``lr.pt``, the learned student lr) and an ``.npz`` with arrays ``images``, ``labels`` and
optionally ``lr``. Tensors are read with ``torch.load(weights_only=True)`` and arrays with
``allow_pickle=False``: no code runs.

A plain tensor does not say which normalisation its images carry, so the caller must: the data
set's own mean/std (``dataset``, alias ``gtnkit``: gtnkit's constants, which are DC's and MTT's),
``none`` (pixels in [0, 1]) or ``MEAN/STD`` (comma-separated per channel, e.g.
``0.5,0.5,0.5/0.5,0.5,0.5``). Images are mapped to pixels and normalised as gtnkit's data are
(unchanged, bit for bit, when the two normalisations are the same). A ZCA-whitened set (MTT's
CIFAR option) is not a per-channel normalisation and cannot be read this way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artefacts import check_against, check_roles
from .data import DataError, DatasetInfo, get_info
from .errors import StoreError
from .files import count_non_finite
from .saved import SavedSet

__all__ = ["FOREIGN_FILES", "NORMALIZATIONS", "is_foreign_folder", "npz_has_card",
           "parse_normalization", "read_foreign"]

#: The files of the plain-tensor layout: images, labels, then the optional learned lr.
FOREIGN_FILES = ("images.pt", "labels.pt", "lr.pt")
NORMALIZATIONS = ("dataset", "gtnkit", "none", "MEAN/STD")
HOW = ("give the data set (--dataset) and the normalisation its images carry "
       "(--normalization dataset|none|MEAN/STD)")


def is_foreign_folder(path: Path) -> bool:
    return path.is_dir() and (path / FOREIGN_FILES[0]).is_file()


def npz_has_card(path: Path) -> bool:
    """Whether an ``.npz`` is a gtnkit export (it holds a ``card`` array)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "card" in z.files
    except Exception:  # noqa: BLE001 - an unreadable file is reported by its reader
        return False


def parse_normalization(spec: str, info: DatasetInfo) -> tuple[tuple[float, ...],
                                                               tuple[float, ...]]:
    """``(mean, std)`` per channel that ``spec`` names for images of ``info``."""
    key = spec.strip().lower()
    c = info.channels
    if key in ("dataset", "gtnkit"):
        return info.mean, info.std
    if key == "none":
        return (0.0,) * c, (1.0,) * c
    parts = key.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = ([float(v) for v in p.split(",")] for p in parts)
    except ValueError:
        raise StoreError(f"unknown normalisation {spec!r}; choose dataset (alias gtnkit), none "
                         f"or MEAN/STD with comma-separated values per channel") from None
    mean, std = (v * c if len(v) == 1 else v for v in (mean, std))
    if len(mean) != c or len(std) != c:
        raise StoreError(f"normalisation {spec!r} has {len(mean)} mean / {len(std)} std "
                         f"values; {info.name} images have {c} channel(s)")
    if not all(np.isfinite(mean + std)) or min(std) <= 0:
        raise StoreError(f"normalisation {spec!r}: values must be finite and std > 0")
    return tuple(mean), tuple(std)


def read_foreign(path: str | os.PathLike, dataset: str | None,
                 normalization: str | None) -> SavedSet:
    """Another tool's set (plain-tensor folder or ``.npz``) as a gtnkit :class:`SavedSet`.

    Raises:
        StoreError: one line: no data set or normalisation given, an unreadable file,
            tensors in the wrong roles, shapes or classes that are not the data set's,
            NaN/inf values.
    """
    path = Path(path)
    if dataset is None or normalization is None:
        missing = " and ".join(n for n, v in (("data set", dataset),
                                              ("normalisation", normalization)) if v is None)
        raise StoreError(f"{path} is another tool's set, which does not say its {missing}; "
                         f"{HOW}")
    try:
        info = get_info(dataset)
    except DataError as exc:
        raise StoreError(str(exc)) from None
    mean, std = parse_normalization(normalization, info)
    images, labels, lr = (_read_npz(path) if path.suffix == ".npz" else _read_folder(path))
    bad, total = count_non_finite([images, labels, lr])
    if bad:
        raise StoreError(f"{path} holds {bad} non-finite value(s) (NaN or inf) among {total}; "
                         f"refusing to use this set")
    check_roles(path, images, labels)
    check_against(path, images, labels, info)
    images = to_gtnkit_space(images.float(), mean, std, info)
    labels = labels.long() if labels.dim() == 1 else labels.float()
    source = {"path": str(path), "layout": "npz" if path.suffix == ".npz" else "tensors",
              "normalization": {"mean": list(mean), "std": list(std)}}
    meta: dict[str, Any] = {"dataset": info.name, "method": "imported", "kind": "imported",
                            "source": source}
    counts = torch.bincount(labels if labels.dim() == 1 else labels.argmax(1),
                            minlength=info.num_classes)
    if bool((counts == counts[0]).all()):
        meta["ipc"] = int(counts[0])
    if lr is not None:
        if lr.numel() == 0 or bool((lr <= 0).any()):
            raise StoreError(f"{path}: the learned lr must be positive, got {lr.tolist()}")
        meta["lr"] = float(lr) if lr.numel() == 1 else lr.reshape(-1).tolist()
    return SavedSet(images, labels, meta)


def to_gtnkit_space(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                    info: DatasetInfo) -> torch.Tensor:
    """(N, C, H, W) images normalised with ``mean``/``std`` -> normalised with ``info``'s;
    untouched when the two are the same."""
    if tuple(mean) == tuple(info.mean) and tuple(std) == tuple(info.std):
        return images.contiguous()
    view = (1, -1, 1, 1)
    pixels = images.double() * torch.tensor(std, dtype=torch.float64).view(view) + \
        torch.tensor(mean, dtype=torch.float64).view(view)
    out = (pixels - torch.tensor(info.mean, dtype=torch.float64).view(view)) / \
        torch.tensor(info.std, dtype=torch.float64).view(view)
    return out.float().contiguous()


def _tensor(path: Path, obj: Any, what: str) -> torch.Tensor:
    if isinstance(obj, (int, float)) and what == "lr":
        return torch.tensor(float(obj))
    if not isinstance(obj, torch.Tensor):
        raise StoreError(f"{path} holds a {type(obj).__name__}, not a tensor of {what}")
    return obj.detach().cpu()


def _load_pt(path: Path, what: str) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise StoreError(f"{path} is not a readable tensor file of {what} "
                         f"({type(exc).__name__})") from None
    return _tensor(path, obj, what)


def _read_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    names = dict(zip(("images", "labels", "lr"), FOREIGN_FILES))
    if not (path / names["labels"]).is_file():
        raise StoreError(f"{path} has {names['images']} but no {names['labels']}")
    lr_file = path / names["lr"]
    return (_load_pt(path / names["images"], "images"),
            _load_pt(path / names["labels"], "labels"),
            _load_pt(lr_file, "lr") if lr_file.is_file() else None)


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip, format and pickle refusals
        raise StoreError(f"{path} is not a readable npz of arrays ({type(exc).__name__})"
                         ) from None
    for key in ("images", "labels"):
        if key not in arrays:
            raise StoreError(f"{path} lacks the array {key!r} (it holds "
                             f"{', '.join(sorted(arrays)) or 'nothing'})")
    for key in ("images", "labels", "lr"):
        a = arrays.get(key)
        if a is not None and a.dtype.kind not in "fiub":
            raise StoreError(f"{path}: {key} is an array of {a.dtype}, not numbers")
    lr = arrays.get("lr")
    return (torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]),
            None if lr is None else torch.from_numpy(lr))
