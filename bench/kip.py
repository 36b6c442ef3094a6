"""KIP and Label Solve benchmark: MNIST and CIFAR-10 at 1 / 10 / 50 images per class, each set
scored twice, by the KIP paper's protocol and by the DC protocol.

Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021. For every
(data set, IPC), starting from the same random real images (seed 0):

* ``onehot``: the random real images with one-hot labels (the baseline LS must beat);
* ``ls``: the same images with Label Solve's labels (targets: ``ls_targets`` random real
  training images);
* ``kip``: KIP from those images (labels fixed, or learned with ``--learn-labels``), through the
  one meta-training loop (checkpointed: a killed cell continues from ``OUT/ckpt``).

Scores: **KRR** = kernel ridge regression with the FC kernel on the full test set (the paper's
protocol, its Table 1); **ConvNet** = training ``eval_model`` students on the set with the DC
protocol (:func:`distill.engine.evaluate_set`: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256,
lr x0.1 at half) for ``eval_epochs`` epochs on a fixed test subset, as in
``bench/results/condense-short.md`` (whose DC / DSA / DM rows are shown beside ours).

Each cell is written to the JSON as it finishes; ``--resume`` skips finished cells.

    python bench/kip.py --budget smoke   # a minute
    python bench/kip.py --budget short   # about an hour on a 2-core CPU (the README table)
    python bench/kip.py --budget long    # MNIST learning curves to 10 000 iterations (CPU)
    python bench/kip.py --budget paper   # the paper's iteration counts (wants a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.condense import condense  # noqa: E402
from distill.data import load_dataset  # noqa: E402
from distill.devices import resolve_device  # noqa: E402
from distill.engine import EvalProtocol, TrainConfig, evaluate_set  # noqa: E402
from distill.kernels import KernelConfig, make_kernel  # noqa: E402
from distill.kip import kip_config, krr_accuracy, label_solve_set, training_labels  # noqa: E402
from distill.protocols import describe_protocol, make_protocol  # noqa: E402
from distill.rng import generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from distill.synthetic import SyntheticSet  # noqa: E402

# The KIP paper (ICLR 2021) reports KRR test accuracy with FC kernels of about 85 % on MNIST
# at 1 image per class and about 97 % at 10 (rounded figures). Only these are given: the other
# cells of its table could not be checked against the paper's text here, so none is quoted.
PAPER_KRR: dict[tuple[str, int], dict[str, float | None]] = {
    ("mnist", 1): {"kip": 85.0, "ls": None}, ("mnist", 10): {"kip": 97.0, "ls": None},
    ("mnist", 50): {"kip": None, "ls": None},
    ("cifar10", 1): {"kip": None, "ls": None}, ("cifar10", 10): {"kip": None, "ls": None},
    ("cifar10", 50): {"kip": None, "ls": None},
}
# Published DC / DSA / DM with the DC ConvNet (GPU, full protocol).
PAPER_CONVNET = {
    ("mnist", 1): "91.7 / 88.7 / 89.7", ("mnist", 10): "97.4 / 97.8 / 97.5",
    ("mnist", 50): "98.8 / 99.2 / 98.6", ("cifar10", 1): "28.3 / 28.8 / 26.0",
    ("cifar10", 10): "44.9 / 52.1 / 48.9", ("cifar10", 50): "53.9 / 60.6 / 63.0",
}
METHODS = ("onehot", "ls", "kip")


@dataclass(frozen=True)
class Budget:
    name: str
    cells: tuple[tuple[str, int], ...]    # (data set, IPC) in the order they run
    iterations: dict                       # IPC -> KIP iterations
    target_batch: int
    lr: float
    kernel: str
    depth: int
    reg: float
    ls_targets: int
    curve_every: int                       # KRR on a test subset every this many iterations
    curve_test: int
    eval_model: str
    eval_epochs: dict                      # IPC -> ConvNet epochs
    students: dict                         # IPC -> ConvNet students
    test_limit: int | None
    notes: str
    balanced: bool = False                 # class-balanced target batches (the paper's)
    dc_protocol: bool = False              # ConvNet scored by the full DC protocol (MNIST:
    #                                        crop/scale/rotate, 1000 epochs), not eval_epochs

    def iters(self, ipc: int) -> int:
        return self.iterations[ipc]


_CELLS = (("mnist", 1), ("mnist", 10), ("cifar10", 1), ("cifar10", 10), ("mnist", 50),
          ("cifar10", 50))

BUDGETS = {
    "smoke": Budget("smoke", (("mnist", 1), ("mnist", 10)), {1: 5, 10: 5}, 200, 0.01, "ntk",
                    1, 1e-6, 1000, 5, 500, "convnet:width=8", {1: 3, 10: 3}, {1: 1, 10: 1},
                    500,
                    "proves the path: 5 KIP iterations, 3 ConvNet epochs"),
    "short": Budget("short", _CELLS, {1: 2000, 10: 1000, 50: 300}, 1000, 0.01, "ntk", 1, 1e-6,
                    10000, 100, 2000, "convnet:width=32", {1: 300, 10: 300, 50: 100},
                    {1: 2, 10: 2, 50: 1}, 2000,
                    "KIP: FC1 NTK (w_var 2, b_var 0.01), lambda 1e-6 x tr(K_ss)/n_s, Adam lr "
                    "0.01, 2000 iterations at IPC 1, 1000 at IPC 10, 300 at IPC 50, "
                    "target batch 1000, labels fixed, init random real images; LS: 10 000 "
                    "random training images as targets; KRR scored on the full test set; "
                    "ConvNet: width-32 DC ConvNet, DC protocol without augmentation, 300 epochs "
                    "and 2 students at IPC 1 and 10 (as condense-short, whose random-real "
                    "figure is the onehot row: the same images), 100 epochs and 1 student at "
                    "IPC 50, fixed 2000-image test subset"),
    "paper": Budget("paper", _CELLS, {1: 4000, 10: 4000, 50: 4000}, 5000, 0.01, "ntk", 3,
                    1e-6, 60000, 250, 10000, "convnet", {1: 300, 10: 300, 50: 300},
                    {1: 5, 10: 5, 50: 5}, None,
                    "KIP: FC3 NTK, 4000 iterations, target batch 5000; ConvNet: DC protocol, "
                    "width 128, 300 epochs, 5 students, full test set", balanced=True),
    # The learning curve at the paper's sampling (class-balanced target batches) and ten
    # times the short budget's iterations, MNIST only: how far KIP climbs on this CPU.
    "long": Budget("long", (("mnist", 10), ("mnist", 1)), {1: 10000, 10: 10000}, 5000, 0.01,
                   "ntk", 1, 1e-6, 10000, 500, 2000, "convnet:width=32", {1: 1000, 10: 1000},
                   {1: 2, 10: 2}, 2000,
                   "KIP: FC1 NTK (w_var 2, b_var 0.01), lambda 1e-6 x tr(K_ss)/n_s, Adam lr "
                   "0.01, 10 000 iterations, class-balanced target batches of 5000, labels "
                   "fixed, init random real images; LS: 10 000 random training images as "
                   "targets; KRR scored on the full test set; ConvNet: width-32 DC ConvNet, the DC "
                   "protocol (MNIST: crop/scale/rotate augmentation, 1000 epochs), 2 students, "
                   "fixed 2000-image test subset", balanced=True, dc_protocol=True),
}


class Bench:
    def __init__(self, budget: Budget, out: Path, device: torch.device, data_root,
                 resume: bool, learn_labels: bool | str, methods: tuple[str, ...] = METHODS):
        self.budget, self.out, self.device, self.root = budget, out, device, data_root
        self.learn_labels, self.methods = learn_labels, methods
        # "-labels": softmax soft labels (the first runs); "-freelabels": the paper's free ones
        self.tag = tag = {False: "", "softmax": "-labels", "free": "-freelabels"}[learn_labels]
        self.json_path = out / f"kip-{budget.name}{tag}.json"
        self.md_path = out / f"kip-{budget.name}{tag}.md"
        self.state = {"budget": asdict(budget), "cells": {}, "device": str(device),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "learn_labels": learn_labels}
        if resume and self.json_path.exists():
            self.state["cells"] = json.loads(self.json_path.read_text())["cells"]
        self._data: dict = {}
        self.kernel_config = KernelConfig(budget.kernel, budget.depth)
        self.kernel = make_kernel(budget.kernel, budget.depth)

    def data(self, name: str):
        if name not in self._data:
            self._data[name] = (load_dataset(name, "train", self.root).to(self.device),
                                load_dataset(name, "test", self.root).to(self.device))
        return self._data[name]

    def save(self) -> None:
        atomic_write_json(self.json_path, self.state)
        atomic_write_text(self.md_path, self.markdown())

    def convnet(self, name: str, ipc: int, images: torch.Tensor, labels: torch.Tensor) -> dict:
        b = self.budget
        _, test = self.data(name)
        if b.dc_protocol:
            protocol = make_protocol("dc", name, model=b.eval_model, n_students=b.students[ipc],
                                     test_limit=b.test_limit)
        else:
            protocol = EvalProtocol(model=b.eval_model, n_students=b.students[ipc],
                                    train=TrainConfig(epochs=b.eval_epochs[ipc]),
                                    test_limit=b.test_limit)
        r = evaluate_set(images.detach(), training_labels(labels.detach()), test.images,
                         test.labels, protocol, seed=0, num_classes=test.info.num_classes)
        return {"convnet_mean": r.mean, "convnet_std": r.std,
                "convnet_protocol": describe_protocol(protocol),
                "convnet_accuracies": list(r.accuracies), "convnet_seconds": r.seconds}

    def reuse_random(self, name: str, ipc: int) -> dict | None:
        """condense-short's ConvNet score of the same random real images (seed 0, same
        init stream) under the same protocol, where that file has it (saves the CPU time)."""
        path = self.out / "condense-short.json"
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        cb, b = d["budget"], self.budget
        c = d["cells"].get(f"accuracy/{name}/{ipc}/random")
        if c is None:
            return None
        scored = (c.get("protocol") == "dc" if b.dc_protocol
                  else "protocol" not in c and cb["eval_epochs"] == b.eval_epochs[ipc])
        same = (cb["model"] == b.eval_model and cb["students"] == b.students[ipc]
                and cb["test_limit"] == b.test_limit and scored)
        if not same:
            return None
        return {"convnet_mean": c["mean"], "convnet_std": c["std"],
                "convnet_accuracies": c["accuracies"], "convnet_source": "condense-short.json"}

    def krr(self, name: str, images: torch.Tensor, labels: torch.Tensor) -> float:
        _, test = self.data(name)
        return krr_accuracy(images.detach(), labels.detach(), test.images, test.labels,
                            self.kernel, self.budget.reg)

    def cell(self, name: str, ipc: int) -> None:
        b = self.budget
        train_set, test = self.data(name)
        init = SyntheticSet.from_real(train_set, ipc, generator(0, "init")).to(self.device)
        x0, y0 = init.images.detach(), init.labels
        for method in self.methods:
            key = f"{name}/{ipc}/{method}"
            if key in self.state["cells"]:
                continue
            t0 = time.perf_counter()
            cell = {"dataset": name, "ipc": ipc, "method": method,
                    "paper_krr": PAPER_KRR[(name, ipc)].get(method)}
            if method == "onehot":
                x, y = x0, y0
            elif method == "ls":
                y = label_solve_set(x0, train_set, self.kernel_config, b.reg, b.ls_targets,
                                    generator(0, "ls-targets"))
                x = x0
                cell["ls_seconds"] = time.perf_counter() - t0
            else:
                sub = test.subset(torch.randperm(len(test), generator=generator(0, "curve"))
                                  [:b.curve_test].to(test.labels.device))

                def curve(teacher, it, sub=sub):
                    xs, ys = teacher.batch(None, None)
                    return {"krr_subset": krr_accuracy(xs.detach(), ys.detach(), sub.images,
                                                       sub.labels, self.kernel, b.reg)}

                cfg = kip_config(b.iters(ipc), lr=b.lr, eval_every=b.curve_every,
                                 checkpoint_every=25, kernel=b.kernel, kernel_depth=b.depth,
                                 reg=b.reg, target_batch=b.target_batch,
                                 balanced_targets=b.balanced)
                ckpt = self.out / "ckpt" / f"kip-{b.name}{self.tag}-{name}-{ipc}.pt"
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                syn, res = condense(train_set, cfg, ipc, init="real", seed=0,
                                    device=self.device, learn_labels=self.learn_labels,
                                    checkpoint=ckpt, resume=ckpt.exists(), evaluate=curve)
                x, y = syn.batch(None, None)
                cell.update(iterations=res.iterations, final_loss=res.losses[-1],
                            first_loss=res.losses[0],
                            seconds_per_iteration=res.seconds_per_iteration,
                            memory=res.memory, curve=res.evals)
            cell["krr"] = self.krr(name, x, y)
            reused = self.reuse_random(name, ipc) if method == "onehot" else None
            cell.update(reused or self.convnet(name, ipc, x, y))
            cell["wall_seconds"] = time.perf_counter() - t0
            self.state["cells"][key] = cell
            self.save()
            print(f"{key}: KRR {cell['krr']:.2f}  ConvNet {cell['convnet_mean']:.2f}  "
                  f"({cell['wall_seconds']:.0f} s)", flush=True)

    def markdown(self) -> str:
        b = self.budget
        cells = self.state["cells"]
        short = _condense_short(self.out)
        labels = {False: "", "softmax": " (learned soft labels, softmax)",
                  "free": " (learned free labels, as in the paper)"}[self.learn_labels]
        lines = [f"KIP / Label Solve, budget `{b.name}`{labels}: {b.notes}. Device "
                 f"{self.state['device']} ({self.state['threads']} threads).",
                 "",
                 "Two protocols, never to be mixed up: **KRR** = kernel ridge regression with "
                 f"the {b.kernel.upper()} kernel of an FC{b.depth} ReLU network on the learned "
                 "set, full test set (the KIP paper's protocol); **ConvNet** = training "
                 f"`{b.eval_model}` students on it with the DC protocol (epochs and students "
                 "by IPC as above), mean ± std over students. `onehot` = the random real images "
                 "KIP and LS start from, with one-hot labels. Paper KRR figures: the KIP "
                 "paper's rounded figures for MNIST at 1 and 10 images per class (FC kernels, "
                 "KRR protocol; its other cells are not quoted); ConvNet figures: DC / DSA / "
                 "DM (ConvNet, GPU, full DC protocol); 'short' column: our DC / DSA / DM at "
                 "condense-short's budget (same ConvNet protocol as ours).",
                 "",
                 "| data set | IPC | method | KRR (ours) | KRR (paper) | ConvNet (ours) | "
                 "DC / DSA / DM ConvNet (paper) | DC / DSA / DM ConvNet (short) | KIP iters | "
                 "s / iter |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for name, ipc in b.cells:
            for method in METHODS:
                c = cells.get(f"{name}/{ipc}/{method}")
                if c is None:
                    lines.append(f"| {name} | {ipc} | {method} | not run | | | | | | |")
                    continue
                paper = c.get("paper_krr")
                its = c.get("iterations", "—")
                spi = f"{c['seconds_per_iteration']:.2f}" if "seconds_per_iteration" in c else "—"
                lines.append(
                    f"| {name} | {ipc} | {method} | {c['krr']:.2f} | "
                    f"{'—' if paper is None else paper} | "
                    f"{c['convnet_mean']:.1f} ± {c['convnet_std']:.1f} | "
                    f"{PAPER_CONVNET[(name, ipc)]} | {short.get((name, ipc), '—')} | "
                    f"{its} | {spi} |")
        curves = [(k, c["curve"]) for k, c in cells.items() if c.get("curve")]
        if curves:
            lines += ["", f"KIP learning curves: KRR accuracy (%) on a fixed {b.curve_test}-image "
                      "test subset after each number of iterations.", ""]
            for key, curve in curves:
                pts = ", ".join(f"{p['iteration']}: {p['krr_subset']:.1f}" for p in curve)
                lines.append(f"- {key}: {pts}")
        return "\n".join(lines) + "\n"


def _condense_short(out: Path) -> dict:
    """Our DC / DSA / DM ConvNet figures at condense-short's budget, where that file exists."""
    path = out / "condense-short.json"
    if not path.exists():
        return {}
    cells = json.loads(path.read_text())["cells"]
    res = {}
    for name, ipc in _CELLS:
        got = [cells.get(f"accuracy/{name}/{ipc}/{m}") for m in ("dc", "dsa", "dm")]
        if all(got):
            res[(name, ipc)] = " / ".join(f"{g['mean']:.1f}" for g in got)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--learn-labels", choices=("softmax", "free"), default=None, nargs="?",
                   const="free", help="KIP also learns the labels: free real vectors (the "
                   "paper's; the default) or softmax soft labels")
    p.add_argument("--only", default=None, help="comma-separated data set/IPC cells, e.g. mnist/10")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows to run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    args.out.mkdir(parents=True, exist_ok=True)
    methods = tuple(m for m in METHODS if m in args.methods.split(","))
    bench = Bench(budget, args.out, resolve_device(args.device), args.data_root, args.resume,
                  args.learn_labels or False, methods)
    only = set(args.only.split(",")) if args.only else None
    for name, ipc in budget.cells:
        if only is None or f"{name}/{ipc}" in only:
            bench.cell(name, ipc)
    bench.save()


if __name__ == "__main__":
    main()
