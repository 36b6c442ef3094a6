"""Implicit-function-theorem hypergradients with a Neumann-series or conjugate-gradient
inverse Hessian.

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020 (Algorithms 2 and 3). At an (approximate) optimum
``w*(h)`` of the inner loss ``L_T(w, h)``, the gradient of an outer loss ``L_V(w*(h), h)`` is

    dL_V/dh = ∂L_V/∂h − ∂L_V/∂w · H⁻¹ · ∂²L_T/∂w∂h,     H = ∂²L_T/∂w²,

and ``H⁻¹ v`` is approximated by ``α Σ_{j=0..K} (I − αH)^j v`` (convergent when
``0 < α < 2/λ_max(H)`` and H is positive definite). Hessian-vector products use double
backprop; no graph is kept across the inner training that produced ``w``, so memory does not
grow with the number of inner steps.

The linear solve ``H⁻¹ v`` is separate from what is differentiated (torchopt's
``custom_root(..., solve=)``, jaxopt's ``root_vjp(solve=)``): ``solver="neumann"`` (the
series above) or ``solver="cg"`` (conjugate gradient, :func:`cg_inverse_hvp`: exact after
``dim(w)`` iterations on a positive-definite H, where a truncated Neumann series is not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch

__all__ = ["grad_or_zero", "neumann_inverse_hvp", "cg_inverse_hvp", "SOLVERS",
           "implicit_hypergradient", "StepRecord",
           "step_size_hypergradient", "trajectory_coefficients", "trajectory_hypergradient",
           "sampled_parts"]

Tensors = Sequence[torch.Tensor]

#: The linear solvers of :func:`implicit_hypergradient` (``H⁻¹ v``).
SOLVERS = ("neumann", "cg")


def grad_or_zero(outputs: torch.Tensor | Tensors, inputs: Tensors,
                 grad_outputs: Tensors | None = None, retain_graph: bool | None = None
                 ) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros (not ``None``) for inputs the outputs do not reach."""
    inputs = list(inputs)
    raw = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                              allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, raw)]


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


def cg_inverse_hvp(inner_grads: Tensors, params: Tensors, v: Tensors, iterations: int,
                   tolerance: float = 0.0) -> list[torch.Tensor]:
    """Approximate ``H⁻¹ v`` with ``iterations`` steps of conjugate gradient (CG).

    Hestenes & Stiefel (1952); the solver torchopt's ``linear_solve.solve_cg`` and jaxopt's
    ``linear_solve.solve_cg`` offer for implicit differentiation. Starting from ``x_0 = 0``,
    ``r_0 = p_0 = v``, every iteration takes one Hessian-vector product (double backprop)::

        α_k = r_k·r_k / p_k·H p_k,   x_{k+1} = x_k + α_k p_k,   r_{k+1} = r_k − α_k H p_k,
        β_k = r_{k+1}·r_{k+1} / r_k·r_k,   p_{k+1} = r_{k+1} + β_k p_k.

    On a symmetric positive-definite H it is exact (in exact arithmetic) after ``n = dim(w)``
    iterations and minimises the H-norm of the error over the k-th Krylov space before that,
    so it needs no step size and converges at a rate set by √κ(H) (the Neumann series: κ).
    A network's Hessian need not be positive definite: a direction of non-positive curvature
    (``p·Hp <= 0``) ends the iterations with the current ``x`` (truncated CG, Steihaug 1983).

    Args:
        inner_grads: ∂L_T/∂w for ``params``, computed with ``create_graph=True``.
        params: the inner parameters w.
        v: the right-hand sides (same shapes as ``params``).
        iterations: K >= 0 (0 returns zeros).
        tolerance: stop early once ``||r|| <= tolerance · ||v||`` (0: run all K).

    Returns:
        ``x_K ≈ H⁻¹ v``, one tensor per parameter (detached).
    """
    x = [torch.zeros_like(t).detach() for t in v]
    r = [t.detach().clone() for t in v]
    p = [t.clone() for t in r]
    rr = _dot(r, r)
    stop = float(tolerance) ** 2 * float(rr)
    for _ in range(iterations):
        if float(rr) <= stop or float(rr) == 0.0:
            break
        hp = [h.detach() for h in torch.autograd.grad(inner_grads, params, grad_outputs=p,
                                                      retain_graph=True)]
        curvature = _dot(p, hp)
        if not float(curvature) > 0:  # not positive definite along p: keep what we have
            break
        alpha = rr / curvature
        x = [a + alpha * b for a, b in zip(x, p)]
        r = [a - alpha * b for a, b in zip(r, hp)]
        rr_next = _dot(r, r)
        p = [a + (rr_next / rr) * b for a, b in zip(r, p)]
        rr = rr_next
    return x


