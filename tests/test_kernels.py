"""Closed-form FC kernels against Monte Carlo estimates from wide random ReLU networks, their
symmetry / PSD / differentiability, the empirical NTK and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.kernels import (
    KernelConfig,
    KernelError,
    empirical_ntk,
    fc_kernels,
    kernel_matrix,
    make_kernel,
)
from distill.strategies import ConfigError


class WideReLU(nn.Module):
    """An FC ReLU network in the NTK parameterisation: every layer computes
    ``sqrt(w_var / fan_in) * W a + sqrt(b_var) * b`` with standard-normal ``W``, ``b``."""

    def __init__(self, d: int, width: int, depth: int, w_var: float, b_var: float,
                 g: torch.Generator):
        super().__init__()
        dims = [d] + [width] * depth + [1]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(o, i, generator=g))
                                        for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(o, generator=g))
                                       for o in dims[1:])
        self.w_var, self.b_var = w_var, b_var

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.weights) - 1):  # no slicing: it would copy the parameters
            w, b = self.weights[i], self.biases[i]
            x = torch.relu(math.sqrt(self.w_var / w.shape[1]) * x @ w.T
                           + math.sqrt(self.b_var) * b)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weights[-1], self.biases[-1]
        return math.sqrt(self.w_var / w.shape[1]) * self.last_hidden(x) @ w.T \
            + math.sqrt(self.b_var) * b


def _points(g: torch.Generator) -> torch.Tensor:
    x = torch.randn(6, 16, generator=g)
    x[1] = 0.9 * x[0] + 0.1 * x[1]  # a near-duplicate: cosine close to 1
    x[2] = -x[3]                    # an antipodal pair: cosine -1
    return x


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_closed_form_matches_wide_random_networks(depth):
    """Width 2048, 4 networks: the NNGP is the mean of the last hidden layer's second moment
    (w_var/n * <relu(h), relu(h')> + b_var), the NTK the mean gradient inner product. Both
    agree with the recursion within 8 % of the largest entry (measured at these seeds: NNGP
    2.4 / 4.9 / 1.5 %, NTK 1.6 / 2.3 / 2.1 % for depth 1 / 2 / 3, the Monte Carlo error of
    this width and sample count; a wrong recursion, e.g. a missing Sdot term or 1/pi instead
    of 1/(2 pi), is off by 30 % or more)."""
    g = torch.Generator().manual_seed(depth)
    x = _points(g)
    w_var, b_var, width = 2.0, 0.1, 2048
    nngp, ntk = fc_kernels(x, x, depth, w_var, b_var)
    mc_nngp, mc_ntk = [], []
    for _ in range(4):
        net = WideReLU(16, width, depth, w_var, b_var, g)
        with torch.no_grad():
            a = net.last_hidden(x).double()
        mc_nngp.append(w_var / width * a @ a.T + b_var)
        mc_ntk.append(empirical_ntk(net, x, x))
    mc_nngp, mc_ntk = torch.stack(mc_nngp).mean(0), torch.stack(mc_ntk).mean(0)
    assert float((mc_nngp - nngp).abs().max() / nngp.abs().max()) < 0.08
    assert float((mc_ntk - ntk).abs().max() / ntk.abs().max()) < 0.08


def test_kernels_are_symmetric_psd_float64_and_shape_agnostic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1, 4, 4, generator=g)
    for name in ("ntk", "nngp"):
        k = make_kernel(name, depth=2)(x, x)
        assert k.dtype == torch.float64 and k.shape == (7, 7)
        assert torch.allclose(k, k.T)
        assert float(torch.linalg.eigvalsh(k).min()) > -1e-10
        # a block of a bigger Gram matrix is the Gram matrix of the block
        assert torch.allclose(make_kernel(name, depth=2)(x[:3], x[2:]), k[:3, 2:])


def test_depth_one_nngp_is_the_arc_cosine_kernel_by_hand():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])  # orthogonal: theta = pi/2
    nngp, ntk = fc_kernels(x, y, depth=1, w_var=2.0, b_var=0.0)
    s11, s22 = 2.0 * 1 / 2, 2.0 * 4 / 2  # Sigma_0 on the diagonal
    expected = 2.0 * math.sqrt(s11 * s22) * (1 + 0) / (2 * math.pi)  # sin + (pi-theta)*cos
    assert float(nngp) == pytest.approx(expected)
    assert float(ntk) == pytest.approx(expected + 0.0 * 2.0 * 0.25)  # Theta_0 = 0 here


def test_gradients_are_finite_on_the_diagonal_and_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(3, 5, dtype=torch.float64, generator=g)
    k = make_kernel("ntk", depth=3)
    (k(x, x).sum() + k(y, x).sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(lambda a: k(a, y), (x.detach().requires_grad_(),))


def test_family_draws_depths_in_range_and_is_reproducible():
    cfg = KernelConfig(depth=3, family=True)
    draws = [cfg.sample_depth(torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2, 3}
    assert KernelConfig(depth=3).sample_depth(torch.Generator()) == 3
    x = torch.randn(3, 4)
    assert torch.equal(kernel_matrix(x, x, cfg, depth=2), make_kernel("ntk", 2)(x, x))


def test_empirical_ntk_of_a_zoo_model_is_symmetric_psd():
    from distill.models import build_model

    g = torch.Generator().manual_seed(0)
    model = build_model("mlp", 1, 10, (8, 8), generator=g)
    x = torch.randn(5, 1, 8, 8, generator=g)
    k = empirical_ntk(model, x, x)
    assert k.shape == (5, 5) and torch.allclose(k, k.T)
    assert float(torch.linalg.eigvalsh(k).min()) > -1e-6 * float(k.diagonal().max())
    assert model.training  # the mode is restored


@pytest.mark.parametrize("kw, match", [
    (dict(name="rbf"), "unknown kernel 'rbf'; choose from ntk, nngp"),
    (dict(depth=0), "depth must be an integer >= 1, got 0"),
    (dict(w_var=-1.0), "variances"),
])
def test_bad_options_are_one_typed_line(kw, match):
    with pytest.raises(KernelError, match=match) as err:
        KernelConfig(**kw)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
