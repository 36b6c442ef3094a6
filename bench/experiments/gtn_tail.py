"""How close the implicit recipe's meta-gradient is to the exact one, by tail length.

The implicit recipe backpropagates exactly through the last K of the T student steps and takes
the first-order trajectory gradient before them (``unroll_tail``; a tail of T is unrolled
backprop, tested equal to it). This measures, on the same meta-step (same student, batches and
real batch), the cosine between the tail-K meta-gradient and the exact one (K = T), for the
whole teacher and for its parts (generator weights, learned noise and labels, step sizes), at
generator states taken from the long benchmark's checkpoints and at initialisation.

    OMP_NUM_THREADS=1 python bench/experiments/gtn_tail.py --setting mnist-t32 \
        --tails 0,2,5,10,16,24 \
        --states init,mnist-t32--implicit-tail5,mnist-t32--unrolled --draws 3 --resume
    python bench/experiments/gtn_tail.py --report           # md + png from the json

The meta-gradient is the one the recipe's Adam step would receive (the recipe does not clip).
``--recomputed`` adds unrolled backprop with ``recompute`` (the steps rebuilt one at a time;
tested equal to storing them) as a row that should read 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ (after the packages)

import torch  # noqa: E402
from gtn_long import SETTINGS, cell_config  # noqa: E402  (bench/, on the path above)

from distill.data import load_dataset  # noqa: E402
from distill.rng import generator as make_generator  # noqa: E402
from distill.store import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from distill.strategies import RealSampler, make_strategy  # noqa: E402
from gtn.train import _student_factory, make_teacher, split_validation  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "gtn-tail"
CKPT = Path(__file__).resolve().parents[1] / "results" / "gtn-long" / "ckpt"


def _parts(teacher) -> dict[str, list[int]]:
    """Indices of the teacher's trainable parameters by part."""
    out: dict[str, list[int]] = {"generator": [], "noise and labels": [], "lr and momentum": []}
    trainable = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
    for i, (name, _) in enumerate(trainable):
        key = "lr and momentum" if name in ("log_lr", "momentum_logit") else \
            "generator" if name.startswith("generator.") else "noise and labels"
        out[key].append(i)
    return out


