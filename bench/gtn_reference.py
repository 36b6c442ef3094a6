"""GTN meta-steps against the authors' code of the method comparison gtnkit is built around,
side by side: CPU seconds per meta-step of gtnkit and of Medvedev & D'yakonov's code.

Medvedev & D'yakonov, "Learning to Generate Synthetic Training Data using Gradient Matching
and Implicit Differentiation", AIST 2021 (arXiv 2203.08559); reference code:
github.com/dm-medvedev/EfficientDistillation (``my_experiments/learning_loop.py``:
``TeacherLearningLoop.higher_train`` (unrolled, through ``higher``), ``ift_train`` (implicit
function theorem, Neumann series) and ``gmpc_train`` (per-class gradient matching)). Bring a
checkout of it onto the machine yourself (outside this repository; nothing of it is copied
here) and pass its folder as ``--reference``; it is imported unmodified. Its loop logs to
TensorBoard, which is not a gtnkit dependency: the worker puts a do-nothing ``SummaryWriter``
in its place.

The setting (the authors' MNIST experiments, ``my_experiments/experiments``, at the sizes
below): 100 generated images per inner step from fresh noise (their teacher: noise 64, FC 64,
32 x 28 x 28 FC maps, 16-channel convolution; gtnkit's generator: noise 64, FC 64, 32
channels: the nearest its options allow; the FLOP columns show what each costs), the student
DC's ConvNet of width 32 (depth 3, instance norm, average pooling, 28-px inputs padded to 32
in the first convolution; the same network on both sides, parameter counts checked), SGD at
lr 0.02, momentum 0.5; T inner steps; per method:

* unrolled: backprop through the T steps, the student scored on a real batch of 128
  (reference: ``higher_train(T)``; gtnkit: ``unrolled`` without the recipe, curriculum none);
* implicit: T steps without a graph, then the implicit function theorem at the trained student
  with 3 Neumann terms (reference: ``ift_train(max_steps=T, epsilon=0, tr_est_steps=1)``:
  the mixed term from one fresh batch; gtnkit: ``implicit`` with the mixed term from all T
  batches, its default, and ``--mixed-sample 1``, the reference's estimate);
* matching: T rounds, each matching every class's gradient on 256 real images against the
  generated images of that class, one teacher update, one student step (reference:
  ``gmpc_train(outer_steps=T, learner_steps=1, batch_size=256)``; gtnkit: ``matching`` on
  fresh noise, ``--match-real-per-class 256``).

gtnkit runs eager (the fast path) and with ``--compile``. Each (program, method, T) is a worker
process with ``OMP_NUM_THREADS`` pinned that takes ``--repeats`` + 1 meta-steps and reports the
CPU seconds of each (``time.process_time``: data loading in the process counts), then counts
the FLOPs of one more step (``bench/flops.py``). The table gives the median of the steps after
the first (warm-up, compilation), and reference / gtnkit. The workers run interleaved,
``--rounds`` times (reference, gtnkit, gtnkit compiled, reference, ...), so a busy machine
slows them alike; the median is over every round's steps.

    OMP_NUM_THREADS=1 python bench/gtn_reference.py --reference /path/to/EfficientDistillation \\
        --data-root $GTNKIT_DATA --steps 8,32      # bench/results/gtn-reference.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

BATCH, NOISE, FC, CHANNELS, WIDTH = 100, 64, 64, 32, 32
INNER_LR, INNER_MOMENTUM, REAL_BATCH, REAL_PER_CLASS, NEUMANN, ALPHA = \
    0.02, 0.5, 128, 256, 3, 1e-3
META_LR = 0.01
# program -> method -> what it runs (the row label)
ROWS: dict[str, dict[str, str]] = {
    "reference": {"unrolled": "higher_train(T)",
                  "implicit": "ift_train(T): mixed term from 1 batch",
                  "matching": "gmpc_train(T, 1, 256)"},
    "gtnkit": {"unrolled": "unrolled",
               "implicit": "implicit (mixed term from all T batches)",
               "implicit-s1": "implicit --mixed-sample 1",
               "matching": "matching --match-real-per-class 256"},
}
PEER = {"unrolled": "unrolled", "implicit": "implicit", "implicit-s1": "implicit",
        "matching": "matching"}


# ---------------------------------------------------------------- the reference's worker
def _mnist_tensors(root: str) -> tuple[Any, Any]:
    """MNIST train images normalised as the reference's loader does (ToTensor, then mean
    0.1307 / std 0.3081), read from the IDX files under ``root``/MNIST/raw (gzipped or not)."""
    import gzip

    import numpy as np
    import torch

    def idx(name: str, offset: int) -> np.ndarray:
        raw = Path(root) / "MNIST" / "raw" / name
        data = gzip.open(f"{raw}.gz").read() if Path(f"{raw}.gz").exists() else raw.read_bytes()
        return np.frombuffer(data, dtype=np.uint8, offset=offset)

    images = torch.from_numpy(idx("train-images-idx3-ubyte", 16).copy()).view(-1, 1, 28, 28)
    labels = torch.from_numpy(idx("train-labels-idx1-ubyte", 8).copy()).long()
    return (images.float() / 255.0 - 0.1307) / 0.3081, labels


def reference_worker(reference: Path, method: str, steps: int, repeats: int,
                     root: str) -> dict:
    import types

    import torch
    # the reference's packages have no __init__.py (namespace packages): any module of the
    # same name on the path wins over them, and bench/ holds a gtn.py
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(reference)] + [p for p in sys.path if p not in ("", here)]
    # the loop logs to TensorBoard; a do-nothing writer stands in (not a gtnkit dependency)
    tb = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:  # noqa: D401 - a stand-in
        def __init__(self, *a: Any, **k: Any) -> None: ...
        def add_scalar(self, *a: Any, **k: Any) -> None: ...
        def add_scalars(self, *a: Any, **k: Any) -> None: ...
    tb.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    sys.modules["torch.utils.tensorboard"] = tb
    import importlib

    from torch.optim import SGD, Adam
    from torch.utils.data import DataLoader

    # the reference's modules (its gtn package, not gtnkit's)
    ref_teacher = importlib.import_module("gtn.models.mnist_teacher")
    MNISTTeacher, MNISTTeacherConfig, TeacherInputType = (
        ref_teacher.MNISTTeacher, ref_teacher.MNISTTeacherConfig, ref_teacher.TeacherInputType)
    MetaOptimizer = importlib.import_module("ift.optim").MetaOptimizer
    TeacherLearningLoop = importlib.import_module(
        "my_experiments.learning_loop").TeacherLearningLoop
    ref_utils = importlib.import_module("my_experiments.utils")
    EvalConfig, LearnerConfig, LoopConfig, RealDataConfig = (
        ref_utils.EvalConfig, ref_utils.LearnerConfig, ref_utils.LoopConfig,
        ref_utils.RealDataConfig)

    torch.manual_seed(0)
    x, y = _mnist_tensors(root)
    # as the authors' launch scripts: the first 10 000 images validate, the rest train
    train = [(x[i], int(y[i])) for i in range(10_000, len(x))]
    train_loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=0)
    test_loader = DataLoader([(x[i], int(y[i])) for i in range(512)], batch_size=512)
    loop_c = LoopConfig(seed=0, learner_c=LearnerConfig(
        arch="ConvNetW32", optim_cls=SGD, optim_kwgs={"lr": INNER_LR,
                                                       "momentum": INNER_MOMENTUM}),
        data_c=RealDataConfig(channel=1, im_size=(28, 28), num_classes=10),
        eval_c=EvalConfig(aug_c=None), epochs=1, learned_curiculum=False, eval_it=10 ** 9)
    teacher_c = MNISTTeacherConfig(input_size=NOISE, output_size=28, fc1_size=FC,
                                   fc2_filters=CHANNELS, conv1_filters=16, target_classes=10,
                                   input_count=1, batch_size=BATCH,
                                   input_type=TeacherInputType.RANDOM)
    teacher = MNISTTeacher(teacher_c, device="cpu")
    if method == "implicit":
        opt: Any = MetaOptimizer(Adam(teacher.parameters(), lr=META_LR), hpo_lr=ALPHA,
                                 truncate_iter=NEUMANN)
    else:
        opt = Adam(teacher.parameters(), lr=META_LR)
    loop = TeacherLearningLoop(teacher, opt, loop_c, train_loader, test_loader, writer=None,
                               device="cpu")
    loop.writer = SummaryWriter()
    step = {"unrolled": lambda: loop.higher_train(learner_steps=steps),
            "implicit": lambda: loop.ift_train(max_steps=steps, epsilon=0.0, tr_est_steps=1),
            "matching": lambda: loop.gmpc_train(outer_steps=steps, learner_steps=1,
                                                batch_size=REAL_PER_CLASS)}[method]
    learner, _ = loop.get_learner()
    return _time_steps(step, repeats, sum(p.numel() for p in learner.parameters()),
                       sum(p.numel() for p in teacher.parameters()))


# ---------------------------------------------------------------- gtnkit's worker
def gtnkit_worker(method: str, steps: int, repeats: int, root: str, compiled: bool) -> dict:
    import torch
    sys.path.insert(0, str(REPO))
    from distill.data import load_dataset
    from distill.inner import compiled_scoring
    from distill.models import build_model
    from distill.rng import generator as make_generator
    from distill.strategies import RealSampler
    from gtn import GeneratorConfig
    from gtn.train import make_teacher, recipe_config, split_validation

    data, _ = split_validation(load_dataset("mnist", "train", root=root), 10_000)
    real = RealSampler(data)
    options: dict[str, Any] = dict(
        inner_steps=steps, batch_size=BATCH, curriculum="none", student=f"convnet:width={WIDTH}",
        generator=GeneratorConfig(noise_dim=NOISE, width_fc=FC, width_conv=CHANNELS),
        inner_lr=INNER_LR, inner_momentum=INNER_MOMENTUM, real_batch=REAL_BATCH,
        neumann_terms=NEUMANN, neumann_alpha=ALPHA, match_real_per_class=REAL_PER_CLASS,
        meta_lr=META_LR, compile=compiled)
    if method == "implicit-s1":
        options["mixed_sample"] = 1
    cfg = recipe_config(PEER[method], recipe=False, **options)
    info = data.info
    teacher = make_teacher(info, cfg, seed=0)
    from distill.strategies import make_strategy
    strategy = make_strategy(cfg.meta_config().strategy, cfg.meta_config().strategy_config)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], META_LR)

    def student(gen: torch.Generator) -> torch.nn.Module:
        return build_model(cfg.student, info.channels, info.num_classes, info.im_size,
                           generator=gen)

    count = [0]

    def step(compile_now: bool = compiled) -> None:
        count[0] += 1
        with compiled_scoring(compile_now):
            strategy.step(teacher, opt, real, student, make_generator(count[0], "reference"))

    probe = student(make_generator(0, "probe"))
    # FLOPs and the kernel floor from an eager step: a dispatch mode cannot see into
    # compiled kernels, and the compiled step does the same work
    return _time_steps(step, repeats, sum(p.numel() for p in probe.parameters()),
                       sum(p.numel() for p in teacher.parameters() if p.requires_grad),
                       eager_step=lambda: step(False))


def _time_steps(step: Any, repeats: int, student_params: int, teacher_params: int,
                eager_step: Any = None) -> dict:
    """CPU seconds of ``repeats`` + 1 calls of ``step``, then the FLOPs of one more and the
    kernel floor of another (``eager_step`` where given)."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location(
        "_bench_flops", Path(__file__).resolve().parent / "flops.py")
    assert spec is not None and spec.loader is not None
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    torch.set_num_threads(1)
    times = []
    for _ in range(repeats + 1):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    with flops.FlopCount() as counter:
        (eager_step or step)()
    with flops.KernelRecorder() as recorder:
        (eager_step or step)()
    return {"times": times, "flops": counter.flops, "floor_s": recorder.floor_seconds(),
            "student_params": student_params, "teacher_params": teacher_params}


