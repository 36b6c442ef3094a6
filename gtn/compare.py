"""The user's main comparison: GTN trained by unrolled backprop, implicit differentiation or
gradient matching, for several numbers of inner steps T: peak memory, seconds per meta-step,
and the test accuracy of students trained only on generated data (few-step protocol and a
fixed generated set of the same size). JSON per finished cell (resumable), Markdown, PNG, and
a reading of the figures in words (:func:`reading`).

A budget either trains every (method, T) cell for its meta-iterations, or (``accuracy_steps``,
the ``demo`` budget) trains for accuracy at that one T only and runs the other T for a couple
of meta-iterations to measure memory and time (memory-only cells, no accuracy).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
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
from distill.store import atomic_write_json, atomic_write_text, save_figure

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
           "run_comparison", "comparison_table", "reading", "plot"]


@dataclass(frozen=True)
class Budget:
    """The sizes of a comparison.

    ``accuracy_steps``: the one T at which cells train ``meta_iterations`` and are scored
    for accuracy; every other T of the comparison is a memory-only cell of
    ``memory_cell_iterations`` meta-iterations (peak memory, seconds per meta-step, no
    students). ``None``: every cell trains ``meta_iterations`` and is scored.
    """

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
    accuracy_steps: int | None = None
    memory_cell_iterations: int = 2


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
    # About 10 min on 2 idle cores (MNIST): accuracy at T = 10, where the long benchmark's
    # methods separate (bench/results/gtn-long: unrolled 88.4, implicit 88.9, matching 84.6 %
    # after 200 of 1000), the cosine schedule ending at the last meta-iteration (unrolled:
    # 87.4 % after 250, 88.4 after 300; docs/results/gtn.md#the-demo-make-demo); memory and
    # time at every T asked for from 2 meta-iterations each.
    "demo": Budget("demo", 300, GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32),
                   "convnet:width=16,depth=2,first_pad=1", batch_size=32, real_batch=512,
                   students=3, fixed_epochs=50, test_limit=None, validation=10000,
                   notes="generator noise 64, FC 256, 32 channels; width-16 depth-2 ConvNet "
                         "student; batch 32; real batch 512; cosine meta-lr ending at the "
                         "last meta-iteration; 3 students; full test set",
                   accuracy_steps=10, memory_cell_iterations=2),
    "paper": Budget("paper", 2000, GeneratorConfig(), "convnet", batch_size=128, real_batch=128,
                    students=5, fixed_epochs=300, test_limit=None, validation=10000,
                    notes="the paper's generator (noise 128, FC 1024, 128 channels), batch "
                          "128; width-128 ConvNet student"),
}


#: What ``gtn compare`` can put in a row: the three meta-gradients, and unrolled backprop
#: recomputed (the same gradient as ``unrolled``, memory of one step).
COMPARE_METHODS = {**GTN_METHODS,
                   "unrolled-recompute": "unrolled backprop with every step rebuilt in the "
                                         "backward pass (the same gradient; flat memory)"}


def cell_key(method: str, steps: int) -> str:
    return f"{method}/T={steps}"


def cell_config(budget: Budget, method: str, steps: int, curriculum: str = "full",
                recipe: bool = True) -> GTNConfig:
    """The GTN run behind one (method, T) cell of the comparison: the method's training
    recipe (:data:`~gtn.train.RECIPES`; ``recipe=False``: the bare defaults) at the
    budget's sizes (its real batch included)."""
    extra = {"recompute": True} if method == "unrolled-recompute" else {}
    return recipe_config(method.removesuffix("-recompute"), recipe, **extra,
                         inner_steps=steps, batch_size=budget.batch_size,
                         curriculum=curriculum, generator=budget.generator,
                         student=budget.student, meta_iterations=budget.meta_iterations,
                         real_batch=budget.real_batch, validation=budget.validation,
                         neumann_alpha=0.02)


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


#: Rough CPU cost of one inner step of each method, relative to unrolled's recipe (MNIST,
#: T = 10, one thread: unrolled 1.07, implicit 0.45, matching 1.73 s per meta-step): the
#: cells are started longest first and the progress over cells is weighted by it.
STEP_COST = {"unrolled": 1.0, "unrolled-recompute": 1.3, "implicit": 0.45, "matching": 1.6}


def scored_steps(budget: Budget, steps: list[int]) -> list[int]:
    """Every T of a comparison of ``steps`` under ``budget``: the T asked for, and the
    budget's ``accuracy_steps`` where it has one."""
    return sorted({*steps, *([budget.accuracy_steps] if budget.accuracy_steps else [])})


