"""Executor benchmark: the architecture-search smoke sweep (MNIST, candidates x training sets,
each a work item) on the local pool and on Ray with the same number of workers, side by side.

Per backend: the wall seconds of the sweep, the seconds to start its workers or runtime,
the CPU seconds of the whole process tree (this process, its pool or Ray runtime and their
workers), the seconds the items themselves took (summed), and the overhead per item:
``(sweep seconds - item seconds / workers) / items``. Every backend must give the same
accuracies (checked; ``same_numbers``). Nothing is cached, so every run trains every student.
The backends take turns (``--repeats``, the order reversed every other round, so a change in
the machine's load hits both) and the table gives each one's median run.

    python bench/executor.py                              # local x2 vs ray x2, 3 rounds
    python bench/executor.py --candidates 12 --backends local:1,local:2,ray:2 --repeats 1
    python bench/executor.py --budget short --candidates 4 --proxies real-subset --repeats 1

Writes ``OUT/executor.{json,md}`` (``executor-short.*`` for ``--budget short``; default
``OUT`` ``bench/results/executor``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.data import load_dataset  # noqa: E402
from distill.executor import ExecutorConfig, make_executor  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from gtn import nas  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of the live processes under ``root``, itself included."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICK
    total = 0.0
    for pid in cpu:
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += cpu[pid]
    return total


def _reaped_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(config: ExecutorConfig, candidates, sets, val, seed: int) -> tuple[dict, dict]:
    """(figures, accuracies) of one sweep of ``candidates`` x ``sets`` on ``config``."""
    me = os.getpid()
    cpu0, reaped0, t0 = _tree_cpu(me), _reaped_cpu(), time.perf_counter()
    ex = make_executor(config)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        res = nas.evaluate_candidates(candidates, sets, val, seed, executor=ex)
        sweep = time.perf_counter() - t1
        cpu = _tree_cpu(me) - cpu0 + _reaped_cpu() - reaped0
    finally:
        ex.close()
    items = sum(len(r) for r in res.values())
    work = sum(e["seconds"] for r in res.values() for e in r.values())
    workers = config.workers or 1
    figures = {"backend": f"{config.kind} x{workers}", "items": items,
               "start_seconds": started, "sweep_seconds": sweep,
               "wall_seconds": started + sweep, "cpu_seconds": cpu,
               "item_seconds": work, "threads_per_item": config.item_threads(),
               "overhead_per_item": (sweep - work / workers) / items}
    acc = {label: {k: e["accuracy"] for k, e in r.items()} for label, r in res.items()}
    return figures, acc


def median_runs(runs: list[dict]) -> list[dict]:
    """Per backend (in first-run order), its run of median wall seconds."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    return [sorted(rs, key=lambda r: r["wall_seconds"])[(len(rs) - 1) // 2]
            for rs in by.values()]


def markdown(report: dict) -> str:
    rows = report["median"]
    base = {r["backend"]: r for r in rows}.get("local x2")
    lines = [f"# Executor: the NAS {report['budget']} sweep, local pool vs Ray", "",
             f"{report['items']} items ({report['candidates']} candidates x "
             f"{len(report['sets'])} training sets: {', '.join(report['sets'])}), MNIST, "
             f"budget `{report['budget']}`, no cache; {report['cores']} CPU cores; torch "
             f"{report['torch']}, Ray {report['ray'] or '-'}. Same accuracies from every "
             f"backend: **{report['same_numbers']}**.", "",
             "| backend | start s | sweep s | wall s | wall vs local x2 | CPU s | item s "
             "(sum) | threads / item | overhead / item s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['wall_seconds'] / base['wall_seconds']:.2f}" if base else "-"
        lines.append(f"| {r['backend']} | {r['start_seconds']:.1f} | {r['sweep_seconds']:.1f} "
                     f"| {r['wall_seconds']:.1f} | {ratio} | {r['cpu_seconds']:.1f} | "
                     f"{r['item_seconds']:.1f} | {r['threads_per_item']} | "
                     f"{r['overhead_per_item']:.2f} |")
    lines += ["", f"Median of {report['repeats']} run(s) per backend. Every run (wall s): "
              + "; ".join(f"{b}: {', '.join(f'{w:.1f}' for w in ws)}"
                          for b, ws in report["walls"].items()) + ".", "",
              f"Command: `{report['command']}`; load average before the runs "
              f"{report['load_before']}, after {report['load_after']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=sorted(nas.NAS_BUDGETS), default="smoke")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--proxies", default="real-subset,real-steps,coreset:random",
                    help="Proxy sets trained beside the ground truth.")
    ap.add_argument("--backends", default="local:2,ray:2",
                    help="KIND:WORKERS,... in the order run.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "executor"))
    ap.add_argument("--markdown", default=None, metavar="JSON",
                    help="Only rewrite the Markdown of a results JSON.")
    args = ap.parse_args(argv)
    if args.markdown:
        report = json.loads(Path(args.markdown).read_text())
        report.setdefault("budget", "smoke")
        atomic_write_text(Path(args.markdown).with_suffix(".md"), markdown(report))
        return 0
    budget = nas.NAS_BUDGETS[args.budget]
    data = load_dataset("mnist", "train", root=args.data_root)
    fit, val = nas.nas_split(data, budget)
    sets = [nas.truth_set(fit, budget)]
    for p in args.proxies.split(","):
        spec = nas.parse_proxy(p)
        sets.append(nas.build_proxy_set(spec, nas.resolve_proxy(spec, "mnist"), fit, budget,
                                        args.seed))
    candidates = nas.sample_candidates(args.candidates, args.seed, "mnist", budget.space)
    load = os.getloadavg()
    rows, accs = [], []
    backends = args.backends.split(",")
    for r in range(args.repeats):
        for spec in backends if r % 2 == 0 else backends[::-1]:
            kind, _, workers = spec.partition(":")
            config = ExecutorConfig(kind=kind, workers=int(workers or 1))  # type: ignore
            figures, acc = measure(config, candidates, sets, val, args.seed)
            print(figures, flush=True)
            rows.append({**figures, "round": r})
            accs.append(acc)
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    report = {"budget": args.budget, "candidates": len(candidates), "sets": [s.label for s in sets],
              "items": rows[0]["items"], "cores": os.cpu_count(), "torch": torch.__version__,
              "ray": ray_version, "same_numbers": all(a == accs[0] for a in accs),
              "load_before": [round(x, 2) for x in load],
              "load_after": [round(x, 2) for x in os.getloadavg()], "repeats": args.repeats,
              "median": median_runs(rows), "runs": rows,
              "walls": {b: [r["wall_seconds"] for r in rows if r["backend"] == b]
                        for b in dict.fromkeys(r["backend"] for r in rows)},
              "command": " ".join(["python", "bench/executor.py",
                                   *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    name = "executor" if args.budget == "smoke" else f"executor-{args.budget}"
    atomic_write_json(out / f"{name}.json", report)
    text = markdown(report)
    atomic_write_text(out / f"{name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
