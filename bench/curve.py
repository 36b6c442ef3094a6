"""Data-budget curve benchmark: accuracy and training time against the fraction of data kept,
per selection rule, on MNIST and CIFAR-10 (the selection article's "10 % of the data, about
2 points lost, about 8x faster").

Per data set: one signal network trained once (cached on disk, reused by every rule, fraction
and seed), then for every rule and fraction a fresh student trained with the same full-data
schedule (same epochs for every fraction, so fewer steps on less data) and scored on the test
set, over several seeds; the whole training set is the reference. Writes, per data set,
``curve-<budget>-<dataset>.json`` (finished cells, appended as they complete: a killed run
continues where it stopped when started again with the same budget), ``.md`` and ``.png``.

    python bench/curve.py --budget smoke     # a minute: proves the path
    python bench/curve.py --budget short     # ~1 h on one CPU core: the README tables
    python bench/curve.py --budget paper     # the DC ConvNet, longer schedules (wants a GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.engine import TrainConfig  # noqa: E402
from distill.store import atomic_write_text, save_figure  # noqa: E402
from selection import SignalConfig, SignalProvider  # noqa: E402
from selection.cache import default_cache_root  # noqa: E402
from selection.curve import CurveConfig, curve_figure, curve_markdown, run_curve  # noqa: E402


@dataclass(frozen=True)
class Budget:
    name: str
    datasets: tuple[str, ...]
    curve: CurveConfig
    signal: SignalConfig
    notes: str
    epochs: dict | None = None   # per data set override of the student epochs


RULES = ("random", "herding", "kcenter", "kmeans", "dbscan", "forgetting:hardest",
         "gradnorm:hardest", "gradnorm:easiest", "entropy:hardest")

BUDGETS = {
    "smoke": Budget("smoke", ("mnist",),
                    CurveConfig(fractions=(0.01, 0.1, 1.0), rules=("random", "herding"),
                                seeds=(0,), model="mlp", train=TrainConfig(epochs=1),
                                test_limit=1000),
                    SignalConfig(model="mlp", train=TrainConfig(epochs=1, decay_at=None)),
                    "proves the path only: an MLP, 1 epoch; figures mean nothing"),
    "short": Budget("short", ("mnist", "cifar10"),
                    CurveConfig(fractions=(0.01, 0.05, 0.1, 0.3, 1.0), rules=RULES,
                                seeds=(0, 1), model="lenet", train=TrainConfig(epochs=10)),
                    SignalConfig(),
                    "student: LeNet-5 (LeCun et al. 1998), 10 epochs for every fraction, "
                    "SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 after 5 "
                    "epochs, no augmentation; 2 seeds; whole test set; signals: width-16 "
                    "ConvNet, 3 epochs on the whole training set (the library default)"),
    "paper": Budget("paper", ("mnist", "cifar10"),
                    CurveConfig(fractions=(0.01, 0.05, 0.1, 0.3, 0.5, 1.0), rules=RULES,
                                seeds=(0, 1, 2), model="convnet", train=TrainConfig(epochs=50)),
                    SignalConfig(model="convnet", train=TrainConfig(epochs=20, decay_at=None)),
                    "student: the DC ConvNet (width 128), 50 epochs for every fraction; 3 "
                    "seeds; signals: the same ConvNet, 20 epochs"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--datasets", default=None, help="override the budget's data sets")
    parser.add_argument("--rules", default=None, help="override the budget's rules (comma list)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--cache-dir", default=str(default_cache_root() / "signals"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    datasets = tuple(args.datasets.split(",")) if args.datasets else budget.datasets
    curve = budget.curve
    if args.rules:
        curve = replace(curve, rules=tuple(args.rules.split(",")))
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        wall = time.perf_counter()
        train_set = load_dataset(dataset, "train", root=args.data_root)
        test_set = load_dataset(dataset, "test", root=args.data_root)
        provider = SignalProvider(train_set, budget.signal, seed=0, device=device,
                                  cache_root=args.cache_dir)
        stem = out / f"curve-{budget.name}-{dataset}"
        title = f"{dataset}, budget {budget.name}"
        notes = (f"Budget `{budget.name}`: {budget.notes}. Device {device}, "
                 f"{torch.get_num_threads()} torch thread(s).")

        def render(state: dict, stem: Path = stem, title: str = title, notes: str = notes) -> None:
            atomic_write_text(stem.with_suffix(".md"), curve_markdown(state, title, notes))
            save_figure(curve_figure(state, title), stem.with_suffix(".png"))

        def report(record: dict, state: dict, dataset: str = dataset) -> None:
            render(state)
            print(f"{dataset} {record['rule']:<20} {100 * record['fraction']:5g} % "
                  f"seed {record['seed']}: {100 * record['accuracy']:.2f} %  "
                  f"train {record['train_seconds']:.1f} s  select "
                  f"{record['select_seconds']:.1f} s", flush=True)

        state = run_curve(train_set, test_set, curve, provider,
                          state_path=stem.with_suffix(".json"), device=device, on_cell=report)
        render(state)
        print(f"{dataset}: done in {time.perf_counter() - wall:.0f} s -> {stem}.md/.json/.png",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
