"""Instance norm's fused second derivative (``distill.models.fused_norm_derivatives``, on with
``gtn train --compile``): the closed form is autograd's double backward of the native
kernel, the meta-gradients through it are the native path's, and it steps aside where it
cannot run (torch.func transforms, saved-tensor hooks, the plain path, a failed compile)."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

import distill.models as models
from distill.inner import compiled_scoring
from distill.memory import SavedTensorMeter
from distill.models import (
    InstanceNorm,
    build_model,
    fused_norm_derivatives,
    instance_norm_second,
    plain_path,
)
from distill.rng import generator as make_generator
from distill.strategies import RealSampler, make_strategy
from gtn import GeneratorConfig
from gtn.train import make_teacher, recipe_config

from .conftest import make_tiny_set

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C++ compiler")

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def eager_second(monkeypatch):
    """The closed form without compiling it (these tests check the algebra and the
    plumbing; the compiled function is tested where a compiler is present), counting
    its calls."""
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return instance_norm_second(*args)

    monkeypatch.setattr(models, "_SECOND", [counted])
    return calls


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 2, 1, 3), (2, 3, 8, 8)])
def test_closed_form_is_autograds_double_backward(shape):
    """Against autograd differentiating torch's own group-norm backward (float64)."""
    g0 = _gen(sum(shape))
    n, c = shape[:2]
    x = torch.randn(*shape, generator=g0, dtype=D, requires_grad=True)
    w = torch.randn(c, generator=g0, dtype=D, requires_grad=True)
    b = torch.randn(c, generator=g0, dtype=D, requires_grad=True)
    g = torch.randn(*shape, generator=g0, dtype=D, requires_grad=True)
    gdx = torch.randn(*shape, generator=g0, dtype=D)
    gdw, gdb = torch.randn(c, generator=g0, dtype=D), torch.randn(c, generator=g0, dtype=D)
    y = F.group_norm(x, c, w, b, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
    want = torch.autograd.grad((dx, dw, db), (x, w, g), (gdx, gdw, gdb))
    _, mean, rstd = torch.native_group_norm(x.detach(), w.detach(), b.detach(), n, c,
                                            shape[2] * shape[3], c, 1e-5)
    got = instance_norm_second(x.detach(), w.detach(), mean, rstd, g.detach(), gdx, gdw, gdb)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck(eager_second):
    g0 = _gen(1)
    x = torch.randn(2, 3, 4, 5, generator=g0, dtype=D, requires_grad=True)
    norm = InstanceNorm(3).to(D)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3, generator=g0, dtype=D))
        norm.bias.copy_(torch.randn(3, generator=g0, dtype=D))

    def f(x, w, b):
        return models._InstanceNormFn.apply(x, w, b, norm.eps)

    inputs = (x, norm.weight, norm.bias)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    assert eager_second  # the second derivative came from the closed form


def _meta_gradient(net: torch.nn.Module, fused: bool) -> torch.Tensor:
    """d(real loss after one differentiable SGD step)/d(training images)."""
    g0 = _gen(7)
    imgs = torch.randn(5, 1, 12, 12, generator=g0, dtype=D, requires_grad=True)
    labels = torch.randint(3, (5,), generator=g0)
    real, real_labels = torch.randn(6, 1, 12, 12, generator=g0, dtype=D), \
        torch.randint(3, (6,), generator=g0)
    names = [n for n, _ in net.named_parameters()]
    with fused_norm_derivatives(fused):
        params = list(net.parameters())
        loss = F.cross_entropy(net(imgs), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        stepped = {n: p - 0.3 * gr for n, p, gr in zip(names, params, grads, strict=True)}
        out = torch.func.functional_call(net, stepped, (real,))
        return torch.autograd.grad(F.cross_entropy(out, real_labels), imgs)[0]


def test_meta_gradient_through_a_student_is_the_native_one(eager_second):
    net = build_model("convnet:width=4,depth=2,first_pad=1", 1, 3, (12, 12),
                      generator=make_generator(0, "s")).to(D)
    assert isinstance(net.features[1], torch.nn.GroupNorm)  # same module type and state
    want = _meta_gradient(net, fused=False)
    assert not eager_second
    got = _meta_gradient(net, fused=True)
    assert len(eager_second) == 2  # both norms' second derivatives took the closed form
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_native_path_where_the_fused_one_cannot_run(eager_second):
    net = build_model("convnet:width=4,depth=2,first_pad=1", 1, 3, (12, 12),
                      generator=make_generator(0, "s")).to(D)
    x = torch.randn(4, 1, 12, 12, generator=_gen(2), dtype=D)
    with fused_norm_derivatives(True):
        with plain_path():
            assert net.features[1](net.features[0](x)).grad_fn.name() == \
                "NativeGroupNormBackward0"
        with SavedTensorMeter():
            assert net.features[1](net.features[0](x)).grad_fn.name() == \
                "NativeGroupNormBackward0"
        assert "InstanceNormFn" in net.features[1](net.features[0](x)).grad_fn.name()
        # per-example gradients (torch.func) run the native kernels, and agree
        params = {k: v.detach() for k, v in net.named_parameters()}

        def loss(p, xi):
            return torch.func.functional_call(net, p, (xi[None],)).sum()

        per_image = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    one = torch.autograd.grad(net(x[:1]).sum(), list(net.parameters()))
    for a, b in zip([per_image[k][0] for k in params], one, strict=True):
        torch.testing.assert_close(a, b)


def test_a_failing_compilation_warns_once_and_runs_the_closed_form(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(models, "_SECOND", [broken])
    net = build_model("convnet:width=4,depth=2,first_pad=1", 1, 3, (12, 12),
                      generator=make_generator(0, "s")).to(D)
    want = _meta_gradient(net, fused=False)
    with caplog.at_level(logging.WARNING, logger="gtnkit"):
        got = _meta_gradient(net, fused=True)
        again = _meta_gradient(net, fused=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(again, want, rtol=1e-10, atol=1e-14)
    assert len([r for r in caplog.records if "no compiler here" in r.getMessage()]) == 1
    assert models._SECOND == [False]


@needs_compiler
@pytest.mark.parametrize("method", ["unrolled", "implicit"])
def test_compiled_second_derivative_in_a_gtn_meta_step(monkeypatch, method):
    """One meta-step with ``--compile`` (the fused second derivative compiled for real)
    gives the teacher the plain path's gradients."""
    monkeypatch.setattr(models, "_SECOND", [None])
    data = make_tiny_set(per_class=6)
    data.images = data.images.to(D)
    real = RealSampler(data)
    cfg = recipe_config(method, inner_steps=3, batch_size=20, real_batch=30,
                        student="convnet:width=3,depth=2,first_pad=1",
                        generator=GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4),
                        compile=True)
    base = make_teacher(data.info, cfg, seed=0).to(D)
    seen = []
    for plain in (False, True):
        teacher = copy.deepcopy(base)
        strategy = make_strategy(cfg.method, cfg.meta_config().strategy_config)
        params = [p for p in teacher.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)

        def student(gen):
            return build_model(cfg.student, 1, 10, (28, 28), generator=gen).to(D)

        with plain_path(plain), compiled_scoring(not plain):
            strategy.step(teacher, opt, real, student, make_generator(0, "fused-test"))
        seen.append([p.grad.clone() for p in params if p.grad is not None])
    assert models._SECOND[0] not in (None, False)  # compiled, and it did not fail
    assert len(seen[0]) == len(seen[1]) > 0
    for fast, plain in zip(*seen, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-7, atol=1e-10)
