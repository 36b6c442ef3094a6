"""Sets and generators as artefacts: safetensors tensors plus a JSON **card** in the same file.

A card says how to use the tensors without gtnkit: the data set and its class names, the image
shape, the normalisation the images carry (``pixels = image * std + mean``, pixels in [0, 1]),
whether labels are hard or soft, where the set came from (method, its config, IPC, init, seed),
the evaluations that scored it (protocol, student, augmentation, epochs, accuracies), the gtnkit
version that made it, and a content hash (sha256 of the tensors). It lives in the safetensors
header's ``__metadata__`` under the key ``gtnkit`` (safetensors metadata is ``str -> str``).

safetensors (Hugging Face) stores raw little-endian tensors behind a JSON header: reading runs
no code, unlike a pickle. Every read is checked like every other file gtnkit reads: a card that
contradicts its tensors (shape, count, hash, class count) or NaN/inf values are one line of
:class:`~distill.store.StoreError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .data import DataError, DatasetInfo, get_info
from .errors import StoreError
from .files import atomic_write_bytes, count_non_finite, to_jsonable

__all__ = ["CARD_KEY", "SET_CARD_VERSION", "check_against", "check_roles", "check_set_card",
           "content_hash", "gtnkit_version", "is_safetensors", "make_set_card",
           "read_safetensors", "write_safetensors"]

#: The ``__metadata__`` key that holds the card (JSON text).
CARD_KEY = "gtnkit"
SET_FORMAT = "gtnkit.set"
#: Version 1 is the ``.pt`` set of earlier gtnkit; 2 is safetensors + card.
SET_CARD_VERSION = 2
#: Card entries computed from the tensors and the data set on every write (never taken from
#: the caller's metadata, so a card cannot drift from what it describes).
DERIVED = ("format", "version", "dataset", "num_classes", "class_names", "image_shape", "count",
           "normalization", "labels", "sha256")


def gtnkit_version() -> str:
    try:
        return metadata.version("gtnkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_safetensors(head: bytes) -> bool:
    """Whether a file starting with ``head`` (>= 9 bytes) is safetensors: an 8-byte
    little-endian header length, then a JSON object. A torch file is a zip (``PK``)."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      card: Mapping[str, Any]) -> Path:
    """Write ``tensors`` with ``card`` (JSON in the header) atomically."""
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(to_jsonable(dict(card)), sort_keys=True)
    return atomic_write_bytes(path, save(plain, metadata={CARD_KEY: text}))


def read_safetensors(path: str | os.PathLike, what: str,
                     error: type[Exception] = StoreError) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, card)`` of a safetensors file gtnkit wrote; checked for NaN/inf.

    Any problem (unreadable, no card, non-finite values) is one line of ``error`` naming the
    file. The card's own consistency is checked by the reader of each kind of file.
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        card = json.loads(header.get("__metadata__", {}).get(CARD_KEY, "null"))
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors and json raise several types
        raise error(f"{path} is not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(card, dict):
        raise error(f"{path} is a safetensors file without a gtnkit card; not a {what}")
    bad, total = count_non_finite(tensors)
    if bad:
        raise error(f"{path} holds {bad} non-finite value(s) (NaN or inf) among {total}; "
                    f"refusing to use this {what}")
    return tensors, card


def _info(dataset: Any, where: str) -> DatasetInfo:
    try:
        return get_info(str(dataset))
    except DataError as exc:
        raise StoreError(f"{where}: {exc}") from None


def make_set_card(images: torch.Tensor, labels: torch.Tensor, meta: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor]) -> dict:
    """The card of a set: ``meta`` (provenance: method, config, ipc, init, seed, evaluations,
    ...) plus the entries of :data:`DERIVED`, computed from the tensors and the data set."""
    info = _info(meta.get("dataset"), "set")
    card = {k: v for k, v in to_jsonable(dict(meta)).items() if k not in DERIVED}
    card.setdefault("gtnkit", gtnkit_version())
    card.update(
        format=SET_FORMAT, version=SET_CARD_VERSION, dataset=info.name,
        num_classes=info.num_classes, class_names=list(info.class_names),
        image_shape=list(images.shape[1:]), count=int(images.shape[0]),
        normalization={"mean": list(info.mean), "std": list(info.std)},
        labels="hard" if labels.dim() == 1 else "soft", sha256=content_hash(tensors))
    return card


