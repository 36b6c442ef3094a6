"""The CLI at its edges: unwritable output folders refused before any work, one run per output
folder (an OS lock; a stale lock taken over), OS errors while writing as one line, SIGINT."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch

from distill.outdir import LOCK_NAME, OutDirError, OutDirLocked, check_writable, open_run_dir
from distill.store import SavedSet, StoreError, save_set

from .test_cli import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]

# every command with --out, with arguments that would make it work (inputs that do not exist
# are fine: the output folder is checked before any input is read)
COMMANDS = {
    "select": ["select", "--dataset", "mnist", "--method", "random", "--ipc", "1"],
    "curve": ["curve", "--dataset", "mnist"],
    "evaluate": ["evaluate", "SET"],
    "show": ["show", "SET"],
    "distill": ["distill", "--dataset", "mnist", "--method", "dc", "--ipc", "1"],
    "distill-kip": ["distill", "--dataset", "mnist", "--method", "kip", "--ipc", "1"],
    "gtn train": ["gtn", "train", "--dataset", "mnist"],
    "gtn sample": ["gtn", "sample", "GEN"],
    "gtn compare": ["gtn", "compare", "--dataset", "mnist"],
    "nas": ["nas", "--dataset", "mnist", "--proxy", "real-subset"],
}


def command(name, tmp_path, out):
    args = [str(tmp_path / "missing.pt") if a in ("SET", "GEN") else a for a in COMMANDS[name]]
    data = [] if name in ("show", "gtn sample") else ["--data-root", str(tmp_path / "no-data")]
    return [*args, *data, "--out", str(out)]


def tiny_set_file(path):
    g = torch.Generator().manual_seed(0)
    save_set(path, SavedSet(torch.randn(20, 1, 28, 28, generator=g),
                            torch.arange(10).repeat(2), {"dataset": "mnist"}))
    return path


def cli_process(*args, **kwargs):
    """The gtnkit CLI in a child process (what a user's shell starts)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "from cli import main; main(prog_name='gtnkit')"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


# ----------------------------------------------------------------------- 1. a bad --out
@pytest.mark.parametrize("name", COMMANDS)
def test_out_under_a_file_is_refused_before_any_work(tmp_path, name):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    out = blocker / "run"
    r = run(*command(name, tmp_path, out))
    # the output folder is refused, not the missing data or input set that work would read
    assert_one_line_error(r, str(out), "is a file")
    assert blocker.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file.txt"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["select", "distill", "gtn train", "show"])
def test_out_in_proc_is_refused_before_any_work(tmp_path, name):
    out = Path("/proc/gtnkit-no-such-folder") / "run"
    r = run(*command(name, tmp_path, out))
    assert_one_line_error(r, str(out))
    assert "no-data" not in r.output and "missing.pt" not in r.output
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_refused_and_nothing_written(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: the OS says no
        real_open = os.open

        def read_only_open(path, flags, *a, **k):
            if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", read_only_open)
    try:
        r = run(*command("select", tmp_path, ro))
        assert_one_line_error(r, str(ro), "Permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_check_writable_reports_what_it_created(tmp_path):
    created = check_writable(tmp_path / "a" / "b")
    assert created == [tmp_path / "a" / "b", tmp_path / "a"]
    assert os.listdir(tmp_path / "a" / "b") == []  # the probe is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutDirError, match="not a folder"):
        check_writable(tmp_path / "f")


def test_refused_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "deep" / "out"
    r = run(*command("select", tmp_path, out))  # the data root does not exist
    assert_one_line_error(r, "no-data")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------- 2. one run per folder
HOLD = """
import sys, time
from distill.outdir import open_run_dir
with open_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_run_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    set_path = tiny_set_file(tmp_path / "set.pt")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run("show", set_path, "--out", out)
        assert_one_line_error(r, str(out), f"pid {holder.pid}", "in use")
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (out / LOCK_NAME).read_text().split() == [str(holder.pid)]  # stale, process dead
    r = run("show", set_path, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["config.json", "grid.png", "results.json"]


def test_two_concurrent_runs_exactly_one_succeeds(tmp_path):
    set_path = tiny_set_file(tmp_path / "set.pt")
    out = tmp_path / "out"
    procs = [cli_process("show", set_path, "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    _, _, err = next(r for r in results if r[0] != 0)
    lines = [line for line in err.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and str(out) in errors[0], err
    assert "in use" in errors[0] or "already holds a run" in errors[0]
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["config.json", "grid.png", "results.json"]


def test_lock_is_released_and_reusable_in_process(tmp_path):
    out = tmp_path / "o"
    with open_run_dir(out) as d:
        assert (d / LOCK_NAME).read_text().split() == [str(os.getpid())]
        with pytest.raises(OutDirLocked, match=str(os.getpid())), open_run_dir(out):
            pass
    assert not out.exists()  # created, left empty: removed again
    with open_run_dir(out) as d:
        (d / "results.json").write_text("{}")
    assert os.listdir(out) == ["results.json"]
    with pytest.raises(StoreError, match="--force"), open_run_dir(out):
        pass
    with pytest.raises(StoreError, match="nothing to resume"), open_run_dir(out, resume=True):
        pass


# ----------------------------------------------------------------------- OS errors while writing
def failing_replace(out):
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(out) in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *a, **k)
    return replace


def test_os_error_while_writing_is_one_line(tmp_path, monkeypatch):
    """show, gtn sample and compare write for real; the OS refuses the final rename."""
    set_path = tiny_set_file(tmp_path / "set.pt")
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", failing_replace(out))
    r = run("show", set_path, "--out", out)
    assert_one_line_error(r, str(out / "grid.png"), "No space left")
    assert not out.exists()  # no temporary file, no lock, no empty folder left

    run_dir = tmp_path / "ev"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"accuracies": [50.0], "label": "x"}))
    (run_dir / "config.json").write_text("{}")
    r = run("compare", run_dir, "--out", out / "table.md")
    assert_one_line_error(r, str(out / "table.md"), "No space left")


@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_prints_a_traceback_for_an_os_error(tmp_path, monkeypatch, name):
    """Any OSError raised inside a command (here: where each reads its data or input) is one
    line naming the path."""
    import distill.data
    import distill.store
    import gtn

    def fail(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.bin"))

    for mod, attr in [(distill.data, "load_dataset"), (distill.store, "load_set"),
                      (gtn, "load_generator")]:
        monkeypatch.setattr(mod, attr, fail)
    r = run(*command(name, tmp_path, tmp_path / "out"))
    assert_one_line_error(r, str(tmp_path / "x.bin"), "Permission denied")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- SIGINT
@pytest.mark.realdata
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_exits_130_and_leaves_nothing_partial(tmp_path, data_root):
    out = tmp_path / "out"
    # a background job inherits SIGINT ignored (as under `nohup make test &`): the child
    # gets the default disposition, as in a terminal, so Python turns it into KeyboardInterrupt
    p = cli_process("select", "--dataset", "mnist", "--method", "herding", "--ipc", 1,
                    "--signal-epochs", 50, "--no-cache", "--data-root", data_root,
                    "--out", out,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # into the work (loading the data, training the signal network)
    p.send_signal(signal.SIGINT)
    try:
        rc = p.wait(timeout=60)
    finally:
        p.kill()
    _, err = p.communicate()
    assert rc == 130, err
    assert "Traceback" not in err and "Interrupted" in err
    assert not out.exists() or os.listdir(out) == []


# ----------------------------------------------------------------------- 3. messages in CLI terms
def test_unknown_rule_option_lists_the_valid_keys(tmp_path):
    r = run("select", "--dataset", "mnist", "--method", "herding", "--ipc", 1,
            "--option", "spaec=pixels", "--data-root", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(r, "'spaec'", "space, normalize", "--option")
    assert "__init__" not in r.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needles", [
    (["select", "--dataset", "mnist", "--method", "random", "--ipc", "1", "--feature-model",
      "convnet:widht=16"], ["'widht'", "width, depth, norm, act, pool"]),
    (["evaluate", "SET", "--model", "mlp:depth=2"], ["'depth'", "width, act"]),
    (["gtn", "train", "--dataset", "mnist", "--student", "lenet:width=8"], ["'width'", "act"]),
    (["curve", "--dataset", "mnist", "--fractions", "0.1,2"], ["--fractions", "(0, 1]"]),
    (["curve", "--dataset", "mnist", "--methods", "random:hardest"], ["not a score rule"]),
    (["select", "--dataset", "mnist", "--method", "dbscan", "--ipc", "1", "--option", "eps=-1"],
     ["eps must be > 0", "--option"]),
    (["gtn", "train", "--dataset", "mnist", "--method", "matching", "--batch-size", "4"],
     ["--batch-size", ">= 20"]),
])
def test_library_refusals_speak_cli(tmp_path, args, needles):
    """The sweep: model options, fractions, rule options and GTN sizes named as the CLI
    spells them, with the valid values; refused before any work, nothing left behind."""
    args = [str(tmp_path / "missing.pt") if a == "SET" else a for a in args]
    r = run(*args, "--data-root", tmp_path / "nodata", "--out", tmp_path / "o")
    assert_one_line_error(r, *needles)
    assert "__init__" not in r.output and "nodata" not in r.output
    assert not (tmp_path / "o").exists()


def test_bad_rule_option_value_is_one_line():
    from selection import SelectionError, get_method

    with pytest.raises(SelectionError, match="iters='many'") as err:
        get_method("kmeans", iters="many")
    assert "\n" not in str(err.value)
    with pytest.raises(SelectionError, match="option first must be one of mean, random"):
        get_method("kcenter", first="far")


def test_pool_per_class_names_the_option(tmp_path):
    r = run("select", "--dataset", "mnist", "--method", "herding", "--ipc", 1,
            "--pool-per-class", 0, "--data-root", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(r, "--pool-per-class", ">=1")


def test_gtn_train_takes_one_t_and_says_where_several_go(tmp_path):
    r = run("gtn", "train", "--dataset", "mnist", "--inner-steps", "8,16",
            "--data-root", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(r, "--inner-steps", "one T", "gtn compare")
    assert not (tmp_path / "o").exists()


def test_compare_on_select_runs_does_not_ask_for_a_missing_option(tmp_path):
    run_dir = tmp_path / "sel"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"n_images": 10}))
    (run_dir / "config.json").write_text(json.dumps({"command": "select", "method": "random"}))
    r = run("compare", run_dir)
    assert_one_line_error(r, "select run", "gtnkit evaluate")
    assert "run it with --students" not in r.output


@pytest.mark.parametrize("args", [["distill", "--dataset", "mnist", "--method", "dc", "--ipc", 1],
                                  ["gtn", "train", "--dataset", "mnist"]])
def test_resume_force_on_a_finished_run_says_there_is_nothing_to_resume(tmp_path, args):
    out = tmp_path / "done"
    out.mkdir()
    for name in ("config.json", "results.json"):
        (out / name).write_text("{}")
    r = run(*args, "--resume", "--force", "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, "nothing to resume", "without --resume")
    assert "pass --force" not in r.output
    assert sorted(os.listdir(out)) == ["config.json", "results.json"]


def test_offline_download_error_is_whole(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, *a, **k):  # torchvision's message: cause on the last lines
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n"
                               "Tried https://mirror/, got:\n"
                               "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    monkeypatch.delenv("GTNKIT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    r = run("select", "--dataset", "mnist", "--method", "random", "--ipc", 1, "--download",
            "--out", tmp_path / "o")
    assert_one_line_error(r, "Temporary failure in name resolution", "--data-root",
                          str(tmp_path / ".cache" / "gtnkit" / "data"))


# ----------------------------------------------------------------------- 4. noise
def test_status_lines_off_a_terminal():
    from distill.commandline import StatusTask

    now = [0.0]
    lines: list[str] = []
    t = StatusTask("matching", 10, 30.0, lines.append, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 10.0  # 10 s per step: a line every third step
        t.update()
    assert lines == ["matching: 3/10 (30 %), 30s elapsed, ETA 1m10s",
                     "matching: 6/10 (60 %), 1m00s elapsed, ETA 40s",
                     "matching: 9/10 (90 %), 1m30s elapsed, ETA 10s"]


def test_status_eta_leaves_a_slow_start_out():
    """A first step of 80 s (compilation), then 10 s each: the ETA is 10 s per step left, and
    the line of the first update, which has no rate yet, shows none."""
    from distill.commandline import StatusTask

    now = [0.0]
    lines: list[str] = []
    t = StatusTask("cells", 10, 30.0, lines.append, clock=lambda: now[0])
    for i in range(10):
        now[0] += 80.0 if i == 0 else 10.0
        t.update()
    assert lines == ["cells: 1/10 (10 %), 1m20s elapsed",
                     "cells: 4/10 (40 %), 1m50s elapsed, ETA 1m00s",
                     "cells: 7/10 (70 %), 2m20s elapsed, ETA 30s",
                     "cells: 10/10 (100 %), 2m50s elapsed"]


def test_progress_in_a_log_is_status_lines_not_bare_words(tmp_path, monkeypatch):
    """stderr is not a terminal under CliRunner: each task ends in one status line."""
    import distill.data

    from .conftest import make_tiny_set

    tiny = make_tiny_set(per_class=3)
    monkeypatch.setattr(distill.data, "load_dataset", lambda *a, **k: tiny)
    set_path = tiny_set_file(tmp_path / "set.pt")
    r = run("evaluate", set_path, "--model", "mlp:width=8", "--students", 2, "--epochs", 2,
            "--no-krr", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "student 1/2: 2/2 (100 %), " in r.output and "student 2/2: 2/2 (100 %)" in r.output
    assert not any(line.strip() in ("student 1/2", "student 2/2") for line in lines)


def test_no_cuda_home_warning(tmp_path, monkeypatch):
    """torch logs "No CUDA runtime is found, using CUDA_HOME=..." when it finds a CUDA toolkit
    but no GPU (on importing torch.utils.cpp_extension, which torch.compile does); once the
    CLI runs, that record, and only it, is dropped."""
    import logging

    import torch.utils.cpp_extension as cpp

    from distill.devices import _CUDA_HOME_FILTER

    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "filters", [f for f in logger.filters
                                            if f is not _CUDA_HOME_FILTER])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        cpp._find_cuda_home()
        assert [r.getMessage() for r in records] == [
            f"No CUDA runtime is found, using CUDA_HOME='{tmp_path}'"]  # torch does log it
        assert run("datasets", "--data-root", tmp_path).exit_code == 0
        records.clear()
        cpp._find_cuda_home()
        logger.warning("another warning")
        assert [r.getMessage() for r in records] == ["another warning"]
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------- 6. the demo plot
def test_demo_plot_log_memory_title_and_fixed_set(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import gtn.compare as compare
    import gtn.compare_report as compare_report

    figures = []
    monkeypatch.setattr(compare_report, "save_figure",
                        lambda fig, path, dpi=100: figures.append(fig))
    mib = {"unrolled": [53, 405], "implicit": [13.1, 13.1], "matching": [10.5, 10.5]}
    cells = {f"{m}-{t}": {"method": m, "T": t, "memory": {"saved_peak_bytes": mem * 2**20},
                          "few_step_mean": 50.0 + i, "few_step_std": 1.0,
                          "fixed_set_mean": 60.0 + i, "fixed_set_std": 2.0}
             for i, (m, mems) in enumerate(mib.items()) for t, mem in zip((8, 64), mems)}
    state = {"dataset": "mnist", "budget": {"name": "smoke", "meta_iterations": 2},
             "curriculum": "full", "cells": cells}
    assert compare.plot(state, tmp_path / "p.png")
    (fig,) = figures
    memory, accuracy = fig.axes
    assert memory.get_yscale() == "log"
    assert "mnist" in fig._suptitle.get_text() and "smoke" in fig._suptitle.get_text()
    lines = {line.get_label(): line for line in memory.get_lines()}
    styles = {(lines[m].get_marker(), lines[m].get_linestyle()) for m in mib}
    assert len(styles) == 3  # the three methods look different even where they overlap
    assert [y for y in lines["implicit"].get_ydata()] == pytest.approx([13.1, 13.1])
    labels = [c.get_label() for c in accuracy.containers]
    assert sorted(labels) == sorted(f"{m}: {k}" for m in mib for k in ("few-step", "fixed set"))
    fixed = next(c for c in accuracy.containers if c.get_label() == "unrolled: fixed set")
    assert list(fixed.lines[0].get_ydata()) == [60.0, 60.0]


@pytest.mark.parametrize("name,option", [("select", "--cache-dir"), ("curve", "--cache-dir"),
                                         ("nas", "--cache")])
def test_unwritable_cache_folder_is_refused_before_any_work(tmp_path, name, option):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    r = run(*command(name, tmp_path, tmp_path / "out"), option, blocker / "cache")
    assert_one_line_error(r, option, str(blocker / "cache"), "is a file")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_an_interrupt_wrapped_in_another_exception_still_exits_130():
    """Ctrl-C during a lazy import inside a class body reaches the CLI as a RuntimeError
    caused by the KeyboardInterrupt (seen with torch._dynamo's first import): still 130 and
    one line; an error that Ctrl-C is not behind still propagates."""
    from click.testing import CliRunner

    from cli import GtnkitGroup, interrupted

    def wrapped():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise RuntimeError("Error calling __set_name__") from ki

    root, sub = GtnkitGroup("root"), GtnkitGroup("sub")
    root.add_command(sub)
    for name, fn in {"wrapped": wrapped, "plain": lambda: 1 / 0}.items():
        root.add_command(click.Command(name, callback=fn))
        sub.add_command(click.Command(name, callback=fn))
    for args in (["wrapped"], ["sub", "wrapped"]):  # a nested group does not say it twice
        r = CliRunner().invoke(root, args)
        assert r.exit_code == 130 and r.output.count("Interrupted") == 1, r.output
    r = CliRunner().invoke(root, ["sub", "plain"])
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)
    try:
        wrapped()
    except RuntimeError as exc:
        assert interrupted(exc)
    assert not interrupted(RuntimeError("other")) and not interrupted(None)
