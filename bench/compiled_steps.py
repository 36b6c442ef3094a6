"""The student's steps without a graph and the generator, compiled or eager: CPU seconds per
GTN meta-step with ``--compile`` (``distill.inner.compiled_scoring``) where the steps that need
no graph (implicit's T steps, the first-order-tail head, matching's student step, the
recomputing forward pass of unrolled) take the compiled loss and gradient and the generator
runs compiled (``distill.inner.compiled_call``), against the same run with both eager
(``compiled_scoring(steps=False)``: the real-data side and instance norm's second derivative
still compiled). Both in one process, alternating, one thread; the median of
``--repeats`` meta-steps after a warm-up (and the compilations).

Settings: ``mnist-t10`` (bench/metastep.py's: T = 10, batch 32, its student and generator) and
``peer-t8`` (bench/gtn_reference.py's: T = 8, batch 100, DC's width-32 ConvNet, generator
64 / 64 / 32, real batch 128, 256 real images per class for matching, no recipe).

    OMP_NUM_THREADS=1 python bench/compiled_steps.py --data-root $GTNKIT_DATA \\
        --tag compiled-steps       # bench/results/metastep/compiled-steps.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill.allocator import keep_freed_memory  # noqa: E402
from distill.data import load_dataset  # noqa: E402
from distill.inner import compiled_scoring  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.rng import generator as make_generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from distill.strategies import RealSampler, make_strategy  # noqa: E402
from gtn import GeneratorConfig  # noqa: E402
from gtn.train import GTNConfig, make_teacher, recipe_config  # noqa: E402

METASTEP_GENERATOR = GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32)
PEER = {"inner_steps": 8, "batch_size": 100, "curriculum": "none", "student": "convnet:width=32",
        "generator": GeneratorConfig(noise_dim=64, width_fc=64, width_conv=32),
        "inner_lr": 0.02, "inner_momentum": 0.5, "real_batch": 128, "neumann_terms": 3,
        "match_real_per_class": 256}
METHODS = {"implicit recipe": ("implicit", {}), "first-order-tail recipe": ("first-order-tail", {}),
           "matching recipe": ("matching", {}), "unrolled recipe": ("unrolled", {}),
           "unrolled recipe recomputed": ("unrolled", {"recompute": True})}
PEER_METHODS = {"unrolled": ("unrolled", {}),
                "implicit, mixed term from 1 batch": ("implicit", {"mixed_sample": 1}),
                "matching, 256 real images per class": ("matching", {})}
VARIANTS = ("steps compiled", "steps eager")


def config_for(setting: str, name: str) -> GTNConfig:
    if setting == "mnist-t10":
        method, options = METHODS[name]
        return recipe_config(method, inner_steps=10, batch_size=32,
                             student="convnet:width=16,depth=2,first_pad=1",
                             generator=METASTEP_GENERATOR, compile=True, **options)
    method, options = PEER_METHODS[name]
    return recipe_config(method, recipe=False, compile=True, **{**PEER, **options})


def run_cell(setting: str, name: str, repeats: int, data: object) -> dict:
    real = RealSampler(data)  # type: ignore[arg-type]
    cfg = config_for(setting, name)
    info = data.info  # type: ignore[attr-defined]

    def student(gen: torch.Generator) -> torch.nn.Module:
        return build_model(cfg.student, info.channels, info.num_classes, info.im_size,
                           generator=gen)

    base = make_teacher(info, cfg, seed=0)
    runs = {}
    for v in VARIANTS:
        teacher = copy.deepcopy(base)
        meta = cfg.meta_config()
        strategy = make_strategy(meta.strategy, meta.strategy_config)
        opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], 1e-3)
        runs[v] = (teacher, strategy, opt, [])
    for rep in range(repeats + 1):
        for v in VARIANTS:
            teacher, strategy, opt, times = runs[v]
            with compiled_scoring(True, steps=v == "steps compiled"):
                t0 = time.process_time()
                strategy.step(teacher, opt, real, student, make_generator(rep, "steps"))
                dt = time.process_time() - t0
            if rep > 0:
                times.append(dt)
    med = {v: statistics.median(runs[v][3]) for v in VARIANTS}
    row = {"setting": setting, "method": name, **{f"{v}_cpu_s": med[v] for v in VARIANTS},
           **{f"{v}_all": runs[v][3] for v in VARIANTS},
           "ratio": med["steps compiled"] / med["steps eager"]}
    print(f"{setting} {name}: steps compiled {med['steps compiled']:.3f} s, eager "
          f"{med['steps eager']:.3f} s, ratio {row['ratio']:.2f}", flush=True)
    return row


def write(out: Path, tag: str, rows: list[dict], meta: dict) -> None:
    atomic_write_json(out / f"{tag}.json", {"meta": meta, "rows": rows})
    lines = ["# The student's steps without a graph and the generator: compiled against eager, "
             "within `--compile`",
             "", f"Command: `{meta['command']}`", "",
             f"CPU: {meta['cpu']}; {meta['threads']} thread; median CPU s of {meta['repeats']} "
             "meta-steps after a warm-up (and the compilations), the two variants alternating "
             "in one process. Both compile the real-data side and instance norm's second "
             "derivative; *steps compiled* also computes the student's steps that need no graph "
             "(implicit's T steps, the first-order-tail head, matching's student step, the "
             "recomputing forward pass) with the compiled loss and gradient, and runs the "
             "generator compiled. mnist-t10: "
             "bench/metastep.py's setting (T = 10, batch 32, each method's recipe); peer-t8: "
             "bench/gtn_reference.py's (T = 8, batch 100, DC's width-32 ConvNet, no recipe).",
             "", "| setting | method | steps compiled CPU s | steps eager CPU s | "
             "compiled / eager |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {r['steps compiled_cpu_s']:.3f} | "
                     f"{r['steps eager_cpu_s']:.3f} | **{r['ratio']:.2f}** |")
    atomic_write_text(out / f"{tag}.md", "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    labels = [f"{r['setting']}: {r['method']}" for r in rows]
    ax.barh(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("CPU s per meta-step, steps compiled / steps eager (lower: faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, out / f"{tag}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="mnist-t10,peer-t8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "metastep")
    ap.add_argument("--tag", default="compiled-steps")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    data = load_dataset("mnist", "train", root=a.data_root)
    rows = []
    for setting in a.settings.split(","):
        for name in (METHODS if setting == "mnist-t10" else PEER_METHODS):
            rows.append(run_cell(setting, name, a.repeats, data))
    meta = {"command": f"OMP_NUM_THREADS=1 python bench/compiled_steps.py --settings "
                       f"{a.settings} --repeats {a.repeats} --tag {a.tag}",
            "cpu": platform.processor() or platform.machine(), "threads": 1,
            "repeats": a.repeats}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out, a.tag, rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
