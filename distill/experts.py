"""Expert trajectories: students trained on real data, their parameters kept after every epoch.

Trajectory matching (MTT: Cazenavette, Wang, Torralba, Efros & Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022) asks a student trained on the synthetic set to
reach, from an expert's parameters at epoch t, the expert's parameters at epoch t + M. The
experts come first: N students trained on the whole real training set with the schedule of
the paper's ``buffer.py`` (:class:`ExpertConfig`'s defaults: the DC ConvNet, SGD lr 0.01
without momentum or weight decay, batch 256, no lr decay, DSA augmentation of the training
batches, 50 epochs), their parameters saved after every epoch.

Files: one per expert, ``expert_0000.pt``, ``expert_0001.pt``, ... in the output folder, each a
``torch.save`` dict (read with ``weights_only``: tensors and plain metadata, no code)::

    format      "gtnkit.expert"
    version     1
    meta        JSON: data set, ExpertConfig, seed, index (a resumed file must match it)
    epochs      E_done + 1 lists of tensors: the parameters (``model.parameters()`` order,
                float, CPU) at initialisation and after each finished epoch
    complete    whether all ``config.epochs`` epochs are done
    generator   the training generator's state after the last finished epoch
    optimizer   the SGD optimiser's state dict then (momentum buffers, when used)

Every epoch rewrites its expert's file atomically (:func:`distill.store.atomic_write_bytes`),
so a run killed at any time leaves each file at its last finished epoch, and
:func:`train_expert` resumes from there: the same batches, augmentations and parameters as an
uninterrupted run (the files end byte-identical; a test checks it). Expert ``i`` draws its
initialisation and its training randomness from ``generator(seed, "expert", i)`` streams, so
experts are independent work items: any subset can be trained in any order or in parallel.

:class:`ExpertBuffer` reads a folder of finished experts lazily (memory-mapped) for the
``trajectory`` strategy (:mod:`distill.trajectory`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .augment import DEFAULT_STRATEGY, digit_strategy
from .data import ImageSet
from .engine import TrainConfig, train
from .inner import load_params
from .models import build_model, parse_model_spec
from .progress import Progress
from .rng import generator as make_generator
from .store import StoreError, atomic_write_bytes, read_tagged, to_jsonable

__all__ = ["EXPERT_FORMAT", "ExpertConfig", "ExpertError", "ExpertBuffer", "expert_config_for",
           "expert_path",
           "train_expert", "train_experts", "train_trajectory"]

log = logging.getLogger("gtnkit")

EXPERT_FORMAT = "gtnkit.expert"

Params = list[torch.Tensor]


class ExpertError(StoreError):
    """A bad expert option, or an expert file that cannot be used (one line)."""


@dataclass(frozen=True)
class ExpertConfig:
    """How the experts are trained (defaults: MTT's ``buffer.py``).

    Attributes:
        model: the zoo spec of the expert (and of the students matched to it).
        epochs: training epochs E (the paper: 50); E + 1 parameter snapshots are kept.
        lr, momentum, weight_decay, batch_size: SGD on the real data (0.01, 0, 0, 256).
        augment: DSA ops applied to every training batch, parameters per image ("": none;
            :func:`expert_config_for` drops ``flip`` on digits, as DSA does).
    """

    model: str = "convnet"
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    augment: str = DEFAULT_STRATEGY

    def __post_init__(self) -> None:
        parse_model_spec(self.model)
        if self.epochs < 1 or self.batch_size < 1:
            raise ExpertError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                              f"{self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ExpertError(f"need lr > 0, 0 <= momentum < 1 and weight_decay >= 0, got "
                              f"{self.lr}, {self.momentum}, {self.weight_decay}")

    def train_config(self) -> TrainConfig:
        """The one training loop's settings (:func:`distill.engine.train`)."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, batch_size=self.batch_size,
                           decay_at=None,
                           augmentation=f"dsa:{self.augment}" if self.augment else "")


def expert_config_for(dataset: str, **options: object) -> ExpertConfig:
    """:class:`ExpertConfig` for ``dataset`` (DSA without ``flip`` on digits) and ``options``."""
    augment = str(options.pop("augment", DEFAULT_STRATEGY))
    return ExpertConfig(augment=digit_strategy(augment, dataset) if augment else "",
                        **options)  # type: ignore[arg-type]


def expert_path(folder: str | Path, index: int) -> Path:
    """The file of expert ``index`` in ``folder``."""
    return Path(folder) / f"expert_{index:04d}.pt"


def _snapshot(model: nn.Module) -> Params:
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


