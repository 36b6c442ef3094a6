"""Unrolled meta-gradients: backpropagate through T differentiable student SGD steps.

Wang, Zhu, Torralba & Efros, "Dataset Distillation", 2018 (and Maclaurin, Duvenaud & Adams,
ICML 2015): train a fresh student for T steps on the teacher's data with a differentiable
optimiser (``higher``: Grefenstette et al., 2019), evaluate it on real data, and differentiate
that loss with respect to the teacher's data through every step. Memory grows linearly in T
(every step's activations are kept). Truncation and gradient checkpointing, which trade that
memory for time, are the condensation issue's next step.
"""

from __future__ import annotations

from typing import Sequence

import higher
import torch
from torch import nn

from .engine import classification_loss

__all__ = ["unrolled_loss"]


def unrolled_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  real_images: torch.Tensor, real_labels: torch.Tensor, lr: float | torch.Tensor,
                  momentum: float = 0.0, weight_decay: float = 0.0) -> torch.Tensor:
    """Train ``model`` on ``batches`` with differentiable SGD and return the real-data loss.

    Args:
        model: a fresh student; its own parameters are not modified.
        batches: T (images, targets) pairs from the teacher, with graphs to the teacher.
        real_images / real_labels: the real batch the trained student is scored on.
        lr: the student's learning rate (a tensor makes it learnable).
        momentum, weight_decay: as in ``torch.optim.SGD`` (weight decay makes the inner
            problem strongly convex for a linear student).

    Returns:
        The scalar real-data loss after T steps; ``backward()`` reaches the teacher.
    """
    opt = torch.optim.SGD(model.parameters(), lr=float(lr) if not torch.is_tensor(lr) else 1.0,
                          momentum=momentum, weight_decay=weight_decay)
    override = {"lr": [lr]} if torch.is_tensor(lr) else None
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True,
                              track_higher_grads=True) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(classification_loss(fmodel(x), y), override=override)
        return classification_loss(fmodel(real_images), real_labels)
