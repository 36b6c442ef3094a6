"""Infinite-width network kernels: the NNGP and NTK of fully-connected ReLU networks, and the
empirical NTK of any zoo model.

KIP and Label Solve (Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression",
ICLR 2021) replace "train a network on the support set" with kernel ridge regression under the
kernel of an infinitely wide network. For a fully-connected ReLU network with ``depth`` hidden
layers in the NTK parameterisation (weights ``W ~ N(0, 1)`` scaled by ``sigma_w / sqrt(fan_in)``,
biases ``sigma_b * b``), both kernels follow the arc-cosine recursion (Cho & Saul 2009; Lee et
al. 2018 for the NNGP; Jacot et al. 2018 for the NTK; Arora et al. 2019):

    Sigma_0(x, x') = w_var * <x, x'> / d + b_var
    for l = 1..depth, with c = Sigma(x, x') / sqrt(Sigma(x, x) Sigma(x', x')), theta = arccos c:
        E[relu(u) relu(v)] = sqrt(Sigma(x, x) Sigma(x', x')) * (sin theta + (pi - theta) c) / (2 pi)
        E[relu'(u) relu'(v)] = (pi - theta) / (2 pi)
        Sigma_l  = w_var * E[relu(u) relu(v)] + b_var          (NNGP)
        Sdot_l   = w_var * E[relu'(u) relu'(v)]
        Theta_l  = Sigma_l + Theta_{l-1} * Sdot_l,  Theta_0 = Sigma_0    (NTK)

``Sigma_depth`` is the NNGP and ``Theta_depth`` the NTK of the network's scalar output (the
readout layer is the last affine map). On the diagonal ``theta = 0``, so
``Sigma_l(x, x) = w_var * Sigma_{l-1}(x, x) / 2 + b_var``; we carry the diagonals separately,
which keeps the cosine away from the undefined derivative of ``arccos`` at 1 and makes the cost
of a (n1, n2) block one matrix product plus O(depth * n1 * n2) elementwise work.

Kernels are computed in float64 (kernel ridge regression solves with them); inputs of any
shape ``(N, ...)`` are flattened. Differentiable with respect to both inputs (KIP learns the
support images through them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["KERNELS", "KernelError", "KernelConfig", "fc_kernels", "kernel_matrix",
           "make_kernel", "empirical_ntk"]

KERNELS = ("ntk", "nngp")
"""Closed-form kernels by name: the NTK and the NNGP of a fully-connected ReLU network."""

# Clamp of the cosine: its derivative through arccos is -1/sqrt(1 - c^2), infinite at |c| = 1.
# Off-diagonal entries this close to 1 are (numerically) duplicates; clamping zeroes their
# gradient, a negligible bias, instead of producing inf/NaN.
_COS_LIMIT = 1.0 - 1e-9

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class KernelError(ConfigError):
    """An invalid kernel option (one line): unknown name, depth < 1, negative variances."""


@dataclass(frozen=True)
class KernelConfig:
    """A closed-form kernel of a fully-connected ReLU network.

    Attributes:
        name: ``ntk`` or ``nngp`` (:data:`KERNELS`).
        depth: hidden ReLU layers (>= 1); "FC<depth>" in the KIP paper's tables.
        w_var: weight variance sigma_w^2 (2: He scaling, each layer keeps the input's scale).
        b_var: bias variance sigma_b^2.
        family: KIP's "family of kernels": every meta-iteration draws its depth uniformly from
            ``1..depth`` (the learned set must suit all of them); evaluation uses ``depth``.
    """

    name: str = "ntk"
    depth: int = 1
    w_var: float = 2.0
    b_var: float = 0.01
    family: bool = False

    def __post_init__(self) -> None:
        if self.name not in KERNELS:
            raise KernelError(f"unknown kernel {self.name!r}; choose from {', '.join(KERNELS)}")
        if isinstance(self.depth, bool) or int(self.depth) != self.depth or self.depth < 1:
            raise KernelError(f"kernel depth must be an integer >= 1, got {self.depth}")
        if not self.w_var > 0 or not self.b_var >= 0:
            raise KernelError(f"kernel variances must be w_var > 0 and b_var >= 0, got "
                              f"w_var={self.w_var}, b_var={self.b_var}")

    def sample_depth(self, generator: torch.Generator) -> int:
        """The depth of one meta-iteration: ``depth``, or uniform on ``1..depth`` (family)."""
        if not self.family or self.depth == 1:
            return self.depth
        return int(torch.randint(1, self.depth + 1, (1,), generator=generator))


def _relu_step(s12: torch.Tensor, s11: torch.Tensor, s22: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU expectations of a centred Gaussian pair with covariance [[s11, s12], [s12, s22]].

    Args:
        s12: (n1, n2) covariances; s11: (n1, 1) and s22: (1, n2) variances.

    Returns:
        ``(E[relu(u) relu(v)], E[relu'(u) relu'(v)])``, each (n1, n2).
    """
    norm = torch.sqrt(s11 * s22).clamp_min(torch.finfo(s12.dtype).tiny)
    c = (s12 / norm).clamp(-_COS_LIMIT, _COS_LIMIT)
    theta = torch.arccos(c)
    sin = torch.sqrt(1.0 - c * c)
    return norm * (sin + (math.pi - theta) * c) / (2 * math.pi), (math.pi - theta) / (2 * math.pi)


def fc_kernels(x1: torch.Tensor, x2: torch.Tensor, depth: int, w_var: float = 2.0,
               b_var: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The NNGP and NTK of a fully-connected ReLU network with ``depth`` hidden layers.

    Args:
        x1: (n1, ...) inputs; x2: (n2, ...) inputs (flattened to d features each).
        depth: hidden layers (>= 1). w_var, b_var: sigma_w^2 and sigma_b^2 of every layer.

    Returns:
        ``(nngp, ntk)``: (n1, n2) float64 tensors (see the module docstring for the recursion).
    """
    a = x1.reshape(x1.shape[0], -1).double()
    b = x2.reshape(x2.shape[0], -1).double()
    d = a.shape[1]
    s12 = w_var * (a @ b.T) / d + b_var
    s11 = (w_var * (a * a).sum(1, keepdim=True) / d + b_var)
    s22 = (w_var * (b * b).sum(1, keepdim=True) / d + b_var).T
    ntk = s12
    for _ in range(depth):
        e_relu, e_step = _relu_step(s12, s11, s22)
        s12 = w_var * e_relu + b_var
        ntk = s12 + ntk * (w_var * e_step)
        s11 = w_var * s11 / 2 + b_var  # theta = 0 on the diagonal
        s22 = w_var * s22 / 2 + b_var
    return s12, ntk


def kernel_matrix(x1: torch.Tensor, x2: torch.Tensor, config: KernelConfig,
                  depth: int | None = None) -> torch.Tensor:
    """``config``'s kernel between ``x1`` (n1, ...) and ``x2`` (n2, ...): (n1, n2) float64.

    ``depth`` overrides ``config.depth`` (one member of the family of kernels).
    """
    nngp, ntk = fc_kernels(x1, x2, config.depth if depth is None else depth, config.w_var,
                           config.b_var)
    return ntk if config.name == "ntk" else nngp


def make_kernel(name: str = "ntk", depth: int = 1, w_var: float = 2.0, b_var: float = 0.01
                ) -> Kernel:
    """A kernel by name as a function ``(x1, x2) -> (n1, n2) float64``.

    Raises:
        KernelError: an unknown name, ``depth < 1`` or invalid variances.
    """
    config = KernelConfig(name=name, depth=depth, w_var=w_var, b_var=b_var)
    return lambda x1, x2: kernel_matrix(x1, x2, config)


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The empirical NTK of a finite network at its current parameters.

    ``Theta(x, x') = (1/K) sum_k <d f_k(x) / d params, d f_k(x') / d params>``, the trace over
    the K outputs divided by K (Jacot et al. 2018), computed with ``torch.func`` (per-example
    Jacobians via ``vmap(jacrev)``). Memory is O((n1 + n2) * K * #params): meant for small
    supports and small models. The model is evaluated in eval mode (batch-norm statistics
    would couple the examples).

    Args:
        model: any zoo model (or ``nn.Module`` mapping (B, ...) to (B, K)).
        x1: (n1, ...) and x2: (n2, ...) inputs on the model's device.

    Returns:
        (n1, n2) float64.
    """
    from torch.func import functional_call, jacrev, vmap

    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    def jac(x: torch.Tensor) -> torch.Tensor:
        j = vmap(jacrev(f), (None, 0))(params, x)  # name -> (n, K, *param shape)
        return torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in j.values()], dim=2)

    try:
        j1 = jac(x1).double()
        j2 = j1 if x2 is x1 else jac(x2).double()
    finally:
        model.train(was_training)
    return torch.einsum("akp,bkp->ab", j1, j2) / j1.shape[1]
