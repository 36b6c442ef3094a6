"""The compiled real-data side (``gtn train --compile``): the scoring of unrolled and implicit
through ``torch.compile`` gives the eager (plain-path) loss and gradients, one compilation
serves every fresh student of an architecture, and whatever cannot be compiled stays eager."""

from __future__ import annotations

import copy
import logging
import shutil
import weakref

import pytest
import torch

import distill.inner as inner
from distill.inner import compiled_scoring, real_loss
from distill.memory import SavedTensorMeter
from distill.models import build_model, plain_path
from distill.rng import generator as make_generator
from distill.strategies import RealSampler, make_strategy
from gtn import GeneratorConfig
from gtn.compare import BUDGETS, cell_config
from gtn.train import make_teacher, recipe_config

from .conftest import make_tiny_set

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C++ compiler")

D = torch.float64
SPEC = "convnet:width=3,depth=2,first_pad=1"


def _student(seed: int = 0, spec: str = SPEC) -> torch.nn.Module:
    return build_model(spec, 1, 3, (12, 12), generator=make_generator(seed, "s")).to(D)


def _batch(n: int = 32):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 12, 12, generator=g, dtype=D), torch.randint(3, (n,), generator=g)


def _scored(net, x, y, compiled: bool, plain: bool = False):
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    with plain_path(plain), compiled_scoring(compiled):
        loss = real_loss(net, params, x, y)
        grads = torch.autograd.grad(loss, params)
    return [loss.detach(), *grads]


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(inner, "_SCORERS", {})
    monkeypatch.setattr(inner, "SCORE_PIECE_BYTES", 1)  # pieces of 8 images


def _count_compiles(monkeypatch) -> list:
    """torch.compile, recording each function it is asked to compile."""
    compiles: list = []
    real_compile = torch.compile

    def counting(fn, **kw):
        compiles.append(fn)
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", counting)
    return compiles


@needs_compiler
def test_compiled_scoring_is_the_plain_scoring_and_compiles_once(monkeypatch):
    compiles = _count_compiles(monkeypatch)
    x, y = _batch()
    for seed in (0, 1):  # two fresh students of one architecture: one compilation
        net = _student(seed)
        got = _scored(net, x, y, compiled=True)
        want = _scored(net, x, y, compiled=False, plain=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert len(compiles) == 1
    assert [v is not None for v in inner._SCORERS.values()] == [True]


def test_a_failing_compilation_warns_once_and_scores_eagerly(monkeypatch, caplog):
    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    net = _student()
    x, y = _batch()
    want = _scored(net, x, y, compiled=False)
    with caplog.at_level(logging.WARNING, logger="distill.inner"):
        got = _scored(net, x, y, compiled=True)
        again = _scored(net, x, y, compiled=True)
    for a, b, c in zip(got, want, again, strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert [r.getMessage() for r in caplog.records if "no compiler here" in r.getMessage()] \
        and len(caplog.records) == 1
    assert list(inner._SCORERS.values()) == [None]


def test_what_stays_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("compiled"))
    net, loss = _student(), inner.classification_loss
    with compiled_scoring(True):
        # batch norm (the statistics are buffers), the memory meter's hooks
        assert inner._compiled_scorer(_student(spec="convnet:width=3,norm=batch"), loss,
                                      torch.device("cpu")) is None
        with SavedTensorMeter():
            assert inner._compiled_scorer(net, loss, torch.device("cpu")) is None
    assert inner._compiled_scorer(net, loss, torch.device("cpu")) is None  # switched off


@needs_compiler
def test_steps_without_a_graph_take_the_compiled_gradient(monkeypatch):
    """student_steps(differentiable=False) within compiled_scoring: the same parameters and
    momentum buffers after T steps as the plain path's, one compilation for two fresh
    students (the scorer of real_loss: one architecture, one compilation per batch shape);
    differentiable steps (the unrolled graph) never take it."""
    compiles = _count_compiles(monkeypatch)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(10, 1, 12, 12, generator=g, dtype=D),
                torch.randint(3, (10,), generator=g)) for _ in range(3)]
    for seed in (0, 1):
        net = _student(seed)
        params = [p.detach() for p in net.parameters()]
        runs = []
        for compiled, plain in ((True, False), (False, True)):
            with plain_path(plain), compiled_scoring(compiled):
                runs.append(inner.student_steps(net, params, batches, 0.1, 0.5))
        got, want = runs
        for a, b in zip(got.params + got.buffers + got.step_losses,
                        want.params + want.buffers + want.step_losses, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert not torch.equal(got.params[0], params[0])  # the steps moved it
    assert len(compiles) == 1
    assert [v is not None for v in inner._SCORERS.values()] == [True]  # it did not fail
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("compiled"))
    monkeypatch.setattr(inner, "_SCORERS", {})
    with compiled_scoring(True):
        inner.student_steps(_student(), [p.detach() for p in _student().parameters()],
                            batches, 0.1, differentiable=True)


