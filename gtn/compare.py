"""The user's main comparison: GTN trained by each method of :data:`gtn.methods.GTN_METHODS`
(unrolled backprop stored or recomputed, the implicit function theorem, the first-order
trajectory gradient with an exact tail, gradient matching), for several numbers of inner steps
T: peak memory, seconds per meta-step, and the test accuracy of students trained only on
generated data (few-step protocol and a fixed generated set of the same size). JSON per
finished cell (resumable), Markdown, PNG.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill.data import DatasetInfo, ImageSet
from distill.engine import EvalProtocol, TrainConfig, fixed_test_subset, mean_std
from distill.executor import (
    Executor,
    ExecutorConfig,
    WorkItem,
    executor_scope,
    item_device,
    move_tensors,
    shared_on,
)
from distill.progress import Progress, Task, task
from distill.store import atomic_write_json, atomic_write_text, save_figure, to_jsonable

from .generator import GeneratorConfig, GeneratorError, GeneratorTeacher
from .train import (
    GTN_METHODS,
    GTNConfig,
    few_step_accuracy,
    fixed_set_accuracy,
    recipe_config,
    train_gtn,
)

__all__ = ["Budget", "BUDGETS", "COMPARE_METHODS", "cell_config", "restore_teacher",
           "run_comparison", "comparison_table", "plot"]


@dataclass(frozen=True)
class Budget:
    name: str
    meta_iterations: int
    generator: GeneratorConfig
    student: str
    batch_size: int
    real_batch: int
    students: int
    fixed_epochs: int
    test_limit: int | None
    validation: int
    notes: str = ""


BUDGETS = {
    "smoke": Budget("smoke", 2, GeneratorConfig(noise_dim=16, width_fc=64, width_conv=16),
                    "convnet:width=8,depth=2", batch_size=32, real_batch=32, students=2,
                    fixed_epochs=5, test_limit=500, validation=1000,
                    notes="proves the path only; figures mean nothing"),
    "short": Budget("short", 20, GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32),
                    "convnet:width=16,depth=2", batch_size=64, real_batch=128, students=2,
                    fixed_epochs=50, test_limit=2000, validation=5000,
                    notes="generator noise 64, FC 256, 32 channels; width-16 depth-2 ConvNet "
                          "student; 20 meta-iterations (paper: thousands); batch 64; 2 "
                          "students; fixed set trained 50 epochs; fixed 2000-image test "
                          "subset; one CPU thread"),
    "paper": Budget("paper", 2000, GeneratorConfig(), "convnet", batch_size=128, real_batch=128,
                    students=5, fixed_epochs=300, test_limit=None, validation=10000,
                    notes="the paper's generator (noise 128, FC 1024, 128 channels), batch "
                          "128; width-128 ConvNet student"),
}


#: What ``gtn compare`` can put in a row: every GTN method (:data:`gtn.methods.GTN_METHODS`).
COMPARE_METHODS = GTN_METHODS


def _definitions(recipe: bool) -> dict[str, dict]:
    """What each method's cells were trained with (its options, :data:`GTN_METHODS`)."""
    return {name: to_jsonable(m.options(recipe)) for name, m in GTN_METHODS.items()}


def _still_valid(previous: dict, definitions: dict[str, dict], recipe: bool) -> dict:
    """The finished cells of a previous state whose method still means what it meant then.
    A state without ``definitions`` was written when ``implicit`` named today's
    ``first-order-tail`` recipe: its ``implicit`` cells (with the recipe) are rerun."""
    then = previous.get("definitions")
    cells = previous.get("cells", {})

    def valid(method: str) -> bool:
        if then is None:
            return not (recipe and method == "implicit")
        return then.get(method) == definitions.get(method)
    return {k: c for k, c in cells.items() if valid(c["method"])}


def cell_key(method: str, steps: int) -> str:
    return f"{method}/T={steps}"


def cell_config(budget: Budget, method: str, steps: int, curriculum: str = "full",
                recipe: bool = True) -> GTNConfig:
    """The GTN run behind one (method, T) cell of the comparison: the method's training
    recipe (:data:`~gtn.train.RECIPES`; ``recipe=False``: the bare defaults) at the
    budget's sizes (its real batch included)."""
    return recipe_config(method, recipe, inner_steps=steps, batch_size=budget.batch_size,
                         curriculum=curriculum, generator=budget.generator,
                         student=budget.student, meta_iterations=budget.meta_iterations,
                         real_batch=budget.real_batch, validation=budget.validation)


def cell_checkpoint(out: Path, method: str, steps: int) -> Path:
    return Path(out) / "ckpt" / f"{method}-T{steps}.pt"


def restore_teacher(train_set: ImageSet, budget: Budget, method: str, steps: int, out: Path,
                    seed: int = 0, device: torch.device | str = "cpu",
                    curriculum: str = "full", recipe: bool = True) -> GeneratorTeacher:
    """The trained generator of a finished cell, read back from its checkpoint."""
    config = cell_config(budget, method, steps, curriculum, recipe)
    teacher, _, _ = train_gtn(train_set, config, seed=seed, device=device,
                              checkpoint=cell_checkpoint(out, method, steps), resume=True)
    return teacher


