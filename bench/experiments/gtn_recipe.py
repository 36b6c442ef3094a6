"""GTN recipe ablation: what each ingredient of the published training recipe is worth.

Every run trains a generator on MNIST (training split minus a 10 000-image validation part)
for ``--iterations`` meta-iterations, scores one student on the validation part every 100
(the GTN few-step protocol: T steps on the learned curriculum at the learned lr and momentum)
and three students on the test set at the end. Runs are work items of :mod:`distill.executor`
(``--executor local|ray``, ``--workers``);
each writes ``OUT/cells/NAME.json`` as it goes, so a killed sweep keeps what it had and
``--report`` rebuilds the tables from whatever finished.

    python bench/experiments/gtn_recipe.py --runs u-base,u-rec --workers 2   # some runs
    python bench/experiments/gtn_recipe.py --report   # md + json + png

Setting (Done-means of the GTN-quality work): T = 10 inner steps of batch 32, full learned
curriculum, generator noise 64 / FC 256 / 32 channels unless ``gen``, student
``convnet:width=16,depth=2`` unless ``w32``; and T = 32 with batch 128 and the paper's
generator for the ``*32*`` runs. Published: GoodAI's re-implementation ~94 % at (T = 10,
batch 32, 1000 meta-iterations); Such et al. 98.9 % at (T = 32, batch 128, paper budget).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ (after the packages)

import torch  # noqa: E402
from sweep import add_executor_options, executor_config  # noqa: E402

from distill.data import load_dataset  # noqa: E402
from distill.executor import SweepError, WorkItem, run_items  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from gtn import GeneratorConfig, GTNConfig, few_step_accuracy, train_gtn  # noqa: E402
from gtn.train import split_validation  # noqa: E402

SMALL = GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32)
PAPER = GeneratorConfig()
S16 = "convnet:width=16,depth=2,first_pad=1"  # the 28-px network these results were measured with
T10 = dict(inner_steps=10, batch_size=32, curriculum="full", student=S16, generator=SMALL,
           meta_iterations=1000, eval_every=100, checkpoint_every=10**6)
T32 = dict(T10, inner_steps=32, batch_size=128, generator=PAPER, meta_lr=5e-3,
           meta_schedule="cosine", real_batch=512)
LR5C = dict(meta_lr=5e-3, meta_schedule="cosine")

# name -> (what it tests, GTNConfig keywords)
RUNS: dict[str, tuple[str, dict]] = {
    "u-base": ("unrolled, gtnkit defaults (meta-lr 1e-3 constant, real batch 128)",
               dict(T10, method="unrolled")),
    "u-lr5c": ("+ meta-lr 5e-3, cosine to 10 %", dict(T10, method="unrolled", **LR5C)),
    "u-lr20c": ("+ meta-lr 2e-2 (official), cosine to 10 %",
                dict(T10, method="unrolled", meta_lr=2e-2, meta_schedule="cosine")),
    "u-lr5c-clip": ("meta-lr 5e-3 cosine + clip 1.0",
                    dict(T10, method="unrolled", grad_clip=1.0, **LR5C)),
    "u-lr5c-int": ("meta-lr 5e-3 cosine + intermediate losses (every step)",
                   dict(T10, method="unrolled", intermediate_every=1, **LR5C)),
    "u-lr5c-gen": ("meta-lr 5e-3 cosine + paper generator (128 / 1024 / 128)",
                   dict(T10, method="unrolled", generator=PAPER, **LR5C)),
    "u-lr5c-rb": ("meta-lr 5e-3 cosine + real batch 512 (recommended)",
                  dict(T10, method="unrolled", real_batch=512, **LR5C)),
    "u-rec20": ("recommended with meta-lr 2e-2",
                dict(T10, method="unrolled", real_batch=512, meta_lr=2e-2,
                     meta_schedule="cosine")),
    "u-rec-int": ("recommended + intermediate losses",
                  dict(T10, method="unrolled", real_batch=512, intermediate_every=1, **LR5C)),
    "u-all": ("recommended + intermediate losses + paper generator",
              dict(T10, method="unrolled", real_batch=512, intermediate_every=1,
                   generator=PAPER, **LR5C)),
    "u-lr5c-w32": ("meta-lr 5e-3 cosine, width-32 student (another student)",
                   dict(T10, method="unrolled", student="convnet:width=32,depth=2", **LR5C)),
    "i-base": ("implicit, gtnkit defaults", dict(T10, method="implicit")),
    "i-lr5c-rb": ("implicit, recommended recipe",
                  dict(T10, method="implicit", real_batch=512, **LR5C)),
    "i-all": ("implicit, recommended + paper generator",
              dict(T10, method="implicit", real_batch=512, generator=PAPER, **LR5C)),
    "i-ssg": ("implicit, recommended + learned step sizes (first-order hypergradient)",
              dict(T10, method="implicit", real_batch=512, step_size_grad=True, **LR5C)),
    "i-hi": ("implicit, recommended, fixed lr 0.1 / momentum 0.8 (unrolled's learned scale)",
             dict(T10, method="implicit", real_batch=512, inner_lr=0.1, inner_momentum=0.8,
                  **LR5C)),
    "i-hi-ssg": ("implicit, lr 0.1 / momentum 0.8 start + learned step sizes",
                 dict(T10, method="implicit", real_batch=512, inner_lr=0.1, inner_momentum=0.8,
                      step_size_grad=True, **LR5C)),
    "i-hi-n20": ("implicit, lr 0.1 / momentum 0.8, 20 Neumann terms",
                 dict(T10, method="implicit", real_batch=512, inner_lr=0.1, inner_momentum=0.8,
                      neumann_terms=20, **LR5C)),
    "i-traj": ("implicit, recommended, first-order trajectory mixed term (no Hessian)",
               dict(T10, method="implicit", real_batch=512, mixed_at="trajectory", **LR5C)),
    "i-traj-ssg": ("implicit, recommended, trajectory mixed term + learned step sizes",
                   dict(T10, method="implicit", real_batch=512, mixed_at="trajectory",
                        step_size_grad=True, **LR5C)),
    "i-ms2": ("implicit, recommended, mixed term from 2 of the 10 batches",
              dict(T10, method="implicit", real_batch=512, mixed_sample=2, **LR5C)),
    "m-base": ("matching, gtnkit defaults", dict(T10, method="matching")),
    "m-lr5c": ("matching, meta-lr 5e-3 cosine", dict(T10, method="matching", **LR5C)),
    "m-hi": ("matching, meta-lr 5e-3 cosine, lr 0.1 / momentum 0.8",
             dict(T10, method="matching", inner_lr=0.1, inner_momentum=0.8, **LR5C)),
    "u32-rec": ("T = 32, batch 128, paper generator: unrolled, recommended",
                dict(T32, method="unrolled")),
    "u32-all": ("T = 32: unrolled, recommended + intermediate losses",
                dict(T32, method="unrolled", intermediate_every=1)),
    "i32-all": ("T = 32: implicit, recommended", dict(T32, method="implicit")),
    "i32-hi-ssg": ("T = 32: implicit, lr 0.1 / momentum 0.8 + learned step sizes",
                   dict(T32, method="implicit", inner_lr=0.1, inner_momentum=0.8,
                        step_size_grad=True)),
}


def run_one(name: str, root: str | None, out: Path, device: str, iterations: int | None,
            seed: int) -> None:
    """Train one run, writing ``out/cells/NAME.json`` after every evaluation."""
    kw = dict(RUNS[name][1])
    if iterations:
        kw.update(meta_iterations=iterations, eval_every=max(1, min(100, iterations)))
    config = GTNConfig(**kw)
    dev = torch.device(device)
    data = load_dataset("mnist", "train", root=root)
    test = load_dataset("mnist", "test", root=root)
    val = split_validation(data, config.validation)[1]
    vx, vy = val.images.to(dev), val.labels.to(dev)
    record: dict = {"name": name, "what": RUNS[name][0], "config": repr(config),
                    "device": str(dev), "seed": seed, "evals": []}
    path = out / "cells" / f"{name}.json"
    start = time.time()

    def periodic(teacher, it: int) -> dict:
        acc = few_step_accuracy(teacher, config.student, vx, vy, seed, 1)[0]
        record["evals"].append({"iteration": it, "validation": acc,
                                "wall_s": time.time() - start,
                                "lr": teacher.lr_tensor().detach().cpu().tolist(),
                                "momentum": float(teacher.momentum_tensor().detach())})
        atomic_write_json(path, record)
        print(name, it, f"{acc:.2f}", flush=True)
        return {"validation_accuracy": acc}

    teacher, meta, _ = train_gtn(data, config, seed=seed, device=dev, evaluate=periodic)
    record["test"] = few_step_accuracy(teacher, config.student, test.images.to(dev),
                                       test.labels.to(dev), seed, 3)
    record["s_per_meta_step"] = meta.seconds_per_iteration
    record["memory"] = meta.memory
    atomic_write_json(path, record)


def report(out: Path) -> None:
    """``gtn-recipe.{json,md,png}`` from every run file under ``out/cells``."""
    runs = {}
    for f in sorted((out / "cells").glob("*.json")):
        r = json.loads(f.read_text())
        runs[r["name"]] = r
    order = [n for n in RUNS if n in runs]
    lines = ["# GTN recipe ablation (MNIST)", "",
             "Validation: one student on 10 000 held-out training images every 100 "
             "meta-iterations; test: 3 students, the GTN few-step protocol. `its` = the "
             "meta-iterations the run reached (a run cut by its time limit has no test score).",
             "", "| run | what | its | validation at 100 / 500 / last | test % (3 students) | "
             "learned lr (min-max) / momentum | device |", "|---|---|---|---|---|---|---|"]
    for n in order:
        r = runs[n]
        ev = r["evals"]
        pick = {e["iteration"]: e["validation"] for e in ev}
        val = " / ".join(f"{pick[i]:.1f}" if i in pick else "-" for i in (100, 500)) + \
            f" / {ev[-1]['validation']:.1f}" if ev else "-"
        test = "-"
        if r.get("test"):
            t = torch.tensor(r["test"], dtype=torch.float64)
            test = f"{float(t.mean()):.2f} ± {float(t.std(unbiased=False)):.2f}"
        lr = ev[-1]["lr"] if ev else [float("nan")]
        steps = f"{min(lr):.3f}-{max(lr):.3f} / {ev[-1]['momentum']:.2f}" if ev else "-"
        lines.append(f"| {n} | {r['what']} | {ev[-1]['iteration'] if ev else 0} | {val} | "
                     f"{test} | {steps} | {r['device']} |")
    atomic_write_text(out / "gtn-recipe.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "gtn-recipe.json", {"runs": [runs[n] for n in order]})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, prefix, title in ((axes[0], ("u-", "i-", "m-"), "T = 10, batch 32"),
                              (axes[1], ("u32", "i32"), "T = 32, batch 128")):
        for n in order:
            if not n.startswith(prefix) or (prefix[0] == "u-" and "32" in n):
                continue
            ev = runs[n]["evals"]
            style = "-" if n.startswith("u") else ("--" if n.startswith("i") else ":")
            ax.plot([e["iteration"] for e in ev], [e["validation"] for e in ev], style,
                    label=n)
        ax.set(title=title, xlabel="meta-iteration", ylabel="validation accuracy %",
               ylim=(20, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / "gtn-recipe.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="", help=f"comma-separated, from: {', '.join(RUNS)}")
    ap.add_argument("--run", default=None, help="Train this one run here (a shard by hand).")
    add_executor_options(ap, "runs")
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"
                                         / "gtn-recipe"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=None, help="override (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="only rebuild the tables")
    args = ap.parse_args()
    out = Path(args.out)
    if args.run:
        run_one(args.run, args.data_root, out, args.device, args.iterations, args.seed)
        return
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    items = [WorkItem(n, run_one, (n, args.data_root, out, args.device, args.iterations,
                                   args.seed)) for n in names]
    try:
        run_items(items, executor_config(args))
    except SweepError as exc:  # the others finished: report them
        print(f"error: {exc}", file=sys.stderr)
    report(out)


if __name__ == "__main__":
    main()
