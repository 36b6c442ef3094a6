"""Files a run leaves behind, always written atomically.

* A **saved set** is one file: images (N, C, H, W) in the data set's normalised space, labels
  (N,) or soft labels (N, K), and metadata (data set, method, IPC, seed, config, ...). Runs write
  ``set.safetensors``, whose card says how to use it without gtnkit (:mod:`distill.artefacts`);
  ``.pt`` sets of earlier versions stay readable (and writable under a ``.pt`` name). Selected,
  condensed, generated and imported sets share the format, so ``evaluate`` / ``show`` /
  ``export`` take any of them. A :class:`SavedSet` is a torch ``Dataset``.
* A **run folder** (``--out``) holds ``config.json``, ``results.json`` and the artefacts. A folder
  that already holds a run is refused unless the caller forces it.

Every file is written to a temporary name in the same folder, flushed to disk and renamed over
the target, so a killed process never leaves a half-written file under the final name
(:mod:`distill.files`, whose primitives this module re-exports). This module is the top of the
set format: it reads every kind of set (:mod:`distill.artefacts`, :mod:`distill.exports`,
:mod:`distill.foreign`), and none of them imports it.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from . import foreign
from .artefacts import check_set_card, is_safetensors, read_safetensors, write_safetensors
from .errors import StoreError
from .exports import read_npz
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    count_non_finite,
    read_tagged,
    to_jsonable,
)
from .saved import SavedSet

__all__ = [
    "StoreError",
    "count_non_finite",
    "SavedSet",
    "PartialResults",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "to_jsonable",
    "ADDED_LATER",
    "NOT_IN_RESULT",
    "fingerprint_of",
    "fingerprint_repr",
    "save_set",
    "load_set",
    "find_run_file",
    "SET_FILES",
    "check_run_dir",
    "RUN_MARKERS",
    "read_tagged",
]

SET_FORMAT = "gtnkit.set"
SET_VERSION = 1  # the .pt layout; safetensors sets carry card version 2 (distill.artefacts)
#: What a run folder's set is called, newest first: a folder given for a set means this file.
SET_FILES = ("set.safetensors", "set.pt")
#: Files whose presence means a folder already holds a run.
RUN_MARKERS = ("config.json", "results.json")


#: ``field(default=..., metadata=ADDED_LATER)`` marks an option added after checkpoints were
#: already written: at its default (the behaviour from before it existed) a fingerprint leaves it
#: out, so those checkpoints still resume; any other value is part of the fingerprint as usual.
ADDED_LATER = {"fingerprint": "omit-at-default"}


#: ``field(default=..., metadata=NOT_IN_RESULT)`` marks an option that changes how a run is
#: carried out, never what it computes (e.g. the memory guard): no fingerprint holds it.
NOT_IN_RESULT = {"fingerprint": "omit"}


def _kept(obj: Any) -> list[tuple[str, Any]]:
    pairs = ((f, getattr(obj, f.name)) for f in fields(obj))
    return [(f.name, value) for f, value in pairs
            if f.metadata.get("fingerprint") != NOT_IN_RESULT["fingerprint"]
            and not (f.metadata.get("fingerprint") == ADDED_LATER["fingerprint"]
                     and value == f.default)]


def fingerprint_of(obj: Any) -> Any:
    """``dataclasses.asdict`` for checkpoint fingerprints: fields marked :data:`ADDED_LATER`
    are left out while at their default."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {name: fingerprint_of(value) for name, value in _kept(obj)}
    if isinstance(obj, dict):
        return {k: fingerprint_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(fingerprint_of(v) for v in obj)
    return obj


def fingerprint_repr(obj: Any) -> str:
    """The dataclass ``repr`` of ``obj`` with :data:`ADDED_LATER` fields at their default left
    out (nested dataclasses alike)."""
    if not (is_dataclass(obj) and not isinstance(obj, type)):
        return repr(obj)
    inner = ", ".join(f"{name}={fingerprint_repr(value)}" for name, value in _kept(obj))
    return f"{type(obj).__name__}({inner})"


def save_set(path: str | os.PathLike, saved: SavedSet) -> Path:
    """Write a :class:`SavedSet` atomically: safetensors + card, or under a ``.pt`` name the
    torch layout of earlier versions (read with ``weights_only``)."""
    if Path(path).suffix == ".pt":
        buf = io.BytesIO()
        torch.save({"format": SET_FORMAT, "version": SET_VERSION,
                    "images": saved.images.detach().cpu().float().contiguous(),
                    "labels": saved.labels.detach().cpu().contiguous(),
                    "meta": to_jsonable(saved.meta)}, buf)
        return atomic_write_bytes(path, buf.getvalue())
    return write_safetensors(path, saved.tensors(), saved.card)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render a matplotlib figure to PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def find_run_file(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """``path``, or for a folder the first of ``names`` in it (else the first name, so the
    error names the file that was looked for)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return next((path / n for n in names if (path / n).is_file()), path / names[0])


def load_set(path: str | os.PathLike, *, transform: Callable | None = None,
             dataset: str | None = None, normalization: str | None = None) -> SavedSet:
    """Read a set as a :class:`SavedSet` (a torch ``Dataset``).

    ``path``: a gtnkit set (``set.safetensors``, an earlier ``set.pt``, an ``.npz`` export), a
    run or export folder holding one, or another tool's set (a folder of ``images.pt``,
    ``labels.pt``, optional ``lr.pt``, or an ``.npz`` of ``images``/``labels``), which needs
    its ``dataset`` and the ``normalization`` its images carry
    (:func:`distill.foreign.parse_normalization`). Reading never unpickles code; any problem
    is a one-line :class:`StoreError` naming the file.
    """
    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in SET_FILES) and \
            foreign.is_foreign_folder(path):
        saved = foreign.read_foreign(path, dataset, normalization)
    elif path.suffix == ".npz" and path.is_file() and not foreign.npz_has_card(path):
        saved = foreign.read_foreign(path, dataset, normalization)
    else:
        if path.is_dir() and not any((path / n).is_file() for n in SET_FILES):
            raise StoreError(f"no saved set in {path} (a set folder holds "
                             f"{' or '.join(SET_FILES)}, or images.pt and labels.pt)")
        path = find_run_file(path, SET_FILES)
        saved = read_set_file(path)
        if normalization is not None:
            raise StoreError(f"{path} is a gtnkit set: its normalisation is in its card "
                             f"(--normalization is for other tools' sets)")
        if dataset is not None and _dataset_name(dataset) != saved.dataset:
            raise StoreError(f"{path} is a set of {saved.dataset}, not of {dataset}")
    saved.transform = transform
    return saved


def _dataset_name(name: str) -> str:
    from .data import DataError, get_info

    try:
        return get_info(name).name
    except DataError as exc:
        raise StoreError(str(exc)) from None


def read_set_file(path: str | os.PathLike) -> SavedSet:
    """A set file gtnkit wrote, by its content: safetensors + card, the ``.pt`` layout of
    earlier versions, or an ``.npz`` export; the card is checked against the tensors."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no saved set at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if is_safetensors(head):
        tensors, card = read_safetensors(path, "gtnkit set")
        check_set_card(path, card, tensors)
        return SavedSet.from_file(tensors, card)
    if path.suffix == ".npz":
        return read_npz(path)
    return read_pt_set(path)


def read_pt_set(path: Path) -> SavedSet:
    """A set in the ``.pt`` layout of earlier versions (``torch.load``, ``weights_only``)."""
    obj = read_tagged(path, SET_FORMAT, "gtnkit set", missing="no saved set at {path}")
    if obj.get("version") != SET_VERSION:
        raise StoreError(f"{path} has set format version {obj.get('version')}; "
                         f"this gtnkit reads version {SET_VERSION}")
    try:
        images, labels = obj["images"], obj["labels"]
    except KeyError as exc:
        raise StoreError(f"{path} lacks the {exc.args[0]!r} entry") from None
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise StoreError(f"{path}: images must be a floating-point tensor, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if not isinstance(labels, torch.Tensor):
        raise StoreError(f"{path}: labels must be a tensor, got {type(labels).__name__}")
    if not labels.is_floating_point():
        if labels.dim() != 1 or (labels.numel() and int(labels.min()) < 0):
            raise StoreError(f"{path}: hard labels must be one class index >= 0 per image")
    return SavedSet(images=images, labels=labels, meta=dict(obj.get("meta", {})))


def check_run_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output folder that already holds a run (unless ``force``); creates nothing.

    Call before any work so that a refused run writes nothing at all.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"output path {out} exists and is not a folder")
    if not force and out.is_dir() and any((out / m).exists() for m in RUN_MARKERS):
        raise StoreError(f"{out} already holds a run; pass --force to overwrite it")
    return out


class PartialResults:
    """Partial results of a long command (e.g. each finished student of an evaluation) in a
    JSON file, so a rerun with ``resume`` continues where it stopped; refused when the file
    was written with another configuration.

    Attributes:
        state: ``{key: [values appended so far]}`` (read back on resume).
    """

    def __init__(self, path: str | os.PathLike, config: dict, resume: bool) -> None:
        self.path, self.config = Path(path), to_jsonable(config)
        self.state: dict[str, list] = {}
        if resume:
            if not self.path.is_file():
                raise StoreError(f"nothing to resume: {self.path} does not exist")
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                raise StoreError(f"{self.path} is unreadable; rerun without --resume") from None
            if saved.get("config") != self.config:
                raise StoreError(f"{self.path} belongs to a run with other options; rerun "
                                 f"without --resume or with the same options")
            self.state = saved.get("state", {})
            logging.getLogger("gtnkit").info("resuming from %s", self.path)

    def append(self, key: str, value: Any) -> None:
        """Record ``value`` under ``key`` and rewrite the file atomically."""
        self.state.setdefault(key, []).append(value)
        atomic_write_json(self.path, {"config": self.config, "state": self.state})

    def finish(self) -> None:
        """Remove the file (the run is complete)."""
        self.path.unlink(missing_ok=True)