class _Recorder:
    """An engine hook: after every epoch, append the parameters and (``path``) rewrite the
    expert's file with them and the state a resume needs."""

    def __init__(self, epochs: list[Params], total: int, generator: torch.Generator,
                 path: Path | None = None, meta: str = "") -> None:
        self.epochs, self.total, self.generator = epochs, total, generator
        self.path, self.meta = path, meta

    def on_epoch_state(self, epoch: int, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
        self.epochs.append(_snapshot(model))
        if self.path is None:
            return
        buf = io.BytesIO()
        torch.save({"format": EXPERT_FORMAT, "version": 1, "meta": self.meta,
                    "epochs": self.epochs, "complete": epoch + 1 == self.total,
                    "generator": self.generator.get_state(),
                    "optimizer": optimizer.state_dict()}, buf)
        atomic_write_bytes(self.path, buf.getvalue())


def train_trajectory(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     config: ExpertConfig, generator: torch.Generator,
                     progress: Progress | None = None) -> list[Params]:
    """Train ``model`` in place (the one training loop) and return its E + 1 parameter
    snapshots (CPU), without writing anything: in-memory experts."""
    epochs = [_snapshot(model)]
    train(model, images, labels, config.train_config(), generator,
          hooks=[_Recorder(epochs, config.epochs, generator)], progress=progress,
          description="expert")
    return epochs


def train_expert(train_set: ImageSet, folder: str | Path, index: int, config: ExpertConfig,
                 seed: int = 0, device: torch.device | str = "cpu",
                 progress: Progress | None = None) -> Path:
    """Train expert ``index`` into ``folder`` (resuming its file if one is there).

    Returns:
        The expert's file (:func:`expert_path`), complete.

    Raises:
        ExpertError: the file there was written with other options, seed or data set, or is
            not an expert file.
    """
    info = train_set.info
    path = expert_path(folder, index)
    meta = json.dumps(to_jsonable({"dataset": info.name, "config": asdict(config), "seed": seed,
                                   "index": index}), sort_keys=True)
    device = torch.device(device)
    model = build_model(config.model, info.channels, info.num_classes, info.im_size,
                        generator=make_generator(seed, "expert-init", index)).to(device)
    gen = make_generator(seed, "expert", index)
    epochs = [_snapshot(model)]
    start, optimizer_state = 0, None
    if path.exists():
        obj = read_tagged(path, EXPERT_FORMAT, "gtnkit expert", ExpertError)
        if obj.get("meta") != meta:
            raise ExpertError(f"{path} was trained with other options, seed or data set; use "
                              f"another folder or the same options")
        if obj["complete"]:
            return path
        epochs = [list(e) for e in obj["epochs"]]
        load_params(model, [t.to(device) for t in epochs[-1]])
        gen.set_state(obj["generator"])
        optimizer_state, start = obj["optimizer"], len(epochs) - 1
        log.info("expert %d: resuming after epoch %d of %d", index, start, config.epochs)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    train(model, images, labels, config.train_config(), gen,
          hooks=[_Recorder(epochs, config.epochs, gen, path, meta)], progress=progress,
          description=f"expert {index}", start_epoch=start, optimizer_state=optimizer_state)
    return path


def train_experts(train_set: ImageSet, folder: str | Path, experts: int, config: ExpertConfig,
                  seed: int = 0, device: torch.device | str = "cpu",
                  progress: Progress | None = None,
                  indices: Sequence[int] | None = None) -> list[Path]:
    """Train experts ``0 .. experts-1`` (or ``indices``) one after the other, each resumed
    where its file stopped; finished ones are skipped. Each is an independent work item
    (:func:`train_expert`), for an executor to spread."""
    if experts < 1:
        raise ExpertError(f"experts must be >= 1, got {experts}")
    return [train_expert(train_set, folder, i, config, seed, device, progress)
            for i in (range(experts) if indices is None else indices)]


class ExpertBuffer:
    """Expert trajectories to match: finished expert files of a folder (read lazily,
    memory-mapped, so only the two epochs a meta-iteration uses are read) or in-memory ones.

    Attributes:
        epochs: E, the epochs every expert of the buffer has (the shortest one's).
    """

    def __init__(self, trajectories: Sequence[Sequence[Params]] | None = None,
                 files: Sequence[Path] = ()) -> None:
        self._memory = [list(t) for t in trajectories or []]
        self._files = list(files)
        self._open: dict[int, list] = {}
        if not self._memory and not self._files:
            raise ExpertError("an expert buffer needs at least one expert")
        lengths = [len(t) for t in self._memory] + [len(self._load(i)) for i in
                                                      range(len(self._files))]
        self.epochs = min(lengths) - 1

    @classmethod
    def from_folder(cls, folder: str | Path) -> ExpertBuffer:
        """The complete experts of ``folder`` (``expert_*.pt``); unfinished ones are skipped.

        Raises:
            ExpertError: no complete expert there (one line naming the folder).
        """
        folder = Path(folder)
        files, unfinished = [], 0
        for path in sorted(folder.glob("expert_*.pt")):
            obj = read_tagged(path, EXPERT_FORMAT, "gtnkit expert", ExpertError)
            if obj.get("complete"):
                files.append(path)
            else:
                unfinished += 1
        if not files:
            raise ExpertError(f"no finished expert in {folder} ({unfinished} unfinished); "
                              f"train them first (gtnkit experts)")
        if unfinished:
            log.warning("%s: %d unfinished experts left out", folder, unfinished)
        return cls(files=files)

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def _load(self, i: int) -> list:
        if i not in self._open:
            obj = torch.load(self._files[i], map_location="cpu", weights_only=True, mmap=True)
            self._open[i] = obj["epochs"]
        return self._open[i]

    def epoch(self, expert: int, epoch: int) -> Params:
        """The parameters of ``expert`` after ``epoch`` epochs (0: its initialisation)."""
        if not 0 <= epoch <= self.epochs:
            raise ExpertError(f"epoch {epoch} is outside the experts' 0..{self.epochs}")
        if expert < len(self._memory):
            return self._memory[expert][epoch]
        return list(self._load(expert - len(self._memory))[epoch])
