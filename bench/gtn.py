"""GTN benchmark: unrolled vs first-order-tail vs gradient matching by peak memory, seconds per
meta-step and student accuracy for T inner steps, on MNIST and CIFAR-10; and the curriculum
ablation on MNIST. Every cell is kept as it finishes (``--resume`` continues a killed run).

    python bench/gtn.py --budget smoke    # a minute: proves the path
    python bench/gtn.py --budget short    # the README tables (2-core CPU)
    python bench/gtn.py --budget paper    # the paper's generator and batch (wants a GPU)
    python bench/gtn.py --sections long --long-cells mnist-t10/unrolled --resume
                                          # hours per cell: bench/gtn_long.py

Every method trains with its recipe (``gtn.train.RECIPES``) unless ``--no-recipe``.

Published (Such et al., ICML 2020, via DESIGN.md): MNIST student trained only on generated
data 98.9 % after 32 steps of 128 images; curricula full 98.5 > shuffled batch 97.5 > all
shuffled 97.0 > none 95.7; unrolled memory grows linearly in T.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench/gtn_long.py

from sweep import add_executor_options, executor_config  # noqa: E402

from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.engine import EvalProtocol, TrainConfig, evaluate_set, fixed_test_subset  # noqa: E402
from distill.rng import generator as make_generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from gtn.compare import BUDGETS, comparison_table, restore_teacher, run_comparison  # noqa: E402

PUBLISHED_CURRICULUM = {"full": 98.5, "shuffled-batch": 97.5, "all-shuffled": 97.0,
                        "none": 95.7}


@dataclass(frozen=True)
class Plan:
    datasets: tuple[str, ...]
    steps: tuple[int, ...]
    curriculum_steps: int
    cross_steps: int  # the MNIST generators (every method) exported for cross-architecture
    cross_per_class: int
    cross_models: tuple[str, ...]
    cross_epochs: int  # DC protocol otherwise (SGD 0.01/0.9/5e-4, batch 256, lr/10 at half)
    curve_steps: int = 32  # the learning curve: every method at this T, longer
    curve_iterations: int = 100
    curve_every: int = 20


ALL_MODELS = ("convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18")
# On a 2-core CPU, AlexNet / VGG-11 / ResNet-18 take 15-30 min per student for 300 epochs of
# 100 images; the short budget keeps the cheap architectures, `paper` runs all six.
PLANS = {"smoke": Plan(("mnist",), (2, 4), 2, 2, 2, ("convnet:width=8", "mlp", "lenet"), 5,
                       curve_steps=4, curve_iterations=4, curve_every=2),
         "short": Plan(("mnist", "cifar10"), (8, 16, 32, 64), 16, 16, 10,
                       ("convnet:width=32", "mlp", "lenet"), 300),
         "paper": Plan(("mnist", "cifar10"), (8, 16, 32, 64), 32, 32, 10, ALL_MODELS, 300)}


def shown(path: Path) -> str:
    """A path as the tables show it: relative to the repository when inside it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(repo))
    except ValueError:
        return str(path)


def ratios(state: dict, steps) -> list[str]:
    lines = []
    cells = state["cells"]
    for t in steps:
        u = cells.get(f"unrolled/T={t}")
        if not u:
            continue
        def peak(c):
            return c["memory"].get("cuda_peak_bytes") or c["memory"]["saved_peak_bytes"]

        for m in ("first-order-tail", "matching"):
            c = cells.get(f"{m}/T={t}")
            if c:
                lines.append(f"- T = {t}: unrolled uses {peak(u) / peak(c):.1f}x the memory of "
                             f"{m}")
    return lines


@functools.cache
def splits(name: str, root, device):
    """(train, test) of a data set on ``device``, read once however many sections use it."""
    return (load_dataset(name, "train", root=root).to(device),
            load_dataset(name, "test", root=root).to(device))


def mnist_with_test_subset(budget, args, device):
    """MNIST's training set and the budget's fixed test subset (images, labels)."""
    train, test = splits("mnist", args.data_root, device)
    subset = fixed_test_subset(test.labels.numel(), budget.test_limit)
    if subset is None:
        return train, test.images, test.labels
    return train, test.images[subset.to(device)], test.labels[subset.to(device)]