@needs_compiler
@pytest.mark.parametrize("method", ["unrolled", "matching", "implicit", "first-order-tail"])
def test_compiled_meta_gradient_matches_plain_path(method):
    """One meta-step of the recipe with the real-data side compiled (the scoring for
    unrolled and implicit, the real class gradients for matching) and the student's steps
    without a graph (implicit's T steps, the first-order-tail head, matching's student
    step): the teacher's gradients are the plain path's to float tolerance."""
    data = make_tiny_set(per_class=6)
    data.images = data.images.to(D)
    real = RealSampler(data)
    cfg = recipe_config(method, inner_steps=3, batch_size=20, real_batch=30,
                        match_real_per_class=4, student="convnet:width=3,depth=2,first_pad=1",
                        generator=GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4),
                        compile=True)
    assert cfg.meta_config().strategy_config.compile
    base = make_teacher(data.info, cfg, seed=0).to(D)
    seen = []
    for plain in (False, True):
        teacher = copy.deepcopy(base)
        strategy = make_strategy(cfg.meta_config().strategy, cfg.meta_config().strategy_config)
        for p in teacher.parameters():
            p.grad = None
        params = [p for p in teacher.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)  # keeps the gradients, moves nothing

        def student(gen):
            return build_model(cfg.student, 1, 10, (28, 28), generator=gen).to(D)

        with plain_path(plain), compiled_scoring(not plain):
            strategy.step(teacher, opt, real, student, make_generator(0, "compiled-test"))
        seen.append([p.grad.clone() for p in params if p.grad is not None])
        if not plain:
            assert strategy.compiled  # it did not fall back
    assert len(seen[0]) == len(seen[1]) > 0
    for fast, plain in zip(*seen, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-7, atol=1e-10)
    if method != "matching":  # the scoring and the steps without a graph
        assert any(v is not None for v in inner._SCORERS.values())


def test_the_demo_compiles_its_scored_cells_only():
    demo = BUDGETS["demo"]
    assert demo.compile and demo.accuracy_steps == 10
    assert cell_config(demo, "unrolled", 10).compile
    assert not cell_config(demo, "unrolled", 8).compile  # a memory-only cell
    assert not cell_config(BUDGETS["smoke"], "unrolled", 8).compile


def test_the_metered_step_takes_the_eager_real_side(monkeypatch):
    """Under the memory meter's hooks a compiling strategy hands its real side the module
    itself: the meter measures the eager path (a compiled graph saves other tensors)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: ("compiled", module))
    cfg = recipe_config("matching", inner_steps=2, batch_size=20, compile=True)
    strategy = make_strategy(cfg.meta_config().strategy, cfg.meta_config().strategy_config)
    net = _student()
    with SavedTensorMeter():
        assert strategy._fast(lambda m: m, net) is net
    assert strategy._fast(lambda m: m, net) == ("compiled", net)


def _generator_pair(seed: int = 0):
    """Two identical float64 GTN generators (MNIST-shaped, small) and a batch for them."""
    info = make_tiny_set(per_class=2).info
    cfg = GeneratorConfig(noise_dim=5, width_fc=12, width_conv=4)
    gen = make_teacher(info, recipe_config("unrolled", batch_size=20, generator=cfg),
                       seed=seed).generator.to(D)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 5, generator=g, dtype=D)
    return gen, copy.deepcopy(gen), z, torch.arange(20) % 10


def _forward_backward(gen, z, y, compiled: bool):
    w = torch.linspace(-1, 1, 20 * 28 * 28, dtype=D).view(20, 1, 28, 28)
    with compiled_scoring(compiled):
        x = inner.compiled_call(gen, z, y)
    grads = torch.autograd.grad((x * w).sum(), list(gen.parameters()))
    return [x.detach(), *grads, *[b.clone() for b in gen.buffers()]]


@needs_compiler
def test_the_generator_compiled_is_the_generator(monkeypatch):
    """compiled_call within compiled_scoring: a GTN generator's images, its parameters'
    gradients and its batch-norm statistics are the eager module's (float64), for two fresh
    generators."""
    monkeypatch.setattr(inner, "_FAILED_CALLS", set())
    monkeypatch.setattr(inner, "_CALLS_OF", weakref.WeakKeyDictionary())
    compiles = _count_compiles(monkeypatch)
    for seed in (0, 1):
        gen, twin, z, y = _generator_pair(seed)
        got = _forward_backward(gen, z, y, compiled=True)
        want = _forward_backward(twin, z, y, compiled=False)
        for a, b in zip(got, want, strict=True):  # (a bias before batch norm: ~1e-13, 0)
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert len(compiles) == 2 and not inner._FAILED_CALLS  # one per generator, none failed


def test_the_generator_stays_eager_where_it_must(monkeypatch, caplog):
    monkeypatch.setattr(inner, "_FAILED_CALLS", set())
    monkeypatch.setattr(inner, "_CALLS_OF", weakref.WeakKeyDictionary())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("compiled"))
    gen, _, z, y = _generator_pair()
    with compiled_scoring(True):
        gen.eval()  # sampling: eval mode
        inner.compiled_call(gen, z, y)
        gen.train()
        with SavedTensorMeter():  # the memory meter's hooks
            inner.compiled_call(gen, z, y)
        with plain_path():
            inner.compiled_call(gen, z, y)
    with compiled_scoring(True, steps=False):  # bench/compiled_steps.py's eager side
        inner.compiled_call(gen, z, y)
    inner.compiled_call(gen, z, y)  # outside compiled_scoring

    def fail(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fail)
    want = _forward_backward(copy.deepcopy(gen), z, y, compiled=False)
    with caplog.at_level(logging.WARNING, logger="distill.inner"):
        got = _forward_backward(gen, z, y, compiled=True)
        again = _forward_backward(copy.deepcopy(gen), z, y, compiled=True)
    assert all(torch.equal(a, b) for a, b in zip(got[:1], want[:1], strict=True))
    assert torch.equal(again[0], want[0])
    assert len([r for r in caplog.records if "no compiler here" in r.getMessage()]) == 1
