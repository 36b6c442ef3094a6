"""KIP and Label Solve against independent oracles: scipy's solve and least squares, finite
differences, the interpolation limit; KIP through the meta-training loop (descent, resume,
learned labels); bad input as one typed line."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from distill.condense import condense
from distill.kernels import KernelConfig, KernelError, make_kernel
from distill.kip import (
    KipConfig,
    KipStrategy,
    kip_config,
    kip_loss,
    krr_accuracy,
    krr_predict,
    label_solve,
    label_solve_set,
    one_hot_targets,
    regularise,
    training_labels,
)
from distill.rng import generator
from distill.strategies import STRATEGIES, ConfigError, StrategyConfig, make_strategy
from distill.synthetic import SyntheticSet

from .conftest import Kill, killer, make_tiny_set


def _problem(n_s: int, n_t: int, d: int = 6, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(n_s, d, dtype=torch.float64, generator=g)
    x_t = torch.randn(n_t, d, dtype=torch.float64, generator=g)
    y_s = torch.randn(n_s, k, dtype=torch.float64, generator=g)
    y_t = torch.randn(n_t, k, dtype=torch.float64, generator=g)
    return x_s, y_s, x_t, y_t


def test_krr_matches_scipy_solve_with_the_papers_ridge_scaling():
    x_s, y_s, x_t, _ = _problem(5, 7)
    kern = make_kernel("nngp", depth=2)
    k_ss, k_ts = kern(x_s, x_s).numpy(), kern(x_t, x_s).numpy()
    reg = 1e-2
    expected = k_ts @ scipy.linalg.solve(k_ss + reg * np.trace(k_ss) / 5 * np.eye(5),
                                         y_s.numpy(), assume_a="pos")
    got = krr_predict(torch.from_numpy(k_ts), torch.from_numpy(k_ss), y_s, reg)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(regularise(torch.eye(3) * 2, 0.5), torch.eye(3) * 3)


@pytest.mark.parametrize("n_s, n_t", [(4, 9), (6, 3)])  # over- and under-determined
def test_label_solve_is_the_min_norm_least_squares_solution(n_s, n_t):
    x_s, _, x_t, y_t = _problem(n_s, n_t, seed=n_s)
    kern = make_kernel("ntk", depth=1)
    reg = 1e-3
    k_ss, k_ts = kern(x_s, x_s).numpy(), kern(x_t, x_s).numpy()
    a = k_ts @ np.linalg.inv(k_ss + reg * np.trace(k_ss) / n_s * np.eye(n_s))
    expected = scipy.linalg.lstsq(a, y_t.numpy())[0]  # gelsd: minimum norm
    got = label_solve(x_s, x_t, y_t, kern, reg)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-8)


def test_kip_gradient_matches_finite_differences():
    x_s, y_s, x_t, y_t = _problem(4, 6)
    kern = make_kernel("ntk", depth=2)
    assert torch.autograd.gradcheck(
        lambda xs, ys: kip_loss(xs, ys, x_t, y_t, kern, 1e-3),
        (x_s.requires_grad_(), y_s.requires_grad_()))


def test_support_equal_to_target_gives_zero_loss_as_reg_vanishes():
    _, _, x_t, y_t = _problem(1, 8)
    kern = make_kernel("nngp", depth=1)
    losses = [float(kip_loss(x_t, y_t, x_t, y_t, kern, reg)) for reg in (1e-2, 1e-5, 1e-10)]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-15


def test_label_solve_never_fits_the_targets_worse_than_one_hot_labels():
    data = make_tiny_set(per_class=6)
    kernel = KernelConfig("ntk", 1)
    support = data.images[::6]  # the first image of every class
    y_ls = label_solve_set(support, data, kernel, 1e-6, None)
    assert torch.allclose(y_ls.sum(1), torch.ones(10), atol=1e-4)  # one-hot scale
    kern = make_kernel("ntk", 1)
    targets = one_hot_targets(data.labels, 10)
    ls = kip_loss(support, one_hot_targets(y_ls, 10), data.images, targets, kern, 1e-6)
    onehot = kip_loss(support, one_hot_targets(data.labels[::6], 10), data.images, targets, kern,
                      1e-6)
    assert float(ls) <= float(onehot)


def test_training_labels_project_krr_labels_onto_the_simplex():
    y = torch.tensor([[0.7, 0.5, -0.2], [-0.1, -0.2, -0.3], [0.2, 0.3, 0.5]])
    p = training_labels(y)
    assert torch.allclose(p[0], torch.tensor([7 / 12, 5 / 12, 0.0]))
    assert torch.equal(p[1], torch.tensor([1.0, 0.0, 0.0]))  # no positive mass: argmax
    assert torch.allclose(p[2], y[2])
    assert torch.equal(training_labels(torch.tensor([2, 0])), torch.tensor([2, 0]))


def _kip(iterations: int, lr: float = 0.05, **kw):
    knobs = dict(target_batch=40, kernel="ntk", kernel_depth=2)
    knobs.update(kw)
    return kip_config(iterations, lr=lr, checkpoint_every=2, eval_every=1, **knobs)


def test_kip_lowers_its_loss_and_its_krr_error_on_a_tiny_problem():
    data = make_tiny_set(per_class=8)
    kern = make_kernel("ntk", 2)
    targets = one_hot_targets(data.labels, 10)

    def full_loss(teacher):
        x, y = teacher.batch(None, None)
        return float(kip_loss(x.detach(), one_hot_targets(y, 10), data.images, targets, kern,
                              1e-6))

    start = full_loss(SyntheticSet.from_noise((1, 28, 28), 10, 1, generator(0, "init")))
    syn, res = condense(data, _kip(40, lr=0.1), 1, init="noise", seed=0)
    assert full_loss(syn) < 0.2 * start  # measured: 0.0041 from 0.045
    assert res.losses[-1] < res.losses[0]
    assert krr_accuracy(syn.images.detach(), syn.labels, data.images, data.labels, kern,
                        1e-6) == 100.0


@pytest.mark.determinism
@pytest.mark.parametrize("learn_labels", [False, True, "free"])
def test_kip_resumes_after_a_kill_to_the_same_result(tmp_path, learn_labels):
    data = make_tiny_set(per_class=8)
    cfg = _kip(5, family=True)
    kw = dict(seed=1, learn_labels=learn_labels)
    full, r_full = condense(data, cfg, 2, **kw)
    with pytest.raises(Kill):  # killed in iteration 3, after the checkpoint at 2
        condense(data, cfg, 2, checkpoint=tmp_path / "k.pt", evaluate=killer(3), **kw)
    resumed, r_res = condense(data, cfg, 2, checkpoint=tmp_path / "k.pt", resume=True, **kw)
    assert r_res.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    assert r_res.losses == r_full.losses
    if learn_labels:
        assert torch.equal(resumed.label_logits, full.label_logits)
        initial = torch.nn.functional.one_hot(full.labels, 10).float()
        if learn_labels is True:
            initial = initial * np.log(100.0)
        assert not torch.allclose(full.label_logits, initial)  # the labels were learned


def test_kip_is_a_registered_strategy_that_takes_a_plain_config():
    assert STRATEGIES["kip"] is KipStrategy
    strategy = make_strategy("kip", StrategyConfig(real_batch=8))
    assert isinstance(strategy.config, KipConfig) and strategy.config.real_batch == 8
    assert strategy.config.reg == 1e-6 and strategy.kernel.name == "ntk"


@pytest.mark.parametrize("kw, error, match", [
    (dict(kernel="rbf"), KernelError, "unknown kernel 'rbf'; choose from ntk, nngp"),
    (dict(kernel_depth=0), KernelError, "depth must be an integer >= 1"),
    (dict(reg=-1.0), ConfigError, "regulariser must be > 0, got -1.0"),
    (dict(reg=0.0), ConfigError, "regulariser must be > 0"),
    (dict(target_batch=0), ConfigError, "target_batch must be >= 1"),
])
def test_bad_options_are_one_typed_line(kw, error, match):
    with pytest.raises(error, match=match) as err:
        KipConfig(**kw)
    assert "\n" not in str(err.value)


def test_a_target_batch_smaller_than_the_classes_fails_before_any_update(tmp_path):
    data = make_tiny_set(per_class=4)
    ckpt = tmp_path / "k.pt"
    with pytest.raises(ConfigError, match=r"target_batch \(5\) must be >= the number of classes"):
        condense(data, _kip(3, target_batch=5), 1, checkpoint=ckpt)
    assert not ckpt.exists()


@pytest.mark.parametrize("n", [10, 23, 47])
def test_balanced_target_batches_hold_every_class_equally(n):
    """The paper samples target batches class-balanced: every class n // K or n // K + 1
    times (the extra ones in n % K distinct classes), distinct images, the labels those of
    the images drawn, and the same draw for the same generator state."""
    from distill.strategies import RealSampler

    data = make_tiny_set(per_class=12)
    k = data.info.num_classes
    real = RealSampler(data)
    x, y = real.balanced_batch(n, generator(3, "t"))
    counts = torch.bincount(y, minlength=k)
    assert int(counts.sum()) == n and set(counts.tolist()) <= {n // k, n // k + 1}
    assert int((counts == n // k + 1).sum()) == n % k
    # each row is a distinct training image of the class it is labelled with
    rows = [int(((data.images - xi).abs().flatten(1).sum(1) == 0).nonzero()[0]) for xi in x]
    assert len(set(rows)) == n and data.labels[rows].tolist() == y.tolist()
    x2, y2 = real.balanced_batch(n, generator(3, "t"))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ConfigError, match="at least one per class"):
        real.balanced_batch(k - 1, generator(3, "t"))


def test_kip_draws_its_targets_class_balanced_by_default():
    """KipStrategy asks the sampler for a balanced batch unless told otherwise."""
    class Spy:
        num_classes = 3

        def __init__(self):
            self.calls = []

        def balanced_batch(self, n, g):
            self.calls.append("balanced")
            raise StopIteration

        def batch(self, n, g):
            self.calls.append("uniform")
            raise StopIteration

    teacher = SyntheticSet(torch.randn(3, 1, 4, 4), 3)
    for balanced, want in ((True, "balanced"), (False, "uniform")):
        spy = Spy()
        strategy = KipStrategy(KipConfig(target_batch=6, balanced_targets=balanced))
        with pytest.raises(StopIteration):
            strategy.step(teacher, torch.optim.Adam(teacher.parameters()), spy, None,
                          generator(0, "t"))
        assert spy.calls == [want]


def test_free_labels_start_one_hot_train_unconstrained_and_save():
    """learn_labels="free": the targets are the label parameter itself (starting at one-hot),
    so they can leave the simplex; softmax mode stays on it; a bad mode is one line."""
    x = torch.randn(6, 1, 4, 4)
    free = SyntheticSet(x, 3, learn_labels="free")
    assert torch.equal(free.targets(), torch.eye(3).repeat_interleave(2, 0))
    assert free.targets() is free.label_logits
    with torch.no_grad():
        free.label_logits.sub_(0.7)
    assert float(free.targets().detach().min()) < 0  # off the simplex: allowed
    assert torch.equal(free.to_saved({}).labels, free.targets().detach())
    soft = SyntheticSet(x, 3, learn_labels=True)
    assert torch.allclose(soft.targets().sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="learn_labels must be"):
        SyntheticSet(x, 3, learn_labels="logits")


def test_kip_free_label_descent_reaches_the_label_solve_optimum():
    """With the images frozen, minimising KIP's loss over free labels on one fixed target
    set is least squares in the labels: gradient descent through the KIP loss must land on
    scipy's lstsq solution (the Label Solve closed form), an independent oracle."""
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(6, 5, dtype=torch.float64, generator=g)
    x_t = torch.randn(30, 5, dtype=torch.float64, generator=g)
    y_t = torch.randn(30, 3, dtype=torch.float64, generator=g)
    kernel = make_kernel("ntk", 1)
    reg = 1e-3
    y = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([y], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kip_loss(x_s, y, x_t, y_t, kernel, reg)
        loss.backward()
        return loss

    opt.step(closure)
    k_ss = kernel(x_s, x_s)
    a = (kernel(x_t, x_s) @ torch.linalg.inv(regularise(k_ss, reg))).numpy()
    want = scipy.linalg.lstsq(a, y_t.numpy())[0]
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-6, atol=1e-6)
