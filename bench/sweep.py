"""The executor options of every bench runner (``--executor``, ``--workers``,
``--ray-address``, ``--cpus-per-item``, ``--gpus-per-item``) and the
:class:`distill.executor.ExecutorConfig` they make: a runner's cells are work items of
:mod:`distill.executor`, on a local pool or on Ray."""

from __future__ import annotations

import argparse

from distill.executor import KINDS, ExecutorConfig, ExecutorError


def add_executor_options(parser: argparse.ArgumentParser, what: str = "cells") -> None:
    parser.add_argument("--executor", choices=KINDS, default="local",
                        help=f"Where the {what} run: local (this machine) or ray (a Ray "
                             f"cluster or a local Ray runtime; pip install 'gtnkit[ray]').")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"local: processes (default 1, in this process); ray: {what} in "
                             f"flight at most (default: as many as the cluster fits).")
    parser.add_argument("--ray-address", default=None,
                        help="A running Ray cluster (default: RAY_ADDRESS, else a local "
                             "runtime for this run).")
    parser.add_argument("--cpus-per-item", type=float, default=1.0,
                        help="ray: CPUs each item holds (also its torch threads).")
    parser.add_argument("--gpus-per-item", type=float, default=0.0,
                        help="ray: GPUs each item holds (fractions share a GPU).")


def executor_config(args: argparse.Namespace) -> ExecutorConfig:
    try:
        return ExecutorConfig(kind=args.executor, workers=args.workers,
                              ray_address=args.ray_address, cpus_per_item=args.cpus_per_item,
                              gpus_per_item=args.gpus_per_item)
    except ExecutorError as exc:
        raise SystemExit(str(exc)) from None