def cross_architecture(budget, plan: Plan, root: Path, summary: dict, args, device) -> list[str]:
    """Export ``cross_per_class`` images per class from each method's MNIST generator (T =
    ``cross_steps``, trained by the comparison) and train every zoo model on them; a random
    real subset of the same size is the reference row. Cells are kept in crossarch.json."""
    train, test_x, test_y = mnist_with_test_subset(budget, args, device)
    path = root / "mnist" / "crossarch.json"
    cells = json.loads(path.read_text()) if args.resume and path.exists() else {}
    t, k = plan.cross_steps, plan.cross_per_class
    sources = {}
    for method in ("unrolled", "first-order-tail", "matching"):
        teacher = restore_teacher(train, budget, method, t, root / "mnist", device=device,
                                  recipe=args.recipe)
        sources[f"gtn {method}"] = teacher.sample(k, make_generator(0, "crossarch"))
    g = make_generator(0, "crossarch-real")
    picks = torch.cat([idx[torch.randperm(idx.numel(), generator=g)[:k]]
                       for idx in map(train.class_indices, range(train.info.num_classes))])
    sources["random real"] = (train.images[picks], train.labels[picks])
    for name, (x, y) in sources.items():
        for model in plan.cross_models:
            key = f"{name}/{model}"
            if key in cells:
                continue
            protocol = EvalProtocol(model=model, n_students=budget.students,
                                    train=TrainConfig(epochs=plan.cross_epochs))
            r = evaluate_set(x.detach(), y, test_x, test_y, protocol, seed=0,
                             num_classes=train.info.num_classes)
            cells[key] = {"mean": r.mean, "std": r.std, "accuracies": list(r.accuracies)}
            atomic_write_json(path, cells)
            print(f"crossarch {key:<28} {r.mean:5.1f} ± {r.std:.1f}")
    summary["crossarch"] = cells
    md = [f"Cross-architecture, MNIST: {k} images per class from each method's generator "
          f"(T = {t}) and {k} random real images per class; each model trained "
          f"{plan.cross_epochs} epochs on them (SGD 0.01/0.9/5e-4, batch 256, lr/10 at half), "
          f"{budget.students} students; test accuracy %:", "",
          "| source | " + " | ".join(plan.cross_models) + " |",
          "|---|" + "---|" * len(plan.cross_models)]
    for name in sources:
        row = [f"{cells[f'{name}/{m}']['mean']:.1f} ± {cells[f'{name}/{m}']['std']:.1f}"
               for m in plan.cross_models]
        md.append(f"| {name} | " + " | ".join(row) + " |")
    return md + [""]


