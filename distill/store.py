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
the target, so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

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
]

SET_FORMAT = "gtnkit.set"
SET_VERSION = 1  # the .pt layout; safetensors sets carry card version 2 (distill.artefacts)
#: What a run folder's set is called, newest first: a folder given for a set means this file.
SET_FILES = ("set.safetensors", "set.pt")
#: Files whose presence means a folder already holds a run.
RUN_MARKERS = ("config.json", "results.json")


class StoreError(Exception):
    """An unreadable or invalid file, or an output folder that may not be written. One line."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Raises:
        OSError: the file cannot be written; its ``filename`` is ``path`` (never the temporary
            name), so a caller can say which file failed. No temporary file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep them readable
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    return obj


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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Pretty, key-sorted JSON written atomically; tensors become lists, inf/nan strings."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


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
        from .artefacts import make_set_card

        meta = {k: v for k, v in self.meta.items() if k != "lr"}
        return make_set_card(self.images, self.labels, meta, self.tensors())

    def denormalize(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (default: all of :attr:`images`) back to pixels in [0, 1]
        (unclipped: a synthetic set may leave the range)."""
        from .data import get_info

        x = self.images if x is None else x
        info = get_info(self.dataset)
        shape = (-1, 1, 1)
        mean = torch.tensor(info.mean, device=x.device, dtype=x.dtype).view(shape)
        std = torch.tensor(info.std, device=x.device, dtype=x.dtype).view(shape)
        return x * std + mean


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
    from .artefacts import write_safetensors

    return write_safetensors(path, saved.tensors(), saved.card)


def read_tagged(path: str | os.PathLike, tag: str, what: str,
                error: type[Exception] = StoreError, missing: str | None = None) -> dict:
    """Read a torch file written by gtnkit whose ``format`` entry is ``tag``.

    ``weights_only``: our files hold tensors and plain metadata, never code to run. Any problem
    (missing, unreadable, another kind of file) is one line of ``error`` naming the file;
    ``missing`` (formatted with ``path``) overrides the message for a file that is not there.
    """
    path = Path(path)
    if not path.is_file():
        raise error((missing or "no {what} at {path}").format(what=what, path=path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise error(f"{path} is not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != tag:
        raise error(f"{path} is not a {what} file (missing format tag {tag!r})")
    bad, total = count_non_finite(obj)
    if bad:
        raise error(f"{path} holds {bad} non-finite value(s) (NaN or inf) among {total}; "
                    f"refusing to use this {what}")
    return obj


def count_non_finite(obj: Any) -> tuple[int, int]:
    """``(bad, total)``: NaN/inf entries and all entries of the floating-point tensors in
    ``obj`` (a tensor, or dicts / lists / tuples of them, nested)."""
    if isinstance(obj, torch.Tensor):
        if not (obj.is_floating_point() or obj.is_complex()):
            return 0, 0
        return int((~torch.isfinite(obj)).sum()), obj.numel()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        counts = [count_non_finite(v) for v in obj]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return 0, 0


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
    from . import foreign

    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in SET_FILES) and \
            foreign.is_foreign_folder(path):
        saved = foreign.read_foreign(path, dataset, normalization)
    elif path.suffix == ".npz" and path.is_file() and not foreign.npz_has_card(path):
        saved = foreign.read_foreign(path, dataset, normalization)
    else:
        from .artefacts import read_set_file

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
