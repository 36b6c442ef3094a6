"""selection's commands: ``select`` (a coreset) and ``curve`` (accuracy against the fraction of
data kept), added to the root group by ``cli.py``; and the coreset rules as seeds of
``distill --init`` (distill cannot import selection, so they are registered from here).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import torch

from distill.commandline import (
    POSITIVE,
    TableChoice,
    check_writable,
    claim_out,
    data_options,
    datasets,
    finite,
    handle_errors,
    progress,
    register_coreset_init,
    register_usage_errors,
    run_options,
    write_run,
)
from distill.data import ImageSet
from distill.devices import resolve_device
from distill.engine import TrainConfig
from distill.models import parse_model_spec
from distill.progress import Progress
from distill.store import SET_FILES, SavedSet, atomic_write_text, save_figure, save_set

from . import SelectionError, SignalConfig, SignalProvider, available_methods, get_method
from . import select as run_select
from .budget import budget_counts, check_fraction
from .cache import default_cache_root
from .curve import CurveConfig, curve_figure, curve_markdown, run_curve, summarise

log = logging.getLogger("gtnkit")

# The readers of data sets, saved sets and generators are imported when a command runs,
# so that a test (or an application embedding the commands) can stand in for them.

__all__ = ["coreset_init", "curve", "select"]

register_usage_errors(SelectionError)


def coreset_init(data: ImageSet, rule: str, ipc: int, *, seed: int, device: torch.device,
                 progress: Progress | None, model: str | None, epochs: int,
                 pool_per_class: int | None) -> torch.Tensor:
    """The indices of ``rule``'s coreset of ``ipc`` per class: the first images of a synthetic
    set (``distill --init RULE``). ``model``: the signal network (``None``: the default one),
    trained ``epochs`` epochs on ``pool_per_class`` candidates per class."""
    config = SignalConfig.of(model or SignalConfig().model, epochs, pool_per_class)
    return run_select(data, rule, ipc, seed=seed, signal_config=config, device=device,
                      progress=progress).indices


for _rule in available_methods():
    register_coreset_init(_rule, coreset_init)


def _in_cli_terms(check: Callable[..., Any], option: str, *args: Any) -> Any:
    """``check(*args)``, its one-line library error reported against ``option``."""
    try:
        return check(*args)
    except SelectionError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``("space=pixels", "iters=20")`` -> ``{"space": "pixels", "iters": 20}`` (JSON values)."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip().replace("-", "_")] = value
    return options


@click.command()
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--method", required=True, type=TableChoice(available_methods),
              help="Selection rule.")
@click.option("--ipc", type=int, default=None,
              help="Images per class to select (or --fraction).")
@click.option("--fraction", type=finite(),  # its range: selection.budget.check_fraction
              default=None,
              help="Fraction of the training set to select, in (0, 1], class-balanced: "
                   "round(f*N) images shared in proportion to the class sizes "
                   "(largest-remainder rounding), e.g. 0.1.")
@click.option("--order", type=click.Choice(["hardest", "easiest"]), default=None,
              help="Score rules (forgetting, gradnorm, entropy): keep the hardest or the easiest "
                   "examples (Sorscher et al. 2022: easy wins at small budgets, hard at large).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Rule option, repeatable (e.g. space=pixels).")
@click.option("--feature-model", default="convnet:width=16,depth=3", show_default=True,
              help="Network whose training gives embeddings and scores.")
@click.option("--signal-epochs", type=int, default=3, show_default=True,
              help="Epochs of that network on the candidate pool.")
@click.option("--pool-per-class", type=click.IntRange(min=1), default=None,
              help="Draw candidates from this many random images per class (default: all).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Signal cache: signals are stored under a fingerprint of (data, network, "
                   "epochs, seed) and reused. Default: $GTNKIT_CACHE/signals or "
                   "~/.cache/gtnkit/signals.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the signal cache.")
@data_options
@run_options
@click.pass_context
@handle_errors
def select(ctx, dataset, method, ipc, fraction, order, options, feature_model, signal_epochs,
           pool_per_class, cache_dir, no_cache, data_root, download, out, seed, device,
           force) -> None:
    """Select real images of DATASET with a coreset rule (IPC per class or a FRACTION of the
    data); save them as a set.

    Writes OUT/set.safetensors (images, labels; indices and metadata in its card),
    config.json and results.json.
    Rules: random, herding, kcenter, forgetting, gradnorm, entropy, kmeans, dbscan.

    \b
    Cost: every rule but random reads signals of one network trained on the whole training
    set (default: a width-16 ConvNet, 3 epochs). They are cached on disk and reused by every
    later rule, IPC and fraction with the same data, network, epochs and seed; the training
    checkpoints every epoch and resumes after a kill (progress bar with ETA). Measured:
    `select --dataset mnist --method herding --ipc 10` takes 44 s on a quiet 2-core CPU
    from a cold cache (about 85 s of CPU; 4 min wall when four jobs shared the cores) and
    3 s from a warm one (loading and hashing the data, then 0.7 s of herding).
    """
    from distill.data import load_dataset

    if (ipc is None) == (fraction is None):
        raise click.UsageError("give exactly one of --ipc and --fraction")
    if fraction is not None:
        _in_cli_terms(check_fraction, "--fraction", fraction)
    elif ipc < 1:
        raise click.BadParameter(f"ipc must be at least 1, got {ipc}", param_hint="--ipc")
    out_dir = claim_out(out, force)
    rule_options = parse_options(options)
    rule = get_method(method, **rule_options)
    if order is not None:
        if not hasattr(rule, "order"):
            raise click.BadParameter(f"{method} is not a score rule; --order applies to "
                                     f"forgetting, gradnorm and entropy", param_hint="--order")
        rule_options["order"] = order
        rule = get_method(method, **rule_options)
    parse_model_spec(feature_model)
    if signal_epochs < 1:
        raise click.BadParameter("must be >= 1", param_hint="--signal-epochs")
    dev = resolve_device(device)
    signal_config = SignalConfig.of(feature_model, signal_epochs, pool_per_class)
    cache_root = None if no_cache else Path(cache_dir or default_cache_root() / "signals")
    if cache_dir and not no_cache:
        check_writable(cache_dir, "--cache-dir")
    data = load_dataset(dataset, "train", root=data_root, download=download)
    provider = SignalProvider(data, signal_config, seed=seed, device=dev, progress=progress(ctx),
                              cache_root=cache_root)
    budget_counts(data.labels[provider.pool].bincount(minlength=data.info.num_classes),
                  ipc=ipc, fraction=fraction)
    start = time.perf_counter()
    sel = run_select(data, rule, ipc, seed=seed, signals=provider, fraction=fraction)
    seconds = time.perf_counter() - start
    config = {"dataset": data.info.name, "method": method, "ipc": ipc, "fraction": fraction,
              "options": rule_options, "seed": seed, "device": str(dev),
              "signal_config": asdict(signal_config)}
    meta = {"dataset": data.info.name, "method": sel.method, "ipc": ipc, "fraction": fraction,
            "counts": list(sel.counts), "seed": seed, "options": sel.options,
            "indices": sel.indices.tolist(), "kind": "selection", "config": config}
    save_set(out_dir / SET_FILES[0], SavedSet(data.images[sel.indices], sel.labels, meta))
    write_run(out_dir, "select", config, {
        "seconds": seconds, "n_images": len(sel), "counts": list(sel.counts),
        "signal_cache": {"fingerprint": provider.fingerprint, "hit": provider.cache_hit,
                         "epochs_trained": provider.epochs_trained},
        "signal_seconds": provider.seconds, "indices": sel.indices.tolist(),
        "set": str(out_dir / SET_FILES[0])})
    budget = f"{ipc} per class" if ipc is not None else f"fraction {fraction:g}"
    cache = ("" if provider.fingerprint is None else
             " (signals from the cache)" if provider.cache_hit else "")
    click.echo(f"selected {len(sel)} images ({budget}) of {data.info.name} with "
               f"{sel.method} in {seconds:.1f} s{cache} -> {out_dir / SET_FILES[0]}")


@click.command()
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--fractions", default="0.01,0.05,0.1,0.3,1", show_default=True,
              help="Comma-separated fractions of the training set, each in (0, 1]; the whole "
                   "set is always the reference.")
@click.option("--methods", default="random,herding,kcenter,kmeans,dbscan,forgetting:hardest,"
                                   "gradnorm:hardest,gradnorm:easiest,entropy:hardest",
              show_default=True,
              help="Comma-separated rules; score rules take :hardest or :easiest.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Students (and selection draws) per cell: seeds SEED, SEED+1, ...")
@click.option("--model", default="lenet", show_default=True,
              help="The student every cell trains (zoo spec).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Student epochs, the same for every fraction (fewer steps on less data).")
@click.option("--lr", type=POSITIVE, default=0.01, show_default=True,
              help="Student SGD learning rate (x0.1 at half of the epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Student minibatch size.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None,
              help="Score on a fixed test subset of this size (default: the whole test set).")
@click.option("--feature-model", default="convnet:width=16,depth=3", show_default=True,
              help="Signal network (trained once, cached, shared by every rule).")
@click.option("--signal-epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs of the signal network on the training set.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Signal cache (default: $GTNKIT_CACHE/signals or ~/.cache/gtnkit/signals).")
@click.option("--resume", is_flag=True, help="Keep the finished cells of OUT/curve.json.")
@data_options
@run_options
@click.pass_context
@handle_errors
def curve(ctx, dataset, fractions, methods, seeds, model, epochs, lr, batch_size, test_limit,
          feature_model, signal_epochs, cache_dir, resume, data_root, download, out, seed,
          device, force) -> None:
    """The data-budget curve: test accuracy and training time of a student trained on a
    selected fraction of DATASET, per rule and fraction, against the whole set.

    Every cell trains a fresh student with the same schedule (SGD, lr x0.1 at half of the
    epochs) whatever the fraction, so less data means fewer steps. Writes OUT/curve.json (cells,
    appended as they finish; --resume continues), curve.md (tables, the 10 % verdict per rule,
    where each rule saturates), curve.png (accuracy vs fraction on a log axis; training
    speed-up) and config.json / results.json. Measured cost of the defaults on MNIST (74
    cells): 53 min wall on our 2-core CPU shared by four jobs, of which the students' training
    is 10 min of CPU and the k-means / DBSCAN selections at 30 % most of the rest.
    """
    from distill.data import load_dataset

    try:
        fracs = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers, got {fractions!r}",
                                 param_hint="--fractions") from None
    if lr <= 0:
        raise click.BadParameter("must be > 0", param_hint="--lr")
    for f in fracs:
        _in_cli_terms(check_fraction, "--fractions", f)
    config = CurveConfig(fractions=fracs, rules=tuple(m.strip() for m in methods.split(",")
                                                      if m.strip()),
                         seeds=tuple(range(seed, seed + seeds)), model=model,
                         train=TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size),
                         test_limit=test_limit)
    parse_model_spec(model)
    parse_model_spec(feature_model)
    out_dir = claim_out(out, force)
    if cache_dir:
        check_writable(cache_dir, "--cache-dir")
    dev = resolve_device(device)
    train_set = load_dataset(dataset, "train", root=data_root, download=download)
    test_set = load_dataset(dataset, "test", root=data_root, download=download)
    signal_config = SignalConfig(model=feature_model,
                                 train=TrainConfig(epochs=signal_epochs, decay_at=None))
    provider = SignalProvider(train_set, signal_config, seed=seed, device=dev,
                              progress=progress(ctx),
                              cache_root=Path(cache_dir or default_cache_root() / "signals"))
    title = f"{train_set.info.name}: {model}, {epochs} epochs for every fraction"
    state_path = out_dir / "curve.json"
    if resume and not state_path.is_file():
        raise click.UsageError(f"nothing to resume: {state_path} does not exist")

    def report(record: dict, state: dict) -> None:
        log.info("%-20s %6g %% seed %d: %.2f %%, train %.1f s, select %.1f s", record["rule"],
                 100 * record["fraction"], record["seed"], 100 * record["accuracy"],
                 record["train_seconds"], record["select_seconds"])

    state = run_curve(train_set, test_set, config, provider, state_path=state_path,
                      resume=resume, device=dev, on_cell=report)
    atomic_write_text(out_dir / "curve.md", curve_markdown(state, title))
    save_figure(curve_figure(state, title), out_dir / "curve.png")
    summary = summarise(state)
    write_run(out_dir, "curve", {"dataset": train_set.info.name, "curve": asdict(config),
                                 "signal_config": asdict(signal_config), "seed": seed,
                                 "device": str(dev)}, summary)
    click.echo(f"curve of {len(state['cells'])} cells -> {out_dir / 'curve.md'}")
