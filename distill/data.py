"""Image-classification data sets as normalised in-memory tensors with per-class indexing.

Files are read from the standard torchvision layouts under a root, parsed here (IDX for MNIST
and Fashion-MNIST, python pickles for CIFAR-10) and validated (sizes, counts, label range), so
a copy whose checksums differ from torchvision's list (ours has placeholder file names in the
CIFAR pickles) still loads, and a damaged file is a one-line :class:`DataError` naming it.
torchvision's downloader is used only when the caller allows it (``download=True``).

References:
    LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
    recognition", Proc. IEEE 1998 (MNIST). Xiao, Rasul & Vollgraf, "Fashion-MNIST", 2017.
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009 (CIFAR-10).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "DatasetInfo",
    "DATASETS",
    "ImageSet",
    "available_datasets",
    "get_info",
    "resolve_root",
    "load_dataset",
    "dataset_status",
    "expected_files",
    "read_idx",
]

HOW_TO = "pass --data-root DIR or set GTNKIT_DATA (or --download to fetch it with torchvision)"


class DataError(Exception):
    """A data set that cannot be loaded: unknown name, missing root, missing or damaged file."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set (shapes, classes, normalisation, file layout)."""

    name: str
    channels: int
    im_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    counts: tuple[int, int]          # (train, test) sizes
    folder: str                      # sub-folder of the root in torchvision's layout


_DIGITS = tuple(str(i) for i in range(10))
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), _DIGITS,
                         (60000, 10000), "MNIST/raw"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 1, (28, 28), 10, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"), (60000, 10000), "FashionMNIST/raw"),
    # The DC code's normalisation constants, so numbers compare with the papers.
    "cifar10": DatasetInfo(
        "cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"), (50000, 10000), "cifar-10-batches-py"),
}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def get_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive; a few aliases accepted)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: "
                        f"{', '.join(available_datasets())}")
    return DATASETS[key]


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    Attributes:
        images: (N, C, H, W) float32, normalised with ``info.mean`` / ``info.std``.
        labels: (N,) int64 in [0, num_classes).
        info: the data set's :class:`DatasetInfo`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    _by_class: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_indices(self, c: int) -> torch.Tensor:
        """Increasing int64 indices of the members of class ``c`` (on the labels' device)."""
        if self._by_class is None:
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels, minlength=self.info.num_classes).tolist()
            self._by_class = list(torch.split(order, counts))
        return self._by_class[c]

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=self.info.num_classes)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(indices, device=self.labels.device)
        return ImageSet(self.images[idx.to(self.images.device)], self.labels[idx], self.info)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.info)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images back to [0, 1] pixels (any device)."""
        mean = torch.tensor(self.info.mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.info.std, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        return x * std + mean

    def balanced_subset(self, per_class: int, generator: torch.Generator) -> ImageSet:
        """``per_class`` random members of every class (all of a smaller class), by class."""
        parts = []
        for c in range(self.info.num_classes):
            members = self.class_indices(c).cpu()
            pick = torch.randperm(members.numel(), generator=generator)[:per_class]
            parts.append(members[pick].sort().values)
        return self.subset(torch.cat(parts))


# ----------------------------------------------------------------------------- root
def resolve_root(root: str | os.PathLike | None, download: bool = False) -> Path:
    """The data root: ``root``, else ``$GTNKIT_DATA``, else (with download) a user cache."""
    if root in (None, ""):
        root = os.environ.get("GTNKIT_DATA") or None
    if root is None:
        if not download:
            raise DataError(f"no data root: {HOW_TO}")
        root = Path.home() / ".cache" / "gtnkit" / "data"
    path = Path(root).expanduser()
    if not path.is_dir():
        if download:
            path.mkdir(parents=True, exist_ok=True)
        else:
            raise DataError(f"data root {path} does not exist: {HOW_TO}")
    return path


# ----------------------------------------------------------------------------- readers
def _open_idx(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}); delete it "
                        f"and re-download with --download, or replace it") from None


def read_idx(path: Path, expected_count: int | None = None) -> np.ndarray:
    """Parse an IDX file (LeCun's format): uint8 images (n, rows, cols) or labels (n,).

    Validates the magic number, that the payload length matches the header exactly, and
    (when given) the item count.
    """
    data = _open_idx(path)
    if len(data) < 8:
        raise DataError(f"{path} is truncated or corrupt (only {len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:
        if len(data) < 16:
            raise DataError(f"{path} is truncated or corrupt (incomplete header)")
        n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
        shape: tuple[int, ...] = (n, rows, cols)
        offset = 16
    elif magic == 2049:
        n = int.from_bytes(data[4:8], "big")
        shape, offset = (n,), 8
    else:
        raise DataError(f"{path} is not an IDX image or label file (magic {magic})")
    need, have = int(np.prod(shape)), len(data) - offset
    if have != need:
        raise DataError(f"{path} is truncated or corrupt (expected {need} bytes of data after "
                        f"the header, found {have}); re-download with --download or replace it")
    if expected_count is not None and n != expected_count:
        raise DataError(f"{path} holds {n} items, expected {expected_count}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_path(info: DatasetInfo, root: Path, stem: str) -> Path:
    base = root / info.folder / stem
    gz = base.with_name(stem + ".gz")
    if base.is_file():
        return base
    if gz.is_file():
        return gz
    raise DataError(f"missing {gz} (or {base.name}): {HOW_TO}")


_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _read_mnist_like(info: DatasetInfo, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    count = info.counts[0 if split == "train" else 1]
    img_stem, lab_stem = _IDX_STEMS[split]
    images = read_idx(_idx_path(info, root, img_stem), count)
    labels = read_idx(_idx_path(info, root, lab_stem), count)
    if images.ndim != 3 or images.shape[1:] != info.im_size:
        raise DataError(f"{root / info.folder / img_stem} holds images of shape "
                        f"{images.shape[1:]}, expected {info.im_size}")
    return images[:, None], labels


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: uint8 (10000, 3, 32, 32) images and (10000,) labels.

    The file is a pickle: only load batches from a root you trust (your own download).
    """
    if not path.is_file():
        raise DataError(f"missing {path}: {HOW_TO}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        data = np.asarray(obj[b"data"], dtype=np.uint8)
        labels = np.asarray(obj[b"labels"], dtype=np.int64)
    except Exception as exc:  # unpickling fails in many ways on damaged files
        raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}); re-download "
                        f"with --download or replace it") from None
    if data.shape != (10000, 3072) or labels.shape != (10000,):
        raise DataError(f"{path} holds data {data.shape} / labels {labels.shape}, expected "
                        f"(10000, 3072) / (10000,)")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(info: DatasetInfo, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(root / info.folder / name) for name in _CIFAR_FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def expected_files(name: str, root: str | os.PathLike) -> list[Path]:
    """Where the files of ``name`` are expected under ``root``."""
    info = get_info(name)
    folder = Path(root) / info.folder
    if info.name == "cifar10":
        return [folder / f for f in (*_CIFAR_FILES["train"], *_CIFAR_FILES["test"])]
    return [folder / s for stems in _IDX_STEMS.values() for s in stems]


def _read(info: DatasetInfo, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    reader = _read_cifar if info.name == "cifar10" else _read_mnist_like
    images, labels = reader(info, root, split)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{root / info.folder} has {split} labels outside "
                        f"0..{info.num_classes - 1}")
    return images, labels


def _download(info: DatasetInfo, root: Path, split: str) -> None:
    import torchvision.datasets as tvd  # only when the user allows a download

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}
    try:
        cls[info.name](str(root), train=(split == "train"), download=True)
    except Exception as exc:  # network and checksum failures
        raise DataError(f"could not download {info.name} into {root} ({_cause(exc)}); without "
                        f"internet, copy the files there or pass --data-root DIR (or set "
                        f"GTNKIT_DATA) to a folder that holds them") from None


