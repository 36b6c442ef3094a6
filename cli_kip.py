"""The command-line side of KIP and Label Solve (``gtnkit distill --method kip|ls`` and the
kernel-ridge-regression score of ``gtnkit evaluate``).

Kept beside ``cli.py`` so that wiring it into a command table is three lines there: the method
names (:data:`KIP_METHODS`), the option decorators (:func:`kip_options`, :func:`krr_options`)
and one dispatch (:func:`kip_distill`, :func:`krr_score`). Like ``cli.py`` it only maps options
to the library (:mod:`distill.kip`) and writes files; every refusal happens before anything is
written.

Two protocols score a KIP / LS set, and the output always says which is which:

* **KRR** (the KIP paper's protocol): kernel ridge regression with the chosen FC kernel on the
  set, scored on the full test set;
* **ConvNet / zoo network** (the DC protocol): fresh students trained on the set, mean ± std.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

KIP_METHODS = ("kip", "ls")
KIP_METHOD_HELP = ("kip: kernel inducing points (learn images, and with --learn-labels free "
                   "real-valued labels as the paper does, by kernel ridge regression); ls: label "
                   "solve (closed-form labels for fixed images)")


def _kernel_options(fn: Callable) -> Callable:
    fn = click.option("--reg", type=float, default=1e-6, show_default=True,
                      help="KRR ridge lambda (> 0), scaled by tr(K_ss)/n_s as in the KIP "
                           "paper.")(fn)
    fn = click.option("--kernel-depth", type=int, default=1, show_default=True,
                      help="Hidden ReLU layers of the FC network whose kernel is used (>= 1)."
                      )(fn)
    fn = click.option("--kernel", default="ntk", show_default=True,
                      help="Infinite-width FC ReLU kernel: ntk or nngp.")(fn)
    return fn


def kip_options(fn: Callable) -> Callable:
    """The options ``distill`` takes for ``kip`` / ``ls`` (ignored by the other methods)."""
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


def _kernel_config(kernel: str, kernel_depth: int, family: bool = False):
    from distill.kernels import KernelConfig

    return KernelConfig(name=kernel, depth=kernel_depth, family=family)


def krr_protocol(kernel: str, kernel_depth: int, reg: float) -> str:
    return (f"KRR: kernel ridge regression with the FC{kernel_depth} ReLU {kernel.upper()} "
            f"kernel, lambda {reg:g} x tr(K_ss)/n_s, full test set (the KIP paper's protocol)")


def krr_score(images, labels, test, kernel: str, kernel_depth: int, reg: float) -> dict:
    """The KRR score of a set (images, labels on the test set's device) as a results entry."""
    from distill.kernels import make_kernel
    from distill.kip import krr_accuracy

    start = time.perf_counter()
    acc = krr_accuracy(images, labels, test.images, test.labels,
                       make_kernel(kernel, kernel_depth), reg)
    return {"protocol": krr_protocol(kernel, kernel_depth, reg), "kernel": kernel,
            "kernel_depth": kernel_depth, "reg": reg, "accuracy": acc,
            "seconds": time.perf_counter() - start}


def check_kernel_options(kernel: str, kernel_depth: int, reg: float) -> None:
    """Refuse a bad kernel, depth or ridge (one line) before anything is read or written."""
    from distill.kip import KipConfig

    KipConfig(kernel=kernel, kernel_depth=kernel_depth, reg=reg)


def check_kip_options(method: str, dataset: str, kernel: str, kernel_depth: int,
                      kernel_family: bool, reg: float, target_batch: int,
                      uniform_targets: bool = False, **_: Any):
    """Refuse bad KIP / LS options before anything is read or written (one line each)."""
    from distill.data import get_info
    from distill.kip import KipConfig

    cfg = KipConfig(kernel=kernel, kernel_depth=kernel_depth, family=kernel_family, reg=reg,
                    target_batch=max(target_batch, 1), balanced_targets=not uniform_targets)
    if method == "kip":
        k = get_info(dataset).num_classes
        if target_batch < k:
            raise click.BadParameter(f"must be at least the number of classes ({k}), got "
                                     f"{target_batch}", param_hint="--target-batch")
    return cfg


def kip_distill(ctx: click.Context, method: str, dataset: str, ipc: int, init: str,
                iterations: int, image_lr: float | None, learn_labels: bool,
                checkpoint_every: int, eval_every: int, students: int, eval_model: str | None,
                model: str, eval_epochs: int | None, test_limit: int | None,
                signal_epochs: int, pool_per_class: int | None, resume: bool,
                data_root: str | None, download: bool, out: str, seed: int, device: str,
                force: bool, kernel: str, kernel_depth: int, kernel_family: bool, reg: float,
                target_batch: int, ls_targets: int, support: str | None,
                uniform_targets: bool = False, **_: Any) -> None:
    """``gtnkit distill --method kip|ls``: same files as every method (set.pt, grid.png,
    config.json, results.json; checkpoint.pt for kip), scored by KRR and by the DC protocol."""
    from dataclasses import asdict, replace

    from cli import _progress, claim_out, write_run
    from distill.condense import condense
    from distill.data import get_info, load_dataset
    from distill.devices import resolve_device
    from distill.engine import evaluate_set
    from distill.grid import write_grid
    from distill.kip import kip_config, label_solve_set, training_labels
    from distill.models import parse_model_spec
    from distill.protocols import describe_protocol, make_protocol
    from distill.rng import generator
    from distill.store import SavedSet, load_set, save_set
    from distill.synthetic import SyntheticSet
    from selection import available_methods

    kip_cfg = check_kip_options(method, dataset, kernel, kernel_depth, kernel_family, reg,
                                target_batch, uniform_targets)
    if support and method != "ls":
        raise click.UsageError("--support applies to --method ls only")
    if learn_labels and method == "ls":
        raise click.UsageError("ls solves the labels in closed form; --learn-labels is for kip")
    out_dir = claim_out(out, force, resume)
    parse_model_spec(eval_model or model)
    if init not in ("noise", "real") and init not in available_methods():
        raise click.BadParameter(f"{init!r} is not noise, real or a selection method "
                                 f"({', '.join(available_methods())})", param_hint="--init")
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
        from selection import SignalConfig, SignalProvider, get_method
        from selection import select as run_select

        base = SignalConfig()
        provider = SignalProvider(data, replace(base, pool_per_class=pool_per_class,
                                                train=replace(base.train, epochs=signal_epochs)),
                                  seed=seed, device=dev, progress=_progress(ctx))
        init_value = run_select(data, get_method(init), ipc, seed=seed, signals=provider).indices
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

        def periodic(teacher, iteration):
            x, y = teacher.batch(None, None)
            score = krr_score(x.detach(), y.detach(), test, kernel, kernel_depth, reg)
            return {"krr_accuracy": score["accuracy"]}

        teacher, res = condense(data, config, ipc, init=init_value, seed=seed,
                                device=dev, learn_labels="free" if learn_labels else False,
                                checkpoint=out_dir / "checkpoint.pt", resume=resume,
                                progress=_progress(ctx), evaluate=periodic if eval_every else None)
        saved = teacher.to_saved(meta)
        results.update(meta=res.as_dict(), seconds_per_iteration=res.seconds_per_iteration,
                       memory=res.memory)
    else:
        if supported is not None:
            images = supported.images.to(dev)
        elif isinstance(init_value, str) and init_value == "noise":
            images = SyntheticSet.from_noise((data.info.channels, *data.info.im_size),
                                             data.info.num_classes, ipc,
                                             generator(seed, "init")).images.detach().to(dev)
        elif isinstance(init_value, str):
            images = SyntheticSet.from_real(data, ipc, generator(seed, "init")).images.detach()
        else:
            images = SyntheticSet.from_indices(data, init_value).images.detach()
        targets = ls_targets or None
        labels = label_solve_set(images, data, _kernel_config(kernel, kernel_depth), reg,
                                 targets, generator(seed, "ls-targets"))
        saved = SavedSet(images.cpu(), labels.cpu(), {**meta, "ipc": ipc, "kind": "label-solve",
                                                      "label_kind": "krr"})
    results["krr"] = krr_score(saved.images.to(dev), saved.labels.to(dev), test, kernel,
                               kernel_depth, reg)
    if students:
        ev = evaluate_set(saved.images.to(dev), training_labels(saved.labels).to(dev),
                          test.images, test.labels, protocol, seed=seed,
                          num_classes=data.info.num_classes, progress=_progress(ctx))
        results.update(ev.as_dict(), protocol=describe_protocol(protocol),
                       protocol_name=protocol.name)
    results["wall_seconds"] = time.perf_counter() - start
    save_set(out_dir / "set.pt", saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "distill", run_config, results)
    click.echo(f"{method} ({ipc} per class, init {init}) -> {describe(results, students)}; "
               f"set in {out_dir / 'set.pt'}")


def describe(results: dict, students: int) -> str:
    """One line naming both protocols (users confuse them)."""
    parts = []
    if "krr" in results:
        k = results["krr"]
        parts.append(f"KRR (FC{k['kernel_depth']} {k['kernel'].upper()}, KIP paper protocol): "
                     f"{k['accuracy']:.2f} %")
    if students:
        from distill.protocols import protocol_label

        name = protocol_label(results.get("protocol_name") or "dc")
        parts.append(f"trained {results['model']} ({name}, {students} student(s)): "
                     f"{results['mean']:.2f} ± {results['std']:.2f} %")
    return "; ".join(parts)

