"""The one inner loop (`student_steps`) against a hand-written loop, torch.optim.SGD (bit for
bit) and `higher`'s differentiable SGD (bit for bit), and its hooks."""

from __future__ import annotations

import copy

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.inner import forward, load_params, student_steps

D = torch.float64


def setup(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    batches = [(torch.randn(6, 5, generator=g, dtype=dtype), torch.randint(3, (6,), generator=g))
               for _ in range(4)]
    return model, batches


def test_matches_a_hand_written_loop_with_per_step_lr_momentum_and_weight_decay():
    model, batches = setup(dtype=D)
    lrs, mom, wd = [0.3, 0.1, 0.2, 0.05], [0.5, 0.9, 0.0, 0.3], 0.01
    # the loop by hand: d = g + wd p; b = d (t = 0) or mu b + d; p -= lr b
    ps = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(ps)
    for (x, y), lr, mu in zip(batches, lrs, mom):
        leaves = [p.requires_grad_() for p in ps]
        loss = F.cross_entropy(forward(model, leaves, x), y)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            ds = [g + wd * p for g, p in zip(grads, leaves)]
            bufs = [d if b is None else mu * b + d for b, d in zip(bufs, ds)]
            ps = [p - lr * b for p, b in zip(leaves, bufs)]
    state = student_steps(model, [p.detach() for p in model.parameters()], batches, lrs, mom, wd)
    for a, b in zip(state.params, ps):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(state.step_losses) == 4 and not state.step_losses[0].requires_grad


@pytest.mark.determinism
def test_without_graph_it_is_torch_optim_sgd_bit_for_bit():
    model, batches = setup()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.7, weight_decay=5e-4)
    lrs = [0.1, 0.3, 0.2, 0.05]
    for (x, y), lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    state = student_steps(model, [p.detach() for p in model.parameters()], iter(batches), lrs,
                          0.7, 5e-4)
    load_params(model, state.params)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.determinism
@pytest.mark.parametrize("learned", [False, True])
def test_differentiable_steps_are_highers_bit_for_bit(learned):
    model, batches = setup(1)
    x0 = batches[0][0].clone().requires_grad_()  # a teacher image with a graph
    batches = [(x0 * 1.5, batches[0][1])] + batches[1:]
    lr = torch.tensor(0.2, requires_grad=True) if learned else 0.2
    mom = torch.tensor(0.6, requires_grad=True) if learned else 0.6
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.6, weight_decay=1e-3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for x, y in batches:
            override = {"lr": [lr], "momentum": [mom]} if learned else None
            diffopt.step(F.cross_entropy(fmodel(x), y), override=override)
        ref = list(fmodel.parameters())
    state = student_steps(model, [p.detach() for p in model.parameters()], batches, lr, mom,
                          1e-3, differentiable=True)
    for a, b in zip(state.params, ref):
        assert torch.equal(a, b)
    wrt = [x0] + ([lr, mom] if learned else [])
    g_ref = torch.autograd.grad(sum(p.sum() for p in ref), wrt, retain_graph=True)
    g = torch.autograd.grad(sum(p.sum() for p in state.params), wrt)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


def test_after_step_collects_differentiable_intermediate_losses():
    model, batches = setup(2, D)
    xr, yr = batches[0]
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D, requires_grad=True)

    def score(t, params):  # the student on "real" data after steps 0 and 2 (0-based)
        return F.cross_entropy(forward(model, params, xr), yr) if t % 2 == 0 else None

    state = student_steps(model, [p.detach() for p in model.parameters()], batches, lrs,
                          differentiable=True, after_step=score)
    assert len(state.losses) == 2
    (g,) = torch.autograd.grad(sum(state.losses), [lrs])
    assert torch.isfinite(g).all() and g[3] == 0 and g[0] != 0  # the last step is never scored
    with pytest.raises(ValueError, match="3 learning rates for 4 steps"):
        student_steps(model, [p.detach() for p in model.parameters()], batches, lrs[:3])
