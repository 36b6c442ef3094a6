"""Trajectory matching (MTT) benchmark: TESLA's memory against the unroll's, and MTT on MNIST.

Two parts, results under ``bench/results/trajectory/`` (JSON + Markdown):

* ``memory``: the bytes autograd saves for one MTT gradient against the number of synthetic
  steps N (10, 20, 40, 80), unrolled and TESLA side by side in one process, on the DC ConvNet
  (width 128, depth 3) with MNIST-shaped learnable pixels (IPC 1 by default) and DSA
  augmentation, plus what TESLA keeps outside the graph (its N student states), the seconds
  of one gradient and how far the two gradients are apart (they are the same gradient).
* ``condense``: MTT on MNIST or CIFAR-10 (``--dataset``) at IPC 1 or 10 (``--ipc``) on a CPU
  budget: experts trained first
  (:mod:`distill.experts`, kept in ``--work``), then MTT through the one meta-training loop
  (:func:`distill.condense.condense`), the set scored with the DC protocol next to the random
  real images it started from (the same images, the same students).

    python bench/trajectory.py memory                    # a few minutes on a 2-core CPU
    python bench/trajectory.py condense --budget smoke                 # a minute
    python bench/trajectory.py condense --budget short                 # MNIST IPC 1: ~1 hour
    python bench/trajectory.py condense --dataset cifar10 --ipc 10 --budget short10
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

from distill.augment import DEFAULT_STRATEGY as DSA_OPS  # noqa: E402
from distill.augment import AugmentConfig, DiffAugment, digit_strategy  # noqa: E402
from distill.condense import condense, condense_config  # noqa: E402
from distill.data import load_dataset  # noqa: E402
from distill.engine import evaluate_set  # noqa: E402
from distill.experts import expert_config_for, train_experts  # noqa: E402
from distill.memory import SavedTensorMeter  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.protocols import describe_protocol, make_protocol  # noqa: E402
from distill.rng import generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text  # noqa: E402
from distill.synthetic import SyntheticSet  # noqa: E402
from distill.trajectory import tesla_gradient, unrolled_gradient  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "trajectory"
MIB = 2 ** 20


def memory(steps: list[int], model: str, ipc: int) -> dict:
    """One MTT gradient per (N, method) on the same problem; saved bytes, states, seconds."""
    info = load_dataset("mnist", "test").info
    net = build_model(model, info.channels, info.num_classes, info.im_size,
                      generator=generator(0, "bench-trajectory"))
    start = [p.detach().clone() for p in net.parameters()]
    g = generator(1, "bench-trajectory")
    target = [p + 0.01 * torch.randn(p.shape, generator=g) for p in start]
    param_bytes = sum(p.numel() * p.element_size() for p in start)
    pixels = torch.randn(info.num_classes * ipc, info.channels, *info.im_size, generator=g)
    labels = torch.arange(info.num_classes).repeat_interleave(ipc)
    aug = DiffAugment(AugmentConfig(strategy=digit_strategy(DSA_OPS, "mnist"), per_sample=True))
    rows = []
    for n in steps:
        grads = {}
        for name, fn in (("unrolled", unrolled_gradient), ("tesla", tesla_gradient)):
            px = pixels.clone().requires_grad_()
            lr = torch.tensor(0.01, requires_grad=True)

            def batch(i: int, px: torch.Tensor = px) -> tuple[torch.Tensor, torch.Tensor]:
                return aug(px, generator(i, "bench-trajectory-step")), labels

            t0 = time.perf_counter()
            with SavedTensorMeter() as meter:
                loss, got = fn(net, start, target, batch, n, lr, [px, lr])
            seconds = time.perf_counter() - t0
            grads[name] = got
            rows.append({"steps": n, "gradient": name, "saved_peak_bytes": meter.peak,
                         "kept_state_bytes": n * param_bytes if name == "tesla" else 0,
                         "seconds": seconds, "loss": float(loss)})
            print(f"N={n:3d} {name:8s} saved {meter.peak / MIB:8.1f} MiB  "
                  f"{seconds:6.1f} s", flush=True)
        u, t = grads["unrolled"], grads["tesla"]
        rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(t, u))
        rows[-1]["relative_difference_to_unrolled"] = rel
        rows[-2]["relative_difference_to_unrolled"] = 0.0
    return {"model": model, "ipc": ipc, "dataset": "mnist", "param_bytes": param_bytes,
            "augment": digit_strategy(DSA_OPS, "mnist"), "threads": torch.get_num_threads(),
            "rows": rows}


def memory_markdown(res: dict, command: str) -> str:
    rows = res["rows"]
    by = {(r["steps"], r["gradient"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    lines = [
        "# MTT gradient memory against the number of synthetic steps N",
        "",
        f"`{command}`: one MTT gradient (pixels and learned lr) of MNIST IPC {res['ipc']} on "
        f"`{res['model']}` with DSA augmentation ({res['augment']}), both methods in one "
        f"process, CPU, {res['threads']} thread(s). *Saved* = peak bytes autograd saves for "
        "backward (distill.memory.SavedTensorMeter); *kept states* = TESLA's N student "
        f"parameter vectors held outside the graph ({res['param_bytes'] / MIB:.2f} MiB each).",
        "",
        "| N | unrolled saved (MiB) | TESLA saved (MiB) | TESLA kept states (MiB) | "
        "unrolled s | TESLA s | rel. difference of the gradients |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in steps:
        u, t = by[(n, "unrolled")], by[(n, "tesla")]
        lines.append(f"| {n} | {u['saved_peak_bytes'] / MIB:.1f} | "
                     f"{t['saved_peak_bytes'] / MIB:.1f} | {t['kept_state_bytes'] / MIB:.1f} | "
                     f"{u['seconds']:.1f} | {t['seconds']:.1f} | "
                     f"{t['relative_difference_to_unrolled']:.1e} |")
    lo, hi = steps[0], steps[-1]
    tl, th = by[(lo, "tesla")]["saved_peak_bytes"], by[(hi, "tesla")]["saved_peak_bytes"]
    ul, uh = by[(lo, "unrolled")]["saved_peak_bytes"], by[(hi, "unrolled")]["saved_peak_bytes"]
    lines += ["", f"From N = {lo} to {hi}: TESLA's saved memory x{th / tl:.3f} "
              f"({100 * (th / tl - 1):+.1f} %), the unroll's x{uh / ul:.2f} (N grew x{hi / lo:g})."]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Budget:
    name: str
    experts: int
    expert_epochs: int          # E of each expert
    expert_subset: int | None   # real training images the experts see (None: all)
    model: str
    syn_steps: int
    match_epochs: int           # M
    max_start_epoch: int
    iterations: int
    students: int
    eval_epochs: int | None     # None: the protocol's
    test_limit: int | None


BUDGETS = {
    "smoke": Budget("smoke", 1, 2, 2000, "convnet:width=8", 5, 1, 1, 5, 1, 20, 500),
    "short": Budget("short", 3, 4, None, "convnet:width=32", 20, 2, 3, 500, 3, None, None),
    # IPC 10 on a CPU: the short budget's experts, MTT's N = 30 for IPC 10 on CIFAR-10 cut to
    # 20, a tenth of its iterations again
    "short10": Budget("short10", 3, 4, None, "convnet:width=32", 20, 2, 3, 200, 3, None,
                      None),
    "paper": Budget("paper", 100, 50, None, "convnet", 20, 2, 20, 5000, 5, None, None),
}


def mtt(dataset: str, ipc: int, budget: Budget, work: Path, gradient: str) -> dict:
    """Experts, then MTT at ``ipc``, scored with the DC protocol beside its start."""
    train_set = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test")
    expert_set = train_set
    if budget.expert_subset:
        idx = torch.randperm(train_set.labels.numel(), generator=generator(0, "subset"))
        expert_set = train_set.subset(idx[:budget.expert_subset].sort().values)
    folder = work / f"experts-{dataset}-{budget.model}-{budget.experts}x{budget.expert_epochs}"
    conf = expert_config_for(dataset, model=budget.model, epochs=budget.expert_epochs)
    t0 = time.perf_counter()
    train_experts(expert_set, folder, budget.experts, conf, seed=0)
    expert_seconds = time.perf_counter() - t0
    config = condense_config("mtt", iterations=budget.iterations, dataset=dataset,
                             experts=str(folder), expert_epochs=budget.match_epochs,
                             max_start_epoch=budget.max_start_epoch, gradient=gradient,
                             checkpoint_every=50)
    ckpt = work / f"mtt-{dataset}-ipc{ipc}-{budget.name}-{gradient}.pt"
    teacher, result = condense(train_set, config, ipc=ipc, init="real", model=budget.model,
                               seed=0, learn_lr=True, inner_steps=budget.syn_steps,
                               checkpoint=ckpt, resume=ckpt.exists())
    init = SyntheticSet.from_real(train_set, ipc, generator(0, "init"))
    over = {"epochs": budget.eval_epochs} if budget.eval_epochs else {}
    protocol = make_protocol("dc", dataset, model=budget.model, n_students=budget.students,
                             test_limit=budget.test_limit, **over)
    learned_lr = float(teacher.lr or 0.01)
    at_lr = make_protocol("dc", dataset, model=budget.model, n_students=budget.students,
                          test_limit=budget.test_limit, lr=learned_lr, **over)
    scores = {}
    for name, images, prot in (("random real (the start)", init.images, protocol),
                               ("MTT", teacher.images, protocol),
                               ("MTT, at its learned lr", teacher.images, at_lr)):
        res = evaluate_set(images.detach(), teacher.labels, test.images, test.labels, prot,
                           seed=0, num_classes=10)
        scores[name] = {"mean": res.mean, "std": res.std, "accuracies": res.accuracies,
                        "protocol": describe_protocol(prot)}
        print(f"{name}: {res.mean:.2f} ± {res.std:.2f}", flush=True)
    return {"dataset": dataset, "ipc": ipc, "budget": asdict(budget), "gradient": gradient,
            "expert_seconds": expert_seconds,
            "expert_config": asdict(conf), "meta": result.as_dict() | {"losses": None},
            "final_losses": result.losses[-10:], "learned_lr": learned_lr, "scores": scores,
            "threads": torch.get_num_threads()}


def mtt_markdown(res: dict, command: str) -> str:
    b, m = res["budget"], res["meta"]
    name = {"mnist": "MNIST", "cifar10": "CIFAR-10"}[res.get("dataset", "mnist")]
    spent = "trained before in --work, reused" if res["expert_seconds"] < 5 else \
        f"{res['expert_seconds']:.0f} s"
    lines = [
        f"# MTT on {name}, IPC {res.get('ipc', 1)}, budget `{b['name']}`",
        "",
        f"`{command}`. Experts: {b['experts']} x {b['expert_epochs']} epochs of "
        f"`{b['model']}` on {b['expert_subset'] or 'all'} {name} training images "
        f"(SGD 0.01, batch 256, DSA), {spent}. MTT: {b['iterations']} "
        f"iterations, N = {b['syn_steps']} synthetic steps, M = {b['match_epochs']} expert "
        f"epochs, start epoch < {b['max_start_epoch']}, gradient `{res['gradient']}`, SGD 1000 "
        f"(momentum 0.5) on the pixels, lr_lr 1e-5; {m['seconds_per_iteration']:.2f} s per "
        f"iteration, saved peak {m['memory']['saved_peak_bytes'] / MIB:.1f} MiB; learned lr "
        f"{res['learned_lr']:.4f}; last meta-losses "
        f"{', '.join(f'{x:.3f}' for x in res['final_losses'][-3:])}. CPU, "
        f"{res['threads']} thread(s).",
        "",
        "| set | accuracy (%) | protocol |",
        "|---|---|---|",
    ]
    for name, s in res["scores"].items():
        lines.append(f"| {name} | {s['mean']:.2f} ± {s['std']:.2f} | {s['protocol']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("memory", "condense"))
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--gradient", choices=("unrolled", "tesla"), default="unrolled")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get(
        "TMPDIR", "/tmp")) / "gtnkit-bench-trajectory")
    args = parser.parse_args()
    command = "python bench/trajectory.py " + " ".join(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part == "memory":
        res = memory(args.steps, args.model, args.ipc)
        res["command"] = command
        stem = f"memory-{args.model.replace(':', '-').replace('=', '').replace(',', '-')}" \
            f"-ipc{args.ipc}"
        atomic_write_json(OUT / f"{stem}.json", res)
        atomic_write_text(OUT / f"{stem}.md", memory_markdown(res, command))
    else:
        res = mtt(args.dataset, args.ipc, BUDGETS[args.budget], args.work, args.gradient)
        res["command"] = command
        stem = f"{args.dataset}-ipc{args.ipc}-{args.budget}-{args.gradient}"
        atomic_write_json(OUT / f"{stem}.json", res)
        atomic_write_text(OUT / f"{stem}.md", mtt_markdown(res, command))
    print(json.dumps({"written": str(OUT)}), flush=True)


if __name__ == "__main__":
    main()
