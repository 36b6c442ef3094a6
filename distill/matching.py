"""Per-class gradient matching: the meta-gradient of DC and DSA.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021: for a student
network θ, make the gradient of the loss on the synthetic images of class c match the gradient
on a real batch of class c, summed over classes:

    D = Σ_c d(∇_θ ℓ(S_c), ∇_θ ℓ(T_c)),

with ``d`` from :mod:`distill.distances`. The real gradients are constants; the synthetic ones
keep their graph, so ``D.backward()`` reaches the synthetic images (or whatever produced them,
e.g. a generator). With an augmentation (DSA: Zhao & Bilen, ICML 2021), one set of parameters
is drawn per class and applied to both sides (the siamese property).

On the fast path (:func:`distill.models.fast_path`) the synthetic gradients of all classes
come from one batched pass: per-image gradients (``torch.func.vmap`` over ``grad``), averaged
within each class by one matrix product. The same gradients up to float rounding, for a
student whose layers treat images independently (no batch norm in training mode, no
dropout) and where the per-image gradients are small (``BATCHED_FLOATS``); a GTN's batch of
32 has about 3 images per class, and one call per class was mostly overhead (MNIST T = 10:
0.36 s of a 1.4 s matching meta-step). Elsewhere, and on the plain path, one call per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .augment import DiffAugment
from .distances import gradient_distance
from .engine import classification_loss
from .memory import saved_tensor_hooks_active
from .models import fast_path

__all__ = ["BATCHED_FLOATS", "batched_class_gradients", "class_gradient", "matching_loss"]

#: The batched synthetic side holds images x parameters per-image gradient values; above
#: this many it computes one class at a time (the memory of a DC ConvNet at IPC 50 would
#: otherwise be gigabytes).
BATCHED_FLOATS = 2 ** 24


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
    real, synthetic = list(real), list(synthetic)
    if augment is not None:  # one draw per class, in class order, for both sides
        for i in range(len(real)):
            params = augment.sample(1, generator)
            real[i], synthetic[i] = augment.apply(real[i], params), \
                augment.apply(synthetic[i], params)
    batched = batched_class_gradients(model, synthetic, synthetic_targets) \
        if _can_batch(model, synthetic) else None
    for i, (c, xr, xs, ys) in enumerate(zip(labels, real, synthetic, synthetic_targets)):
        yr = torch.full((xr.shape[0],), c, dtype=torch.int64, device=xr.device)
        g_real = class_gradient(model if real_model is None else real_model, xr, yr,
                                chunk=real_chunk)
        g_syn = batched[i] if batched is not None else \
            class_gradient(model, xs, ys, create_graph=True)
        d = gradient_distance(g_syn, g_real, distance)
        total = d if i == 0 else total + d
    return total


def _can_batch(model: nn.Module, synthetic: Sequence[torch.Tensor]) -> bool:
    """Whether the batched synthetic side computes what the per-class calls compute (layers
    that treat images independently) at a modest memory (:data:`BATCHED_FLOATS`)."""
    if not fast_path() or len(synthetic) < 2 or saved_tensor_hooks_active():
        return False
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or (
                isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training):
            return False
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(x.shape[0] for x in synthetic) * n_params <= BATCHED_FLOATS


def batched_class_gradients(model: nn.Module, images: Sequence[torch.Tensor],
                            targets: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per group i, ∇_θ of the mean loss on ``images[i]`` (with its graph to the images), as
    :func:`class_gradient` with ``create_graph=True`` computes it, from one batched pass of
    per-image gradients. Valid for a model whose output for an image does not depend on the
    other images of the batch."""
    everything = list(model.named_parameters())
    named = [(n, p) for n, p in everything if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    state = {**{n: p for n, p in everything if not p.requires_grad},
             **dict(model.named_buffers())}

    def loss_of_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
        return classification_loss(functional_call(model, (p, state), (x[None],)), y[None])

    x, y = torch.cat(list(images)), torch.cat(list(targets))
    per_image = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    sizes = [g.shape[0] for g in images]
    # the mean over each group as one (groups, images) matrix product
    weights = torch.block_diag(*(torch.full((1, n), 1.0 / n, dtype=x.dtype, device=x.device)
                                 for n in sizes))
    means = [(weights @ per_image[n].reshape(x.shape[0], -1)).reshape(len(sizes), *p.shape)
             for n, p in named]
    return [[m[i] for m in means] for i in range(len(sizes))]
