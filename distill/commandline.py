"""The click plumbing every package's commands share (``distill.commands``,
``selection.commands``, ``gtn.commands``, ``gtn.nas.commands``; the root is ``cli.py``).

A command maps its options to the library's config objects, calls one library function and
writes ``config.json``, ``results.json`` and its artefacts atomically into ``--out``. This module
holds what that takes and nothing else: the library's typed errors as one-line usage errors
(:func:`handle_errors`), the output folder (:func:`claim_out`, :func:`write_run`), progress
(:func:`progress`), choices and help read from the library's tables (:class:`TableChoice`,
:class:`TableHelpOption`), the shared options (:func:`data_options`, :func:`run_options`) and
the refusal of options the chosen method does not read (:func:`refuse_out_of_scope`).

Two small registries let the packages above distill plug in without distill importing them:
their typed errors (:func:`register_usage_errors`) and the coreset rules that seed
``distill --init`` (:func:`register_coreset_init`); ``cli.py`` loads every package's commands
before any command runs, so both are complete by then. The library never imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .augment import AugmentError
from .data import DATASETS, DataError
from .devices import DeviceError
from .errors import ConfigError, NonFiniteError
from .executor import KINDS, ExecutorConfig, ExecutorError, SweepError
from .models import ModelError
from .outdir import OutDirError, open_run_dir
from .outdir import check_writable as probe_writable
from .progress import NullProgress
from .store import StoreError, atomic_write_json

__all__ = ["ClickProgress", "StatusTask", "TableChoice", "TableHelpOption", "check_writable",
           "claim_out", "coreset_inits", "data_options", "datasets", "handle_errors",
           "int_list", "progress", "refuse_out_of_scope", "register_coreset_init",
           "POSITIVE", "start_process", "executor_config", "executor_options", "finite",
           "memory_check_option", "implicit_options", "register_usage_errors", "run_options",
           "set_argument",
           "write_run"]


# ------------------------------------------------------------------ errors at the edge
#: The library's typed errors that mean "the input is wrong": one-line usage errors. The
#: packages above distill add theirs (:func:`register_usage_errors`) where their commands live.
_USAGE_ERRORS: list[type[BaseException]] = [
    DataError, StoreError, ModelError, DeviceError, AugmentError, ConfigError, NonFiniteError,
    ExecutorError]


def start_process() -> None:
    """What a command-line process sets once, before any command runs: torch's CUDA_HOME
    warning silenced (:func:`distill.devices.silence_cuda_home_warning`) and glibc told to
    keep freed memory (:func:`distill.allocator.keep_freed_memory`: no page fault per large
    tensor of a meta-step; nothing computed changes)."""
    from .allocator import keep_freed_memory
    from .devices import silence_cuda_home_warning

    silence_cuda_home_warning()
    keep_freed_memory()


def register_usage_errors(*types: type[BaseException]) -> None:
    """Report these errors of a package's library as one-line usage errors too."""
    _USAGE_ERRORS.extend(t for t in types if t not in _USAGE_ERRORS)


def handle_errors(fn: Callable) -> Callable:
    """Turn the library's typed errors into one-line click usage errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OutDirError, SweepError) as exc:  # not a usage mistake: just the line
            raise click.ClickException(str(exc)) from None
        except tuple(_USAGE_ERRORS) as exc:
            raise click.UsageError(str(exc)) from None

    return wrapper


def refuse_out_of_scope(ctx: click.Context, method: str,
                        scopes: Mapping[str, Collection[str]]) -> None:
    """Refuse, in one line, an option the user gave that ``method`` does not read.

    ``scopes`` maps a parameter name to the methods that read it. An option left at its
    default passes; one given on the command line (or by its environment variable) for
    another method is a usage error, never silently ignored.
    """
    for name, methods in scopes.items():
        if method in methods or ctx.get_parameter_source(name) in (
                None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        param = next(p for p in ctx.command.params if p.name == name)
        names = list(methods)
        listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise click.UsageError(f"{'/'.join([*param.opts, *param.secondary_opts])} applies to "
                               f"--method {listed} only, not to {method}")


# ------------------------------------------------------------------ the output folder
def claim_out(out: str, force: bool, resume: bool = False) -> Path:
    """Own the output folder for the rest of the command (see :mod:`distill.outdir`): refused
    when it holds a run (without ``--force``), cannot be created or written, or is in use by
    another run; released (lock file removed, created empty folders removed) when the command
    ends, however it ends."""
    ctx = click.get_current_context()
    return ctx.with_resource(open_run_dir(out, overwrite=force and not resume, resume=resume))


def check_writable(folder: str, option: str) -> None:
    """A folder besides --out that the command will write (a cache): created and probed before
    any work; an unwritable one is one line naming the option and the path."""
    try:
        probe_writable(folder)
    except OutDirError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


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
    """``config.json`` (the command, its config and the versions) and ``results.json``."""
    atomic_write_json(out / "config.json", {"command": command, **config, **_provenance()})
    atomic_write_json(out / "results.json", results)


# ------------------------------------------------------------------ progress
class StatusTask:
    """Progress as one plain status line every ``interval`` seconds (and one at the end): what a
    log file gets instead of bars when stderr is not a terminal. The ETA extrapolates the
    rate since the first update, so a slow start (data loading, ``torch.compile``'s first
    compilation) does not inflate it; the line of that first update has none."""

    def __init__(self, description: str, total: int, interval: float,
                 echo: Callable[[str], None], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.description, self.total, self.interval = description, max(int(total), 0), interval
        self.echo, self.clock = echo, clock
        self.done = 0
        self.start = self.last = clock()
        self.shown = -1
        self.first: tuple[float, int] | None = None  # (time, done) at the first update

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.first is None:
            self.first = (now, self.done)
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
        if self.first is not None and self.first[1] < self.done < self.total:
            rate = (now - self.first[0]) / (self.done - self.first[1])
            line += f", ETA {_duration(rate * (self.total - self.done))}"
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
                 terminal: bool | None = None) -> None:
        self.enabled, self.interval = enabled, interval
        self.terminal = sys.stderr.isatty() if terminal is None else terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if not self.enabled:
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


def progress(ctx: click.Context) -> ClickProgress:
    """The command's progress display: off under ``-q``."""
    return ClickProgress(enabled=(ctx.obj or {}).get("verbosity", 0) >= 0)


