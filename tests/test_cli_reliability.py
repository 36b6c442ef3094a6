"""Bad numbers, devices, non-finite sets and signals at the command line: one line, exit
status 2 (or 128 + N for a signal), nothing written, never a score."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch

from cli import main
from distill.store import SavedSet, save_set

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, click.Command]:
    main.load()
    found = {}
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            found.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            found[name] = cmd
    return found


def _base_args(cmd: click.Command, tmp_path: Path) -> list[str]:
    """The smallest argument list that parses: every required parameter given a valid value
    (a bad option value must then be what the parser refuses)."""
    args: list[str] = []
    set_file = tmp_path / "set.pt"
    if not set_file.exists():
        s = make_tiny_set(per_class=2)
        save_set(set_file, SavedSet(s.images, s.labels, {"dataset": "mnist"}))
    for p in cmd.params:
        if isinstance(p, click.Argument):
            args += [str(set_file)] * (1 if p.nargs == 1 else 1)
        elif p.required:
            if p.name == "out":
                value = str(tmp_path / "out")
            elif isinstance(p.type, click.Choice):
                value = "mnist" if "mnist" in p.type.choices else p.type.choices[0]
            else:
                value = "mnist" if p.name == "dataset" else "1"
            args += [p.opts[0], value]
    return args


def _numeric_options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag
            and isinstance(p.type, (click.types.FloatParamType, click.types.IntParamType))]


def _bad_values(opt: click.Option) -> list[str]:
    t = opt.type
    values = ["abc", "1.5.2"]
    if isinstance(t, click.types.FloatParamType):
        values += ["nan", "inf", "-inf", "NaN"]
    else:
        values += ["1e3", "2.5"]  # not an integer
    lo = getattr(t, "min", None)
    if lo is not None and math.isfinite(lo):
        values.append(str(lo if getattr(t, "min_open", False) else lo - 1))
    hi = getattr(t, "max", None)
    if hi is not None and math.isfinite(hi):
        values.append(str(hi if getattr(t, "max_open", False) else hi + 1))
    return values


CASES = [(name, opt.name) for name, cmd in sorted(_commands().items())
         for opt in _numeric_options(cmd)]


def test_every_float_option_refuses_non_finite_values():
    """No float option is a plain float (which takes nan and inf)."""
    for name, cmd in _commands().items():
        for opt in _numeric_options(cmd):
            if isinstance(opt.type, click.types.FloatParamType):
                assert isinstance(opt.type, click.FloatRange) and \
                    opt.type.convert.__qualname__.startswith("_Finite"), (name, opt.name)


@pytest.mark.parametrize("command,option", CASES)
def test_bad_numbers_are_one_line_exit_2_and_write_nothing(tmp_path, command, option):
    cmd = _commands()[command]
    opt = next(p for p in cmd.params if p.name == option)
    base = _base_args(cmd, tmp_path)
    rng = random.Random(f"{command}/{option}")  # a fixed draw per option: reproducible
    values = _bad_values(opt)
    for value in rng.sample(values, min(4, len(values))):
        r = run(*command.split(), *base, opt.opts[0], value)
        assert r.exit_code == 2, (command, option, value, r.output)
        assert_one_line_error(r, opt.opts[0])
        assert not (tmp_path / "out").exists()


def test_bad_numbers_in_combination(tmp_path):
    """Random pairs of bad values in one command line: still one line, exit 2."""
    rng = random.Random(0)
    commands = _commands()
    for _ in range(25):
        command, option = rng.choice(CASES)
        cmd = commands[command]
        opts = [p for p in _numeric_options(cmd)]
        picked = rng.sample(opts, min(2, len(opts)))
        extra = [a for p in picked for a in (p.opts[0], rng.choice(_bad_values(p)))]
        r = run(*command.split(), *_base_args(cmd, tmp_path), *extra)
        assert r.exit_code == 2, (command, extra, r.output)
        assert_one_line_error(r)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cuda:9", "tpu"])
@pytest.mark.parametrize("command", ["evaluate", "distill", "gtn train", "select", "nas",
                                     "gtn compare", "curve"])
def test_devices_this_machine_cannot_run_on_are_refused_in_every_command(tmp_path, command,
                                                                         device):
    if device == "mps" and getattr(torch.backends, "mps", None) and \
            torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    if device.startswith("cuda") and torch.cuda.device_count() > 9:
        pytest.skip("this machine has 10 CUDA devices")
    cmd = _commands()[command]
    r = run(*command.split(), *_base_args(cmd, tmp_path), "--device", device)
    assert r.exit_code == 2
    assert_one_line_error(r, "--device", "cpu")
    assert not (tmp_path / "out").exists()


def test_a_set_with_a_nan_pixel_is_never_scored(tmp_path):
    s = make_tiny_set(per_class=2)
    images = s.images.clone()
    images[0, 0, 3, 3] = float("nan")
    bad = save_set(tmp_path / "bad.pt", SavedSet(images, s.labels, {"dataset": "mnist"}))
    for command in (["evaluate", bad, "--data-root", tmp_path], ["show", bad]):
        out = tmp_path / command[0]
        r = run(*command, "--out", out)
        assert_one_line_error(r, "bad.pt", "1 non-finite")
        assert not (out / "results.json").exists()


@pytest.mark.realdata
def test_a_diverging_lr_is_an_error_not_a_chance_score(tmp_path, data_root):
    s = make_tiny_set(per_class=2)
    path = save_set(tmp_path / "set.pt", SavedSet(s.images, s.labels, {"dataset": "mnist"}))
    out = tmp_path / "e"
    r = run("-q", "evaluate", path, "--model", "mlp:width=16", "--students", 1, "--epochs", 3,
            "--test-limit", 100, "--lr", "1e30", "--data-root", data_root, "--out", out)
    assert_one_line_error(r, "non-finite weights")
    assert not (out / "results.json").exists()


@pytest.mark.realdata
def test_a_meta_step_that_cannot_fit_is_refused_in_seconds(tmp_path, data_root):
    out = tmp_path / "g"
    t0 = time.perf_counter()
    r = run("gtn", "train", "--dataset", "mnist", "--inner-steps", 100000,
            "--meta-iterations", 1, "--no-recipe", "--data-root", data_root, "--out", out)
    assert time.perf_counter() - t0 < 30  # loading MNIST included; the check itself: < 1 s
    assert_one_line_error(r, "GiB", "--no-memory-check")
    assert not (out / "results.json").exists()


@pytest.mark.realdata
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c_and_the_run_resumes(tmp_path, data_root, signum):
    """A real process gets the signal after its first student: one line, exit 128 + N, no
    temporary file left, and ``--resume`` finishes the run."""
    s = make_tiny_set(per_class=2)
    path = save_set(tmp_path / "set.pt", SavedSet(s.images, s.labels, {"dataset": "mnist"}))
    out = tmp_path / "run"
    args = [sys.executable, "-c", "import sys; from cli import main; main(sys.argv[1:], "
            "prog_name='gtnkit')", "-q", "evaluate", str(path), "--model", "mlp:width=8",
            "--students", "3", "--epochs", "3000", "--test-limit", "100", "--data-root",
            str(data_root), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (out / "progress.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and err.count("Interrupted") == 1, err
    assert signal.Signals(signum).name in err and "--resume" in err
    assert not (out / "results.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((out / "results.json").read_text())["accuracies"]) == 3
