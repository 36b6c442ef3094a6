"""Architecture search with a cheap proxy: does a short training keep the true ranking?

Such, Rawal, Lehman, Stanley & Clune, "Generative Teaching Networks: Accelerating Neural
Architecture Search by Learning to Generate Synthetic Training Data", ICML 2020, train every
candidate architecture for a few steps on GTN-generated data and keep the order that full
training on real data would give (published: Spearman 0.56 with the true accuracy on the top
half of the architectures, at about 9x fewer steps). This module measures that for any proxy:

* a **search space** over the student zoo (:func:`sample_candidates`): ConvNets of depth 1-4,
  width 16-256, every norm / activation / pooling of :mod:`distill.models`, plus MLP, LeNet,
  AlexNet, VGG-11 and ResNet-18 variants, each with a stable id (a hash of its canonical spec),
  parameter count and multiply-accumulates per image, filtered by family and cost;
* the **ground truth**: each candidate trained on real training images under a stated budget
  and scored on a validation split held out of the *training* set (:func:`split_validation`,
  never the test set); one JSON file per (data set, candidate, budget fingerprint, seed) in a
  cache, written atomically as each candidate finishes, so a rerun skips what is done;
* **proxies**, each a short training of the candidate scored on the same validation split
  (:data:`PROXY_KINDS`): ``gtn:RUN`` (the generator's learned curriculum as a fixed set),
  ``dc:RUN`` (a condensed set), ``coreset:METHOD`` (a coreset of a selection rule),
  ``real-subset`` (random real images, IPC per class) and ``real-steps`` (fresh real images
  for the same number of SGD steps);
* **ranking quality** (:func:`rank_quality`): Spearman and Kendall tau-b with percentile
  bootstrap intervals over all candidates and over the top half by true accuracy, top-k
  overlap, the true accuracy of the architecture the proxy picks, and the speed-up.

Every student trains through :func:`distill.engine.train`. A candidate's initialisation and
batch order come from ``child_seed(seed, "nas", candidate id)`` and never from the order of
evaluation, so ``workers=K`` (spawned processes) gives the numbers of ``workers=1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from distill.data import DatasetInfo, ImageSet, get_info
from distill.engine import TrainConfig, accuracy, train
from distill.models import ACTS, NORMS, POOLS, ModelError, build_model, parse_model_spec
from distill.progress import Progress, task
from distill.rng import generator as make_generator
from distill.store import atomic_write_json, save_figure, to_jsonable

__all__ = [
    "FAMILIES",
    "NAS_BUDGETS",
    "PROXY_KINDS",
    "Candidate",
    "NASBudget",
    "NASError",
    "ProxySpec",
    "SearchSpace",
    "TrainSet",
    "bootstrap_ci",
    "build_proxy_set",
    "canonical_spec",
    "evaluate_candidates",
    "kendall",
    "model_cost",
    "nas_split",
    "parse_proxies",
    "parse_proxy",
    "plot_scatter",
    "rank_quality",
    "report_markdown",
    "resolve_proxy",
    "run_search",
    "sample_candidates",
    "spearman",
    "truth_set",
]


class NASError(ValueError):
    """Bad search request: unknown proxy kind, a run of another data set, N < 2, ... One line."""


FAMILIES = ("convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18")
PROXY_KINDS = ("gtn", "gtn-steps", "dc", "coreset", "real-subset", "real-steps")


# =============================================================================== search space
@dataclass(frozen=True)
class Candidate:
    """One architecture: ``id`` (10 hex digits of the canonical spec's hash), the zoo
    ``spec``, its ``family``, ``params`` and ``macs`` (multiply-accumulates per image of
    the data set's shape)."""

    id: str
    spec: str
    family: str
    params: int
    macs: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    """The choices :func:`sample_candidates` draws from (a family first, then its options).

    Attributes:
        families: allowed zoo families (subset of :data:`FAMILIES`).
        max_params / max_macs: drop candidates above this parameter count / multiply-
            accumulates per image (``None``: no limit), so a CPU budget stays cheap.
        conv_widths, conv_depths, norms, acts, pools: ConvNet options.
        mlp_widths: MLP hidden widths; big_widths: VGG-11 / ResNet-18 base widths.
    """

    families: tuple[str, ...] = FAMILIES
    max_params: int | None = None
    max_macs: int | None = None
    conv_widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    conv_depths: tuple[int, ...] = (1, 2, 3, 4)
    norms: tuple[str, ...] = NORMS
    acts: tuple[str, ...] = tuple(ACTS)
    pools: tuple[str, ...] = POOLS
    mlp_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    big_widths: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise NASError(f"unknown model famil{'ies' if len(bad) > 1 else 'y'} "
                           f"{', '.join(bad) or '(none)'}; choose from {', '.join(FAMILIES)}")
        for name in ("max_params", "max_macs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise NASError(f"{name} must be >= 1, got {getattr(self, name)}")

    def options(self, family: str) -> dict[str, tuple]:
        """The option grid of ``family`` (keys sorted: the draw order is fixed)."""
        return {"convnet": {"act": self.acts, "depth": self.conv_depths, "norm": self.norms,
                            "pool": self.pools, "width": self.conv_widths},
                "mlp": {"act": self.acts, "width": self.mlp_widths},
                "lenet": {"act": self.acts},
                "alexnet": {"norm": self.norms},
                "vgg11": {"norm": self.norms, "width": self.big_widths},
                "resnet18": {"norm": self.norms, "width": self.big_widths}}[family]


def canonical_spec(spec: str) -> str:
    """``"convnet:width=64,depth=2"`` -> ``"convnet:depth=2,width=64"`` (options sorted)."""
    name, options = parse_model_spec(spec)
    return name + (":" + ",".join(f"{k}={options[k]}" for k in sorted(options)) if options
                   else "")


def _candidate_id(spec: str) -> str:
    return hashlib.blake2b(canonical_spec(spec).encode(), digest_size=5).hexdigest()


@lru_cache(maxsize=4096)
def model_cost(spec: str, channels: int, num_classes: int, im_size: tuple[int, int]
               ) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a zoo model, built on the ``meta``
    device (no memory, no randomness). MACs count convolutions and linear layers only.

    Raises:
        ModelError: the spec does not build for this shape.
    """
    macs = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += output[0].numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    with torch.device("meta"):
        model = build_model(spec, channels, num_classes, tuple(im_size))
        handles = [m.register_forward_hook(count) for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, *im_size))
    for h in handles:
        h.remove()
    return sum(p.numel() for p in model.parameters()), int(macs)


def sample_candidates(n: int, seed: int, info: DatasetInfo | str,
                      space: SearchSpace = SearchSpace(), max_tries: int = 200
                      ) -> list[Candidate]:
    """``n`` distinct candidates drawn from ``space`` for ``info``'s image shape.

    The draw depends on ``seed`` alone (``child_seed(seed, "nas-sample")``): the same seed
    gives the same candidates in the same order. A draw repeating an earlier spec, not
    building for the shape, or over the cost limits is discarded and redrawn.

    Raises:
        NASError: ``n < 2``, or fewer than ``n`` admissible candidates after
            ``max_tries * n`` draws (the limits are too tight for the space).
    """
    if isinstance(info, str):
        info = get_info(info)
    if n < 2:
        raise NASError(f"the number of candidates must be at least 2, got {n}")
    g = make_generator(seed, "nas-sample")
    families = tuple(space.families)
    found: dict[str, Candidate] = {}
    for _ in range(max_tries * n):
        if len(found) == n:
            break
        family = families[int(torch.randint(len(families), (1,), generator=g))]
        options = {k: v[int(torch.randint(len(v), (1,), generator=g))]
                   for k, v in space.options(family).items()}
        spec = canonical_spec(family + (":" + ",".join(f"{k}={v}" for k, v in options.items())
                                        if options else ""))
        if spec in found:
            continue
        try:
            params, macs = model_cost(spec, info.channels, info.num_classes, info.im_size)
        except ModelError:
            continue
        if (space.max_params is not None and params > space.max_params) or \
                (space.max_macs is not None and macs > space.max_macs):
            continue
        found[spec] = Candidate(_candidate_id(spec), spec, family, params, macs)
    if len(found) < n:
        raise NASError(f"found only {len(found)} distinct candidates within the limits "
                       f"(families {', '.join(families)}, max params {space.max_params}, max "
                       f"MACs {space.max_macs}); ask for fewer or relax the limits")
    return list(found.values())


# =============================================================================== budgets
@dataclass(frozen=True)
class NASBudget:
    """How much every student trains (ground truth and proxies) and what the proxies hold.

    Attributes:
        validation: training images held out by :func:`gtn.train.split_validation` (at most a
            fifth of the training set is used); every accuracy is measured on them.
        truth_train: ground truth trains on a fixed random subset of this many of the rest
            (``None``: all of it), for ``truth.epochs`` epochs with ``truth``'s schedule.
        proxy_steps, proxy_batch, proxy_lr: every proxy student takes about ``proxy_steps``
            SGD steps of batch ``min(proxy_batch, set size)`` at constant lr ``proxy_lr``.
        ipc: images per class of the ``real-subset`` and ``coreset`` proxies.
        pool_per_class, signal_model, signal_epochs: the coreset's candidate pool and the
            network that gives selection signals (:class:`selection.SignalConfig`).
        space: the search space (families, cost limits).
        resamples: bootstrap resamples of the confidence intervals.
    """

    name: str
    validation: int
    truth_train: int | None
    truth: TrainConfig
    proxy_steps: int
    proxy_batch: int
    proxy_lr: float
    ipc: int
    pool_per_class: int
    signal_model: str
    signal_epochs: int
    space: SearchSpace = field(default_factory=SearchSpace)
    resamples: int = 1000
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("validation", "proxy_steps", "proxy_batch", "ipc", "pool_per_class",
                     "signal_epochs", "resamples"):
            if getattr(self, name) < 1:
                raise NASError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.truth_train is not None and self.truth_train < 1:
            raise NASError(f"truth_train must be >= 1, got {self.truth_train}")

    def search_space(self, families: str | Sequence[str] | None = None,
                     max_params: int | None = None) -> SearchSpace:
        """The budget's search space, with other families (a comma-separated string or a
        sequence) and/or another parameter limit where given."""
        space = self.space
        if families:
            names = families.split(",") if isinstance(families, str) else families
            space = replace(space, families=tuple(f.strip().lower() for f in names
                                                  if f.strip()))
        if max_params:
            space = replace(space, max_params=max_params)
        return space

    def proxy_train(self, set_size: int) -> TrainConfig:
        """The proxy schedule for a set of ``set_size`` images (about ``proxy_steps`` steps)."""
        batch = min(self.proxy_batch, set_size)
        per_epoch = math.ceil(set_size / batch)
        epochs = max(1, round(self.proxy_steps / per_epoch))
        return TrainConfig(epochs=epochs, lr=self.proxy_lr, batch_size=batch, decay_at=None)


_CHEAP = ("convnet", "mlp", "lenet")
NAS_BUDGETS = {
    "smoke": NASBudget(
        "smoke", validation=500, truth_train=1000,
        truth=TrainConfig(epochs=1, lr=0.01, batch_size=64, decay_at=None),
        proxy_steps=4, proxy_batch=64, proxy_lr=0.01, ipc=2, pool_per_class=20,
        signal_model="convnet:width=8,depth=2", signal_epochs=1,
        space=SearchSpace(families=("convnet", "mlp"), max_params=60_000, max_macs=1_000_000),
        resamples=200, notes="proves the path only; figures mean nothing"),
    "short": NASBudget(
        "short", validation=5000, truth_train=20000,
        truth=TrainConfig(epochs=3, lr=0.01, batch_size=128),
        proxy_steps=52, proxy_batch=128, proxy_lr=0.01, ipc=10, pool_per_class=200,
        signal_model="convnet:width=16,depth=2", signal_epochs=3,
        space=SearchSpace(families=_CHEAP, max_params=250_000, max_macs=6_000_000),
        notes="ConvNet / MLP / LeNet up to 250k parameters and 6M MACs per image; ground truth "
              "3 epochs (471 steps of 128) on 20 000 training images, lr 0.01 (x0.1 after "
              "epoch 1); proxies ~52 steps (9x fewer) at lr 0.01; 5000 held-out training "
              "images for validation"),
    "paper": NASBudget(
        "paper", validation=10000, truth_train=None,
        truth=TrainConfig(epochs=20, lr=0.01, batch_size=128),
        proxy_steps=128, proxy_batch=128, proxy_lr=0.02, ipc=50, pool_per_class=1000,
        signal_model="convnet", signal_epochs=10, space=SearchSpace(),
        notes="every family; ground truth 20 epochs on all remaining training images; "
              "proxies 128 steps; 10 000 validation images (wants a GPU)"),
}


# =============================================================================== data
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
        return _digest(self.images, self.labels)


def _digest(*tensors: torch.Tensor) -> str:
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
    from .train import split_validation

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
    arg = arg.strip() or None
    if kind in ("gtn", "gtn-steps", "dc", "coreset") and arg is None:
        form = {"gtn": "gtn:RUN", "gtn-steps": "gtn-steps:RUN", "dc": "dc:RUN",
                "coreset": "coreset:METHOD"}[kind]
        raise NASError(f"proxy {kind!r} needs an argument: {form}")
    if kind in ("real-subset", "real-steps") and arg is not None:
        raise NASError(f"proxy {kind!r} takes no argument, got {text!r}")
    return ProxySpec(kind, arg)


def parse_proxies(texts: Sequence[str]) -> list[ProxySpec]:
    """:func:`parse_proxy` of every text; a proxy given twice is refused (NASError)."""
    specs = [parse_proxy(t) for t in texts]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise NASError(f"a proxy is given twice: {', '.join(labels)}")
    return specs


def _run_file(arg: str, name: str) -> Path:
    path = Path(arg)
    return path / name if path.is_dir() else path


def resolve_proxy(spec: ProxySpec, dataset: str):
    """Load and check what ``spec`` needs (a generator, a saved set, a selection rule).

    Cheap: call it before any training so a bad proxy is refused before anything is written.

    Raises:
        NASError: a run made for another data set. GeneratorError / StoreError /
            SelectionError: an unreadable run or an unknown selection method.
    """
    want = get_info(dataset).name
    if spec.kind in ("gtn", "gtn-steps"):
        from .train import load_generator

        path = _run_file(spec.arg, "generator.pt")
        teacher, _ = load_generator(path, dataset)
        if teacher.info.name != want:
            raise NASError(f"{path} is a generator of {teacher.info.name}, not of {want}")
        return teacher
    if spec.kind == "dc":
        from distill.store import load_set

        path = _run_file(spec.arg, "set.pt")
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

        return get_method(spec.arg)
    return None


def build_proxy_set(spec: ProxySpec, source, fit: ImageSet, budget: NASBudget, seed: int,
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


# =============================================================================== evaluation
def _fingerprint(ts: TrainSet, val: ImageSet, dataset: str) -> tuple[str, dict]:
    """What a cached accuracy depends on (besides candidate and seed): data set, training
    data, schedule and validation data."""
    fp = {"version": 2, "dataset": dataset, "kind": ts.label, "train": asdict(ts.train),
          "data": ts.digest(), "validation": _digest(val.images, val.labels)}
    if ts.step_lrs is not None:
        fp.update(step_lrs=list(ts.step_lrs), momentum=ts.momentum)
    text = json.dumps(to_jsonable(fp), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest(), fp


def _safe(label: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return keep[:40]


def _cache_path(cache: Path, dataset: str, label: str, fp: str, cand: Candidate, seed: int
                ) -> Path:
    return cache / dataset / f"{_safe(label)}-{fp}" / f"{cand.id}-s{seed}.json"


def _read_cached(path: Path, cand: Candidate, fp: str) -> dict | None:
    """A finished entry, or None when missing, unreadable, partial or for another key."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("spec") != cand.spec or \
            entry.get("fingerprint") != fp:
        return None
    if not all(isinstance(entry.get(k), (int, float))
               for k in ("accuracy", "seconds", "train_seconds", "steps")):
        return None
    return entry


def train_candidate(spec: str, ts: TrainSet, val_x: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, seed: int, cand_id: str) -> dict:
    """Train one fresh candidate on ``ts`` and score it on the validation split.

    The initialisation and batch order come from ``child_seed(seed, "nas", cand_id)`` only.

    Returns:
        ``{"accuracy": % on validation, "seconds": wall time (build, train and score),
        "train_seconds": the training loop's time, "steps": SGD steps, "final_loss"}``.
    """
    start = time.perf_counter()
    g = make_generator(seed, "nas", cand_id)
    c, h, w = ts.images.shape[1:]
    model = build_model(spec, int(c), num_classes, (int(h), int(w)), generator=g)
    model = model.to(ts.images.device)
    if ts.step_lrs is not None:
        train_seconds, steps, final_loss = _few_steps(model, ts)
    else:
        stats = train(model, ts.images, ts.labels, ts.train, g)
        train_seconds, steps, final_loss = stats.seconds, stats.steps, stats.final_loss
    acc = 100.0 * accuracy(model, val_x, val_y)
    return {"accuracy": acc, "seconds": time.perf_counter() - start,
            "train_seconds": train_seconds, "steps": steps, "final_loss": final_loss}


def _few_steps(model: torch.nn.Module, ts: TrainSet) -> tuple[float, int, float]:
    """A GTN's own protocol: batch t (consecutive ``batch_size`` images) at lr ``step_lrs[t]``,
    SGD with the learned momentum. Returns (seconds, steps, last loss)."""
    from distill.inner import load_params, student_steps

    assert ts.step_lrs is not None
    t0 = time.perf_counter()
    b = ts.train.batch_size
    model.train()
    batches = [(ts.images[i * b:(i + 1) * b], ts.labels[i * b:(i + 1) * b])
               for i in range(len(ts.step_lrs))]
    state = student_steps(model, [p.detach() for p in model.parameters()], batches,
                          list(ts.step_lrs), ts.momentum or 0.0)
    load_params(model, state.params)
    return time.perf_counter() - t0, len(ts.step_lrs), float(state.step_losses[-1])


_WORKER: dict = {}


def _worker_init(sets: dict, val_x, val_y, num_classes: int, threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    _WORKER.update(sets=sets, val_x=val_x, val_y=val_y, num_classes=num_classes)


def _worker_job(label: str, spec: str, seed: int, cand_id: str) -> dict:
    w = _WORKER
    return train_candidate(spec, w["sets"][label], w["val_x"], w["val_y"], w["num_classes"],
                           seed, cand_id)


def evaluate_candidates(candidates: Sequence[Candidate], sets: Sequence[TrainSet],
                        val: ImageSet, seed: int, cache: str | os.PathLike | None = None,
                        workers: int = 1, progress: Progress | None = None,
                        log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Accuracy of every candidate trained on every set, reading and filling the cache.

    Args:
        candidates: from :func:`sample_candidates`.
        sets: :class:`TrainSet` per kind (ground truth and proxies), on one device with
            ``val``.
        cache: folder of finished entries (one JSON file per data set / kind fingerprint /
            candidate / seed, written atomically as each finishes). ``None``: no cache.
        workers: processes (spawned; each trains whole candidates on the sets' device with
            ``torch.get_num_threads() // workers`` threads); 1 trains in-process. Results
            equal those of 1 worker when the thread counts match (float reductions may
            otherwise differ in the last bits).

    Returns:
        ``{set label: {candidate id: {"accuracy", "seconds", "steps", "cached", ...}}}``.
    """
    if workers < 1:
        raise NASError(f"workers must be >= 1, got {workers}")
    labels = [ts.label for ts in sets]
    if len(set(labels)) != len(labels):
        raise NASError(f"a proxy is given twice: {', '.join(labels)}")
    dataset = val.info.name
    cache_dir = Path(cache) if cache is not None else None
    results: dict[str, dict] = {ts.label: {} for ts in sets}
    jobs: list[tuple[TrainSet, Candidate, Path | None, str, dict]] = []
    for ts in sets:
        fp, fp_dict = _fingerprint(ts, val, dataset)
        for cand in candidates:
            # folder: the kind (gtn, dc, ...) and the fingerprint, which holds the full label
            path = (_cache_path(cache_dir, dataset, ts.meta.get("kind") or ts.label, fp, cand,
                                seed) if cache_dir else None)
            entry = _read_cached(path, cand, fp) if path is not None else None
            if entry is not None:
                results[ts.label][cand.id] = {**entry, "cached": True}
            else:
                jobs.append((ts, cand, path, fp, fp_dict))
    if jobs:
        log(f"training {len(jobs)} student(s) ({sum(len(r) for r in results.values())} cached)"
            f" with {workers} worker(s)")

    def finish(ts: TrainSet, cand: Candidate, path, fp: str, fp_dict: dict, out: dict) -> None:
        entry = {"id": cand.id, "spec": cand.spec, "kind": ts.label, "seed": seed,
                 "fingerprint": fp, "budget": fp_dict, **out}
        if path is not None:
            atomic_write_json(path, entry)
        results[ts.label][cand.id] = {**entry, "cached": False}
        log(f"{ts.label:<14} {cand.spec:<48} {out['accuracy']:6.2f} %  {out['seconds']:6.1f} s")

    num_classes = val.info.num_classes
    with task(progress, "candidates", len(jobs)) as bar:
        if workers == 1 or len(jobs) <= 1:
            for ts, cand, path, fp, fp_dict in jobs:
                out = train_candidate(cand.spec, ts, val.images, val.labels, num_classes, seed,
                                      cand.id)
                finish(ts, cand, path, fp, fp_dict, out)
                bar.update(1)
        elif jobs:
            import multiprocessing as mp

            threads = max(1, torch.get_num_threads() // workers)
            payload = {ts.label: ts for ts in sets}
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init,
                                     initargs=(payload, val.images, val.labels, num_classes,
                                               threads)) as pool:
                futures = {pool.submit(_worker_job, ts.label, cand.spec, seed, cand.id):
                           (ts, cand, path, fp, fp_dict) for ts, cand, path, fp, fp_dict in jobs}
                for fut in as_completed(futures):
                    finish(*futures[fut], fut.result())
                    bar.update(1)
    return results


# =============================================================================== ranking
def _as_float(values) -> list[float]:
    return [float(v) for v in values]


def _correlation(name: str, x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats

    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan
        warnings.simplefilter("ignore")
        return float(getattr(stats, name)(_as_float(x), _as_float(y)).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties; ``scipy.stats.spearmanr``); nan if constant."""
    return _correlation("spearmanr", x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``); nan if either side is constant."""
    return _correlation("kendalltau", x, y)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], statistic: Callable, seed: int = 0,
                 resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)``, resampling the (x, y) pairs
    (candidates) with replacement from ``child_seed(seed, "bootstrap")``. Resamples whose
    statistic is undefined (all ties) are left out; (nan, nan) when none is defined."""
    import numpy as np

    n = len(x)
    if n < 2:
        return float("nan"), float("nan")
    xs, ys = np.asarray(_as_float(x)), np.asarray(_as_float(y))
    idx = torch.randint(n, (resamples, n), generator=make_generator(seed, "bootstrap")).numpy()
    values = np.array([statistic(xs[i], ys[i]) for i in idx], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


def _top(values: Sequence[float], k: int) -> list[int]:
    """Positions of the ``k`` largest values (ties: the earlier position first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def rank_quality(truth: Sequence[float], proxy: Sequence[float],
                 truth_seconds: float | None = None, proxy_seconds: float | None = None,
                 top_k: int | None = None, seed: int = 0, resamples: int = 1000,
                 truth_wall: float | None = None, proxy_wall: float | None = None) -> dict:
    """How well ``proxy`` (accuracy per candidate) ranks the candidates like ``truth``.

    Returns a dict: ``spearman``, ``kendall`` (with ``*_ci`` 95 % percentile bootstrap
    intervals) over all candidates; ``spearman_top``, ``kendall_top`` (+ CIs) over the top
    half by true accuracy (``n // 2`` candidates, at least 2); ``top_k`` (default
    ``max(1, n // 4)``) and ``top_k_overlap`` (fraction of the proxy's top k in the true top
    k); ``picked`` (true accuracy of the proxy's best candidate, ties: first),
    ``best`` (the best true accuracy); ``speedup`` = truth_seconds / proxy_seconds (training
    time, summed over candidates) and ``speedup_wall`` = truth_wall / proxy_wall (with
    building and scoring each student).
    """
    if len(truth) != len(proxy):
        raise NASError(f"{len(truth)} true accuracies but {len(proxy)} proxy accuracies")
    n = len(truth)
    if n < 2:
        raise NASError(f"rank quality needs at least 2 candidates, got {n}")
    t, p = _as_float(truth), _as_float(proxy)
    k = max(1, n // 4) if top_k is None else max(1, min(int(top_k), n))
    top = sorted(_top(t, max(2, n // 2)))
    tt, pt = [t[i] for i in top], [p[i] for i in top]
    out = {"n": n, "spearman": spearman(t, p), "kendall": kendall(t, p),
           "spearman_ci": bootstrap_ci(t, p, spearman, seed, resamples),
           "kendall_ci": bootstrap_ci(t, p, kendall, seed, resamples),
           "n_top": len(top), "spearman_top": spearman(tt, pt), "kendall_top": kendall(tt, pt),
           "spearman_top_ci": bootstrap_ci(tt, pt, spearman, seed, resamples),
           "kendall_top_ci": bootstrap_ci(tt, pt, kendall, seed, resamples),
           "top_k": k, "top_k_overlap": len(set(_top(t, k)) & set(_top(p, k))) / k,
           "picked": t[_top(p, 1)[0]], "best": max(t)}
    if truth_seconds is not None and proxy_seconds:
        out["speedup"] = float(truth_seconds) / float(proxy_seconds)
    if truth_wall is not None and proxy_wall:
        out["speedup_wall"] = float(truth_wall) / float(proxy_wall)
    return out


# =============================================================================== the search
def run_search(train_set: ImageSet, proxies: Sequence[tuple[ProxySpec, object]],
               budget: NASBudget, n_candidates: int, seed: int = 0,
               cache: str | os.PathLike | None = None, workers: int = 1,
               device: torch.device | str = "cpu", space: SearchSpace | None = None,
               top_k: int | None = None, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Sample candidates, compute the ground truth and every proxy, compare the rankings.

    Args:
        train_set: the real training split (validation is held out of it here).
        proxies: ``(spec, source)`` pairs from :func:`parse_proxy` / :func:`resolve_proxy`.
        space: overrides ``budget.space``.

    Returns:
        The report: budget, candidates (with true and proxy accuracies and seconds), one
        :func:`rank_quality` dict per proxy (plus set size, steps and setup seconds), and
        the winner (highest top-half Spearman, then all-candidate Spearman).
    """
    device = torch.device(device)
    space = space or budget.space
    candidates = sample_candidates(n_candidates, seed, train_set.info, space)
    fit, val = nas_split(train_set, budget)
    fit, val = fit.to(device), val.to(device)
    sets = [truth_set(fit, budget)]
    for spec, source in proxies:
        log(f"building the {spec.label} proxy set")
        sets.append(build_proxy_set(spec, source, fit, budget, seed, device, progress))
    results = evaluate_candidates(candidates, sets, val, seed, cache, workers, progress, log)
    truth = results["truth"]
    t_acc = [truth[c.id]["accuracy"] for c in candidates]
    t_sec = sum(truth[c.id]["train_seconds"] for c in candidates)
    t_wall = sum(truth[c.id]["seconds"] for c in candidates)
    report: dict = {
        "dataset": train_set.info.name, "budget": to_jsonable(asdict(budget)),
        "seed": seed, "workers": workers, "device": str(device),
        "threads": torch.get_num_threads(), "validation": len(val),
        "truth": {"size": sets[0].meta["size"], "train": asdict(budget.truth),
                  "steps": truth[candidates[0].id]["steps"], "seconds": t_sec,
                  "wall_seconds": t_wall},
        "candidates": [], "proxies": {}}
    for i, c in enumerate(candidates):
        row = {**c.as_dict(), "truth": t_acc[i],
               "truth_seconds": truth[c.id]["train_seconds"], "proxies": {}}
        for ts in sets[1:]:
            r = results[ts.label][c.id]
            row["proxies"][ts.label] = {"accuracy": r["accuracy"],
                                        "seconds": r["train_seconds"]}
        report["candidates"].append(row)
    for ts in sets[1:]:
        res = results[ts.label]
        p_acc = [res[c.id]["accuracy"] for c in candidates]
        p_sec = sum(res[c.id]["train_seconds"] for c in candidates)
        p_wall = sum(res[c.id]["seconds"] for c in candidates)
        q = rank_quality(t_acc, p_acc, t_sec, p_sec, top_k, seed, budget.resamples, t_wall,
                         p_wall)
        q.update(label=ts.label, kind=ts.meta["kind"], size=ts.meta["size"],
                 steps=res[candidates[0].id]["steps"], seconds=p_sec, wall_seconds=p_wall,
                 setup_seconds=ts.setup_seconds, train=asdict(ts.train), meta=ts.meta)
        report["proxies"][ts.label] = q
    if report["proxies"]:
        def score(q: dict) -> tuple[float, float]:
            return tuple(v if math.isfinite(v) else -2.0
                         for v in (q["spearman_top"], q["spearman"]))

        report["winner"] = max(report["proxies"], key=lambda k: score(report["proxies"][k]))
    return report


def _ci(value: float, ci) -> str:
    if not math.isfinite(value):
        return "—"
    lo, hi = ci
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{value:.2f}"


def report_markdown(report: dict) -> str:
    """The report as Markdown: the budget, one row per proxy, and the winner."""
    b = report["budget"]
    t = report["truth"]
    n = len(report["candidates"])
    lines = [
        (f"Architecture-search proxies on {report['dataset']}, budget `{b['name']}`"
         + (f" ({b['notes']})" if b.get("notes") else "") + "."),
        "",
        (f"{n} candidates; ground truth: {t['steps']} steps (batch {t['train']['batch_size']}, "
         f"{t['train']['epochs']} epoch(s) on {t['size']} training images), "
         f"{t['seconds']:.0f} s of training in all; every accuracy is on "
         f"{report['validation']} held-out training images (not the test set). Spearman / "
         f"Kendall tau-b with 95 % bootstrap intervals ({b['resamples']} resamples of the "
         f"candidates); top half = the "
         f"{max(2, n // 2)} best by true accuracy."),
        "",
        ("| proxy | images | steps | Spearman (all) | Spearman (top half) | Kendall (all) | "
         "Kendall (top half) | top-k overlap | picked acc. (%) | speed-up (train / wall) |"),
        "|---|---|---|---|---|---|---|---|---|---|"]
    for label, q in report["proxies"].items():
        lines.append(
            f"| {label} | {q['size']} | {q['steps']} | {_ci(q['spearman'], q['spearman_ci'])} "
            f"| {_ci(q['spearman_top'], q['spearman_top_ci'])} | "
            f"{_ci(q['kendall'], q['kendall_ci'])} | {_ci(q['kendall_top'], q['kendall_top_ci'])}"
            f" | {q['top_k_overlap']:.2f} (k={q['top_k']}) | {q['picked']:.2f} | "
            f"{q.get('speedup', math.nan):.1f}x / {q.get('speedup_wall', math.nan):.1f}x |")
    if report["proxies"]:
        best = max(c["truth"] for c in report["candidates"])
        lines += ["", (f"Best possible pick: {best:.2f} %. Winner (highest top-half "
                       f"Spearman): **{report['winner']}**. Published GTN proxy (Such et al., "
                       f"ICML 2020): Spearman 0.56 on the top half at ~9x fewer steps."),
                  "", ("Speed-up = ground-truth seconds / proxy seconds summed over the "
                       "candidates: of the training loops, and wall time with building and "
                       "scoring each student (building a proxy set is not included: see "
                       "setup_seconds in the JSON).")]
    return "\n".join(lines) + "\n"


def plot_scatter(report: dict, path: str | os.PathLike) -> bool:
    """Proxy vs true accuracy, one panel per proxy, as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(report["proxies"])
    if not labels:
        return False
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    truth = [c["truth"] for c in report["candidates"]]
    for ax, label in zip(axes.flat, labels):
        q = report["proxies"][label]
        ax.scatter([c["proxies"][label]["accuracy"] for c in report["candidates"]], truth, s=14)
        ax.set(xlabel=f"{label} accuracy (%)", ylabel="true accuracy (%)",
               title=f"{label}\nSpearman {q['spearman']:.2f}, top half {q['spearman_top']:.2f}")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return True
