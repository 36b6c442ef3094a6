"""Seconds and memory per GTN meta-step: unrolled against the implicit variants, side by side.

For each T, every variant runs the same meta-steps on the same MNIST data in ONE process, in
alternation (variant A step, variant B step, ...), so machine noise falls on all alike; the
figure is CPU seconds of this process per meta-step (``time.process_time``; pin
``OMP_NUM_THREADS``), the median over the timed steps, after a warm-up step. Memory is the peak
of bytes autograd saves (one count per storage) during one meta-step.

    OMP_NUM_THREADS=1 python bench/gtn_speed.py --steps 16,32 --repeats 5
    OMP_NUM_THREADS=1 python bench/gtn_speed.py --steps 8,16,32 --repeats 3 \
        --tag gtn-speed-recipe --variants "unrolled recipe (+ intermediate losses),..."
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill.data import load_dataset  # noqa: E402
from distill.memory import SavedTensorMeter  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.rng import generator as make_generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from distill.strategies import RealSampler, make_strategy  # noqa: E402
from gtn import GeneratorConfig, GTNConfig  # noqa: E402
from gtn.train import make_teacher  # noqa: E402

VARIANTS = {
    "unrolled": dict(method="unrolled"),
    "implicit (all T mixed terms)": dict(method="implicit"),
    "implicit, mixed term from 4 batches": dict(method="implicit", mixed_sample=4),
    "implicit, mixed term from 1 batch": dict(method="implicit", mixed_sample=1),
    "implicit, trajectory (first-order)": dict(method="implicit", mixed_at="trajectory"),
    "implicit, trajectory from 4 batches": dict(method="implicit", mixed_at="trajectory",
                                                mixed_sample=4),
    # the training recipes (gtn.train.RECIPES) and the exact tail
    "unrolled recipe (+ intermediate losses)": dict(method="unrolled", intermediate_every=1),
    "implicit recipe (trajectory + step sizes)": dict(method="implicit", mixed_at="trajectory",
                                                      step_size_grad=True),
    "implicit recipe + tail 2": dict(method="implicit", mixed_at="trajectory",
                                     step_size_grad=True, unroll_tail=2),
    "implicit recipe + tail 5": dict(method="implicit", mixed_at="trajectory",
                                     step_size_grad=True, unroll_tail=5),
    "implicit recipe + tail 10": dict(method="implicit", mixed_at="trajectory",
                                      step_size_grad=True, unroll_tail=10),
    "implicit recipe + tail 5 (head: 4 batches)": dict(
        method="implicit", mixed_at="trajectory", step_size_grad=True, unroll_tail=5,
        mixed_sample=4),
    "matching (DC rounds on fresh noise)": dict(method="matching"),
    "matching along the curriculum": dict(method="matching", match_curriculum=True),
    "implicit recipe + tail 2 (head: 4 batches)": dict(
        method="implicit", mixed_at="trajectory", step_size_grad=True, unroll_tail=2,
        mixed_sample=4),
    # unrolled backprop's gradient at flat memory: the steps rebuilt one at a time
    "unrolled recomputed": dict(method="unrolled", recompute=True),
    "unrolled recipe recomputed": dict(method="unrolled", intermediate_every=1,
                                       recompute=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gtn-speed"))
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of the variants ('unrolled' always runs: "
                         "the ratios are to it)")
    ap.add_argument("--tag", default="gtn-speed", help="output file name stem")
    ap.add_argument("--generator", choices=["small", "paper"], default="small",
                    help="small: noise 64, FC 256, 32 channels; paper: Such et al.'s "
                         "(noise 128, FC 1024, 128 channels)")
    args = ap.parse_args()
    chosen = ["unrolled", *[v for v in (args.variants or "").split(",") if v and
                            v != "unrolled"]] if args.variants else list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    data = load_dataset("mnist", "train", root=args.data_root)
    real = RealSampler(data)
    base = GTNConfig(batch_size=args.batch_size, student="convnet:width=16,depth=2,first_pad=1",
                     generator=GeneratorConfig() if args.generator == "paper" else
                     GeneratorConfig(noise_dim=64, width_fc=256, width_conv=32),
                     real_batch=512, meta_lr=5e-3)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        runs = {}
        for name in chosen:
            cfg = replace(base, inner_steps=steps, **VARIANTS[name])
            teacher = make_teacher(data.info, cfg, seed=0)
            strategy = make_strategy(cfg.method, cfg.meta_config().strategy_config)
            opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], 1e-3)
            runs[name] = (cfg, teacher, strategy, opt, [], [0])

        def student(gen: torch.Generator, cfg: GTNConfig = base) -> torch.nn.Module:
            return build_model(cfg.student, data.info.channels, data.info.num_classes,
                               data.info.im_size, generator=gen)

        for rep in range(args.repeats + 1):
            for _name, (_cfg, teacher, strategy, opt, times, peak) in runs.items():
                gen = make_generator(rep, "speed")
                t0 = time.process_time()
                with SavedTensorMeter() as meter:
                    strategy.step(teacher, opt, real, student, gen)
                if rep > 0:  # the first is a warm-up
                    times.append(time.process_time() - t0)
                peak[0] = max(peak[0], meter.peak)
        ref = statistics.median(runs["unrolled"][4])
        for name, (_, _, _, _, times, peak) in runs.items():
            med = statistics.median(times)
            rows.append({"T": steps, "variant": name, "cpu_s_per_step": med,
                         "cpu_s_all": times, "ratio_to_unrolled": med / ref,
                         "saved_peak_mib": peak[0] / 2**20})
            print(f"T={steps} {name}: {med:.2f} CPU s ({med / ref:.2f}x unrolled), "
                  f"{peak[0] / 2**20:.1f} MiB", flush=True)
    out = Path(args.out)
    meta = {"threads": torch.get_num_threads(), "batch": args.batch_size,
            "repeats": args.repeats, "student": base.student,
            "generator": "noise 128, FC 1024, 128 channels (the paper's)"
            if args.generator == "paper" else "noise 64, FC 256, 32 channels",
            "real_batch": base.real_batch}
    atomic_write_json(out / f"{args.tag}.json", {"setting": meta, "rows": rows})
    lines = ["# Seconds and memory per GTN meta-step (MNIST, side by side in one process)", "",
             f"CPU seconds of the process per meta-step (median of {args.repeats}, after a "
             f"warm-up), {meta['threads']} thread(s); batch {args.batch_size}, student "
             f"{base.student}, generator {meta['generator']}, real batch 512. Memory: peak "
             "bytes autograd saves in a meta-step.", "",
             "| T | variant | CPU s / meta-step | ÷ unrolled | saved MiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['variant']} | {r['cpu_s_per_step']:.2f} | "
                     f"{r['ratio_to_unrolled']:.2f} | {r['saved_peak_mib']:.1f} |")
    atomic_write_text(out / f"{args.tag}.md", "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in chosen:
        sel = [r for r in rows if r["variant"] == name]
        axes[0].plot([r["T"] for r in sel], [r["cpu_s_per_step"] for r in sel], "o-", label=name)
        axes[1].plot([r["T"] for r in sel], [r["saved_peak_mib"] for r in sel], "o-", label=name)
    axes[0].set(xlabel="T", ylabel="CPU s / meta-step")
    axes[1].set(xlabel="T", ylabel="saved MiB", yscale="log")
    axes[0].legend(fontsize=7)
    save_figure(fig, out / f"{args.tag}.png")


if __name__ == "__main__":
    main()
