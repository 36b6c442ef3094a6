"""The fast path computes what the plain path computes.

Every layer and scoring of the fast path (:func:`distill.models.plain_path` off) is compared
with torch's plain one, in the same test, on tiny float64 data: forward values, first
derivatives, second derivatives (the inner loop's double backward), and one whole GTN
meta-gradient per method and recipe, to float tolerance. Nothing is compared against a stored
number.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distill.inner as inner
from distill.engine import classification_loss
from distill.inner import real_loss, student_steps
from distill.models import AvgPool2x2, build_model, fast_path, plain_path
from distill.rng import generator as make_generator
from distill.strategies import RealSampler, make_strategy
from gtn import GeneratorConfig
from gtn.train import make_teacher, recipe_config

from .conftest import make_tiny_set

D = torch.float64


def close(a, b, tol=1e-10):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert torch.allclose(x, y, rtol=tol, atol=tol), (x - y).abs().max()


def derivatives(layer_fast, layer_plain, x, params_fast, params_plain):
    """(forward, first derivative, a second derivative) of a layer on both paths."""
    out = []
    for plain, layer, params in ((False, layer_fast, params_fast),
                                 (True, layer_plain, params_plain)):
        with plain_path(plain):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=D)
            g.requires_grad_()
            first = torch.autograd.grad(y, [xi, *params], g, create_graph=True)
            # a second derivative through the first: d/d(x, params) of <first, v>
            v = [torch.randn(f.shape, generator=torch.Generator().manual_seed(2 + i), dtype=D)
                 for i, f in enumerate(first)]
            second = torch.autograd.grad(sum((f * w).sum() for f, w in zip(first, v)),
                                         [xi, g, *params], allow_unused=True,
                                         materialize_grads=True)
            # and the plain first derivative (no graph: the fast formula where there is one)
            xi2 = x.clone().requires_grad_()
            plain_first = torch.autograd.grad(layer(xi2), [xi2, *params], g.detach())
        out.append((y.detach(), first, second, plain_first))
    return out


def test_switch_restores():
    assert fast_path()
    with plain_path():
        assert not fast_path()
        with plain_path(False):
            assert fast_path()
        assert not fast_path()
    assert fast_path()


@pytest.mark.parametrize("shape", [(3, 2, 6, 8), (2, 3, 5, 4), (1, 1, 2, 2)])
def test_pool_matches_avg_pool(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=D) * 3
    (yf, ff, sf, pf), (yp, fp, sp, pp) = derivatives(AvgPool2x2(), nn.AvgPool2d(2), x, [], [])
    close([yf], [yp])
    close(ff, fp)
    close(pf, pp)
    close(sf, sp)


def _student(seed=0, spec="convnet:width=4,depth=2,first_pad=1", channels=1, size=12):
    return build_model(spec, channels, 3, (size, size),
                       generator=torch.Generator().manual_seed(seed)).to(D)


@pytest.mark.parametrize("spec", ["convnet:width=4,depth=2,first_pad=1",
                                  "convnet:width=3,depth=3", "convnet:width=4,norm=batch"])
def test_student_steps_and_their_derivatives_match(spec):
    """Two differentiable SGD steps of a ConvNet student and the loss after them: the
    gradient to the batches and to the learned rates (a double backward) on both paths."""
    net = _student(spec=spec)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 6, 1, 12, 12, generator=g, dtype=D)
    ys = torch.randint(3, (2, 6), generator=g)
    xr = torch.randn(10, 1, 12, 12, generator=g, dtype=D)
    yr = torch.randint(3, (10,), generator=g)
    results = []
    for plain in (False, True):
        with plain_path(plain):
            model = copy.deepcopy(net)
            x = xs.clone().requires_grad_()
            lr = torch.tensor([0.1, 0.2], dtype=D, requires_grad=True)
            state = student_steps(model, [p.detach() for p in model.parameters()],
                                  [(x[0], ys[0]), (x[1], ys[1])], lr, 0.5, 1e-3,
                                  differentiable=True)
            loss = real_loss(model, state.params, xr, yr)
            results.append([loss.detach(), *torch.autograd.grad(loss, [x, lr])])
    close(results[0], results[1], 1e-9)


def test_real_loss_in_pieces_matches_and_refuses_a_second_derivative(monkeypatch):
    net = _student()
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 1, 12, 12, generator=g, dtype=D)
    y = torch.randint(3, (37,), generator=g)
    monkeypatch.setattr(inner, "SCORE_PIECE_BYTES", 1)  # pieces of 8 images: 5 of them
    assert inner.score_chunk(net, x) == 8
    fast = real_loss(net, params, x, y)
    gf = torch.autograd.grad(fast, params)
    with plain_path():
        plain = real_loss(net, params, x, y)
        gp = torch.autograd.grad(plain, params)
    close([fast.detach(), *gf], [plain.detach(), *gp])
    again = real_loss(net, params, x, y)
    (first,) = torch.autograd.grad(again, params[:1], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), params[:1])


def test_scoring_pieces_are_equal_where_a_divisor_is_near():
    net = build_model("convnet:width=16,depth=2,first_pad=1", 1, 10, (28, 28))
    # 4 MiB / (16 x 28 x 28 x 4 bytes) = 83 images: 512 -> 8 pieces of 64, 128 -> 2 of 64
    assert inner.score_chunk(net, torch.zeros(512, 1, 28, 28)) == 64
    assert inner.score_chunk(net, torch.zeros(128, 1, 28, 28)) == 64
    assert inner.score_chunk(net, torch.zeros(83 * 3 + 1, 1, 28, 28)) == 50  # 250: 5 x 50
    assert inner.score_chunk(net, torch.zeros(167, 1, 28, 28)) == 83  # a prime: as before


def test_scoring_pieces_are_whole_batches_for_batch_norm():
    net = _student(spec="convnet:width=4,norm=batch")
    assert inner.score_chunk(net, torch.zeros(100, 1, 12, 12)) is None


class _Recorder(torch.optim.Optimizer):
    """An optimiser that keeps every gradient it is asked to apply, and applies none."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # noqa: ARG002 - the Optimizer signature
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]
                          if p.grad is not None])


