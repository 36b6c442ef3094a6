"""The GTN training recipe: meta-lr schedule, gradient clipping, intermediate losses and the
first-order step-size hypergradient of the implicit strategy, each against an independent
computation (closed form, a hand-written loop, autograd through the unroll)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.condense import ConfigError, MetaConfig, condense, condense_config, scheduled_lr
from distill.hypergrad import StepRecord, step_size_hypergradient
from distill.strategies import Strategy, StrategyConfig
from distill.unrolled import unrolled_loss
from gtn import GTN_METHODS, GTNConfig
from gtn.generator import GeneratorError

from .conftest import Kill, killer, make_tiny_set

D = torch.float64


# ------------------------------------------------------------------ meta-lr schedule
def test_cosine_schedule_closed_form():
    lr, n, floor = 0.02, 11, 0.1
    assert scheduled_lr(lr, 0, n, "cosine", floor) == pytest.approx(lr)
    assert scheduled_lr(lr, n - 1, n, "cosine", floor) == pytest.approx(floor * lr)
    assert scheduled_lr(lr, 5, n, "cosine", floor) == pytest.approx(lr * (floor + 0.45))
    values = [scheduled_lr(lr, i, n, "cosine", floor) for i in range(n)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert all(scheduled_lr(lr, i, n) == lr for i in range(n))  # constant


@pytest.mark.determinism
def test_schedule_is_applied_and_a_resumed_run_follows_it(tmp_path):
    data = make_tiny_set(per_class=8)
    cfg = replace(condense_config("dd", iterations=5, checkpoint_every=2, eval_every=1,
                                  real_batch=6), schedule="cosine", lr_floor=0.2)
    kw = dict(model="convnet:width=4,depth=2", seed=1, inner_steps=3)
    full, _ = condense(data, cfg, 2, checkpoint=tmp_path / "a.pt", evaluate=lambda t, i: {},
                       **kw)
    state = torch.load(tmp_path / "a.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.2 * cfg.lr)
    with pytest.raises(Kill):
        condense(data, cfg, 2, checkpoint=tmp_path / "b.pt", evaluate=killer(3), **kw)
    resumed, res = condense(data, cfg, 2, checkpoint=tmp_path / "b.pt", resume=True,
                            evaluate=lambda t, i: {}, **kw)
    assert res.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    constant, _ = condense(data, replace(cfg, schedule="constant"), 2, **kw)
    assert not torch.equal(constant.images, full.images)


# ------------------------------------------------------------------ gradient clipping
def test_clipping_bounds_the_update_to_the_clip_norm():
    teacher = nn.Linear(4, 3).to(D)
    before = torch.cat([p.detach().reshape(-1) for p in teacher.parameters()]).clone()
    opt = torch.optim.SGD(teacher.parameters(), lr=1.0)
    strategy = Strategy(StrategyConfig(grad_clip=0.25))
    loss = 100.0 * teacher(torch.ones(2, 4, dtype=D)).pow(2).sum()
    strategy._update(loss, teacher, opt)
    after = torch.cat([p.detach().reshape(-1) for p in teacher.parameters()])
    # clip_grad_norm_ divides by (norm + 1e-6): equal to the clip norm up to that epsilon
    assert float((after - before).norm()) == pytest.approx(0.25, rel=1e-6)


# ------------------------------------------------------------------ intermediate losses
def _linear_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, generator=g, dtype=D) for _ in range(4)]
    ys = [torch.tensor([0, 1, 0, 1]) for _ in range(4)]
    xr = torch.randn(16, 3, generator=g, dtype=D)
    yr = (xr[:, 0] > 0).long()
    return xs, ys, xr, yr


def _hand_unroll(w, b, xs, ys, xr, yr, lr, every, weight):
    """Plain gradient descent on a linear softmax classifier, written out by hand."""
    scores = []
    for t, (x, y) in enumerate(zip(xs, ys), start=1):
        loss = F.cross_entropy(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - lr * gw, b - lr * gb
        if every and t % every == 0 and t < len(xs):
            scores.append(F.cross_entropy(xr @ w.T + b, yr))
    final = F.cross_entropy(xr @ w.T + b, yr)
    return final + weight * torch.stack(scores).mean() if scores else final


@pytest.mark.parametrize("every,weight", [(1, 1.0), (2, 0.5), (0, 1.0)])
def test_intermediate_losses_match_a_hand_written_unroll(every, weight):
    torch.manual_seed(0)  # test fixture
    model = nn.Linear(3, 2).to(D)
    xs, ys, xr, yr = _linear_data()
    xs = [x.clone().requires_grad_() for x in xs]
    got = unrolled_loss(model, list(zip(xs, ys)), xr, yr, 0.3, score_every=every,
                        score_weight=weight)
    w0 = model.weight.detach().clone().requires_grad_()
    b0 = model.bias.detach().clone().requires_grad_()
    want = _hand_unroll(w0, b0, xs, ys, xr, yr, 0.3, every, weight)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    g_got = torch.autograd.grad(got, xs)
    g_want = torch.autograd.grad(want, xs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_intermediate_losses_gradient_matches_finite_differences():
    torch.manual_seed(1)  # test fixture
    model = nn.Linear(3, 2).to(D)
    xs, ys, xr, yr = _linear_data(1)

    def f(first):
        batches = [(first, ys[0])] + list(zip(xs[1:], ys[1:]))
        return unrolled_loss(model, batches, xr, yr, 0.3, score_every=1, score_weight=0.7)

    x0 = xs[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x0), x0)
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        plus, minus = xs[0].clone(), xs[0].clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (f(plus) - f(minus)).item() / (2 * eps)
        assert g[i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)


# ------------------------------------------------------------------ step-size hypergradient
def _momentum_unroll(w0, xs, ys, lrs, m, create_graph):
    """Momentum SGD as torch.optim.SGD takes it (buf_0 = g_0) on a linear classifier."""
    w, buf, bufs = w0, None, []
    for x, y, lr in zip(xs, ys, lrs):
        (g,) = torch.autograd.grad(F.cross_entropy(x @ w.T, y), w, create_graph=create_graph)
        buf = g if buf is None else m * buf + g
        bufs.append(buf)
        w = w - lr * buf
    return w, bufs


def _exact_and_first_order(steps):
    xs, ys, xr, yr = _linear_data(2)
    xs, ys = xs[:steps], ys[:steps]
    w0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=D)
    log_lr = torch.log(torch.tensor([0.3, 0.2, 0.25][:steps], dtype=D)).requires_grad_()
    logit = torch.tensor(0.4, dtype=D, requires_grad=True)
    # exact: autograd through the whole unroll
    w, _ = _momentum_unroll(w0.clone().requires_grad_(), xs, ys, log_lr.exp(),
                            torch.sigmoid(logit), create_graph=True)
    exact = torch.autograd.grad(F.cross_entropy(xr @ w.T, yr), [log_lr, logit],
                                allow_unused=True)
    exact = [torch.zeros_like(p) if g is None else g for p, g in zip([log_lr, logit], exact)]
    # first order: plain steps, recorded directions, v at the end
    m = float(torch.sigmoid(logit.detach()))
    w, bufs = _momentum_unroll(w0.clone().requires_grad_(), xs, ys, log_lr.detach().exp(), m,
                               create_graph=False)
    record = StepRecord(m)
    for b in bufs:
        record.add([b])
    w = w.detach().requires_grad_()
    (v,) = torch.autograd.grad(F.cross_entropy(xr @ w.T, yr), w)
    approx = step_size_hypergradient(record, [v], log_lr.exp(), torch.sigmoid(logit),
                                     [log_lr, logit])
    return exact, approx


def test_step_size_hypergradient_is_exact_for_one_step():
    (e_lr, e_m), (a_lr, a_m) = _exact_and_first_order(1)
    torch.testing.assert_close(a_lr, e_lr, rtol=1e-10, atol=1e-14)
    assert float(a_m) == 0.0 == pytest.approx(float(e_m))  # one step: no momentum yet


def test_step_size_hypergradient_exact_for_last_lr_and_two_step_momentum():
    (e_lr, e_m), (a_lr, a_m) = _exact_and_first_order(2)
    assert float(a_lr[1]) == pytest.approx(float(e_lr[1]), rel=1e-10)
    assert float(a_m) == pytest.approx(float(e_m), rel=1e-10)
    # the first step's lr also acts through the second step's gradient: only approximate
    assert float(a_lr[0]) != pytest.approx(float(e_lr[0]), rel=1e-6)
    assert math.copysign(1, float(a_lr[0])) == math.copysign(1, float(e_lr[0]))


def test_implicit_with_step_size_grad_moves_the_lr_and_momentum():
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import make_teacher

    data = make_tiny_set(per_class=8)
    cfg = GTNConfig(method="implicit", inner_steps=3, batch_size=8, step_size_grad=True,
                    real_batch=8, student="convnet:width=4,depth=1",
                    generator=replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                      width_conv=4))
    teacher = make_teacher(data.info, cfg, seed=0)
    strategy = make_strategy("implicit", cfg.meta_config().strategy_config)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=1e-2)
    lr0, m0 = teacher.log_lr.detach().clone(), teacher.momentum_logit.detach().clone()
    strategy.step(teacher, opt, RealSampler(data), lambda g: build_model(
        cfg.student, data.info.channels, data.info.num_classes, data.info.im_size, generator=g),
        generator(0, "t"))
    assert not torch.equal(teacher.log_lr.detach(), lr0)
    assert not torch.equal(teacher.momentum_logit.detach(), m0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs", [dict(grad_clip=-1.0), dict(grad_clip=0.0),
                                    dict(intermediate_every=-1),
                                    dict(intermediate_weight=-0.5)])
def test_bad_strategy_options_are_one_line(kwargs):
    with pytest.raises(ConfigError) as err:
        StrategyConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(schedule="linear"), dict(lr_floor=1.5),
                                    dict(lr_floor=-0.1)])
def test_bad_schedules_are_one_line(kwargs):
    with pytest.raises(ConfigError) as err:
        MetaConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_gtn_config_refuses_what_does_not_combine():
    with pytest.raises(GeneratorError, match="checkpointing"):
        GTNConfig(intermediate_every=1, checkpoint_steps=4)
    with pytest.raises(ConfigError, match="schedule"):
        GTNConfig(meta_schedule="step")
    with pytest.raises(ConfigError, match="grad_clip"):
        GTNConfig(grad_clip=-2.0)


# ------------------------------------------------------------------ implicit: sampled mixed term
def _mixed_problem():
    """A ridge-like inner problem whose T parts depend on the hyper-parameters h."""
    g = torch.Generator().manual_seed(5)
    a = [torch.randn(3, 3, generator=g, dtype=D) for _ in range(4)]
    h = torch.randn(4, 3, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=D, requires_grad=True)

    def part(t):
        return lambda: 0.5 * ((a[t] @ w - h[t]) ** 2).sum() / 4

    inner = sum(part(t)() for t in range(4)) + 0.5 * (w ** 2).sum()
    outer = ((w - 1.0) ** 2).sum()
    return inner, outer, w, h, [part(t) for t in range(4)]


def test_sampled_mixed_term_is_unbiased_over_all_subsets():
    from itertools import combinations

    from distill.hypergrad import implicit_hypergradient, sampled_parts

    inner, outer, w, h, parts = _mixed_problem()
    (full,) = implicit_hypergradient(inner, outer, [w], [h], 3, 0.1, mixed_losses=parts)
    for k in (1, 2, 3):
        subsets = list(combinations(range(4), k))
        est = [implicit_hypergradient(inner, outer, [w], [h], 3, 0.1,
                                      mixed_losses=sampled_parts(parts, list(s)))[0]
               for s in subsets]
        torch.testing.assert_close(torch.stack(est).mean(0), full, rtol=1e-10, atol=1e-12)
        if k < 4:
            assert not torch.allclose(est[0], full)


# ------------------------------------------------------------------ implicit: trajectory
def test_trajectory_coefficients_closed_form():
    from distill.hypergrad import trajectory_coefficients

    assert trajectory_coefficients([0.1, 0.2, 0.3], 0.0) == pytest.approx([0.1, 0.2, 0.3])
    m = 0.5
    want = [0.1 + m * 0.2 + m * m * 0.3, 0.2 + m * 0.3, 0.3]
    assert trajectory_coefficients([0.1, 0.2, 0.3], m) == pytest.approx(want)


def _trajectory_vs_exact(steps, lr, momentum=0.0):
    from distill.hypergrad import trajectory_coefficients, trajectory_hypergradient

    torch.manual_seed(4)  # test fixture
    model = nn.Linear(3, 2, bias=False).to(D)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(steps, 4, 3, generator=g, dtype=D, requires_grad=True)
    ys = torch.tensor([0, 1, 1, 0])
    xr = torch.randn(16, 3, generator=g, dtype=D)
    yr = (xr[:, 1] > 0).long()
    w0 = model.weight.detach().clone()
    # exact: autograd through the unroll (torch.optim.SGD's momentum convention)
    w, buf = w0.clone().requires_grad_(), None
    w_start = w
    for t in range(steps):
        (gw,) = torch.autograd.grad(F.cross_entropy(torch.tanh(h[t]) @ w.T, ys), w,
                                    create_graph=True)
        buf = gw if buf is None else momentum * buf + gw
        w = w - lr * buf
    (exact,) = torch.autograd.grad(F.cross_entropy(xr @ w.T, yr), h)
    del w_start
    # first order: plain steps with snapshots, then one step's graph at a time
    w, buf, snaps = w0.clone(), None, []
    for t in range(steps):
        snaps.append([w.clone()])
        wl = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(F.cross_entropy(torch.tanh(h[t].detach()) @ wl.T, ys), wl)
        buf = gw if buf is None else momentum * buf + gw
        w = w - lr * buf
    wl = w.clone().requires_grad_()
    (v,) = torch.autograd.grad(F.cross_entropy(xr @ wl.T, yr), wl)
    batches = [(lambda t=t: (torch.tanh(h[t]), ys)) for t in range(steps)]
    (approx,) = trajectory_hypergradient(model, snaps, batches,
                                         trajectory_coefficients([lr] * steps, momentum),
                                         [v], [h], F.cross_entropy)
    return exact, approx


def test_trajectory_hypergradient_is_exact_for_one_step():
    exact, approx = _trajectory_vs_exact(1, 0.7)
    torch.testing.assert_close(approx, exact, rtol=1e-10, atol=1e-14)


def test_trajectory_hypergradient_error_is_second_order_in_the_step_size():
    # the dropped Jacobian terms are O(lr^2) against an O(lr) gradient: the relative error
    # falls about tenfold when lr does
    errs = []
    for lr in (1e-2, 1e-3):
        exact, approx = _trajectory_vs_exact(3, lr, momentum=0.5)
        errs.append(float((approx - exact).norm() / exact.norm()))
    assert 0.05 < errs[1] / errs[0] < 0.2
    assert errs[1] < 1e-3


@pytest.mark.parametrize("curriculum", ["none", "all-shuffled", "shuffled-batch", "full"])
@pytest.mark.parametrize("options", [dict(mixed_at="trajectory"), dict(mixed_sample=1),
                                     dict(mixed_at="trajectory", mixed_sample=2,
                                          step_size_grad=True),
                                     dict(mixed_at="trajectory", unroll_tail=2,
                                          step_size_grad=True, mixed_sample=1)])
def test_implicit_variants_give_the_generator_a_finite_nonzero_gradient(curriculum, options):
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import make_teacher

    data = make_tiny_set(per_class=6)
    cfg = GTNConfig(method="implicit", inner_steps=3, batch_size=10, real_batch=8,
                    curriculum=curriculum, student="convnet:width=4,depth=1",
                    generator=replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                      width_conv=4), **options)
    teacher = make_teacher(data.info, cfg, seed=0)
    strategy = make_strategy("implicit", cfg.meta_config().strategy_config)
    opt = torch.optim.SGD([p for p in teacher.parameters() if p.requires_grad], lr=0.0)
    strategy.step(teacher, opt, RealSampler(data), lambda g: build_model(
        cfg.student, data.info.channels, data.info.num_classes, data.info.im_size, generator=g),
        generator(0, "t"))
    grads = [p.grad for p in teacher.generator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("kwargs", [dict(mixed_sample=0), dict(mixed_at="middle")])
def test_bad_implicit_options_are_one_line(kwargs):
    with pytest.raises(ConfigError) as err:
        StrategyConfig(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ implicit: exact tail
def _teacher_grads(method, inner_lr=0.02, only_generator=False, **options):
    """The generator teacher's meta-gradient of one meta-step (an SGD step of lr 0 keeps the
    teacher unchanged), float64, full curriculum with learned lr and momentum."""
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import make_teacher

    data = make_tiny_set(per_class=6)
    data = type(data)(data.images.to(D), data.labels, data.info)
    cfg = GTNConfig(method=method, inner_steps=4, batch_size=10, real_batch=12,
                    inner_lr=inner_lr, student="convnet:width=4,depth=1,norm=none",
                    generator=replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                      width_conv=4), **options)
    teacher = make_teacher(data.info, cfg, seed=0).to(D)
    strategy = make_strategy(method, cfg.meta_config().strategy_config)
    params = [p for p in teacher.parameters() if p.requires_grad]
    strategy.step(teacher, torch.optim.SGD(params, lr=0.0), RealSampler(data),
                  lambda g: build_model(cfg.student, data.info.channels, data.info.num_classes,
                                        data.info.im_size, generator=g).to(D),
                  generator(0, "t"))
    if only_generator:
        params = [p for p in teacher.generator.parameters() if p.requires_grad]
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_a_tail_of_all_t_steps_is_unrolled_backprop():
    exact = _teacher_grads("unrolled")
    tail = _teacher_grads("implicit", mixed_at="trajectory", unroll_tail=4)
    torch.testing.assert_close(tail, exact, rtol=1e-9, atol=1e-12)


def test_a_shorter_tail_errs_at_second_order_and_less_the_longer_it_is():
    # the head's dropped Jacobians are O(lr^2) against an O(lr) gradient; a wrong term for
    # the momentum buffer (it carries the head's gradients into the tail) would be O(lr).
    # A tail of T - 1 is exact too: the first step's Jacobian is never needed.
    def err(lr, k):
        exact = _teacher_grads("unrolled", inner_lr=lr, only_generator=True)
        approx = _teacher_grads("implicit", inner_lr=lr, only_generator=True,
                                mixed_at="trajectory", unroll_tail=k)
        return float((approx - exact).norm() / exact.norm())

    by_tail = [err(1e-2, k) for k in (1, 2, 3)]
    assert by_tail[0] > by_tail[1] > 1e3 * by_tail[2]
    assert by_tail[2] < 1e-12
    assert 0.05 < err(1e-3, 2) / by_tail[1] < 0.2


@pytest.mark.parametrize("every", [0, 1, 2])
def test_recomputed_unrolled_is_unrolled_backprop(every):
    # the backward pass rebuilds one step at a time from the kept states; the meta-gradient
    # (generator, learned noise, lr and momentum) is the stored unroll's, with intermediate
    # losses after every step or every second one
    kw = dict(intermediate_every=every, intermediate_weight=0.7)
    stored = _teacher_grads("unrolled", **kw)
    rebuilt = _teacher_grads("unrolled", recompute=True, **kw)
    torch.testing.assert_close(rebuilt, stored, rtol=1e-9, atol=1e-12)
    if every:  # the intermediate losses change the gradient
        assert float((stored - _teacher_grads("unrolled")).norm()) > 1e-3 * float(stored.norm())


def test_recomputed_unrolled_with_fresh_noise_and_weight_decay():
    # curriculum none: each step's noise is drawn once and replayed in the backward pass;
    # weight decay passes through the rebuilt steps too
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import make_teacher

    data = make_tiny_set(per_class=6)
    data = type(data)(data.images.to(D), data.labels, data.info)

    def grads(**options):
        cfg = GTNConfig(inner_steps=3, batch_size=10, real_batch=12, curriculum="none",
                        student="convnet:width=4,depth=1,norm=none",
                        generator=replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                          width_conv=4), **options)
        teacher = make_teacher(data.info, cfg, seed=0).to(D)
        sc = replace(cfg.meta_config().strategy_config, inner_weight_decay=0.01)
        params = [p for p in teacher.parameters() if p.requires_grad]
        make_strategy(cfg.method, sc).step(
            teacher, torch.optim.SGD(params, lr=0.0), RealSampler(data),
            lambda g: build_model(cfg.student, data.info.channels, data.info.num_classes,
                                  data.info.im_size, generator=g).to(D), generator(0, "t"))
        return torch.cat([p.grad.reshape(-1) for p in params])

    # the stored unroll draws its noise inline, so its stream differs: compare with an exact
    # tail of all T steps (unrolled backprop, tested above), which replays the same draws
    rebuilt = grads(method="unrolled", recompute=True)
    tail = grads(method="implicit", mixed_at="trajectory", unroll_tail=3)
    torch.testing.assert_close(rebuilt, tail, rtol=1e-9, atol=1e-12)
    assert float(rebuilt.abs().sum()) > 0


def test_the_trajectory_head_sees_the_noise_it_trained_on():
    # curriculum none with a tail of T - 1: the one head step is exact (its Jacobian is never
    # needed), so the result is unrolled backprop's only if the rebuilt batch is the same
    from distill.models import build_model
    from distill.rng import generator
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import make_teacher

    data = make_tiny_set(per_class=6)
    data = type(data)(data.images.to(D), data.labels, data.info)

    def grads(**options):
        cfg = GTNConfig(method="implicit", inner_steps=3, batch_size=10, real_batch=12,
                        curriculum="none", student="convnet:width=4,depth=1,norm=none",
                        generator=replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                          width_conv=4), **options)
        teacher = make_teacher(data.info, cfg, seed=0).to(D)
        params = [p for p in teacher.generator.parameters() if p.requires_grad]
        make_strategy("implicit", cfg.meta_config().strategy_config).step(
            teacher, torch.optim.SGD(params, lr=0.0), RealSampler(data),
            lambda g: build_model(cfg.student, data.info.channels, data.info.num_classes,
                                  data.info.im_size, generator=g).to(D), generator(0, "t"))
        return torch.cat([p.grad.reshape(-1) for p in params])

    torch.testing.assert_close(grads(mixed_at="trajectory", unroll_tail=2),
                               grads(mixed_at="trajectory", unroll_tail=3),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options,needle", [
    (dict(method="implicit", intermediate_every=1), "--method unrolled"),
    (dict(method="matching", intermediate_every=1), "--method unrolled"),
    (dict(method="implicit", recompute=True), "--method unrolled"),
    (dict(method="unrolled", recompute=True, checkpoint_steps=2), "does not combine")])
def test_unrolled_only_options_are_refused_elsewhere(options, needle):
    with pytest.raises((GeneratorError, ConfigError), match=needle):
        GTNConfig(**options)
    with pytest.raises(ConfigError, match="does not combine"):
        StrategyConfig(recompute=True, truncate=2)


def test_unroll_tail_needs_the_trajectory_head():
    with pytest.raises(ConfigError, match="trajectory"):
        StrategyConfig(unroll_tail=2)
    with pytest.raises(ConfigError, match="unroll_tail"):
        StrategyConfig(unroll_tail=-1, mixed_at="trajectory")


@pytest.mark.parametrize("method", sorted(GTN_METHODS))
def test_compare_cells_train_with_the_whole_recipe(method):
    # every option of the method's recipe reaches the comparison's cell, except the real
    # batch, which the budget sets; --no-recipe gives the bare defaults under the options
    # that define the method
    from gtn import RECIPES
    from gtn.compare import BUDGETS, cell_config

    budget = BUDGETS["short"]
    cell = cell_config(budget, method, 8).as_dict()
    expected = {**RECIPES[method], "real_batch": budget.real_batch}
    assert {k: cell[k] for k in expected} == expected
    bare = cell_config(budget, method, 8, recipe=False).as_dict()
    defaults = {**GTNConfig().as_dict(), **GTN_METHODS[method].defines}
    for k in ("inner_lr", "inner_momentum", "grad_clip", "unroll_tail", "mixed_at",
              "meta_lr", "recompute"):
        assert bare[k] == defaults[k], k


def test_compare_puts_recomputed_unrolled_beside_unrolled(tmp_path):
    # the same meta-gradient (so the same generator and accuracy up to rounding) at the
    # memory of one step
    from gtn.compare import Budget, cell_config, run_comparison

    budget = Budget("tiny", 2, replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                       width_conv=4), "convnet:width=4,depth=1",
                    batch_size=20, real_batch=20, students=1, fixed_epochs=1, test_limit=None,
                    validation=20)
    assert cell_config(budget, "unrolled-recompute", 4).recompute
    assert cell_config(budget, "unrolled-recompute", 4).strategy == "unrolled"
    assert not cell_config(budget, "unrolled", 4).recompute
    data = make_tiny_set(per_class=8)
    cells = run_comparison(data, data, ["unrolled", "unrolled-recompute"], [4], budget,
                           tmp_path)["cells"]
    stored, rebuilt = cells["unrolled/T=4"], cells["unrolled-recompute/T=4"]
    assert rebuilt["memory"]["saved_peak_bytes"] < stored["memory"]["saved_peak_bytes"] / 2
    assert rebuilt["final_meta_loss"] == pytest.approx(stored["final_meta_loss"], rel=1e-4)
    assert rebuilt["few_step"] == stored["few_step"]
