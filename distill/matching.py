"""Per-class gradient matching: the meta-gradient of DC and DSA.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021: for a student
network θ, make the gradient of the loss on the synthetic images of class c match the gradient
on a real batch of class c, summed over classes:

    D = Σ_c d(∇_θ ℓ(S_c), ∇_θ ℓ(T_c)),

with ``d`` from :mod:`distill.distances`. The real gradients are constants; the synthetic ones
keep their graph, so ``D.backward()`` reaches the synthetic images (or whatever produced them,
e.g. a generator). With an augmentation (DSA: Zhao & Bilen, ICML 2021), one set of parameters
is drawn per class and applied to both sides (the siamese property).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .augment import DiffAugment
from .distances import gradient_distance
from .engine import classification_loss

__all__ = ["class_gradient", "matching_loss"]


def class_gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   create_graph: bool = False, chunk: int | None = None) -> list[torch.Tensor]:
    """∇_θ of the mean cross-entropy on a batch (hard (B,) or soft (B, K) targets).

    ``chunk`` splits the batch into pieces of that size whose gradients are summed with
    weights ``len(piece) / B``: the same gradient (up to float rounding), in the batch shapes
    a CPU's caches may prefer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = images.shape[0]
    if chunk is None or chunk >= n:
        loss = classification_loss(model(images), targets)
        whole = torch.autograd.grad(loss, params, create_graph=create_graph)
        return list(whole) if create_graph else [g.detach() for g in whole]
    total: list[torch.Tensor] | None = None
    for i in range(0, n, chunk):
        x, y = images[i:i + chunk], targets[i:i + chunk]
        loss = classification_loss(model(x), y) * (x.shape[0] / n)
        raw = torch.autograd.grad(loss, params, create_graph=create_graph)
        grads = list(raw) if create_graph else [g.detach() for g in raw]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    assert total is not None  # n >= 1
    return total


def matching_loss(model: nn.Module, real: Sequence[torch.Tensor],
                  synthetic: Sequence[torch.Tensor], synthetic_targets: Sequence[torch.Tensor],
                  distance: str = "layerwise", augment: DiffAugment | None = None,
                  generator: torch.Generator | None = None,
                  real_model: nn.Module | None = None,
                  real_chunk: int | None = None,
                  classes: Sequence[int] | None = None) -> torch.Tensor:
    """Σ_c d(∇ℓ(S_c), ∇ℓ(T_c)) over classes; differentiable w.r.t. the synthetic images.

    Args:
        model: the current student (its parameters are not updated here).
        real: per class c, a (B_c, C, H, W) batch of real images of class c.
        synthetic: per class c, the (ipc, C, H, W) synthetic images (with graph).
        synthetic_targets: per class c, hard labels (ipc,) or soft labels (ipc, K).
        augment: optional :class:`distill.augment.DiffAugment`; its parameters are sampled
            once per class from ``generator`` and applied to the real and synthetic batch.
        real_model: the module that computes the real gradients, e.g. a ``torch.compile``
            wrapper of ``model`` sharing its parameters (no double backward is needed on the
            real side); default ``model``.
        real_chunk: compute each real gradient in pieces of this size (see
            :func:`class_gradient`).
        classes: the class of each list entry (default: entry c is class c).
    """
    total = torch.zeros(())  # replaced by the first class's distance
    labels = range(len(real)) if classes is None else classes
    if len(labels) != len(real):
        raise ValueError(f"{len(labels)} classes for {len(real)} real batches")
    for i, (c, xr, xs, ys) in enumerate(zip(labels, real, synthetic, synthetic_targets)):
        if augment is not None:
            params = augment.sample(1, generator)
            xr, xs = augment.apply(xr, params), augment.apply(xs, params)
        yr = torch.full((xr.shape[0],), c, dtype=torch.int64, device=xr.device)
        g_real = class_gradient(model if real_model is None else real_model, xr, yr,
                                chunk=real_chunk)
        g_syn = class_gradient(model, xs, ys, create_graph=True)
        d = gradient_distance(g_syn, g_real, distance)
        total = d if i == 0 else total + d
    return total