def is_scored(budget: Budget, steps: int) -> bool:
    """Whether the cells at ``steps`` train for accuracy (else: memory-only cells)."""
    return budget.accuracy_steps is None or steps == budget.accuracy_steps


def _cell_cost(budget: Budget, method: str, steps: int) -> float:
    """The estimated cost of a cell, in seconds of one unrolled inner step (about 0.1 s)."""
    scored = is_scored(budget, steps)
    iterations = budget.meta_iterations if scored else budget.memory_cell_iterations
    return iterations * steps * STEP_COST.get(method, 1.0) + \
        _eval_cost(budget, cell_key(method, steps))


def _eval_cost(budget: Budget, key: str) -> float:
    """The estimated cost of scoring a cell's students (0 for a memory-only cell)."""
    steps = int(key.rsplit("=", 1)[1])
    return 50.0 * budget.students if is_scored(budget, steps) else 0.0


def _same_budget(previous: dict, budget: Budget) -> bool:
    defaults = {f.name: f.default for f in fields(Budget)}  # states written before a field
    return {**defaults, **previous} == asdict(budget)


class _FileTask:
    """The meta-iterations a cell has done, in a small file the driver reads (a worker process
    cannot draw on the driver's terminal): ``done total``, written at most every second."""

    def __init__(self, path: Path, total: int) -> None:
        self.path, self.total, self.done, self.written = path, total, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.written >= 1.0 or self.done >= self.total:
            self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.done} {self.total}")
        os.replace(tmp, self.path)
        self.written = time.monotonic()


@dataclass(frozen=True)
class _FileProgress:
    """:class:`~distill.progress.Progress` of one cell's meta-training in a local worker
    process (picklable: a path)."""

    path: Path

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[_FileTask]:
        t = _FileTask(self.path, total)
        t.write()
        yield t


def _read_fraction(path: Path) -> float:
    try:
        done, total = path.read_text().split()
        return min(int(done) / max(int(total), 1), 1.0)
    except (OSError, ValueError):
        return 0.0


