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

Given a cache root, the signals are stored on disk under a fingerprint of (data, network,
schedule, seed) and reused by every later provider with the same fingerprint
(:mod:`selection.cache`); the training run checkpoints every epoch there and resumes after a
kill. The defaults (a width-16 ConvNet, 3 epochs on the whole training set) are sized for a CPU:
about a minute on MNIST on one core.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distill.engine import TrainConfig, predict, train
from distill.models import build_model
from distill.progress import Progress
from distill.rng import generator as make_generator

from .base import SIGNALS, SelectionError
from .cache import SignalCache, data_digest, signal_fingerprint

__all__ = ["SignalConfig", "SignalProvider"]


@dataclass(frozen=True)
class SignalConfig:
    """The network whose training yields the learned signals.

    The defaults are sized for a CPU (about a minute on MNIST, one core); the DC paper's
    network is ``model="convnet"`` (width 128) trained longer.

    Attributes:
        model: zoo spec of the feature network (DC: ConvNet; here narrower by default).
        train: its training schedule (on the pool).
        early_epoch: EL2N / GraNd are measured after this many epochs (Paul et al. score at
            ~10% of training); clipped to ``train.epochs``.
        n_inits: independent networks averaged for EL2N / GraNd (Paul et al. use 10).
        pool_per_class: restrict the candidates to this many random members per class.
        grand_chunk: examples per vectorised per-example-gradient call (memory bound).
    """

    model: str = "convnet:width=16,depth=3"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, decay_at=None))
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
            raise SelectionError(f"pool_per_class (--pool-per-class) must be >= 1, got "
                                 f"{self.pool_per_class}")

    @classmethod
    def of(cls, model: str = "convnet", epochs: int = 10,
           pool_per_class: int | None = None) -> SignalConfig:
        """This feature network trained ``epochs`` epochs (no decay), on that candidate pool."""
        base = cls()
        return cls(model=model, pool_per_class=pool_per_class,
                   train=replace(base.train, epochs=epochs))


