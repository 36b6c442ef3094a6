"""GTN long benchmark: each meta-gradient (unrolled, implicit, matching) trained long enough to
see where it plateaus, with accuracy against meta-iterations and against seconds.

Cells are ``SETTING/VARIANT`` (see ``SETTINGS`` and ``VARIANTS``); every cell is one work item
of :mod:`distill.executor` (``--executor local|ray``, ``--workers``: a local pool or a Ray
cluster), checkpoints every 100 meta-iterations and writes ``OUT/cells/SETTING--VARIANT.json``
after every evaluation, so a killed run continues with ``--resume``; ``--cell`` runs one cell
here (a shard by hand). Every 100 meta-iterations: few-step accuracy of one student on the
10 000 held-out training images (validation) and of three students on the test set (the GTN
paper's protocol: T steps on the learned curriculum at the learned lr and momentum); the
headline is the test accuracy at the last meta-iteration, never the best one.

    python bench/gtn.py --sections long --long-cells mnist-t10/unrolled,mnist-t10/implicit-tail5
    python bench/gtn_long.py --cells all --workers 2 --resume
    python bench/gtn_long.py --report                 # md + json + png from the cell files

Published: GoodAI's GTN re-implementation ~94 % on MNIST at (T = 10, batch 32, learned
curriculum) after 1000 meta-iterations, ~96 % after 4000; Such et al. (ICML 2020) 98.9 % at
(T = 32, batch 128) with their full budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from sweep import add_executor_options, executor_config  # noqa: E402

from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.executor import ExecutorConfig, SweepError, WorkItem, run_items  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from gtn import GeneratorConfig, GTNConfig, few_step_accuracy, train_gtn  # noqa: E402
from gtn.train import split_validation  # noqa: E402

SMALL = GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32)
PAPER = GeneratorConfig()
S16 = "convnet:width=16,depth=2,first_pad=1"  # the 28-px network these results were measured with

# setting -> (data set, meta-iterations, GTNConfig keywords, what)
SETTINGS: dict[str, tuple[str, int, dict, str]] = {
    "mnist-t10": ("mnist", 1000, dict(inner_steps=10, batch_size=32, generator=SMALL,
                                      student=S16),
                  "MNIST, T = 10, batch 32, generator 64 / 256 / 32"),
    "mnist-t32": ("mnist", 2000, dict(inner_steps=32, batch_size=128, generator=PAPER,
                                      student=S16),
                  "MNIST, T = 32, batch 128, the paper's generator"),
    "cifar10-t10": ("cifar10", 500, dict(inner_steps=10, batch_size=32, generator=SMALL,
                                         student=S16),
                    "CIFAR-10, T = 10, batch 32, generator 64 / 256 / 32"),
}
# variant -> (GTNConfig keywords, what); frozen here so that a cell's meaning does not move
# with the library's recipes (gtn.train.RECIPES: unrolled and implicit-tail5-clip are them)
_ADAM = dict(meta_lr=5e-3, meta_schedule="cosine")
_TRAJ = dict(_ADAM, real_batch=512, mixed_at="trajectory", step_size_grad=True)
VARIANTS: dict[str, tuple[dict, str]] = {
    "unrolled": (dict(_ADAM, real_batch=512, intermediate_every=1),
                 "unrolled backprop + intermediate losses (recipe)"),
    "implicit-traj": (dict(_TRAJ), "implicit: trajectory gradient + learned step sizes"),
    "implicit-tail2": (dict(_TRAJ, unroll_tail=2), "implicit + exact tail of 2 steps"),
    "implicit-tail2-s4": (dict(_TRAJ, unroll_tail=2, mixed_sample=4),
                          "implicit + exact tail of 2 steps, head term from 4 batches"),
    "implicit-tail5": (dict(_TRAJ, unroll_tail=5),
                       "implicit + exact tail of 5 steps (recipe until the clip joined it)"),
    "implicit-tail10": (dict(_TRAJ, unroll_tail=10), "implicit + exact tail of 10 steps"),
    "implicit-tail10-clip": (dict(_TRAJ, unroll_tail=10, grad_clip=0.5),
                             "implicit + exact tail of 10 steps, meta-gradient clipped to norm "
                             "0.5 (unclipped, its norms at iterations 701-706 were 0.18-1.1)"),
    "implicit-tail5-clip": (dict(_TRAJ, unroll_tail=5, grad_clip=0.5),
                            "implicit + exact tail of 5 steps, meta-gradient clipped to norm 0.5 "
                            "(recipe)"),
    "implicit-tail16-clip": (dict(_TRAJ, unroll_tail=16, grad_clip=0.5),
                             "implicit + exact tail of 16 steps, meta-gradient clipped to norm "
                             "0.5 (is the clipped tail of 10's gap the head's bias?)"),
    "implicit-ift": (dict(_ADAM, real_batch=512),
                     "implicit function theorem (Neumann), fixed step sizes"),
    "implicit-ift-s1": (dict(_ADAM, real_batch=512, mixed_sample=1),
                        "implicit function theorem (Neumann), mixed term from 1 of the T "
                        "batches (the AIST 2021 code's estimate)"),
    "implicit-ift-s2": (dict(_ADAM, real_batch=512, mixed_sample=2),
                        "implicit function theorem (Neumann), mixed term from 2 of the T "
                        "batches"),
    "implicit-ift-cg": (dict(_ADAM, real_batch=512, ift_solver="cg"),
                        "implicit function theorem, conjugate gradient (5 iterations), fixed "
                        "step sizes"),
    "trajectory": (dict(_ADAM, trajectory_gradient="tesla", expert_epochs=1, online_experts=4),
                   "trajectory matching (TESLA's gradient): students from 4 experts' "
                   "initialisations match them 1 epoch on (experts trained in memory)"),
    "matching": (dict(_ADAM), "gradient matching: DC's rounds on fresh noise (earlier recipe)"),
    "matching-c": (dict(_ADAM, match_curriculum=True),
                   "gradient matching along the curriculum (students as scored)"),
    "matching-cs": (dict(_ADAM, match_curriculum=True, inner_lr=0.05, inner_momentum=0.8),
                    "gradient matching along the curriculum, real data's best step sizes "
                    "(0.05 / 0.8; recipe)"),
    "matching-s": (dict(_ADAM, inner_lr=0.05, inner_momentum=0.8),
                   "gradient matching, students at real data's best step sizes (0.05 / 0.8)"),
}
STYLE = {"unrolled": "-", "matching": ":", "trajectory": "-."}


def cells_of(spec: str) -> list[str]:
    """``all``, or comma-separated ``SETTING/VARIANT`` (``SETTING/*`` for every variant)."""
    every = [f"{s}/{v}" for s in SETTINGS for v in VARIANTS]
    if spec == "all":
        return every
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        s, _, v = item.partition("/")
        if s not in SETTINGS or (v != "*" and v not in VARIANTS):
            raise SystemExit(f"unknown cell {item!r}: SETTING/VARIANT with SETTING from "
                             f"{', '.join(SETTINGS)} and VARIANT from {', '.join(VARIANTS)}")
        out += [f"{s}/{w}" for w in VARIANTS] if v == "*" else [item]
    return out


def method_of(variant: str) -> str:
    """The GTN method a variant trains with: its name's first word."""
    return next(m for m in ("unrolled", "implicit", "trajectory", "matching")
                if variant.startswith(m))


def cell_config(cell: str, iterations: int | None = None, compile_: bool = False) -> GTNConfig:
    setting, variant = cell.split("/")
    _, its, kw, _ = SETTINGS[setting]
    method = method_of(variant)
    its = iterations or its
    return GTNConfig(method=method, curriculum="full", meta_iterations=its,
                     eval_every=min(100, its), checkpoint_every=min(100, its), **kw,
                     **VARIANTS[variant][0], compile=compile_)


def run_cell(cell: str, out: Path, root: str | None, device: str, seed: int, resume: bool,
             iterations: int | None, compile_: bool = False) -> None:
    """Train one cell, writing its JSON after every evaluation (atomically)."""
    config = cell_config(cell, iterations, compile_)
    setting, variant = cell.split("/")
    dev = resolve_device(device)
    data = load_dataset(SETTINGS[setting][0], "train", root=root)
    test = load_dataset(SETTINGS[setting][0], "test", root=root)
    val = split_validation(data, config.validation)[1]
    vx, vy, tx, ty = (t.to(dev) for t in (val.images, val.labels, test.images, test.labels))
    path = out / "cells" / f"{setting}--{variant}.json"
    ckpt = out / "ckpt" / f"{setting}--{variant}.pt"
    resuming = resume and ckpt.exists() and path.exists()
    record = json.loads(path.read_text()) if resuming else {
        "cell": cell, "setting": SETTINGS[setting][3], "variant": VARIANTS[variant][1],
        "config": repr(config), "device": str(dev), "seed": seed, "evals": []}
    if resuming:  # the checkpoint follows each evaluation: drop any evaluation after it
        done = int(torch.load(ckpt, map_location="cpu", weights_only=False)["iteration"])
        record["evals"] = [e for e in record["evals"] if e["iteration"] <= done]
    clock = {"base": record["evals"][-1]["train_s"] if record["evals"] else 0.0,
             "mark": time.perf_counter()}

    def evaluate(teacher, it: int) -> dict:
        train_s = clock["base"] + time.perf_counter() - clock["mark"]
        acc = few_step_accuracy(teacher, config.student, vx, vy, seed, 1)[0]
        tests = few_step_accuracy(teacher, config.student, tx, ty, seed, 3)
        record["evals"] = [e for e in record["evals"] if e["iteration"] < it] + [{
            "iteration": it, "validation": acc, "test": tests, "train_s": train_s,
            "lr": teacher.lr_tensor().detach().cpu().tolist(),
            "momentum": float(teacher.momentum_tensor().detach())}]
        atomic_write_json(path, record)
        print(f"{cell} {it} val {acc:.2f} test {sum(tests) / 3:.2f} ({train_s:.0f} s)",
              flush=True)
        clock["base"], clock["mark"] = train_s, time.perf_counter()
        return {"validation_accuracy": acc}

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    _, meta, _ = train_gtn(data, config, seed=seed, device=dev, checkpoint=ckpt,
                           resume=resuming, evaluate=evaluate)
    record.update(test=record["evals"][-1]["test"], s_per_meta_step=meta.seconds_per_iteration,
                  memory=meta.memory, done=True)
    atomic_write_json(path, record)


def real_steps_accuracy(train, student: str, steps: int, batch: int, lrs: list[float],
                        momentum: float, images: torch.Tensor, labels: torch.Tensor,
                        seed: int, n_students: int = 3, balanced: bool = False) -> list[float]:
    """The reference a generator must beat: fresh students trained ``steps`` SGD steps on
    random real batches of ``batch`` images (the GTN few-step protocol with real data);
    ``balanced``: every class equally often in each batch (what gradient matching imitates)."""
    from distill.strategies import RealSampler
    from gtn.train import steps_accuracy

    sampler = RealSampler(train, images.device)
    draw = sampler.balanced_batch if balanced else sampler.batch
    return steps_accuracy(student, train.info,
                          lambda g: [draw(batch, g) for _ in range(steps)], lrs,
                          momentum, images, labels, seed, n_students, "real-steps",
                          images.device)


GRID = [(lr, m) for lr in (0.02, 0.05, 0.1, 0.2, 0.4) for m in (0.5, 0.8, 0.9)]


def real_reference(setting: str, out: Path, root: str | None, device: str, seed: int) -> dict:
    """Real-data students at the same T and batch: at the fixed step sizes (lr 0.02, momentum
    0.5: what matching trains with), at the step sizes unrolled learned (when its cell
    exists), and at the best (lr, momentum) of a grid chosen on 2000 validation images (two
    students each), scored on test."""
    dataset, _, kw, _ = SETTINGS[setting]
    dev = resolve_device(device)
    data = load_dataset(dataset, "train", root=root)
    test = load_dataset(dataset, "test", root=root)
    fit, val = split_validation(data, 10000)
    fit = fit.to(dev)
    vx, vy, tx, ty = (t.to(dev) for t in (val.images, val.labels, test.images, test.labels))
    t, b, student = kw["inner_steps"], kw["batch_size"], kw["student"]
    rows = {"fixed 0.02 / 0.5": real_steps_accuracy(fit, student, t, b, [0.02] * t, 0.5, tx,
                                                   ty, seed)}
    cell = out / "cells" / f"{setting}--unrolled.json"
    if cell.exists():
        last = json.loads(cell.read_text())["evals"][-1]
        rows["unrolled's learned step sizes"] = real_steps_accuracy(
            fit, student, t, b, last["lr"], last["momentum"], tx, ty, seed)
    scores = {(lr, m): _mean(real_steps_accuracy(fit, student, t, b, [lr] * t, m, vx[:2000],
                                                 vy[:2000], seed + 1, 2))
              for lr, m in GRID}
    lr, m = max(scores, key=lambda k: scores[k])
    rows[f"best of grid on validation (lr {lr}, momentum {m})"] = real_steps_accuracy(
        fit, student, t, b, [lr] * t, m, tx, ty, seed)
    # What gradient matching can at best imitate: the gradient of a class-balanced real batch
    # of match_real_per_class images per class at every step (its students train with fixed
    # step sizes, so its generator teaches like these batches at most, up to matching error).
    per_class = GTNConfig().match_real_per_class
    big = per_class * data.info.num_classes
    rows[f"balanced batches of {per_class} per class ({big}), fixed 0.02 / 0.5 (what "
         f"matching imitates)"] = real_steps_accuracy(fit, student, t, big, [0.02] * t, 0.5,
                                                      tx, ty, seed, balanced=True)
    rows[f"balanced batches of {big}, lr {lr}, momentum {m}"] = real_steps_accuracy(
        fit, student, t, big, [lr] * t, m, tx, ty, seed, balanced=True)
    record = {"setting": setting, "rows": rows,
              "grid_validation": {f"{k[0]}/{k[1]}": v for k, v in scores.items()}}
    atomic_write_json(out / f"real-{setting}.json", record)
    return record


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(out: Path) -> str:
    """``gtn-long.{md,json,png}`` from the cell files under ``out/cells``."""
    cells = {}
    for f in sorted((out / "cells").glob("*.json")):
        r = json.loads(f.read_text())
        cells[r["cell"]] = r
    order = [c for c in cells_of("all") if c in cells]
    md = ["# GTN long benchmark", "",
          "Few-step accuracy (the GTN protocol: a fresh `convnet:width=16,depth=2` trained T "
          "steps on the learned curriculum at the learned lr and momentum). Validation: one "
          "student on 10 000 held-out training images; test: three students on the test set, "
          "at the last meta-iteration reached. `train s` excludes evaluation.", ""]
    for setting, (_, its, _, what) in SETTINGS.items():
        rows = [c for c in order if c.startswith(setting + "/")]
        if not rows:
            continue
        md += [f"## {what} ({its} meta-iterations planned)", "",
               "| variant | its | validation at 100 / 500 / last | test % (3 students) | "
               "train s | s / meta-step | saved MiB | device |",
               "|---|---|---|---|---|---|---|---|"]
        real = out / f"real-{setting}.json"
        for name, accs in (json.loads(real.read_text())["rows"].items() if real.exists()
                           else ()):
            t = torch.tensor(accs, dtype=torch.float64)
            md.append(f"| real data, same T and batch: {name} | - | - | {float(t.mean()):.2f}"
                      f" ± {float(t.std(unbiased=False)):.2f} | - | - | - | - |")
        for c in rows:
            r, ev = cells[c], cells[c]["evals"]
            if not ev:
                continue
            pick = {e["iteration"]: e["validation"] for e in ev}
            val = " / ".join(f"{pick[i]:.1f}" if i in pick else "-" for i in (100, 500))
            t = torch.tensor(ev[-1]["test"], dtype=torch.float64)
            mib = r.get("memory", {}).get("saved_peak_bytes")
            its_done = f"{ev[-1]['iteration']}" + ("" if r.get("done") else " (partial)")
            spm = r["s_per_meta_step"] if r.get("done") else \
                ev[-1]["train_s"] / ev[-1]["iteration"]
            what = VARIANTS[c.split("/")[1]][1] if c.split("/")[1] in VARIANTS else \
                r["variant"]
            md.append(f"| {what} | {its_done} | {val} / {ev[-1]['validation']:.1f} | "
                      f"{float(t.mean()):.2f} ± {float(t.std(unbiased=False)):.2f} | "
                      f"{ev[-1]['train_s']:.0f} | {spm:.2f} | ")
            md[-1] += (f"{mib / 2 ** 20:.0f} | " if mib else "- | ") + f"{r['device']} |"
        md.append("")
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "gtn-long.md", text)
    atomic_write_json(out / "gtn-long.json", {"cells": [cells[c] for c in order]})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    used = [s for s in SETTINGS if any(c.startswith(s + "/") for c in order)]
    if not used:
        return text
    fig, axes = plt.subplots(len(used), 2, figsize=(12, 4 * len(used)), squeeze=False,
                             layout="constrained")
    for row, setting in zip(axes, used):
        for c in (c for c in order if c.startswith(setting + "/")):
            ev = cells[c]["evals"]
            variant = c.split("/")[1]
            style = STYLE.get(method_of(variant), "--")
            acc = [_mean(e["test"]) for e in ev]
            row[0].plot([e["iteration"] for e in ev], acc, style, marker=".", label=variant)
            row[1].plot([e["train_s"] for e in ev], acc, style, marker=".", label=variant)
        for ax, xlabel in zip(row, ("meta-iteration", "training seconds (same device)")):
            ax.set(title=SETTINGS[setting][3], xlabel=xlabel, ylabel="test accuracy % (3)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, out / "gtn-long.png")
    return text


def run(cells: list[str], out: Path, executor: ExecutorConfig | int, root: str | None,
        device: str, seed: int, resume: bool, iterations: int | None,
        compile_: bool = False) -> str:
    """Run ``cells`` as work items of ``executor`` (an int: that many local processes), then
    rebuild the report. A cell that fails is named at the end; the others finish."""
    if isinstance(executor, int):
        executor = ExecutorConfig(workers=executor)
    items = [WorkItem(cell, run_cell, (cell, out, root, device, seed, resume, iterations,
                                       compile_)) for cell in cells]
    try:
        run_items(items, executor)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return report(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="", help="all, or SETTING/VARIANT,... "
                    f"(settings: {', '.join(SETTINGS)}; variants: {', '.join(VARIANTS)})")
    ap.add_argument("--cell", default=None, help="Run this one cell here (a shard by hand).")
    add_executor_options(ap)
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gtn-long"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iterations", type=int, default=None, help="override (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables")
    ap.add_argument("--real", default=None, help="SETTING,...: the real-data reference rows")
    ap.add_argument("--compile", action="store_true",
                    help="the real-data side through torch.compile (gtn train --compile)")
    args = ap.parse_args(argv)
    from distill.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does (and the pool workers take it)
    out = Path(args.out)
    if args.cell:
        run_cell(args.cell, out, args.data_root, args.device, args.seed, args.resume,
                 args.iterations, args.compile)
        return 0
    if args.real:
        for setting in args.real.split(","):
            print(json.dumps(real_reference(setting, out, args.data_root, args.device,
                                            args.seed)["rows"]))
    if args.report or args.real:
        print(report(out))
        return 0
    print(run(cells_of(args.cells or "all"), out, executor_config(args), args.data_root,
              args.device, args.seed, args.resume, args.iterations, args.compile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
