"""``gtnkit``: the command line. The root only assembles: each package owns its commands
(``distill.commands``, ``selection.commands``, ``gtn.commands``, ``gtn.nas.commands``; their
click plumbing is :mod:`distill.commandline`). Here live ``-v/-q``, OS errors as one line and
signals as exit 128 + N. Packages load when a command runs, never for ``gtnkit --help``."""

from __future__ import annotations

import ast
import contextlib
import errno
import importlib.util
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

#: Every command of the root and where it is defined ("module:attribute").
COMMANDS = {
    "datasets": "distill.commands:datasets_cmd", "distill": "distill.commands:distill_cmd",
    "evaluate": "distill.commands:evaluate", "compare": "distill.commands:compare",
    "show": "distill.commands:show", "export": "distill.commands_export:export",
    "experts": "distill.commands_experts:experts",
    "select": "selection.commands:select", "curve": "selection.commands:curve",
    "gtn": "gtn.commands:gtn", "nas": "gtn.nas.commands:nas",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: what went wrong and on which path."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    return f"file system error{'' if path is None else f' on {path}'}: {reason}"


class Signalled(KeyboardInterrupt):
    """SIGTERM (what a scheduler or `timeout` sends) or SIGHUP, handled like Ctrl-C."""

    @classmethod
    def raise_it(cls, signum: int, frame: Any) -> None:
        raise cls(signum)


def interrupted(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind ``exc``, if any: itself, or one another exception wraps (one
    raised in ``__set_name__`` during a lazy import becomes a RuntimeError) or was raised while
    handling."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _summary(target: str) -> str | None:
    """A command's help text read from its module's source, without importing the package."""
    module, attr = target.split(":")
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # finds the package without running its __init__
    paths = [Path(p, *rest).with_suffix(".py") for p in spec.submodule_search_locations or ()
             ] if spec else []
    if not paths or not paths[0].is_file():
        return None
    tree = ast.parse(paths[0].read_text(encoding="utf-8"))
    return next((ast.get_docstring(node) for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == attr), None)


class GtnkitGroup(click.Group):
    """The root group: commands are added from the packages the first time one is needed (all
    at once: selection's rules seed ``distill --init``, every package adds its errors); an OS
    error in a command is one line naming the path; Ctrl-C (SIGINT), SIGTERM and SIGHUP exit
    with 128 + N after every open output folder is released (atomic writes leave no partial
    file)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy, self.listing = dict(lazy or {}), False

    def load(self) -> None:
        for name, target in self.lazy.items():
            if name not in self.commands:
                module, attr = target.split(":")
                self.add_command(getattr(importlib.import_module(module), attr), name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            text = _summary(self.lazy[cmd_name]) if self.listing else None
            if text is not None:  # `gtnkit --help` lists it from its source: no import
                return click.Command(cmd_name, help=text)
            self.load()
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self.listing = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, Exception) as exc:
            stop = interrupted(exc)
            if stop is None:
                if isinstance(exc, OSError) and exc.errno != errno.EPIPE:  # EPIPE: click's
                    raise click.ClickException(os_error_line(exc)) from None
                raise
            signum = stop.args[0] if isinstance(stop, Signalled) else signal.SIGINT
            click.echo(f"Interrupted ({signal.Signals(signum).name}): stopped (files written are "
                       f"complete; a checkpointed run continues with --resume).", err=True)
            raise click.exceptions.Exit(128 + signum) from None  # the shell's convention


@click.group(cls=GtnkitGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True,
              help="Less output: no progress bars or status lines, warnings only.")
@click.version_option(package_name="gtnkit", prog_name="gtnkit")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """gtnkit: make a tiny training set that trains a network almost as well as the full data.

    Select a coreset (`select`), measure accuracy against the fraction of data kept (`curve`),
    condense a set (`distill`; `experts` for trajectory matching), train and compare
    Generative Teaching Networks (`gtn train|sample|compare`), score any set, another tool's
    too (`evaluate`), compare runs (`compare`), rank architectures with a cheap proxy (`nas`),
    look at a set (`show`), export it (`export`), list the data sets found (`datasets`).
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            signal.signal(signum, Signalled.raise_it)
    level = ctx.ensure_object(dict)["verbosity"] = verbose - quiet
    from distill.commandline import start_process

    start_process()
    logging.basicConfig(level={-1: logging.WARNING, 0: logging.INFO}.get(
        level, logging.DEBUG if level > 0 else logging.ERROR), format="%(message)s",
        stream=sys.stderr)

