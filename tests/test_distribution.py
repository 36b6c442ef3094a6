"""Distribution matching against its closed form with a linear embedding."""

from __future__ import annotations

import torch

from distill.distribution import distribution_loss
from distill.models import init_parameters


def test_closed_form_with_a_linear_embedding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    embed = lambda x: x.flatten(1) @ w.T  # noqa: E731
    real = [torch.randn(7, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    syn = [torch.randn(3, 3, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
           for _ in range(2)]
    loss = distribution_loss(embed, real, syn)
    diffs = [r.flatten(1).mean(0) - s.detach().flatten(1).mean(0) for r, s in zip(real, syn)]
    expected = sum(((w @ d) ** 2).sum() for d in diffs)
    torch.testing.assert_close(loss, expected)
    for chunk in (1, 3, 6):  # real means in pieces (uneven: 7 = 3 + 3 + 1): the same closed form
        torch.testing.assert_close(distribution_loss(embed, real, syn, real_chunk=chunk),
                                   expected)
    grads = torch.autograd.grad(loss, syn)
    for gr, d in zip(grads, diffs):  # d/ds_i = -(2/n) Wᵀ W (mean_r - mean_s), the same for all i
        expected_grad = (-2 / 3 * w.T @ (w @ d)).expand(3, -1)
        torch.testing.assert_close(gr.flatten(1), expected_grad)


def test_zero_when_the_sets_coincide_and_descends():
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU())
    init_parameters(net, g)  # from the test's generator, not from whatever ran before
    real = [torch.randn(6, 1, 4, 4, generator=g) for _ in range(3)]
    assert distribution_loss(net, real, [r.clone() for r in real]).item() < 1e-10
    syn = torch.randn(3, 2, 1, 4, 4, generator=g).requires_grad_()
    opt = torch.optim.SGD([syn], lr=0.5)
    losses = []
    for _ in range(20):
        loss = distribution_loss(net, real, list(syn))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
