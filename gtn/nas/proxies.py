"""What the students of a search train on: the ground truth's subset of the training split
and every proxy's fixed set (GTN curricula, condensed sets, coresets, real subsets)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.data import ImageSet, get_info
from distill.engine import TrainConfig
from distill.progress import Progress
from distill.rng import generator as make_generator

from .budgets import NASBudget
from .errors import NASError

__all__ = ["PROXY_KINDS", "TrainSet", "ProxySpec", "nas_split", "truth_set", "parse_proxy",
           "parse_proxies", "resolve_proxy", "build_proxy_set", "tensor_digest"]


PROXY_KINDS = ("gtn", "gtn-steps", "dc", "coreset", "real-subset", "real-steps")


@dataclass
class TrainSet:
    """What one kind of student trains on: ``images`` (N, C, H, W), ``labels`` (N,) hard or
    (N, K) soft, the schedule ``train``, the seconds it took to build (``setup_seconds``) and
    provenance (``meta``)."""

    label: str
    images: torch.Tensor
    labels: torch.Tensor
    train: TrainConfig
    setup_seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    step_lrs: tuple[float, ...] | None = None  # a GTN's own protocol: one batch per step, in
    momentum: float | None = None              # order, at these learned lrs and momentum

    def digest(self) -> str:
        return tensor_digest(self.images, self.labels)


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nas_split(train_set: ImageSet, budget: NASBudget) -> tuple[ImageSet, ImageSet]:
    """(fit, validation) of the training split: :func:`gtn.train.split_validation` with
    ``min(budget.validation, len // 5)`` images, so the validation images of a search are
    among those a GTN trained with at least as large a ``validation`` never saw."""
    from ..train import split_validation

    n = min(budget.validation, len(train_set) // 5)
    if n < 1:
        raise NASError(f"the training set ({len(train_set)} images) is too small to hold out "
                       f"a validation split")
    return split_validation(train_set, n)


def truth_set(fit: ImageSet, budget: NASBudget) -> TrainSet:
    """The ground truth's training data: a fixed random ``truth_train`` subset of ``fit``."""
    x, y = fit.images, fit.labels
    if budget.truth_train is not None and budget.truth_train < len(fit):
        idx = torch.randperm(len(fit), generator=make_generator(0, "nas-truth"))
        idx = idx[:budget.truth_train].sort().values
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    return TrainSet("truth", x, y, budget.truth, meta={"size": int(y.shape[0])})


@dataclass(frozen=True)
class ProxySpec:
    """A parsed ``--proxy`` value: ``kind`` (one of :data:`PROXY_KINDS`) and its ``arg``."""

    kind: str
    arg: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_proxy(text: str) -> ProxySpec:
    """``"gtn:runs/g"`` / ``"coreset:herding"`` / ``"real-subset"`` -> :class:`ProxySpec`."""
    kind, _, arg = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in PROXY_KINDS:
        raise NASError(f"unknown proxy kind {kind!r} in {text!r}; choose from "
                       f"gtn:RUN, gtn-steps:RUN, dc:RUN, coreset:METHOD, real-subset, "
                       f"real-steps")
    value = arg.strip() or None
    if kind in ("gtn", "gtn-steps", "dc", "coreset") and value is None:
        form = {"gtn": "gtn:RUN", "gtn-steps": "gtn-steps:RUN", "dc": "dc:RUN",
                "coreset": "coreset:METHOD"}[kind]
        raise NASError(f"proxy {kind!r} needs an argument: {form}")
    if kind in ("real-subset", "real-steps") and value is not None:
        raise NASError(f"proxy {kind!r} takes no argument, got {text!r}")
    return ProxySpec(kind, value)


def parse_proxies(texts: Sequence[str]) -> list[ProxySpec]:
    """:func:`parse_proxy` of every text; a proxy given twice is refused (NASError)."""
    specs = [parse_proxy(t) for t in texts]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise NASError(f"a proxy is given twice: {', '.join(labels)}")
    return specs


def _run_file(arg: str, names: tuple[str, ...]) -> Path:
    from distill.store import find_run_file

    return find_run_file(arg, names)


def resolve_proxy(spec: ProxySpec, dataset: str) -> Any:
    """Load and check what ``spec`` needs (a generator, a saved set, a selection rule).

    Cheap: call it before any training so a bad proxy is refused before anything is written.

    Raises:
        NASError: a run made for another data set. GeneratorError / StoreError /
            SelectionError: an unreadable run or an unknown selection method.
    """
    want = get_info(dataset).name
    arg = spec.arg or ""  # parse_proxy: every kind read here has an argument
    if spec.kind in ("gtn", "gtn-steps"):
        from ..train import GENERATOR_FILES, load_generator

        path = _run_file(arg, GENERATOR_FILES)
        teacher, _ = load_generator(path, dataset)
        if teacher.info.name != want:
            raise NASError(f"{path} is a generator of {teacher.info.name}, not of {want}")
        return teacher
    if spec.kind == "dc":
        from distill.store import SET_FILES, load_set

        path = _run_file(arg, SET_FILES)
        saved = load_set(path)
        if saved.dataset != want:
            raise NASError(f"{path} is a set of {saved.dataset}, not of {want}")
        info = get_info(want)
        if tuple(saved.images.shape[1:]) != (info.channels, *info.im_size):
            raise NASError(f"{path} holds images of shape {tuple(saved.images.shape[1:])}, "
                           f"not those of {want}")
        return saved
    if spec.kind == "coreset":
        from selection import get_method

        return get_method(arg)
    return None


def build_proxy_set(spec: ProxySpec, source: Any, fit: ImageSet, budget: NASBudget, seed: int,
                    device: torch.device | str = "cpu", progress: Progress | None = None
                    ) -> TrainSet:
    """The fixed training set of a proxy, built once and shared by every candidate.

    * ``gtn``: the generator's learned curriculum (T batches of its learned noise, generated
      in training mode as during meta-training; fresh noise for curriculum ``none``), i.e.
      what :func:`gtn.train.fixed_set_accuracy` trains on: T x batch images;
    * ``gtn-steps``: the same T batches, but trained as the GTN was meta-trained (its
      few-step protocol, :func:`gtn.train.few_step_accuracy`): one step per batch, in order,
      at the generator's learned per-step lrs and momentum;
    * ``dc``: the condensed set as saved (soft labels kept);
    * ``coreset``: ``ipc`` images per class chosen by the rule from a pool of
      ``pool_per_class`` per class of ``fit``, with signals of a ``signal_model`` network;
    * ``real-subset``: ``ipc`` random images per class of ``fit``;
    * ``real-steps``: ``proxy_steps * proxy_batch`` random images of ``fit``, one epoch: the
      same number of SGD steps on real data, every image seen once.
    """
    start = time.perf_counter()
    g = make_generator(seed, "nas-proxy", spec.label)
    meta: dict = {"kind": spec.kind, "arg": spec.arg}
    if spec.kind in ("gtn", "gtn-steps"):
        teacher = source.to(device)
        teacher.train()
        batches = list(teacher.inner_batches(g, graph=False))
        x = torch.cat([b[0] for b in batches]).detach()
        y = torch.cat([b[1] for b in batches]).detach()
        meta.update(curriculum=teacher.curriculum, steps=teacher.steps)
        if spec.kind == "gtn-steps":
            lrs = tuple(float(v) for v in teacher.lr_tensor().detach().cpu())
            momentum = float(teacher.momentum_tensor().detach())
            meta.update(size=int(y.shape[0]), momentum=momentum)
            cfg = TrainConfig(epochs=1, lr=lrs[0], momentum=momentum, weight_decay=0.0,
                              batch_size=teacher.batch_size, decay_at=None)
            return TrainSet(spec.label, x.to(device), y.to(device), cfg,
                            time.perf_counter() - start, meta, step_lrs=lrs, momentum=momentum)
    elif spec.kind == "dc":
        x, y = source.images.to(device), source.labels.to(device)
        meta.update(method=source.meta.get("method"), ipc=source.meta.get("ipc"))
    elif spec.kind == "coreset":
        from selection import SignalConfig
        from selection import select as run_select

        config = SignalConfig.of(budget.signal_model, budget.signal_epochs,
                                 budget.pool_per_class)
        sel = run_select(fit, source, budget.ipc, seed=seed, signal_config=config,
                         device=device, progress=progress)
        idx = sel.indices.to(fit.images.device)
        x, y = fit.images[idx], fit.labels[idx]
        meta.update(method=sel.method, ipc=budget.ipc)
    elif spec.kind == "real-subset":
        sub = fit.balanced_subset(budget.ipc, g)
        x, y = sub.images, sub.labels
        meta.update(ipc=budget.ipc)
    elif spec.kind == "real-steps":
        want = budget.proxy_steps * budget.proxy_batch
        idx = torch.randperm(len(fit), generator=g)[:want].sort().values
        x, y = fit.images[idx.to(fit.images.device)], fit.labels[idx.to(fit.labels.device)]
        epochs = max(1, math.ceil(want / len(fit)))
        cfg = TrainConfig(epochs=epochs, lr=budget.proxy_lr, batch_size=budget.proxy_batch,
                          decay_at=None)
        meta["size"] = int(y.shape[0])
        return TrainSet(spec.label, x.to(device), y.to(device), cfg,
                        time.perf_counter() - start, meta)
    else:  # pragma: no cover - parse_proxy refuses it
        raise NASError(f"unknown proxy kind {spec.kind!r}")
    meta["size"] = int(y.shape[0])
    return TrainSet(spec.label, x.to(device), y.to(device), budget.proxy_train(int(y.shape[0])),
                    time.perf_counter() - start, meta)
