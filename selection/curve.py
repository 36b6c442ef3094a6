"""The data-budget curve: test accuracy and training time of a standard network trained on a
selected fraction of the data, per selection rule, against the whole set.

The question is the selection article's claim that a well-chosen 10 % of the training data
loses about 2 points of accuracy and trains about 8x faster, and that accuracy saturates well
before the whole set. Every cell (rule, fraction, seed) selects a class-balanced fraction with
one rule (signals from one network trained once, :class:`~selection.signals.SignalProvider`),
trains a fresh student on it through the library's one training loop with the *same schedule
as on the whole set* (same epochs, so fewer SGD steps on less data: what "trains faster" means)
and scores it on the test set. The whole set (fraction 1) is the reference, once per seed.

Scores follow Sorscher et al., "Beyond neural scaling laws: beating power law scaling via data
pruning", NeurIPS 2022, in being run in both orders (``gradnorm:hardest`` / ``:easiest``):
their theory predicts that the easiest examples win at small fractions, the hardest at large.

Cells are appended to a JSON state file as they finish, so a killed run resumes per cell.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.engine import TrainConfig, accuracy, mean_std, train
from distill.models import build_model
from distill.rng import generator as make_generator
from distill.store import atomic_write_json, to_jsonable

from .base import SelectionError, get_method
from .budget import check_fraction
from .driver import select
from .ranking import ORDERS
from .signals import SignalProvider

__all__ = [
    "ARTICLE",
    "WHOLE",
    "CurveConfig",
    "curve_figure",
    "curve_markdown",
    "parse_rule",
    "run_curve",
    "summarise",
]

#: Name of the reference rows (fraction 1, every rule alike).
WHOLE = "whole set"
#: The selection article's table: 100 000 samples 92.3 % in 1200 s; 10 000 samples 90.1 %, 150 s.
ARTICLE = {"fraction": 0.1, "points_lost": 92.3 - 90.1, "speedup": 1200 / 150}


def parse_rule(spec: str) -> tuple[str, dict]:
    """``"gradnorm:hardest"`` -> ``("gradnorm", {"order": "hardest"})``; ``"herding"`` -> no
    options. Raises :class:`SelectionError` for an unknown rule or order (one line)."""
    name, _, order = spec.strip().partition(":")
    options = {"order": order} if order else {}
    if order and order not in ORDERS:
        raise SelectionError(f"rule {spec!r}: the order after ':' must be one of "
                             f"{', '.join(ORDERS)}")
    rule = get_method(name)   # validates the name
    if order and not hasattr(rule, "order"):
        raise SelectionError(f"rule {spec!r}: {name} is not a score rule; ':hardest' and "
                             f"':easiest' apply to forgetting, gradnorm and entropy")
    get_method(name, **options)   # validates the option
    return name, options


@dataclass(frozen=True)
class CurveConfig:
    """One curve: rules x fractions x seeds, and the student every cell trains.

    Attributes:
        fractions: class-balanced fractions of the training set, each in (0, 1]; 1 is the
            whole-set reference (added when missing).
        rules: rule specs ``name`` or ``name:hardest|easiest`` (:func:`parse_rule`).
        seeds: one student (and selection draw) per seed; the signal network is shared.
        model: the student (zoo spec), the same for every cell.
        train: its schedule, the same for every fraction (a normal full-data schedule).
        test_limit: score on a fixed test subset of this size (``None``: the whole test set).
    """

    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
    rules: tuple[str, ...] = ("random", "herding", "kcenter", "kmeans", "dbscan",
                              "forgetting:hardest", "gradnorm:hardest", "gradnorm:easiest",
                              "entropy:hardest")
    seeds: tuple[int, ...] = (0, 1)
    model: str = "lenet"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10))
    test_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.fractions or not self.rules or not self.seeds:
            raise SelectionError("a curve needs at least one fraction, one rule and one seed")
        for f in self.fractions:
            check_fraction(f)
        for r in self.rules:
            parse_rule(r)
        if len(set(self.seeds)) != len(self.seeds):
            raise SelectionError(f"seeds must be distinct, got {list(self.seeds)}")

    def cells(self, first: float | None = 0.1) -> list[tuple[str, float, int]]:
        """Every (rule, fraction, seed) to run: the whole set first, then ``first`` (the
        article's 10 %), then the other fractions, smallest first; seeds innermost."""
        cut = sorted({f for f in self.fractions if f < 1.0},
                     key=lambda f: (f != first, f))
        out = [(WHOLE, 1.0, s) for s in self.seeds]
        out += [(r, f, s) for f in cut for r in self.rules for s in self.seeds]
        return out


def _key(rule: str, fraction: float, seed: int) -> str:
    return f"{rule}|{fraction:g}|{seed}"


def run_curve(train_set: Any, test_set: Any, config: CurveConfig, signals: SignalProvider,
              state_path: str | Path | None = None, resume: bool = True,
              device: torch.device | str = "cpu",
              on_cell: Callable[[dict, dict], None] | None = None) -> dict:
    """Run every missing cell of the curve; returns ``{"config", "cells", "signals"}``.

    Args:
        train_set, test_set: ``ImageSet`` s of one data set.
        signals: the provider every rule reads (one signal network for the whole curve).
        state_path: JSON file the finished cells are appended to (atomically, one by one).
        resume: keep the cells already in ``state_path`` when its config matches; a state of
            another config is an error (one line) rather than silently mixed.
        on_cell: called with each new cell's record and the state so far (progress lines,
            intermediate reports).

    A cell's record: rule, fraction, seed, ``n`` (images), ``accuracy`` (test, in [0, 1]),
    ``train_seconds`` (wall time of the student's training), ``train_cpu_seconds`` (its
    process CPU time: on a shared machine the steadier measure), ``steps`` (SGD steps),
    ``select_seconds`` (the rule, signals already computed).
    """
    dev = torch.device(device)
    cfg_json = to_jsonable(asdict(config))
    sig_info = {"fingerprint": signals.fingerprint,
                "model": signals.config.model, "epochs": signals.config.train.epochs}
    state: dict = {"config": cfg_json, "dataset": train_set.info.name, "cells": []}
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file() and resume:
        saved = json.loads(path.read_text())
        if saved.get("config") != cfg_json or saved.get("dataset") != train_set.info.name:
            raise SelectionError(f"{path} holds a curve with other options; remove it or "
                                 f"use the same options")
        state = saved
    done = {_key(c["rule"], c["fraction"], c["seed"]) for c in state["cells"]}
    test_x, test_y = test_set.images, test_set.labels
    if config.test_limit is not None and config.test_limit < len(test_y):
        keep = torch.randperm(len(test_y), generator=make_generator(0, "test-subset"))
        keep = keep[:config.test_limit].sort().values
        test_x, test_y = test_x[keep], test_y[keep]
    test_x, test_y = test_x.to(dev), test_y.to(dev)
    info = train_set.info
    for rule, fraction, seed in config.cells():
        if _key(rule, fraction, seed) in done:
            continue
        t0 = time.perf_counter()
        if rule == WHOLE:
            idx = torch.arange(len(train_set.labels))
        else:
            name, options = parse_rule(rule)
            idx = select(train_set, name, seed=seed, options=options, signals=signals,
                         fraction=fraction).indices
        select_seconds = time.perf_counter() - t0
        x = train_set.images[idx.to(train_set.images.device)].to(dev)
        y = train_set.labels[idx.to(train_set.labels.device)].to(dev)
        g = make_generator(seed, "curve-student")
        model = build_model(config.model, info.channels, info.num_classes, info.im_size,
                            generator=g).to(dev)
        cpu = time.process_time()
        stats = train(model, x, y, config.train, g)
        cpu = time.process_time() - cpu
        record = {"rule": rule, "fraction": fraction, "seed": seed, "n": len(y),
                  "accuracy": accuracy(model, test_x, test_y), "train_seconds": stats.seconds,
                  "train_cpu_seconds": cpu, "steps": stats.steps,
                  "select_seconds": select_seconds}
        state["cells"].append(record)
        state["signals"] = {**sig_info, "seconds": signals.seconds.get("train_signals"),
                            "cache_hit": signals.cache_hit}
        if path is not None:
            atomic_write_json(path, state)
        if on_cell is not None:
            on_cell(record, state)
    state.setdefault("signals", sig_info)
    return state


def _mean_cpu(cells: list[dict]) -> float | None:
    """Mean training CPU seconds, or None when some cell predates that field."""
    if any("train_cpu_seconds" not in c for c in cells):
        return None
    return sum(c["train_cpu_seconds"] for c in cells) / len(cells)


def summarise(state: dict, saturation_points: float = 1.0) -> dict:
    """Mean ± std per (rule, fraction), the 10 % verdict per rule, and where each saturates.

    Returns ``{"whole": {...}, "rules": {rule: {"fractions": {f: row}, "at_10": ...,
    "saturates_at": f or None}}}``; a row holds ``accuracy``/``std`` in %, ``n``, mean
    ``train_seconds`` and ``speedup`` (whole-set wall time / this wall time), ``cpu_speedup``
    (the same in CPU time), ``steps_ratio`` (whole-set SGD steps / these) and ``points_lost``.
    A rule *saturates* at the smallest fraction whose mean accuracy is within
    ``saturation_points`` of the whole set's.
    """
    cells = state["cells"]
    whole = [c for c in cells if c["rule"] == WHOLE]
    if not whole:
        return {"whole": None, "rules": {}}
    w_acc, w_std = mean_std([100 * c["accuracy"] for c in whole])
    w_sec = sum(c["train_seconds"] for c in whole) / len(whole)
    w_cpu = _mean_cpu(whole)
    out: dict = {"whole": {"accuracy": w_acc, "std": w_std, "train_seconds": w_sec,
                           "train_cpu_seconds": w_cpu, "n": whole[0]["n"],
                           "seeds": len(whole)}, "rules": {}}
    rules = list(dict.fromkeys(c["rule"] for c in cells if c["rule"] != WHOLE))
    for rule in rules:
        rows = {}
        for f in sorted({c["fraction"] for c in cells if c["rule"] == rule}):
            group = [c for c in cells if c["rule"] == rule and c["fraction"] == f]
            acc, std = mean_std([100 * c["accuracy"] for c in group])
            sec = sum(c["train_seconds"] for c in group) / len(group)
            cpu = _mean_cpu(group)
            rows[f] = {"accuracy": acc, "std": std, "n": group[0]["n"], "seeds": len(group),
                       "train_seconds": sec, "speedup": w_sec / sec if sec > 0 else math.inf,
                       "cpu_speedup": (w_cpu / cpu if w_cpu is not None and cpu else None),
                       "steps_ratio": whole[0]["steps"] / group[0]["steps"],
                       "points_lost": w_acc - acc,
                       "select_seconds": sum(c["select_seconds"] for c in group) / len(group)}
        sat = next((f for f in sorted(rows) if rows[f]["points_lost"] <= saturation_points), None)
        out["rules"][rule] = {"fractions": rows, "at_10": rows.get(0.1), "saturates_at": sat}
    return out


def _pct(f: float) -> str:
    return f"{100 * f:g} %"


def curve_markdown(state: dict, title: str, notes: str = "") -> str:
    """The curve as Markdown: accuracy per rule and fraction, then the article's 10 % claim."""
    s = summarise(state)
    if s["whole"] is None:
        return f"## {title}\n\n(no cell finished yet)\n"
    w = s["whole"]
    fractions = sorted({f for r in s["rules"].values() for f in r["fractions"]})
    lines = [f"## {title}", ""]
    if notes:
        lines += [notes, ""]
    sig = state.get("signals", {})
    if sig:
        secs = sig.get("seconds")
        lines += [(f"Signals: `{sig.get('model')}` trained {sig.get('epochs')} epochs on the "
                   f"whole training set once" + (f" ({secs:.0f} s)" if secs else " (cache hit)")
                   + "; every rule, fraction and seed reuses them."), ""]
    lines += [(f"Whole set ({w['n']} images): **{w['accuracy']:.2f} ± {w['std']:.2f} %**, "
               f"{w['train_seconds']:.1f} s of training (mean of {w['seeds']} seeds)."), "",
              ("Test accuracy (%, mean ± std over seeds) and training speed-up against the "
               "whole set (CPU time where recorded, else wall time):"), "",
              "| rule | " + " | ".join(_pct(f) for f in fractions) + " | saturates at |",
              "|---|" + "---|" * (len(fractions) + 1)]
    for rule, r in s["rules"].items():
        cells = []
        for f in fractions:
            row = r["fractions"].get(f)
            cells.append("" if row is None else
                         f"{row['accuracy']:.2f} ± {row['std']:.2f} "
                         f"({row['cpu_speedup'] or row['speedup']:.1f}x)")
        sat = "not within 1 pt" if r["saturates_at"] is None else _pct(r["saturates_at"])
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {sat} |")
    lines += ["", "The article's claim at 10 % (it reports 2.2 points lost and an 8.0x speed-up):",
              "", ("| rule | accuracy at 10 % | points lost | speed-up (wall) | speed-up (CPU) "
                   "| SGD steps | selection (s) |"),
              "|---|---|---|---|---|---|---|",
              (f"| article | 90.1 | {ARTICLE['points_lost']:.1f} | {ARTICLE['speedup']:.1f}x "
               f"| | | |")]
    for rule, r in s["rules"].items():
        row = r["at_10"]
        if row is not None:
            cpu = "" if row["cpu_speedup"] is None else f"{row['cpu_speedup']:.1f}x"
            lines.append(f"| {rule} | {row['accuracy']:.2f} ± {row['std']:.2f} | "
                         f"{row['points_lost']:.2f} | {row['speedup']:.1f}x | {cpu} | "
                         f"1/{row['steps_ratio']:.1f} | {row['select_seconds']:.1f} |")
    lines += ["", ("*Saturates at*: the smallest fraction whose mean accuracy is within 1 point "
                   "of the whole set's."), ""]
    return "\n".join(lines)


def curve_figure(state: dict, title: str) -> Any:
    """Two panels: accuracy against fraction (log axis) per rule with the whole set as a line,
    and the training speed-up against the whole set in CPU time (wall time for cells that
    predate it), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(state)
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(12, 4.6))
    w = s["whole"]
    for rule, r in s["rules"].items():
        fs = sorted(r["fractions"])
        acc = [r["fractions"][f]["accuracy"] for f in fs]
        std = [r["fractions"][f]["std"] for f in fs]
        speed = [r["fractions"][f]["cpu_speedup"] or r["fractions"][f]["speedup"] for f in fs]
        if w is not None:   # every rule ends at the whole set
            fs, acc, std, speed = fs + [1.0], acc + [w["accuracy"]], std + [w["std"]], speed + [1.0]
        ax_acc.errorbar(fs, acc, yerr=std, marker="o", ms=3, capsize=2, label=rule)
        ax_time.plot(fs, speed, marker="o", ms=3, label=rule)
    if s["whole"] is not None:
        ax_acc.axhline(s["whole"]["accuracy"], color="k", ls="--", lw=1, label=WHOLE)
        ax_acc.axhline(s["whole"]["accuracy"] - ARTICLE["points_lost"], color="grey", ls=":",
                       lw=1, label="whole - 2.2 pt (article)")
    ax_time.axhline(ARTICLE["speedup"], color="grey", ls=":", lw=1, label="8x (article)")
    ax_time.plot([0.01, 1], [100, 1], color="k", lw=0.5, ls="--", label="1 / fraction")
    for ax in (ax_acc, ax_time):
        ax.set_xscale("log")
        ax.set_xlabel("fraction of the training set (log)")
        ax.grid(alpha=0.3, which="both")
    ax_time.set_yscale("log")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_time.set_ylabel("training speed-up vs whole set (CPU time; x, log)")
    ax_acc.set_title(f"{title}: accuracy")
    ax_time.set_title(f"{title}: training time saved")
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
