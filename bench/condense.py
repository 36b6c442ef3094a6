"""Condensation benchmark: DC, DSA, DM beside random real images; the initialisation study;
seconds per iteration and peak memory of every strategy; fast vs straightforward eager.

Sections (each cell is saved to the JSON as it finishes; ``--resume`` skips finished cells,
and a condensation killed midway continues from its checkpoint under ``OUT/ckpt``):

* ``accuracy``: every (data set, IPC, method) of the budget; ``random`` is the random real
  initial set before any condensation (the baseline DC must beat). Published figures from
  Zhao, Mopuri & Bilen (ICLR 2021), Zhao & Bilen (ICML 2021; WACV 2023), via DESIGN.md.
* ``init``: DC on MNIST initialised from noise / real / herding / k-center / forgetting
  (the DC thesis's study), several seeds, Welch's t-test between every pair.
* ``strategies``: seconds per iteration and peak memory (bytes autograd saves; process peak
  RSS; CUDA peak on GPU) of dc, dsa, dm, dd (unrolled) and ift (implicit).
* ``speed``: DC at IPC 1 with the paper's ConvNet (width 128, real batch 256 per class): the
  straightforward eager implementation vs the fast path (torch.compile'd real side in
  batches of 64), alternated in one process; the ratio and the difference of the results.

    python bench/condense.py --budget smoke   # a minute: proves the path
    python bench/condense.py --budget short   # about an hour on a 2-core CPU: the README
    python bench/condense.py --budget paper   # the published protocol (wants a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.condense import condense, condense_config  # noqa: E402
from distill.data import load_dataset  # noqa: E402
from distill.devices import real_chunk_for, resolve_device  # noqa: E402
from distill.engine import TrainConfig, evaluate_set  # noqa: E402
from distill.protocols import default_protocol, make_protocol  # noqa: E402
from distill.rng import generator  # noqa: E402
from distill.stats import comparison_markdown  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from distill.synthetic import SyntheticSet  # noqa: E402
from selection import SignalConfig, SignalProvider  # noqa: E402
from selection import select as run_select  # noqa: E402

PUBLISHED = {  # DESIGN.md: ConvNet, GPU, full protocol
    ("mnist", 1): {"random": 64.9, "dc": 91.7, "dsa": 88.7, "dm": 89.7},
    ("mnist", 10): {"random": 95.1, "dc": 97.4, "dsa": 97.8, "dm": 97.5},
    ("mnist", 50): {"random": 97.9, "dc": 98.8, "dsa": 99.2, "dm": 98.6},
    ("cifar10", 1): {"random": 14.4, "dc": 28.3, "dsa": 28.8, "dm": 26.0},
    ("cifar10", 10): {"random": 26.0, "dc": 44.9, "dsa": 52.1, "dm": 48.9},
    ("cifar10", 50): {"random": 43.4, "dc": 53.9, "dsa": 60.6, "dm": 63.0},
}
METHODS = ("random", "dc", "dsa", "dm")
INITS = ("noise", "real", "herding", "kcenter", "forgetting")


@dataclass(frozen=True)
class Budget:
    name: str
    datasets: tuple[str, ...]
    ipcs: tuple[int, ...]
    model: str                       # student meta-trained against and evaluated
    iterations: dict                 # (method, ipc) -> iterations; key "method" or "method/ipc"
    real_batch: dict                 # ipc -> real images per class per step
    eval_epochs: int | None          # None: the protocol's (distill.protocols)
    students: int
    test_limit: int | None
    init_iterations: int
    init_seeds: tuple[int, ...]
    pool_per_class: int | None       # selection candidates for the init study
    signal_epochs: int
    strategy_iterations: int
    inner_steps: int                 # T of dd / ift in the strategies table
    speed_iterations: int
    speed_rounds: int
    speed_datasets: tuple[str, ...]
    notes: str = ""

    def iters(self, method: str, ipc: int) -> int:
        return self.iterations.get(f"{method}/{ipc}", self.iterations[method])


BUDGETS = {
    "smoke": Budget("smoke", ("mnist",), (1,), "convnet:width=8,depth=2",
                    iterations={"dc": 2, "dsa": 2, "dm": 2}, real_batch={1: 16, 10: 8},
                    eval_epochs=5, students=1, test_limit=200,
                    init_iterations=2, init_seeds=(0, 1), pool_per_class=20, signal_epochs=1,
                    strategy_iterations=1, inner_steps=2, speed_iterations=1, speed_rounds=1,
                    speed_datasets=("mnist",), notes="proves the path only; figures mean nothing"),
    "short": Budget("short", ("mnist", "cifar10"), (1, 10), "convnet:width=32",
                    iterations={"dc": 200, "dsa": 200, "dm": 500, "dc/10": 20, "dsa/10": 20,
                                "dm/10": 200},
                    real_batch={1: 256, 10: 128}, eval_epochs=None, students=2,
                    test_limit=2000, init_iterations=100, init_seeds=(0, 1),
                    pool_per_class=1000, signal_epochs=5, strategy_iterations=2,
                    inner_steps=10, speed_iterations=3, speed_rounds=2,
                    speed_datasets=("mnist", "cifar10"),
                    notes="width-32 ConvNet; DC/DSA 200 iterations at IPC 1 and 20 at IPC 10 "
                          "(paper: 1000), DM 500 / 200 (paper: 20 000); real batch 256 per "
                          "class at IPC 1, 128 at IPC 10; DC loop table and image lr as in the "
                          "paper; evaluation: each method's paper's protocol (dc: MNIST with "
                          "DC's crop/scale/rotate, 1000 epochs, CIFAR-10 none, 300; dsa for "
                          "DSA/DM: DSA's augmentation, no flip on MNIST, 1000 epochs), 2 "
                          "students, fixed 2000-image test subset"),
    "paper": Budget("paper", ("mnist", "cifar10"), (1, 10, 50), "convnet",
                    iterations={"dc": 1000, "dsa": 1000, "dm": 20000},
                    real_batch={1: 256, 10: 256, 50: 256}, eval_epochs=None, students=5,
                    test_limit=None,
                    init_iterations=1000, init_seeds=(0, 1, 2, 3, 4), pool_per_class=None,
                    signal_epochs=20, strategy_iterations=5, inner_steps=10,
                    speed_iterations=10, speed_rounds=3, speed_datasets=("mnist", "cifar10"),
                    notes="the published protocol: width-128 ConvNet, all test images"),
}


class Bench:
    def __init__(self, budget: Budget, out: Path, device: torch.device, data_root, resume,
                 log=print):
        self.budget, self.out, self.device, self.root, self.log = budget, out, device, \
            data_root, log
        self.json_path = out / f"condense-{budget.name}.json"
        self.ckpt = out / "ckpt" / budget.name
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.state: dict = {"budget": asdict(budget), "cells": {}, "device": str(device),
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
        if resume and self.json_path.exists():
            previous = json.loads(self.json_path.read_text())
            # compared as JSON: the file holds lists where the budget has tuples
            if previous.get("budget") == json.loads(json.dumps(self.state["budget"])):
                self.state["cells"] = previous.get("cells", {})
                self.state["wall_seconds"] = previous.get("wall_seconds", 0.0)
                log(f"resuming: {len(self.state['cells'])} cells already done")
        self._data: dict = {}

    def data(self, name: str):
        if name not in self._data:
            self._data[name] = (load_dataset(name, "train", root=self.root).to(self.device),
                                load_dataset(name, "test", root=self.root).to(self.device))
        return self._data[name]

    def save(self) -> None:
        atomic_write_json(self.json_path, self.state)

    def done(self, key: str) -> bool:
        return key in self.state["cells"]

    def put(self, key: str, cell: dict) -> None:
        self.state["cells"][key] = cell
        self.save()

    def evaluate(self, name, images, labels, method, seed):
        """Scored by the protocol of ``method``'s paper (random real images: DC's)."""
        b = self.budget
        train_set, test_set = self.data(name)
        protocol = make_protocol(default_protocol(method), name, model=b.model,
                                 n_students=b.students, test_limit=b.test_limit,
                                 **({"epochs": b.eval_epochs} if b.eval_epochs else {}))
        return evaluate_set(images.detach(), labels.detach(), test_set.images, test_set.labels,
                            protocol, seed=seed, num_classes=train_set.info.num_classes)

    def condense(self, name, method, ipc, iterations, init="real", seed=0, tag="", inner_steps=10,
                 **kw):
        train_set, _ = self.data(name)
        cfg = condense_config(method, iterations=iterations, dataset=name, compile=True,
                              real_chunk=real_chunk_for(self.device),
                              real_batch=self.budget.real_batch[ipc], checkpoint_every=10, **kw)
        ckpt = self.ckpt / f"{name}-{method}-{ipc}-{tag}-{seed}.pt"
        t0 = time.perf_counter()
        teacher, meta = condense(train_set, cfg, ipc, init=init, model=self.budget.model,
                                 seed=seed, device=self.device, checkpoint=ckpt,
                                 inner_steps=inner_steps,
                                 resume=ckpt.exists())
        return teacher, meta, time.perf_counter() - t0

    # ---------------------------------------------------------------- sections
    def accuracy(self) -> None:
        b = self.budget
        for name in b.datasets:
            for ipc in b.ipcs:
                for method in METHODS:
                    key = f"accuracy/{name}/{ipc}/{method}"
                    if self.done(key):
                        continue
                    train_set, _ = self.data(name)
                    cell = {"dataset": name, "ipc": ipc, "method": method,
                            "published": PUBLISHED.get((name, ipc), {}).get(method)}
                    if method == "random":  # the initial set of every "real" run, untrained
                        t = SyntheticSet.from_real(train_set, ipc, generator(0, "init"))
                        r = self.evaluate(name, t.images, t.targets(), "random", 0)
                    else:
                        t, meta, wall = self.condense(name, method, ipc, b.iters(method, ipc))
                        r = self.evaluate(name, t.images, t.targets(), method, 0)
                        cell.update(iterations=meta.iterations, wall_seconds=wall,
                                    seconds_per_iteration=meta.seconds_per_iteration,
                                    memory=meta.memory, final_loss=meta.losses[-1])
                    cell.update(accuracies=list(r.accuracies), mean=r.mean, std=r.std,
                                eval_seconds=r.seconds, protocol=default_protocol(method))
                    self.put(key, cell)
                    self.log(f"{name} ipc={ipc:<3} {method:<7} {r.mean:6.2f} ± {r.std:5.2f} % "
                             f"(published {cell['published']})")

    def init_study(self) -> None:
        b = self.budget
        name, ipc = "mnist", 1
        train_set, _ = self.data(name)
        providers: dict[int, SignalProvider] = {}
        for init in INITS:
            for seed in b.init_seeds:
                key = f"init/{init}/{seed}"
                if self.done(key):
                    continue
                init_value = init
                if init not in ("noise", "real"):
                    if seed not in providers:
                        providers[seed] = SignalProvider(
                            train_set, SignalConfig(model=b.model, pool_per_class=b.pool_per_class,
                                                    train=TrainConfig(epochs=b.signal_epochs,
                                                                      decay_at=None)),
                            seed=seed, device=self.device)
                    init_value = run_select(train_set, init, ipc, seed=seed,
                                            signals=providers[seed]).indices
                t, meta, wall = self.condense(name, "dc", ipc, b.init_iterations,
                                              init=init_value, seed=seed, tag=f"init-{init}")
                r = self.evaluate(name, t.images, t.targets(), "dc", seed)
                self.put(key, {"init": init, "seed": seed, "accuracies": list(r.accuracies),
                               "mean": r.mean, "wall_seconds": wall})
                self.log(f"init {init:<10} seed {seed}: {r.mean:.2f} %")

    def strategies(self) -> None:
        b = self.budget
        for ipc in b.ipcs:
            for method in ("dc", "dsa", "dm", "dd", "ift"):
                key = f"strategies/mnist/{ipc}/{method}"
                if self.done(key):
                    continue
                # compile outside the timing: a one-off cost per shape
                self.condense("mnist", method, ipc, 1, seed=99, tag="warmup",
                              inner_steps=b.inner_steps, memory_iterations=0)
                t, meta, wall = self.condense("mnist", method, ipc, b.strategy_iterations,
                                              tag="strategies", inner_steps=b.inner_steps,
                                              memory_iterations=b.strategy_iterations)
                self.put(key, {"ipc": ipc, "method": method, "iterations": meta.iterations,
                               "seconds_per_iteration": meta.seconds_per_iteration,
                               "memory": meta.memory})
                self.log(f"strategy {method:<4} ipc={ipc}: {meta.seconds_per_iteration:.2f} s/it,"
                         f" saved peak {meta.memory['saved_peak_bytes'] / 2**20:.1f} MiB")

    def speed(self) -> None:
        b = self.budget
        for name in b.speed_datasets:
            key = f"speed/{name}"
            if self.done(key):
                continue
            train_set, _ = self.data(name)
            times: dict[str, list[float]] = {"eager": [], "fast": []}
            images = {}
            model = "convnet" if b.name != "smoke" else b.model
            for _ in range(b.speed_rounds):
                for mode in ("eager", "fast"):
                    fast = mode == "fast"
                    cfg = condense_config("dc", iterations=b.speed_iterations, compile=fast,
                                          real_chunk=real_chunk_for(self.device), real_batch=256,
                                          memory_iterations=0)
                    if fast:  # compile once outside the timing (a one-off cost, reported)
                        t0 = time.perf_counter()
                        condense(train_set, replace(cfg, iterations=1), 1, model=model,
                                 device=self.device, seed=99)
                        times.setdefault("first_fast_call_seconds", []).append(
                            time.perf_counter() - t0)
                    t, meta = condense(train_set, cfg, 1, model=model, seed=0,
                                       device=self.device)
                    times[mode].append(meta.seconds_per_iteration)
                    images[mode] = t.images.detach()
            eager, fast = min(times["eager"]), min(times["fast"])
            diff = float((images["eager"] - images["fast"]).abs().max())
            self.put(key, {"dataset": name, "model": model, "ipc": 1, "real_batch": 256,
                           "times": times, "eager_seconds_per_iteration": eager,
                           "fast_seconds_per_iteration": fast, "speedup": eager / fast,
                           "max_abs_image_difference": diff})
            self.log(f"speed {name}: eager {eager:.2f} s/it, fast {fast:.2f} s/it "
                     f"({eager / fast:.2f}x), max |Δ image| {diff:.2e}")

    def run(self, sections) -> dict:
        wall = time.perf_counter()
        for s in sections:
            {"accuracy": self.accuracy, "init": self.init_study, "strategies": self.strategies,
             "speed": self.speed}[s]()
        self.state["wall_seconds"] = self.state.get("wall_seconds", 0.0) + \
            time.perf_counter() - wall
        self.save()
        atomic_write_text(self.out / f"condense-{self.budget.name}.md", markdown(self.state))
        return self.state


def markdown(state: dict) -> str:
    b, cells = state["budget"], state["cells"]
    lines = [f"Condensation, budget `{b['name']}` ({b['notes']}). Test accuracy %, mean ± std "
             f"over {b['students']} students; published figures (GPU, full protocol) in "
             f"brackets. Wall time {state.get('wall_seconds', 0) / 60:.1f} min on "
             f"{state['device']} ({state['threads']} threads).", "",
             "| data set | IPC | " + " | ".join(METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS),
             "| *protocol* | | " + " | ".join(f"*{default_protocol(m)}*" for m in METHODS) + " |"]
    for name in b["datasets"]:
        for ipc in b["ipcs"]:
            row = [name, str(ipc)]
            for m in METHODS:
                c = cells.get(f"accuracy/{name}/{ipc}/{m}")
                row.append("—" if c is None else f"{c['mean']:.1f} ± {c['std']:.1f}"
                           + ("†" if c.get("carried_over") else "")
                           + (f" ({c['published']})" if c.get("published") else ""))
            lines.append("| " + " | ".join(row) + " |")
    if any(c.get("carried_over") for c in cells.values()):
        lines += ["", f"† {state.get('carried_over_note', 'carried over from an earlier run')}"]
    groups: dict[str, list[float]] = {}
    for k, c in cells.items():
        if k.startswith("init/"):
            groups.setdefault(c["init"], []).extend(c["accuracies"])
    if groups:
        lines += ["", f"Initialisation study: DC on MNIST, IPC 1, {b['init_iterations']} "
                      f"iterations, seeds {list(b['init_seeds'])} x {b['students']} students "
                      f"(every student one observation).", "", comparison_markdown(groups)]
    strat = [c for k, c in cells.items() if k.startswith("strategies/")]
    if strat:
        lines += ["", f"Strategies on MNIST ({b['model']}, T = {b['inner_steps']} student steps "
                      f"for dd/ift): seconds per iteration and peak memory.", "",
                  "| method | IPC | s / iteration | autograd saved peak (MiB) | process peak RSS "
                  "(MiB) | CUDA peak (MiB) |", "|---|---|---|---|---|---|"]
        for c in strat:
            m = c["memory"]
            cuda = f"{m['cuda_peak_bytes'] / 2**20:.0f}" if m.get("cuda_peak_bytes") else "—"
            lines.append(f"| {c['method']} | {c['ipc']} | {c['seconds_per_iteration']:.2f} | "
                         f"{m['saved_peak_bytes'] / 2**20:.1f} | {m['rss_peak_bytes'] / 2**20:.0f}"
                         f" | {cuda} |")
    speed = [c for k, c in cells.items() if k.startswith("speed/")]
    if speed:
        lines += ["", "Speed: DC, IPC 1, width-128 ConvNet, 256 real images per class; best of "
                      "the alternated rounds in one process.", "",
                  "| data set | eager s/it | fast s/it | speed-up | max abs image difference |",
                  "|---|---|---|---|---|"]
        for c in speed:
            lines.append(f"| {c['dataset']} | {c['eager_seconds_per_iteration']:.2f} | "
                         f"{c['fast_seconds_per_iteration']:.2f} | {c['speedup']:.2f}x | "
                         f"{c['max_abs_image_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch._dynamo

    # one process compiles students of several widths and batch shapes (the default limit,
    # 8 graphs per function, would silently fall back to eager after that)
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--sections", default="speed,strategies,accuracy,init",
                        help="comma-separated: accuracy, init, strategies, speed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of the JSON")
    parser.add_argument("--datasets", default=None,
                        help="override the budget's data sets of the accuracy section")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - {"accuracy", "init", "strategies", "speed"}
    if bad:
        parser.error(f"unknown sections {sorted(bad)}")
    budget = BUDGETS[args.budget]
    if args.datasets:
        budget = replace(budget, datasets=tuple(args.datasets.split(",")))
    bench = Bench(budget, Path(args.out), resolve_device(args.device),
                  args.data_root, args.resume)
    state = bench.run(sections)
    print(markdown(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
