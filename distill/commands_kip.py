"""The command-line side of KIP and Label Solve: ``gtnkit distill --method kip|ls`` and the
kernel-ridge-regression score of ``gtnkit evaluate``.

Like every command it only maps options to the library (:func:`distill.condense.condense`
with the ``kip`` strategy, :func:`distill.labelsolve.solve_labels`) and writes files; every
refusal happens before anything is written.

Two protocols score a KIP / LS set, and the output always says which is which:

* **KRR** (the KIP paper's protocol): kernel ridge regression with the chosen FC kernel on the
  set, scored on the full test set;
* **ConvNet / zoo network** (the DC protocol): fresh students trained on the set, mean ± std.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import click
import torch

from .commandline import claim_out, coreset_inits, finite, progress, write_run
from .condense import condense
from .data import ImageSet, get_info
from .devices import resolve_device
from .engine import evaluate_set
from .grid import write_grid
from .kernels import KernelConfig, make_kernel
from .kip import KipConfig, kip_config, krr_accuracy, training_labels
from .labelsolve import solve_labels
from .models import parse_model_spec
from .protocols import describe_protocol, evaluation_record, make_protocol, protocol_label
from .store import SET_FILES, save_set

#: The methods this module runs, and their line of ``distill --method``'s help.
KIP_METHODS = ("kip", "ls")
KIP_METHOD_HELP = ("kip: kernel inducing points (learn images, and with --learn-labels free "
                   "real-valued labels as the paper does, by kernel ridge regression); ls: label "
                   "solve (closed-form labels for fixed images)")


def _kernel_options(fn: Callable) -> Callable:
    fn = click.option("--reg", type=finite(),  # its range: the KIP config
                      default=1e-6, show_default=True,
                      help="KRR ridge lambda (> 0), scaled by tr(K_ss)/n_s as in the KIP "
                           "paper.")(fn)
    fn = click.option("--kernel-depth", type=int, default=1, show_default=True,
                      help="Hidden ReLU layers of the FC network whose kernel is used (>= 1)."
                      )(fn)
    fn = click.option("--kernel", default="ntk", show_default=True,
                      help="Infinite-width FC ReLU kernel: ntk or nngp.")(fn)
    return fn


def kip_options(fn: Callable) -> Callable:
    """The options ``distill`` takes for ``kip`` / ``ls`` (refused for the other methods)."""
    fn = click.option("--support", type=click.Path(dir_okay=False), default=None,
                      help="ls: solve labels for the images of this saved set (a coreset or a "
                           "condensed set) instead of --init.")(fn)
    fn = click.option("--ls-targets", type=click.IntRange(min=0), default=10000,
                      show_default=True,
                      help="ls: random real training images the labels are fitted to (0: all)."
                      )(fn)
    fn = click.option("--target-batch", type=int, default=1000, show_default=True,
                      help="kip: real target images per iteration (>= the number of classes)."
                      )(fn)
    fn = click.option("--uniform-targets", is_flag=True,
                      help="kip: draw target batches uniformly from the training set (default: "
                           "class-balanced, as the KIP paper does).")(fn)
    fn = click.option("--kernel-family", is_flag=True,
                      help="kip: draw the depth from 1..--kernel-depth every iteration (the "
                           "paper's family of kernels).")(fn)
    return _kernel_options(fn)


def krr_options(fn: Callable) -> Callable:
    """The options of ``evaluate``'s kernel-ridge-regression score."""
    fn = click.option("--krr/--no-krr", default=True, show_default=True,
                      help="Also score the set by kernel ridge regression (the KIP paper's "
                           "protocol).")(fn)
    return _kernel_options(fn)


def krr_protocol(kernel: str, kernel_depth: int, reg: float) -> str:
    return (f"KRR: kernel ridge regression with the FC{kernel_depth} ReLU {kernel.upper()} "
            f"kernel, lambda {reg:g} x tr(K_ss)/n_s, full test set (the KIP paper's protocol)")


def krr_score(images: torch.Tensor, labels: torch.Tensor, test: ImageSet, kernel: str,
              kernel_depth: int, reg: float) -> dict:
    """The KRR score of a set (images, labels on the test set's device) as a results entry."""
    start = time.perf_counter()
    acc = krr_accuracy(images, labels, test.images, test.labels,
                       make_kernel(kernel, kernel_depth), reg)
    return {"protocol": krr_protocol(kernel, kernel_depth, reg), "kernel": kernel,
            "kernel_depth": kernel_depth, "reg": reg, "accuracy": acc,
            "seconds": time.perf_counter() - start}


def check_kernel_options(kernel: str, kernel_depth: int, reg: float) -> None:
    """Refuse a bad kernel, depth or ridge (one line) before anything is read or written."""
    KipConfig(kernel=kernel, kernel_depth=kernel_depth, reg=reg)


def describe(results: dict, students: int) -> str:
    """One line naming both protocols (users confuse them)."""
    parts = []
    if "krr" in results:
        k = results["krr"]
        parts.append(f"KRR (FC{k['kernel_depth']} {k['kernel'].upper()}, KIP paper protocol): "
                     f"{k['accuracy']:.2f} %")
    if students:
        name = protocol_label(results.get("protocol_name") or "dc")
        parts.append(f"trained {results['model']} ({name}, {students} student(s)): "
                     f"{results['mean']:.2f} ± {results['std']:.2f} %")
    return "; ".join(parts)


