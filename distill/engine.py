"""The one training/evaluation loop, and the DC evaluation protocol built on it.

Everything in gtnkit that trains a student goes through :func:`train`: evaluating a coreset or a
distilled set, training the feature network that selection signals come from, and (later)
architecture search. Extra behaviour is added with hooks (:class:`TrainHook`), never by copying
the loop.

The evaluation protocol is the one of Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient
Matching", ICLR 2021 (and DSA / DM after it), so figures compare with the papers: a fresh
student, SGD with lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half of the
epochs, 300 epochs (1000 with augmentation), repeated over several student seeds; mean ± std of
test accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, NonFiniteError
from .progress import Progress, task
from .rng import generator as make_generator

__all__ = [
    "TrainConfig",
    "TrainHook",
    "TrainStats",
    "EvalProtocol",
    "EvalResult",
    "train",
    "accuracy",
    "predict",
    "evaluate_set",
    "mean_std",
    "classification_loss",
]


@dataclass(frozen=True)
class TrainConfig:
    """How a student is trained (defaults: the DC evaluation protocol).

    Attributes:
        epochs: passes over the training set.
        lr, momentum, weight_decay: SGD hyper-parameters.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        decay_at: fraction of ``epochs`` after which the lr is multiplied by 0.1 (DC: 0.5);
            ``None`` keeps it constant.
        augment: apply differentiable DSA augmentation (per-sample parameters, DSA's six ops)
            to every batch.
        augmentation: a named per-image augmentation instead, ``dsa:<ops>`` or ``dc:<ops>``
            (:func:`distill.augment.make_train_augment`); ``""`` defers to ``augment``.
    """

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    decay_at: float | None = 0.5
    augment: bool = False
    augmentation: str = ""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got "
                              f"{self.weight_decay}")


class TrainHook(Protocol):
    """Observes training. Both methods are optional; implement the ones you need."""

    def on_batch(self, epoch: int, indices: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        """After the forward pass of a batch (before the update).

        Args:
            indices: (B,) int64 CPU positions of the batch in the training tensors.
            logits: (B, classes) detached logits. labels: (B,) labels (device of the data).
        """

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After epoch ``epoch`` (0-based) has finished."""

    def on_epoch_state(self, epoch: int, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
        """After every hook's ``on_epoch_end``: the point to checkpoint a resumable run
        (model and optimizer state; the caller owns the generator)."""


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float
    final_loss: float


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for hard (B,) int64 targets or soft (B, K) probability targets."""
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    return F.cross_entropy(logits, targets)


def _call(hook: object, name: str, *args: object) -> None:
    fn = getattr(hook, name, None)
    if fn is not None:
        fn(*args)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    hooks: Sequence[object] = (),
    progress: Progress | None = None,
    description: str = "train",
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
) -> TrainStats:
    """Train ``model`` in place with SGD on ``(images, labels)``.

    Args:
        model: on the device of ``images``.
        images: (N, C, H, W) float; labels: (N,) int64, same device. Labels may also be
            (N, classes) soft targets (probabilities), trained with soft cross-entropy.
        generator: CPU generator; the only randomness (batch order, augmentation).
        hooks: objects with optional ``on_batch`` / ``on_epoch_end`` / ``on_epoch_state``
            (:class:`TrainHook`).
        start_epoch, optimizer_state: resume a run checkpointed by ``on_epoch_state`` after
            epoch ``start_epoch - 1``: the model already holds its weights, ``generator`` its
            state, and the optimizer (momentum, decayed lr) is restored from ``optimizer_state``.

    Returns:
        :class:`TrainStats` (number of SGD steps, wall seconds, loss of the last batch).
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty set")
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    decay_epoch = int(config.epochs * config.decay_at) if config.decay_at is not None else -1
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    if config.augmentation:
        from .augment import make_train_augment  # only when asked for

        augment = make_train_augment(config.augmentation)
    elif config.augment:
        from .augment import AugmentConfig, DiffAugment

        augment = DiffAugment(AugmentConfig(per_sample=True))
    model.train()
    steps, loss_value, start = 0, float("nan"), time.perf_counter()
    batches_per_epoch = math.ceil(n / config.batch_size)
    with task(progress, description, (config.epochs - start_epoch) * batches_per_epoch) as bar:
        for epoch in range(start_epoch, config.epochs):
            if epoch == decay_epoch and epoch > 0:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            order = torch.randperm(n, generator=generator)
            for start_i in range(0, n, config.batch_size):
                idx = order[start_i:start_i + config.batch_size]
                idx_dev = idx.to(images.device)
                x, y = images[idx_dev], labels[idx_dev]
                if augment is not None:
                    x = augment(x, generator)
                logits = model(x)
                loss = classification_loss(logits, y)
                for hook in hooks:
                    _call(hook, "on_batch", epoch, idx, logits.detach(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                loss_value = float(loss.detach())
                bar.update(1)
            for hook in hooks:
                _call(hook, "on_epoch_end", epoch, model)
            for hook in hooks:
                _call(hook, "on_epoch_state", epoch, model, opt)
    return TrainStats(steps=steps, seconds=time.perf_counter() - start, final_loss=loss_value)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024,
            embed: bool = False) -> torch.Tensor:
    """Logits (N, classes), or ``model.embed`` features (N, D) when ``embed``, in eval mode."""
    was_training = model.training
    model.eval()
    fn = cast(Callable[[torch.Tensor], torch.Tensor], model.embed if embed else model)
    out = torch.cat([fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)`` in [0, 1]."""
    logits = predict(model, images, batch_size)
    return float((logits.argmax(1) == labels).float().mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0, as the DC/DSA/DM papers report)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0


@dataclass(frozen=True)
class EvalProtocol:
    """How a small training set is scored: ``n_students`` fresh students of ``model``.

    ``test_limit`` scores on a fixed subset of the test set (the same for every run with the
    same limit) to make cheap budgets cheaper; ``None`` uses the whole test set.
    """

    model: str = "convnet"
    n_students: int = 5
    train: TrainConfig = field(default_factory=TrainConfig)
    test_limit: int | None = None
    name: str = ""  # the named protocol it follows (distill.protocols), "" when hand-made

    @classmethod
    def dc(cls, model: str = "convnet", n_students: int = 5, augment: bool = False,
           **overrides: Any) -> EvalProtocol:
        """The DC protocol: 300 epochs, or 1000 with augmentation."""
        train_cfg = TrainConfig(epochs=1000 if augment else 300, augment=augment)
        if overrides:
            train_cfg = replace(train_cfg, **overrides)
        return cls(model=model, n_students=n_students, train=train_cfg)


@dataclass(frozen=True)
class EvalResult:
    model: str
    accuracies: tuple[float, ...]
    mean: float
    std: float
    seconds: float
    train_size: int

    def as_dict(self) -> dict:
        return {"model": self.model, "accuracies": list(self.accuracies), "mean": self.mean,
                "std": self.std, "seconds": self.seconds, "train_size": self.train_size}


def fixed_test_subset(n: int, limit: int | None) -> torch.Tensor | None:
    """Fixed positions of a ``limit``-sized test subset (independent of every user seed)."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=make_generator(0, "test-subset"))[:limit].sort().values


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    protocol: EvalProtocol,
    seed: int,
    num_classes: int | None = None,
    progress: Progress | None = None,
    done: Sequence[float] = (),
    on_student: Callable[[int, float], None] | None = None,
) -> EvalResult:
    """Train ``protocol.n_students`` fresh students on a set and score each on the test data.

    Args:
        images: (N, C, H, W) training images (normalised); labels: (N,) int64 or (N, K) soft.
        test_images / test_labels: the real test set, on the same device as ``images``.
        seed: student ``i`` is initialised and trained from ``child_seed(seed, "student", i)``.
        num_classes: classifier size; defaults to the soft-label width or ``max(test label)+1``.
        done: accuracies of students ``0..len(done)-1`` from an interrupted run; they are kept
            and not retrained (student seeds do not depend on order, so the result equals an
            uninterrupted run's).
        on_student: called with ``(i, accuracy)`` after each student, e.g. to checkpoint.

    Returns:
        :class:`EvalResult` with every student's accuracy (in %), their mean and std.
    """
    from .models import build_model  # the zoo

    device = images.device
    for what, tensor in (("training images", images), ("labels", labels),
                         ("test images", test_images)):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"the {what} hold {bad} non-finite value(s) (NaN or inf); "
                                 f"no student is trained on them")
    subset = fixed_test_subset(test_images.shape[0], protocol.test_limit)
    if subset is not None:
        subset = subset.to(test_images.device)
        test_images, test_labels = test_images[subset], test_labels[subset]
    channels, height, width = images.shape[1:]
    if num_classes is None:
        num_classes = int(labels.shape[1]) if labels.dim() == 2 else int(test_labels.max()) + 1
    accs: list[float] = [float(a) for a in done][:protocol.n_students]
    start = time.perf_counter()
    for i in range(len(accs), protocol.n_students):
        g = make_generator(seed, "student", i)
        model = build_model(protocol.model, channels, num_classes, (height, width),
                            generator=g).to(device)
        train(model, images, labels, protocol.train, g, progress=progress,
              description=f"student {i + 1}/{protocol.n_students}")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteError(
                f"student {i + 1} ended with non-finite weights (training diverged at lr "
                f"{protocol.train.lr}); no score is reported: try a smaller --lr")
        accs.append(100.0 * accuracy(model, test_images, test_labels))
        if on_student is not None:
            on_student(i, accs[-1])
    mean, std = mean_std(accs)
    return EvalResult(model=protocol.model, accuracies=tuple(accs), mean=mean, std=std,
                      seconds=time.perf_counter() - start, train_size=int(images.shape[0]))
