"""Seconds, FLOPs and memory per meta-step, against the machine's measured peak; the fast
path beside the plain one, in one process.

For every setting (data set, T, generated batch) and method (each GTN recipe of
``gtn.train.RECIPES``, unrolled recomputed, the bare variants below), three teachers with the
same initial weights run the same meta-steps: one on torch's plain layers and scoring
(:func:`distill.models.plain_path`), one on the fast path, one on the fast path with the
real-data side compiled (``--compile`` of ``gtn train``: :func:`distill.inner.compiled_scoring`
and the strategy's compiled real gradients), in alternation (plain step, fast step, compiled
step, plain step, ...), so machine noise falls on all alike. Reported per method and path:

* CPU seconds of the process per meta-step (``time.process_time``; pin
  ``OMP_NUM_THREADS=1``: the run sets one torch thread), the median over the timed steps
  after a warm-up step, and the ratio fast / plain of the two medians;
* FLOPs per meta-step, counted by a ``TorchDispatchMode`` over ``torch.utils.flop_counter``'s
  formula registry (matrix products and convolutions, forward and backward; elementwise work
  counts zero). ``FlopCounterMode`` itself fails here: its module tracker asserts on the
  functional student;
* achieved GFLOP/s (the plain path's FLOPs, the work itself, / CPU s: a path that computes
  more is not credited for it) and its fraction of the peak: a 2048 x 2048 fp32 matrix
  product on the same thread, measured in the same process before and after (the best);
* the peak bytes autograd saves during a meta-step (:class:`distill.memory.SavedTensorMeter`),
  from one more step, untimed (under the meter's hooks matching's synthetic side takes its
  per-class path and the scoring stays eager: ``torch.func`` and ``torch.compile`` refuse
  saved-tensor hooks, so the compiled path's figure is the fast path's);
* the **kernel floor**: every convolution and matrix product of one fast-path meta-step,
  recorded with its shapes and replayed alone on random tensors of those shapes (warm
  caches, the best of 5 calls each, on the same thread): the CPU seconds torch's own
  kernels need for the meta-step's FLOP-counted work, with no normalisation, activation,
  pooling, optimiser or Python in between. No path built on these kernels can go below it.

    OMP_NUM_THREADS=1 python bench/metastep.py                       # all settings, ~25 min
    OMP_NUM_THREADS=1 python bench/metastep.py --settings mnist-t10 --repeats 5

Writes ``<tag>.json``, ``<tag>.md`` and ``<tag>.png`` under ``--out``. ``--allocator keep``
runs the whole process (both paths) with :func:`distill.allocator.keep_freed_memory`; the
default is glibc's own, as today's main runs, so "main" against "new" with the allocator
setting compares the plain rows of a default run with the fast rows of a ``keep`` run.
It replaces ``bench/gtn_speed.py``: its variants are the ``bare:`` methods (no recipe, real
batch 512), its T sweep is ``--steps``, e.g. its recipe run::

    OMP_NUM_THREADS=1 python bench/metastep.py --settings mnist-t32 --steps 8,16,32 \
        --repeats 3 --tag gtn-speed-recipe --methods "bare: unrolled,bare: implicit recipe + tail 5"
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from flops import FlopCount, KernelRecorder  # noqa: E402

from distill.allocator import keep_freed_memory  # noqa: E402
from distill.data import load_dataset  # noqa: E402
from distill.inner import compiled_scoring  # noqa: E402
from distill.memory import SavedTensorMeter  # noqa: E402
from distill.models import build_model, plain_path  # noqa: E402
from distill.rng import generator as make_generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from distill.strategies import RealSampler, make_strategy  # noqa: E402
from gtn import GeneratorConfig  # noqa: E402
from gtn.train import GTNConfig, make_teacher, recipe_config  # noqa: E402

STUDENT = "convnet:width=16,depth=2,first_pad=1"
GENERATOR = GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32)

# name: (data set, T, generated batch)
SETTINGS = {
    "mnist-t10": ("mnist", 10, 32),
    "mnist-t32": ("mnist", 32, 128),
    "cifar10-t10": ("cifar10", 10, 32),
}

# name: (GTN method, options over the method's recipe)
METHODS: dict[str, tuple[str, dict]] = {
    "unrolled recipe": ("unrolled", {}),
    "unrolled recipe recomputed": ("unrolled", {"recompute": True}),
    "implicit recipe": ("implicit", {}),
    "first-order-tail recipe": ("first-order-tail", {}),
    "matching recipe": ("matching", {}),
    # bare variants, for the implicit default's cost (the peer comparison)
    "implicit IFT (all T mixed terms)": ("implicit", {"mixed_at": "final",
                                                      "step_size_grad": False,
                                                      "grad_clip": None,
                                                      "mixed_sample": None}),
    "implicit IFT (mixed term from 1 batch)": ("implicit", {"mixed_at": "final",
                                                            "step_size_grad": False,
                                                            "grad_clip": None,
                                                            "mixed_sample": 1}),
}
# The variants of the former bench/gtn_speed.py (cost and memory in T): bare configurations
# (no recipe) with the student scored on 512 real images and meta-lr 5e-3, as it ran them.
_TRAJ = {"mixed_at": "trajectory", "step_size_grad": True}
BARE: dict[str, tuple[str, dict]] = {
    "unrolled": ("unrolled", {}),
    "implicit (all T mixed terms)": ("implicit", {}),
    "implicit, mixed term from 4 batches": ("implicit", {"mixed_sample": 4}),
    "implicit, mixed term from 1 batch": ("implicit", {"mixed_sample": 1}),
    "implicit, trajectory (first-order)": ("implicit", {"mixed_at": "trajectory"}),
    "implicit, trajectory from 4 batches": ("implicit", {"mixed_at": "trajectory",
                                                         "mixed_sample": 4}),
    "unrolled recipe (+ intermediate losses)": ("unrolled", {"intermediate_every": 1}),
    "implicit recipe (trajectory + step sizes)": ("implicit", _TRAJ),
    "implicit recipe + tail 2": ("implicit", {**_TRAJ, "unroll_tail": 2}),
    "implicit recipe + tail 5": ("implicit", {**_TRAJ, "unroll_tail": 5}),
    "implicit recipe + tail 10": ("implicit", {**_TRAJ, "unroll_tail": 10}),
    "implicit recipe + tail 5 (head: 4 batches)": ("implicit", {**_TRAJ, "unroll_tail": 5,
                                                                "mixed_sample": 4}),
    "implicit recipe + tail 2 (head: 4 batches)": ("implicit", {**_TRAJ, "unroll_tail": 2,
                                                                "mixed_sample": 4}),
    "matching (DC rounds on fresh noise)": ("matching", {}),
    "matching along the curriculum": ("matching", {"match_curriculum": True}),
    "unrolled recomputed": ("unrolled", {"recompute": True}),
    "unrolled recipe recomputed (bare + intermediate losses)": (
        "unrolled", {"intermediate_every": 1, "recompute": True}),
}
BARE_BASE = {"real_batch": 512, "meta_lr": 5e-3}
ALL_METHODS = {**METHODS, **{f"bare: {k}": v for k, v in BARE.items()}}
DEFAULT_METHODS = ("unrolled recipe", "unrolled recipe recomputed", "implicit recipe",
                   "matching recipe")
PATHS = ("plain", "fast", "compiled")


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n fp32 matrix product on this thread (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        a @ b
        best = min(best, time.thread_time() - t0)
    return 2 * n ** 3 / best / 1e9


def config_for(name: str, steps: int, batch: int, generator: GeneratorConfig) -> GTNConfig:
    """The GTN configuration of method ``name`` (a recipe, or a bare variant) at T, batch."""
    method, options = ALL_METHODS[name]
    shape = {"inner_steps": steps, "batch_size": batch, "student": STUDENT,
             "generator": generator}
    if name.startswith("bare: "):
        return recipe_config(method, recipe=False, **{**shape, **BARE_BASE, **options})
    return recipe_config(method, **{**shape, **options})


def run_cell(setting: str, name: str, repeats: int, root: str | None, peak: float,
             data_cache: dict, steps: int | None = None, batch: int | None = None,
             generator: GeneratorConfig = GENERATOR) -> dict:
    dataset, default_steps, default_batch = SETTINGS[setting]
    steps, batch = steps or default_steps, batch or default_batch
    if dataset not in data_cache:
        data_cache[dataset] = load_dataset(dataset, "train", root=root)
    data = data_cache[dataset]
    real = RealSampler(data)
    cfg = config_for(name, steps, batch, generator)
    info = data.info

    def student(gen: torch.Generator) -> torch.nn.Module:
        return build_model(cfg.student, info.channels, info.num_classes, info.im_size,
                           generator=gen)

    runs: dict[str, dict] = {}
    base = make_teacher(info, cfg, seed=0)
    for path in PATHS:
        teacher = copy.deepcopy(base)
        meta = cfg.meta_config()
        strategy = make_strategy(meta.strategy, replace(meta.strategy_config,
                                                        compile=path == "compiled"))
        opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], 1e-3)
        runs[path] = {"teacher": teacher, "strategy": strategy, "opt": opt, "times": [],
                      "saved": 0, "flops": 0}

    def step(path: str, rep: int) -> Callable[[], Any]:
        r = runs[path]
        return lambda: r["strategy"].step(r["teacher"], r["opt"], real, student,
                                          make_generator(rep, "metastep"))

    for rep in range(repeats + 1):
        for path in PATHS:
            with plain_path(path == "plain"), compiled_scoring(path == "compiled"):
                t0 = time.process_time()
                step(path, rep)()
                dt = time.process_time() - t0
            if rep > 0:  # the first is a warm-up (and the compilation)
                runs[path]["times"].append(dt)
    # memory from one more step each, not timed: the saved-tensor meter's hooks turn off
    # matching's batched synthetic side and the compiled scoring (torch.func and
    # torch.compile refuse them), as in a metered meta-iteration of a run
    for path in PATHS:
        with plain_path(path == "plain"), compiled_scoring(path == "compiled"), \
                SavedTensorMeter() as meter:
            step(path, repeats + 1)()
        runs[path]["saved"] = meter.peak
    # FLOPs of one more step (not timed: the mode slows every operator); a dispatch mode
    # cannot look inside compiled kernels, so the compiled path counts the fast path's
    for path in ("plain", "fast"):
        with plain_path(path == "plain"), FlopCount() as counter:
            step(path, repeats + 2)()
        runs[path]["flops"] = counter.flops
    runs["compiled"]["flops"] = runs["fast"]["flops"]
    with KernelRecorder() as recorder:  # the fast path's kernels, replayed alone
        step("fast", repeats + 3)()
    floor = recorder.floor_seconds()
    rows = {}
    # the work of a meta-step is the plain path's FLOPs: a path that computes more (matching's
    # batched per-image gradients count about a third more) is not credited for the extra
    useful = runs["plain"]["flops"] / 1e9
    for path in PATHS:
        r = runs[path]
        med = statistics.median(r["times"])
        rows[path] = {"cpu_s": med, "cpu_s_all": r["times"], "gflop": r["flops"] / 1e9,
                      "gflops": useful / med, "of_peak": useful / med / peak,
                      "floor_s": useful / peak, "saved_mib": r["saved"] / 2 ** 20}
    out = {"setting": setting, "method": name, "dataset": dataset, "T": steps, "batch": batch,
           **{f"{p}_{k}": v for p in PATHS for k, v in rows[p].items()},
           "ratio": rows["fast"]["cpu_s"] / rows["plain"]["cpu_s"],
           "compiled_ratio": rows["compiled"]["cpu_s"] / rows["plain"]["cpu_s"],
           "kernel_floor_s": floor, "kernel_gflops": useful / floor}
    print(f"{setting} T={steps} {name}: plain {rows['plain']['cpu_s']:.3f} s "
          f"({100 * rows['plain']['of_peak']:.1f} % of peak), fast {rows['fast']['cpu_s']:.3f} s "
          f"({100 * rows['fast']['of_peak']:.1f} %), compiled {rows['compiled']['cpu_s']:.3f} s "
          f"({100 * rows['compiled']['of_peak']:.1f} %), compiled / plain "
          f"{out['compiled_ratio']:.2f}; kernel floor {floor:.3f} s; saved "
          f"{rows['plain']['saved_mib']:.1f} -> {rows['fast']['saved_mib']:.1f} MiB", flush=True)
    return out


def write(out: Path, rows: list[dict], meta: dict) -> None:
    tag = meta["tag"]
    atomic_write_json(out / f"{tag}.json", {"setting": meta, "rows": rows})
    lines = [
        "# CPU seconds per meta-step: plain, fast and compiled paths side by side in one "
        "process, against the machine's peak and its kernels' floor",
        "", f"Command: `{meta['command']}`", "",
        f"{meta['threads']} thread; student `{STUDENT}`; generator {meta['generator']}; "
        "each method's recipe (`gtn.train.RECIPES`; `bare:` rows: no recipe, real batch 512, "
        "as bench/gtn_speed.py ran them). Peak: a 2048 x 2048 fp32 "
        f"matrix product on the same thread, {meta['peak_gflops']:.1f} GFLOP/s. CPU s: median "
        f"of {meta['repeats']} meta-steps after a warm-up (and, compiled, the compilation), "
        "the three paths alternating. Compiled: the fast path with the real-data side "
        "through torch.compile (`gtn train --compile`). "
        "FLOPs: `torch.utils.flop_counter`'s formulas (convolutions and matrix products); "
        "% of peak for every path from the plain path's FLOPs (the work itself). Kernel "
        "floor: the fast path's convolutions and matrix products replayed alone on their "
        "shapes (best of 5 each): no path built on torch's kernels goes below it. "
        "Saved: peak bytes autograd keeps for backward in one more, untimed meta-step (under "
        "its hooks matching takes the per-class synthetic side and the scoring stays eager). "
        f"Allocator: {meta['allocator']} (`distill.allocator`).", "",
        "| setting | T | batch | method | plain CPU s | fast CPU s | compiled CPU s | "
        "fast / plain | compiled / plain | GFLOP plain / fast | plain % of peak | "
        "fast % of peak | compiled % of peak | kernel floor s (% of peak) | "
        "compiled / floor | saved MiB plain / fast |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['T']} | {r['batch']} | {r['method']} | "
            f"{r['plain_cpu_s']:.3f} | {r['fast_cpu_s']:.3f} | {r['compiled_cpu_s']:.3f} | "
            f"{r['ratio']:.2f} | {r['compiled_ratio']:.2f} | "
            f"{r['plain_gflop']:.1f} / {r['fast_gflop']:.1f} | "
            f"{100 * r['plain_of_peak']:.1f} | {100 * r['fast_of_peak']:.1f} | "
            f"{100 * r['compiled_of_peak']:.1f} | {r['kernel_floor_s']:.3f} "
            f"({100 * r['kernel_of_peak']:.0f}) | "
            f"{r['compiled_cpu_s'] / r['kernel_floor_s']:.2f} | "
            f"{r['plain_saved_mib']:.1f} / {r['fast_saved_mib']:.1f} |")
    atomic_write_text(out / f"{tag}.md", "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['setting']} T={r['T']}\n{r['method']}" for r in rows]
    ys = range(len(rows))
    for off, path in ((-0.27, "plain"), (0, "fast"), (0.27, "compiled")):
        axes[0].barh([y + off for y in ys], [r[f"{path}_cpu_s"] for r in rows], height=0.27,
                     label=path)
        axes[1].barh([y + off for y in ys], [100 * r[f"{path}_of_peak"] for r in rows],
                     height=0.27, label=path)
    axes[0].scatter([r["kernel_floor_s"] for r in rows], list(ys), marker="|", s=200,
                    color="k", label="kernel floor", zorder=3)
    for ax in axes:
        ax.set_yticks(list(ys))
        ax.invert_yaxis()
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[1].set_yticklabels([])
    axes[0].set(xlabel="CPU s / meta-step", xscale="log")
    axes[1].set(xlabel="% of the measured peak")
    axes[1].axvline(25, color="k", lw=0.8, ls="--")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out / f"{tag}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from: {', '.join(ALL_METHODS)}")
    ap.add_argument("--steps", default=None,
                    help="comma-separated T values replacing each setting's (a sweep in T)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="generated batch replacing each setting's")
    ap.add_argument("--generator", choices=["small", "paper"], default="small",
                    help="small: noise 64, FC 256, 32 channels; paper: Such et al.'s "
                         "(noise 128, FC 1024, 128 channels)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "metastep"))
    ap.add_argument("--allocator", choices=["default", "keep"], default="default",
                    help="keep: distill.allocator.keep_freed_memory() for the whole process "
                         "(both paths); default: glibc's, as today's main runs")
    ap.add_argument("--tag", default="metastep", help="output file name stem")
    args = ap.parse_args()
    if args.allocator == "keep" and not keep_freed_memory():
        ap.error("--allocator keep needs glibc (Linux)")
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    torch.set_num_threads(1)
    peak = peak_gflops()
    rows: list[dict] = []
    cache: dict = {}
    gen = GENERATOR if args.generator == "small" else GeneratorConfig()
    sweep = [int(t) for t in args.steps.split(",")] if args.steps else [None]
    for s in settings:
        for t in sweep:
            for m in methods:
                rows.append(run_cell(s, m, args.repeats, args.data_root, peak, cache, t,
                                     args.batch_size, gen))
    peak = max(peak, peak_gflops())
    for r in rows:  # against the best peak seen in this process
        for p in PATHS:
            r[f"{p}_of_peak"] = r[f"{p}_gflops"] / peak
            r[f"{p}_floor_s"] = r[f"{p}_gflop"] / peak
        r["kernel_of_peak"] = r["kernel_gflops"] / peak
    meta = {"threads": torch.get_num_threads(), "repeats": args.repeats,
            "peak_gflops": peak, "student": STUDENT, "torch": torch.__version__,
            "generator": "noise 64, FC 256, 32 channels" if args.generator == "small" else
            "noise 128, FC 1024, 128 channels (the paper's)", "allocator": args.allocator,
            "tag": args.tag,
            "command": "OMP_NUM_THREADS=1 python bench/metastep.py " + shlex.join(sys.argv[1:]),
            "load_average": os.getloadavg()}
    write(Path(args.out), rows, meta)


if __name__ == "__main__":
    main()
