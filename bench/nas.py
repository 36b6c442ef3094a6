"""Architecture-search proxy benchmark: how well does a short training on GTN data, a
condensed set, a coreset, a random real subset or a few real steps keep the ranking of
longer real training? MNIST at smoke / short, CIFAR-10 at paper.

The bench makes its own GTN (``gtn.train.train_gtn``, unrolled, small generator) and DM
condensed set (``distill.condense.condense``) on the training images outside the search's
validation split (or takes ``--gtn`` / ``--dc`` runs), then runs :func:`gtn.nas.run_search`
with every proxy. Ground truth and proxy results are cached one file per candidate under
``OUT/ckpt/nas-cache`` (written as each finishes), the generator and condensed set under
``OUT/ckpt/nas-<budget>``: a killed run continues where it stopped when run again with
``--resume`` (without it the GTN and DM runs start over; cached candidates are reused either
way, since their keys hold the exact data and schedule).

The search runs ``--draws K`` independent draws of candidates (draw d sampled with seed
``--seed`` + d; students and proxy sets seeded by ``--seed`` alone, so a candidate drawn twice is
trained once) and writes the results after every draw: per-draw, mean and pooled rank
correlations, how often each proxy ranks first, and the paired, Holm-adjusted comparison of
the proxies (:func:`gtn.nas.compare_proxies`).

A better generator: ``--gtn RUN`` takes a saved one (a ``gtnkit gtn train`` folder or its
generator.pt); ``--gtn-set KEY=VALUE`` (repeatable) changes the bench's own GTN recipe
(fields of :class:`gtn.train.GTNConfig`, e.g. ``--gtn-set meta_iterations=400``). The proxy
caches are keyed by the generated data, so only the GTN proxies are retrained.

    python bench/nas.py --budget smoke    # a minute: proves the path
    python bench/nas.py --budget short --workers 2   # the README tables (2-core CPU)
    python bench/nas.py --budget short --executor ray --ray-address auto   # on a Ray cluster
    python bench/nas.py --budget paper    # CIFAR-10, every family (wants a GPU)

Published (Such et al., ICML 2020, via DESIGN.md): as a NAS proxy, the GTN's Spearman
correlation with true accuracy is 0.56 on the top half of the architectures, at ~9x fewer
steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import add_executor_options, executor_config

from distill.condense import condense, condense_config
from distill.data import load_dataset
from distill.devices import resolve_device
from distill.store import atomic_write_json, atomic_write_text, save_set
from gtn.generator import GeneratorConfig
from gtn.nas import (
    NAS_BUDGETS,
    draws_markdown,
    nas_split,
    parse_proxy,
    plot_scatter,
    report_markdown,
    resolve_proxy,
    run_search,
)
from gtn.train import GTNConfig, recipe_config, save_generator, train_gtn


@dataclass(frozen=True)
class Plan:
    dataset: str
    n_candidates: int
    gtn: GTNConfig            # its ``validation`` is set to the search's below
    dc_ipc: int
    dc_iterations: int
    dc_model: str
    dc_real_batch: int
    draws: int = 3


PLANS = {
    "smoke": Plan("mnist", 4, GTNConfig(
        inner_steps=2, batch_size=20, student="convnet:width=4,depth=1", meta_iterations=2,
        real_batch=20, generator=GeneratorConfig(noise_dim=8, width_fc=16, width_conv=8)),
        dc_ipc=2, dc_iterations=2, dc_model="convnet:width=4,depth=1", dc_real_batch=8,
        draws=2),
    "short": Plan("mnist", 48, recipe_config(
        "unrolled", inner_steps=8, batch_size=64, student="convnet:width=16,depth=2",
        width_choices=(8, 16, 32), meta_iterations=400,
        generator=GeneratorConfig(noise_dim=32, width_fc=128, width_conv=16)),
        dc_ipc=10, dc_iterations=500, dc_model="convnet:width=16,depth=2", dc_real_batch=64),
    "paper": Plan("cifar10", 50, GTNConfig(
        inner_steps=32, batch_size=128, student="convnet", width_choices=(32, 64, 128),
        meta_iterations=2000, real_batch=128), dc_ipc=50, dc_iterations=20000,
        dc_model="convnet", dc_real_batch=256),
}


def gtn_overrides(config: GTNConfig, items: list[str]) -> GTNConfig:
    """``config`` with ``KEY=VALUE`` fields replaced (values as Python literals, else text)."""
    import ast
    from dataclasses import fields, replace

    from gtn.config import FLAT

    names = {f.name for f in fields(config)} | set(FLAT)  # flat names: meta_iterations, ...
    changes: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise SystemExit(f"--gtn-set {item!r}: want KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(names))}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        changes[key] = tuple(value) if isinstance(value, list) else value
    try:
        return replace(config, **changes)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--gtn-set: {err}") from None


def make_gtn(train, plan: Plan, validation: int, folder: Path, seed: int, device, resume: bool,
             log) -> tuple[Path, dict]:
    """Train (or, with resume, reuse) the bench's generator; returns its path and record."""
    from dataclasses import replace

    path = folder / "generator.pt"
    config = replace(plan.gtn, validation=validation)
    if resume and path.exists():
        log(f"reusing {path}")
        return path, {"reused": True, "config": config.as_dict()}
    start = time.perf_counter()
    teacher, meta, _ = train_gtn(train, config, seed=seed, device=device,
                                 checkpoint=folder / "gtn-checkpoint.pt",
                                 resume=resume and (folder / "gtn-checkpoint.pt").exists())
    save_generator(path, teacher, config)
    seconds = time.perf_counter() - start
    log(f"GTN: {config.meta_iterations} meta-iterations in {seconds:.0f} s -> {path}")
    return path, {"seconds": seconds, "meta_iterations": meta.iterations,
                  "seconds_per_meta_step": meta.seconds_per_iteration,
                  "config": config.as_dict()}