# ------------------------------------------------------------------ choices from tables
class TableChoice(click.Choice):
    """A click choice whose names come from a library table, read when first needed."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = functools.cache(lambda: tuple(names()))
        super().__init__(())

    @property
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


def datasets() -> list[str]:
    """The data sets a ``--dataset`` option offers."""
    return list(DATASETS)


#: Coreset rules that can seed a synthetic set (``distill --init RULE``): name -> function
#: ``(train_set, name, ipc, *, seed, device, progress, model, epochs, pool_per_class)`` giving
#: the indices. distill never imports selection, so ``selection.commands`` registers them.
_CORESET_INITS: dict[str, Callable[..., Any]] = {}


def register_coreset_init(name: str, init: Callable[..., Any]) -> None:
    """Offer ``name`` as ``--init`` of ``distill``, computed by ``init``."""
    _CORESET_INITS[name] = init


def coreset_inits() -> dict[str, Callable[..., Any]]:
    """The registered coreset seeds (see :func:`register_coreset_init`)."""
    return dict(_CORESET_INITS)


def int_list(value: str, name: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]``, every value >= 1; else one line naming ``name``."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}",
                                 param_hint=name) from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"every value must be >= 1, got {value!r}", param_hint=name)
    return items


# ------------------------------------------------------------------ shared options
def data_options(fn: Callable) -> Callable:
    fn = click.option("--download", is_flag=True,
                      help="Fetch missing files with torchvision (needs internet).")(fn)
    fn = click.option("--data-root", type=click.Path(file_okay=False), envvar="GTNKIT_DATA",
                      help="Folder with the torchvision layouts (MNIST/raw, "
                           "cifar-10-batches-py, ...). Default: $GTNKIT_DATA.")(fn)
    return fn


class _Finite(click.FloatRange):
    """A float option that must be finite (click's float and FloatRange accept ``nan``, which
    no bound refuses, and ``inf``), within optional bounds."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def finite(min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False) -> click.FloatRange:
    """The type of every float option: finite, and within the bounds given."""
    return _Finite(min, max, min_open=min_open, max_open=max_open)


