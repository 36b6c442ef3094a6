"""gtn.nas's command: ``nas``, added to the root group by ``cli.py``; it maps its options to
:func:`gtn.nas.run_search` and writes the report (plumbing: :mod:`distill.commandline`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import click

from distill.commandline import (
    TableChoice,
    check_writable,
    claim_out,
    data_options,
    datasets,
    executor_config,
    executor_options,
    handle_errors,
    progress,
    register_usage_errors,
    run_options,
    write_run,
)
from distill.data import get_info
from distill.devices import resolve_device
from distill.executor import make_executor
from distill.store import atomic_write_text

from ..generator import GeneratorError
from . import (
    NAS_BUDGETS,
    draws_markdown,
    parse_proxies,
    plot_scatter,
    report_markdown,
    resolve_proxy,
    run_search,
)
from .errors import NASError
from .proxies import proxy_forms

log = logging.getLogger("gtnkit")

# The readers of data sets, saved sets and generators are imported when a command runs,
# so that a test (or an application embedding the commands) can stand in for them.

__all__ = ["nas"]

register_usage_errors(GeneratorError, NASError)


@click.command()
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--n-candidates", type=click.IntRange(min=2), default=12, show_default=True,
              help="Architectures sampled from the zoo (reproducible by --seed).")
@click.option("--proxy", "proxies", multiple=True, required=True,
              metavar=proxy_forms("|"),
              help="A proxy to rank the candidates with, repeatable. RUN: a `gtnkit gtn train`"
                   " / `gtnkit distill` output folder or its generator / set file. gtn: the "
                   "generator's curriculum as a fixed set; gtn-steps: its own protocol (T "
                   "steps at its learned lrs and momentum).")
@click.option("--budget", type=TableChoice(lambda: NAS_BUDGETS), default="smoke", show_default=True,
              help="Ground-truth and proxy training budget.")
@click.option("--families", default=None,
              help="Comma-separated model families to sample (default: the budget's), from "
                   "convnet, mlp, lenet, alexnet, vgg11, resnet18.")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Largest candidate, in parameters (default: the budget's).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="k of the top-k overlap (default: a quarter of the candidates).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder of finished per-candidate results, reused by any later run "
                   "(default: OUT/cache). A killed run resumes by running it again.")
@click.option("--draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent draws of N candidates (draw d sampled with seed SEED + d; "
                   "students seeded by SEED alone, so a candidate in two draws is trained "
                   "once): per-draw, mean and pooled figures and a paired comparison of the "
                   "proxies.")
@executor_options
@data_options
@run_options
@click.pass_context
@handle_errors
def nas(ctx, dataset, n_candidates, proxies, budget, families, max_params, top_k, cache, draws,
        executor, workers, ray_address, cpus_per_item, gpus_per_item, data_root, download, out,
        seed, device, force) -> None:
    """Rank N sampled architectures by short proxy trainings and compare with the ranking of
    longer real training (validation split of the training set): Spearman / Kendall with
    bootstrap intervals (all and top half), top-k overlap, picked accuracy, speed-up, and a
    paired, Holm-adjusted comparison of the proxies (a winner only where it is significant).

    Writes OUT/nas.md, OUT/nas.png (proxy vs true accuracy), config.json and results.json.
    """
    from distill.data import load_dataset

    out_dir = claim_out(out, force)
    if cache:
        check_writable(cache, "--cache")
    info = get_info(dataset)
    specs = parse_proxies(proxies)
    labels = [s.label for s in specs]
    plan = NAS_BUDGETS[budget]
    space = plan.search_space(families, max_params)
    resolved = [(s, resolve_proxy(s, info.name)) for s in specs]
    dev = resolve_device(device)
    sweep = executor_config(ctx, executor, workers, ray_address, cpus_per_item, gpus_per_item)
    with make_executor(sweep) as ex:  # before the data: a missing Ray is one line up front
        data = load_dataset(info.name, "train", root=data_root, download=download)
        report = run_search(data, resolved, plan, n_candidates, seed=seed,
                            cache=Path(cache) if cache else out_dir / "cache", device=dev,
                            space=space, top_k=top_k, progress=progress(ctx), log=log.info,
                            draws=draws, executor=ex)
    text = report_markdown(report) + "\n" + draws_markdown(report)
    atomic_write_text(out_dir / "nas.md", text)
    plotted = plot_scatter(report, out_dir / "nas.png")
    if not plotted:
        log.warning("matplotlib is not installed: no nas.png (pip install matplotlib)")
    report["png"] = str(out_dir / "nas.png") if plotted else None
    write_run(out_dir, "nas", {"dataset": info.name, "n_candidates": n_candidates,
                               "proxies": labels, "budget": budget, "space": asdict(space),
                               "top_k": top_k, "executor": asdict(sweep), "seed": seed,
                               "draws": draws,
                               "device": str(dev)}, report)
    click.echo(text, nl=False)