class _ForgettingTracker:
    """Counts correct→wrong transitions per example across its mini-batch presentations."""

    def __init__(self, n: int) -> None:
        self.last_correct = torch.zeros(n, dtype=torch.bool)
        self.ever_correct = torch.zeros(n, dtype=torch.bool)
        self.forgets = torch.zeros(n, dtype=torch.float32)

    def state(self) -> dict:
        return {"last_correct": self.last_correct.clone(),
                "ever_correct": self.ever_correct.clone(), "forgets": self.forgets.clone()}

    def load(self, state: dict) -> None:
        self.last_correct, self.ever_correct = state["last_correct"], state["ever_correct"]
        self.forgets = state["forgets"]

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
    """Records EL2N and the weights (GraNd is computed from them when asked) once, at the end
    of epoch ``epoch``."""

    def __init__(self, epoch: int, images: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> None:
        self.epoch, self.images, self.labels = epoch, images, labels
        self.num_classes = num_classes
        self.el2n: torch.Tensor | None = None
        self.state: dict | None = None

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if epoch + 1 != self.epoch:
            return
        probs = F.softmax(predict(model, self.images), dim=1)
        onehot = F.one_hot(self.labels, self.num_classes).to(probs.dtype)
        self.el2n = (probs - onehot).norm(dim=1).cpu()
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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


class _Checkpointer:
    """Hook: after every epoch, write everything a resumed run needs (see ``on_epoch_state``)."""

    def __init__(self, save: Callable[[dict], None], init: int, generator: torch.Generator,
                 tracker: Any, early: Any, done: Any) -> None:
        self.save, self.init, self.generator = save, init, generator
        self.tracker, self.early, self.done = tracker, early, done

    def on_epoch_state(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer
                       ) -> None:
        self.save({
            "done": self.done, "init": self.init, "next_epoch": epoch + 1,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "tracker": None if self.tracker is None else self.tracker.state(),
            "el2n": self.early.el2n, "early_state": self.early.state,
        })


class SignalProvider:
    """Computes signals on demand on a pool of a data set, caches them in memory and, with a
    ``cache_root``, on disk (reused across runs; training resumable).

    Args:
        dataset: an ``ImageSet`` (``images``, ``labels``, ``info``, ``class_indices``).
        config: :class:`SignalConfig`.
        seed: seeds the pool draw and the feature networks (same seed, same signals).
        device: where the feature network trains (the data set is moved there as needed).
        cache_root: folder of the disk cache (:mod:`selection.cache`); ``None``: memory only.

    Attributes:
        epochs_trained: epochs of signal-network training this provider ran (0 on a cache hit).
        cache_hit: whether the learned signals came from the disk cache.
    """

    #: Epochs trained by every provider of this process (tests check cache hits with it).
    total_epochs_trained: ClassVar[int] = 0

    def __init__(self, dataset: Any, config: SignalConfig = SignalConfig(), seed: int = 0,
                 device: torch.device | str = "cpu", progress: Progress | None = None,
                 cache_root: str | os.PathLike | None = None) -> None:
        self.dataset, self.config, self.seed = dataset, config, int(seed)
        self.device = torch.device(device)
        self.progress = progress
        self.pool = self._draw_pool()
        self.pool_labels = dataset.labels[self.pool].cpu()
        self._cache: dict[str, torch.Tensor] = {}
        self._early_states: list[dict] | None = None
        self.seconds: dict[str, float] = {}
        self.epochs_trained = 0
        self.cache_hit = False
        self.disk: SignalCache | None = None
        if cache_root is not None:
            images, labels = self._pool_tensors(device="cpu")
            fp, key = signal_fingerprint(dataset.info.name, data_digest(images, labels),
                                         config, self.seed)
            self.disk = SignalCache(cache_root, fp, key)

    @property
    def fingerprint(self) -> str | None:
        return None if self.disk is None else self.disk.fingerprint

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
                if self._early_states is None:
                    self._learned_signals()
                if signal == "grand" and "grand" not in self._cache:
                    self._grand()
        return self._cache[signal]

    def _pool_tensors(self, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.pool.to(self.dataset.images.device)
        dev = self.device if device is None else device
        return (self.dataset.images[idx].to(dev), self.dataset.labels[idx].to(dev))

    def _learned_signals(self) -> None:
        """From the disk cache when its fingerprint matches, else one training run."""
        stored = self.disk.load_signals() if self.disk is not None else None
        if stored is None:
            stored = self._train_signals()
            if self.disk is not None:
                self.disk.save_signals(stored)
                self.disk.drop_checkpoint()
        else:
            self.cache_hit = True
        self._early_states = stored.pop("early_states")
        self._cache.update(stored)

    def _grand(self) -> None:
        """GraNd from the stored early weights (no training), averaged over the inits."""
        start = time.perf_counter()
        cfg, info = self.config, self.dataset.info
        images, labels = self._pool_tensors()
        scores = []
        for init, state in enumerate(self._early_states or []):
            model = build_model(cfg.model, info.channels, info.num_classes, info.im_size,
                                generator=make_generator(self.seed, "signal-net", init))
            model.load_state_dict(state)
            scores.append(per_example_grad_norm(model.to(self.device), images, labels,
                                                cfg.grand_chunk))
        self._cache["grand"] = torch.stack(scores).mean(0)
        self.seconds["grand"] = time.perf_counter() - start
        if self.disk is not None:  # add GraNd to the stored signals
            stored = {k: v for k, v in self._cache.items() if k not in ("none", "pixels")}
            self.disk.save_signals({**stored, "early_states": self._early_states})

    def _train_signals(self) -> dict:
        """One training run per init (resumed from the disk checkpoint when there is one).

        Returns every learned signal except GraNd, plus the early weights (``early_states``).
        """
        cfg, info = self.config, self.dataset.info
        images, labels = self._pool_tensors()
        early = min(cfg.early_epoch, cfg.train.epochs)
        ckpt = self.disk.load_checkpoint() if self.disk is not None else None
        done: list[dict] = ckpt["done"] if ckpt is not None else []
        out: dict = {}
        start = time.perf_counter()
        for init in range(cfg.n_inits):
            if init < len(done):
                continue
            g = make_generator(self.seed, "signal-net", init)
            model = build_model(cfg.model, info.channels, info.num_classes, info.im_size,
                                generator=g).to(self.device)
            early_hook = _EarlyScores(early, images, labels, info.num_classes)
            tracker = _ForgettingTracker(images.shape[0]) if init == 0 else None
            # Only the first network is trained to the end: it gives forgetting, embedding
            # and entropy; the others stop once their early scores are taken.
            train_cfg = cfg.train if init == 0 else replace(cfg.train, epochs=early)
            start_epoch, opt_state = 0, None
            if ckpt is not None and ckpt["init"] == init:
                model.load_state_dict(ckpt["model"])
                g.set_state(ckpt["generator"])
                start_epoch, opt_state = ckpt["next_epoch"], ckpt["optimizer"]
                early_hook.el2n, early_hook.state = ckpt["el2n"], ckpt["early_state"]
                if tracker is not None:
                    tracker.load(ckpt["tracker"])
            hooks: list[object] = [early_hook]
            if tracker is not None:
                hooks.append(tracker)
            if self.disk is not None:
                hooks.append(_Checkpointer(self.disk.save_checkpoint, init, g, tracker,
                                           early_hook, done))
            if start_epoch < train_cfg.epochs:
                train(model, images, labels, train_cfg, g, hooks=hooks, progress=self.progress,
                      description=f"signal network {init + 1}/{cfg.n_inits}",
                      start_epoch=start_epoch, optimizer_state=opt_state)
                self.epochs_trained += train_cfg.epochs - start_epoch
                SignalProvider.total_epochs_trained += train_cfg.epochs - start_epoch
            result = {"el2n": early_hook.el2n, "early_state": early_hook.state}
            if tracker is not None:   # the first network, trained to the end
                model.eval()
                result["forgetting"] = tracker.counts()
                result["embedding"] = predict(model, images, embed=True).float().cpu()
                probs = F.softmax(predict(model, images), dim=1).double()
                ent = -(probs * probs.clamp_min(1e-30).log()).sum(1)
                result["entropy"] = ent.float().cpu()
                self.model = model
            done = done + [result]
            ckpt = None
        out["forgetting"] = done[0]["forgetting"]
        out["embedding"] = done[0]["embedding"]
        out["entropy"] = done[0]["entropy"]
        out["el2n"] = torch.stack([d["el2n"] for d in done]).mean(0)
        out["early_states"] = [d["early_state"] for d in done]
        self.seconds["train_signals"] = self.seconds.get("train_signals", 0.0) + (
            time.perf_counter() - start)
        return out