def run_kip(ctx: click.Context, *, method: str, dataset: str, ipc: int, init: str,
            iterations: int, image_lr: float | None, learn_labels: bool, checkpoint_every: int,
            eval_every: int, students: int, eval_model: str | None, model: str,
            eval_epochs: int | None, test_limit: int | None, signal_epochs: int,
            pool_per_class: int | None, resume: bool, data_root: str | None, download: bool,
            out: str, seed: int, device: str, force: bool, kernel: str, kernel_depth: int,
            kernel_family: bool, reg: float, target_batch: int, ls_targets: int,
            support: str | None, uniform_targets: bool) -> None:
    """``gtnkit distill --method kip|ls``: same files as every method (set.safetensors, grid.png,
    config.json, results.json; checkpoint.pt for kip), scored by KRR and by the DC protocol."""
    from .data import load_dataset  # at call time, like every command's readers
    from .store import load_set

    kip_cfg = KipConfig(kernel=kernel, kernel_depth=kernel_depth, family=kernel_family, reg=reg,
                        target_batch=max(target_batch, 1), balanced_targets=not uniform_targets)
    if method == "kip" and target_batch < get_info(dataset).num_classes:
        raise click.BadParameter(f"must be at least the number of classes "
                                 f"({get_info(dataset).num_classes}), got {target_batch}",
                                 param_hint="--target-batch")
    if learn_labels and method == "ls":
        raise click.UsageError("ls solves the labels in closed form; --learn-labels is for kip")
    out_dir = claim_out(out, force, resume)
    parse_model_spec(eval_model or model)
    supported = load_set(support) if support else None
    if supported is not None:  # the support decides the size
        ipc = max(1, supported.images.shape[0] // get_info(dataset).num_classes)
    dev = resolve_device(device)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    counts = data.class_counts()
    if supported is None and ipc > int(counts.min()):
        raise click.BadParameter(f"{ipc} exceeds the smallest class ({int(counts.min())})",
                                 param_hint="--ipc")
    test = load_dataset(dataset, "test", root=data_root, download=download)
    protocol = make_protocol("dc", dataset, model=eval_model or model,
                             n_students=max(students, 1), test_limit=test_limit,
                             **({"epochs": eval_epochs} if eval_epochs else {}))
    init_value: Any = init
    if init not in ("noise", "real") and supported is None:  # a coreset is the support
        init_value = coreset_inits()[init](data, init, ipc, seed=seed, device=dev,
                                           progress=progress(ctx), model=None,
                                           epochs=signal_epochs, pool_per_class=pool_per_class)
    data, test = data.to(dev), test.to(dev)
    run_config = {"dataset": data.info.name, "method": method, "ipc": ipc, "init": init,
                  "support": support, "seed": seed, "device": str(dev),
                  "learn_labels": learn_labels, "kip": asdict(kip_cfg),
                  "ls_targets": ls_targets, "protocol": asdict(protocol), "students": students}
    start = time.perf_counter()
    results: dict = {"label": f"{method} init={init}", "method": method, "init": init,
                     "ipc": ipc}
    meta = {"dataset": data.info.name, "method": method, "init": init, "seed": seed,
            "config": run_config, "protocol": protocol.name}
    if method == "kip":
        config = kip_config(iterations, lr=image_lr, checkpoint_every=checkpoint_every,
                            eval_every=eval_every, **{f: getattr(kip_cfg, f) for f in (
                                "kernel", "kernel_depth", "family", "reg",
                                "balanced_targets")},
                            target_batch=target_batch)
        run_config["meta"] = asdict(config)

        def periodic(teacher: Any, iteration: int) -> dict:
            x, y = teacher.batch(None, None)
            score = krr_score(x.detach(), y.detach(), test, kernel, kernel_depth, reg)
            return {"krr_accuracy": score["accuracy"]}

        teacher, res = condense(data, config, ipc, init=init_value, seed=seed,
                                device=dev, learn_labels="free" if learn_labels else False,
                                checkpoint=out_dir / "checkpoint.pt", resume=resume,
                                progress=progress(ctx), evaluate=periodic if eval_every else None)
        saved = teacher.to_saved(meta)
        results.update(meta=res.as_dict(), seconds_per_iteration=res.seconds_per_iteration,
                       memory=res.memory)
    else:
        saved = solve_labels(data, ipc, init_value,
                             support=None if supported is None else supported.images.to(dev),
                             kernel=KernelConfig(name=kernel, depth=kernel_depth), reg=reg,
                             targets=ls_targets or None, seed=seed)
        saved = replace(saved, meta={**meta, **saved.meta, "method": method})
    results["krr"] = krr_score(saved.images.to(dev), saved.labels.to(dev), test, kernel,
                               kernel_depth, reg)
    if students:
        ev = evaluate_set(saved.images.to(dev), training_labels(saved.labels).to(dev),
                          test.images, test.labels, protocol, seed=seed,
                          num_classes=data.info.num_classes, progress=progress(ctx))
        results.update(ev.as_dict(), protocol=describe_protocol(protocol),
                       protocol_name=protocol.name)
        saved.meta["evaluations"] = [evaluation_record(protocol, ev, seed)]
    saved.meta["krr"] = results["krr"]
    results["wall_seconds"] = time.perf_counter() - start
    save_set(out_dir / SET_FILES[0], saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "distill", run_config, results)
    click.echo(f"{method} ({ipc} per class, init {init}) -> {describe(results, students)}; "
               f"set in {out_dir / SET_FILES[0]}")
