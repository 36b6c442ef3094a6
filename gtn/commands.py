"""gtn's commands: the ``gtn`` group (``train``, ``sample``, ``compare``), added to the root by
``cli.py``. Like every command they map options to the library's configs (:mod:`gtn.train`,
:mod:`gtn.compare`) and write the run's files (plumbing: :mod:`distill.commandline`).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import click
import torch

from distill.commandline import (
    TableChoice,
    TableHelpOption,
    claim_out,
    data_options,
    datasets,
    executor_config,
    executor_options,
    finite,
    handle_errors,
    implicit_options,
    int_list,
    memory_check_option,
    progress,
    refuse_out_of_scope,
    register_usage_errors,
    run_options,
    write_run,
)
from distill.data import get_info
from distill.devices import resolve_device
from distill.engine import mean_std
from distill.executor import make_executor
from distill.grid import write_grid
from distill.rng import generator
from distill.store import SET_FILES, SavedSet, save_set
from distill.trajectory import GRADIENTS

from .compare import BUDGETS, COMPARE_METHODS, comparison_table, run_comparison
from .config import GTNConfig
from .generator import CURRICULA, GeneratorConfig, GeneratorError
from .methods import DEFAULT_METHOD, GTN_METHODS
from .train import GENERATOR_FILES, few_step_accuracy, recipe_config, save_generator, train_gtn

__all__ = ["RECIPES_HELP", "gtn"]

register_usage_errors(GeneratorError)

# The readers of data sets, saved sets and generators are imported when a command runs,
# so that a test (or an application embedding the commands) can stand in for them.


@click.group()
def gtn() -> None:
    """Generative Teaching Networks: train a generator, sample sets from it, compare the
    unrolled / implicit / matching meta-gradients by memory and accuracy."""


def _gtn_method_help() -> str:
    return "Meta-gradient of the generator: " + "; ".join(
        f"{name}: {m.help} ({m.reference})" for name, m in GTN_METHODS.items()) + "."


#: The recipe table (:data:`gtn.train.RECIPES`) in words, for ``gtn train --help``.
def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


RECIPES_HELP = ("Recipes (measured on MNIST; see docs/results/gtn.md): " + "; ".join(
    f"{name}: " + " + ".join(part for part in (
        _options_text(m.defines) + " (what the method is: kept with --no-recipe)"
        if m.defines else "", _options_text(m.recipe)) if part)
    for name, m in GTN_METHODS.items()) + ".")

def _using(strategy: str) -> tuple[str, ...]:
    """The GTN methods whose meta-gradient strategy is ``strategy``."""
    return tuple(name for name, m in GTN_METHODS.items() if m.strategy == strategy)


#: The methods that read each method-specific option of ``gtn train`` (by their strategy, from
#: the method table); the others refuse it.
OPTION_SCOPES = {
    **{k: _using("implicit") for k in ("mixed_sample", "mixed_at", "step_size_grad",
                                       "unroll_tail", "neumann_terms", "neumann_alpha")},
    "checkpoint_steps": _using("unrolled"), "match_curriculum": _using("matching"),
    "match_real_per_class": _using("matching"),
    "ift_solver": ("implicit",),
    **{k: _using("trajectory") for k in ("experts_dir", "expert_epochs", "online_experts",
                                         "trajectory_gradient")},
}


#: The bare defaults (GTNConfig's, GeneratorConfig's): what the options show and fall back to.
_BARE, _GEN = GTNConfig(), GeneratorConfig()


def _sample_generator(seed: int) -> torch.Generator:
    return generator(seed, "sample")


@gtn.command("train", epilog=RECIPES_HELP)
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--method", type=TableChoice(lambda: GTN_METHODS), default=DEFAULT_METHOD,
              show_default=True, cls=TableHelpOption, help_from=_gtn_method_help)
@click.option("--inner-steps", default=str(_BARE.inner_steps), show_default=True,
              help="T: student steps per meta-iteration (one value; `gtn compare` compares "
                   "several).")
@click.option("--batch-size", type=click.IntRange(min=1), default=_BARE.batch_size,
              show_default=True, help="Generated images per student step.")
@click.option("--curriculum", type=TableChoice(lambda: CURRICULA), default=_BARE.curriculum,
              show_default=True,
              help="Where the noise of inner step t comes from: none (fresh noise every step), "
                   "all-shuffled (one learned pool, shuffled across steps), shuffled-batch "
                   "(T learned batches, order shuffled), full (T learned batches in order; "
                   "the paper's best).")
@click.option("--learn-labels", is_flag=True, help="Learn soft labels of the curriculum.")
@click.option("--student", default=_BARE.student, show_default=True,
              help="Zoo spec of the student.")
@click.option("--width-choices", default=None,
              help="Randomise the student's width per meta-iteration, e.g. 16,32,64.")
@click.option("--meta-iterations", type=click.IntRange(min=1), default=_BARE.meta_iterations,
              show_default=True,
              help="Updates of the generator (each trains a fresh student T steps).")
@click.option("--recipe/--no-recipe", default=True, show_default=True,
              help="Train with the method's measured recipe (below); options given explicitly "
                   "override it. --no-recipe: the bare defaults.")
@click.option("--meta-lr", type=finite(min=0.0, min_open=True), default=None,
              help=f"Adam lr of the generator [default: recipe, else {_BARE.meta_lr:g}].")
@click.option("--meta-schedule", type=click.Choice(["constant", "cosine"]), default=None,
              help="Meta-lr over the run (cosine: down to --meta-lr-floor) "
                   f"[default: recipe, else {_BARE.meta_schedule}].")
@click.option("--meta-lr-floor", type=finite(0.0, 1.0), default=_BARE.meta_lr_floor,
              show_default=True, help="cosine: the last meta-lr as a fraction of --meta-lr.")
@click.option("--grad-clip", type=finite(min=0.0), default=None,
              help="Clip the generator's meta-gradient to this L2 norm (0: off) "
                   "[default: recipe, else off].")
@click.option("--intermediate-every", type=click.IntRange(min=0), default=None,
              help="unrolled: also score the student on the real batch after every N-th "
                   "inner step (0: off) [default: recipe, else 0].")
@click.option("--intermediate-weight", type=finite(min=0.0), default=_BARE.intermediate_weight,
              show_default=True, help="Weight of the mean intermediate loss in the meta-loss.")
@click.option("--mixed-sample", type=click.IntRange(min=1), default=None,
              help="implicit: the mixed term from this many of the T batches (an unbiased "
                   "estimate) [default: recipe (implicit: 1), else all].")
@click.option("--mixed-at", type=click.Choice(["final", "trajectory"]), default=None,
              help="implicit: the implicit function theorem at the trained student, or "
                   "first-order along the trajectory [default: recipe, else final].")
@click.option("--step-size-grad/--no-step-size-grad", default=None,
              help="implicit: learn the per-step lr and momentum by the first-order "
                   "trajectory hypergradient [default: recipe, else off].")
@click.option("--unroll-tail", type=click.IntRange(min=0), default=None,
              help="implicit with --mixed-at trajectory: backpropagate exactly through the "
                   "last N inner steps (memory of N steps, not T; 0: off) [default: recipe "
                   "(5: enough at T = 10; at T = 32 take 10, and it still trails unrolled: "
                   "there unrolled --recompute gives the exact gradient at flat memory), "
                   "else 0].")
@click.option("--real-batch", type=click.IntRange(min=1), default=None,
              help="Real images the student is scored on per meta-iteration "
                   f"[default: recipe, else {_BARE.real_batch}].")
@click.option("--inner-lr", type=finite(min=0.0, min_open=True), default=None,
              help="The student's lr per step: where learned (unrolled; implicit with "
                   "--step-size-grad) its initial value, else fixed [default: recipe, else "
                   f"{_BARE.inner_lr:g}].")
@click.option("--inner-momentum", type=finite(0.0, 1.0, max_open=True), default=None,
              help=f"The student's momentum, likewise [default: recipe, else "
                   f"{_BARE.inner_momentum:g}].")
@click.option("--match-real-per-class", type=click.IntRange(min=1), default=None,
              help="matching: real images of each class whose gradient each generated class "
                   f"batch matches [default: {_BARE.match_real_per_class}].")
@click.option("--match-curriculum/--match-fresh", default=None,
              help="matching: match the T curriculum batches in order at the states a student "
                   "trained on them visits, or DC's rounds on fresh noise with a plain SGD "
                   "student [default: recipe, else fresh].")
@click.option("--validation", type=click.IntRange(min=1), default=_BARE.validation,
              show_default=True,
              help="Training images held out for validation.")
@click.option("--noise-dim", type=click.IntRange(min=1), default=_GEN.noise_dim,
              show_default=True,
              help="Generator: length of the noise vector (one-hot label appended).")
@click.option("--width-fc", type=click.IntRange(min=1), default=_GEN.width_fc,
              show_default=True,
              help="Generator: width of the fully connected layer.")
@click.option("--width-conv", type=click.IntRange(min=1), default=_GEN.width_conv,
              show_default=True,
              help="Generator: channels of the convolutional layers.")
@click.option("--weight-norm/--no-weight-norm", default=_GEN.weight_norm, show_default=True,
              help="Generator: weight normalisation on its layers.")
@click.option("--checkpoint-steps", type=click.IntRange(min=1), default=None,
              help="unrolled: gradient checkpointing, segments of this many steps.")
@click.option("--recompute", is_flag=True,
              help="unrolled: keep only each inner step's student state and rebuild the steps "
                   "one at a time in the backward pass: the same meta-gradient (intermediate "
                   "losses included), memory of one step, flat in T.")
@implicit_options("implicit", _BARE.neumann_terms, _BARE.neumann_alpha)
@click.option("--experts", "experts_dir", type=click.Path(file_okay=False), default=None,
              help="trajectory: folder of expert trajectories of the student's model "
                   "(`gtnkit experts --model SPEC`) [default: trained in memory on the "
                   "meta-training split].")
@click.option("--expert-epochs", type=click.IntRange(min=1), default=None,
              help="trajectory: M, the expert epochs the T student steps must cover "
                   "[default: recipe, else 3].")
@click.option("--online-experts", type=click.IntRange(min=1), default=None,
              help="trajectory without --experts: experts trained in memory "
                   "[default: recipe, else 1].")
@click.option("--trajectory-gradient", type=click.Choice(GRADIENTS), default=None,
              help="trajectory: unrolled (memory grows with T) or tesla (the same gradient at "
                   "constant memory) [default: tesla].")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="Compute the real-data side (the scoring of unrolled and implicit, "
                   "matching's real gradients), the student's steps that need no graph, the "
                   "generator and instance norm's second derivative with torch.compile: the "
                   "same result up to float rounding, about 0.7-0.9x the CPU time of an eager "
                   "meta-step, after compilations of about 25 s each on a 2-core CPU. For "
                   "runs of hundreds of meta-iterations.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=_BARE.checkpoint_every,
              show_default=True,
              help="Write OUT/checkpoint.pt every N meta-iterations (what --resume continues "
                   "from).")
@click.option("--eval-every", type=click.IntRange(min=0), default=_BARE.eval_every,
              show_default=True,
              help="Few-step validation accuracy every N meta-iterations.")
@click.option("--students", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fresh students trained T steps on the generator's curriculum to score it.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@memory_check_option
@data_options
@run_options
@click.pass_context
@handle_errors
def gtn_train(ctx, dataset, method, inner_steps, batch_size, curriculum, learn_labels, student,
              width_choices, meta_iterations, recipe, meta_lr, meta_schedule, meta_lr_floor,
              grad_clip,
              intermediate_every, intermediate_weight, mixed_sample, mixed_at, step_size_grad,
              unroll_tail, real_batch, inner_lr, inner_momentum, match_real_per_class,
              match_curriculum, validation,
              noise_dim, width_fc, width_conv, weight_norm, checkpoint_steps, recompute,
              neumann_terms, neumann_alpha, ift_solver, experts_dir, expert_epochs,
              online_experts, trajectory_gradient, compile_, checkpoint_every, eval_every,
              students, resume, memory_check, data_root, download, out, seed, device,
              force) -> None:
    """Meta-train a generator teacher on DATASET; writes OUT/generator.safetensors, grid.png,
    config.json and results.json (few-step test accuracy, peak memory, s/meta-step)."""
    from distill.data import load_dataset

    refuse_out_of_scope(ctx, method, OPTION_SCOPES)
    out_dir = claim_out(out, force, resume)
    steps = int_list(inner_steps, "--inner-steps")
    if len(steps) != 1:
        raise click.BadParameter(
            f"gtn train trains one generator with one T (e.g. --inner-steps 32), got "
            f"{inner_steps!r}; `gtnkit gtn compare --inner-steps 8,16,32` compares several",
            param_hint="--inner-steps")
    widths = tuple(int_list(width_choices, "--width-choices")) if width_choices else None
    given = {k: v for k, v in dict(meta_lr=meta_lr, meta_schedule=meta_schedule,
                                   intermediate_every=intermediate_every,
                                   step_size_grad=step_size_grad, mixed_at=mixed_at,
                                   real_batch=real_batch, inner_lr=inner_lr,
                                   inner_momentum=inner_momentum,
                                   match_curriculum=match_curriculum, grad_clip=grad_clip,
                                   match_real_per_class=match_real_per_class,
                                   unroll_tail=unroll_tail, experts=experts_dir,
                                   expert_epochs=expert_epochs, online_experts=online_experts,
                                   trajectory_gradient=trajectory_gradient).items()
             if v is not None}
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None  # 0 turns off a recipe's clip
    config = recipe_config(
        method, recipe, inner_steps=steps[0], batch_size=batch_size, curriculum=curriculum,
        learn_labels=learn_labels, student=student, width_choices=widths,
        meta_iterations=meta_iterations, meta_lr_floor=meta_lr_floor,
        intermediate_weight=intermediate_weight, mixed_sample=mixed_sample,
        validation=validation, **given,
        generator=GeneratorConfig(noise_dim=noise_dim, width_fc=width_fc, width_conv=width_conv,
                                  weight_norm=weight_norm),
        checkpoint_steps=checkpoint_steps, recompute=recompute, neumann_terms=neumann_terms,
        neumann_alpha=neumann_alpha, ift_solver=ift_solver, checkpoint_every=checkpoint_every,
        eval_every=eval_every, memory_check=memory_check, compile=compile_)
    config.check(get_info(dataset))
    dev = resolve_device(device)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    test = load_dataset(dataset, "test", root=data_root, download=download)
    teacher, meta, _ = train_gtn(data, config, seed=seed, device=dev,
                                 checkpoint=out_dir / "checkpoint.pt", resume=resume,
                                 progress=progress(ctx))
    accs = few_step_accuracy(teacher, student, test.images.to(dev), test.labels.to(dev), seed,
                             students)
    mean, std = mean_std(accs)
    save_generator(out_dir / GENERATOR_FILES[0], teacher, config, meta={
        "seed": seed, "evaluations": [{
            "protocol": "few-step", "student": student, "steps": steps[0],
            "description": f"few-step: {students} fresh {student} student(s) trained on the "
                           f"generator's {steps[0]} curriculum batches",
            "students": students, "seed": seed, "accuracies": accs, "mean": mean, "std": std}]})
    images, labels = teacher.sample(8, _sample_generator(seed))
    write_grid(out_dir / "grid.png", SavedSet(images.cpu(), labels.cpu(),
                                              {"dataset": data.info.name}), 8)
    run_config = {"dataset": data.info.name, "gtn": config.as_dict(), "seed": seed,
                  "device": str(dev)}
    write_run(out_dir, "gtn train", run_config,
              {"label": f"gtn {method} T={steps[0]}", "method": f"gtn-{method}",
               "accuracies": accs, "mean": mean, "std": std, "meta": meta.as_dict(),
               "seconds_per_meta_step": meta.seconds_per_iteration, "memory": meta.memory,
               "generator": str(out_dir / GENERATOR_FILES[0])})
    click.echo(f"gtn {method} (T={steps[0]}, {curriculum}) -> few-step test accuracy "
               f"{mean:.2f} ± {std:.2f} % over {students} student(s); "
               f"{meta.seconds_per_iteration:.2f} s/meta-step; {out_dir / GENERATOR_FILES[0]}")


@gtn.command("sample")
@click.argument("generator_path", metavar="GENERATOR", type=click.Path())
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images generated per class.")
@click.option("--curriculum", is_flag=True,
              help="Export the learned curriculum instead: the T batches students are "
                   "trained on, in step order (learned per-step lr and momentum in the card).")
@click.option("--dataset", default=None, type=TableChoice(datasets),
              help="Refuse a generator made for another data set's shape.")
@run_options
@handle_errors
def gtn_sample(generator_path, per_class, curriculum, dataset, out, seed, device,
               force) -> None:
    """Export PER_CLASS generated images per class (or the learned curriculum) as a set with
    its card, OUT/set.safetensors (for evaluate/show/export/compare). GENERATOR: a
    generator.safetensors (or an earlier generator.pt), or the `gtn train` folder."""
    from gtn import load_generator

    from .sets import generator_set

    out_dir = claim_out(out, force)
    teacher, config = load_generator(generator_path, dataset)
    dev = resolve_device(device)
    teacher = teacher.to(dev)
    saved = generator_set(teacher, config, per_class, seed, curriculum,
                          meta={"generator": str(generator_path), "config": config.as_dict()})
    labels = saved.labels
    save_set(out_dir / SET_FILES[0], saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "gtn sample", {"generator": str(generator_path), "per_class": per_class,
                                      "curriculum": curriculum, "seed": seed},
              {"set": str(out_dir / SET_FILES[0]), "n_images": len(labels)})
    what = "the learned curriculum" if curriculum else f"{per_class} per class"
    click.echo(f"sampled {len(labels)} images ({what}) -> {out_dir / SET_FILES[0]}")


@gtn.command("compare")
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--methods", default=",".join(COMPARE_METHODS), show_default=True,
              help="Comma-separated methods (rows) from: " + "; ".join(
                  f"{name}: {m.help}" for name, m in COMPARE_METHODS.items()) + ".")
@click.option("--inner-steps", default="8,16,32,64", show_default=True,
              help="Comma-separated T values.")
@click.option("--budget", type=TableChoice(lambda: BUDGETS), default="smoke", show_default=True,
              help="smoke: 2 meta-iterations, proves the path (accuracies mean nothing); "
                   "short: 20 meta-iterations, small generator and student, for a CPU; demo "
                   "(`make demo`, about 10 min on 2 cores with --workers 2): accuracy trained "
                   "at T = 10 only, 300 meta-iterations, and memory and time at every "
                   "--inner-steps from 2 meta-iterations each; paper: 2000 meta-iterations, "
                   "the paper's generator (wants a GPU).")
@click.option("--meta-iterations", type=click.IntRange(min=1), default=None,
              help="Meta-iterations of the cells trained for accuracy (the meta-lr schedule "
                   "ends there) [default: the budget's].")
@click.option("--curriculum", type=TableChoice(lambda: CURRICULA), default="full",
              show_default=True,
              help="Where the noise of inner step t comes from: none (fresh noise every step), "
                   "all-shuffled (one learned pool, shuffled across steps), shuffled-batch "
                   "(T learned batches, order shuffled), full (T learned batches in order; "
                   "the paper's best).")
@click.option("--recipe/--no-recipe", default=True, show_default=True,
              help="Train each method with its measured recipe (see `gtn train --help`); "
                   "--no-recipe: the bare defaults.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Compute the real-data side of the cells trained for accuracy with "
                   "torch.compile (same result up to float rounding; see `gtn train --help`) "
                   "[default: the budget's: on for demo].")
@click.option("--resume", is_flag=True, help="Keep finished cells; continue the running one.")
@executor_options
@data_options
@run_options
@click.pass_context
@handle_errors
def gtn_compare(ctx, dataset, methods, inner_steps, budget, meta_iterations, curriculum, recipe,
                compile_, resume, executor, workers, ray_address, cpus_per_item, gpus_per_item,
                data_root, download, out, seed, device, force) -> None:
    """Peak memory, seconds per meta-step and student accuracy of every method and T:
    OUT/gtn-compare.{json,md,png}."""
    from distill.data import load_dataset

    out_dir = claim_out(out, force, resume)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in COMPARE_METHODS]
    if bad or not names:
        raise click.BadParameter(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from "
                                 f"{', '.join(COMPARE_METHODS)}", param_hint="--methods")
    steps = int_list(inner_steps, "--inner-steps")
    sizes = BUDGETS[budget] if meta_iterations is None else \
        replace(BUDGETS[budget], meta_iterations=meta_iterations)
    if compile_ is not None:
        sizes = replace(sizes, compile=compile_)
    dev = resolve_device(device)
    sweep = executor_config(ctx, executor, workers, ray_address, cpus_per_item, gpus_per_item)
    with make_executor(sweep) as ex:  # before the data: a missing Ray is one line up front
        train_set = load_dataset(dataset, "train", root=data_root, download=download).to(dev)
        test_set = load_dataset(dataset, "test", root=data_root, download=download).to(dev)
        state = run_comparison(train_set, test_set, names, steps, sizes, out_dir,
                               seed=seed, device=dev, resume=resume, curriculum=curriculum,
                               recipe=recipe, progress=progress(ctx), log=click.echo,
                               executor=ex)
    write_run(out_dir, "gtn compare", {"dataset": dataset, "methods": names, "inner_steps": steps,
                                       "budget": budget, "meta_iterations":
                                       sizes.meta_iterations, "curriculum": curriculum,
                                       "recipe": recipe, "seed": seed, "device": str(dev),
                                       "executor": asdict(sweep)},
              {"cells": state["cells"], "table": str(out_dir / "gtn-compare.md")})
    click.echo(comparison_table(state), nl=False)
