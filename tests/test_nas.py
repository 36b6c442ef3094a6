"""Architecture-search proxy (gtn.nas): rank correlations against brute force, bootstrap
intervals, reproducible sampling, the resumable ground-truth cache, and workers."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from distill.data import get_info
from distill.engine import TrainConfig
from distill.models import build_model
from distill.store import SavedSet, save_set
from gtn import nas
from gtn.generator import GeneratorConfig
from gtn.nas import candidates as nas_candidates  # where candidates are trained
from gtn.train import GTNConfig, make_teacher, save_generator

from .conftest import make_tiny_set


# ------------------------------------------------------------------ brute-force oracles
def brute_ranks(v):
    """1-based ranks, ties get the mean of the ranks they span."""
    return [1 + sum(w < x for w in v) + (sum(w == x for w in v) - 1) / 2 for x in v]


def brute_spearman(x, y):
    rx, ry = brute_ranks(x), brute_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def brute_kendall_b(x, y):
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx * dy > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


CASES = [
    ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
    ([3.0, 1.0, 2.0, 5.0, 4.0, 6.0], [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]),
    ([1, 1, 2, 3, 3, 3, 4], [2, 1, 1, 5, 4, 4, 3]),          # ties on both sides
    ([10, 20, 30, 40], [4, 3, 2, 1]),                          # perfect reversal
    ([0.5, 0.7, 0.7, 0.2, 0.9, 0.1, 0.4, 0.8], [1, 3, 2, 2, 9, 0, 2, 5]),
]


@pytest.mark.parametrize("x,y", CASES)
def test_rank_correlations_equal_brute_force(x, y):
    assert nas.spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
    assert nas.kendall(x, y) == pytest.approx(brute_kendall_b(x, y), abs=1e-12)


def test_random_rank_correlations_equal_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(3, 11, (1,), generator=g))
        x = torch.randint(0, 5, (n,), generator=g).tolist()  # many ties
        y = torch.randint(0, 5, (n,), generator=g).tolist()
        if len(set(x)) < 2 or len(set(y)) < 2:
            continue
        assert nas.spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
        assert nas.kendall(x, y) == pytest.approx(brute_kendall_b(x, y), abs=1e-12)


def test_constant_input_is_nan_not_an_error():
    assert math.isnan(nas.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(nas.kendall([1, 2, 3], [4, 4, 4]))


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    y = [2, 1, 4, 3, 5, 7, 6, 9, 8, 10]
    rho = nas.spearman(x, y)
    ci = nas.bootstrap_ci(x, y, nas.spearman, seed=5, resamples=300)
    assert ci[0] <= rho <= ci[1] and ci[0] < ci[1] <= 1.0
    assert nas.bootstrap_ci(x, y, nas.spearman, seed=5, resamples=300) == ci
    assert nas.bootstrap_ci(x, y, nas.spearman, seed=6, resamples=300) != ci
    tau_ci = nas.bootstrap_ci(x, y, nas.kendall, seed=5, resamples=300)
    assert tau_ci[0] <= nas.kendall(x, y) <= tau_ci[1]


def test_rank_quality_of_the_truth_itself_is_perfect():
    t = [91.0, 85.5, 97.2, 60.0, 88.8, 93.1, 70.4, 95.0]
    q = nas.rank_quality(t, t, truth_seconds=90.0, proxy_seconds=10.0, seed=0, resamples=100)
    assert q["spearman"] == pytest.approx(1) and q["kendall"] == pytest.approx(1)
    assert q["spearman_top"] == pytest.approx(1) and q["kendall_top"] == pytest.approx(1)
    assert q["top_k_overlap"] == 1.0 and q["picked"] == q["best"] == 97.2
    assert q["speedup"] == pytest.approx(9.0) and q["n_top"] == 4 and q["top_k"] == 2
    assert "speedup_wall" not in q


def test_rank_quality_picks_and_overlaps_by_hand():
    truth = [10, 20, 30, 40, 50, 60, 70, 80]
    proxy = [80, 10, 20, 30, 40, 50, 60, 70]   # loves the worst candidate
    q = nas.rank_quality(truth, proxy, top_k=2, resamples=50)
    assert q["picked"] == 10 and q["best"] == 80
    assert q["top_k_overlap"] == 0.5           # proxy top 2: {0, 7}; true top 2: {6, 7}
    top = [4, 5, 6, 7]                          # the true top half
    assert q["spearman_top"] == pytest.approx(
        brute_spearman([truth[i] for i in top], [proxy[i] for i in top]))


# ------------------------------------------------------------------ search space
def test_sampling_is_reproducible_distinct_and_counts_parameters():
    info = get_info("mnist")
    space = nas.SearchSpace(max_params=400_000)
    a = nas.sample_candidates(8, 1, info, space)
    b = nas.sample_candidates(8, 1, "mnist", space)
    c = nas.sample_candidates(8, 2, info, space)
    assert [x.id for x in a] == [x.id for x in b] and [x.spec for x in a] == [x.spec for x in b]
    assert [x.spec for x in a] != [x.spec for x in c]
    assert len({x.id for x in a}) == 8 and len({x.spec for x in a}) == 8
    for cand in a:
        assert cand.params <= 400_000
        assert cand.id == hashlib.blake2b(cand.spec.encode(), digest_size=5).hexdigest()
        model = build_model(cand.spec, 1, 10, (28, 28))
        assert cand.params == sum(p.numel() for p in model.parameters())


def test_ids_do_not_depend_on_option_order():
    spec = nas.canonical_spec("convnet:width=32,depth=2,pool=max,norm=batch,act=relu")
    assert spec == nas.canonical_spec("convnet:act=relu,depth=2,norm=batch,pool=max,width=32")
    assert spec == "convnet:act=relu,depth=2,norm=batch,pool=max,width=32"


def test_macs_of_a_small_convnet_by_hand():
    params, macs = nas.model_cost("convnet:width=4,depth=2,norm=none,act=relu,pool=avg", 1, 10,
                                  (28, 28))
    conv1 = 32 * 32 * 4 * 1 * 9  # the DC ConvNet pads a 28 px digit to 32 in its first conv
    conv2 = 16 * 16 * 4 * 4 * 9
    linear = 4 * 8 * 8 * 10
    assert macs == conv1 + conv2 + linear
    assert params == (4 * 9 + 4) + (4 * 4 * 9 + 4) + (256 * 10 + 10)


def test_sampling_respects_families_and_refuses_the_impossible():
    cands = nas.sample_candidates(5, 0, "cifar10", nas.SearchSpace(families=("lenet", "mlp")))
    assert {c.family for c in cands} <= {"lenet", "mlp"}
    with pytest.raises(nas.NASError, match="only"):
        nas.sample_candidates(7, 0, "mnist", nas.SearchSpace(families=("lenet",)))
    with pytest.raises(nas.NASError, match="at least 2"):
        nas.sample_candidates(1, 0, "mnist")
    with pytest.raises(nas.NASError, match="transformer"):
        nas.SearchSpace(families=("transformer",))


# ------------------------------------------------------------------ proxies
@pytest.mark.parametrize("text,needle", [("magic", "unknown proxy kind"),
                                         ("gtn", "needs an argument"),
                                         ("real-steps:5", "takes no argument")])
def test_bad_proxies(text, needle):
    with pytest.raises(nas.NASError, match=needle):
        nas.parse_proxy(text)


def tiny_generator(path, dataset):
    config = GTNConfig(inner_steps=2, batch_size=10, student="convnet:width=4,depth=1",
                       meta_iterations=1, generator=GeneratorConfig(noise_dim=4, width_fc=8,
                                                                   width_conv=4))
    save_generator(path, make_teacher(get_info(dataset), config, seed=0), config)
    return path


def test_runs_of_another_dataset_are_refused(tmp_path):
    gen = tiny_generator(tmp_path / "generator.pt", "fashion_mnist")  # same shape as MNIST
    with pytest.raises(nas.NASError, match="fashion_mnist, not of mnist"):
        nas.resolve_proxy(nas.parse_proxy(f"gtn:{tmp_path}"), "mnist")
    s = make_tiny_set(per_class=2, name="cifar10")
    save_set(tmp_path / "set.pt", SavedSet(s.images, s.labels, {"dataset": "cifar10"}))
    with pytest.raises(nas.NASError, match="cifar10, not of mnist"):
        nas.resolve_proxy(nas.parse_proxy(f"dc:{tmp_path / 'set.pt'}"), "mnist")
    teacher = nas.resolve_proxy(nas.parse_proxy(f"gtn:{gen}"), "fashion_mnist")
    fit = make_tiny_set(per_class=4, name="fashion_mnist")
    ts = nas.build_proxy_set(nas.parse_proxy(f"gtn:{gen}"), teacher, fit, BUDGET, seed=0)
    assert ts.images.shape == (20, 1, 28, 28) and ts.labels.tolist() == list(range(10)) * 2


# ------------------------------------------------------------------ evaluation and cache
BUDGET = nas.NASBudget(
    "test", validation=40, truth_train=None,
    truth=TrainConfig(epochs=2, lr=0.01, batch_size=32, decay_at=None),
    proxy_steps=3, proxy_batch=16, proxy_lr=0.01, ipc=2, pool_per_class=10,
    signal_model="convnet:width=4,depth=1", signal_epochs=1,
    space=nas.SearchSpace(families=("convnet", "mlp"), max_params=30_000, max_macs=200_000),
    resamples=50)


@pytest.fixture(scope="module")
def setup():
    data = make_tiny_set(per_class=20)
    fit, val = nas.nas_split(data, BUDGET)
    cands = nas.sample_candidates(4, 0, "mnist", BUDGET.space)
    return data, fit, val, cands


class CountingTrain:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.real = nas_candidates.train

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # the kill
        return self.real(*args, **kwargs)


@pytest.mark.determinism
def test_truth_cache_is_reused_and_survives_a_kill(tmp_path, setup, monkeypatch):
    _, fit, val, cands = setup
    truth = nas.truth_set(fit, BUDGET)
    cache = tmp_path / "cache"
    counter = CountingTrain(fail_at=3)
    monkeypatch.setattr(nas_candidates, "train", counter)
    with pytest.raises(KeyboardInterrupt):
        nas.evaluate_candidates(cands, [truth], val, seed=0, cache=cache)
    files = sorted(cache.rglob("*.json"))
    assert len(files) == 2                                    # finished before the kill
    files[0].write_text(files[0].read_text()[:40])            # a torn file ...
    (files[1].parent / ".x.json.123.tmp").write_text("{")     # ... and a stray temp file
    mtime = files[1].stat().st_mtime_ns

    counter = CountingTrain()
    monkeypatch.setattr(nas_candidates, "train", counter)
    first = nas.evaluate_candidates(cands, [truth], val, seed=0, cache=cache)["truth"]
    assert counter.calls == 3                                  # 4 - 1 reused
    assert files[1].stat().st_mtime_ns == mtime
    assert [first[c.id]["cached"] for c in cands].count(True) == 1
    entry = json.loads(files[0].read_text())
    assert entry["spec"] in {c.spec for c in cands}  # 160 images, batch 32, 2 epochs:
    assert entry["seconds"] >= entry["train_seconds"] > 0 and entry["steps"] == 10

    counter = CountingTrain()
    monkeypatch.setattr(nas_candidates, "train", counter)
    again = nas.evaluate_candidates(cands, [truth], val, seed=0, cache=cache)["truth"]
    assert counter.calls == 0                                  # the second run trains nothing
    assert {k: v["accuracy"] for k, v in again.items()} == \
        {k: v["accuracy"] for k, v in first.items()}
    # another budget or seed is another entry
    other = replace(truth, train=replace(truth.train, epochs=1))
    nas.evaluate_candidates(cands[:1], [other], val, seed=0, cache=cache)
    nas.evaluate_candidates(cands[:1], [truth], val, seed=1, cache=cache)
    assert counter.calls == 2


def test_a_proxy_that_is_the_truth_correlates_perfectly(setup):
    _, fit, val, cands = setup
    truth = nas.truth_set(fit, BUDGET)
    twin = replace(truth, label="twin")
    res = nas.evaluate_candidates(cands, [truth, twin], val, seed=0)
    t = [res["truth"][c.id]["accuracy"] for c in cands]
    p = [res["twin"][c.id]["accuracy"] for c in cands]
    assert t == p and len(set(t)) > 1
    q = nas.rank_quality(t, p, resamples=20)
    assert q["spearman"] == pytest.approx(1.0) and q["kendall"] == pytest.approx(1.0)


def test_run_search_report(setup, tmp_path):
    data = setup[0]
    proxies = [(nas.parse_proxy(t), nas.resolve_proxy(nas.parse_proxy(t), "mnist"))
               for t in ("real-subset", "real-steps", "coreset:random")]
    report = nas.run_search(data, proxies, BUDGET, 4, seed=0, cache=tmp_path / "c")
    assert len(report["candidates"]) == 4 and set(report["proxies"]) == {
        "real-subset", "real-steps", "coreset:random"}
    rs = report["proxies"]["real-subset"]
    # 20 images in batches of 16: 2 steps an epoch, round(3 / 2) = 2 epochs
    assert rs["size"] == 20 and rs["steps"] == 4 and rs["speedup"] > 0 < rs["speedup_wall"]
    assert report["proxies"]["real-steps"]["size"] == 48
    assert report["winner"] in report["proxies"]
    assert "| real-steps |" in nas.report_markdown(report)


@pytest.mark.determinism
@pytest.mark.slow
def test_workers_give_the_numbers_of_one_worker(setup, tmp_path):
    _, fit, val, cands = setup
    sets = [nas.truth_set(fit, BUDGET),
            nas.build_proxy_set(nas.parse_proxy("real-subset"), None, fit, BUDGET, seed=0)]
    one = nas.evaluate_candidates(cands, sets, val, seed=0, workers=1)
    two = nas.evaluate_candidates(cands, sets, val, seed=0, workers=2, cache=tmp_path)
    for label in one:
        assert {k: v["accuracy"] for k, v in one[label].items()} == \
            {k: v["accuracy"] for k, v in two[label].items()}
        assert {k: v["final_loss"] for k, v in one[label].items()} == \
            {k: v["final_loss"] for k, v in two[label].items()}


def test_gtn_steps_proxy_is_the_generators_own_protocol(tmp_path, setup):
    """gtn-steps trains batch t at the learned lr_t with the learned momentum, in order: checked
    against a hand-written momentum SGD (v <- m v + g; w <- w - lr_t v) on the same batches."""
    from distill.engine import accuracy, classification_loss
    from distill.rng import generator as make_generator

    _, fit, val, cands = setup
    gen = tiny_generator(tmp_path / "generator.pt", "mnist")
    spec = nas.parse_proxy(f"gtn-steps:{gen}")
    teacher = nas.resolve_proxy(spec, "mnist")
    with torch.no_grad():  # learned-looking, distinct per-step lrs and a momentum
        teacher.log_lr.copy_(torch.log(torch.tensor([0.05, 0.02, 0.01])[:teacher.steps]))
        teacher.momentum_logit.fill_(0.3)
    ts = nas.build_proxy_set(spec, teacher, fit, BUDGET, seed=0)
    assert ts.step_lrs == pytest.approx([0.05, 0.02, 0.01][:teacher.steps])
    assert ts.momentum == pytest.approx(float(torch.sigmoid(torch.tensor(0.3))))
    cand = cands[0]
    got = nas.train_candidate(cand.spec, ts, val.images, val.labels, 10, seed=0,
                              cand_id=cand.id)
    assert got["steps"] == teacher.steps

    model = build_model(cand.spec, 1, 10, (28, 28), generator=make_generator(0, "nas", cand.id))
    model.train()
    params = list(model.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    b = teacher.batch_size
    for t, lr in enumerate(ts.step_lrs):
        loss = classification_loss(model(ts.images[t * b:(t + 1) * b]),
                                   ts.labels[t * b:(t + 1) * b])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, v, g in zip(params, bufs, grads):
                v.mul_(ts.momentum).add_(g)
                p.sub_(lr * v)
    assert got["final_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert got["accuracy"] == pytest.approx(100.0 * accuracy(model, val.images, val.labels),
                                            abs=1e-6)
    # another momentum is another cache entry
    fp1 = nas_candidates._fingerprint(ts, val, "mnist")[0]
    fp2 = nas_candidates._fingerprint(replace(ts, momentum=0.1), val, "mnist")[0]
    assert fp1 != fp2
