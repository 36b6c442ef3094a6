"""GTN benchmark: unrolled vs implicit vs gradient matching by peak memory, seconds per
meta-step and student accuracy for T inner steps, on MNIST and CIFAR-10; and the curriculum
ablation on MNIST. Every cell is kept as it finishes (``--resume`` continues a killed run).

    python bench/gtn.py --budget smoke    # a minute: proves the path
    python bench/gtn.py --budget short    # the README tables (2-core CPU)
    python bench/gtn.py --budget paper    # the paper's generator and batch (wants a GPU)

Published (Such et al., ICML 2020, via DESIGN.md): MNIST student trained only on generated
data 98.9 % after 32 steps of 128 images; curricula full 98.5 > shuffled batch 97.5 > all
shuffled 97.0 > none 95.7; unrolled memory grows linearly in T.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from gtn.compare import BUDGETS, comparison_table, run_comparison  # noqa: E402

PUBLISHED_CURRICULUM = {"full": 98.5, "shuffled-batch": 97.5, "all-shuffled": 97.0,
                        "none": 95.7}


@dataclass(frozen=True)
class Plan:
    datasets: tuple[str, ...]
    steps: tuple[int, ...]
    curriculum_steps: int


PLANS = {"smoke": Plan(("mnist",), (2, 4), 2),
         "short": Plan(("mnist", "cifar10"), (8, 16, 32, 64), 16),
         "paper": Plan(("mnist", "cifar10"), (8, 16, 32, 64), 32)}


def ratios(state: dict, steps) -> list[str]:
    lines = []
    cells = state["cells"]
    for t in steps:
        u = cells.get(f"unrolled/T={t}")
        if not u:
            continue
        def peak(c):
            return c["memory"].get("cuda_peak_bytes") or c["memory"]["saved_peak_bytes"]

        for m in ("implicit", "matching"):
            c = cells.get(f"{m}/T={t}")
            if c:
                lines.append(f"- T = {t}: unrolled uses {peak(u) / peak(c):.1f}x the memory of "
                             f"{m}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--sections", default="compare,curriculum")
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    budget, plan = BUDGETS[args.budget], PLANS[args.budget]
    datasets = tuple(args.datasets.split(",")) if args.datasets else plan.datasets
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    device = resolve_device(args.device)
    root = Path(args.out) / f"gtn-{budget.name}"
    summary: dict = {"budget": budget.name, "device": str(device),
                     "threads": torch.get_num_threads(), "compare": {}, "curriculum": {}}
    md = [f"# GTN benchmark, budget `{budget.name}`", ""]
    for name in datasets if "compare" in sections else ():
        train = load_dataset(name, "train", root=args.data_root).to(device)
        test = load_dataset(name, "test", root=args.data_root).to(device)
        state = run_comparison(train, test, ["unrolled", "implicit", "matching"],
                               list(plan.steps), budget, root / name, device=device,
                               resume=args.resume, log=print)
        summary["compare"][name] = state
        md += [comparison_table(state), *ratios(state, plan.steps), "",
               f"Plot: `{root / name / 'gtn-compare.png'}`", ""]
    if "curriculum" in sections:
        train = load_dataset("mnist", "train", root=args.data_root).to(device)
        test = load_dataset("mnist", "test", root=args.data_root).to(device)
        md += [f"Curriculum ablation, MNIST, unrolled, T = {plan.curriculum_steps}:", "",
               "| curriculum | few-step acc. | fixed-set acc. | published (T=32, paper) |",
               "|---|---|---|---|"]
        for cur in ("full", "shuffled-batch", "all-shuffled", "none"):
            state = run_comparison(train, test, ["unrolled"], [plan.curriculum_steps], budget,
                                   root / f"curriculum-{cur}", device=device,
                                   resume=args.resume, curriculum=cur, log=print)
            c = state["cells"][f"unrolled/T={plan.curriculum_steps}"]
            summary["curriculum"][cur] = c
            md.append(f"| {cur} | {c['few_step_mean']:.1f} ± {c['few_step_std']:.1f} | "
                      f"{c['fixed_set_mean']:.1f} ± {c['fixed_set_std']:.1f} | "
                      f"{PUBLISHED_CURRICULUM[cur]} |")
    atomic_write_json(Path(args.out) / f"gtn-{budget.name}.json", summary)
    atomic_write_text(Path(args.out) / f"gtn-{budget.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
