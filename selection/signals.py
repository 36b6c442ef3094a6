"""What selection rules look at: pixels, embeddings and per-example training signals.

Most coreset rules need something learned about the data. Following the DC paper's baselines,
herding / k-center / k-means / DBSCAN work in the feature space of a ConvNet trained on the
data; forgetting, EL2N / GraNd and entropy are per-example signals recorded while (or after)
training that same network. One training run, through the library's single training loop with
hooks, yields all of them, so asking for several signals costs one training run:

* forgetting events (Toneva et al., "An Empirical Study of Example Forgetting during Deep
  Neural Network Learning", ICLR 2019): transitions from correct to wrong between consecutive
  presentations of an example in its mini-batch; never-learned examples count as +inf;
* EL2N and GraNd (Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021):
  the L2 norm of (softmax − one-hot) and of the per-example loss gradient, measured after
  ``early_epoch`` epochs, averaged over ``n_inits`` independent networks;
* entropy (uncertainty; Coleman et al., "Selection via Proxy", ICLR 2020) and embeddings of the
  fully trained network.

Signals are computed on a *pool*: the whole training set, or ``pool_per_class`` random members
of each class when a cheap budget asks for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.engine import TrainConfig, predict, train
from distill.models import build_model
from distill.progress import Progress
from distill.rng import generator as make_generator

from .base import SIGNALS, SelectionError

__all__ = ["SignalConfig", "SignalProvider"]


@dataclass(frozen=True)
class SignalConfig:
    """The network whose training yields the learned signals.

    Attributes:
        model: zoo spec of the feature network (DC: ConvNet).
        train: its training schedule (on the pool).
        early_epoch: EL2N / GraNd are measured after this many epochs (Paul et al. score at
            ~10% of training); clipped to ``train.epochs``.
        n_inits: independent networks averaged for EL2N / GraNd (Paul et al. use 10).
        pool_per_class: restrict the candidates to this many random members per class.
        grand_chunk: examples per vectorised per-example-gradient call (memory bound).
    """

    model: str = "convnet"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, decay_at=None))
    early_epoch: int = 1
    n_inits: int = 1
    pool_per_class: int | None = None
    grand_chunk: int = 128

    def __post_init__(self) -> None:
        if self.early_epoch < 1:
            raise SelectionError(f"early_epoch must be >= 1, got {self.early_epoch}")
        if self.n_inits < 1:
            raise SelectionError(f"n_inits must be >= 1, got {self.n_inits}")
        if self.pool_per_class is not None and self.pool_per_class < 1:
            raise SelectionError(f"pool_per_class must be >= 1, got {self.pool_per_class}")

    @classmethod
    def of(cls, model: str = "convnet", epochs: int = 10,
           pool_per_class: int | None = None) -> SignalConfig:
        """The default config with this feature network, its epochs and candidate pool."""
        base = cls()
        return cls(model=model, pool_per_class=pool_per_class,
                   train=replace(base.train, epochs=epochs))


class _ForgettingTracker:
    """Counts correct→wrong transitions per example across its mini-batch presentations."""

    def __init__(self, n: int) -> None:
        self.last_correct = torch.zeros(n, dtype=torch.bool)
        self.ever_correct = torch.zeros(n, dtype=torch.bool)
        self.forgets = torch.zeros(n, dtype=torch.float32)

    def on_batch(self, epoch: int, indices: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        correct = (logits.argmax(1) == labels).cpu()
        self.forgets[indices] += (self.last_correct[indices] & ~correct).float()
        self.last_correct[indices] = correct
        self.ever_correct[indices] |= correct

    def counts(self) -> torch.Tensor:
        out = self.forgets.clone()
        out[~self.ever_correct] = float("inf")
        return out


class _EarlyScores:
    """Records EL2N (and GraNd when asked) once, at the end of epoch ``epoch``."""

    def __init__(self, epoch: int, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 grand: bool, chunk: int) -> None:
        self.epoch, self.images, self.labels = epoch, images, labels
        self.num_classes, self.grand, self.chunk = num_classes, grand, chunk
        self.el2n: torch.Tensor | None = None
        self.grand_scores: torch.Tensor | None = None

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if epoch + 1 != self.epoch:
            return
        probs = F.softmax(predict(model, self.images), dim=1)
        onehot = F.one_hot(self.labels, self.num_classes).to(probs.dtype)
        self.el2n = (probs - onehot).norm(dim=1).cpu()
        if self.grand:
            self.grand_scores = per_example_grad_norm(model, self.images, self.labels, self.chunk)


def per_example_grad_norm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          chunk: int = 128) -> torch.Tensor:
    """‖∇_θ ℓ(x_i, y_i)‖₂ for every example, vectorised with ``torch.func`` (eval mode).

    Returns (N,) float32 on CPU. Requires a model without batch statistics (BatchNorm in eval
    mode is fine: it uses running statistics).
    """
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    norms = []
    for i in range(0, images.shape[0], chunk):
        grads = per_example(params, images[i:i + chunk], labels[i:i + chunk])
        sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        norms.append(sq.sqrt().cpu())
    model.train(was_training)
    return torch.cat(norms)


class SignalProvider:
    """Computes signals on demand on a pool of a data set and caches them.

    Args:
        dataset: an ``ImageSet`` (``images``, ``labels``, ``info``, ``class_indices``).
        config: :class:`SignalConfig`.
        seed: seeds the pool draw and the feature networks (same seed, same signals).
        device: where the feature network trains (the data set is moved there as needed).
    """

    def __init__(self, dataset: Any, config: SignalConfig = SignalConfig(), seed: int = 0,
                 device: torch.device | str = "cpu", progress: Progress | None = None) -> None:
        self.dataset, self.config, self.seed = dataset, config, int(seed)
        self.device = torch.device(device)
        self.progress = progress
        self.pool = self._draw_pool()
        self.pool_labels = dataset.labels[self.pool].cpu()
        self._cache: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def _draw_pool(self) -> torch.Tensor:
        per_class = self.config.pool_per_class
        parts = []
        for c in range(self.dataset.info.num_classes):
            members = self.dataset.class_indices(c).cpu()
            if per_class is not None and members.numel() > per_class:
                g = make_generator(self.seed, "pool", c)
                members = members[torch.randperm(members.numel(), generator=g)[:per_class]]
                members = members.sort().values
            parts.append(members)
        return torch.cat(parts)

    def class_positions(self, c: int) -> torch.Tensor:
        """Positions (into the pool) of the pool's members of class ``c``, increasing."""
        return torch.nonzero(self.pool_labels == c).flatten()

    def get(self, signal: str) -> torch.Tensor:
        """The signal for every pool member: (P, d) features or (P,) scores, float32 CPU."""
        if signal not in SIGNALS:
            raise SelectionError(f"unknown signal {signal!r}; valid: {', '.join(SIGNALS)}")
        if signal not in self._cache:
            if signal == "none":
                self._cache[signal] = torch.zeros(self.pool.numel())
            elif signal == "pixels":
                self._cache[signal] = self.dataset.images[self.pool].flatten(1).float().cpu()
            else:
                self._train_signals(want_grand=(signal == "grand"))
        return self._cache[signal]

    def _pool_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.pool.to(self.dataset.images.device)
        return (self.dataset.images[idx].to(self.device),
                self.dataset.labels[idx].to(self.device))

    def _train_signals(self, want_grand: bool) -> None:
        """One training run per init; fills every learned signal (and GraNd if asked)."""
        cfg, info = self.config, self.dataset.info
        images, labels = self._pool_tensors()
        early = min(cfg.early_epoch, cfg.train.epochs)
        el2n: list[torch.Tensor] = []
        grand: list[torch.Tensor] = []
        start = time.perf_counter()
        for init in range(cfg.n_inits):
            g = make_generator(self.seed, "signal-net", init)
            model = build_model(cfg.model, info.channels, info.num_classes, info.im_size,
                                generator=g).to(self.device)
            early_hook = _EarlyScores(early, images, labels, info.num_classes, want_grand,
                                      cfg.grand_chunk)
            hooks: list[object] = [early_hook]
            tracker = _ForgettingTracker(images.shape[0]) if init == 0 else None
            if tracker is not None:
                hooks.append(tracker)
            # Only the first network is trained to the end: it gives forgetting, embedding
            # and entropy; the others stop once their early scores are taken.
            train_cfg = cfg.train if init == 0 else replace(cfg.train, epochs=early)
            train(model, images, labels, train_cfg, g, hooks=hooks, progress=self.progress,
                  description=f"signal network {init + 1}/{cfg.n_inits}")
            assert early_hook.el2n is not None  # taken at the end of its epoch
            el2n.append(early_hook.el2n)
            if want_grand:
                assert early_hook.grand_scores is not None
                grand.append(early_hook.grand_scores)
            if tracker is not None:  # the first network
                self._cache["forgetting"] = tracker.counts()
                self._cache["embedding"] = predict(model, images, embed=True).float().cpu()
                probs = F.softmax(predict(model, images), dim=1).double()
                ent = -(probs * probs.clamp_min(1e-30).log()).sum(1)
                self._cache["entropy"] = ent.float().cpu()
                self.model = model
        self._cache["el2n"] = torch.stack(el2n).mean(0)
        if want_grand:
            self._cache["grand"] = torch.stack(grand).mean(0)
        self.seconds["train_signals"] = self.seconds.get("train_signals", 0.0) + (
            time.perf_counter() - start)