# ---------------------------------------------------------------- the driver
def _run_worker(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, __file__, *args, "--json", str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, help="checkout of dm-medvedev/EfficientDistillation")
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--steps", default="8,32", help="T values, comma-separated")
    ap.add_argument("--methods", default="unrolled,implicit,matching")
    ap.add_argument("--repeats", type=int, default=3, help="timed meta-steps per worker")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tag", default="gtn-reference")
    ap.add_argument("--report", action="store_true",
                    help="only rebuild OUT/TAG.md from OUT/TAG.json")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("reference", "gtnkit", "gtnkit-compiled"))
    ap.add_argument("--method")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not a.data_root and not a.report:
        ap.error("no data root: pass --data-root or set GTNKIT_DATA")
    if a.worker:
        t = int(a.steps)
        if a.worker == "reference":
            res = reference_worker(a.reference, a.method, t, a.repeats, a.data_root)
        else:
            res = gtnkit_worker(a.method, t, a.repeats, a.data_root,
                                a.worker == "gtnkit-compiled")
        a.json.write_text(json.dumps(res))
        return 0
    sys.path.insert(0, str(REPO))
    from distill.store import atomic_write_json, atomic_write_text

    if a.report:  # rebuild the tables from the JSON's per-worker times
        saved = json.loads((a.out / f"{a.tag}.json").read_text())
        _write(a.out, a.tag, saved["meta"], _summarise(saved["rows"]),
               atomic_write_json, atomic_write_text)
        return 0
    if a.reference is None or not (a.reference / "my_experiments" / "learning_loop.py").exists():
        ap.error("--reference must be a checkout of dm-medvedev/EfficientDistillation")
    steps = [int(s) for s in a.steps.split(",")]
    methods = [m.strip() for m in a.methods.split(",")]
    programs: list[tuple[str, str, str]] = []  # (worker, method, row method)
    for m in methods:
        programs.append(("reference", m, m))
        for gm in (m, "implicit-s1") if m == "implicit" else (m,):
            programs += [("gtnkit", gm, m), ("gtnkit-compiled", gm, m)]
    results: dict[tuple, dict] = {}
    for t in steps:
        for _ in range(a.rounds):
            for worker, wm, _m in programs:
                res = _run_worker(["--worker", worker, "--method", wm, "--steps", str(t),
                                   "--repeats", str(a.repeats), "--data-root", a.data_root,
                                   *(["--reference", str(a.reference)] if a.reference else [])],
                                  a.threads)
                # every worker's own times, its first step (warm-up, compilation) included
                r = results.setdefault((t, worker, wm), {**res, "times": None, "rounds": []})
                r["rounds"].append(res["times"])
                print(f"T={t} {worker} {wm}: {[round(x, 3) for x in res['times']]}",
                      flush=True)
    rows = [{"T": t, "program": worker, "method": wm, "reference_method": m,
             "what": ROWS["reference" if worker == "reference" else "gtnkit"][wm],
             "cpu_s_rounds": results[(t, worker, wm)]["rounds"],
             "gflop": results[(t, worker, wm)]["flops"] / 1e9,
             "kernel_floor_s": results[(t, worker, wm)]["floor_s"],
             "student_params": results[(t, worker, wm)]["student_params"],
             "teacher_params": results[(t, worker, wm)]["teacher_params"]}
            for t in steps for worker, wm, m in programs]
    cmd = (f"OMP_NUM_THREADS={a.threads} python bench/gtn_reference.py --reference REF "
           f"--data-root ROOT --steps {a.steps} --methods {a.methods} --repeats {a.repeats} "
           f"--rounds {a.rounds}")
    meta = {"command": cmd, "threads": a.threads, "cpu": _cpu_name(), "repeats": a.repeats,
            "rounds": a.rounds,
            "setting": {"batch": BATCH, "generator": [NOISE, FC, CHANNELS],
                        "student_width": WIDTH,
                        "inner_lr": INNER_LR, "inner_momentum": INNER_MOMENTUM,
                        "real_batch": REAL_BATCH, "real_per_class": REAL_PER_CLASS,
                        "neumann_terms": NEUMANN, "neumann_alpha": ALPHA}}
    a.out.mkdir(parents=True, exist_ok=True)
    _write(a.out, a.tag, meta, _summarise(rows), atomic_write_json, atomic_write_text)
    return 0


