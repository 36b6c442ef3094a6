"""Unrolled meta-gradients through higher: against finite differences, and against the
implicit (IFT) hypergradient on a strongly convex student trained to convergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.hypergrad import implicit_hypergradient
from distill.unrolled import unrolled_loss

D = torch.float64
WD = 0.1  # weight decay: makes the linear student's loss strongly convex


def linear_student(seed=0):
    torch.manual_seed(seed)  # test fixture: seeding here is allowed
    return nn.Linear(3, 2).to(D)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    syn = torch.randn(4, 3, generator=g, dtype=D)
    ys = torch.tensor([0, 1, 0, 1])
    xr = torch.randn(16, 3, generator=g, dtype=D)
    yr = (xr[:, 0] > 0).long()
    return syn, ys, xr, yr


def meta_loss(model, syn, ys, xr, yr, steps, lr=0.5):
    return unrolled_loss(model, [(syn, ys)] * steps, xr, yr, lr, weight_decay=WD)


def test_unrolled_matches_finite_differences():
    model = linear_student()
    syn, ys, xr, yr = data()
    s = syn.clone().requires_grad_()
    (g,) = torch.autograd.grad(meta_loss(model, s, ys, xr, yr, steps=5), s)
    eps = 1e-6
    for i, j in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = syn.clone(), syn.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (meta_loss(model, plus, ys, xr, yr, 5) - meta_loss(model, minus, ys, xr, yr, 5))
        assert g[i, j].item() == pytest.approx(fd.item() / (2 * eps), rel=1e-5, abs=1e-9)


def test_student_parameters_are_untouched():
    model = linear_student()
    before = [p.detach().clone() for p in model.parameters()]
    syn, ys, xr, yr = data()
    meta_loss(model, syn.requires_grad_(), ys, xr, yr, steps=3).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_learnable_lr_gets_a_gradient():
    model = linear_student()
    syn, ys, xr, yr = data()
    lr = torch.tensor(0.3, dtype=D, requires_grad=True)
    unrolled_loss(model, [(syn, ys)] * 3, xr, yr, lr).backward()
    assert lr.grad is not None and lr.grad.abs() > 0


def test_long_unroll_agrees_with_implicit_on_a_strongly_convex_student():
    model = linear_student(1)
    syn, ys, xr, yr = data(1)
    s = syn.clone().requires_grad_()
    (g_unrolled,) = torch.autograd.grad(meta_loss(model, s, ys, xr, yr, steps=400), s)

    # the inner optimum, found by plain gradient descent, then the IFT hypergradient there
    w = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for _ in range(4000):
        loss = F.cross_entropy(F.linear(syn, *w), ys) + WD / 2 * sum((p ** 2).sum() for p in w)
        grads = torch.autograd.grad(loss, w)
        with torch.no_grad():
            for p, gp in zip(w, grads):
                p -= 0.5 * gp
    inner = F.cross_entropy(F.linear(s, *w), ys) + WD / 2 * sum((p ** 2).sum() for p in w)
    outer = F.cross_entropy(F.linear(xr, *w), yr)
    (g_implicit,) = implicit_hypergradient(inner, outer, w, [s], terms=2000, alpha=0.5)
    torch.testing.assert_close(g_unrolled, g_implicit, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_checkpointed_unroll_reproduces_higher(momentum, every):
    model = linear_student(2)
    syn, ys, xr, yr = data(2)
    batches = lambda s: [(s[i % 4:i % 4 + 2], ys[i % 4:i % 4 + 2]) for i in range(7)]  # noqa
    s1 = syn.clone().requires_grad_()
    lr1 = torch.tensor(0.3, dtype=D, requires_grad=True)
    ref = unrolled_loss(model, batches(s1), xr, yr, lr1, momentum=momentum, weight_decay=WD)
    ref.backward()
    s2 = syn.clone().requires_grad_()
    lr2 = torch.tensor(0.3, dtype=D, requires_grad=True)
    out = unrolled_loss(model, batches(s2), xr, yr, lr2, momentum=momentum, weight_decay=WD,
                        checkpoint_every=every)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s2.grad, s1.grad)
    torch.testing.assert_close(lr2.grad, lr1.grad)


def test_truncation_differentiates_only_the_last_steps():
    model = linear_student(3)
    syn, ys, xr, yr = data(3)
    first = syn.clone().requires_grad_()   # used only by the first 3 of 5 steps
    last = syn.clone().requires_grad_()    # used by the last 2
    batches = [(first, ys)] * 3 + [(last, ys)] * 2
    full = unrolled_loss(model, batches, xr, yr, 0.5, weight_decay=WD)
    cut = unrolled_loss(model, batches, xr, yr, 0.5, weight_decay=WD, truncate=2)
    torch.testing.assert_close(cut, full)  # the forward pass is the same training
    g_first, g_last = torch.autograd.grad(cut, [first, last], allow_unused=True)
    assert g_first is None  # no graph through the truncated head
    (ref_last,) = torch.autograd.grad(full, [last])
    torch.testing.assert_close(g_last, ref_last)  # the tail is exact
    with pytest.raises(ValueError, match="truncate"):
        unrolled_loss(model, batches, xr, yr, 0.5, truncate=0)


def test_per_step_lr_and_learned_momentum_match_finite_differences_and_checkpointing():
    model = linear_student(4)
    syn, ys, xr, yr = data(4)
    batches = [(syn, ys)] * 4

    def loss(lrs, mom, every=None):
        return unrolled_loss(model, batches, xr, yr, lrs, momentum=mom, weight_decay=WD,
                             checkpoint_every=every)

    lrs = torch.tensor([0.3, 0.2, 0.4, 0.1], dtype=D, requires_grad=True)
    mom = torch.tensor(0.5, dtype=D, requires_grad=True)
    g_lr, g_mom = torch.autograd.grad(loss(lrs, mom), [lrs, mom])
    eps = 1e-6
    for i in range(4):
        d = torch.zeros(4, dtype=D)
        d[i] = eps
        fd = (loss(lrs.detach() + d, mom.detach()) - loss(lrs.detach() - d, mom.detach()))
        assert g_lr[i].item() == pytest.approx(fd.item() / (2 * eps), rel=1e-5, abs=1e-10)
    fd = loss(lrs.detach(), mom.detach() + eps) - loss(lrs.detach(), mom.detach() - eps)
    assert g_mom.item() == pytest.approx(fd.item() / (2 * eps), rel=1e-5, abs=1e-10)
    c_lr, c_mom = torch.autograd.grad(loss(lrs, mom, every=3), [lrs, mom])
    torch.testing.assert_close(c_lr, g_lr)
    torch.testing.assert_close(c_mom, g_mom)
    with pytest.raises(ValueError, match="3 learning rates for 4 steps"):
        loss(torch.tensor([0.1, 0.1, 0.1], dtype=D), 0.0)