def _cause(exc: BaseException, limit: int = 200) -> str:
    """The gist of a download error on one line: torchvision's messages span lines ("Error
    downloading X:", then "Tried URL, got:" and the cause per mirror); keep the last cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not line.endswith(":")]
    text = causes[-1] if causes else (lines[0].rstrip(":") if lines else type(exc).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False) -> ImageSet:
    """Load ``split`` ("train" or "test") of data set ``name`` as an :class:`ImageSet`.

    Raises:
        DataError: unknown name or split, no root, missing or damaged files, failed download.
    """
    info = get_info(name)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use train or test")
    path = resolve_root(root, download)
    try:
        images, labels = _read(info, path, split)
    except DataError:
        if not download:
            raise
        _download(info, path, split)
        images, labels = _read(info, path, split)
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).float().div_(255.0)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)
    return ImageSet(images=x, labels=torch.from_numpy(labels.astype(np.int64)), info=info)


def dataset_status(name: str, root: str | os.PathLike) -> tuple[bool, str]:
    """Whether both splits of ``name`` load from ``root``, with a one-line reason."""
    info = get_info(name)
    try:
        sizes = [len(_read(info, Path(root), split)[1]) for split in ("train", "test")]
    except DataError as exc:
        return False, str(exc)
    return True, f"{sizes[0]} train / {sizes[1]} test images in {Path(root) / info.folder}"
