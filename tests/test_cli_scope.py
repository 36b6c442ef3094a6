"""The CLI's shape: an option only some methods read is refused for the others (one line,
nothing written), the root only assembles the packages' commands (`gtnkit --help` without
torch, no import circle, distill below selection and gtn), and Label Solve is the library's."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_data(monkeypatch):
    """`load_dataset` answers with a small learnable synthetic set (no files needed)."""
    import distill.data

    monkeypatch.setattr(distill.data, "load_dataset",
                        lambda name, split="train", root=None, download=False:
                        make_tiny_set(per_class=6, name=name))


# ----------------------------------------------------------------------- out of scope
@pytest.mark.parametrize("method,extra,needle", [
    ("dc", ["--kernel", "nngp"], "--kernel applies to --method kip and ls only, not to dc"),
    ("dc", ["--kernel", "ntk"], "--kernel applies to --method kip and ls only"),  # the default
    ("dd", ["--reg", "1e-3"], "--reg applies to --method kip and ls only, not to dd"),
    ("ls", ["--kernel-family"], "--kernel-family applies to --method kip only, not to ls"),
    ("dm", ["--uniform-targets"], "--uniform-targets applies to --method kip only"),
    ("kip", ["--support", "x.pt"], "--support applies to --method ls only, not to kip"),
    ("dsa", ["--ls-targets", "5"], "--ls-targets applies to --method ls only"),
    ("kip", ["--distance", "mse"], "--distance applies to --method dc and dsa only, not to kip"),
    ("dm", ["--outer-loop", "2"], "--outer-loop applies to --method dc and dsa only, not to dm"),
    ("dc", ["--inner-steps", "4"], "--inner-steps applies to --method dd, ift and mtt only"),
    ("ls", ["--real-batch", "8"], "--real-batch applies to --method dc, dsa, dm, dd, ift"),
    ("dd", ["--neumann-alpha", "0.1"], "--neumann-alpha applies to --method ift only"),
    ("ift", ["--checkpoint-steps", "2"], "--checkpoint-steps applies to --method dd only"),
    ("kip", ["--eager"], "--fast/--eager applies to --method dc, dsa and dm only, not to kip"),
    ("ift", ["--real-chunk", "4"], "--real-chunk applies to --method dc, dsa and dm only"),
    ("ls", ["--iterations", "5"], "--iterations applies to --method dc, dsa, dm, dd, ift"),
    ("ls", ["--lr", "0.1"], "--lr applies to --method dc, dsa, dm, dd, ift, mtt and kip only"),
    ("ls", ["--checkpoint-every", "5"], "--checkpoint-every applies to --method dc"),
    ("ls", ["--eval-every", "5"], "--eval-every applies to --method dc"),
    ("ls", ["--resume"], "--resume applies to --method dc"),
    ("ls", ["--target-batch", "20"], "--target-batch applies to --method kip only, not to ls"),
])
def test_distill_refuses_an_option_of_another_method(tmp_path, method, extra, needle):
    out = tmp_path / "o"
    r = run("distill", "--dataset", "mnist", "--method", method, "--ipc", 1, *extra,
            "--data-root", tmp_path / "no-data", "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


@pytest.mark.parametrize("method,extra,needle", [
    ("unrolled", ["--neumann-terms", "3"],
     "--neumann-terms/--ift-iterations applies to --method implicit and first-order-tail only"),
    ("matching", ["--mixed-at", "trajectory"],
     "--mixed-at applies to --method implicit and first-order-tail only"),
    ("unrolled", ["--no-step-size-grad"], "--step-size-grad/--no-step-size-grad applies to"),
    ("matching", ["--mixed-sample", "2"],
     "--mixed-sample applies to --method implicit and first-order-tail only"),
    ("implicit", ["--checkpoint-steps", "2"], "--checkpoint-steps applies to --method unrolled"),
    ("unrolled", ["--unroll-tail", "2"],
     "--unroll-tail applies to --method implicit and first-order-tail only"),
    ("implicit", ["--match-fresh"], "applies to --method matching only, not to implicit"),
])
def test_gtn_train_refuses_an_option_of_another_method(tmp_path, method, extra, needle):
    out = tmp_path / "o"
    r = run("gtn", "train", "--dataset", "mnist", "--method", method, *extra,
            "--data-root", tmp_path / "no-data", "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_options_left_at_their_defaults_pass(tmp_path, tiny_data):
    """Every KIP option has a default that dc never sees; the dc options' defaults are not in
    KIP's way: both runs go through on tiny data."""
    common = ["--dataset", "mnist", "--ipc", 1, "--iterations", 1, "--students", 0,
              "--model", "convnet:width=4,depth=1", "--out"]
    r = run("-q", "distill", "--method", "dc", "--eager", "--real-batch", 4, *common,
            tmp_path / "dc")
    assert r.exit_code == 0, r.output
    r = run("-q", "distill", "--method", "kip", "--kernel", "nngp", "--target-batch", 20,
            *common, tmp_path / "kip")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "kip" / "config.json").read_text())["kip"]["kernel"] == "nngp"