def implicit_hypergradient(inner_loss: torch.Tensor, outer_loss: torch.Tensor,
                           params: Tensors, hparams: Tensors, terms: int = 5,
                           alpha: float = 0.01,
                           mixed_losses: Iterable[Callable[[], torch.Tensor]] | None = None,
                           solver: str = "neumann") -> list[torch.Tensor]:
    """dL_V/dh by the implicit function theorem (see module docstring).

    Args:
        inner_loss: L_T(w, h), a scalar with a graph to both ``params`` and ``hparams``.
        outer_loss: L_V(w, h), a scalar with a graph to ``params`` (and maybe ``hparams``).
        params: the inner parameters w (at, or near, the inner optimum).
        hparams: the hyper-parameters h (e.g. synthetic images, or a generator's weights).
        terms, alpha: Neumann series length K and step α; with ``solver="cg"``, K is the
            number of CG iterations and α is not used.
        mixed_losses: when the inner loss is a sum of parts too large to hold in one graph
            (a GTN curriculum: one part per student step), zero-argument callables that build
            the parts one at a time; the mixed derivative is then accumulated part by part, so
            memory stays that of one part, and ``inner_loss`` (e.g. one part, or a sample of
            them) serves only the Hessian-vector products.
        solver: how ``H⁻¹ v`` is solved: ``neumann`` (:func:`neumann_inverse_hvp`) or ``cg``
            (:func:`cg_inverse_hvp`).

    Returns:
        One gradient per hyper-parameter (zeros where it does not influence the losses).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    params, hparams = list(params), list(hparams)
    v = grad_or_zero(outer_loss, params, retain_graph=True)
    direct = torch.autograd.grad(outer_loss, hparams, retain_graph=True, allow_unused=True)
    inner_grads = torch.autograd.grad(inner_loss, params, create_graph=True)
    p = neumann_inverse_hvp(inner_grads, params, v, terms, alpha) if solver == "neumann" \
        else cg_inverse_hvp(inner_grads, params, v, terms)
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


class StepRecord:
    """The update directions of T momentum-SGD student steps, for
    :func:`step_size_hypergradient`.

    Step ``s`` moves the student by ``-lr_s · buf_s`` with ``buf_s = m · buf_{s-1} + d_s``
    (``torch.optim.SGD``'s convention: ``buf_0 = d_0``). Only ``buf_s`` is kept, flattened:
    T vectors of the student's size (no graph), small beside one step's activations.
    """

    def __init__(self, momentum: float = 0.0) -> None:
        self.momentum = float(momentum)
        self.buffers: list[torch.Tensor] = []

    def add(self, buffer: Tensors) -> None:
        """Record ``buf_s`` (one tensor per student parameter) after step ``s``."""
        self.buffers.append(torch.cat([b.detach().reshape(-1) for b in buffer]).clone())


def step_size_hypergradient(record: StepRecord, outer_grad: Tensors,
                            lr: torch.Tensor | float, momentum: torch.Tensor | float | None,
                            hparams: Tensors) -> list[torch.Tensor]:
    """First-order hypergradient of the outer loss w.r.t. the student's step sizes.

    The implicit gradient cannot reach the per-step learning rates or the momentum: the
    inner optimum does not depend on them. Their gradient through the trajectory,
    with the Jacobians ``∂w_T/∂w_{s+1}`` of the later steps taken as the identity and each
    step's direction ``d_s`` as a constant (the approximation of hypergradient descent,
    Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018,
    here for the final loss of the whole run), is

        dL/dlr_s = −v · buf_s,       dL/dm = −Σ_s lr_s · v · D_s,
        D_0 = 0,  D_s = buf_{s-1} + m · D_{s-1}   (= ∂buf_s/∂m),

    with ``v = ∂L_V/∂w`` at the trained student. It is exact for the last step's lr and, with
    two steps, for the momentum (the tests check both against autograd); no graph is kept,
    so memory does not grow with T beyond the T recorded directions.

    Args:
        record: the directions of the T steps.
        outer_grad: ``v``, one tensor per student parameter.
        lr: the learned step size(s): a scalar or (T,) tensor with a graph to ``hparams``
            (a float or no graph: not learned).
        momentum: the learned momentum (a tensor with a graph), or a fixed float / ``None``.
        hparams: the teacher's parameters; the result has one gradient per entry.

    Returns:
        One tensor per hyper-parameter (zeros where the step sizes do not depend on it).
    """
    v = torch.cat([g.detach().reshape(-1) for g in outer_grad])
    b = torch.stack([v @ buf for buf in record.buffers])           # (T,)  v · buf_s
    m = record.momentum
    a = [torch.zeros((), dtype=b.dtype, device=b.device)]          # v · D_s
    for s in range(1, b.numel()):
        a.append(b[s - 1] + m * a[-1])
    a_t = torch.stack(a)
    surrogate = torch.zeros((), dtype=b.dtype, device=b.device)
    if isinstance(lr, torch.Tensor):
        lr_values = lr.expand(b.numel()) if lr.dim() == 0 else lr
    else:
        lr_values = torch.full_like(b, float(lr))
    if lr_values.requires_grad:
        surrogate = surrogate - (lr_values * b).sum()
    if isinstance(momentum, torch.Tensor) and momentum.requires_grad:
        surrogate = surrogate - momentum * (lr_values.detach() * a_t).sum()
    hparams = list(hparams)
    if not surrogate.requires_grad:
        return [torch.zeros_like(h) for h in hparams]
    return grad_or_zero(surrogate, hparams)


def trajectory_coefficients(lrs: Sequence[float], momentum: float) -> list[float]:
    """``c_t = Σ_{s≥t} lr_s · m^{s−t}``: how much of step t's gradient ends up in ``w_T``.

    Momentum SGD (``buf_s = m · buf_{s−1} + g_s``, ``w_{s+1} = w_s − lr_s · buf_s``) moves the
    student by ``w_T − w_0 = −Σ_t c_t · g_t``.
    """
    out, acc = [0.0] * len(lrs), 0.0
    for t in reversed(range(len(lrs))):
        acc = lrs[t] + momentum * acc
        out[t] = acc
    return out


def trajectory_hypergradient(model: torch.nn.Module, snapshots: Sequence[Tensors],
                             batches: Sequence[Callable[[], tuple[torch.Tensor, torch.Tensor]]],
                             coefficients: Sequence[float], outer_grad: Tensors,
                             hparams: Tensors,
                             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             extra: tuple[Sequence[float], Tensors] | None = None
                             ) -> list[torch.Tensor]:
    """First-order hypergradient through a training trajectory, one step's graph at a time.

    With the Jacobians ``∂w_T/∂w_{t+1}`` of the later steps taken as the identity (the
    first-order approximation of MAML, Finn, Abbeel & Levine, ICML 2017, and of
    hypergradient descent, Baydin et al., ICLR 2018), ``w_T = w_0 − Σ_t c_t g_t(w_t, h)`` gives

        dL_V/dh ≈ −Σ_t c_t · ∂/∂h [ v · g_t(w_t, h) ],     v = ∂L_V/∂w at w_T,

    each term evaluated at the student state ``w_t`` where batch t was actually trained on
    (the implicit gradient evaluates every batch at ``w_T`` instead). Exact for one step.
    Memory: the T parameter snapshots and one step's graph.

    Args:
        model: the student (its parameters are replaced by each snapshot in turn).
        snapshots: ``w_t`` before step t, one list of tensors (the model's trainable
            parameters, in ``named_parameters`` order) per selected step.
        batches: callables rebuilding batch t's (images, targets) with a graph to ``hparams``.
        coefficients: ``c_t`` per selected step (times any sampling scale).
        outer_grad: ``v``.
        hparams: the teacher's parameters.
        loss_fn: the inner loss.
        extra: ``(e_t, u)``: a second direction; step t then contributes
            ``−∂/∂h [(c_t v + e_t u) · g_t]`` (one double-backward pass per step for both).
            Used where the gradient reaches the steps through two states (the parameters and
            the momentum buffer at the start of an exactly unrolled tail).

    Returns:
        One gradient per hyper-parameter (zeros where it does not influence the batches).
    """
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    hparams = list(hparams)
    total = [torch.zeros_like(h) for h in hparams]
    v = [g.detach() for g in outer_grad]
    es, u = (list(extra[0]), [g.detach() for g in extra[1]]) if extra is not None else \
        ([0.0] * len(snapshots), None)
    for w_t, make_batch, c, e in zip(snapshots, batches, coefficients, es):
        w = [p.detach().requires_grad_() for p in w_t]
        x, y = make_batch()
        loss = loss_fn(functional_call(model, dict(zip(names, w)), (x,)), y)
        g = torch.autograd.grad(loss, w, create_graph=True)
        direction = v if u is None else [c * a + e * b for a, b in zip(v, u)]
        mixed = torch.autograd.grad(_dot(g, direction), hparams, allow_unused=True)
        scale = c if u is None else 1.0
        for i, m in enumerate(mixed):
            if m is not None:
                total[i] = total[i] - scale * m
    return total


def sampled_parts(parts: Sequence[Callable[[], torch.Tensor]], picks: Sequence[int]
                  ) -> list[Callable[[], torch.Tensor]]:
    """An unbiased estimate of ``Σ_t part_t`` from the parts at ``picks``: each picked part
    scaled by ``T / k``. Drawn uniformly without replacement, every part is picked with
    probability ``k / T``, so the expectation is the full sum (the tests average all subsets).
    """
    scale = len(parts) / len(picks)

    def scaled(part: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: scale * part()

    return [scaled(parts[t]) for t in picks]