def make_dc(fit, plan: Plan, folder: Path, seed: int, device, resume: bool, log
            ) -> tuple[Path, dict]:
    """DM-condense the search's fit split (never its validation images)."""
    path = folder / "dm" / "set.pt"
    if resume and path.exists():
        log(f"reusing {path}")
        return path, {"reused": True}
    config = condense_config("dm", iterations=plan.dc_iterations, real_batch=plan.dc_real_batch,
                             checkpoint_every=max(1, plan.dc_iterations // 4))
    start = time.perf_counter()
    ckpt = folder / "dm-checkpoint.pt"
    teacher, _ = condense(fit, config, plan.dc_ipc, init="real", model=plan.dc_model,
                             seed=seed, device=device, checkpoint=ckpt,
                             resume=resume and ckpt.exists())
    save_set(path, teacher.to_saved({"dataset": fit.info.name, "method": "dm", "seed": seed}))
    seconds = time.perf_counter() - start
    log(f"DM: {plan.dc_iterations} iterations in {seconds:.0f} s -> {path}")
    return path, {"seconds": seconds, "iterations": plan.dc_iterations, "ipc": plan.dc_ipc,
                  "model": plan.dc_model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(PLANS), default="smoke")
    parser.add_argument("--n-candidates", type=int, default=None)
    parser.add_argument("--gtn", default=None, help="Use this generator instead of training one.")
    parser.add_argument("--gtn-set", action="append", default=[], metavar="KEY=VALUE",
                        help="Change a field of the bench's GTN recipe (repeatable).")
    parser.add_argument("--draws", type=int, default=None,
                        help="Independent draws of candidates (default: the plan's).")
    parser.add_argument("--dc", default=None, help="Use this condensed set instead.")
    parser.add_argument("--coreset", default="herding", help="Selection rule of the coreset.")
    add_executor_options(parser, "students")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    executor = executor_config(args)
    plan, budget = PLANS[args.budget], NAS_BUDGETS[args.budget]
    if args.gtn_set:
        from dataclasses import replace

        plan = replace(plan, gtn=gtn_overrides(plan.gtn, args.gtn_set))
    if args.draws is not None and args.draws < 1:
        raise SystemExit(f"--draws must be >= 1, got {args.draws}")
    device = resolve_device(args.device)
    out = Path(args.out)
    folder = out / "ckpt" / f"nas-{args.budget}"
    if not args.resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = load_dataset(plan.dataset, "train", root=args.data_root)
    fit, val = nas_split(train, budget)
    made: dict = {}
    gtn_path = args.gtn
    if gtn_path is None:
        gtn_path, made["gtn"] = make_gtn(train.to(device), plan, len(val), folder, args.seed,
                                         device, args.resume, print)
    dc_path = args.dc
    if dc_path is None:
        dc_path, made["dc"] = make_dc(fit.to(device), plan, folder, args.seed, device,
                                      args.resume, print)
    specs = [parse_proxy(p) for p in (f"gtn:{gtn_path}", f"gtn-steps:{gtn_path}",
                                      f"dc:{dc_path}",
                                      f"coreset:{args.coreset}", "real-subset", "real-steps")]
    proxies = [(s, resolve_proxy(s, plan.dataset)) for s in specs]
    names = {f"gtn:{gtn_path}": "gtn", f"gtn-steps:{gtn_path}": "gtn-steps",
             f"dc:{dc_path}": "dc (dm)"}
    draws = args.draws or plan.draws

    def write(report: dict, final: bool) -> None:
        """Write the JSON and Markdown of the draws so far (short names in the tables: the
        paths are in the JSON), and at the end the scatter plot."""
        report = rename(report, names)
        report["made"] = made
        report["wall_seconds"] = time.perf_counter() - started
        report["torch"] = torch.__version__
        report["complete"] = final
        report["command"] = " ".join(["python", "bench/nas.py", *(argv if argv is not None
                                                                  else sys.argv[1:])])
        done = len(report["draws"])
        md = [f"# NAS proxy benchmark, budget `{args.budget}`", ""]
        if not final:
            md += [f"**Partial: {done} of {draws} draws done** (rerun the same command with "
                   f"`--resume` to continue).", ""]
        md += ["## Pooled over every candidate", "", report_markdown(report).rstrip(), "",
               draws_markdown(report).rstrip(), ""]
        if made.get("gtn"):
            g = made["gtn"]
            cfg = g["config"]
            md.append(f"GTN: unrolled, T = {cfg['inner_steps']} x {cfg['batch_size']} images, "
                      f"curriculum {cfg['curriculum']}, {cfg['meta_iterations']} "
                      f"meta-iterations, meta-lr {cfg['meta_lr']:g} ({cfg['meta_schedule']}), "
                      f"real batch {cfg['real_batch']}, intermediate losses every "
                      f"{cfg['intermediate_every'] or 'never'}, student widths "
                      f"{'/'.join(map(str, cfg['width_choices'] or ())) or 'fixed'}"
                      + (f", {g['seconds']:.0f} s" if "seconds" in g else " (reused)") + ".")
        else:
            md.append(f"GTN: the generator {gtn_path}.")
        if made.get("dc"):
            d = made["dc"]
            md.append(f"DM condensed set: {plan.dc_ipc} images per class, {plan.dc_iterations} "
                      f"iterations against {plan.dc_model}"
                      + (f", {d['seconds']:.0f} s" if "seconds" in d else " (reused)")
                      + "; condensed from the training images outside the validation split.")
        md += [(f"Coreset: {args.coreset} from {budget.pool_per_class} per class, signals of "
                f"{budget.signal_model} ({budget.signal_epochs} epoch(s))."),
               (f"Device {report['device']}, {report['threads']} thread(s), "
                f"{args.workers or 1} {args.executor} worker(s); whole bench "
                f"{report['wall_seconds'] / 60:.1f} min (this "
                f"invocation; cached students are read, not retrained)."), ""]
        if final and plot_scatter(report, out / f"nas-{args.budget}.png"):
            png = (out / f"nas-{args.budget}.png").resolve()
            repo = Path(__file__).resolve().parents[1]
            md.append(f"Scatter (pooled): "
                      f"`{png.relative_to(repo) if png.is_relative_to(repo) else png}`")
        atomic_write_json(out / f"nas-{args.budget}.json", report)
        atomic_write_text(out / f"nas-{args.budget}.md", "\n".join(md) + "\n")
        print(f"wrote {out / f'nas-{args.budget}.md'} ({done}/{draws} draws)", flush=True)
        if final:
            print("\n".join(md))

    report = run_search(train, proxies, budget, args.n_candidates or plan.n_candidates,
                        seed=args.seed, cache=out / "ckpt" / "nas-cache", executor=executor,
                        device=device, log=lambda s: print(s, flush=True), draws=draws,
                        on_draw=lambda r: write(r, False))
    write(report, True)
    return 0


def rename(report: dict, names: dict[str, str]) -> dict:
    """The report with the proxies' labels shortened by ``names`` everywhere."""
    def short(label: str) -> str:
        return names.get(label, label)

    def keys(d: dict) -> dict:
        return {short(k): v for k, v in d.items()}

    report = dict(report)
    report["proxies"] = {short(k): {**v, "source": k} for k, v in report["proxies"].items()}
    if "winner" in report:
        report["winner"] = short(report["winner"])
    report["candidates"] = [{**c, "proxies": keys(c["proxies"])} for c in report["candidates"]]
    report["draws"] = [{**d, "proxies": keys(d["proxies"]),
                        "winner": short(d["winner"]) if d.get("winner") else None}
                       for d in report.get("draws", [])]
    if "across" in report:
        a = report["across"]
        comp = {}
        for metric, c in a["comparison"].items():
            comp[metric] = {**c, "labels": [short(x) for x in c["labels"]],
                            "estimate": keys(c["estimate"]), "p_best": keys(c["p_best"]),
                            "pairs": [{**q, "a": short(q["a"]), "b": short(q["b"])}
                                      for q in c["pairs"]],
                            "leader": short(c["leader"]) if c["leader"] else None,
                            "winner": short(c["winner"]) if c["winner"] else None,
                            "top_group": [short(x) for x in c["top_group"]]}
        report["across"] = {"across": keys(a["across"]),
                            "first": {m: keys(v) for m, v in a["first"].items()},
                            "comparison": comp}
    if "training" in report:
        t = report["training"]
        report["training"] = {**t, "trained": keys(t["trained"]), "cached": keys(t["cached"])}
    return report


if __name__ == "__main__":
    raise SystemExit(main())
