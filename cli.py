"""``gtnkit``: the command line over the gtnkit library.

The root group only assembles: each package owns its commands (``distill.commands``,
``selection.commands``, ``gtn.commands``, ``gtn.nas.commands``; their shared click plumbing is
:mod:`distill.commandline`). Here live ``-v/-q`` and what holds for every command: an OS error is
one line naming the path, Ctrl-C exits with 130. The packages import torch, so they are loaded
when a command runs, never for ``gtnkit --help``.
"""

from __future__ import annotations

import ast
import errno
import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import click

#: Every command of the root and where it is defined ("module:attribute").
COMMANDS = {
    "compare": "distill.commands:compare",
    "curve": "selection.commands:curve",
    "datasets": "distill.commands:datasets_cmd",
    "distill": "distill.commands:distill_cmd",
    "evaluate": "distill.commands:evaluate",
    "gtn": "gtn.commands:gtn",
    "nas": "gtn.nas.commands:nas",
    "select": "selection.commands:select",
    "show": "distill.commands:show",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: what went wrong and on which path."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    if path is None:
        return f"file system error: {reason}"
    return f"file system error on {path}: {reason}"


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


def _summary(target: str) -> str | None:
    """A command's help text read from its module's source, without importing the package."""
    module, attr = target.split(":")
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *rest).with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return ast.get_docstring(node)
    return None


class GtnkitGroup(click.Group):
    """The root group: its commands are added from the packages the first time one is needed
    (all at once: selection's rules seed ``distill --init``, every package adds its errors);
    an OS error anywhere in a command (a full disk, a folder made read-only mid-run) is one
    line naming the path, and Ctrl-C (SIGINT) exits with 130, the shell's code for it, after
    every open output folder is released (atomic writes leave no partial file)."""

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def load(self) -> None:
        for name, target in self.lazy.items():
            if name not in self.commands:
                module, attr = target.split(":")
                self.add_command(getattr(importlib.import_module(module), attr), name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.load()
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = []
        for name in names:
            text = None if name in self.commands else _summary(self.lazy[name])
            if text is None:  # loaded already, or its source not found: ask the command
                cmd = self.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, click.Command(name, help=text).get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group(cls=GtnkitGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
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


if __name__ == "__main__":  # pragma: no cover
    main()
