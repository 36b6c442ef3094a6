"""Generator teachers of Generative Teaching Networks, with their curricula.

Such, Rawal, Lehman, Stanley & Clune, "Generative Teaching Networks: Accelerating Neural
Architecture Search by Learning to Generate Synthetic Training Data", ICML 2020. The generator
maps noise ++ one-hot label to an image:

    z (noise_dim) ++ onehot(y) -> FC width_fc -> FC width_conv·(H/4)·(W/4)
        -> reshape -> upsample x2 -> conv 3x3 (width_conv/2) -> upsample x2 -> conv 3x3 (C)
        -> tanh, mapped from [-1, 1] to the data set's normalised pixel range

(paper: noise 128, FC 1024, 128 channels), batch norm and leaky ReLU between layers, weight
normalisation optional. A :class:`GeneratorTeacher` adds what the student is trained with:

* the **curriculum** — where the noise of inner step ``t`` comes from:
  ``none`` fresh noise every step; ``all-shuffled`` one learned pool of T·B noise vectors,
  shuffled across steps every meta-iteration; ``shuffled-batch`` T learned batches whose
  order is shuffled; ``full`` T learned batches in a fixed order (the paper's best);
* balanced labels per batch (optionally learned soft labels);
* the student's inner optimiser: a learned learning rate per step (init 0.02) and a learned
  momentum (init 0.5).

It is a :class:`distill.teacher.Teacher` (its curriculum is the inner schedule, its learned lr
and momentum the student's; per-class batches are made in one forward pass), so every strategy
(unrolled, implicit, matching, distribution) trains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from distill.data import DatasetInfo
from distill.inner import compiled_call
from distill.teacher import Batch, StepChoice, Teacher

__all__ = ["GeneratorConfig", "Generator", "GeneratorTeacher", "CURRICULA", "GeneratorError"]

CURRICULA = ("none", "all-shuffled", "shuffled-batch", "full")


class GeneratorError(ValueError):
    """Bad generator or curriculum option (one line)."""


@dataclass(frozen=True)
class GeneratorConfig:
    noise_dim: int = 128
    width_fc: int = 1024
    width_conv: int = 128
    weight_norm: bool = True
    batch_norm: bool = True
    slope: float = 0.1          # leaky ReLU

    def __post_init__(self) -> None:
        for name in ("noise_dim", "width_fc", "width_conv"):
            if getattr(self, name) < 1:
                raise GeneratorError(f"{name} must be >= 1, got {getattr(self, name)}")


class Generator(nn.Module):
    """noise ++ one-hot label -> normalised image of shape (C, H, W); H and W divisible by 4."""

    pixel_mean: torch.Tensor  # (1, C, 1, 1) buffers
    pixel_std: torch.Tensor

    def __init__(self, info: DatasetInfo, config: GeneratorConfig = GeneratorConfig(),
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        h, w = info.im_size
        if h % 4 or w % 4:
            raise GeneratorError(f"image size {h}x{w} is not divisible by 4")
        self.info, self.config = info, config
        self.num_classes = info.num_classes
        c, k = config.width_conv, info.num_classes
        self._hw = (h // 4, w // 4)
        wn = weight_norm if config.weight_norm else (lambda m: m)
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            self.fc1 = nn.Linear(config.noise_dim + k, config.width_fc)
            self.fc2 = nn.Linear(config.width_fc, c * self._hw[0] * self._hw[1])
            self.conv1 = nn.Conv2d(c, max(c // 2, 1), 3, padding=1)
            self.conv2 = nn.Conv2d(max(c // 2, 1), info.channels, 3, padding=1)
        if generator is not None:  # seeded init without touching the global RNG
            for m in (self.fc1, self.fc2, self.conv1, self.conv2):
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                with torch.no_grad():
                    m.weight.uniform_(-bound, bound, generator=generator)
                    assert m.bias is not None
                    m.bias.uniform_(-bound, bound, generator=generator)
        self.fc1, self.fc2 = wn(self.fc1), wn(self.fc2)
        self.conv1, self.conv2 = wn(self.conv1), wn(self.conv2)
        bn = config.batch_norm
        self.bn1 = nn.BatchNorm1d(config.width_fc) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm1d(c * self._hw[0] * self._hw[1]) if bn else nn.Identity()
        self.bn3 = nn.BatchNorm2d(max(c // 2, 1)) if bn else nn.Identity()
        self.register_buffer("pixel_mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(info.std).view(1, -1, 1, 1))

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``noise`` (B, noise_dim); ``labels`` (B,) int64 or (B, K) soft -> (B, C, H, W)."""
        if labels.dim() == 1:
            labels = F.one_hot(labels, self.num_classes).to(noise.dtype)
        a = self.config.slope
        x = F.leaky_relu(self.bn1(self.fc1(torch.cat([noise, labels], 1))), a)
        x = F.leaky_relu(self.bn2(self.fc2(x)), a)
        x = x.view(x.shape[0], -1, *self._hw)
        x = F.leaky_relu(self.bn3(self.conv1(F.interpolate(x, scale_factor=2.0))), a)
        x = torch.tanh(self.conv2(F.interpolate(x, scale_factor=2.0)))
        return ((x + 1) / 2 - self.pixel_mean) / self.pixel_std  # [0, 1] pixels, normalised