def run_comparison(train_set: ImageSet, test_set: ImageSet, methods: list[str], steps: list[int],
                   budget: Budget, out: Path, seed: int = 0, device: torch.device | str = "cpu",
                   resume: bool = False, curriculum: str = "full", recipe: bool = True,
                   progress: Progress | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   executor: Executor | ExecutorConfig | None = None) -> dict:
    """Run every (method, T) cell; returns the state written to ``out/gtn-compare.json``.

    The T are ``steps`` and the budget's ``accuracy_steps`` (:func:`scored_steps`); a budget
    with ``accuracy_steps`` scores only that T and runs the others as memory-only cells.
    Every cell is one work item of :mod:`distill.executor` (``executor``: in this process by
    default, a local pool or Ray tasks): the cells train in parallel, the costliest first,
    and the state is written atomically after each finished cell, so ``resume`` reruns only
    the cells missing from it (a cell's checkpoint resumes its meta-training).
    """
    if any(t < 1 for t in steps):
        raise GeneratorError(f"inner steps T must be >= 1, got {min(steps)}")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gtn-compare.json"
    state: dict = {"dataset": train_set.info.name, "budget": asdict(budget), "seed": seed,
                   "curriculum": curriculum, "recipe": recipe, "device": str(device),
                   "cells": {},
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        if all(previous.get(k, True if k == "recipe" else None) == state[k]
               for k in ("dataset", "seed", "curriculum", "recipe")) and \
                _same_budget(previous.get("budget") or {}, budget):
            state["cells"] = previous.get("cells", {})
    state["plain_step_saved_bytes"] = plain_step_bytes(train_set.info, budget, device)
    subset = fixed_test_subset(test_set.labels.numel(), budget.test_limit)
    test_x, test_y = test_set.images, test_set.labels
    if subset is not None:
        test_x, test_y = test_x[subset.to(test_x.device)], test_y[subset.to(test_y.device)]
    all_steps = scored_steps(budget, steps)
    order = [cell_key(m, t) for m in methods for t in all_steps]
    previous_cells = state["cells"]
    todo = sorted(((m, t) for m in methods for t in all_steps
                   if cell_key(m, t) not in previous_cells),
                  key=lambda mt: -_cell_cost(budget, *mt))  # longest first: the pool's order
    cost = {cell_key(m, t): _cell_cost(budget, m, t) for m, t in todo}
    with executor_scope(executor) as ex:
        shared: dict = {"train": train_set, "test_x": test_x, "test_y": test_y}
        if not ex.in_process:
            shared = move_tensors(shared, "cpu")  # each worker moves them to its device
        where = item_device(ex.config, device)
        # a local pool's workers report their meta-iterations through files: the progress
        # moves (and has an ETA) before the first cell finishes
        polled = not ex.in_process and ex.config.kind == "local" and progress is not None
        files = {cell_key(m, t): out / "progress" / f"{m}-T{t}.txt" for m, t in todo}
        if polled:
            (out / "progress").mkdir(exist_ok=True)
            for f in files.values():
                f.unlink(missing_ok=True)
        items = [WorkItem(cell_key(m, t), _run_cell,
                          (m, t, budget, curriculum, recipe, seed, where, out, resume,
                           progress if ex.in_process else
                           _FileProgress(files[cell_key(m, t)]) if polled else None))
                 for m, t in todo]
        if budget.accuracy_steps is not None and items:
            scored = sum(is_scored(budget, t) for _, t in todo)
            log(f"{len(items)} cells on {1 if ex.in_process else ex.config.workers or 1} "
                f"worker(s): {scored} trained for accuracy at T = {budget.accuracy_steps} "
                f"({budget.meta_iterations} meta-iterations each), {len(items) - scored} "
                f"memory-only ({budget.memory_cell_iterations} meta-iterations each)")
        finished: set[str] = set()
        shown, lock = [0], threading.Lock()

        def advance(bar: Task) -> None:
            """The bar to the percent of the estimated work done: finished cells, and the
            meta-training (all of a cell's cost but its students) of running ones."""
            work = sum(cost[k] if k in finished else
                       _read_fraction(f) * (cost[k] - _eval_cost(budget, k))
                       for k, f in files.items()) if polled else \
                sum(cost[k] for k in finished)
            with lock:
                now = max(shown[0], round(100 * work / max(sum(cost.values()), 1e-9)))
                if now > shown[0]:
                    bar.update(now - shown[0])
                    shown[0] = now

        def finish(key: str, cell: dict, bar: Task) -> None:
            done = {**state["cells"], key: cell}  # the table's order, whatever finished first
            state["cells"] = {k: done[k] for k in [*previous_cells, *order] if k in done}
            atomic_write_json(json_path, state)
            acc = (f"few-step {cell['few_step_mean']:5.1f} %  fixed set "
                   f"{cell['fixed_set_mean']:5.1f} %" if cell.get("few_step_mean") is not None
                   else "memory and time only")
            log(f"{cell['method']:<18} T={cell['T']:<3} {_peak(cell) / 2**20:8.1f} MiB  "
                f"{cell['seconds_per_meta_step']:6.2f} s/step  {acc}  "
                f"({cell['meta_iterations']} meta-iterations, {cell['wall_seconds']:.0f} s)")
            finished.add(key)  # the bar counts percent of the work: cells differ 100-fold
            advance(bar)

        # in this process, each cell's meta-training reports its own progress
        with task(None if ex.in_process else progress, "cells (% of the estimated work)",
                  100) as bar:
            stop = threading.Event()

            def poll() -> None:
                while not stop.wait(2.0):
                    advance(bar)

            poller = threading.Thread(target=poll, daemon=True)
            if polled:
                poller.start()
            try:
                ex.run(items, shared=shared, on_result=lambda k, c: finish(k, c, bar))
            finally:
                stop.set()
                if polled:
                    poller.join()
                    for f in files.values():
                        f.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        (out / "progress").rmdir()
    atomic_write_text(out / "gtn-compare.md", comparison_table(state))
    plot(state, out / "gtn-compare.png")
    return state


def _run_cell(shared: dict, method: str, steps: int, budget: Budget, curriculum: str,
              recipe: bool, seed: int, device: str, out: Path, resume: bool,
              progress: Progress | None) -> dict:
    """One (method, T) cell, a work item of :mod:`distill.executor`: the GTN trained on the
    shared training set (checkpointed under ``out/ckpt``), scored on the shared test subset
    by few-step students and by students trained on a fixed generated set; a memory-only
    cell (:func:`is_scored` false) trains the budget's ``memory_cell_iterations`` and is not
    scored (its accuracies are None)."""
    on = shared_on(shared, device)
    scored = is_scored(budget, steps)
    run = budget if scored else replace(budget, meta_iterations=budget.memory_cell_iterations)
    config = cell_config(run, method, steps, curriculum, recipe)
    ckpt = cell_checkpoint(out, method, steps)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, meta, _ = train_gtn(on["train"], config, seed=seed, device=device,
                                 checkpoint=ckpt, resume=resume and ckpt.exists(),
                                 progress=progress)
    cell = {"method": method, "T": steps, "scored": scored, "meta_iterations": meta.iterations,
            "seconds_per_meta_step": meta.seconds_per_iteration, "memory": meta.memory,
            "final_meta_loss": meta.losses[-1], "few_step": [], "few_step_mean": None,
            "few_step_std": None, "fixed_set": [], "fixed_set_mean": None,
            "fixed_set_std": None}
    if scored:
        protocol = EvalProtocol(model=budget.student, n_students=budget.students,
                                train=TrainConfig(epochs=budget.fixed_epochs))
        few = few_step_accuracy(teacher, budget.student, on["test_x"], on["test_y"], seed,
                                budget.students)
        fixed = fixed_set_accuracy(teacher, protocol, on["test_x"], on["test_y"], seed)
        few_mean, few_std = mean_std(few)
        cell.update(few_step=few, few_step_mean=few_mean, few_step_std=few_std,
                    fixed_set=list(fixed.accuracies), fixed_set_mean=fixed.mean,
                    fixed_set_std=fixed.std)
    return {**cell, "wall_seconds": time.perf_counter() - t0}


def _peak(cell: dict) -> int:
    m = cell["memory"]
    return m.get("cuda_peak_bytes") or m["saved_peak_bytes"]


def _scored(cell: dict) -> bool:
    return cell.get("few_step_mean") is not None


def _accuracy_note(state: dict) -> str:
    """Where and how long the accuracy columns were trained, in words."""
    b = state["budget"]
    cells = list(state["cells"].values())
    its = sorted({c.get("meta_iterations", b["meta_iterations"]) for c in cells if _scored(c)})
    its_text = "/".join(str(i) for i in its) or str(b["meta_iterations"])
    if b.get("accuracy_steps") is None:
        return f"Accuracy: every cell trained {its_text} meta-iterations"
    memory_only = sorted({c["T"] for c in cells if not _scored(c)})
    rest = (f"; the other T ({', '.join(map(str, memory_only))}) ran "
            f"{b.get('memory_cell_iterations', 2)} meta-iterations to measure memory and time "
            f"only (— in the accuracy columns)") if memory_only else ""
    return (f"Accuracy: trained at T = {b['accuracy_steps']} only, for {its_text} "
            f"meta-iterations{rest}")


def comparison_table(state: dict) -> str:
    b = state["budget"]
    gpu = any(c["memory"].get("cuda_peak_bytes") for c in state["cells"].values())
    what = "CUDA allocator peak" if gpu else "peak bytes autograd saves for backward"
    recipe_note = "each method's training recipe" if state.get("recipe", True) else \
        "no training recipe (bare defaults)"
    lines = [f"GTN comparison on {state['dataset']}, budget `{b['name']}` ({b['notes']}); "
             f"curriculum `{state['curriculum']}`; {recipe_note}; "
             f"memory = {what} during a meta-step. {_accuracy_note(state)}; % on the test "
             f"set, mean ± std over {b['students']} students.", "",
             *([f"One plain student training step (batch {b['batch_size']}) saves "
                f"{state['plain_step_saved_bytes'] / 2**20:.1f} MiB for backward.", ""]
               if state.get("plain_step_saved_bytes") else []),
             "| method | T | peak memory (MiB) | × unrolled | s / meta-step | few-step acc. | "
             "fixed-set acc. | meta-iterations |", "|---|---|---|---|---|---|---|---|"]
    cells = state["cells"]
    for c in sorted(cells.values(), key=lambda c: (c["method"], c["T"])):
        ref = cells.get(cell_key("unrolled", c["T"]))
        ratio = f"{_peak(c) / _peak(ref):.2f}" if ref else "—"
        few, fixed = ((f"{c['few_step_mean']:.1f} ± {c['few_step_std']:.1f}",
                       f"{c['fixed_set_mean']:.1f} ± {c['fixed_set_std']:.1f}")
                      if _scored(c) else ("—", "—"))
        lines.append(f"| {c['method']} | {c['T']} | {_peak(c) / 2**20:.1f} | {ratio} | "
                     f"{c['seconds_per_meta_step']:.2f} | {few} | {fixed} | "
                     f"{c.get('meta_iterations', '?')} |")
    said = reading(state)
    return "\n".join(lines) + "\n" + (f"\n{said}\n" if said else "")


def _mib(cell: dict) -> str:
    return f"{_peak(cell) / 2**20:.1f} MiB"


def reading(state: dict) -> str:
    """What the run shows, in words, from its figures: which method trains the best students
    (at each scored T), which needs the least memory (at the largest T) and how memory grows
    with T, the seconds per meta-step, and the trade-off between them."""
    cells = list(state["cells"].values())
    if not cells:
        return ""
    out: list[str] = []
    winners: dict[int, dict] = {}
    tied: dict[int, dict] = {}
    for t in sorted({c["T"] for c in cells if _scored(c)}):
        at = sorted((c for c in cells if c["T"] == t and _scored(c)),
                    key=lambda c: -c["few_step_mean"])
        best = winners[t] = at[0]
        its = best.get("meta_iterations", state["budget"]["meta_iterations"])
        others = ", ".join(f"{c['method']} {c['few_step_mean']:.1f} % "
                           f"({best['few_step_mean'] - c['few_step_mean']:.1f} points behind)"
                           for c in at[1:])
        text = (f"Accuracy at T = {t} after {its} meta-iterations (few-step students): "
                f"{best['method']} trains the best students, {best['few_step_mean']:.1f} %"
                + (f"; {others}" if others else "") + ".")
        if len(at) > 1:  # error bars that overlap: a tie
            second = at[1]
            if best["few_step_mean"] - second["few_step_mean"] <= \
                    best["few_step_std"] + second["few_step_std"]:
                tied[t] = second
                text += (f" {best['method']} and {second['method']} are within the spread of "
                         f"their students (± {best['few_step_std']:.1f} and "
                         f"± {second['few_step_std']:.1f}): a tie at this budget.")
        out.append(text)
    top = max(c["T"] for c in cells)
    at_top = sorted((c for c in cells if c["T"] == top), key=_peak)
    low = at_top[0]
    if len(at_top) > 1:
        rest = ", ".join(f"{c['method']} {_mib(c)} ({_peak(c) / max(_peak(low), 1):.1f}x)"
                         for c in at_top[1:])
        out.append(f"Memory at T = {top}: {low['method']} needs the least, {_mib(low)}; "
                   f"{rest}.")
    else:
        out.append(f"Memory at T = {top}: {low['method']} {_mib(low)}.")
    bottom = min(c["T"] for c in cells)
    if bottom < top:
        grows = []
        for m in sorted({c["method"] for c in cells}):
            first = state["cells"].get(cell_key(m, bottom))
            last = state["cells"].get(cell_key(m, top))
            if first and last:
                grows.append(f"{m} {_peak(last) / max(_peak(first), 1):.1f}x")
        if grows:
            out.append(f"From T = {bottom} to {top} memory grows: {', '.join(grows)}.")
    if winners:
        t = max(winners, key=lambda t: sum(c["T"] == t and _scored(c) for c in cells))
        at = sorted((c for c in cells if c["T"] == t), key=lambda c: c["seconds_per_meta_step"])
        out.append(f"Seconds per meta-step at T = {t}: " + ", ".join(
            f"{c['method']} {c['seconds_per_meta_step']:.2f}" for c in at) + ".")
        best = winners[t]
        mem_best = state["cells"].get(cell_key(best["method"], top))
        lead = (f"{best['method']} and {tied[t]['method']} tie on accuracy" if t in tied
                else f"{best['method']} wins on accuracy")
        if low["method"] == best["method"]:
            out.append(f"In short: {lead}, and {best['method']} wins on memory.")
        else:
            out.append(f"In short: {lead}, {low['method']} wins on memory.")
            for c in sorted((c for c in cells if c["T"] == t and _scored(c)
                             and c["method"] != best["method"]),
                            key=lambda c: -c["few_step_mean"]):
                mine = state["cells"].get(cell_key(c["method"], top))
                if mine and mem_best:
                    gap = best["few_step_mean"] - c["few_step_mean"]
                    out[-1] += (f" {c['method']} is {gap:.1f} points behind {best['method']} at "
                                f"{_peak(mine) / max(_peak(mem_best), 1):.2g}x its memory "
                                f"at T = {top}.")
    return "\n".join(f"- {line}" for line in out)


STYLES = {"unrolled": ("o", "-"), "implicit": ("s", "--"), "matching": ("^", ":"),
          "unrolled-recompute": ("v", "-.")}


def plot(state: dict, path: Path) -> bool:
    """Peak memory against T per method on log axes (implicit and matching, flat and small,
    stay apart from each other), and the two accuracies per method and T: few-step students
    (solid) and students trained on a fixed generated set (dashed); where accuracy was
    trained at one T only, bars per method at that T. The titles name the data set, the
    budget, the T the accuracy was trained at and its meta-iterations. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter
    except ImportError:
        return False
    cells = list(state["cells"].values())
    methods = sorted({c["method"] for c in cells})
    scored = [c for c in cells if _scored(c)]
    scored_t = sorted({c["T"] for c in scored})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = len(scored_t) == 1 and len(scored) < len(cells)
    for i, m in enumerate(methods):
        marker, style = STYLES.get(m, ("D", "-."))
        color = colors[i % len(colors)]
        cs = sorted((c for c in cells if c["method"] == m), key=lambda c: c["T"])
        ax1.plot([c["T"] for c in cs], [_peak(c) / 2**20 for c in cs], marker=marker,
                 linestyle=style, color=color, label=m)
        acc = [c for c in cs if _scored(c)]
        if not acc:
            continue
        if bars:
            c = acc[0]
            ax2.bar(i - 0.2, c["few_step_mean"], 0.4, yerr=c["few_step_std"], color=color,
                    capsize=3, label="few-step" if i == 0 else None)
            ax2.bar(i + 0.2, c["fixed_set_mean"], 0.4, yerr=c["fixed_set_std"], color=color,
                    capsize=3, alpha=0.45, hatch="//",
                    label="fixed set" if i == 0 else None)
            ax2.annotate(f"{c['few_step_mean']:.1f}", (i - 0.2, c["few_step_mean"]),
                         textcoords="offset points", xytext=(0, 6), ha="center",
                         fontsize="small")
            continue
        ts = [c["T"] for c in acc]
        ax2.errorbar(ts, [c["few_step_mean"] for c in acc], [c["few_step_std"] for c in acc],
                     marker=marker, linestyle="-", color=color, capsize=3,
                     label=f"{m}: few-step")
        ax2.errorbar(ts, [c["fixed_set_mean"] for c in acc],
                     [c["fixed_set_std"] for c in acc], marker=marker, linestyle="--",
                     color=color, capsize=3, mfc="none", label=f"{m}: fixed set")
    if state.get("plain_step_saved_bytes"):
        ax1.axhline(state["plain_step_saved_bytes"] / 2**20, color="grey", linewidth=0.8,
                    linestyle=":", label="one plain student step")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.set(xlabel="inner steps T", ylabel="peak memory (MiB, log scale)",
            title="memory of a meta-step")
    budget = state.get("budget", {})
    its = sorted({c.get("meta_iterations", budget.get("meta_iterations", "?")) for c in scored}
                 or {budget.get("meta_iterations", "?")})
    its_text = "/".join(map(str, its))
    all_t = sorted({c["T"] for c in cells})
    axes = [ax1]
    if bars:  # the methods differ by points: the axis shows the range they span
        low = min(min(c["few_step_mean"], c["fixed_set_mean"]) for c in scored)
        high = max(max(c["few_step_mean"], c["fixed_set_mean"]) for c in scored)
        ax2.set_ylim(max(0.0, low - 8.0), min(100.0, high + 3.0))
        ax2.set_xticks(range(len(methods)), methods)
        ax2.set(ylabel="test accuracy (%)",
                title=f"students trained on generated data\n(accuracy trained at "
                      f"T = {scored_t[0]} only, {its_text} meta-iterations)")
    else:
        ax2.set(xlabel="inner steps T", ylabel="test accuracy (%)",
                title="students trained on generated data")
        axes.append(ax2)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_t, [str(t) for t in all_t])
        ax.xaxis.set_minor_locator(NullLocator())
    ax1.legend(fontsize="small")
    ax2.legend(fontsize="small", loc="lower center" if bars else "best")
    where = (f"accuracy at T = {scored_t[0]} ({its_text} meta-iterations), memory at every T "
             f"({budget.get('memory_cell_iterations', '?')} meta-iterations)" if bars
             else f"{its_text} meta-iterations")
    fig.suptitle(f"GTN on {state.get('dataset', '?')}, budget {budget.get('name', '?')}: "
                 f"{where}; curriculum {state.get('curriculum', '?')}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True