def plain_step_bytes(info: DatasetInfo, budget: Budget, device: torch.device | str = "cpu"
                     ) -> int:
    """Bytes autograd saves for one plain student training step on a batch of the budget's
    size: the yardstick for "within a few times one plain training step"."""
    from distill.engine import classification_loss
    from distill.memory import SavedTensorMeter
    from distill.models import build_model
    from distill.rng import generator as make_generator

    g = make_generator(0, "plain-step")
    model = build_model(budget.student, info.channels, info.num_classes, info.im_size,
                        generator=g).to(device)
    x = torch.randn(budget.batch_size, info.channels, *info.im_size, generator=g).to(device)
    y = (torch.arange(budget.batch_size) % info.num_classes).to(device)
    with SavedTensorMeter() as meter:
        classification_loss(model(x), y).backward()
    return meter.peak


def run_comparison(train_set: ImageSet, test_set: ImageSet, methods: list[str], steps: list[int],
                   budget: Budget, out: Path, seed: int = 0, device: torch.device | str = "cpu",
                   resume: bool = False, curriculum: str = "full", recipe: bool = True,
                   progress: Progress | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   executor: Executor | ExecutorConfig | None = None) -> dict:
    """Run every (method, T) cell; returns the state written to ``out/gtn-compare.json``.

    Every cell is one work item of :mod:`distill.executor` (``executor``: in this process by
    default, a local pool or Ray tasks): the cells train in parallel, and the state is
    written atomically after each finished cell, so ``resume`` reruns only the cells
    missing from it (a cell's checkpoint resumes its meta-training).
    """
    if any(t < 1 for t in steps):
        raise GeneratorError(f"inner steps T must be >= 1, got {min(steps)}")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gtn-compare.json"
    state: dict = {"dataset": train_set.info.name, "budget": asdict(budget), "seed": seed,
                   "curriculum": curriculum, "recipe": recipe, "device": str(device),
                   "cells": {}, "definitions": _definitions(recipe),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        if all(previous.get(k, True if k == "recipe" else None) == state[k]
               for k in ("dataset", "budget", "seed", "curriculum", "recipe")):
            state["cells"] = _still_valid(previous, state["definitions"], recipe)
    state["plain_step_saved_bytes"] = plain_step_bytes(train_set.info, budget, device)
    subset = fixed_test_subset(test_set.labels.numel(), budget.test_limit)
    test_x, test_y = test_set.images, test_set.labels
    if subset is not None:
        test_x, test_y = test_x[subset.to(test_x.device)], test_y[subset.to(test_y.device)]
    order = [cell_key(m, t) for m in methods for t in steps]
    previous_cells = state["cells"]
    with executor_scope(executor) as ex:
        shared: dict = {"train": train_set, "test_x": test_x, "test_y": test_y}
        if not ex.in_process:
            shared = move_tensors(shared, "cpu")  # each worker moves them to its device
        where = item_device(ex.config, device)
        items = [WorkItem(cell_key(m, t), _run_cell,
                          (m, t, budget, curriculum, recipe, seed, where, out, resume,
                           progress if ex.in_process else None))
                 for m in methods for t in steps if cell_key(m, t) not in previous_cells]

        def finish(key: str, cell: dict, bar: Task) -> None:
            done = {**state["cells"], key: cell}  # the table's order, whatever finished first
            state["cells"] = {k: done[k] for k in [*previous_cells, *order] if k in done}
            atomic_write_json(json_path, state)
            mem = cell["memory"].get("cuda_peak_bytes") or cell["memory"]["saved_peak_bytes"]
            log(f"{cell['method']:<18} T={cell['T']:<3} {mem / 2**20:8.1f} MiB  "
                f"{cell['seconds_per_meta_step']:6.2f} s/step  few-step "
                f"{cell['few_step_mean']:5.1f} %  fixed set {cell['fixed_set_mean']:5.1f} %")
            bar.update(1)

        # in this process, each cell's meta-training reports its own progress
        with task(None if ex.in_process else progress, "cells", len(items)) as bar:
            ex.run(items, shared=shared, on_result=lambda k, c: finish(k, c, bar))
    atomic_write_text(out / "gtn-compare.md", comparison_table(state))
    plot(state, out / "gtn-compare.png")
    return state


def _run_cell(shared: dict, method: str, steps: int, budget: Budget, curriculum: str,
              recipe: bool, seed: int, device: str, out: Path, resume: bool,
              progress: Progress | None) -> dict:
    """One (method, T) cell, a work item of :mod:`distill.executor`: the GTN trained on the
    shared training set (checkpointed under ``out/ckpt``), scored on the shared test subset
    by few-step students and by students trained on a fixed generated set."""
    on = shared_on(shared, device)
    config = cell_config(budget, method, steps, curriculum, recipe)
    ckpt = cell_checkpoint(out, method, steps)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, meta, _ = train_gtn(on["train"], config, seed=seed, device=device,
                                 checkpoint=ckpt, resume=resume and ckpt.exists(),
                                 progress=progress)
    protocol = EvalProtocol(model=budget.student, n_students=budget.students,
                            train=TrainConfig(epochs=budget.fixed_epochs))
    few = few_step_accuracy(teacher, budget.student, on["test_x"], on["test_y"], seed,
                            budget.students)
    fixed = fixed_set_accuracy(teacher, protocol, on["test_x"], on["test_y"], seed)
    few_mean, few_std = mean_std(few)
    return {"method": method, "T": steps, "meta_iterations": meta.iterations,
            "seconds_per_meta_step": meta.seconds_per_iteration, "memory": meta.memory,
            "final_meta_loss": meta.losses[-1], "few_step": few, "few_step_mean": few_mean,
            "few_step_std": few_std, "fixed_set": list(fixed.accuracies),
            "fixed_set_mean": fixed.mean, "fixed_set_std": fixed.std,
            "wall_seconds": time.perf_counter() - t0}


def _peak(cell: dict) -> int:
    m = cell["memory"]
    return m.get("cuda_peak_bytes") or m["saved_peak_bytes"]


def comparison_table(state: dict) -> str:
    b = state["budget"]
    gpu = any(c["memory"].get("cuda_peak_bytes") for c in state["cells"].values())
    what = "CUDA allocator peak" if gpu else "peak bytes autograd saves for backward"
    recipe_note = "each method's training recipe" if state.get("recipe", True) else \
        "no training recipe (bare defaults)"
    lines = [f"GTN comparison on {state['dataset']}, budget `{b['name']}` ({b['notes']}); "
             f"curriculum `{state['curriculum']}`; {recipe_note}; "
             f"memory = {what} during a meta-step. "
             f"Accuracy: % on the test set, mean ± std over {b['students']} students.", "",
             *([f"One plain student training step (batch {b['batch_size']}) saves "
                f"{state['plain_step_saved_bytes'] / 2**20:.1f} MiB for backward.", ""]
               if state.get("plain_step_saved_bytes") else []),
             "| method | T | peak memory (MiB) | × unrolled | s / meta-step | few-step acc. | "
             "fixed-set acc. |", "|---|---|---|---|---|---|---|"]
    cells = state["cells"]
    for c in sorted(cells.values(), key=lambda c: (c["method"], c["T"])):
        ref = cells.get(cell_key("unrolled", c["T"]))
        ratio = f"{_peak(c) / _peak(ref):.2f}" if ref else "—"
        lines.append(f"| {c['method']} | {c['T']} | {_peak(c) / 2**20:.1f} | {ratio} | "
                     f"{c['seconds_per_meta_step']:.2f} | {c['few_step_mean']:.1f} ± "
                     f"{c['few_step_std']:.1f} | {c['fixed_set_mean']:.1f} ± "
                     f"{c['fixed_set_std']:.1f} |")
    return "\n".join(lines) + "\n"


STYLES = {"unrolled": ("o", "-"), "implicit": ("s", "--"), "matching": ("^", ":"),
          "unrolled-recompute": ("v", "-."), "first-order-tail": ("P", "--")}


def plot(state: dict, path: Path) -> bool:
    """Peak memory against T per method on log axes (implicit and matching, flat and small,
    stay apart from each other), and the two accuracies per method and T: few-step students
    (solid) and students trained on a fixed generated set (dashed). The title names the data
    set and the budget. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter
    except ImportError:
        return False
    cells = list(state["cells"].values())
    methods = sorted({c["method"] for c in cells})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        marker, style = STYLES.get(m, ("D", "-."))
        color = colors[i % len(colors)]
        cs = sorted((c for c in cells if c["method"] == m), key=lambda c: c["T"])
        ts = [c["T"] for c in cs]
        ax1.plot(ts, [_peak(c) / 2**20 for c in cs], marker=marker, linestyle=style,
                 color=color, label=m)
        ax2.errorbar(ts, [c["few_step_mean"] for c in cs], [c["few_step_std"] for c in cs],
                     marker=marker, linestyle="-", color=color, capsize=3,
                     label=f"{m}: few-step")
        ax2.errorbar(ts, [c["fixed_set_mean"] for c in cs], [c["fixed_set_std"] for c in cs],
                     marker=marker, linestyle="--", color=color, capsize=3, mfc="none",
                     label=f"{m}: fixed set")
    if state.get("plain_step_saved_bytes"):
        ax1.axhline(state["plain_step_saved_bytes"] / 2**20, color="grey", linewidth=0.8,
                    linestyle=":", label="one plain student step")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.set(xlabel="inner steps T", ylabel="peak memory (MiB, log scale)",
            title="memory of a meta-step")
    ax2.set(xlabel="inner steps T", ylabel="test accuracy (%)",
            title="students trained on generated data")
    all_t = sorted({c["T"] for c in cells})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_t, [str(t) for t in all_t])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize="small")
    budget = state.get("budget", {})
    fig.suptitle(f"GTN on {state.get('dataset', '?')}, budget {budget.get('name', '?')} "
                 f"({budget.get('meta_iterations', '?')} meta-iterations), curriculum "
                 f"{state.get('curriculum', '?')}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True