class GeneratorTeacher(Teacher):
    """A generator plus curriculum, labels and the student's learned inner optimiser.

    Every inner batch is its own generator output (``has_curriculum``), in every curriculum
    mode; gradient matching runs T match-then-step rounds (the default ``matching_loops``).

    Args:
        info: the data set's shape and normalisation.
        steps: T, inner steps per meta-iteration (the learned curricula hold T batches).
        batch_size: generated images per inner step (paper: 128).
        curriculum: one of :data:`CURRICULA`.
        learn_labels: learn soft labels (logits per curriculum sample; ``full`` and the
            shuffled curricula only, where samples persist).
        lr, momentum: initial inner lr per step and momentum (paper: 0.02, 0.5).
        generator: seeds the generator's initial weights and the learned noise.
    """

    def __init__(self, info: DatasetInfo, steps: int, batch_size: int = 128,
                 curriculum: str = "full", config: GeneratorConfig = GeneratorConfig(),
                 learn_labels: bool = False, lr: float = 0.02, momentum: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if curriculum not in CURRICULA:
            raise GeneratorError(f"unknown curriculum {curriculum!r}; choose from "
                                 f"{', '.join(CURRICULA)}")
        if steps < 1:
            raise GeneratorError(f"the number of inner steps must be >= 1, got {steps}")
        if batch_size < 1:
            raise GeneratorError(f"batch_size must be >= 1, got {batch_size}")
        if learn_labels and curriculum == "none":
            raise GeneratorError("learned labels need a learned curriculum (not 'none')")
        if not (0 < lr) or not (0 <= momentum < 1):
            raise GeneratorError("need lr > 0 and 0 <= momentum < 1")
        self.info, self.steps, self.batch_size = info, steps, batch_size
        self.curriculum, self.num_classes = curriculum, info.num_classes
        self.generator = Generator(info, config, generator)
        k = info.num_classes
        self.register_buffer("batch_labels", torch.arange(batch_size) % k)
        if curriculum != "none":
            self.noise = nn.Parameter(torch.randn(steps, batch_size, config.noise_dim,
                                                  generator=generator))
        else:
            self.noise = None
        self.label_logits = nn.Parameter(
            F.one_hot(self.batch_labels, k).float().repeat(steps, 1, 1) * math.log(100.0)) \
            if learn_labels else None
        self.log_lr = nn.Parameter(torch.full((steps,), math.log(lr)))
        self.momentum_logit = nn.Parameter(torch.tensor(math.log(momentum / (1 - momentum)))
                                           if momentum > 0 else torch.tensor(-20.0))

    has_curriculum = True
    batch_labels: torch.Tensor  # (B,) buffer
    noise: nn.Parameter | None
    label_logits: nn.Parameter | None

    # ---------------------------------------------------------------- curriculum
    def order(self, generator: torch.Generator) -> list[StepChoice]:
        """Which learned noise each of the T steps uses this meta-iteration.

        ``full``: step t uses batch t. ``shuffled-batch``: a permutation of the batches.
        ``all-shuffled``: a permutation of all T·B vectors, cut into T batches (returned as
        index tensors into the flattened pool). ``none``: ``None`` per step (fresh noise).
        """
        t, b = self.steps, self.batch_size
        if self.curriculum == "full":
            return list(range(t))
        if self.curriculum == "shuffled-batch":
            return torch.randperm(t, generator=generator).tolist()
        if self.curriculum == "all-shuffled":
            return list(torch.randperm(t * b, generator=generator).view(t, b))
        return [None] * t

    def step_batch(self, choice: StepChoice, generator: torch.Generator) -> Batch:
        """Images and targets of one inner step for an entry of :meth:`order`."""
        dev = self.log_lr.device
        nd = self.generator.config.noise_dim
        if choice is None:
            z = torch.randn(self.batch_size, nd, generator=generator).to(
                dev, self.log_lr.dtype)
            labels: torch.Tensor = self.batch_labels
        elif isinstance(choice, int):
            assert self.noise is not None  # a learned curriculum
            z = self.noise[choice]
            labels = self.batch_labels if self.label_logits is None else \
                F.softmax(self.label_logits[choice], 1)
        else:  # a set of positions in the flattened pool
            assert self.noise is not None
            idx = choice.to(dev)
            z = self.noise.reshape(-1, nd)[idx]
            labels = self.batch_labels.repeat(self.steps)[idx] if self.label_logits is None \
                else F.softmax(self.label_logits.reshape(-1, self.num_classes)[idx], 1)
        return compiled_call(self.generator, z, labels), labels

    def curriculum_batches(self, generator: torch.Generator) -> list[Batch]:
        """The T (images, targets) batches of one meta-iteration."""
        return list(self.inner_batches(generator))

    # ---------------------------------------------------------------- inner optimiser
    def lr_tensor(self) -> torch.Tensor:
        """(T,) learned per-step learning rates."""
        return self.log_lr.exp()

    def momentum_tensor(self) -> torch.Tensor:
        """() learned momentum in (0, 1)."""
        return torch.sigmoid(self.momentum_logit)

    # ---------------------------------------------------------------- teacher protocol
    def class_batch(self, c: int, generator: torch.Generator, n: int | None = None) -> Batch:
        """``n`` (default batch_size / classes) generated images of class ``c``, fresh noise."""
        n = n or max(self.batch_size // self.num_classes, 1)
        z = torch.randn(n, self.generator.config.noise_dim, generator=generator)
        z = z.to(self.log_lr.device)
        y = torch.full((n,), c, dtype=torch.int64, device=z.device)
        return compiled_call(self.generator, z, y), y

    def class_batches(self, generator: torch.Generator, n: int | None = None) -> list[Batch]:
        """``n`` images of every class, made in ONE forward pass and split by class.

        Per-class strategies (matching, distribution) use this instead of one
        :meth:`class_batch` per class: the generator's batch norm then sees a batch with every
        class, as it does when it makes the students' training batches. Normalising each
        class on its own statistics would train a generator whose mixed batches look different.
        """
        n = n or max(self.batch_size // self.num_classes, 1)
        k = self.num_classes
        z = torch.randn(n * k, self.generator.config.noise_dim, generator=generator)
        z = z.to(self.log_lr.device)
        y = torch.arange(k, device=z.device).repeat_interleave(n)
        x = compiled_call(self.generator, z, y)
        return [(x[c * n:(c + 1) * n], y[c * n:(c + 1) * n]) for c in range(k)]

    def batch(self, size: int | None, generator: torch.Generator) -> Batch:
        """A generated batch of balanced labels with fresh noise (``size``: batch_size)."""
        n = size or self.batch_size
        z = torch.randn(n, self.generator.config.noise_dim, generator=generator)
        z = z.to(self.log_lr.device)
        y = (torch.arange(n) % self.num_classes).to(z.device)
        return compiled_call(self.generator, z, y), y

    @torch.no_grad()
    def sample(self, per_class: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` images of every class (fresh noise), grouped by class, eval mode."""
        was = self.generator.training
        self.generator.eval()
        out = [self.class_batch(c, generator, per_class) for c in range(self.num_classes)]
        self.generator.train(was)
        return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])
