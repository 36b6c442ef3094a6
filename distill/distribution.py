"""Distribution matching (DM): match mean embeddings of real and synthetic images per class.

Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023: for a randomly
initialised network ψ (a new one every iteration, never trained), minimise

    Σ_c || mean_{x ∈ T_c} ψ(x) − mean_{s ∈ S_c} ψ(s) ||²,

optionally with the same DSA augmentation on both sides. No bi-level optimisation: one
forward pass per side, which is why DM scales to large IPC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .augment import DiffAugment

__all__ = ["distribution_loss"]


def distribution_loss(embed: nn.Module, real: Sequence[torch.Tensor],
                      synthetic: Sequence[torch.Tensor], augment: DiffAugment | None = None,
                      generator: torch.Generator | None = None,
                      embed_real: nn.Module | None = None,
                      real_chunk: int | None = None) -> torch.Tensor:
    """Σ_c ||mean ψ(T_c) − mean ψ(S_c)||², differentiable w.r.t. the synthetic images.

    Args:
        embed: the feature map ψ, e.g. ``model.embed`` of a freshly built zoo model.
        real: per class, (B_c, C, H, W) real images (constants).
        synthetic: per class, (ipc, C, H, W) synthetic images (with graph).
        augment: optional :class:`distill.augment.DiffAugment`; one draw per class from
            ``generator``, applied to both sides (siamese).
        embed_real: computes the real embeddings (e.g. a compiled ``embed``); default ``embed``.
        real_chunk: embed each real batch in pieces of this many images (the same mean up to
            float rounding; cache-sized pieces are faster on a CPU).
    """
    total = torch.zeros(())  # replaced by the first class's distance
    for i, (xr, xs) in enumerate(zip(real, synthetic)):
        if augment is not None:
            params = augment.sample(1, generator)
            xr, xs = augment.apply(xr, params), augment.apply(xs, params)
        with torch.no_grad():
            mean_real = _mean_embedding(embed if embed_real is None else embed_real, xr,
                                        real_chunk)
        d = ((mean_real - embed(xs).mean(0)) ** 2).sum()
        total = d if i == 0 else total + d
    return total


def _mean_embedding(f: nn.Module, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``f(x).mean(0)``, computed in pieces of ``chunk`` images when given."""
    if chunk is None or chunk >= x.shape[0]:
        return f(x).mean(0)
    return torch.stack([f(x[i:i + chunk]).sum(0)
                        for i in range(0, x.shape[0], chunk)]).sum(0) / x.shape[0]
