"""IFT + Neumann hypergradients against the closed form of ridge regression (the synthetic
inputs are the hyper-parameters, as in distillation) and against finite differences."""

from __future__ import annotations

import pytest
import torch

from distill.hypergrad import implicit_hypergradient, neumann_inverse_hvp

D = torch.float64  # explicit everywhere: never change the global default dtype in a test
MU = 0.5  # ridge strength: makes the inner problem strongly convex


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(6, 3, generator=g, dtype=D)  # "synthetic" inputs: the hyper-parameters
    ys = torch.randn(6, generator=g, dtype=D)
    xv, yv = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)
    return xs, ys, xv, yv


def inner(w, xs, ys):
    return ((xs @ w - ys) ** 2).mean() + MU * (w ** 2).sum()


def outer(w, xv, yv):
    return ((xv @ w - yv) ** 2).mean()


def w_star(xs, ys):
    """Closed form: (2/n XᵀX + 2 μ I) w = 2/n Xᵀ y."""
    n = xs.shape[0]
    return torch.linalg.solve(2 * xs.T @ xs / n + 2 * MU * torch.eye(3, dtype=D), 2 * xs.T @ ys / n)


def exact_hypergradient(xs, ys, xv, yv):
    xs = xs.clone().requires_grad_()
    (g,) = torch.autograd.grad(outer(w_star(xs, ys), xv, yv), xs)
    return g


def ift(xs, ys, xv, yv, terms, alpha):
    xs = xs.clone().requires_grad_()
    w = w_star(xs.detach(), ys).requires_grad_()
    (g,) = implicit_hypergradient(inner(w, xs, ys), outer(w, xv, yv), [w], [xs], terms, alpha)
    return g


def test_neumann_series_converges_to_the_inverse_hessian():
    a = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=D)
    w = torch.zeros(2, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * w @ a @ w, w, create_graph=True)
    v = torch.tensor([1.0, -2.0], dtype=D)
    (approx,) = neumann_inverse_hvp([grad], [w], [v], terms=200, alpha=0.4)
    torch.testing.assert_close(approx, torch.linalg.solve(a, v), atol=1e-8, rtol=0)
    (zero,) = neumann_inverse_hvp([grad], [w], [v], terms=0, alpha=0.4)
    torch.testing.assert_close(zero, 0.4 * v)


def test_ift_matches_the_closed_form_on_ridge_regression():
    xs, ys, xv, yv = problem()
    exact = exact_hypergradient(xs, ys, xv, yv)
    approx = ift(xs, ys, xv, yv, terms=300, alpha=0.2)
    torch.testing.assert_close(approx, exact, atol=1e-6, rtol=1e-5)


def test_ift_matches_finite_differences():
    xs, ys, xv, yv = problem(1)
    approx = ift(xs, ys, xv, yv, terms=300, alpha=0.2)
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (5, 2)]:
        plus, minus = xs.clone(), xs.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (outer(w_star(plus, ys), xv, yv) - outer(w_star(minus, ys), xv, yv)) / (2 * eps)
        assert approx[i, j].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-8)


def test_more_terms_approximate_better():
    xs, ys, xv, yv = problem(2)
    exact = exact_hypergradient(xs, ys, xv, yv)
    errs = [(ift(xs, ys, xv, yv, k, 0.2) - exact).norm().item() for k in (1, 5, 50)]
    assert errs[0] > errs[1] > errs[2]


def test_mixed_term_built_part_by_part_is_the_closed_form():
    # The inner loss is a sum of parts (a curriculum's batches): ridge on the first 3 rows plus
    # ridge on the last 3. Handing the parts separately (mixed_losses) must give the exact
    # hypergradient w.r.t. all 6 rows, with the Hessian taken from the whole loss.
    xs, ys, xv, yv = problem(2)
    x = xs.clone().requires_grad_()
    w = w_star(xs, ys).requires_grad_()

    def part(rows):
        return lambda: ((x[rows] @ w - ys[rows]) ** 2).sum() / 6 + MU / 2 * (w ** 2).sum()

    parts = [part(slice(0, 3)), part(slice(3, 6))]
    (g,) = implicit_hypergradient(inner(w, x, ys), outer(w, xv, yv), [w], [x], terms=400,
                                  alpha=0.3, mixed_losses=parts)
    torch.testing.assert_close(g, exact_hypergradient(xs, ys, xv, yv), atol=1e-8, rtol=1e-6)
    (one,) = implicit_hypergradient(inner(w, x, ys), outer(w, xv, yv), [w], [x], terms=400,
                                    alpha=0.3, mixed_losses=parts[:1])
    assert torch.all(one[3:] == 0) and torch.any(one[:3] != 0)  # a part reaches its own rows
