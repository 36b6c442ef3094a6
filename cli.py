"""``gtnkit``: the command line over the gtnkit library.

Every command maps its options to the library's config objects, calls one library function and
writes ``config.json``, ``results.json`` and its artefacts atomically into ``--out``. Library
errors become one-line usage errors; nothing is written when a command is refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from cli_kip import KIP_METHOD_HELP, KIP_METHODS, kip_distill, kip_options, krr_options

log = logging.getLogger("gtnkit")


# --------------------------------------------------------------------------- plumbing
def _library_errors() -> tuple[type[BaseException], ...]:
    from distill.augment import AugmentError
    from distill.condense import ConfigError, NonFiniteError
    from distill.data import DataError
    from distill.devices import DeviceError
    from distill.models import ModelError
    from distill.store import StoreError
    from gtn.generator import GeneratorError
    from gtn.nas import NASError
    from selection import SelectionError

    return (DataError, StoreError, SelectionError, ModelError, DeviceError, AugmentError,
            ConfigError, NonFiniteError, GeneratorError, NASError)


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: what went wrong and on which path."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    if path is None:
        return f"file system error: {reason}"
    return f"file system error on {path}: {reason}"


class GtnkitGroup(click.Group):
    """The root group: an OS error anywhere in a command (a full disk, a folder made read-only
    mid-run) is one line naming the path, and Ctrl-C (SIGINT) exits with 130, the shell's code
    for it, after every open output folder is released (atomic writes leave no partial file)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, Exception) as exc:
            if not interrupted(exc):
                if isinstance(exc, OSError) and exc.errno != errno.EPIPE:  # EPIPE: click's
                    raise click.ClickException(os_error_line(exc)) from None
                raise
            click.echo("Interrupted: stopped (files already written are complete; a "
                       "checkpointed run continues with --resume).", err=True)
            raise click.exceptions.Exit(130) from None


def interrupted(exc: BaseException | None) -> bool:
    """Whether Ctrl-C is behind ``exc``: a KeyboardInterrupt itself, or one that another
    exception wraps (Python turns one raised inside ``__set_name__``, as during a lazy import,
    into a RuntimeError caused by it) or was raised while handling."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def claim_out(out: str, force: bool, resume: bool = False) -> Path:
    """Own the output folder for the rest of the command (see :mod:`distill.outdir`): refused
    when it holds a run (without ``--force``), cannot be created or written, or is in use by
    another run; released (lock file removed, created empty folders removed) when the command
    ends, however it ends."""
    from distill.outdir import open_run_dir

    ctx = click.get_current_context()
    return ctx.with_resource(open_run_dir(out, overwrite=force and not resume, resume=resume))


def check_writable(folder: str, option: str) -> None:
    """A folder besides --out that the command will write (a cache): created and probed before
    any work; an unwritable one is one line naming the option and the path."""
    from distill.outdir import OutDirError
    from distill.outdir import check_writable as probe

    try:
        probe(folder)
    except OutDirError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def handle_errors(fn: Callable) -> Callable:
    """Turn the library's typed errors into one-line click usage errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from distill.outdir import OutDirError

        try:
            return fn(*args, **kwargs)
        except OutDirError as exc:  # not a usage mistake: no usage block, just the line
            raise click.ClickException(str(exc)) from None
        except _library_errors() as exc:
            raise click.UsageError(str(exc)) from None

    return wrapper


