"""Coreset benchmark: every selection rule at IPC 1 / 10 / 50 on MNIST and CIFAR-10.

Each (data set, IPC, rule) cell selects a coreset, trains fresh students on it and reports
their test accuracy (mean ± std over students and selection seeds), beside the figures
published in the DC paper (Zhao, Mopuri & Bilen, ICLR 2021, Table 1) and a whole-data
reference trained with the same student. Results are written as JSON and a Markdown table;
finished cells are kept in the JSON as they complete, so ``--resume`` continues a killed run.

    python bench/coreset.py --budget smoke      # seconds: proves the path
    python bench/coreset.py --budget short      # < 1 h on a 2-core CPU: the README table
    python bench/coreset.py --budget paper      # the published protocol (wants a GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.engine import TrainConfig, evaluate_set, mean_std  # noqa: E402
from distill.protocols import make_protocol  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from selection import SignalConfig, SignalProvider, available_methods, select  # noqa: E402

# DC paper, Table 1 (ConvNet, 300 epochs, mean over 20 runs), as listed in DESIGN.md.
PUBLISHED = {
    ("mnist", 1): {"random": 64.9, "herding": 89.2, "kcenter": 89.3, "forgetting": 35.5},
    ("mnist", 10): {"random": 95.1, "herding": 93.7, "kcenter": 84.4, "forgetting": 68.1},
    ("mnist", 50): {"random": 97.9, "herding": 94.9, "kcenter": 97.4, "forgetting": 88.2},
    ("cifar10", 1): {"random": 14.4, "herding": 21.5, "kcenter": 21.5, "forgetting": 13.5},
    ("cifar10", 10): {"random": 26.0, "herding": 31.6, "kcenter": 14.7, "forgetting": 23.3},
    ("cifar10", 50): {"random": 43.4, "herding": 40.4, "kcenter": 27.0, "forgetting": 23.3},
}
PUBLISHED_WHOLE = {"mnist": 99.6, "cifar10": 84.8}


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes. ``model`` is both the student and the signal network."""

    name: str
    datasets: tuple[str, ...]
    ipcs: tuple[int, ...]
    model: str
    epochs: int | None           # student epochs (None: the dc protocol's)
    students: int                # fresh students per selected set
    seeds: tuple[int, ...]       # selection seeds
    test_limit: int | None       # fixed test subset size (None: all 10 000)
    pool_per_class: int | None   # candidates per class (None: the whole training set)
    signal_epochs: int           # training epochs of the signal network on the pool
    whole_epochs: int            # whole-data reference: epochs on the full training set
    whole_limit: int | None = None  # whole-data reference on a random subset (smoke only)
    notes: str = ""


BUDGETS = {
    "smoke": Budget("smoke", ("mnist",), (1,), "convnet:width=16,depth=3", epochs=10,
                    students=1, seeds=(0,), test_limit=300, pool_per_class=30,
                    signal_epochs=1, whole_epochs=1, whole_limit=2000,
                    notes="proves the path only; figures mean nothing"),
    "short": Budget("short", ("mnist", "cifar10"), (1, 10, 50), "convnet:width=32,depth=3",
                    epochs=None, students=2, seeds=(0,), test_limit=2000,
                    pool_per_class=1000, signal_epochs=5, whole_epochs=3,
                    notes="dc protocol (SGD 0.01/0.9/5e-4, batch 256, lr/10 at half; MNIST: "
                          "DC's crop/scale/rotate augmentation, 1000 epochs; CIFAR-10: none, "
                          "300 epochs) with a width-32 ConvNet; candidates: 1000 random images per "
                          "class; signal ConvNet trained 5 epochs on them; 2 students; a fixed "
                          "2000-image test subset; whole-data reference: 3 epochs"),
    "paper": Budget("paper", ("mnist", "cifar10"), (1, 10, 50), "convnet", epochs=None,
                    students=5, seeds=(0, 1, 2, 3), test_limit=None, pool_per_class=None,
                    signal_epochs=20, whole_epochs=300,
                    notes="dc protocol with the width-128 ConvNet; 4 selection seeds x 5 "
                          "students; whole training set as candidates"),
}


def cell_key(dataset: str, ipc: int | str, method: str) -> str:
    return f"{dataset}/{ipc}/{method}"


