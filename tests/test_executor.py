"""The executor of independent work items (distill.executor), run for real: in-process, a
spawned local pool, a local Ray runtime (2 CPUs, no dashboard) and a two-node Ray cluster on
this machine. Same numbers from every backend (an architecture-search run and a GTN
comparison through the library API), a dead worker retried, a killed driver resumed from the
cache, a failing item reported while the others finish, and the one-line error without Ray.

The Ray tests carry the ``ray`` marker and are skipped, saying why, only where Ray is not
installed (CI installs the ``ray`` extra, so there they run)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distill.executor import (
    RAY_MISSING,
    ExecutorConfig,
    ExecutorError,
    RayNotInstalled,
    SweepError,
    WorkItem,
    make_executor,
    run_items,
)
from gtn import nas

from .conftest import make_tiny_set
from .test_nas import BUDGET

try:
    import ray
except ImportError:  # the ray tests say why they skip
    ray = None

ROOT = Path(__file__).resolve().parents[1]
needs_ray = [pytest.mark.ray,
             pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install "
                                "'gtnkit[ray]' (CI installs the extra, so these run there)")]


# ------------------------------------------------------------------ work items (importable)
def seeded(x: int) -> dict:
    """A pure function of its seed with float reductions, and who computed it."""
    g = torch.Generator().manual_seed(x)
    a = torch.randn(48, 48, generator=g)
    return {"x": x, "value": float((a @ a.T).sum()), "threads": torch.get_num_threads()}


def counted(folder: str, pause: float, x: int) -> dict:
    """``seeded`` that leaves one file per execution in ``folder`` (to count them)."""
    time.sleep(pause)
    Path(folder, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    return seeded(x)


def fails_on(bad: int, x: int) -> dict:
    if x == bad:
        raise ValueError(f"item {x} is bad\non two lines")
    return seeded(x)


def dies_once(folder: str, x: int) -> dict:
    """Kills its worker process on the first attempt (a marker file remembers it); item 1
    lives."""
    marker = Path(folder, f"{x}.died")
    if x != 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(3)
    return seeded(x)


def nas_on_node(shared: dict, label: str, spec: str, seed: int, cand_id: str) -> dict:
    """One architecture-search student, and the Ray node that trained it."""
    out = nas.train_candidate(spec, shared["sets"][label], shared["val_x"], shared["val_y"],
                              shared["num_classes"], seed, cand_id)
    return {**out, "node": ray.get_runtime_context().get_node_id()}


def allocator_kept(x: int) -> bool:
    from distill.allocator import kept

    return kept()


def items_of(fn, xs, *first) -> list[WorkItem]:
    return [WorkItem(f"item/{x}", fn, (*first, x)) for x in xs]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def _ray_holder():
    holder: dict = {}
    yield holder
    if holder.get("ex") is not None:
        holder["ex"].close()


@pytest.fixture
def ray_local(_ray_holder, monkeypatch):
    """An open executor on a local Ray runtime that it started itself (2 CPUs, no
    dashboard), shared by the tests of this module and shut down after them."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ex = _ray_holder.get("ex")
    if ex is None or not ray.is_initialized():
        ex = _ray_holder["ex"] = make_executor(ExecutorConfig(kind="ray", workers=2))
        assert ex._owns  # started here: close() shuts it down
    return ex


@pytest.fixture(scope="module")
def nas_setup():
    data = make_tiny_set(per_class=20)
    proxies = [(nas.parse_proxy(t), None) for t in ("real-subset", "real-steps")]
    return data, proxies


def accuracies(report: dict) -> dict:
    return {c["id"]: (c["truth"], {k: v["accuracy"] for k, v in c["proxies"].items()})
            for c in report["candidates"]}


# ------------------------------------------------------------------ local backend
def test_config_refuses_bad_options_in_one_line():
    for kw, needle in [({"kind": "dask"}, "local, ray"), ({"workers": 0}, "workers"),
                       ({"gpus_per_item": 1}, "--executor ray"),
                       ({"ray_address": "h:6379"}, "--executor ray"),
                       ({"kind": "ray", "cpus_per_item": 0}, "cpus")]:
        with pytest.raises(ExecutorError, match=needle) as err:
            ExecutorConfig(**kw)
        assert "\n" not in str(err.value)