#: The ranges of the float options several commands share (one definition each).
POSITIVE = finite(min=0.0, min_open=True)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--device`` is checked against what this build and machine run on, the same in every
    command, before any work (``distill.devices.resolve_device``)."""
    from .devices import resolve_device

    try:
        resolve_device(value)
    except DeviceError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def executor_options(fn: Callable) -> Callable:
    """Where a sweep's independent items run (:class:`distill.executor.ExecutorConfig`);
    :func:`executor_config` builds the config from them."""
    fn = click.option("--gpus-per-item", type=finite(min=0.0), default=0.0, show_default=True,
                      help="ray: GPUs each item holds (0.25: four items share a GPU); needs "
                           "--device cuda.")(fn)
    fn = click.option("--cpus-per-item", type=POSITIVE, default=1.0, show_default=True,
                      help="ray: CPUs each item holds; also its torch thread count.")(fn)
    fn = click.option("--ray-address", default=None,
                      help="ray: a running cluster (HOST:6379, ray://HOST:10001 or auto); "
                           "default $RAY_ADDRESS, else a local Ray runtime for this run.")(fn)
    fn = click.option("--workers", type=click.IntRange(min=1), default=None,
                      help="local: processes (default 1: in this process; same results when "
                           "every process runs the same number of threads); ray: items in "
                           "flight at most (default: what the cluster's free CPUs/GPUs "
                           "allow).")(fn)
    fn = click.option("--executor", type=click.Choice(KINDS), default="local",
                      show_default=True,
                      help="Where the sweep's items run: local (this machine) or ray (a Ray "
                           "cluster; pip install 'gtnkit[ray]'). Same seeds: same numbers.")(fn)
    return fn


def executor_config(ctx: click.Context, executor: str, workers: int | None,
                    ray_address: str | None, cpus_per_item: float,
                    gpus_per_item: float) -> ExecutorConfig:
    """The :class:`~distill.executor.ExecutorConfig` of :func:`executor_options`; the Ray-only
    options given with ``--executor local`` are refused in one line."""
    if executor == "local":
        given = [f"--{name.replace('_', '-')}" for name in
                 ("ray_address", "cpus_per_item", "gpus_per_item")
                 if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
        if given:
            raise click.UsageError(f"{', '.join(given)} applies to --executor ray only")
    return ExecutorConfig(kind=executor, workers=workers, ray_address=ray_address,  # type: ignore[arg-type]
                          cpus_per_item=cpus_per_item, gpus_per_item=gpus_per_item)


def memory_check_option(fn: Callable) -> Callable:
    """``--memory-check/--no-memory-check``: the meta-training memory guard."""
    return click.option("--memory-check/--no-memory-check", default=True, show_default=True,
                        help="Refuse, before any work, a run whose estimated peak memory (a "
                             "measured student step x the steps the meta-gradient holds, and "
                             "a learned curriculum) exceeds the memory free on the device.")(fn)


def implicit_options(method: str, terms: int, alpha: float) -> Callable[[Callable], Callable]:
    """``--neumann-terms/--ift-iterations``, ``--neumann-alpha`` and ``--ift-solver``: the
    implicit function theorem's linear solve (:data:`distill.hypergrad.SOLVERS`), with the
    command's defaults; ``method`` names who reads them in the help."""
    from .hypergrad import SOLVERS

    def apply(fn: Callable) -> Callable:
        fn = click.option("--ift-solver", type=click.Choice(SOLVERS), default="neumann",
                          show_default=True,
                          help=f"{method}: the linear solver of H^-1 v: neumann (the series) "
                               f"or cg (conjugate gradient).")(fn)
        fn = click.option("--neumann-alpha", type=POSITIVE, default=alpha, show_default=True,
                          help=f"{method}: step size alpha of the Neumann series.")(fn)
        return click.option("--neumann-terms", "--ift-iterations", "neumann_terms",
                            type=click.IntRange(min=0), default=terms, show_default=True,
                            help=f"{method}: terms K of the Neumann series for the inverse "
                                 f"Hessian, or the conjugate-gradient iterations with "
                                 f"--ift-solver cg.")(fn)
    return apply


def set_argument(fn: Callable) -> Callable:
    """``SET`` and how to read it: a gtnkit set (``set.safetensors``, an earlier ``set.pt``, an
    ``.npz`` export, or a run/export folder holding one), or another tool's set (a folder of
    ``images.pt``/``labels.pt``/``lr.pt``, or an ``.npz``) with ``--dataset`` and
    ``--normalization`` (:func:`distill.store.load_set`)."""
    fn = click.option("--normalization", default=None, metavar="dataset|none|MEAN/STD",
                      help="Another tool's set only: the normalisation its images carry: "
                           "dataset (alias gtnkit: the data set's mean/std, as DC/MTT/DATM "
                           "apply them), none (pixels in [0, 1]) or MEAN/STD per channel, "
                           "e.g. 0.5,0.5,0.5/0.5,0.5,0.5. Required for such a set.")(fn)
    fn = click.option("--dataset", "set_dataset", default=None, type=TableChoice(datasets),
                      help="The set's data set: required for another tool's set; for a "
                           "gtnkit set, checked against its card.")(fn)
    return click.argument("set_path", metavar="SET", type=click.Path())(fn)


def run_options(fn: Callable) -> Callable:
    fn = click.option("--force", is_flag=True,
                      help="Overwrite an output folder that already holds a run.")(fn)
    fn = click.option("--device", default="auto", show_default=True, callback=_check_device,
                      help="auto (CUDA when present), cpu, cuda or cuda:N (mps on an Apple "
                           "GPU).")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed for every random choice of the run.")(fn)
    fn = click.option("--out", type=click.Path(file_okay=True), required=True,
                      help="Output folder (config.json, results.json, artefacts).")(fn)
    return fn
