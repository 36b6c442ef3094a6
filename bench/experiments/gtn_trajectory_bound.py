"""What the trajectory-matched generator imitates: the experts' own test accuracy.

``gtn train --method trajectory`` (the long benchmark's ``trajectory`` cells) trains its
students to land where an expert is M epochs after its initialisation. The experts are the
same in-memory ones those cells train (the same seeds, the same meta-training split, the same
schedule), so their accuracy at epoch M is what the generator's 10 steps are asked to reach;
this scores every expert at every epoch on the test set.

    OMP_NUM_THREADS=1 python bench/experiments/gtn_trajectory_bound.py --setting mnist-t10
    OMP_NUM_THREADS=1 python bench/experiments/gtn_trajectory_bound.py --setting cifar10-t10

Writes ``bench/results/gtn-long/trajectory-bound-SETTING.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.append(str(Path(__file__).resolve().parents[1]))     # bench/ (gtn_long)

import torch  # noqa: E402
from gtn_long import SETTINGS, cell_config  # noqa: E402

from distill.data import load_dataset  # noqa: E402
from distill.engine import accuracy  # noqa: E402
from distill.inner import load_params  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from distill.strategies import RealSampler, make_strategy  # noqa: E402
from gtn.train import _student_factory, split_validation  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "gtn-long"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="mnist-t10")
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    args = ap.parse_args()
    config = cell_config(f"{args.setting}/trajectory")
    dataset = SETTINGS[args.setting][0]
    data = load_dataset(dataset, "train", root=args.data_root)
    test = load_dataset(dataset, "test", root=args.data_root)
    fit, _ = split_validation(data, config.validation)
    make_student = _student_factory(data.info, config, torch.device("cpu"))
    strategy = make_strategy(config.strategy, config.strategy_config)
    buffer = strategy.buffer(RealSampler(fit), make_student)  # what the cell trained with
    net = make_student(torch.Generator().manual_seed(0))
    rows = [[100.0 * accuracy(load_params(net, buffer.epoch(e, k)), test.images, test.labels)
             for k in range(buffer.epochs + 1)] for e in range(len(buffer))]
    record = {"setting": args.setting, "config": repr(config), "experts": len(buffer),
              "epochs": buffer.epochs, "test_accuracy": rows,
              "threads": torch.get_num_threads()}
    stem = f"trajectory-bound-{args.setting}"
    atomic_write_json(OUT / f"{stem}.json", record)
    lines = [f"# What the trajectory-matched generator imitates ({args.setting})", "",
             f"`python bench/experiments/gtn_trajectory_bound.py --setting {args.setting}`: "
             f"the {len(buffer)} in-memory experts of the `{args.setting}/trajectory` cell "
             f"(`{config.student}`, SGD 0.01, batch 256, no augmentation, on the "
             f"meta-training split), test accuracy (%) after each epoch.", "",
             "| expert | " + " | ".join(f"epoch {k}" for k in range(buffer.epochs + 1)) + " |",
             "|---|" + "---|" * (buffer.epochs + 1)]
    lines += [f"| {e} | " + " | ".join(f"{a:.2f}" for a in row) + " |"
              for e, row in enumerate(rows)]
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(buffer.epochs + 1)]
    lines.append("| mean | " + " | ".join(f"{a:.2f}" for a in mean) + " |")
    atomic_write_text(OUT / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
