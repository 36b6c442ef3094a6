"""Sets as artefacts: the torch Dataset view, safetensors + card, every export format bit for
bit, other tools' sets, generators, and bad files as one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from distill.artefacts import CARD_KEY, content_hash, write_safetensors
from distill.data import get_info
from distill.exports import EXPORT_FORMATS, export_set
from distill.foreign import parse_normalization
from distill.store import SavedSet, StoreError, load_set, save_set
from gtn import GeneratorConfig, GeneratorError, GTNConfig, generator_set, load_generator
from gtn.train import make_teacher, save_generator

from .conftest import make_tiny_set

TINY_GEN = GeneratorConfig(noise_dim=4, width_fc=8, width_conv=4)


def real_pixels_set(per_class=2, name="mnist", seed=0) -> SavedSet:
    """A set of 8-bit images normalised exactly as distill.data loads real data (a selection)."""
    info = get_info(name)
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (per_class * info.num_classes, info.channels, *info.im_size),
                       generator=g, dtype=torch.uint8)
    x = u8.float().div_(255.0)
    x.sub_(torch.tensor(info.mean).view(1, -1, 1, 1)).div_(torch.tensor(info.std).view(1, -1, 1, 1))
    labels = torch.arange(info.num_classes).repeat_interleave(per_class)
    return SavedSet(x, labels, {"dataset": info.name, "method": "random", "ipc": per_class,
                                "seed": seed, "indices": list(range(len(labels)))})


def synthetic_set(soft=False, lr=None) -> SavedSet:
    s = make_tiny_set(per_class=3)
    labels = torch.softmax(torch.randn(len(s), 10, generator=torch.Generator().manual_seed(1)),
                           1) if soft else s.labels
    meta = {"dataset": "mnist", "method": "dc", "ipc": 3, "init": "real", "seed": 0,
            "config": {"iterations": 4}, "evaluations": [{"protocol": "dc", "mean": 50.0,
                                                          "std": 1.0, "accuracies": [49.0, 51.0]}]}
    if lr is not None:
        meta["lr"] = lr
    return SavedSet(s.images * 1.7, labels, meta)  # pixels beyond [0, 1], as synthetic sets do


def assert_same(a: SavedSet, b: SavedSet) -> None:
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert torch.equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
    assert a.card == b.card


# ------------------------------------------------------------------ the Dataset view
def test_a_set_is_a_dataset_with_transform_denormalize_and_card(tmp_path):
    s = synthetic_set(soft=True)
    save_set(tmp_path / "set.safetensors", s)
    d = load_set(tmp_path / "set.safetensors", transform=lambda x: x.flip(-1))
    assert len(d) == 30
    x, y = d[4]
    assert torch.equal(x, s.images[4].flip(-1)) and torch.equal(y, s.labels[4])
    xb, yb = next(iter(DataLoader(d, batch_size=8, shuffle=False)))
    assert xb.shape == (8, 1, 28, 28) and yb.shape == (8, 10)
    assert torch.allclose(d.denormalize(), s.images * 0.3081 + 0.1307)
    card = d.card
    assert card["dataset"] == "mnist" and card["labels"] == "soft" and card["ipc"] == 3
    assert card["normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert card["class_names"][3] == "3" and card["image_shape"] == [1, 28, 28]
    assert card["sha256"] == content_hash(s.tensors()) and card["gtnkit"]


def test_hard_labels_batch_as_class_indices():
    s = synthetic_set()
    _, y = next(iter(DataLoader(s, batch_size=5)))
    assert y.dtype == torch.int64 and y.shape == (5,)


# ------------------------------------------------------------------ files
def test_safetensors_file_holds_the_tensors_and_the_card(tmp_path):
    s = synthetic_set(lr=0.02)
    path = save_set(tmp_path / "set.safetensors", s)
    tensors = load_file(path)  # any safetensors reader, no gtnkit
    assert set(tensors) == {"images", "labels", "lr"} and torch.equal(tensors["images"], s.images)
    with safe_open(str(path), "pt") as f:
        card = json.loads(f.metadata()[CARD_KEY])
    assert card == s.card and "lr" not in card  # lr is a tensor, not a card entry
    back = load_set(path)
    assert_same(back, s)
    assert back.meta["lr"] == pytest.approx(0.02)


def test_a_pt_set_of_an_earlier_version_still_loads(tmp_path):
    s = synthetic_set()
    save_set(tmp_path / "set.pt", s)  # the .pt layout
    assert torch.load(tmp_path / "set.pt", weights_only=True)["format"] == "gtnkit.set"
    back = load_set(tmp_path)  # a folder means its set
    assert torch.equal(back.images, s.images) and back.card == s.card


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("kind", ["hard", "soft", "lr", "real"])
def test_every_export_round_trips_bit_for_bit(tmp_path, fmt, kind):
    s = (real_pixels_set() if kind == "real" else
         synthetic_set(soft=kind == "soft", lr=0.015 if kind == "lr" else None))
    save_set(tmp_path / "set.safetensors", s)
    s = load_set(tmp_path / "set.safetensors")
    export_set(s, fmt, tmp_path / fmt)
    back = load_set(tmp_path / fmt / ("set.npz" if fmt == "npz" else ""))
    assert_same(back, s)


def test_npz_export_reads_without_pickle(tmp_path):
    s = synthetic_set(soft=True)
    export_set(s, "npz", tmp_path)
    with np.load(tmp_path / "set.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"], s.images.numpy())
        assert json.loads(str(z["card"])) == s.card


def test_imagefolder_is_read_by_torchvision_and_real_images_come_back_exactly(tmp_path):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    s = real_pixels_set(name="cifar10")
    export_set(s, "imagefolder", tmp_path)
    info = get_info("cifar10")
    tv = ImageFolder(str(tmp_path), transform=transforms.ToTensor())
    assert tv.classes == [f"{c}_{n}" for c, n in enumerate(info.class_names)]
    assert tv.targets == s.labels.tolist()
    # ImageFolder sorts files by name: the set's order within each class
    x = torch.stack([tv[i][0] for i in range(len(tv))])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    assert torch.equal((x - mean) / std, s.images)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["export"]["clipped_values"] == 0
    assert {k: v for k, v in card.items() if k != "export"} == s.card


def test_imagefolder_counts_clipped_pixels_and_files_soft_labels_by_argmax(tmp_path):
    s = synthetic_set(soft=True)
    export_set(s, "imagefolder", tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["export"]["clipped_values"] > 0
    for c in range(10):
        names = sorted(p.name for p in (tmp_path / f"{c}_{c}").glob("*.png"))
        assert [int(n[:-4]) for n in names] == (s.labels.argmax(1) == c).nonzero().view(-1
                                                                                          ).tolist()


# ------------------------------------------------------------------ other tools' sets
def foreign_folder(path, images, labels, lr=None):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(images, path / "images.pt")
    torch.save(labels, path / "labels.pt")
    if lr is not None:
        torch.save(lr, path / "lr.pt")
    return path


def test_a_foreign_set_in_the_data_sets_normalisation_is_read_unchanged(tmp_path):
    s = synthetic_set()
    folder = foreign_folder(tmp_path / "f", s.images.clone(), s.labels.clone(),
                            torch.tensor(0.03))
    back = load_set(folder, dataset="mnist", normalization="dataset")
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    assert back.meta["method"] == "imported" and back.meta["lr"] == pytest.approx(0.03)
    assert back.meta["source"]["layout"] == "tensors" and back.meta["ipc"] == 3


@pytest.mark.parametrize("spec", ["none", "0.5/0.25"])
def test_a_foreign_set_is_mapped_into_gtnkit_normalisation(tmp_path, spec):
    s = real_pixels_set()
    mean, std = parse_normalization(spec, get_info("mnist"))
    pixels = s.denormalize()
    theirs = (pixels - mean[0]) / std[0]
    np.savez(tmp_path / "theirs.npz", images=theirs.numpy(), labels=s.labels.numpy())
    back = load_set(tmp_path / "theirs.npz", dataset="mnist", normalization=spec)
    assert torch.allclose(back.images, s.images, atol=1e-5)
    assert back.meta["source"]["normalization"] == {"mean": list(mean), "std": list(std)}


# ------------------------------------------------------------------ bad files: one line each
def one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def rewrite(path, card=None, tensors=None):
    """Write a file whose card and tensors may disagree (what an edit by hand leaves)."""
    s = load_set(path)
    write_safetensors(path, tensors or s.tensors(), card or s.card)


@pytest.mark.parametrize("change,needle", [
    (lambda c, t: c.update(image_shape=[1, 32, 32]), "shape"),
    (lambda c, t: c.update(count=7), "the card says 7 images"),
    (lambda c, t: t.update(images=t["images"] + 1), "sha256"),
    (lambda c, t: c.update(num_classes=100), "100 classes"),
    (lambda c, t: c.update(normalization={"mean": [0.5], "std": [0.5]}), "--normalization"),
    (lambda c, t: c.update(version=7), "version 7"),
])
def test_a_card_that_contradicts_its_tensors_is_one_line(tmp_path, change, needle):
    path = save_set(tmp_path / "set.safetensors", synthetic_set())
    s = load_set(path)
    card, tensors = s.card, s.tensors()
    change(card, tensors)
    write_safetensors(path, tensors, card)
    with pytest.raises(StoreError) as err:
        load_set(path)
    one_line(err, str(path), needle)


def test_a_damaged_byte_is_caught_by_the_hash(tmp_path):
    path = save_set(tmp_path / "set.safetensors", synthetic_set())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last image
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        load_set(path)
    one_line(err, "sha256")


@pytest.mark.parametrize("what", ["nan", "no card", "junk"])
def test_unreadable_safetensors_is_one_line(tmp_path, what):
    from safetensors.torch import save_file

    path = tmp_path / "set.safetensors"
    s = synthetic_set()
    if what == "nan":
        t = s.tensors()
        t["images"][0, 0, 0, 0] = float("nan")
        write_safetensors(path, t, s.card)
    elif what == "no card":
        save_file(s.tensors(), str(path))
    else:
        path.write_bytes((40).to_bytes(8, "little") + b"{" + b"x" * 60)
    with pytest.raises(StoreError) as err:
        load_set(path)
    one_line(err, str(path), {"nan": "non-finite", "no card": "without a gtnkit card",
                              "junk": "not a readable"}[what])


@pytest.mark.parametrize("images,labels,kw,needle", [
    (None, None, {"normalization": None}, "normalisation"),
    (None, None, {"dataset": None}, "data set"),
    (None, None, {"normalization": "zca"}, "MEAN/STD"),
    (None, None, {"normalization": "0.1,0.2/0.3"}, "channel"),
    ("labels", None, {}, "look like labels"),
    (None, "images", {}, "look like images"),
    (None, torch.arange(30) % 12, {}, "classes 0..9"),
    (None, torch.rand(30, 100), {}, "100 classes"),
    (torch.rand(30, 3, 32, 32), None, {}, "not (1, 28, 28)"),
    (None, torch.arange(29) % 10, {}, "30 images but 29 labels"),
    (torch.rand(30, 1, 28, 28).mul(255).byte(), None, {}, "floats"),
    (None, None, {"dataset": "imagenet"}, "unknown data set"),
])
def test_bad_foreign_sets_are_one_line(tmp_path, images, labels, kw, needle):
    s = synthetic_set()
    images = s.labels if isinstance(images, str) else s.images if images is None else images
    labels = s.images if isinstance(labels, str) else s.labels if labels is None else labels
    folder = foreign_folder(tmp_path / "f", images, labels)
    with pytest.raises(StoreError) as err:
        load_set(folder, **{"dataset": "mnist", "normalization": "dataset", **kw})
    one_line(err, needle)


def test_a_foreign_set_with_nan_or_a_pickled_object_is_refused(tmp_path):
    s = synthetic_set()
    bad = s.images.clone()
    bad[1, 0, 2, 2] = float("inf")
    folder = foreign_folder(tmp_path / "f", bad, s.labels)
    with pytest.raises(StoreError) as err:
        load_set(folder, dataset="mnist", normalization="dataset")
    one_line(err, "non-finite")
    torch.save({"images": s.images}, folder / "images.pt")  # a dict: not a tensor of images
    with pytest.raises(StoreError) as err:
        load_set(folder, dataset="mnist", normalization="dataset")
    one_line(err, "not a tensor")
    np.savez(tmp_path / "o.npz", images=np.array([object()], dtype=object), labels=np.zeros(1))
    with pytest.raises(StoreError) as err:
        load_set(tmp_path / "o.npz", dataset="mnist", normalization="dataset")
    one_line(err, "not a readable npz")


def test_normalization_for_a_gtnkit_set_is_refused(tmp_path):
    path = save_set(tmp_path / "set.safetensors", synthetic_set())
    with pytest.raises(StoreError) as err:
        load_set(path, normalization="none")
    one_line(err, "card")
    with pytest.raises(StoreError) as err:
        load_set(path, dataset="cifar10")
    one_line(err, "not of cifar10")


# ------------------------------------------------------------------ generators
def tiny_teacher(curriculum="full"):
    config = GTNConfig(inner_steps=2, batch_size=10, curriculum=curriculum,
                       student="convnet:width=4,depth=1", meta_iterations=1, generator=TINY_GEN)
    return make_teacher(get_info("mnist"), config, seed=0), config


def test_a_generator_is_safetensors_with_a_card_and_loads_back(tmp_path):
    teacher, config = tiny_teacher()
    path = save_generator(tmp_path / "generator.safetensors", teacher, config,
                          meta={"seed": 3})
    with safe_open(str(path), "pt") as f:
        card = json.loads(f.metadata()[CARD_KEY])
    assert card["format"] == "gtnkit.generator" and card["dataset"] == "mnist"
    assert card["config"]["inner_steps"] == 2 and card["seed"] == 3
    state = load_file(path)
    assert card["sha256"] == content_hash(state)
    back, back_config = load_generator(tmp_path)  # the run folder
    assert back_config == config
    for k, v in teacher.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    a = generator_set(teacher, config, per_class=2, seed=5)
    b = generator_set(back, back_config, per_class=2, seed=5)
    assert_same(a, b)


def test_a_generator_of_an_earlier_version_still_loads(tmp_path):
    teacher, config = tiny_teacher()
    save_generator(tmp_path / "generator.pt", teacher, config)
    assert torch.load(tmp_path / "generator.pt", weights_only=True)["format"] == \
        "gtnkit.generator"
    _, back_config = load_generator(tmp_path)
    assert back_config == config


def test_a_changed_generator_is_refused_by_its_hash(tmp_path):
    teacher, config = tiny_teacher()
    path = save_generator(tmp_path / "generator.safetensors", teacher, config)
    state = load_file(path)
    with safe_open(str(path), "pt") as f:
        card = json.loads(f.metadata()[CARD_KEY])
    key = next(iter(state))
    state[key] = state[key] + 1
    write_safetensors(path, state, card)
    with pytest.raises(GeneratorError, match="sha256"):
        load_generator(path)


def test_a_generator_gives_a_dataset_per_class_or_its_curriculum(tmp_path):
    teacher, config = tiny_teacher()
    s = generator_set(teacher, config, per_class=3, seed=0)
    assert len(s) == 30 and s.labels.tolist() == torch.arange(10).repeat_interleave(3).tolist()
    assert s.card["method"] == "gtn-unrolled" and s.card["ipc"] == 3
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    c = generator_set(teacher, config, seed=0, curriculum=True)
    assert len(c) == 2 * 10 and c.card["curriculum"]["steps"] == 2
    assert len(c.card["curriculum"]["lr_per_step"]) == 2
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    x, y = next(iter(DataLoader(c, batch_size=10)))
    assert x.shape == (10, 1, 28, 28)
    save_set(tmp_path / "c.safetensors", c)
    assert_same(load_set(tmp_path / "c.safetensors"), c)
    none_teacher, none_config = tiny_teacher("none")
    with pytest.raises(GeneratorError, match="no learned curriculum"):
        generator_set(none_teacher, none_config, curriculum=True)