class StatusTask:
    """Progress as one plain status line every ``interval`` seconds (and one at the end): what a
    log file gets instead of bars when stderr is not a terminal."""

    def __init__(self, description: str, total: int, interval: float,
                 echo: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.description, self.total, self.interval = description, max(int(total), 0), interval
        self.echo, self.clock = echo, clock
        self.done = 0
        self.start = self.last = clock()
        self.shown = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.show(now)

    def show(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.last, self.shown = now, self.done
        elapsed = now - self.start
        line = f"{self.description}: {self.done}/{self.total}"
        if self.total:
            line += f" ({100 * self.done / self.total:.0f} %)"
        line += f", {_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            line += f", ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        self.echo(line)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


#: Seconds between two status lines when stderr is not a terminal.
STATUS_INTERVAL = 30.0


class ClickProgress:
    """:class:`distill.progress.Progress` drawn with click progress bars on a terminal, and as
    a periodic one-line status (step, total, elapsed, ETA) when stderr is a file or a pipe."""

    def __init__(self, enabled: bool, interval: float = STATUS_INTERVAL,
                 terminal: bool | None = None):
        self.enabled, self.interval = enabled, interval
        self.terminal = sys.stderr.isatty() if terminal is None else terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if not self.enabled:
            from distill.progress import NullProgress

            with NullProgress().task(description, total) as t:
                yield t
            return
        if not self.terminal:
            status = StatusTask(description, total, self.interval,
                                lambda line: click.echo(line, err=True))
            yield status
            if status.shown != status.done:
                status.show()
            return
        with click.progressbar(length=total, label=description, file=sys.stderr,
                               show_eta=True, show_percent=True) as bar:
            yield bar


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _provenance() -> dict:
    import torch

    return {"gtnkit": _version("gtnkit"), "torch": torch.__version__,
            "python": sys.version.split()[0]}


def write_run(out: Path, command: str, config: dict, results: dict) -> None:
    from distill.store import atomic_write_json

    atomic_write_json(out / "config.json", {"command": command, **config, **_provenance()})
    atomic_write_json(out / "results.json", results)


class TableChoice(click.Choice):
    """A click choice whose names come from a library table, read when first needed (the
    library imports torch; ``gtnkit --help`` stays instant)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = functools.cache(lambda: tuple(names()))
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return self._names()

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns; the table decides
        pass


class TableHelpOption(click.Option):
    """An option whose help text is built from a library table when ``--help`` shows it."""

    def __init__(self, *args: Any, help_from: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._help_from = help_from

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self._help_from()
        return super().get_help_record(ctx)


# the library's tables (imported on first use)
def _condense_methods() -> dict[str, Any]:
    from distill.methods import METHODS

    return METHODS


def _selection_rules() -> list[str]:
    from selection import available_methods

    return available_methods()


def _datasets() -> list[str]:
    from distill.data import DATASETS

    return list(DATASETS)


def _gtn_methods() -> dict[str, str]:
    from gtn.train import GTN_METHODS

    return GTN_METHODS


def _curricula() -> tuple[str, ...]:
    from gtn.generator import CURRICULA

    return CURRICULA


def _gtn_budgets() -> list[str]:
    from gtn.compare import BUDGETS

    return list(BUDGETS)


def _nas_budgets() -> list[str]:
    from gtn.nas import NAS_BUDGETS

    return list(NAS_BUDGETS)


def _method_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in _condense_methods().values()) + "."


def _distill_methods() -> list[str]:
    return [*_condense_methods(), *KIP_METHODS]


def _distill_method_help() -> str:
    return _method_help()[:-1] + "; " + KIP_METHOD_HELP + "."


def _gtn_method_help() -> str:
    return "Meta-gradient of the generator: " + "; ".join(
        f"{name}: {text}" for name, text in _gtn_methods().items()) + "."


def _in_cli_terms(check: Callable[..., Any], option: str, *args: Any) -> Any:
    """``check(*args)``, its one-line library error reported against ``option``."""
    from selection import SelectionError

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


# shared options
def data_options(fn: Callable) -> Callable:
    fn = click.option("--download", is_flag=True,
                      help="Fetch missing files with torchvision (needs internet).")(fn)
    fn = click.option("--data-root", type=click.Path(file_okay=False), envvar="GTNKIT_DATA",
                      help="Folder with the torchvision layouts (MNIST/raw, "
                           "cifar-10-batches-py, ...). Default: $GTNKIT_DATA.")(fn)
    return fn


def run_options(fn: Callable) -> Callable:
    fn = click.option("--force", is_flag=True,
                      help="Overwrite an output folder that already holds a run.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="auto (CUDA when present), cpu, cuda or cuda:N.")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed for every random choice of the run.")(fn)
    fn = click.option("--out", type=click.Path(file_okay=True), required=True,
                      help="Output folder (config.json, results.json, artefacts).")(fn)
    return fn


def _progress(ctx: click.Context) -> ClickProgress:
    return ClickProgress(enabled=ctx.obj.get("verbosity", 0) >= 0)


# --------------------------------------------------------------------------- commands
@click.group(cls=GtnkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True,
              help="Less output: no progress bars or status lines, warnings only.")
@click.version_option(_version("gtnkit"), prog_name="gtnkit")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """gtnkit: make a tiny training set that trains a network almost as well as the full data.

    Select a coreset (`select`), measure accuracy against the fraction of data kept
    (`curve`), condense a set (`distill`), train and compare Generative
    Teaching Networks (`gtn train|sample|compare`), score any saved set by training fresh
    students (`evaluate`), compare runs (`compare`), rank architectures with a cheap proxy
    (`nas`), look at a set (`show`), and list the data sets found offline (`datasets`).
    """
    level = verbose - quiet
    ctx.ensure_object(dict)["verbosity"] = level
    from distill.devices import silence_cuda_home_warning

    silence_cuda_home_warning()
    logging.basicConfig(level={-1: logging.WARNING, 0: logging.INFO}.get(
        level, logging.DEBUG if level > 0 else logging.ERROR), format="%(message)s",
        stream=sys.stderr)


@main.command()
@click.option("--data-root", type=click.Path(file_okay=False), envvar="GTNKIT_DATA",
              help="Folder to look in. Default: $GTNKIT_DATA.")
@handle_errors
def datasets(data_root: str | None) -> None:
    """List the supported data sets and whether each is present and valid under the root."""
    from distill.data import available_datasets, dataset_status, resolve_root

    root = resolve_root(data_root)
    click.echo(f"data root: {root}")
    for name in available_datasets():
        ok, message = dataset_status(name, root)
        click.echo(f"  {name:<14} {'ok     ' if ok else 'missing'}  {message}")


@main.command()
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
@click.option("--method", required=True, type=TableChoice(_selection_rules),
              help="Selection rule.")
@click.option("--ipc", type=int, default=None,
              help="Images per class to select (or --fraction).")
@click.option("--fraction", type=float, default=None,
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

    Writes OUT/set.pt (images, labels, indices, metadata), config.json and results.json.
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
    from dataclasses import asdict

    from distill.data import load_dataset
    from distill.devices import resolve_device
    from distill.models import parse_model_spec
    from distill.store import SavedSet, save_set
    from selection import SignalConfig, SignalProvider, get_method
    from selection import select as run_select
    from selection.budget import budget_counts, check_fraction
    from selection.cache import default_cache_root

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
    provider = SignalProvider(data, signal_config, seed=seed, device=dev, progress=_progress(ctx),
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
    save_set(out_dir / "set.pt", SavedSet(data.images[sel.indices], sel.labels, meta))
    write_run(out_dir, "select", config, {
        "seconds": seconds, "n_images": len(sel), "counts": list(sel.counts),
        "signal_cache": {"fingerprint": provider.fingerprint, "hit": provider.cache_hit,
                         "epochs_trained": provider.epochs_trained},
        "signal_seconds": provider.seconds, "indices": sel.indices.tolist(),
        "set": str(out_dir / "set.pt")})
    budget = f"{ipc} per class" if ipc is not None else f"fraction {fraction:g}"
    cache = ("" if provider.fingerprint is None else
             " (signals from the cache)" if provider.cache_hit else "")
    click.echo(f"selected {len(sel)} images ({budget}) of {data.info.name} with "
               f"{sel.method} in {seconds:.1f} s{cache} -> {out_dir / 'set.pt'}")


@main.command()
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
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
@click.option("--lr", type=float, default=0.01, show_default=True,
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
    from dataclasses import asdict

    from distill.data import load_dataset
    from distill.devices import resolve_device
    from distill.engine import TrainConfig
    from distill.models import parse_model_spec
    from distill.store import atomic_write_text, save_figure
    from selection import SignalConfig, SignalProvider
    from selection.budget import check_fraction
    from selection.cache import default_cache_root
    from selection.curve import CurveConfig, curve_figure, curve_markdown, run_curve, summarise

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
                              progress=_progress(ctx),
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


@main.command()
@click.argument("set_path", metavar="SET.pt", type=click.Path(dir_okay=False))
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
@click.option("--lr", type=float, default=None, help="Student lr (default: the protocol's, 0.01).")
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
def evaluate(ctx, set_path, model, protocol, students, epochs, augment, lr, batch_size,
             test_limit, resume, data_root, download, out, seed, device, force, kernel,
             kernel_depth, reg, krr) -> None:
    """Train fresh students on a saved set and report their test accuracy (mean ± std).

    Also scores the set by kernel ridge regression with an FC kernel (--kernel, the KIP
    paper's protocol; --no-krr skips it); results.json keeps the two apart ("krr" and the
    trained students' "protocol"). Students are trained as the paper of the set's method
    scores its sets (--protocol); results.json names the protocol. Each finished student is
    checkpointed in
    OUT/progress.json; after a kill, the same command with --resume trains only the missing
    students and gives the same result.
    """
    from dataclasses import asdict

    from cli_kip import check_kernel_options, describe, krr_score
    from distill.data import load_dataset
    from distill.devices import resolve_device
    from distill.engine import evaluate_set
    from distill.kip import training_labels
    from distill.models import parse_model_spec
    from distill.protocols import default_protocol, describe_protocol, make_protocol
    from distill.store import PartialResults, load_set

    if krr:
        check_kernel_options(kernel, kernel_depth, reg)
    out_dir = claim_out(out, force, resume)
    parse_model_spec(model)
    saved = load_set(set_path)
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
                                                 if k != "indices"},
              "protocol": asdict(protocol), "seed": seed, "device": str(dev)}
    checkpoint = PartialResults(out_dir / "progress.json", config, resume)
    result = evaluate_set(saved.images.to(dev), training_labels(saved.labels).to(dev),
                          test.images.to(dev), test.labels.to(dev), protocol, seed,
                          num_classes=test.info.num_classes,
                          progress=_progress(ctx), done=checkpoint.state.get("accuracies", []),
                          on_student=lambda i, acc: checkpoint.append("accuracies", acc))
    results = {**result.as_dict(), "protocol": describe_protocol(protocol),
               "protocol_name": protocol.name, "protocol_changes": sorted(changes)}
    if krr:
        results["krr"] = krr_score(saved.images.to(dev), saved.labels.to(dev), test.to(dev),
                                   kernel, kernel_depth, reg)
    write_run(out_dir, "evaluate", config, results)
    checkpoint.finish()
    click.echo(f"{saved.meta.get('method', 'set')} ({len(saved.labels)} images) -> "
               f"{describe(results, students)} [{result.seconds:.0f} s]")

@main.command(name="distill")
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
@click.option("--method", required=True, type=TableChoice(_distill_methods),
              cls=TableHelpOption, help_from=_distill_method_help)
@click.option("--ipc", type=click.IntRange(min=1), required=True, help="Images per class.")
@click.option("--init", "init", default="real", show_default=True,
              type=TableChoice(lambda: ["noise", "real", *_selection_rules()]),
              help="noise, real (random real images) or a selection method whose coreset "
                   "seeds the synthetic set.")
@click.option("--model", default="convnet", show_default=True,
              help="Student meta-trained against (zoo spec, e.g. convnet:width=32).")
@click.option("--iterations", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Meta-iterations (updates of the synthetic images).")
@click.option("--lr", "image_lr", type=float, default=None,
              help="Teacher (image) lr. Default: 0.1 dc/dsa, 1.0 dm (SGD, momentum 0.5); "
                   "0.01 dd/ift (Adam).")
@click.option("--real-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Real images per class per step (dd/ift: the scoring batch).")
@click.option("--outer-loop", type=click.IntRange(min=1), default=None,
              help="DC outer loop (default by IPC: 1->1, 10->10, 50->50).")
@click.option("--inner-loop", type=click.IntRange(min=1), default=None,
              help="DC inner loop (default by IPC: 1->1, 10->50, 50->10).")
@click.option("--distance", type=click.Choice(["layerwise", "mse", "cosine"]),
              default="layerwise", show_default=True, help="Gradient distance (dc/dsa).")
@click.option("--inner-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Student steps T of dd/ift.")
@click.option("--inner-lr", type=float, default=0.01, show_default=True,
              help="Student lr of dd/ift (initial value with --learn-lr).")
@click.option("--truncate", type=click.IntRange(min=1), default=None,
              help="dd: differentiate only the last K student steps.")
@click.option("--checkpoint-steps", type=click.IntRange(min=1), default=None,
              help="dd: gradient checkpointing, segments of this many steps.")
@click.option("--neumann-terms", type=click.IntRange(min=0), default=5, show_default=True,
              help="ift: terms K of the Neumann series for the inverse Hessian.")
@click.option("--neumann-alpha", type=float, default=0.01, show_default=True,
              help="ift: step size alpha of the Neumann series.")
@click.option("--learn-labels", is_flag=True,
              help="Also learn the labels: soft labels (probabilities), or for kip free "
                   "real-valued label vectors as in the KIP paper.")
@click.option("--learn-lr", is_flag=True, help="dd: also learn the student lr.")
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
@kip_options
@data_options
@run_options
@click.pass_context
@handle_errors
def distill_cmd(ctx, dataset, method, ipc, init, model, iterations, image_lr, real_batch,
                outer_loop, inner_loop, distance, inner_steps, inner_lr, truncate,
                checkpoint_steps, neumann_terms, neumann_alpha, learn_labels, learn_lr,
                checkpoint_every, eval_every, students, eval_model, eval_epochs, test_limit,
                signal_epochs, pool_per_class, fast, real_chunk, resume, data_root, download, out,
                seed, device, force, **kip) -> None:
    """Condense DATASET into IPC learnable images per class (DC, DSA, DM, DD, IFT, KIP, LS).

    Writes OUT/set.pt, grid.png, config.json and results.json (final accuracy, loss history,
    seconds per iteration, peak memory); OUT/checkpoint.pt every --checkpoint-every
    iterations, from which --resume continues to the same result as an uninterrupted run.
    kip / ls sets are scored twice: by kernel ridge regression (the KIP paper) and by training
    --eval-model students (the DC protocol); the results say which number is which.
    """
    if method in KIP_METHODS:
        return kip_distill(ctx, **{k: v for k, v in locals().items() if k not in ("ctx", "kip")},
                           **kip)
    from dataclasses import asdict, replace

    from distill.condense import condense, condense_config
    from distill.data import load_dataset
    from distill.devices import real_chunk_for, resolve_device
    from distill.engine import evaluate_set
    from distill.grid import write_grid
    from distill.methods import get_method
    from distill.models import parse_model_spec
    from distill.protocols import default_protocol, describe_protocol, make_protocol
    from distill.store import save_set

    out_dir = claim_out(out, force, resume)
    parse_model_spec(model)
    parse_model_spec(eval_model or model)
    if learn_lr and not get_method(method).learns_lr:
        raise click.BadParameter(f"only dd learns the student lr, not {method}",
                                 param_hint="--learn-lr")
    chunked = get_method(method).strategy in ("matching", "distribution")
    if real_chunk is not None and not chunked:
        raise click.BadParameter(f"applies to dc, dsa and dm, not to {method}",
                                 param_hint="--real-chunk")
    dev = resolve_device(device)
    if real_chunk is None and chunked:
        real_chunk = real_chunk_for(dev)
    config = condense_config(
        method, iterations=iterations, lr=image_lr, dataset=dataset, real_batch=real_batch,
        outer_loop=outer_loop, inner_loop=inner_loop, distance=distance,
        inner_lr=inner_lr, truncate=truncate,
        checkpoint_every=checkpoint_every, eval_every=eval_every,
        neumann_terms=neumann_terms, neumann_alpha=neumann_alpha,
        checkpoint_steps=checkpoint_steps, compile=fast, real_chunk=real_chunk or None)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    counts = data.class_counts()
    if ipc > int(counts.min()):
        raise click.BadParameter(f"{ipc} exceeds the smallest class ({int(counts.min())})",
                                 param_hint="--ipc")
    test = load_dataset(dataset, "test", root=data_root, download=download)
    protocol = make_protocol(default_protocol(method), dataset, model=eval_model or model,
                             n_students=max(students, 1), test_limit=test_limit,
                             **({"epochs": eval_epochs} if eval_epochs else {}))
    init_value: Any = init
    if init not in ("noise", "real"):  # a coreset seeds the synthetic set
        from selection import SignalConfig
        from selection import select as run_select

        init_value = run_select(data, init, ipc, seed=seed,
                                signal_config=SignalConfig.of(epochs=signal_epochs,
                                                              pool_per_class=pool_per_class),
                                device=dev, progress=_progress(ctx)).indices
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
                             resume=resume, progress=_progress(ctx),
                             evaluate=periodic if eval_every else None)
    saved = teacher.to_saved({"dataset": data.info.name, "method": method, "init": init,
                              "seed": seed, "config": run_config, "protocol": protocol.name})
    results: dict = {"label": f"{method} init={init}", "method": method, "init": init,
                     "ipc": ipc, "meta": meta.as_dict(),
                     "seconds_per_iteration": meta.seconds_per_iteration,
                     "memory": meta.memory}
    if students:
        ev = evaluate_set(saved.images.to(dev), saved.labels.to(dev), test_x, test_y, protocol,
                          seed=seed, num_classes=data.info.num_classes, progress=_progress(ctx))
        results.update(ev.as_dict(), protocol=describe_protocol(protocol),
                       protocol_name=protocol.name)
    results["wall_seconds"] = time.perf_counter() - start
    save_set(out_dir / "set.pt", saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "distill", run_config, results)
    acc = (f"{results['mean']:.2f} ± {results['std']:.2f} % test accuracy over {students} "
           f"student(s), {protocol.name} protocol") if students else "not evaluated"
    click.echo(f"{method} ({ipc} per class, init {init}) -> {acc}; "
               f"{meta.seconds_per_iteration:.2f} s/iteration; set in {out_dir / 'set.pt'}")


@main.command()
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
    from distill.stats import comparison_markdown
    from distill.store import StoreError, atomic_write_text

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
                f"run); compare takes runs that trained students: `gtnkit evaluate SET.pt`, "
                f"`gtnkit distill` with --students >= 1, `gtnkit gtn train` (evaluate a "
                f"`select` run's set.pt first)")
        meta = config.get("set_meta", config)
        key = {"label": results.get("label") or meta.get("method", Path(run).name),
               "method": meta.get("method", "?"), "init": meta.get("init", "?"),
               "run": Path(run).name}[by]
        groups.setdefault(str(key), []).extend(float(a) for a in accs)
    text = comparison_markdown(groups)
    if out:
        atomic_write_text(out, text)
    click.echo(text, nl=False)


@main.command()
@click.argument("set_path", metavar="SET.pt", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(), required=True, help="Output folder (grid.png).")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images shown per class (one row per class).")
@click.option("--force", is_flag=True, help="Overwrite an output folder that holds a run.")
@handle_errors
def show(set_path, out, per_class, force) -> None:
    """Draw a saved set as a PNG grid, one row per class."""
    from distill.grid import write_grid
    from distill.store import load_set

    out_dir = claim_out(out, force)
    saved = load_set(set_path)
    shown, ncol = write_grid(out_dir / "grid.png", saved, per_class)
    write_run(out_dir, "show", {"set": str(set_path), "per_class": per_class},
              {"png": str(out_dir / "grid.png"), "images_shown": shown})
    click.echo(f"wrote {out_dir / 'grid.png'} ({shown} images, {ncol} per class)")


# --------------------------------------------------------------------------- gtn
@main.group()
def gtn() -> None:
    """Generative Teaching Networks: train a generator, sample sets from it, compare the
    unrolled / implicit / matching meta-gradients by memory and accuracy."""


def _int_list(value: str, name: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}",
                                 param_hint=name) from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"every value must be >= 1, got {value!r}", param_hint=name)
    return items


# gtn.train.RECIPES in words (kept here so that `gtnkit --help` does not import torch; a test
# checks that it names every value of the table).
RECIPES_HELP = ("Recipes (measured on MNIST; see the README's GTN recipe section): "
                "unrolled: meta_lr=0.005, meta_schedule=cosine, real_batch=512, "
                "intermediate_every=1; implicit: meta_lr=0.005, meta_schedule=cosine, "
                "real_batch=512, mixed_at=trajectory, step_size_grad=True, unroll_tail=5, "
                "grad_clip=0.5; "
                "matching: meta_lr=0.005, meta_schedule=cosine, match_curriculum=True, "
                "inner_lr=0.05, inner_momentum=0.8.")


@gtn.command("train", epilog=RECIPES_HELP)
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
@click.option("--method", type=TableChoice(_gtn_methods), default="unrolled", show_default=True,
              cls=TableHelpOption, help_from=_gtn_method_help)
@click.option("--inner-steps", default="32", show_default=True,
              help="T: student steps per meta-iteration (one value; `gtn compare` compares "
                   "several).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generated images per student step.")
@click.option("--curriculum", type=TableChoice(_curricula), default="full", show_default=True,
              help="Where the noise of inner step t comes from: none (fresh noise every step), "
                   "all-shuffled (one learned pool, shuffled across steps), shuffled-batch "
                   "(T learned batches, order shuffled), full (T learned batches in order; "
                   "the paper's best).")
@click.option("--learn-labels", is_flag=True, help="Learn soft labels of the curriculum.")
@click.option("--student", default="convnet:width=32", show_default=True,
              help="Zoo spec of the student.")
@click.option("--width-choices", default=None,
              help="Randomise the student's width per meta-iteration, e.g. 16,32,64.")
@click.option("--meta-iterations", type=click.IntRange(min=1), default=200, show_default=True,
              help="Updates of the generator (each trains a fresh student T steps).")
@click.option("--recipe/--no-recipe", default=True, show_default=True,
              help="Train with the method's measured recipe (below); options given explicitly "
                   "override it. --no-recipe: the bare defaults.")
@click.option("--meta-lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Adam lr of the generator [default: recipe, else 1e-3].")
@click.option("--meta-schedule", type=click.Choice(["constant", "cosine"]), default=None,
              help="Meta-lr over the run (cosine: down to --meta-lr-floor) "
                   "[default: recipe, else constant].")
@click.option("--meta-lr-floor", type=click.FloatRange(0.0, 1.0), default=0.1,
              show_default=True, help="cosine: the last meta-lr as a fraction of --meta-lr.")
@click.option("--grad-clip", type=click.FloatRange(min=0.0), default=None,
              help="Clip the generator's meta-gradient to this L2 norm (0: off) "
                   "[default: recipe, else off].")
@click.option("--intermediate-every", type=click.IntRange(min=0), default=None,
              help="unrolled: also score the student on the real batch after every N-th "
                   "inner step (0: off) [default: recipe, else 0].")
@click.option("--intermediate-weight", type=click.FloatRange(min=0.0), default=1.0,
              show_default=True, help="Weight of the mean intermediate loss in the meta-loss.")
@click.option("--mixed-sample", type=click.IntRange(min=1), default=None,
              help="implicit: the mixed term from this many of the T batches (unbiased "
                   "estimate; default all).")
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
                   "[default: recipe, else 128].")
@click.option("--inner-lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="The student's lr per step: where learned (unrolled; implicit with "
                   "--step-size-grad) its initial value, else fixed [default: recipe, else "
                   "0.02].")
@click.option("--inner-momentum", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="The student's momentum, likewise [default: recipe, else 0.5].")
@click.option("--match-curriculum/--match-fresh", default=None,
              help="matching: match the T curriculum batches in order at the states a student "
                   "trained on them visits, or DC's rounds on fresh noise with a plain SGD "
                   "student [default: recipe, else fresh].")
@click.option("--validation", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Training images held out for validation.")
@click.option("--noise-dim", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generator: length of the noise vector (one-hot label appended).")
@click.option("--width-fc", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Generator: width of the fully connected layer.")
@click.option("--width-conv", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generator: channels of the convolutional layers.")
@click.option("--weight-norm/--no-weight-norm", default=True, show_default=True,
              help="Generator: weight normalisation on its layers.")
@click.option("--checkpoint-steps", type=click.IntRange(min=1), default=None,
              help="unrolled: gradient checkpointing, segments of this many steps.")
@click.option("--recompute", is_flag=True,
              help="unrolled: keep only each inner step's student state and rebuild the steps "
                   "one at a time in the backward pass: the same meta-gradient (intermediate "
                   "losses included), memory of one step, flat in T.")
@click.option("--neumann-terms", type=click.IntRange(min=0), default=5, show_default=True,
              help="implicit: terms K of the Neumann series for the inverse Hessian.")
@click.option("--neumann-alpha", type=float, default=0.02, show_default=True,
              help="implicit: step size alpha of the Neumann series.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Write OUT/checkpoint.pt every N meta-iterations (what --resume continues "
                   "from).")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Few-step validation accuracy every N meta-iterations.")
@click.option("--students", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fresh students trained T steps on the generator's curriculum to score it.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@data_options
@run_options
@click.pass_context
@handle_errors
def gtn_train(ctx, dataset, method, inner_steps, batch_size, curriculum, learn_labels, student,
              width_choices, meta_iterations, recipe, meta_lr, meta_schedule, meta_lr_floor,
              grad_clip,
              intermediate_every, intermediate_weight, mixed_sample, mixed_at, step_size_grad,
              unroll_tail, real_batch, inner_lr, inner_momentum, match_curriculum, validation,
              noise_dim, width_fc, width_conv, weight_norm, checkpoint_steps, recompute,
              neumann_terms, neumann_alpha,
              checkpoint_every, eval_every, students, resume, data_root, download, out, seed,
              device, force) -> None:
    """Meta-train a generator teacher on DATASET; writes OUT/generator.pt, grid.png,
    config.json and results.json (few-step test accuracy, peak memory, s/meta-step)."""
    from dataclasses import asdict

    from distill.data import get_info, load_dataset
    from distill.devices import resolve_device
    from distill.engine import mean_std
    from distill.grid import write_grid
    from distill.store import SavedSet
    from gtn import GeneratorConfig, few_step_accuracy, recipe_config, save_generator, train_gtn

    out_dir = claim_out(out, force, resume)
    steps = _int_list(inner_steps, "--inner-steps")
    if len(steps) != 1:
        raise click.BadParameter(
            f"gtn train trains one generator with one T (e.g. --inner-steps 32), got "
            f"{inner_steps!r}; `gtnkit gtn compare --inner-steps 8,16,32` compares several",
            param_hint="--inner-steps")
    widths = tuple(_int_list(width_choices, "--width-choices")) if width_choices else None
    given = {k: v for k, v in dict(meta_lr=meta_lr, meta_schedule=meta_schedule,
                                   intermediate_every=intermediate_every,
                                   step_size_grad=step_size_grad, mixed_at=mixed_at,
                                   real_batch=real_batch, inner_lr=inner_lr,
                                   inner_momentum=inner_momentum,
                                   match_curriculum=match_curriculum, grad_clip=grad_clip,
                                   unroll_tail=unroll_tail).items() if v is not None}
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None  # 0 turns off a recipe's clip
    if match_curriculum is not None and method != "matching":
        raise click.BadParameter("only --method matching matches (along the curriculum or on "
                                 "fresh noise)", param_hint="--match-curriculum/--match-fresh")
    if unroll_tail and method != "implicit":
        raise click.BadParameter("only --method implicit has a tail to unroll",
                                 param_hint="--unroll-tail")
    if unroll_tail and (mixed_at == "final" or (mixed_at is None and not recipe)):
        raise click.BadParameter("needs --mixed-at trajectory (the implicit recipe's)",
                                 param_hint="--unroll-tail")
    config = recipe_config(
        method, recipe, inner_steps=steps[0], batch_size=batch_size, curriculum=curriculum,
        learn_labels=learn_labels, student=student, width_choices=widths,
        meta_iterations=meta_iterations, meta_lr_floor=meta_lr_floor,
        intermediate_weight=intermediate_weight, mixed_sample=mixed_sample,
        validation=validation, **given,
        generator=GeneratorConfig(noise_dim=noise_dim, width_fc=width_fc, width_conv=width_conv,
                                  weight_norm=weight_norm),
        checkpoint_steps=checkpoint_steps, recompute=recompute, neumann_terms=neumann_terms,
        neumann_alpha=neumann_alpha, checkpoint_every=checkpoint_every, eval_every=eval_every)
    config.check(get_info(dataset))
    dev = resolve_device(device)
    data = load_dataset(dataset, "train", root=data_root, download=download)
    test = load_dataset(dataset, "test", root=data_root, download=download)
    teacher, meta, _ = train_gtn(data, config, seed=seed, device=dev,
                                 checkpoint=out_dir / "checkpoint.pt", resume=resume,
                                 progress=_progress(ctx))
    accs = few_step_accuracy(teacher, student, test.images.to(dev), test.labels.to(dev), seed,
                             students)
    mean, std = mean_std(accs)
    save_generator(out_dir / "generator.pt", teacher, config)
    images, labels = teacher.sample(8, torch_generator(seed))
    write_grid(out_dir / "grid.png", SavedSet(images.cpu(), labels.cpu(),
                                              {"dataset": data.info.name}), 8)
    run_config = {"dataset": data.info.name, "gtn": asdict(config), "seed": seed,
                  "device": str(dev)}
    write_run(out_dir, "gtn train", run_config,
              {"label": f"gtn {method} T={steps[0]}", "method": f"gtn-{method}",
               "accuracies": accs, "mean": mean, "std": std, "meta": meta.as_dict(),
               "seconds_per_meta_step": meta.seconds_per_iteration, "memory": meta.memory,
               "generator": str(out_dir / "generator.pt")})
    click.echo(f"gtn {method} (T={steps[0]}, {curriculum}) -> few-step test accuracy "
               f"{mean:.2f} ± {std:.2f} % over {students} student(s); "
               f"{meta.seconds_per_iteration:.2f} s/meta-step; {out_dir / 'generator.pt'}")


def torch_generator(seed: int):
    from distill.rng import generator

    return generator(seed, "sample")


@gtn.command("sample")
@click.argument("generator_path", metavar="GENERATOR.pt", type=click.Path(dir_okay=False))
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images generated per class.")
@click.option("--dataset", default=None, type=TableChoice(_datasets),
              help="Refuse a generator made for another data set's shape.")
@run_options
@handle_errors
def gtn_sample(generator_path, per_class, dataset, out, seed, device, force) -> None:
    """Export PER_CLASS generated images per class as a saved set (for evaluate/show/compare)."""
    from distill.devices import resolve_device
    from distill.grid import write_grid
    from distill.store import SavedSet, save_set
    from gtn import load_generator

    out_dir = claim_out(out, force)
    teacher, config = load_generator(generator_path, dataset)
    dev = resolve_device(device)
    teacher = teacher.to(dev)
    images, labels = teacher.sample(per_class, torch_generator(seed))
    meta = {"dataset": teacher.info.name, "method": f"gtn-{config.method}", "kind": "generated",
            "ipc": per_class, "seed": seed, "generator": str(generator_path)}
    saved = SavedSet(images.cpu(), labels.cpu(), meta)
    save_set(out_dir / "set.pt", saved)
    write_grid(out_dir / "grid.png", saved)
    write_run(out_dir, "gtn sample", {"generator": str(generator_path), "per_class": per_class,
                                      "seed": seed}, {"set": str(out_dir / "set.pt"),
                                                      "n_images": int(labels.numel())})
    click.echo(f"sampled {labels.numel()} images ({per_class} per class) -> "
               f"{out_dir / 'set.pt'}")


@gtn.command("compare")
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
@click.option("--methods", default="unrolled,unrolled-recompute,implicit,matching",
              show_default=True,
              help="Comma-separated meta-gradients of the generator, from unrolled, "
                   "unrolled-recompute (unrolled's gradient with its steps rebuilt in the "
                   "backward pass: flat memory), implicit, matching.")
@click.option("--inner-steps", default="8,16,32,64", show_default=True,
              help="Comma-separated T values.")
@click.option("--budget", type=TableChoice(_gtn_budgets), default="smoke", show_default=True,
              help="smoke: 2 meta-iterations, proves the path (accuracies mean nothing); "
                   "short: 20 meta-iterations, small generator and student, for a CPU; paper: "
                   "2000 meta-iterations, the paper's generator (wants a GPU).")
@click.option("--curriculum", type=TableChoice(_curricula), default="full", show_default=True,
              help="Where the noise of inner step t comes from: none (fresh noise every step), "
                   "all-shuffled (one learned pool, shuffled across steps), shuffled-batch "
                   "(T learned batches, order shuffled), full (T learned batches in order; "
                   "the paper's best).")
@click.option("--recipe/--no-recipe", default=True, show_default=True,
              help="Train each method with its measured recipe (see `gtn train --help`); "
                   "--no-recipe: the bare defaults.")
@click.option("--resume", is_flag=True, help="Keep finished cells; continue the running one.")
@data_options
@run_options
@click.pass_context
@handle_errors
def gtn_compare(ctx, dataset, methods, inner_steps, budget, curriculum, recipe, resume,
                data_root, download, out, seed, device, force) -> None:
    """Peak memory, seconds per meta-step and student accuracy of every method and T:
    OUT/gtn-compare.{json,md,png}."""
    from distill.data import load_dataset
    from distill.devices import resolve_device
    from gtn.compare import BUDGETS, run_comparison

    out_dir = claim_out(out, force, resume)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    from gtn.compare import COMPARE_METHODS

    bad = [m for m in names if m not in COMPARE_METHODS]
    if bad or not names:
        raise click.BadParameter(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from "
                                 f"{', '.join(COMPARE_METHODS)}", param_hint="--methods")
    steps = _int_list(inner_steps, "--inner-steps")
    dev = resolve_device(device)
    train_set = load_dataset(dataset, "train", root=data_root, download=download).to(dev)
    test_set = load_dataset(dataset, "test", root=data_root, download=download).to(dev)
    state = run_comparison(train_set, test_set, names, steps, BUDGETS[budget], out_dir,
                           seed=seed, device=dev, resume=resume, curriculum=curriculum,
                           recipe=recipe, progress=_progress(ctx), log=click.echo)
    from gtn.compare import comparison_table

    write_run(out_dir, "gtn compare", {"dataset": dataset, "methods": names, "inner_steps": steps,
                                       "budget": budget, "curriculum": curriculum,
                                       "recipe": recipe, "seed": seed, "device": str(dev)},
              {"cells": state["cells"], "table": str(out_dir / "gtn-compare.md")})
    click.echo(comparison_table(state), nl=False)


@main.command()
@click.option("--dataset", required=True, type=TableChoice(_datasets), help="Data set.")
@click.option("--n-candidates", type=click.IntRange(min=2), default=12, show_default=True,
              help="Architectures sampled from the zoo (reproducible by --seed).")
@click.option("--proxy", "proxies", multiple=True, required=True,
              metavar="gtn:RUN|gtn-steps:RUN|dc:RUN|coreset:METHOD|real-subset|real-steps",
              help="A proxy to rank the candidates with, repeatable. RUN: a `gtnkit gtn train`"
                   " / `gtnkit distill` output folder or its generator.pt / set.pt. gtn: the "
                   "generator's curriculum as a fixed set; gtn-steps: its own protocol (T "
                   "steps at its learned lrs and momentum).")
@click.option("--budget", type=TableChoice(_nas_budgets), default="smoke", show_default=True,
              help="Ground-truth and proxy training budget.")
@click.option("--families", default=None,
              help="Comma-separated model families to sample (default: the budget's), from "
                   "convnet, mlp, lenet, alexnet, vgg11, resnet18.")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Largest candidate, in parameters (default: the budget's).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="k of the top-k overlap (default: a quarter of the candidates).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that train candidates in parallel (spawned, each on --device);"
                   " same results as 1 when every process runs the same number of threads "
                   "(e.g. OMP_NUM_THREADS=1).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder of finished per-candidate results, reused by any later run "
                   "(default: OUT/cache). A killed run resumes by running it again.")
@click.option("--draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent draws of N candidates (draw d sampled with seed SEED + d; "
                   "students seeded by SEED alone, so a candidate in two draws is trained "
                   "once): per-draw, mean and pooled figures and a paired comparison of the "
                   "proxies.")
@data_options
@run_options
@click.pass_context
@handle_errors
def nas(ctx, dataset, n_candidates, proxies, budget, families, max_params, top_k, workers,
        cache, draws, data_root, download, out, seed, device, force) -> None:
    """Rank N sampled architectures by short proxy trainings and compare with the ranking of
    longer real training (validation split of the training set): Spearman / Kendall with
    bootstrap intervals (all and top half), top-k overlap, picked accuracy, speed-up, and a
    paired, Holm-adjusted comparison of the proxies (a winner only where it is significant).

    Writes OUT/nas.md, OUT/nas.png (proxy vs true accuracy), config.json and results.json.
    """
    from dataclasses import asdict

    from distill.data import get_info, load_dataset
    from distill.devices import resolve_device
    from distill.store import atomic_write_text
    from gtn.nas import (
        NAS_BUDGETS,
        draws_markdown,
        parse_proxies,
        plot_scatter,
        report_markdown,
        resolve_proxy,
        run_search,
    )

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
    data = load_dataset(info.name, "train", root=data_root, download=download)
    report = run_search(data, resolved, plan, n_candidates, seed=seed,
                        cache=Path(cache) if cache else out_dir / "cache", workers=workers,
                        device=dev, space=space, top_k=top_k, progress=_progress(ctx),
                        log=log.info, draws=draws)
    text = report_markdown(report) + "\n" + draws_markdown(report)
    atomic_write_text(out_dir / "nas.md", text)
    plotted = plot_scatter(report, out_dir / "nas.png")
    if not plotted:
        log.warning("matplotlib is not installed: no nas.png (pip install matplotlib)")
    report["png"] = str(out_dir / "nas.png") if plotted else None
    write_run(out_dir, "nas", {"dataset": info.name, "n_candidates": n_candidates,
                               "proxies": labels, "budget": budget, "space": asdict(space),
                               "top_k": top_k, "workers": workers, "seed": seed,
                               "draws": draws,
                               "device": str(dev)}, report)
    click.echo(text, nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