# ----------------------------------------------------------------------- Label Solve
def test_ls_command_wraps_the_library_call(tmp_path, tiny_data):
    from distill import solve_labels
    from distill.kernels import KernelConfig
    from distill.store import load_set

    r = run("-q", "distill", "--dataset", "mnist", "--method", "ls", "--ipc", 2, "--students",
            0, "--kernel-depth", 2, "--ls-targets", 30, "--seed", 3, "--out", tmp_path / "ls")
    assert r.exit_code == 0, r.output
    saved = load_set(tmp_path / "ls" / "set.safetensors")
    direct = solve_labels(make_tiny_set(per_class=6), 2, "real", kernel=KernelConfig(depth=2),
                          targets=30, seed=3)
    assert torch.equal(saved.images, direct.images)
    assert torch.allclose(saved.labels, direct.labels)
    assert direct.labels.shape == (20, 10) and direct.meta["kind"] == "label-solve"
    assert saved.meta["method"] == "ls" and saved.meta["label_kind"] == "krr"


# ----------------------------------------------------------------------- the root
def test_root_help_does_not_import_torch():
    code = ("import sys\nfrom cli import main\ntry:\n    main(['--help'], prog_name='gtnkit')\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "Commands:" in out and "distill" in out
    assert out.strip().endswith("False"), out


def test_root_lists_each_command_as_the_command_describes_itself():
    import inspect

    import click

    from cli import COMMANDS, _summary, main

    main.load()  # type: ignore[attr-defined]
    for name, target in COMMANDS.items():
        cmd = main.commands[name]
        assert _summary(target) == inspect.cleandoc(cmd.help or ""), name
        assert click.Command(name, help=_summary(target)).get_short_help_str(60) == \
            cmd.get_short_help_str(60)


def _imports(path: Path, module: str) -> set[str]:
    """The project modules ``module`` (at ``path``) imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _project_modules() -> dict[str, Path]:
    modules = {"cli": ROOT / "cli.py"}
    for package in ("distill", "selection", "gtn"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_imports_point_one_way_without_a_circle():
    modules = _project_modules()
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m}
             for m, p in modules.items()}
    for m, deps in graph.items():
        if m.startswith("distill"):
            assert not {d for d in deps if d.split(".")[0] in ("selection", "gtn")}, m
        if m != "cli":
            assert "cli" not in deps, m
        library = m != "cli" and "commands" not in m.rpartition(".")[2] and \
            m != "distill.commandline"
        if library:
            assert "click" not in _imports(modules[m], m), m
    # a circle among modules (a package's __init__ importing its own modules is not one)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if m.startswith(d + ".") or d.startswith(m + "."):
                continue  # a package and its own modules
            assert state.get(d) != 1, " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