def meta_gradient(teacher, config, real, make_student, seed: int, draw: int
                  ) -> tuple[list[torch.Tensor], float]:
    """The implicit strategy's meta-gradient for one meta-step (not applied)."""
    strategy = make_strategy(config.method, config.meta_config().strategy_config)
    captured: dict = {}

    def capture(loss, _teacher, _optimizer, grads=None):
        captured["grads"] = [g.detach().clone() for g in grads]
        captured["loss"] = float(loss.detach())
        return captured["loss"]

    strategy._update = capture  # type: ignore[method-assign]
    teacher.zero_grad(set_to_none=True)
    strategy.step(teacher, None, real, make_student, make_generator(seed, "gtn-tail", draw))
    return captured["grads"], captured["loss"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cell = f"{args.setting}/implicit-tail5"
    base = cell_config(cell)
    t = base.inner_steps
    data = load_dataset(SETTINGS[args.setting][0], "train", root=args.data_root)
    fit = split_validation(data, base.validation)[0]
    real = RealSampler(fit)
    make_student = _student_factory(fit.info, base, torch.device("cpu"))
    tails = [int(k) for k in args.tails.split(",")]
    path = args.out / f"{args.tag}.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    done = {(r["state"], r["draw"], r["variant"]) for r in rows}

    def record() -> dict:
        return {"setting": SETTINGS[args.setting][3], "inner_steps": t, "seed": args.seed,
                "config": repr(base), "rows": rows}

    for state in args.states.split(","):
        teacher = make_teacher(fit.info, base, args.seed)
        at = 0
        if state != "init":
            ck = torch.load(CKPT / f"{state}.pt", map_location="cpu", weights_only=False)
            teacher.load_state_dict(ck["teacher"])
            at = int(ck["iteration"])
        parts = _parts(teacher)
        for draw in range(args.draws):
            variants = [(f"tail {k}", replace(base, unroll_tail=k)) for k in tails if k < t]
            if args.recomputed:
                variants.append(("unrolled, recomputed", replace(
                    base, method="unrolled", unroll_tail=0, mixed_at="final",
                    step_size_grad=False, recompute=True)))
            variants = [(n, c) for n, c in variants if (state, draw, n) not in done]
            if not variants:
                continue
            t0 = time.process_time()
            exact, loss_exact = meta_gradient(teacher, replace(base, unroll_tail=t), real,
                                              make_student, args.seed, draw)
            s_exact = time.process_time() - t0
            flat_exact = torch.cat([g.reshape(-1) for g in exact])
            for name, cfg in variants:
                t0 = time.process_time()
                grads, loss = meta_gradient(teacher, cfg, real, make_student, args.seed, draw)
                s = time.process_time() - t0
                # the same draws give the same student up to float rounding, which 32 steps
                # at trained step sizes amplify to ~1e-4; other draws differ by far more
                if abs(loss - loss_exact) > 1e-2 * max(1.0, abs(loss_exact)):
                    raise SystemExit(f"{name}: outer loss {loss} != exact {loss_exact}: the "
                                     f"two meta-steps did not see the same draws")
                flat = torch.cat([g.reshape(-1) for g in grads])
                row = {"state": state, "iteration": at, "draw": draw, "variant": name,
                       "tail": cfg.unroll_tail, "cos": _cos(flat, flat_exact),
                       "norm_ratio": float(flat.norm() / flat_exact.norm()),
                       "cpu_s": s, "cpu_s_exact": s_exact, "loss": loss,
                       "loss_exact": loss_exact}
                for part, idx in parts.items():
                    if idx:
                        a = torch.cat([grads[i].reshape(-1) for i in idx])
                        b = torch.cat([exact[i].reshape(-1) for i in idx])
                        row[f"cos {part}"] = _cos(a, b)
                rows.append(row)
                atomic_write_json(path, record())
                print(json.dumps(row), flush=True)
    return record()


def report(out: Path, tag: str) -> None:
    res = json.loads((out / f"{tag}.json").read_text())
    rows = res["rows"]
    keys = [k for k in rows[0] if k.startswith("cos")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["state"], r["iteration"], r["variant"]), []).append(r)
    lines = [f"# Meta-gradient against the exact one: {res['setting']}", "",
             f"Cosine between the implicit recipe's meta-gradient with an exact tail of K of the "
             f"T = {res['inner_steps']} steps (first-order head before it) and the exact "
             f"meta-gradient (K = T, unrolled backprop) on the same meta-step; mean over "
             f"draws (different students, batches and real batches). `norm` is the norm ratio. "
             f"Command: `python bench/experiments/gtn_tail.py` (see its docstring).", "",
             "| generator state | variant | draws | " + " | ".join(keys) +
             " | norm | CPU s (exact: CPU s) |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for (state, it, variant), rs in groups.items():
        def mean(k: str, rs: list[dict] = rs) -> float:
            return sum(r[k] for r in rs) / len(rs)
        label = "initialisation" if state == "init" else f"{state} at {it}"
        lines.append(f"| {label} | {variant} | {len(rs)} | " +
                     " | ".join(f"{mean(k):.3f}" for k in keys) +
                     f" | {mean('norm_ratio'):.2f} | {mean('cpu_s'):.1f} "
                     f"({mean('cpu_s_exact'):.1f}) |")
    atomic_write_text(out / f"{tag}.md", "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for state in dict.fromkeys(r["state"] for r in rows):
        pts: dict[int, list[float]] = {}
        for r in rows:
            if r["state"] == state and r["variant"].startswith("tail"):
                pts.setdefault(r["tail"], []).append(r["cos"])
        ks = sorted(pts)
        ax.plot(ks + [res["inner_steps"]], [sum(pts[k]) / len(pts[k]) for k in ks] + [1.0],
                "o-", label=state)
    ax.set_xlabel("exact tail K (of T steps)")
    ax.set_ylabel("cosine to the exact meta-gradient")
    ax.set_title(res["setting"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / f"{tag}.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="mnist-t32", choices=sorted(SETTINGS))
    ap.add_argument("--tails", default="0,2,5,10,16,24")
    ap.add_argument("--states", default="init",
                    help="comma-separated: init, or a checkpoint name of bench/results/gtn-long/"
                         "ckpt (e.g. mnist-t32--unrolled)")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recomputed", action="store_true")
    ap.add_argument("--data-root", default=os.environ.get("GTNKIT_DATA"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in the JSON (it is written after each row)")
    args = ap.parse_args()
    args.tag = args.tag or f"gtn-tail-{args.setting}"
    if not args.report:
        atomic_write_json(args.out / f"{args.tag}.json", run(args))
    report(args.out, args.tag)


if __name__ == "__main__":
    main()