CASES = {
    "unrolled recipe": ("unrolled", {}),
    "unrolled recipe recomputed": ("unrolled", {"recompute": True}),
    "implicit recipe": ("implicit", {}),
    "implicit, IFT (all T mixed terms)": ("implicit", {"mixed_at": "final",
                                                       "step_size_grad": False}),
    "matching recipe": ("matching", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_matches_plain_path(case, monkeypatch):
    """One meta-step of each method's recipe on tiny MNIST-shaped data: every gradient the
    teacher receives is the plain path's, to float tolerance (real scoring in pieces)."""
    monkeypatch.setattr(inner, "SCORE_PIECE_BYTES", 1)
    data = make_tiny_set(per_class=6)
    data.images = data.images.to(D)
    real = RealSampler(data)
    method, options = CASES[case]
    cfg = recipe_config(method, inner_steps=3, batch_size=20, real_batch=30,
                        match_real_per_class=4, student="convnet:width=3,depth=2,first_pad=1",
                        generator=GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4),
                        **options)
    base = make_teacher(data.info, cfg, seed=0).to(D)
    seen = []
    for plain in (False, True):
        teacher = copy.deepcopy(base)
        opt = _Recorder([p for p in teacher.parameters() if p.requires_grad])
        strategy = make_strategy(cfg.method, cfg.meta_config().strategy_config)

        def student(gen):
            return build_model(cfg.student, 1, 10, (28, 28), generator=gen).to(D)

        with plain_path(plain):
            strategy.step(teacher, opt, real, student, make_generator(0, "speed-test"))
        seen.append(opt.seen)
    assert len(seen[0]) == len(seen[1]) > 0
    for fast, plain in zip(*seen):
        close(fast, plain, 1e-8)
        assert any(bool(g.abs().sum() > 0) for g in fast)


def test_plain_meta_loss_value_is_the_forward_loss():
    """The fast scoring returns the loss value itself (a guard on the piece weights)."""
    net = _student()
    x = torch.randn(9, 1, 12, 12, dtype=D)
    y = torch.randint(3, (9,))
    params = [p.detach().requires_grad_() for p in net.parameters()]
    with torch.no_grad():
        want = classification_loss(net(x), y)
    assert torch.allclose(real_loss(net, params, x, y).detach(), want, rtol=1e-12)


def test_pool_under_torch_func_transforms():
    """The NTK (``vmap(jacrev)``) and per-example gradients (``vmap(grad)``) of a ConvNet
    see the same derivatives through the fast pooling."""
    from torch.func import functional_call, grad, jacrev, vmap

    net = _student(spec="convnet:width=3,depth=2")
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(5), dtype=D)
    y = torch.tensor([0, 1, 2, 0])

    def f(p, xi):
        return functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    def loss(p, xi, yi):
        return classification_loss(f(p, xi).unsqueeze(0), yi.unsqueeze(0))

    out = []
    for plain in (False, True):
        with plain_path(plain):
            j = vmap(jacrev(f), (None, 0))(params, x)
            g = vmap(grad(loss), (None, 0, 0))(params, x, y)
        out.append([*j.values(), *g.values()])
    close(out[0], out[1])