def _summarise(rows: list[dict]) -> list[dict]:
    """Each row's median CPU s over every round's steps after the first (the warm-up), and
    the reference's median over this row's."""
    for r in rows:
        r["cpu_s"] = statistics.median([x for times in r["cpu_s_rounds"] for x in times[1:]])
    by = {(r["T"], r["program"], r["method"]): r for r in rows}
    for r in rows:
        r["reference_over"] = by[(r["T"], "reference", r["reference_method"])]["cpu_s"] \
            / r["cpu_s"]
    return rows


def _write(out: Path, tag: str, meta: dict, rows: list[dict], write_json: Any,
           write_text: Any) -> None:
    write_json(out / f"{tag}.json", {"meta": meta, "rows": rows})
    lines = [
        "# GTN meta-steps: gtnkit against the AIST 2021 authors' code, side by side", "",
        f"Command: `{meta['command']}` (REF: a checkout of "
        "github.com/dm-medvedev/EfficientDistillation, outside this repository). CPU: "
        f"{meta['cpu']}.", "",
        f"MNIST; {BATCH} generated images per inner step from fresh noise; student DC's "
        f"ConvNet of width {WIDTH} (depth 3, instance norm, average pooling) at lr "
        f"{INNER_LR}, momentum {INNER_MOMENTUM}; real batch {REAL_BATCH} (unrolled, implicit), "
        f"{REAL_PER_CLASS} real images per class (matching), {NEUMANN} Neumann terms. "
        f"{meta['threads']} thread. CPU s: the median of the {meta['repeats']} meta-steps "
        f"after a warm-up (the first, and the compilation) of each of {meta['rounds']} "
        "interleaved worker processes (every step's time: the JSON). GFLOP: convolutions "
        "and matrix products of one meta-step (`bench/flops.py`; the two teachers differ: "
        "the reference's makes 32 x 28 x 28 maps by its FC layer and convolves at 28 px, "
        "gtnkit's convolves at 14 and 28 px from 32 x 7 x 7). Kernel floor: those "
        "convolutions and matrix products replayed alone on their shapes (best of 5 each, "
        "`bench/flops.py`): what torch's kernels need for the step's work with nothing "
        "else; for compiled rows, the eager step's. Compiled: `--compile` (the real-data "
        "side and instance norm's second derivative through torch.compile).", "",
        "| T | program | meta-step | CPU s | GFLOP | kernel floor s | student / teacher "
        "parameters | reference / this |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['program']} | {r['what']} | {r['cpu_s']:.3f} | "
                     f"{r['gflop']:.1f} | {r['kernel_floor_s']:.3f} | "
                     f"{r['student_params']:,} / {r['teacher_params']:,} | "
                     f"{r['reference_over']:.2f}x |")
    write_text(out / f"{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
