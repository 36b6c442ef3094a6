"""Kernel ridge regression (KRR) for dataset distillation: the math of KIP and Label Solve
(Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021), used by
the ``kip`` strategy (:mod:`distill.strategies.kip`) and :func:`distill.labelsolve.solve_labels`.
The methods themselves are described in :mod:`distill.kip`.

Kernel ridge regression (KRR) with support ``(X_s, y_s)`` (n_s points) predicts, for targets
``X_t`` (n_t points),

    y_hat(X_t) = K_ts (K_ss + lam * tr(K_ss) / n_s * I)^{-1} y_s          (n_t, K)

with ``K_ts = k(X_t, X_s)`` (n_t, n_s) and ``K_ss = k(X_s, X_s)`` (n_s, n_s): the regulariser is
scaled by the mean eigenvalue of ``K_ss`` as in the paper's released code, so one ``lam``
(default 1e-6) suits every kernel, depth and support size. Labels are one-hot vectors, by
default centred (``one_hot - 1/K``, rows summing to 0), which changes the loss but never the
argmax of a prediction (a constant added to every support label adds the same number to every
class of a prediction).

Every solve runs in float64. Two scores for a learned set: :func:`krr_accuracy` (the paper's own
protocol: KRR with the kernel on the test set) and training finite networks
(:func:`~distill.engine.evaluate_set`, the DC protocol) on :func:`training_labels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import ImageSet
from .errors import ConfigError
from .kernels import Kernel, KernelConfig, kernel_matrix

__all__ = ["regularise", "krr_predict", "kip_loss", "label_solve", "label_solve_set",
           "krr_accuracy", "one_hot_targets", "training_labels"]


def one_hot_targets(labels: torch.Tensor, num_classes: int, center: bool = True
                    ) -> torch.Tensor:
    """KRR targets (N, K) float64 from hard (N,) or soft (N, K) labels, centred by ``1/K``."""
    y = F.one_hot(labels, num_classes) if labels.dim() == 1 else labels
    y = y.double()
    return y - 1.0 / num_classes if center else y


def regularise(k_ss: torch.Tensor, reg: float) -> torch.Tensor:
    """``K_ss + reg * tr(K_ss) / n_s * I`` (the paper's scaling of the ridge, (n_s, n_s))."""
    n = k_ss.shape[0]
    scale = reg * torch.trace(k_ss) / n
    return k_ss + scale * torch.eye(n, dtype=k_ss.dtype, device=k_ss.device)


def _check_reg(reg: float) -> None:
    if not reg > 0:
        raise ConfigError(f"the KRR regulariser must be > 0, got {reg}")


def krr_predict(k_ts: torch.Tensor, k_ss: torch.Tensor, y_s: torch.Tensor, reg: float
                ) -> torch.Tensor:
    """Kernel ridge regression: ``K_ts (K_ss + reg * tr(K_ss)/n_s * I)^{-1} y_s``.

    Args:
        k_ts: (n_t, n_s); k_ss: (n_s, n_s) symmetric PSD; y_s: (n_s, K). Any float dtype
            (float64 recommended: the solve is ill-conditioned for small ``reg``).
        reg: lam > 0.

    Returns:
        (n_t, K) predictions, differentiable in all three inputs.
    """
    _check_reg(reg)
    k_reg = regularise(k_ss, reg)
    try:  # Cholesky: the regularised Gram matrix is positive definite
        chol = torch.linalg.cholesky(k_reg)
        alpha = torch.cholesky_solve(y_s.to(k_reg.dtype), chol)
    except RuntimeError:  # numerically indefinite: a general solve still works
        alpha = torch.linalg.solve(k_reg, y_s.to(k_reg.dtype))
    return k_ts @ alpha


def kip_loss(x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, y_t: torch.Tensor,
             kernel: Kernel, reg: float) -> torch.Tensor:
    """KIP's loss ``1/2 * mean((K_ts (K_ss + lam')^{-1} y_s - y_t)^2)`` (float64 scalar).

    Args:
        x_s: (n_s, ...) support images; y_s: (n_s, K) support labels (learnable or not).
        x_t: (n_t, ...) target images; y_t: (n_t, K) target labels.
        kernel: ``(x1, x2) -> (n1, n2)`` float64, e.g. :func:`~distill.kernels.make_kernel`.
        reg: lam > 0 (scaled by tr(K_ss)/n_s).
    """
    pred = krr_predict(kernel(x_t, x_s), kernel(x_s, x_s), y_s, reg)
    return 0.5 * torch.mean((pred - y_t.to(pred.dtype)) ** 2)


def label_solve(x_s: torch.Tensor, x_t: torch.Tensor, y_t: torch.Tensor, kernel: Kernel,
                reg: float, chunk: int = 4096) -> torch.Tensor:
    """Label Solve: the minimum-norm labels ``y_s = A^+ y_t``, ``A = K_ts (K_ss + lam')^{-1}``.

    ``y_s`` minimises ``||y_t - A y_s||_F`` over all labels for the fixed support ``x_s``; where
    the minimiser is not unique (n_t < n_s, or a rank-deficient ``A``) the one of least norm
    (the Moore-Penrose solution). ``A`` is formed in float64, ``chunk`` target rows at a time.

    Args:
        x_s: (n_s, ...) support images; x_t: (n_t, ...) target images; y_t: (n_t, K) labels.

    Returns:
        (n_s, K) float64 labels.
    """
    _check_reg(reg)
    k_reg = regularise(kernel(x_s, x_s), reg)
    rows = [kernel(x_t[i:i + chunk], x_s) for i in range(0, x_t.shape[0], chunk)]
    a = torch.linalg.solve(k_reg, torch.cat(rows).T).T  # K_ts K_reg^{-1} (K_reg symmetric)
    return torch.linalg.pinv(a) @ y_t.to(a.dtype)


@torch.no_grad()
def label_solve_set(images: torch.Tensor, real: ImageSet, kernel: KernelConfig,
                    reg: float = 1e-6, targets: int | None = 10000,
                    generator: torch.Generator | None = None, chunk: int = 4096
                    ) -> torch.Tensor:
    """LS for a given support (random real images, a coreset or any condensed set).

    Args:
        images: (n_s, C, H, W) support images (on the device of ``real``).
        real: the real training set; ``targets`` random images of it (all when ``None`` or
            larger) are the regression targets (one-hot, centred).
        kernel: the kernel (its ``depth``; ``family`` is ignored).

    Returns:
        (n_s, K) float32 labels on the one-hot scale (the centred solution + 1/K, rows sum
        to 1); KRR uses them as they are, networks via :func:`training_labels`.
    """
    k = real.info.num_classes
    x_t, y_t = real.images, real.labels
    if targets is not None and targets < x_t.shape[0]:
        if generator is None:
            raise ValueError("a random target subset needs a generator")
        idx = torch.randperm(x_t.shape[0], generator=generator)[:targets].to(x_t.device)
        x_t, y_t = x_t[idx], y_t[idx]
    y = label_solve(images, x_t, one_hot_targets(y_t, k),
                    lambda a, b: kernel_matrix(a, b, kernel), reg, chunk)
    return (y + 1.0 / k).float()


@torch.no_grad()
def krr_accuracy(x_s: torch.Tensor, y_s: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, kernel: Kernel, reg: float, chunk: int = 2048) -> float:
    """Test accuracy (%) of KRR on the support ``(x_s, y_s)``: the KIP paper's protocol.

    Args:
        y_s: (n_s,) hard or (n_s, K) soft / KRR labels; y_test: (n_test,) hard labels.
    """
    num_classes = int(y_s.shape[1]) if y_s.dim() == 2 else int(y_test.max()) + 1
    y = one_hot_targets(y_s, num_classes)
    _check_reg(reg)
    k_reg = regularise(kernel(x_s, x_s), reg)
    alpha = torch.linalg.solve(k_reg, y)
    correct = 0
    for i in range(0, x_test.shape[0], chunk):
        pred = kernel(x_test[i:i + chunk], x_s) @ alpha
        correct += int((pred.argmax(1) == y_test[i:i + chunk].to(pred.device)).sum())
    return 100.0 * correct / x_test.shape[0]


def training_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels a finite network can be trained on with (soft) cross-entropy.

    Hard labels stay as they are; KRR labels (LS, or any real-valued (N, K) labels) are
    projected onto the probability simplex: uncentred, negatives clipped to 0, rows
    renormalised (a row with no positive entry becomes its argmax one-hot).
    """
    if labels.dim() == 1:
        return labels
    if bool((labels >= 0).all()) and float((labels.sum(1) - 1).abs().max()) < 1e-5:
        return labels  # already probabilities (soft labels of a condensed set): untouched
    y = labels.double()
    if float(y.sum(1).abs().max()) < 1e-6:  # centred labels: rows sum to 0
        y = y + 1.0 / y.shape[1]
    y = y.clamp_min(0)
    mass = y.sum(1, keepdim=True)
    fallback = F.one_hot(labels.argmax(1), labels.shape[1]).double()
    return torch.where(mass > 0, y / mass.clamp_min(1e-12), fallback).float()
