"""The search report as Markdown and as a scatter plot (proxy vs true accuracy)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from distill.store import save_figure

__all__ = ["report_markdown", "draws_markdown", "plot_scatter"]

PAPER_GTN_TOP = 0.56
"""Such et al. (ICML 2020): the GTN proxy's Spearman with true accuracy on the top half."""


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
        sep = report.get("across", {}).get("comparison", {}).get("spearman_top")
        verdict = ""
        if sep is not None:
            verdict = (f" Separable by the paired comparison: **{sep['winner']}**." if
                       sep["winner"] else " No proxy is separable by the paired comparison "
                       "(Holm, top-half Spearman).")
        lines += ["", (f"Best possible pick: {best:.2f} %. Nominal leader (highest top-half "
                       f"Spearman): {report['winner']}.{verdict} Published GTN proxy (Such et "
                       f"al., ICML 2020): Spearman 0.56 on the top half at ~9x fewer steps."),
                  "", ("Speed-up = ground-truth seconds / proxy seconds summed over the "
                       "candidates: of the training loops, and wall time with building and "
                       "scoring each student (building a proxy set is not included: see "
                       "setup_seconds in the JSON).")]
    return "\n".join(lines) + "\n"


def _mean_ci(cell: dict) -> str:
    mean, (lo, hi) = cell["mean"], cell["ci"]
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{mean:.2f}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _comparison_lines(comp: dict, what: str) -> list[str]:
    alpha = comp["alpha"]
    labels = sorted(comp["labels"], key=lambda lab: -comp["estimate"][lab])
    if comp["winner"]:
        verdict = (f"**{comp['winner']}** is separable: it beats every other proxy on the "
                   f"{what} (Holm-adjusted p < {alpha:g} for each pair).")
    else:
        others = [lab for lab in comp["top_group"] if lab != comp["leader"]]
        verdict = (f"**No proxy is separable** on the {what}: the leader {comp['leader']} "
                   f"cannot be told apart (Holm-adjusted p >= {alpha:g}) from "
                   f"{', '.join(others)}.")
    sig = [q for q in comp["pairs"] if q["significant"]]
    lines = [verdict, "",
             "P(ranks first) over the bootstrap resamples: "
             + ", ".join(f"{lab} {comp['p_best'][lab]:.2f}" for lab in labels) + ".", "",
             "| a − b | difference of mean Spearman [95 % CI] | p | Holm p |",
             "|---|---|---|---|"]
    for q in comp["pairs"]:
        lo, hi = q["ci"]
        mark = " *" if q["significant"] else ""
        lines.append(f"| {q['a']} − {q['b']} | {q['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                     f" | {_p(q['p'])} | {_p(q['p_holm'])}{mark} |")
    lines += ["", f"{len(sig)} of {len(comp['pairs'])} pairs significant (*: Holm p < "
                  f"{alpha:g}); {comp['resamples']} paired resamples."]
    return lines


def draws_markdown(report: dict) -> str:
    """The figures across draws as Markdown: per-draw, mean (t interval) and pooled Spearman
    on the top half and over all candidates, Kendall, how often each proxy ranks first, the
    paired comparison of proxies, the GTN proxies against the paper, and what was trained."""
    across = report.get("across")
    if not across:
        return ""
    draws = report["draws"]
    k = len(draws)
    sizes = sorted({len(d["ids"]) for d in draws})
    labels = list(report["proxies"])
    tr = report.get("training", {})
    lines = [f"### Across {k} draw(s) of {'/'.join(map(str, sizes))} candidates", "",
             (f"Draw d samples its candidates with seed {report['seed']} + d; every student "
              f"is initialised by seed {report['seed']} and the candidate, and the proxy sets "
              f"are shared, so only the candidates change between draws. Mean over draws "
              f"with a 95 % t interval across draws; pooled = the {len(report['candidates'])}"
              f" distinct candidates of all draws together, with a bootstrap interval; "
              f"first = draws in which the proxy has the highest value (ties: the higher "
              f"all-candidate Spearman).")]
    heads = " | ".join(f"draw {i + 1}" for i in range(k))
    for metric, title in (("spearman_top", "top-half Spearman"),
                          ("spearman", "all-candidate Spearman")):
        pooled_ci = metric + "_ci"
        lines += ["", f"**{title}**", "",
                  f"| proxy | {heads} | mean [95 % t] | pooled [95 % bootstrap] | first |",
                  "|---|" + "---|" * k + "---|---|---|"]
        for label in labels:
            cell = across["across"][label][metric]
            q = report["proxies"][label]
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in cell["per_draw"])
                         + f" | {_mean_ci(cell)} | {_ci(q[metric], q[pooled_ci])} | "
                         f"{across['first'][metric][label]}/{k} |")
    lines += ["", "**Kendall tau-b, top-k overlap and picked accuracy** (mean [95 % t] over "
                  "draws)", "",
              "| proxy | Kendall (top half) | Kendall (all) | top-k overlap | picked acc. (%) |",
              "|---|---|---|---|---|"]
    for label in labels:
        a = across["across"][label]
        lines.append(f"| {label} | {_mean_ci(a['kendall_top'])} | {_mean_ci(a['kendall'])} | "
                     f"{_mean_ci(a['top_k_overlap'])} | {_mean_ci(a['picked'])} |")
    for metric, what in (("spearman_top", "top-half Spearman"),
                         ("spearman", "all-candidate Spearman")):
        comp = across["comparison"][metric]
        lines += ["", f"**Paired comparison, {what}** (mean over draws of the per-draw rho; "
                      f"stratified paired bootstrap over the candidates of each draw)", ""]
        lines += _comparison_lines(comp, what)
    gtn = [lab for lab in labels if report["proxies"][lab].get("kind") in ("gtn", "gtn-steps")]
    for label in gtn:
        cell = across["across"][label]["spearman_top"]
        q = report["proxies"][label]
        lo, hi = cell["ci"]
        plo, phi = q["spearman_top_ci"]
        where = ("inside" if lo <= PAPER_GTN_TOP <= hi else
                 "above" if PAPER_GTN_TOP > hi else "below") if math.isfinite(lo) else "?"
        lines += ["", (f"{label} against the GTN paper's top-half Spearman {PAPER_GTN_TOP}: "
                       f"mean {_mean_ci(cell)} over draws (0.56 is {where} the interval), "
                       f"pooled {q['spearman_top']:.2f} [{plo:.2f}, {phi:.2f}].")]
    if tr:
        lines += ["", (f"Students trained: {tr['distinct']} distinct candidates in "
                       f"{len(tr['draw_sizes'])} draw(s) of {sum(tr['draw_sizes'])} "
                       f"candidate slots; per set trained now / read from the cache: "
                       + ", ".join(f"{lab} {tr['trained'][lab]}/{tr['cached'][lab]}"
                                   for lab in tr["trained"])
                       + ". Every distinct (candidate, set) is trained at most once.")]
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