def learning_curve(budget, plan: Plan, root: Path, summary: dict, args, device,
                   methods=("unrolled", "first-order-tail", "matching")) -> list[str]:
    """Every method at T = ``curve_steps`` for ``curve_iterations`` meta-iterations (MNIST):
    few-step accuracy on the held-out *validation* split every ``curve_every`` iterations,
    and the test accuracy at the end. Each method is kept in curve.json as it finishes; its
    run checkpoints, so ``--resume`` continues a killed one."""
    from dataclasses import replace

    from gtn.compare import cell_config
    from gtn.train import few_step_accuracy, split_validation, train_gtn

    train, test_x, test_y = mnist_with_test_subset(budget, args, device)
    val = split_validation(train, budget.validation)[1]
    val_x, val_y = val.images[:2000], val.labels[:2000]
    t = plan.curve_steps
    path = root / "curve" / "curve.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(path.read_text()) if args.resume and path.exists() else {}
    only = getattr(args, "curve_methods", None)
    for method in methods:
        if method in cells or (only and method not in only):
            continue
        config = replace(cell_config(budget, method, t, recipe=args.recipe),
                         meta_iterations=plan.curve_iterations, eval_every=plan.curve_every)
        ckpt = root / "curve" / "ckpt" / f"{method}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)

        def validate(teacher, iteration, method=method):
            accs = few_step_accuracy(teacher, budget.student, val_x, val_y, 0, budget.students)
            print(f"curve {method:<9} it {iteration:4d}  validation {sum(accs) / len(accs):5.1f} %")
            return {"validation": accs}

        teacher, meta, _ = train_gtn(train, config, seed=0, device=device, checkpoint=ckpt,
                                     resume=args.resume and ckpt.exists(), evaluate=validate)
        few = few_step_accuracy(teacher, budget.student, test_x, test_y, 0, budget.students)
        cell = {"T": t, "iterations": meta.iterations, "evals": meta.evals,
                "seconds_per_meta_step": meta.seconds_per_iteration, "memory": meta.memory,
                "test_few_step": few}
        # merge with what parallel shards (--curve-methods) wrote meanwhile
        cells = {**(json.loads(path.read_text()) if path.exists() else {}), **cells,
                 method: cell}
        atomic_write_json(path, cells)
    summary["curve"] = cells
    if not all(m in cells for m in methods):
        return [f"Learning curve: incomplete ({', '.join(sorted(cells))} done).", ""]
    its = [e["iteration"] for e in cells[methods[0]]["evals"]]
    md = [f"Learning curve, MNIST, T = {t}: few-step accuracy (%) on 2000 held-out training "
          f"images after N meta-iterations (mean of {budget.students} students), and on the "
          f"test subset at the end:", "",
          "| method | " + " | ".join(f"N = {i}" for i in its) + " | test (end) | s / meta-step |",
          "|---|" + "---|" * (len(its) + 2)]
    for m in methods:
        c = cells[m]
        vals = [sum(e["validation"]) / len(e["validation"]) for e in c["evals"]]
        test_mean = sum(c["test_few_step"]) / len(c["test_few_step"])
        md.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) +
                  f" | {test_mean:.1f} | {c['seconds_per_meta_step']:.2f} |")
    return md + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--sections", default="compare,curriculum,crossarch,curve",
                        help="Comma-separated: compare, curriculum, crossarch, curve, long "
                             "(long: hours; not in the default).")
    parser.add_argument("--curve-methods", default=None,
                        help="Run only these methods of the learning curve (parallel shards).")
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-recipe", dest="recipe", action="store_false",
                        help="Bare defaults instead of each method's training recipe (the "
                             "README's short-budget GTN tables were measured this way).")
    parser.add_argument("--long-cells", default="all",
                        help="The long section's cells (see bench/gtn_long.py).")
    add_executor_options(parser)
    args = parser.parse_args(argv)
    executor = executor_config(args)
    args.curve_methods = args.curve_methods.split(",") if args.curve_methods else None
    budget, plan = BUDGETS[args.budget], PLANS[args.budget]
    datasets = tuple(args.datasets.split(",")) if args.datasets else plan.datasets
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    device = resolve_device(args.device)
    root = Path(args.out) / f"gtn-{budget.name}"
    summary: dict = {"budget": budget.name, "device": str(device),
                     "threads": torch.get_num_threads(), "compare": {}, "curriculum": {}}
    md = [f"# GTN benchmark, budget `{budget.name}`", ""]
    for name in datasets if "compare" in sections else ():
        train, test = splits(name, args.data_root, device)
        state = run_comparison(train, test, ["unrolled", "first-order-tail", "matching"],
                               list(plan.steps), budget, root / name, device=device,
                               resume=args.resume, recipe=args.recipe, log=print,
                               executor=executor)
        summary["compare"][name] = state
        md += [comparison_table(state), *ratios(state, plan.steps), "",
               f"Plot: `{shown(root / name / 'gtn-compare.png')}`", ""]
    if "curriculum" in sections:
        train, test = splits("mnist", args.data_root, device)
        md += [f"Curriculum ablation, MNIST, unrolled, T = {plan.curriculum_steps}:", "",
               "| curriculum | few-step acc. | fixed-set acc. | published (T=32, paper) |",
               "|---|---|---|---|"]
        for cur in ("full", "shuffled-batch", "all-shuffled", "none"):
            state = run_comparison(train, test, ["unrolled"], [plan.curriculum_steps], budget,
                                   root / f"curriculum-{cur}", device=device,
                                   resume=args.resume, curriculum=cur, recipe=args.recipe,
                                   log=print, executor=executor)
            c = state["cells"][f"unrolled/T={plan.curriculum_steps}"]
            summary["curriculum"][cur] = c
            md.append(f"| {cur} | {c['few_step_mean']:.1f} ± {c['few_step_std']:.1f} | "
                      f"{c['fixed_set_mean']:.1f} ± {c['fixed_set_std']:.1f} | "
                      f"{PUBLISHED_CURRICULUM[cur]} |")
        md.append("")
    if "crossarch" in sections:
        md += cross_architecture(budget, plan, root, summary, args, device)
    if "curve" in sections:
        md += learning_curve(budget, plan, root, summary, args, device)
    if "long" in sections:  # its own budget: bench/gtn_long.py (cells, resume, report)
        import gtn_long

        md += [gtn_long.run(gtn_long.cells_of(args.long_cells),
                            Path(args.out) / "gtn-long", executor, args.data_root,
                            args.device, 0, args.resume, None)]
    atomic_write_json(Path(args.out) / f"gtn-{budget.name}.json", summary)
    atomic_write_text(Path(args.out) / f"gtn-{budget.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
