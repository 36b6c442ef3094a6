"""The search report as Markdown and as a scatter plot (proxy vs true accuracy)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from distill.store import save_figure

__all__ = ["report_markdown", "plot_scatter"]


def _ci(value: float, ci: Sequence[float]) -> str:
    if not math.isfinite(value):
        return "—"
    lo, hi = ci
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{value:.2f}"


def report_markdown(report: dict) -> str:
    """The report as Markdown: the budget, one row per proxy, and the winner."""
    b = report["budget"]
    t = report["truth"]
    n = len(report["candidates"])
    lines = [
        (f"Architecture-search proxies on {report['dataset']}, budget `{b['name']}`"
         + (f" ({b['notes']})" if b.get("notes") else "") + "."),
        "",
        (f"{n} candidates; ground truth: {t['steps']} steps (batch {t['train']['batch_size']}, "
         f"{t['train']['epochs']} epoch(s) on {t['size']} training images), "
         f"{t['seconds']:.0f} s of training in all; every accuracy is on "
         f"{report['validation']} held-out training images (not the test set). Spearman / "
         f"Kendall tau-b with 95 % bootstrap intervals ({b['resamples']} resamples of the "
         f"candidates); top half = the "
         f"{max(2, n // 2)} best by true accuracy."),
        "",
        ("| proxy | images | steps | Spearman (all) | Spearman (top half) | Kendall (all) | "
         "Kendall (top half) | top-k overlap | picked acc. (%) | speed-up (train / wall) |"),
        "|---|---|---|---|---|---|---|---|---|---|"]
    for label, q in report["proxies"].items():
        lines.append(
            f"| {label} | {q['size']} | {q['steps']} | {_ci(q['spearman'], q['spearman_ci'])} "
            f"| {_ci(q['spearman_top'], q['spearman_top_ci'])} | "
            f"{_ci(q['kendall'], q['kendall_ci'])} | {_ci(q['kendall_top'], q['kendall_top_ci'])}"
            f" | {q['top_k_overlap']:.2f} (k={q['top_k']}) | {q['picked']:.2f} | "
            f"{q.get('speedup', math.nan):.1f}x / {q.get('speedup_wall', math.nan):.1f}x |")
    if report["proxies"]:
        best = max(c["truth"] for c in report["candidates"])
        lines += ["", (f"Best possible pick: {best:.2f} %. Winner (highest top-half "
                       f"Spearman): **{report['winner']}**. Published GTN proxy (Such et al., "
                       f"ICML 2020): Spearman 0.56 on the top half at ~9x fewer steps."),
                  "", ("Speed-up = ground-truth seconds / proxy seconds summed over the "
                       "candidates: of the training loops, and wall time with building and "
                       "scoring each student (building a proxy set is not included: see "
                       "setup_seconds in the JSON).")]
    return "\n".join(lines) + "\n"


def plot_scatter(report: dict, path: str | os.PathLike) -> bool:
    """Proxy vs true accuracy, one panel per proxy, as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(report["proxies"])
    if not labels:
        return False
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    truth = [c["truth"] for c in report["candidates"]]
    for ax, label in zip(axes.flat, labels):
        q = report["proxies"][label]
        ax.scatter([c["proxies"][label]["accuracy"] for c in report["candidates"]], truth, s=14)
        ax.set(xlabel=f"{label} accuracy (%)", ylabel="true accuracy (%)",
               title=f"{label}\nSpearman {q['spearman']:.2f}, top half {q['spearman_top']:.2f}")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return True
