"""distill's commands: ``datasets``, ``distill`` (condensation, KIP and LS), ``evaluate``,
``compare`` and ``show``, added to the root group by ``cli.py``.

Every command maps its options to the library's config objects, calls one library function and
writes ``config.json``, ``results.json`` and its artefacts atomically into ``--out`` (the
plumbing: :mod:`distill.commandline`). Library errors become one-line usage errors; nothing is
written when a command is refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from .commandline import (
    POSITIVE,
    TableChoice,
    TableHelpOption,
    claim_out,
    coreset_inits,
    data_options,
    datasets,
    handle_errors,
    implicit_options,
    memory_check_option,
    progress,
    refuse_out_of_scope,
    run_options,
    set_argument,
    write_run,
)
from .commands_kip import (
    KIP_METHODS,
    check_kernel_options,
    describe,
    kip_options,
    krr_options,
    krr_score,
    run_kip,
)
from .condense import condense, condense_config
from .data import available_datasets, dataset_status, resolve_root
from .devices import real_chunk_for, resolve_device
from .engine import evaluate_set
from .grid import write_grid
from .kip import training_labels
from .methods import METHODS
from .models import parse_model_spec
from .protocols import default_protocol, describe_protocol, evaluation_record, make_protocol
from .stats import comparison_markdown
from .store import SET_FILES, PartialResults, StoreError, atomic_write_text, save_set
from .strategies import StrategyConfig
from .synthetic import check_ipc
from .trajectory import GRADIENTS, TrajectoryConfig

log = logging.getLogger("gtnkit")

# The readers of data sets, saved sets and generators are imported when a command runs,
# so that a test (or an application embedding the commands) can stand in for them.

__all__ = ["compare", "datasets_cmd", "distill_cmd", "evaluate", "show"]

#: What a run calls its set (readers also take the ``set.pt`` of earlier versions).
SET_FILE = SET_FILES[0]


@click.command(name="datasets")
@click.option("--data-root", type=click.Path(file_okay=False), envvar="GTNKIT_DATA",
              help="Folder to look in. Default: $GTNKIT_DATA.")
@handle_errors
def datasets_cmd(data_root: str | None) -> None:
    """List the supported data sets and whether each is present and valid under the root."""
    root = resolve_root(data_root)
    click.echo(f"data root: {root}")
    for name in available_datasets():
        ok, message = dataset_status(name, root)
        click.echo(f"  {name:<14} {'ok     ' if ok else 'missing'}  {message}")


@click.command()
@set_argument
@click.option("--model", default="convnet", show_default=True,
              help="Student: convnet, mlp, lenet, alexnet, vgg11, resnet18; options as "
                   "convnet:width=64,depth=4,norm=batch.")
@click.option("--students", type=click.IntRange(min=1), default=5, show_default=True,
              help="Fresh students to train (mean ± std over them).")
@click.option("--protocol", type=click.Choice(["dc", "dsa", "none"]), default=None,
              help="How students are trained, after the papers: dc (MNIST: DC's crop/scale/"
                   "rotate augmentation, 1000 epochs; CIFAR-10: none, 300), dsa (DSA's "
                   "augmentation, no flip on digits, 1000 epochs), none (300 epochs). "
                   "Default: the set's method's (dsa for dsa/dm sets, else dc).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default: the protocol's).")
@click.option("--augment", is_flag=True,
              help="Train with all six DSA ops (flip included) instead of the protocol's "
                   "augmentation.")
@click.option("--lr", type=POSITIVE, default=None,
              help="Student lr (default: the protocol's, 0.01).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Default: the protocol's (256).")
@click.option("--test-limit", type=click.IntRange(min=1), default=None,
              help="Score on a fixed subset of this many test images (default: all).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out: finished students are kept.")
@krr_options
@data_options
@run_options
@click.pass_context
@handle_errors
def evaluate(ctx, set_path, set_dataset, normalization, model, protocol, students, epochs,
             augment, lr, batch_size, test_limit, resume, data_root, download, out, seed,
             device, force, kernel, kernel_depth, reg, krr) -> None:
    """Train fresh students on a set and report their test accuracy (mean ± std).

    SET is a gtnkit set (set.safetensors, set.pt, an .npz export, or a folder holding one) or
    another tool's: a folder of images.pt, labels.pt (optional lr.pt), as DD-Ranking and the
    MTT/DATM code release them, or an .npz of images/labels, scored after --dataset and
    --normalization say what it holds. OUT/set.safetensors is the set scored, its card
    carrying this evaluation.

    Also scores the set by kernel ridge regression with an FC kernel (--kernel, the KIP
    paper's protocol; --no-krr skips it); results.json keeps the two apart ("krr" and the
    trained students' "protocol"). Students are trained as the paper of the set's method
    scores its sets (--protocol); results.json names the protocol. Each finished student is
    checkpointed in
    OUT/progress.json; after a kill, the same command with --resume trains only the missing
    students and gives the same result.
    """
    from .data import load_dataset
    from .store import load_set

    if krr:
        check_kernel_options(kernel, kernel_depth, reg)
    out_dir = claim_out(out, force, resume)
    parse_model_spec(model)
    saved = load_set(set_path, dataset=set_dataset, normalization=normalization)
    dev = resolve_device(device)
    changes = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items()
               if v is not None}
    if augment:
        changes.update(augment=True, augmentation="")
        changes.setdefault("epochs", 1000)
    name = protocol or default_protocol(saved.meta.get("method"))
    protocol = make_protocol(name, saved.dataset, model=model, n_students=students,
                             test_limit=test_limit, **changes)
    test = load_dataset(saved.dataset, "test", root=data_root, download=download)
    if tuple(saved.images.shape[1:]) != (test.info.channels, *test.info.im_size):
        raise click.UsageError(f"{set_path} holds images of shape {tuple(saved.images.shape[1:])}"
                               f", not those of {test.info.name}")
    config = {"set": str(set_path), "set_meta": {k: v for k, v in saved.meta.items()
                                                 if k not in ("indices", "evaluations")},
              "protocol": asdict(protocol), "seed": seed, "device": str(dev)}
    checkpoint = PartialResults(out_dir / "progress.json", config, resume)
    result = evaluate_set(saved.images.to(dev), training_labels(saved.labels).to(dev),
                          test.images.to(dev), test.labels.to(dev), protocol, seed,
                          num_classes=test.info.num_classes,
                          progress=progress(ctx), done=checkpoint.state.get("accuracies", []),
                          on_student=lambda i, acc: checkpoint.append("accuracies", acc))
    results = {**result.as_dict(), "protocol": describe_protocol(protocol),
               "protocol_name": protocol.name, "protocol_changes": sorted(changes)}
    if krr:
        results["krr"] = krr_score(saved.images.to(dev), saved.labels.to(dev), test.to(dev),
                                   kernel, kernel_depth, reg)
    saved.meta["evaluations"] = [*saved.meta.get("evaluations", []),
                                 evaluation_record(protocol, result, seed)]
    save_set(out_dir / "set.safetensors", saved)
    results["set"] = str(out_dir / "set.safetensors")
    write_run(out_dir, "evaluate", config, results)
    checkpoint.finish()
    click.echo(f"{saved.meta.get('method', 'set')} ({len(saved.labels)} images) -> "
               f"{describe(results, students)} [{result.seconds:.0f} s]")


# ------------------------------------------------------------------ distill
#: The strategies' own defaults (StrategyConfig's): what the options show and fall back to.
_BARE = StrategyConfig()
_MTT = TrajectoryConfig()


def _distill_methods() -> list[str]:
    return list(METHODS)


def _distill_method_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + "."


def _using(*strategies: str) -> tuple[str, ...]:
    """The condensation methods whose meta-gradient strategy is one of ``strategies``."""
    return tuple(name for name, m in METHODS.items() if m.strategy in strategies)


def _option_scopes() -> dict[str, tuple[str, ...]]:
    """Which methods read each method-specific option of ``distill`` (from the method table):
    the others refuse it when given."""
    condensing = tuple(name for name, m in METHODS.items() if not m.kernel)
    chunked = _using("matching", "distribution")
    # every method but label solve, which is one closed-form solve (nothing to iterate,
    # checkpoint or resume)
    iterative = tuple(name for name in METHODS if name != "ls")
    return {
        "iterations": iterative, "image_lr": iterative, "checkpoint_every": iterative,
        "eval_every": iterative, "resume": iterative, "target_batch": ("kip",),
        "real_batch": condensing,
        "outer_loop": _using("matching"), "inner_loop": _using("matching"),
        "distance": _using("matching"),
        "inner_steps": _using("unrolled", "implicit", "trajectory"),
        "inner_lr": _using("unrolled", "implicit", "trajectory"),
        "truncate": _using("unrolled"), "checkpoint_steps": _using("unrolled"),
        "neumann_terms": _using("implicit"), "neumann_alpha": _using("implicit"),
        "ift_solver": _using("implicit"), "experts_dir": _using("trajectory"),
        "expert_epochs": _using("trajectory"), "max_start_epoch": _using("trajectory"),
        "gradient": _using("trajectory"),
        "learn_lr": tuple(name for name, m in METHODS.items() if m.learns_lr),
        "fast": chunked, "real_chunk": chunked,
        "kernel": KIP_METHODS, "kernel_depth": KIP_METHODS, "reg": KIP_METHODS,
        "kernel_family": ("kip",), "uniform_targets": ("kip",),
        "ls_targets": ("ls",), "support": ("ls",),
    }


@click.command(name="distill")
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--method", required=True, type=TableChoice(_distill_methods),
              cls=TableHelpOption, help_from=_distill_method_help)
@click.option("--ipc", type=click.IntRange(min=1), required=True, help="Images per class.")
@click.option("--init", "init", default="real", show_default=True,
              type=TableChoice(lambda: ["noise", "real", *coreset_inits()]),
              help="noise, real (random real images) or a selection method whose coreset "
                   "seeds the synthetic set.")
@click.option("--model", default="convnet", show_default=True,
              help="Student meta-trained against (zoo spec, e.g. convnet:width=32).")
@click.option("--iterations", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Meta-iterations (updates of the synthetic images).")
@click.option("--lr", "image_lr", type=POSITIVE, default=None,
              help="Teacher (image) lr. Default: 0.1 dc/dsa, 1.0 dm (SGD, momentum 0.5); "
                   "0.01 dd/ift (Adam).")
@click.option("--real-batch", type=click.IntRange(min=1), default=_BARE.real_batch,
              show_default=True,
              help="Real images per class per step (dd/ift: the scoring batch).")
@click.option("--outer-loop", type=click.IntRange(min=1), default=None,
              help="DC outer loop (default by IPC: 1->1, 10->10, 50->50).")
@click.option("--inner-loop", type=click.IntRange(min=1), default=None,
              help="DC inner loop (default by IPC: 1->1, 10->50, 50->10).")
@click.option("--distance", type=click.Choice(["layerwise", "mse", "cosine"]),
              default=_BARE.distance, show_default=True, help="Gradient distance (dc/dsa).")
@click.option("--inner-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Student steps T of dd/ift; mtt: the synthetic steps N (MTT: 20 to 80).")
@click.option("--inner-lr", type=POSITIVE, default=_BARE.inner_lr, show_default=True,
              help="Student lr of dd/ift/mtt (initial value of a learned lr).")
@click.option("--truncate", type=click.IntRange(min=1), default=None,
              help="dd: differentiate only the last K student steps.")
@click.option("--checkpoint-steps", type=click.IntRange(min=1), default=None,
              help="dd: gradient checkpointing, segments of this many steps.")
@implicit_options("ift", _BARE.neumann_terms, _BARE.neumann_alpha)
@click.option("--experts", "experts_dir", type=click.Path(file_okay=False), default=None,
              help="mtt: folder of expert trajectories (`gtnkit experts`); required.")
@click.option("--expert-epochs", type=click.IntRange(min=1), default=_MTT.expert_epochs,
              show_default=True,
              help="mtt: M, the expert epochs the student's N steps must cover.")
@click.option("--max-start-epoch", type=click.IntRange(min=1), default=_MTT.max_start_epoch,
              show_default=True, help="mtt: the start epoch is drawn below this.")
@click.option("--gradient", type=click.Choice(GRADIENTS), default=_MTT.gradient,
              show_default=True,
              help="mtt: unrolled (memory grows with N) or tesla (TESLA's exact "
                   "constant-memory form of the same gradient).")
@click.option("--learn-labels", is_flag=True,
              help="Also learn the labels: soft labels (probabilities), or for kip free "
                   "real-valued label vectors as in the KIP paper.")
@click.option("--learn-lr", is_flag=True,
              help="dd: also learn the student lr (mtt always learns it, as MTT does).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Write OUT/checkpoint.pt every N iterations (what --resume continues from).")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate one student every N iterations (0: only at the end).")
@click.option("--students", type=click.IntRange(min=0), default=5, show_default=True,
              help="Fresh students of the final evaluation (0: skip it).")
@click.option("--eval-model", default=None, help="Evaluation student (default: --model).")
@click.option("--eval-epochs", type=click.IntRange(min=1), default=None,
              help="Default: the method's protocol's (dc: 1000 on MNIST with DC's "
                   "augmentation, else 300; dsa/dm: 1000 with DSA's).")
@click.option("--test-limit", type=click.IntRange(min=1), default=None,
              help="Score on a fixed subset of this many test images (default: all).")
@click.option("--signal-epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Selection init: epochs of the network that gives the selection signals.")
@click.option("--pool-per-class", type=click.IntRange(min=1), default=None,
              help="Selection init: candidates per class (default: all).")
@click.option("--fast/--eager", default=True, show_default=True,
              help="Real-data side through torch.compile (same result up to float rounding), "
                   "or plain eager PyTorch.")
@click.option("--real-chunk", type=click.IntRange(min=0), default=None,
              help="dc/dsa/dm: compute each class's real gradient (dm: embedding mean) in "
                   "pieces of this many images (same result up to float rounding; 0: whole). "
                   "Default: 16 on a CPU, whole on a GPU.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out from its checkpoint.")
@memory_check_option
@kip_options
@data_options
@run_options
@click.pass_context
@handle_errors
def distill_cmd(ctx, dataset, method, ipc, init, model, iterations, image_lr, real_batch,
                outer_loop, inner_loop, distance, inner_steps, inner_lr, truncate,
                checkpoint_steps, neumann_terms, neumann_alpha, ift_solver, experts_dir,
                expert_epochs, max_start_epoch, gradient, learn_labels, learn_lr,
                checkpoint_every, eval_every, students, eval_model, eval_epochs, test_limit,
                signal_epochs, pool_per_class, fast, real_chunk, resume, memory_check, data_root,
                download, out, seed, device, force, kernel, kernel_depth, kernel_family, reg,
                target_batch, uniform_targets, ls_targets, support) -> None:
    """Condense DATASET into IPC learnable images per class (DC, DSA, DM, DD, IFT, KIP, LS).

    Writes OUT/set.safetensors (with its card), grid.png, config.json and results.json
    (final accuracy, loss history, seconds per iteration, peak memory); OUT/checkpoint.pt
    every --checkpoint-every iterations, from which --resume continues to the same result as
    an uninterrupted run.
    kip / ls sets are scored twice: by kernel ridge regression (the KIP paper) and by training
    --eval-model students (the DC protocol); the results say which number is which.
    """
    from .data import load_dataset

    refuse_out_of_scope(ctx, method, _option_scopes())
    if method in KIP_METHODS:
        return run_kip(
            ctx, method=method, dataset=dataset, ipc=ipc, init=init, iterations=iterations,
            image_lr=image_lr, learn_labels=learn_labels, checkpoint_every=checkpoint_every,
            eval_every=eval_every, students=students, eval_model=eval_model, model=model,
            eval_epochs=eval_epochs, test_limit=test_limit, signal_epochs=signal_epochs,
            pool_per_class=pool_per_class, resume=resume, data_root=data_root,
            download=download, out=out, seed=seed, device=device, force=force, kernel=kernel,
            kernel_depth=kernel_depth, kernel_family=kernel_family, reg=reg,
            target_batch=target_batch, ls_targets=ls_targets, support=support,
            uniform_targets=uniform_targets)
    out_dir = claim_out(out, force, resume)
    parse_model_spec(model)
    parse_model_spec(eval_model or model)
    dev = resolve_device(device)
    if real_chunk is None and method in _option_scopes()["real_chunk"]:
        real_chunk = real_chunk_for(dev)
    own: dict[str, Any] = {}
    if METHODS[method].strategy == "implicit":
        own = {"ift_solver": ift_solver}
    if METHODS[method].strategy == "trajectory":
        if not experts_dir:
            raise click.UsageError(f"--method {method} needs --experts DIR (expert trajectories:"
                                   f" `gtnkit experts --dataset {dataset} --out DIR`)")
        own = {"experts": experts_dir, "expert_epochs": expert_epochs,
               "max_start_epoch": max_start_epoch, "gradient": gradient}
        learn_lr = True
    config = condense_config(
        method, iterations=iterations, lr=image_lr, dataset=dataset, real_batch=real_batch,
        outer_loop=outer_loop, inner_loop=inner_loop, distance=distance,
        inner_lr=inner_lr, truncate=truncate,
        checkpoint_every=checkpoint_every, eval_every=eval_every,
        neumann_terms=neumann_terms, neumann_alpha=neumann_alpha,
        checkpoint_steps=checkpoint_steps, compile=fast, real_chunk=real_chunk or None,
        memory_check=memory_check, **own)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    check_ipc(data, ipc)
    test = load_dataset(dataset, "test", root=data_root, download=download)
    protocol = make_protocol(default_protocol(method), dataset, model=eval_model or model,
                             n_students=max(students, 1), test_limit=test_limit,
                             **({"epochs": eval_epochs} if eval_epochs else {}))
    init_value: Any = init
    if init not in ("noise", "real"):  # a coreset seeds the synthetic set
        init_value = coreset_inits()[init](data, init, ipc, seed=seed, device=dev,
                                           progress=progress(ctx), model="convnet",
                                           epochs=signal_epochs, pool_per_class=pool_per_class)
    test_x, test_y = test.images.to(dev), test.labels.to(dev)

    def periodic(teacher, iteration):
        r = evaluate_set(teacher.images.detach(), teacher.targets().detach(), test_x, test_y,
                         replace(protocol, n_students=1), seed=seed, num_classes=
                         data.info.num_classes)
        log.info("iteration %d: %.2f %%", iteration, r.mean)
        return {"accuracy": r.mean}

    run_config = {"dataset": data.info.name, "method": method, "ipc": ipc, "init": init,
                  "model": model, "seed": seed, "device": str(dev),
                  "learn_labels": learn_labels, "learn_lr": learn_lr,
                  "inner_steps": inner_steps, "meta": asdict(config), "protocol": asdict(protocol),
                  "students": students}
    start = time.perf_counter()
    teacher, meta = condense(data, config, ipc, init=init_value, model=model,
                             seed=seed, device=dev, learn_labels=learn_labels,
                             learn_lr=learn_lr, inner_steps=inner_steps,
                             checkpoint=out_dir / "checkpoint.pt",
                             resume=resume, progress=progress(ctx),
                             evaluate=periodic if eval_every else None)
    saved = teacher.to_saved({"dataset": data.info.name, "method": method, "init": init,
                              "seed": seed, "config": run_config, "protocol": protocol.name})
    results: dict = {"label": f"{method} init={init}", "method": method, "init": init,
                     "ipc": ipc, "meta": meta.as_dict(),
                     "seconds_per_iteration": meta.seconds_per_iteration,
                     "memory": meta.memory}
    if students:
        ev = evaluate_set(saved.images.to(dev), saved.labels.to(dev), test_x, test_y, protocol,
                          seed=seed, num_classes=data.info.num_classes, progress=progress(ctx))
        results.update(ev.as_dict(), protocol=describe_protocol(protocol),
                       protocol_name=protocol.name)
        saved.meta["evaluations"] = [evaluation_record(protocol, ev, seed)]
    results["wall_seconds"] = time.perf_counter() - start
    save_set(out_dir / SET_FILE, saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "distill", run_config, results)
    acc = (f"{results['mean']:.2f} ± {results['std']:.2f} % test accuracy over {students} "
           f"student(s), {protocol.name} protocol") if students else "not evaluated"
    click.echo(f"{method} ({ipc} per class, init {init}) -> {acc}; "
               f"{meta.seconds_per_iteration:.2f} s/iteration; set in {out_dir / SET_FILE}")


# ------------------------------------------------------------------ compare, show
@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--by", type=click.Choice(["label", "method", "init", "run"]), default="label",
              show_default=True, help="What groups the runs: their label (method and init), "
                                      "method, init, or each run on its own.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the Markdown table to this file.")
@handle_errors
def compare(runs, by, out) -> None:
    """Mean ± std per group of RUN folders and Welch's t-test between every pair (Markdown).

    Every student's accuracy of every run counts as one observation of its group.
    """
    if out and Path(out).is_dir():
        raise click.BadParameter(f"{out} is a folder; give the name of a Markdown file",
                                 param_hint="--out")
    groups: dict[str, list[float]] = {}
    for run in runs:
        try:
            results = json.loads((Path(run) / "results.json").read_text())
            config = json.loads((Path(run) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise StoreError(f"{run} holds no readable results.json/config.json") from None
        accs = results.get("accuracies")
        if not accs:
            raise StoreError(
                f"{run} has no student accuracies to compare ({config.get('command', 'this')} "
                f"run); compare takes runs that trained students: `gtnkit evaluate SET`, "
                f"`gtnkit distill` with --students >= 1, `gtnkit gtn train` (evaluate a "
                f"`select` run's set first)")
        meta = config.get("set_meta", config)
        key = {"label": results.get("label") or meta.get("method", Path(run).name),
               "method": meta.get("method", "?"), "init": meta.get("init", "?"),
               "run": Path(run).name}[by]
        groups.setdefault(str(key), []).extend(float(a) for a in accs)
    text = comparison_markdown(groups)
    if out:
        atomic_write_text(out, text)
    click.echo(text, nl=False)


@click.command()
@set_argument
@click.option("--out", type=click.Path(), required=True, help="Output folder (grid.png).")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images shown per class (one row per class).")
@click.option("--card/--no-card", default=True, show_default=True,
              help="Draw the set's card beside the grid: data set, method, IPC, the "
                   "protocol that scored it and its score, version and hash.")
@click.option("--force", is_flag=True, help="Overwrite an output folder that holds a run.")
@handle_errors
def show(set_path, set_dataset, normalization, out, per_class, card, force) -> None:
    """Draw a set (any SET evaluate reads) as a PNG grid, one row per class, its card beside
    it."""
    from .store import load_set

    out_dir = claim_out(out, force)
    saved = load_set(set_path, dataset=set_dataset, normalization=normalization)
    shown, ncol = write_grid(out_dir / "grid.png", saved, per_class, card=card)
    write_run(out_dir, "show", {"set": str(set_path), "per_class": per_class},
              {"png": str(out_dir / "grid.png"), "images_shown": shown})
    click.echo(f"wrote {out_dir / 'grid.png'} ({shown} images, {ncol} per class)")
