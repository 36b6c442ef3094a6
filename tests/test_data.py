"""Data loading: IDX / CIFAR readers against bytes we write ourselves, error messages, and the
real MNIST / CIFAR-10 files (marker ``realdata``)."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import distill.data as data
from distill.data import DataError, ImageSet, get_info, load_dataset, read_idx


def write_idx(path, array: np.ndarray, gz: bool = True, magic: int | None = None) -> None:
    """Write ``array`` (uint8) in LeCun's IDX format, independently of the reader."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def small_counts(monkeypatch):
    """Shrink the expected split sizes so tests can write tiny files in the real format."""
    for name in ("mnist", "fashion_mnist"):
        monkeypatch.setitem(data.DATASETS, name, replace(data.DATASETS[name], counts=(30, 20)))


def fake_mnist_root(tmp_path, folder="FashionMNIST", gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(tmp_path / folder / "raw" / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(tmp_path / folder / "raw" / f"{split}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path, small_counts, gz):
    arrays = fake_mnist_root(tmp_path, gz=gz)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path)
    images, labels = arrays["train"]
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.float32
    pixels = torch.round(ds.denormalize(ds.images) * 255).to(torch.uint8)
    assert torch.equal(pixels[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    test = load_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(test) == 20 and torch.equal(test.labels, torch.from_numpy(
        arrays["t10k"][1].astype(np.int64)))


def test_class_indices_match_a_loop(tmp_path, small_counts):
    fake_mnist_root(tmp_path, folder="MNIST")
    ds = load_dataset("mnist", root=tmp_path)
    for c in range(10):
        brute = [i for i in range(len(ds)) if int(ds.labels[i]) == c]
        assert ds.class_indices(c).tolist() == brute
    assert ds.class_counts().sum() == len(ds)


@pytest.mark.determinism
def test_balanced_subset_is_reproducible(tmp_path, small_counts):
    fake_mnist_root(tmp_path, folder="MNIST")
    ds = load_dataset("mnist", root=tmp_path)
    a = ds.balanced_subset(2, torch.Generator().manual_seed(0))
    b = ds.balanced_subset(2, torch.Generator().manual_seed(0))
    c = ds.balanced_subset(2, torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert (a.class_counts() <= 2).all()


def test_env_root(tmp_path, small_counts, monkeypatch):
    fake_mnist_root(tmp_path, folder="MNIST")
    monkeypatch.setenv("GTNKIT_DATA", str(tmp_path))
    assert len(load_dataset("mnist")) == 30


def one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_no_root(monkeypatch):
    monkeypatch.delenv("GTNKIT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    one_line(e, "--data-root", "GTNKIT_DATA", "--download")


def test_nonexistent_root(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path / "nowhere")
    one_line(e, "nowhere")


def test_missing_file_names_expected_path(tmp_path, small_counts):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path)
    one_line(e, str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"))


def test_truncated_idx(tmp_path, small_counts):
    fake_mnist_root(tmp_path, folder="MNIST", gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path)
    one_line(e, str(path), "truncated")


def test_bad_magic_and_corrupt_gzip(tmp_path):
    write_idx(tmp_path / "x", np.zeros((2, 3), np.uint8), gz=False, magic=1234)
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "x")
    one_line(e, "magic")
    (tmp_path / "y.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "y.gz")
    one_line(e, "y.gz")


def test_wrong_count(tmp_path):
    write_idx(tmp_path / "l", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(DataError, match="expected 6"):
        read_idx(tmp_path / "l", expected_count=6)


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(DataError) as e:
        get_info("imagenet")
    one_line(e, "mnist", "cifar10", "fashion_mnist")
    with pytest.raises(DataError, match="split"):
        load_dataset("mnist", "val", root=tmp_path)


def test_corrupt_cifar_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {b"data": np.zeros((10000, 3072), np.uint8), b"labels": [0] * 10000}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(good, f)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    one_line(e, "data_batch_3")


def test_denormalize_inverts_normalisation():
    info = get_info("cifar10")
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)
    s = ImageSet((x - mean) / std, torch.zeros(2, dtype=torch.int64), info)
    torch.testing.assert_close(s.denormalize(s.images), x)


@pytest.mark.realdata
def test_real_mnist(data_root):
    train = load_dataset("mnist", "train", root=data_root)
    test = load_dataset("mnist", "test", root=data_root)
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.class_counts().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                             5851, 5949]
    assert test.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                            1009]
    assert float(train.denormalize(train.images[:1000]).max()) == pytest.approx(1.0)


@pytest.mark.realdata
def test_real_cifar10(data_root):
    train = load_dataset("cifar10", "train", root=data_root)
    assert train.images.shape == (50000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10
    mean = train.denormalize(train.images).mean(dim=(0, 2, 3))
    # CIFAR-10's published per-channel pixel means (a property of the files, the constants the
    # DC/DSA/MTT code normalise with); a float32 mean over 51M pixels differs between CPUs by
    # far less than the tolerance
    torch.testing.assert_close(mean, torch.tensor([0.49139968, 0.48215841, 0.44653091]),
                               atol=1e-4, rtol=0)
    assert len(load_dataset("cifar10", "test", root=data_root)) == 10000
