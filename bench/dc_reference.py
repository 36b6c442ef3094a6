"""DC's speed against the reference code, side by side in one process: CPU seconds per
condensation iteration of gtnkit (``--fast`` and ``--eager``) and of the DC authors' code.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021; reference
code: github.com/VICO-UoE/DatasetCondensation (``main.py``). Bring a checkout of it onto the
machine yourself (outside this repository; nothing of it is copied here) and pass its folder
as ``--reference``. The setting is the DC paper's MNIST IPC 1 (ConvNet width 128, depth 3,
instance norm, 28-pixel inputs padded to 32 in the first convolution, 256 real images per
class, noise init, image lr 0.1).

Each run is a separate process with ``OMP_NUM_THREADS`` pinned; its CPU seconds (user + sys,
from ``getrusage`` of the child) are measured at two iteration counts, and the per-iteration
cost is the difference divided by the extra iterations, so start-up, data loading, compilation
and the reference's evaluation at iteration 0 (one model, one epoch here) cancel. The three
programs run interleaved, ``--repeats`` rounds, so a busy machine slows them alike; the table
gives the median and every ratio.

    python bench/dc_reference.py --reference /path/to/DatasetCondensation \\
        --data-root $GTNKIT_DATA      # bench/results/dc-reference.{json,md}
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.store import atomic_write_json, atomic_write_text  # noqa: E402


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], cwd: Path, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process; raises on failure with its tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": ""}
    before, start = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _child_cpu() - before
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return cpu, wall


def commands(name: str, iterations: int, reference: Path, root: str, out: Path) -> tuple:
    """(argv, cwd) of program ``name`` for ``iterations`` condensation iterations."""
    if name == "reference":
        # main.py runs Iteration + 1 iterations (0..Iteration); the difference cancels the +1.
        return ([sys.executable, "main.py", "--dataset", "MNIST", "--model", "ConvNet",
                 "--ipc", "1", "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "1",
                 "--Iteration", str(iterations), "--init", "noise", "--data_path", root,
                 "--save_path", str(out)], reference)
    mode = "--eager" if name == "gtnkit-eager" else "--fast"
    model = "convnet:first_pad=1" if name == "gtnkit-fast-1152" else "convnet"
    return ([sys.executable, "-c", "from cli import main; main()", "distill", "--dataset",
             "mnist", "--method", "dc", "--ipc", "1", "--init", "noise", "--iterations",
             str(iterations), "--model", model, "--students", "0", "--data-root", root,
             "--out", str(out), "--force", mode], REPO)


#: What each program is. ``gtnkit-fast-1152`` is gtnkit on its earlier MNIST ConvNet (first
#: convolution padded by 1: 28 -> 14 -> 7 -> 3 px, a 1152-d feature): a smaller network than the
#: reference's, kept to show how much of an earlier speed-up came from the network alone.
PROGRAMS = {"reference": "the DC authors' main.py",
            "gtnkit-fast": "gtnkit distill --fast (compiled real side, pieces of 16 on a CPU)",
            "gtnkit-eager": "gtnkit distill --eager (pieces of 16 on a CPU)",
            "gtnkit-fast-1152": "gtnkit distill --fast on the 1152-d ConvNet (first padding 1): "
                                "not the published network"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True,
                    help="Folder of a VICO-UoE/DatasetCondensation checkout (holds main.py).")
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"),
                    help="Root holding MNIST/raw (both programs read it; nothing downloads).")
    ap.add_argument("--iterations", default="5,25", help="The two iteration counts N1,N2.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--programs", default=",".join(PROGRAMS),
                    help=f"Comma-separated, 'reference' included: {', '.join(PROGRAMS)}.")
    args = ap.parse_args(argv)
    if not (args.reference / "main.py").is_file():
        ap.error(f"--reference {args.reference}: no main.py there")
    if not args.data_root:
        ap.error("--data-root (or GTNKIT_DATA) is required: the reference would download")
    n1, n2 = (int(x) for x in args.iterations.split(","))
    if not 0 < n1 < n2:
        ap.error(f"--iterations wants 0 < N1 < N2, got {args.iterations}")
    names = tuple(x.strip() for x in args.programs.split(",") if x.strip())
    if "reference" not in names or set(names) - set(PROGRAMS):
        ap.error(f"--programs: 'reference' and any of {', '.join(PROGRAMS)}")
    rows: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in names:
                got = {}
                for n in (n1, n2):
                    out = Path(tmp) / f"{name}-{n}-{rep}"
                    cmd, cwd = commands(name, n, args.reference.resolve(), args.data_root, out)
                    got[n] = run(cmd, cwd, args.threads)
                per_it = (got[n2][0] - got[n1][0]) / (n2 - n1)
                wall_it = (got[n2][1] - got[n1][1]) / (n2 - n1)
                rows[name].append({"cpu_per_iteration": per_it, "wall_per_iteration": wall_it,
                                   "cpu": {str(n): got[n][0] for n in got},
                                   "wall": {str(n): got[n][1] for n in got}})
                print(f"round {rep + 1}/{args.repeats} {name}: {per_it:.3f} CPU s / iteration",
                      flush=True)
    med = {n: statistics.median(r["cpu_per_iteration"] for r in rows[n]) for n in names}
    ratios = {n: med["reference"] / med[n] for n in names if n != "reference"}
    per_round = {n: [rows["reference"][i]["cpu_per_iteration"] / rows[n][i]["cpu_per_iteration"]
                     for i in range(args.repeats)] for n in names if n != "reference"}
    report = {"setting": "MNIST, IPC 1, DC, noise init, ConvNet (width 128, depth 3, instance "
                         "norm, first padding 3), 256 real images per class",
              "iterations": [n1, n2], "repeats": args.repeats, "threads": args.threads,
              "reference": str(args.reference), "rows": rows, "median_cpu_per_iteration": med,
              "speedup_vs_reference": ratios, "speedup_per_round": per_round,
              "command": " ".join(["python", "bench/dc_reference.py", *(argv or sys.argv[1:])])}
    md = ["# DC iteration: gtnkit against the reference code (CPU seconds)", "",
          f"{report['setting']}; {args.threads} thread(s); per-iteration cost = CPU seconds of "
          f"{n2} iterations minus {n1}, divided by {n2 - n1} (start-up, loading and the "
          f"reference's iteration-0 evaluation cancel); {args.repeats} interleaved rounds.", "",
          "| program | CPU s / iteration (median) | per round | speed-up vs reference "
          "(median; per round) |", "|---|---|---|---|"]
    for n in names:
        each = ", ".join(f"{r['cpu_per_iteration']:.3f}" for r in rows[n])
        sp = ("1.00x" if n == "reference" else f"{ratios[n]:.2f}x; "
              + ", ".join(f"{x:.2f}" for x in per_round[n]))
        md.append(f"| {n}: {PROGRAMS[n]} | {med[n]:.3f} | {each} | {sp} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "dc-reference.json", report)
    atomic_write_text(args.out / "dc-reference.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
