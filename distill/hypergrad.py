"""Implicit-function-theorem hypergradients with a Neumann-series inverse Hessian.

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020 (Algorithms 2 and 3). At an (approximate) optimum
``w*(h)`` of the inner loss ``L_T(w, h)``, the gradient of an outer loss ``L_V(w*(h), h)`` is

    dL_V/dh = ∂L_V/∂h − ∂L_V/∂w · H⁻¹ · ∂²L_T/∂w∂h,     H = ∂²L_T/∂w²,

and ``H⁻¹ v`` is approximated by ``α Σ_{j=0..K} (I − αH)^j v`` (convergent when
``0 < α < 2/λ_max(H)`` and H is positive definite). Hessian-vector products use double
backprop; no graph is kept across the inner training that produced ``w``, so memory does not
grow with the number of inner steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch

__all__ = ["neumann_inverse_hvp", "implicit_hypergradient"]

Tensors = Sequence[torch.Tensor]


def _dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return cast(torch.Tensor, sum((x * y).sum() for x, y in zip(a, b)))


def neumann_inverse_hvp(inner_grads: Tensors, params: Tensors, v: Tensors, terms: int,
                        alpha: float) -> list[torch.Tensor]:
    """Approximate ``H⁻¹ v`` with ``terms`` Neumann terms.

    Args:
        inner_grads: ∂L_T/∂w for ``params``, computed with ``create_graph=True``.
        params: the inner parameters w.
        v: the vectors to multiply (same shapes as ``params``).
        terms: K, the number of Neumann terms after the first (K = 0 gives ``α v``).
        alpha: the step α.

    Returns:
        ``α Σ_{j=0..K} (I − αH)^j v``, one tensor per parameter (detached).
    """
    cur = [t.detach() for t in v]
    acc = [t.clone() for t in cur]
    for _ in range(terms):
        hv = torch.autograd.grad(inner_grads, params, grad_outputs=cur, retain_graph=True)
        cur = [c - alpha * h.detach() for c, h in zip(cur, hv)]
        acc = [a + c for a, c in zip(acc, cur)]
    return [alpha * a for a in acc]


def implicit_hypergradient(inner_loss: torch.Tensor, outer_loss: torch.Tensor,
                           params: Tensors, hparams: Tensors, terms: int = 5,
                           alpha: float = 0.01,
                           mixed_losses: Iterable[Callable[[], torch.Tensor]] | None = None
                           ) -> list[torch.Tensor]:
    """dL_V/dh by the implicit function theorem (see module docstring).

    Args:
        inner_loss: L_T(w, h), a scalar with a graph to both ``params`` and ``hparams``.
        outer_loss: L_V(w, h), a scalar with a graph to ``params`` (and maybe ``hparams``).
        params: the inner parameters w (at, or near, the inner optimum).
        hparams: the hyper-parameters h (e.g. synthetic images, or a generator's weights).
        terms, alpha: Neumann series length K and step α.
        mixed_losses: when the inner loss is a sum of parts too large to hold in one graph
            (a GTN curriculum: one part per student step), zero-argument callables that build
            the parts one at a time; the mixed derivative is then accumulated part by part, so
            memory stays that of one part, and ``inner_loss`` (e.g. one part, or a sample of
            them) serves only the Hessian-vector products.

    Returns:
        One gradient per hyper-parameter (zeros where it does not influence the losses).
    """
    params, hparams = list(params), list(hparams)
    raw = torch.autograd.grad(outer_loss, params, retain_graph=True, allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
    direct = torch.autograd.grad(outer_loss, hparams, retain_graph=True, allow_unused=True)
    inner_grads = torch.autograd.grad(inner_loss, params, create_graph=True)
    p = neumann_inverse_hvp(inner_grads, params, v, terms, alpha)
    # ∂/∂h of (∂L_T/∂w · p) is the mixed second derivative applied to p.
    mixed: list[torch.Tensor | None]
    if mixed_losses is None:
        mixed = list(torch.autograd.grad(_dot(inner_grads, p), hparams, allow_unused=True))
    else:
        del inner_grads
        mixed = [None] * len(hparams)
        for part in mixed_losses:
            gp = torch.autograd.grad(part(), params, create_graph=True)
            part_mixed = torch.autograd.grad(_dot(gp, p), hparams, allow_unused=True)
            mixed = [a if b is None else (b if a is None else a + b)
                     for a, b in zip(mixed, part_mixed)]
    out = []
    for h, d, m in zip(hparams, direct, mixed):
        g = torch.zeros_like(h)
        if d is not None:
            g = g + d
        if m is not None:
            g = g - m
        out.append(g)
    return out
