"""Budgets by fraction: exact per-class counts (largest remainder), and one-line refusals."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from selection import SelectionError, select
from selection.budget import budget_counts, fraction_counts

from .conftest import make_tiny_set

MNIST_SIZES = torch.tensor([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])


def hamilton(fraction: float, sizes: list[int]) -> list[int]:
    """Reference: exact rationals of the decimal, largest remainder, ties to the lower class."""
    f = Fraction(repr(fraction))
    quotas = [f * n for n in sizes]
    total = int(f * sum(sizes) + Fraction(1, 2))   # floor(x + 1/2): round half up
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_remainder[:total - sum(counts)]:
        counts[c] += 1
    return counts


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.3, 0.5, 0.999, 1.0, 1 / 3])
def test_mnist_fraction_counts_are_exact(fraction):
    counts = fraction_counts(fraction, MNIST_SIZES)
    assert counts.tolist() == hamilton(fraction, MNIST_SIZES.tolist())
    assert int(counts.sum()) == int(Fraction(repr(fraction)) * 60000 + Fraction(1, 2))
    assert ((counts - fraction * MNIST_SIZES).abs() < 1).all()
    assert (counts <= MNIST_SIZES).all() and (counts >= 1).all()


def test_ten_percent_of_mnist_is_6000_images():
    assert int(fraction_counts(0.1, MNIST_SIZES).sum()) == 6000
    assert fraction_counts(1.0, MNIST_SIZES).tolist() == MNIST_SIZES.tolist()


@pytest.mark.parametrize("seed", range(20))
def test_random_sizes_sum_and_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(5, 200, (7,), generator=g)
    f = float(torch.rand(1, generator=g)) * 0.8 + 0.2
    counts = fraction_counts(f, sizes)
    assert counts.tolist() == hamilton(f, sizes.tolist())
    assert (counts <= sizes).all()


def test_decimal_fractions_are_exact():
    # In binary floating point 0.29 * 250 is just under 72.5 and would round to 72 in total
    # (counts 29, 29, 14); as the decimal 29/100 it is 72.5 -> 73 (29, 29, 15).
    assert fraction_counts(0.29, torch.tensor([100, 100, 50])).tolist() == [29, 29, 15]


def test_ties_go_to_the_lower_class():
    # 0.5 * 3 = 1.5 in every class: total round(4.5) = 5 -> the two extra go to classes 0, 1
    assert fraction_counts(0.5, torch.tensor([3, 3, 3])).tolist() == [2, 2, 1]


@pytest.mark.parametrize("fraction,needle", [(0.0, "(0, 1]"), (-0.1, "(0, 1]"), (1.5, "(0, 1]"),
                                             (float("nan"), "(0, 1]"), ("a", "number"),
                                             (True, "number"), (0.001, "empty")])
def test_bad_fraction_is_one_line(fraction, needle):
    with pytest.raises(SelectionError, match=None) as err:
        fraction_counts(fraction, torch.tensor([100, 1000]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_exactly_one_of_ipc_and_fraction():
    with pytest.raises(SelectionError, match="exactly one"):
        budget_counts(torch.tensor([5, 5]), ipc=1, fraction=0.5)
    with pytest.raises(SelectionError, match="exactly one"):
        budget_counts(torch.tensor([5, 5]))


def test_select_by_fraction_returns_those_counts():
    data = make_tiny_set(per_class=12)
    sel = select(data, "random", fraction=0.25, seed=0)
    assert sel.counts == (3,) * 10 and sel.ipc is None and sel.fraction == 0.25
    assert torch.equal(data.labels[sel.indices], sel.labels)
    assert sel.indices.unique().numel() == 30
    whole = select(data, "herding", fraction=1.0, seed=0)   # no signal training needed
    assert sorted(whole.indices.tolist()) == list(range(len(data)))
