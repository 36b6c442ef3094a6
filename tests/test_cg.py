"""The conjugate-gradient solver of the implicit hypergradient against the exact inverse
Hessian on small strongly convex problems (closed form), and beside the Neumann series."""

from __future__ import annotations

import pytest
import torch

from distill.hypergrad import cg_inverse_hvp, implicit_hypergradient, neumann_inverse_hvp
from distill.strategies import ConfigError, StrategyConfig

from .test_hypergrad import exact_hypergradient, inner, outer, problem, w_star

D = torch.float64


def quadratic(n: int = 8, seed: int = 0, condition: float = 50.0):
    """A random SPD matrix with eigenvalues from 1 to ``condition``, its gradient graph and v."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    a = q @ torch.diag(torch.linspace(1.0, condition, n, dtype=D)) @ q.T
    w = torch.zeros(n, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * w @ a @ w, w, create_graph=True)
    return a, w, grad, torch.randn(n, generator=g, dtype=D)


def test_cg_with_as_many_iterations_as_dimensions_is_exact_and_short_neumann_is_not():
    a, w, grad, v = quadratic()
    exact = torch.linalg.solve(a, v)
    (cg,) = cg_inverse_hvp([grad], [w], [v], iterations=8)
    torch.testing.assert_close(cg, exact, atol=1e-9, rtol=1e-9)
    (neumann,) = neumann_inverse_hvp([grad], [w], [v], terms=8, alpha=1.0 / 50.0)
    assert (neumann - exact).norm() > 0.1 * exact.norm()


def test_cg_error_falls_with_iterations_and_zero_iterations_give_zero():
    a, w, grad, v = quadratic(seed=1)
    exact = torch.linalg.solve(a, v)
    errors = [float((cg_inverse_hvp([grad], [w], [v], k)[0] - exact).norm()) for k in (1, 3, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert float(cg_inverse_hvp([grad], [w], [v], 0)[0].abs().sum()) == 0.0


def test_cg_works_over_several_parameter_tensors():
    a, _, _, v = quadratic(n=5, seed=2)
    w1 = torch.zeros(2, dtype=D, requires_grad=True)
    w2 = torch.zeros(3, dtype=D, requires_grad=True)
    w = torch.cat([w1, w2])
    grads = torch.autograd.grad(0.5 * w @ a @ w, [w1, w2], create_graph=True)
    x1, x2 = cg_inverse_hvp(list(grads), [w1, w2], [v[:2], v[2:]], iterations=5)
    torch.testing.assert_close(torch.cat([x1, x2]), torch.linalg.solve(a, v), atol=1e-9,
                               rtol=1e-9)


def test_cg_stops_at_negative_curvature():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    w = torch.zeros(2, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * w @ a @ w, w, create_graph=True)
    (x,) = cg_inverse_hvp([grad], [w], [torch.tensor([0.0, 1.0], dtype=D)], iterations=5)
    assert torch.isfinite(x).all() and float(x.abs().sum()) == 0.0


def test_implicit_hypergradient_by_cg_matches_the_closed_form_on_ridge_regression():
    xs, ys, xv, yv = problem()
    exact = exact_hypergradient(xs, ys, xv, yv)
    xs = xs.clone().requires_grad_()
    w = w_star(xs.detach(), ys).requires_grad_()
    (cg,) = implicit_hypergradient(inner(w, xs, ys), outer(w, xv, yv), [w], [xs], terms=3,
                                   solver="cg")  # 3 = dim(w): exact
    torch.testing.assert_close(cg, exact, atol=1e-10, rtol=1e-9)
    w = w.detach().requires_grad_()
    (neumann,) = implicit_hypergradient(inner(w, xs, ys), outer(w, xv, yv), [w], [xs],
                                        terms=3, alpha=0.2)
    assert (neumann - exact).norm() > 1e-3 * exact.norm()


def test_unknown_solver_is_refused():
    xs, ys, xv, yv = problem()
    w = w_star(xs, ys).requires_grad_()
    with pytest.raises(ValueError, match="neumann, cg"):
        implicit_hypergradient(inner(w, xs, ys), outer(w, xv, yv), [w], [xs], solver="lu")
    with pytest.raises(ConfigError, match="neumann, cg"):
        StrategyConfig(ift_solver="lu")
    with pytest.raises(ConfigError, match="trajectory"):
        StrategyConfig(ift_solver="cg", mixed_at="trajectory")


def test_the_implicit_strategy_takes_the_cg_solver():
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from distill.synthetic import SyntheticSet

    from .conftest import make_tiny_set

    data = make_tiny_set(per_class=4)
    info = data.info
    teacher = SyntheticSet.from_real(data, 1, generator(0, "cg"), steps=2)
    opt = torch.optim.SGD(teacher.parameters(), lr=1e-3)
    before = teacher.images.detach().clone()

    def student(g):
        return build_model("convnet:width=4,depth=1", info.channels, info.num_classes,
                           info.im_size, generator=g)

    stats = make_strategy("implicit", StrategyConfig(real_batch=4, neumann_terms=3,
                                                     ift_solver="cg")).step(
        teacher, opt, RealSampler(data), student, generator(1, "cg"))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(before, teacher.images.detach())
