"""The user's main comparison: GTN trained by each method of :data:`gtn.methods.GTN_METHODS`
(unrolled backprop stored or recomputed, the implicit function theorem, the first-order
trajectory gradient with an exact tail, gradient matching), for several numbers of inner steps
T: peak memory, seconds per meta-step, and the test accuracy of students trained only on
generated data (few-step protocol and a fixed generated set of the same size). JSON per
finished cell (resumable), Markdown, PNG, and a reading of the figures in words
(:func:`reading`).

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
from distill.store import atomic_write_json, atomic_write_text, to_jsonable

from .compare_report import _peak, cell_key, comparison_table, plot, reading
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

    ``compile``: the cells trained for accuracy compute the real-data side (the scoring of
    unrolled and implicit, matching's real gradients) with ``torch.compile`` (same result
    up to float rounding, about 0.7x the CPU time of an unrolled meta-step; see
    :func:`distill.inner.compiled_scoring`); memory-only cells of a couple of meta-iterations
    stay eager (compiling would cost more than it saves).
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
    compile: bool = False


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
                   accuracy_steps=10, memory_cell_iterations=2, compile=True),
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




def cell_config(budget: Budget, method: str, steps: int, curriculum: str = "full",
                recipe: bool = True) -> GTNConfig:
    """The GTN run behind one (method, T) cell of the comparison: the method's training
    recipe (:data:`~gtn.train.RECIPES`; ``recipe=False``: the bare defaults) at the
    budget's sizes (its real batch included)."""
    return recipe_config(method, recipe, inner_steps=steps, batch_size=budget.batch_size,
                         curriculum=curriculum, generator=budget.generator,
                         student=budget.student, meta_iterations=budget.meta_iterations,
                         real_batch=budget.real_batch, validation=budget.validation,
                         compile=budget.compile and is_scored(budget, steps))


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
STEP_COST = {"unrolled": 1.0, "unrolled-recompute": 1.3, "first-order-tail": 0.45,
             "implicit": 0.6, "matching": 1.6, "trajectory": 1.4}


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
                   "cells": {}, "definitions": _definitions(recipe),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        if all(previous.get(k, True if k == "recipe" else None) == state[k]
               for k in ("dataset", "seed", "curriculum", "recipe")) and \
                _same_budget(previous.get("budget") or {}, budget):
            state["cells"] = _still_valid(previous, state["definitions"], recipe)
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