def test_in_process_cache_and_progress(tmp_path):
    items = items_of(seeded, range(4))
    seen: list[str] = []
    first = run_items(items, cache=tmp_path, on_result=lambda k, v: seen.append(k))
    assert seen == [it.key for it in items] and not first.cached
    assert (tmp_path / "item" / "2.json").is_file()
    (tmp_path / "item" / "1.json").write_text('{"x": 1, "va')  # a torn entry is redone
    again = run_items(items, cache=tmp_path, on_result=lambda k, v: seen.append(k))
    assert seen[4:] == ["item/1"] and again.cached == {"item/0", "item/2", "item/3"}
    assert again.values == first.values
    picky = [replace(it, accept=lambda v: v["x"] != 3) for it in items]
    assert run_items(picky, cache=tmp_path).cached == {"item/0", "item/1", "item/2"}


def test_a_failing_item_is_one_line_and_the_others_finish(tmp_path):
    with pytest.raises(SweepError) as err:
        run_items(items_of(fails_on, range(4), 2), cache=tmp_path)
    assert "item/2: ValueError: item 2 is bad on two lines" in str(err.value)
    assert "\n" not in str(err.value) and err.value.failures.keys() == {"item/2"}
    assert sorted(p.stem for p in (tmp_path / "item").glob("*.json")) == ["0", "1", "3"]


def test_local_pool_gives_the_in_process_numbers_and_replaces_a_dead_worker(tmp_path):
    one = run_items(items_of(seeded, range(2)), ExecutorConfig(threads=1))
    pool = run_items(items_of(dies_once, range(2), str(tmp_path)),
                     ExecutorConfig(workers=2, threads=1))
    assert pool.values == one.values and {v["threads"] for v in pool.values.values()} == {1}
    assert [p.stem for p in tmp_path.glob("*.died")] == ["0"]  # item 0 killed a worker


@pytest.mark.parametrize("driver", [False, True])
def test_pool_workers_take_the_drivers_allocator_setting(monkeypatch, driver):
    """A worker process keeps freed memory (distill.allocator) when the process that started
    the sweep does: the demo's meta-steps run in workers."""
    import distill.allocator

    monkeypatch.setitem(distill.allocator._STATE, "kept", driver)
    res = run_items(items_of(allocator_kept, range(2)), ExecutorConfig(workers=2, threads=1))
    assert list(res.values.values()) == [driver, driver]


def test_without_ray_the_ray_kind_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(RayNotInstalled) as err:
        make_executor(ExecutorConfig(kind="ray", workers=2))
    assert str(err.value) == RAY_MISSING == \
        "--executor ray needs Ray: pip install 'gtnkit[ray]'"
    assert isinstance(err.value, ExecutorError)


# ------------------------------------------------------------------ Ray: a local runtime
def ray_test(fn):
    for mark in needs_ray:
        fn = mark(fn)
    return fn


@ray_test
def test_nas_smoke_on_ray_equals_local(ray_local, nas_setup):
    data, proxies = nas_setup
    local = nas.run_search(data, proxies, BUDGET, 3, seed=0,
                           executor=ExecutorConfig(threads=1))
    remote = nas.run_search(data, proxies, BUDGET, 3, seed=0, executor=ray_local)
    assert ray_local.config.item_threads() == 1
    assert remote["executor"] == "ray" and local["executor"] == "local"
    assert accuracies(remote) == accuracies(local)
    assert {k: v["spearman"] for k, v in remote["proxies"].items()} == \
        {k: v["spearman"] for k, v in local["proxies"].items()}


@ray_test
def test_gtn_compare_on_ray_equals_in_process(ray_local, tmp_path):
    from gtn.compare import Budget, run_comparison
    from gtn.train import GTNConfig

    budget = Budget("tiny", 2, replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                       width_conv=4), "convnet:width=4,depth=1",
                    batch_size=20, real_batch=20, students=1, fixed_epochs=1, test_limit=None,
                    validation=20)
    data = make_tiny_set(per_class=8)
    args = (data, data, ["unrolled", "matching"], [2, 3], budget)
    here = run_comparison(*args, tmp_path / "local", executor=ExecutorConfig(threads=1))
    there = run_comparison(*args, tmp_path / "ray", executor=ray_local)
    assert list(there["cells"]) == list(here["cells"]) == \
        ["unrolled/T=2", "unrolled/T=3", "matching/T=2", "matching/T=3"]
    for key, cell in here["cells"].items():
        other = there["cells"][key]
        for field in ("few_step", "fixed_set", "final_meta_loss", "meta_iterations"):
            assert other[field] == cell[field], (key, field)
        assert other["memory"]["saved_peak_bytes"] == cell["memory"]["saved_peak_bytes"]
    def rows(folder):  # the table without its seconds per meta-step
        lines = (tmp_path / folder / "gtn-compare.md").read_text().splitlines()
        return [[c for i, c in enumerate(line.split("|")) if i != 5]
                for line in lines if line.startswith("| ")]

    assert rows("ray") == rows("local") and len(rows("ray")) == 5
    assert (tmp_path / "ray" / "gtn-compare.png").is_file()


