"""Saved-tensor accounting against hand-counted bytes; linear growth with unrolled steps."""

from __future__ import annotations

import torch

from distill.memory import SavedTensorMeter, peak_rss_bytes


def test_elementwise_product_saves_both_operands():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        loss = (x * w).sum()          # mul saves x and w; sum saves no tensor
        assert meter.live == 2 * 4000
        loss.backward()
        del loss
    assert meter.report().saved_peak_bytes == 2 * 4000
    assert meter.live == 0            # everything was released with the graph


def test_the_same_storage_is_counted_once():
    x = torch.randn(500, requires_grad=True)
    with SavedTensorMeter() as meter:
        loss = (x * x).sum()          # x saved twice, one storage
        loss.backward()
    assert meter.report().saved_peak_bytes == 2000


def test_peak_grows_linearly_with_the_length_of_a_chain():
    def chain(steps: int) -> int:
        x = torch.randn(1000, requires_grad=True)
        with SavedTensorMeter() as meter:
            h = x
            for _ in range(steps):
                h = torch.tanh(h)     # tanh saves its 4000-byte output
            h.sum().backward()
        return meter.report().saved_peak_bytes

    assert chain(1) == 4000 and chain(8) == 8 * 4000


def test_rss_is_reported():
    assert peak_rss_bytes() > 10 * 2 ** 20