def run(budget: Budget, methods: list[str], out: Path, device: torch.device,
        data_root: str | None, resume: bool, log=print) -> dict:
    json_path = out / f"coreset-{budget.name}.json"
    state: dict = {"budget": asdict(budget), "cells": {}, "device": str(device),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
    if resume and json_path.exists():
        import json

        previous = json.loads(json_path.read_text())
        # compared as JSON: the file holds lists where the budget has tuples
        if previous.get("budget") == json.loads(json.dumps(state["budget"])):
            state["cells"] = previous.get("cells", {})
            log(f"resuming: {len(state['cells'])} cells already done")
    wall = time.perf_counter()
    for dataset in budget.datasets:
        protocol = make_protocol("dc", dataset, model=budget.model, n_students=budget.students,
                                 test_limit=budget.test_limit,
                                 **({"epochs": budget.epochs} if budget.epochs else {}))
        train_set = load_dataset(dataset, "train", root=data_root).to(device)
        test_set = load_dataset(dataset, "test", root=data_root).to(device)
        key = cell_key(dataset, "whole", "whole")
        if key not in state["cells"]:
            whole = train_set
            if budget.whole_limit is not None:
                whole = train_set.balanced_subset(budget.whole_limit // train_set.info.num_classes,
                                                  torch.Generator().manual_seed(0))
            whole_protocol = replace(protocol, n_students=1, name="none",
                                     train=TrainConfig(epochs=budget.whole_epochs))
            r = evaluate_set(whole.images, whole.labels, test_set.images, test_set.labels,
                             whole_protocol, seed=0, num_classes=train_set.info.num_classes)
            state["cells"][key] = {**r.as_dict(), "dataset": dataset, "ipc": "whole",
                                   "method": "whole"}
            atomic_write_json(json_path, state)
            log(f"{dataset} whole data: {r.mean:.2f} % [{r.seconds:.0f} s]")
        signal_config = SignalConfig(model=budget.model, pool_per_class=budget.pool_per_class,
                                     train=TrainConfig(epochs=budget.signal_epochs,
                                                       decay_at=None))
        providers: dict[int, SignalProvider] = {}
        for ipc in budget.ipcs:
            for method in methods:
                key = cell_key(dataset, ipc, method)
                if key in state["cells"]:
                    continue
                accs, select_seconds, eval_seconds = [], 0.0, 0.0
                for seed in budget.seeds:
                    if seed not in providers:
                        providers[seed] = SignalProvider(train_set, signal_config, seed=seed,
                                                         device=device)
                    t0 = time.perf_counter()
                    sel = select(train_set, method, ipc, seed=seed, signals=providers[seed])
                    select_seconds += time.perf_counter() - t0
                    idx = sel.indices.to(device)
                    r = evaluate_set(train_set.images[idx], train_set.labels[idx],
                                     test_set.images, test_set.labels, protocol, seed=seed,
                                     num_classes=train_set.info.num_classes)
                    accs.extend(r.accuracies)
                    eval_seconds += r.seconds
                mean, std = mean_std(accs)
                state["cells"][key] = {
                    "dataset": dataset, "ipc": ipc, "method": method, "accuracies": accs,
                    "mean": mean, "std": std, "select_seconds": select_seconds,
                    "eval_seconds": eval_seconds, "protocol": protocol.name,
                    "published": PUBLISHED.get((dataset, ipc), {}).get(method)}
                atomic_write_json(json_path, state)
                log(f"{dataset} ipc={ipc:<3} {method:<11} {mean:6.2f} ± {std:5.2f} %  "
                    f"[select {select_seconds:.0f} s, eval {eval_seconds:.0f} s]")
        state.setdefault("signal_seconds", {})[dataset] = sum(
            p.seconds.get("train_signals", 0.0) for p in providers.values())
    state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - wall
    atomic_write_json(json_path, state)
    atomic_write_text(out / f"coreset-{budget.name}.md", markdown(state, budget, methods))
    return state


def markdown(state: dict, budget: Budget, methods: list[str]) -> str:
    cells = state["cells"]
    head = ["data set", "IPC", *methods, "whole set"]
    lines = [f"Coreset selection, budget `{budget.name}` ({budget.notes}). Test accuracy %, "
             f"mean ± std over {budget.students * len(budget.seeds)} students; "
             f"published DC-paper figures in brackets where they exist. "
             f"Wall time {state.get('wall_seconds', 0) / 60:.1f} min on {state['device']} "
             f"({state['threads']} threads).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in budget.datasets:
        whole = cells.get(cell_key(dataset, "whole", "whole"))
        for ipc in budget.ipcs:
            row = [dataset, str(ipc)]
            for method in methods:
                c = cells.get(cell_key(dataset, ipc, method))
                if c is None:
                    row.append("—")
                    continue
                pub = c.get("published")
                row.append(f"{c['mean']:.1f} ± {c['std']:.1f}"
                           + ("†" if c.get("carried_over") else "")
                           + (f" ({pub})" if pub is not None else ""))
            row.append(f"{whole['mean']:.1f}{'†' if whole.get('carried_over') else ''} "
                       f"({PUBLISHED_WHOLE[dataset]})"
                       if whole and ipc == budget.ipcs[0] else "")
            lines.append("| " + " | ".join(row) + " |")
    if any(c.get("carried_over") for c in cells.values()):
        lines += ["", f"† {state.get('carried_over_note', 'carried over from an earlier run')}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help="comma-separated rules (default: all registered)")
    parser.add_argument("--datasets", default=None, help="override the budget's data sets")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of the JSON")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.datasets:
        budget = replace(budget, datasets=tuple(args.datasets.split(",")))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(available_methods())}")
    out = Path(args.out)
    state = run(budget, methods, out, resolve_device(args.device), args.data_root, args.resume)
    print(markdown(state, budget, methods))
    print(f"wrote {out / f'coreset-{budget.name}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
