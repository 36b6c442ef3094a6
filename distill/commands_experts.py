"""``gtnkit experts``: the expert trajectories trajectory matching learns from.

MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022)
matches a student trained on the synthetic set against the parameters of students trained on
the real data ("experts"), saved after every epoch. This command trains them, one file per
expert (:mod:`distill.experts`); a stopped run continues with ``--resume``, each expert from
its last finished epoch.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import click

from .augment import DEFAULT_STRATEGY
from .commandline import (
    POSITIVE,
    TableChoice,
    claim_out,
    data_options,
    datasets,
    finite,
    handle_errors,
    progress,
    register_usage_errors,
    run_options,
    write_run,
)
from .experts import ExpertError, expert_config_for, train_experts
from .models import parse_model_spec

__all__ = ["experts"]

register_usage_errors(ExpertError)


@click.command(name="experts")
@click.option("--dataset", required=True, type=TableChoice(datasets), help="Data set.")
@click.option("--model", default="convnet", show_default=True,
              help="The experts' network (a student spec); trajectory matching must use the "
                   "same one.")
@click.option("--experts", "n_experts", type=click.IntRange(min=1), default=10,
              show_default=True, help="Experts to train (MTT's paper: 100).")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Epochs per expert; parameters are saved after each.")
@click.option("--lr", type=POSITIVE, default=0.01, show_default=True, help="SGD lr.")
@click.option("--momentum", type=finite(0.0, 1.0, max_open=True), default=0.0,
              show_default=True, help="SGD momentum (MTT's buffers: none).")
@click.option("--weight-decay", type=finite(min=0.0), default=0.0, show_default=True,
              help="SGD weight decay.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Real images per step.")
@click.option("--augment", default=DEFAULT_STRATEGY, show_default=True,
              help="DSA operations during training ('' for none; flip is dropped on digits).")
@click.option("--resume", is_flag=True,
              help="Continue a stopped run in --out: finished experts are kept, the others "
                   "continue from their last finished epoch.")
@data_options
@run_options
@click.pass_context
@handle_errors
def experts(ctx, dataset, model, n_experts, epochs, lr, momentum, weight_decay, batch_size,
            augment, resume, data_root, download, out, seed, device, force) -> None:
    """Train expert trajectories on DATASET for trajectory matching (`distill --method mtt
    --experts OUT`): OUT/expert_NNNN.pt per expert (parameters after every epoch),
    config.json and results.json."""
    from .data import load_dataset
    from .devices import resolve_device

    parse_model_spec(model)
    out_dir = claim_out(out, force, resume)
    config = expert_config_for(dataset, model=model, epochs=epochs, lr=lr, momentum=momentum,
                               weight_decay=weight_decay, batch_size=batch_size,
                               augment=augment)
    dev = resolve_device(device)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    start = time.perf_counter()
    paths = train_experts(data, out_dir, n_experts, config, seed=seed, device=dev,
                          progress=progress(ctx))
    write_run(out_dir, "experts", {"dataset": dataset, "experts": n_experts, "seed": seed,
                                   "device": str(dev), "config": asdict(config)},
              {"files": [p.name for p in paths], "seconds": time.perf_counter() - start})
    click.echo(f"{len(paths)} experts of {epochs} epochs in {out_dir}")