def check_set_card(path: Path, card: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                   ) -> DatasetInfo:
    """Refuse (one line) a set whose card contradicts its tensors or its data set."""
    if card.get("format") != SET_FORMAT:
        raise StoreError(f"{path} is not a gtnkit set (card format {card.get('format')!r})")
    if card.get("version") != SET_CARD_VERSION:
        raise StoreError(f"{path} has set card version {card.get('version')}; this gtnkit "
                         f"reads version {SET_CARD_VERSION}")
    for name in ("images", "labels"):
        if name not in tensors:
            raise StoreError(f"{path} lacks the {name!r} tensor")
    images, labels = tensors["images"], tensors["labels"]
    check_roles(path, images, labels)
    info = _info(card.get("dataset"), str(path))
    shape = [int(s) for s in images.shape[1:]]
    if card.get("image_shape") != shape or card.get("count") != int(images.shape[0]):
        raise StoreError(f"{path}: the card says {card.get('count')} images of shape "
                         f"{card.get('image_shape')}, the tensors hold {images.shape[0]} of "
                         f"shape {shape}")
    if card.get("sha256") != content_hash(tensors):
        raise StoreError(f"{path}: the tensors do not match the card's sha256 (the file was "
                         f"changed or damaged)")
    if card.get("num_classes") != info.num_classes:
        raise StoreError(f"{path}: the card says {card.get('num_classes')} classes; "
                         f"{info.name} has {info.num_classes}")
    norm = card.get("normalization") or {}
    if [float(v) for v in norm.get("mean", ())] != list(info.mean) or \
            [float(v) for v in norm.get("std", ())] != list(info.std):
        raise StoreError(f"{path}: the card's normalisation {norm} is not gtnkit's for "
                         f"{info.name} (mean {list(info.mean)}, std {list(info.std)}); score "
                         f"it as a foreign set with --normalization")
    check_against(path, images, labels, info)
    return info


def check_roles(path: Path | str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Images are (N, C, H, W) floats and labels (N,) class indices or (N, K) floats; refuses
    (one line) tensors in each other's place."""
    if images.dim() != 4 or not images.is_floating_point():
        looks = " (they look like labels)" if images.dim() <= 2 else ""
        raise StoreError(f"{path}: images must be (N, C, H, W) floats, got "
                         f"{tuple(images.shape)} {str(images.dtype).removeprefix('torch.')}"
                         f"{looks}")
    if labels.dim() == 1 and labels.is_floating_point():
        raise StoreError(f"{path}: hard labels must be integer class indices, got floats")
    if labels.dim() not in (1, 2):
        looks = " (they look like images)" if labels.dim() == 4 else ""
        raise StoreError(f"{path}: labels must be (N,) class indices or (N, K) soft labels, "
                         f"got shape {tuple(labels.shape)}{looks}")
    if labels.shape[0] != images.shape[0]:
        raise StoreError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")


def check_against(path: Path | str, images: torch.Tensor, labels: torch.Tensor,
                  info: DatasetInfo) -> None:
    """The images have ``info``'s shape and the labels its class count."""
    want = (info.channels, *info.im_size)
    if tuple(images.shape[1:]) != want:
        raise StoreError(f"{path} holds images of shape {tuple(images.shape[1:])}, not "
                         f"{want} as {info.name}")
    k = info.num_classes
    if labels.dim() == 2 and labels.shape[1] != k:
        raise StoreError(f"{path} has soft labels over {labels.shape[1]} classes; {info.name} "
                         f"has {k}")
    if labels.dim() == 1 and labels.numel() and (int(labels.min()) < 0 or
                                                 int(labels.max()) >= k):
        raise StoreError(f"{path} has labels in {int(labels.min())}..{int(labels.max())}; "
                         f"{info.name} has classes 0..{k - 1}")
