"""Diagnostic beside the data-budget curve: a random class-balanced 10 % trained for as many
SGD steps as the whole set (10x the epochs), to separate the data lost from the steps lost.

    python bench/experiments/curve_steps.py mnist 100  # LeNet, 100 epochs on 10 %: the steps of all
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ (after the packages)

from distill.data import load_dataset  # noqa: E402
from distill.engine import TrainConfig, accuracy, train  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.rng import generator  # noqa: E402
from selection import select  # noqa: E402


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    ds, epochs = argv[0], int(argv[1])
    tr, te = load_dataset(ds, "train"), load_dataset(ds, "test")
    idx = select(tr, "random", fraction=0.1, seed=0).indices
    g = generator(0, "curve-student")       # the curve's student seed 0
    m = build_model("lenet", tr.info.channels, tr.info.num_classes, tr.info.im_size, generator=g)
    cpu = time.process_time()
    st = train(m, tr.images[idx], tr.labels[idx], TrainConfig(epochs=epochs), g)
    print(f"{ds} random 10 % seed 0, lenet {epochs} epochs ({st.steps} steps): "
          f"{100 * accuracy(m, te.images, te.labels):.2f} %, train {st.seconds:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
