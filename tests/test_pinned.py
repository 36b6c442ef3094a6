"""Outputs pinned from the code before the teacher protocol / one inner loop refactor (commit
dc8485d, issue 10): the same seed still gives the same teachers, meta-losses, few-step scores
and NAS proxy trainings. Bit for bit on the machine that pinned them; here to a tolerance that
float rounding on another CPU stays far inside (a changed step moves these by >= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from distill.condense import condense, condense_config
from distill.engine import TrainConfig
from gtn import GeneratorConfig, GTNConfig, nas
from gtn.train import few_step_accuracy, train_gtn

from .conftest import make_tiny_set


@pytest.fixture(autouse=True)
def one_thread():
    """The pinned values were computed with one CPU thread: the number of threads changes the
    order of float reductions, and Adam turns those last-bit differences in near-zero gradients
    (conv biases before batch norm) into full-size steps. Same seed, same device, same threads:
    same result."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

MODEL = "convnet:width=4,depth=1,first_pad=1"  # the 28 px padding the pins were made with

# name: (condense_config options, condense options) -> (last meta-loss, sum |teacher state|)
CONDENSE_CASES = {
    "dc": ("dc", {}, {}), "dc2": ("dc", {"outer_loop": 2, "inner_loop": 2}, {"ipc": 2}),
    "dsa": ("dsa", {}, {}), "dm": ("dm", {}, {}), "dd": ("dd", {}, {}),
    "dd_lr": ("dd", {}, {"learn_lr": True, "learn_labels": True}),
    "dd_mom": ("dd", {"inner_momentum": 0.5, "inner_weight_decay": 1e-3}, {}),
    "dd_trunc": ("dd", {"truncate": 1}, {}), "dd_ckpt": ("dd", {"checkpoint_steps": 2}, {}),
    "dd_batch": ("dd", {}, {"ipc": 2, "inner_batch": 5}),
    "ift": ("ift", {}, {}),
    "ift_wd": ("ift", {"inner_weight_decay": 1e-3, "inner_momentum": 0.3}, {"learn_lr": True}),
}
PINNED_CONDENSE = {
    "dc": (14.372762680053711, 2319.197762891061),
    "dc2": (18.106704711914062, 4620.1518562016445),
    "dd": (1.6376564502716064, 2308.9939832697273),
    "dd_batch": (2.511561155319214, 4609.803948231271),
    "dd_ckpt": (1.6376564502716064, 2308.9939879687154),
    "dd_lr": (1.6855210065841675, 2362.4076370708062),
    "dd_mom": (1.4151782989501953, 2309.408913062536),
    "dd_trunc": (1.6379528045654297, 2311.290588453412),
    "dm": (333.08831787109375, 3952.8445809199475),
    "dsa": (13.912628173828125, 2320.5806466222857),
    "ift": (1.7704191207885742, 2315.091659151716),
    "ift_wd": (1.6416879892349243, 2321.147769171046),
}
# (method, curriculum) -> (last meta-loss, sum |teacher state|, few-step accuracies)
PINNED_GTN = {
    ("unrolled", "none"): (2.3919477462768555, 798.7139476955344, [15.000000596046448, 25.0]),
    ("unrolled", "all-shuffled"):
        (2.383664131164551, 996.1496962981764, [20.000000298023224, 30.000001192092896]),
    ("unrolled", "shuffled-batch"):
        (2.415482997894287, 996.1393552674563, [15.000000596046448, 34.99999940395355]),
    ("unrolled", "full"):
        (2.268972396850586, 996.1806141509442, [15.000000596046448, 30.000001192092896]),
    ("implicit", "none"): (2.4253883361816406, 778.0763294581557, [10.000000149011612, 25.0]),
    ("implicit", "all-shuffled"):
        (2.3793420791625977, 976.2333216659608, [20.000000298023224, 30.000001192092896]),
    ("implicit", "shuffled-batch"):
        (2.2776901721954346, 975.1070027459646, [15.000000596046448, 30.000001192092896]),
    ("implicit", "full"):
        (2.4149246215820312, 974.8140841593267, [15.000000596046448, 30.000001192092896]),
    ("matching", "none"): (94.17306518554688, 792.5188472613809, [25.0, 20.000000298023224]),
    ("matching", "all-shuffled"):
        (94.17306518554688, 989.4765677499236, [15.000000596046448, 15.000000596046448]),
    ("matching", "shuffled-batch"):
        (94.17306518554688, 989.521951067436, [20.000000298023224, 15.000000596046448]),
    ("matching", "full"):
        (94.17306518554688, 989.5387428986724, [20.000000298023224, 15.000000596046448]),
}