@ray_test
def test_ray_retries_a_worker_killed_mid_item(ray_local, tmp_path):
    expected = run_items(items_of(seeded, range(2)), ExecutorConfig(threads=1)).values
    got = ray_local.run(items_of(dies_once, range(2), str(tmp_path)))
    assert got.values == expected
    assert [p.stem for p in tmp_path.glob("*.died")] == ["0"]  # item 0's first worker died


@ray_test
def test_ray_reports_a_failing_item_and_finishes_the_others(ray_local, tmp_path):
    with pytest.raises(SweepError, match="item/1: ValueError: item 1 is bad on two lines"):
        ray_local.run(items_of(fails_on, range(3), 1), cache=tmp_path)
    assert sorted(p.stem for p in (tmp_path / "item").glob("*.json")) == ["0", "2"]


class Killed(Exception):
    """Stands for the driver being killed."""


@pytest.mark.parametrize("kind", ["local", pytest.param("ray", marks=needs_ray)])
def test_a_driver_killed_mid_sweep_recomputes_only_the_missing_items(kind, tmp_path,
                                                                     request):
    ex = request.getfixturevalue("ray_local") if kind == "ray" else \
        make_executor(ExecutorConfig(threads=1))
    runs = tmp_path / "runs"
    runs.mkdir()
    items = items_of(counted, range(6), str(runs), 0.2)
    finished: list[str] = []

    def die_after_two(key, value):
        finished.append(key)
        if len(finished) == 2:
            raise Killed

    with pytest.raises(Killed):
        ex.run(items, cache=tmp_path / "cache", on_result=die_after_two)
    cached = {p.stem for p in (tmp_path / "cache" / "item").glob("*.json")}
    assert cached == {k.split("/")[1] for k in finished}
    before = len(list(runs.iterdir()))
    computed: list[str] = []
    again = ex.run(items, cache=tmp_path / "cache", on_result=lambda k, v: computed.append(k))
    assert again.cached == set(finished) and len(computed) == 4
    assert len(list(runs.iterdir())) - before == 4  # only the missing items ran
    assert again.values == run_items(items_of(seeded, range(6)),
                                     ExecutorConfig(threads=1)).values


# ------------------------------------------------------------------ Ray: a two-node cluster
@ray_test
@pytest.mark.slow
def test_a_two_node_cluster_spreads_the_items_and_gives_the_same_numbers(
        _ray_holder, monkeypatch, nas_setup):
    from ray.cluster_utils import Cluster

    from distill.executor import move_tensors

    if _ray_holder.get("ex") is not None:  # one Ray runtime per process: end the local one
        _ray_holder.pop("ex").close()
    ray.shutdown()
    # the nodes' workers import gtnkit and these tests from the checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data, _ = nas_setup
    fit, val = nas.nas_split(data, BUDGET)
    cands = nas.sample_candidates(4, 0, "mnist", BUDGET.space)
    truth = nas.truth_set(fit, BUDGET)
    local = nas.evaluate_candidates(cands, [truth], val, seed=0,
                                    executor=ExecutorConfig(threads=1))["truth"]
    shared = move_tensors({"sets": {"truth": truth}, "val_x": val.images,
                           "val_y": val.labels, "num_classes": 10}, "cpu")
    items = [WorkItem(c.id, nas_on_node, ("truth", c.spec, 0, c.id)) for c in cands]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with make_executor(ExecutorConfig(kind="ray", ray_address=cluster.address)) as ex:
            assert ex._owns and len(ray.nodes()) == 2
            got = ex.run(items, shared=shared).values
        assert not ray.is_initialized()  # the executor disconnected on leaving
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len({v["node"] for v in got.values()}) == 2  # both nodes trained students
    assert {k: v["accuracy"] for k, v in got.items()} == \
        {k: v["accuracy"] for k, v in local.items()}