def _state_sum(teacher: torch.nn.Module) -> float:
    return sum(float(v.double().abs().sum()) for v in teacher.state_dict().values()
               if v.is_floating_point())


@pytest.mark.parametrize("name", sorted(CONDENSE_CASES))
def test_condense_outputs_are_pinned(name):
    method, overrides, kw = CONDENSE_CASES[name]
    kw = dict(kw)
    ipc = kw.pop("ipc", 1)
    cfg = condense_config(method, iterations=2, real_batch=4, **overrides)
    teacher, res = condense(make_tiny_set(per_class=6), cfg, ipc, init="real", model=MODEL,
                            seed=3, inner_steps=3, **kw)
    loss, total = PINNED_CONDENSE[name]
    assert res.losses[-1] == pytest.approx(loss, rel=1e-5)
    assert _state_sum(teacher) == pytest.approx(total, rel=1e-7)


@pytest.mark.parametrize("method,curriculum", sorted(PINNED_GTN))
def test_gtn_outputs_are_pinned(method, curriculum):
    cfg = GTNConfig(method=method, inner_steps=3, batch_size=20, curriculum=curriculum,
                    generator=GeneratorConfig(noise_dim=4, width_fc=8, width_conv=4),
                    student=MODEL, meta_iterations=2, real_batch=8, match_real_per_class=3,
                    validation=20, meta_lr=0.01,
                    checkpoint_steps=2 if (method, curriculum) == ("unrolled", "none") else None)
    teacher, res, val = train_gtn(make_tiny_set(per_class=8), cfg, seed=1)
    loss, total, few = PINNED_GTN[(method, curriculum)]
    assert res.losses[-1] == pytest.approx(loss, rel=1e-5)
    assert few_step_accuracy(teacher, MODEL, val.images, val.labels, seed=2,
                             n_students=2) == pytest.approx(few, abs=1e-4)
    # the generator's batch-norm statistics too (after the few-step students it pinned them)
    assert _state_sum(teacher) == pytest.approx(total, rel=1e-7)
    if (method, curriculum) != ("unrolled", "full"):
        return
    # the NAS proxies built from this generator: its curriculum as a set, and its own protocol
    data = make_tiny_set(per_class=8)
    budget = nas.NASBudget("t", validation=20, truth_train=None,
                           truth=TrainConfig(epochs=1, lr=0.01, batch_size=16, decay_at=None),
                           proxy_steps=3, proxy_batch=16, proxy_lr=0.01, ipc=2,
                           pool_per_class=4, signal_model=MODEL, signal_epochs=1)
    for kind, (acc, final_loss, steps) in {
            "gtn-steps": (2.500000037252903, 2.2806906700134277, 3),
            "gtn": (3.750000149011612, 2.308351755142212, 4)}.items():
        ts = nas.build_proxy_set(nas.ProxySpec(kind, "x"), teacher, data, budget, seed=0)
        r = nas.train_candidate("convnet:width=8,depth=2,first_pad=1", ts, data.images,
                                data.labels, 10, 0,
                                "abc")
        assert r["steps"] == steps and r["accuracy"] == pytest.approx(acc, abs=1e-4)
        assert r["final_loss"] == pytest.approx(final_loss, rel=1e-5)
