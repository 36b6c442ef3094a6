"""The report of a GTN comparison (:mod:`gtn.compare`): the Markdown table, a reading of its
figures in words, and the memory / accuracy figure, all from the state the comparison writes
(``gtn-compare.json``)."""

from __future__ import annotations

from pathlib import Path

from distill.store import save_figure

__all__ = ["comparison_table", "reading", "plot"]


def cell_key(method: str, steps: int) -> str:
    """The key of a (method, T) cell in a comparison's state."""
    return f"{method}/T={steps}"


def _peak(cell: dict) -> int:
    m = cell["memory"]
    return m.get("cuda_peak_bytes") or m["saved_peak_bytes"]


def _scored(cell: dict) -> bool:
    return cell.get("few_step_mean") is not None


def _accuracy_note(state: dict) -> str:
    """Where and how long the accuracy columns were trained, in words."""
    b = state["budget"]
    cells = list(state["cells"].values())
    its = sorted({c.get("meta_iterations", b["meta_iterations"]) for c in cells if _scored(c)})
    its_text = "/".join(str(i) for i in its) or str(b["meta_iterations"])
    if b.get("accuracy_steps") is None:
        return f"Accuracy: every cell trained {its_text} meta-iterations"
    memory_only = sorted({c["T"] for c in cells if not _scored(c)})
    rest = (f"; the other T ({', '.join(map(str, memory_only))}) ran "
            f"{b.get('memory_cell_iterations', 2)} meta-iterations to measure memory and time "
            f"only (— in the accuracy columns)") if memory_only else ""
    compiled = (f". Seconds per meta-step: the T = {b['accuracy_steps']} cells with the "
                f"real-data side compiled (torch.compile), the others eager") \
        if b.get("compile") and memory_only else ""
    return (f"Accuracy: trained at T = {b['accuracy_steps']} only, for {its_text} "
            f"meta-iterations{rest}{compiled}")


def comparison_table(state: dict) -> str:
    b = state["budget"]
    gpu = any(c["memory"].get("cuda_peak_bytes") for c in state["cells"].values())
    what = "CUDA allocator peak" if gpu else "peak bytes autograd saves for backward"
    recipe_note = "each method's training recipe" if state.get("recipe", True) else \
        "no training recipe (bare defaults)"
    lines = [f"GTN comparison on {state['dataset']}, budget `{b['name']}` ({b['notes']}); "
             f"curriculum `{state['curriculum']}`; {recipe_note}; "
             f"memory = {what} during a meta-step. {_accuracy_note(state)}; % on the test "
             f"set, mean ± std over {b['students']} students.", "",
             *([f"One plain student training step (batch {b['batch_size']}) saves "
                f"{state['plain_step_saved_bytes'] / 2**20:.1f} MiB for backward.", ""]
               if state.get("plain_step_saved_bytes") else []),
             "| method | T | peak memory (MiB) | × unrolled | s / meta-step | few-step acc. | "
             "fixed-set acc. | meta-iterations |", "|---|---|---|---|---|---|---|---|"]
    cells = state["cells"]
    for c in sorted(cells.values(), key=lambda c: (c["method"], c["T"])):
        ref = cells.get(cell_key("unrolled", c["T"]))
        ratio = f"{_peak(c) / _peak(ref):.2f}" if ref else "—"
        few, fixed = ((f"{c['few_step_mean']:.1f} ± {c['few_step_std']:.1f}",
                       f"{c['fixed_set_mean']:.1f} ± {c['fixed_set_std']:.1f}")
                      if _scored(c) else ("—", "—"))
        lines.append(f"| {c['method']} | {c['T']} | {_peak(c) / 2**20:.1f} | {ratio} | "
                     f"{c['seconds_per_meta_step']:.2f} | {few} | {fixed} | "
                     f"{c.get('meta_iterations', '?')} |")
    said = reading(state)
    return "\n".join(lines) + "\n" + (f"\n{said}\n" if said else "")


def _mib(cell: dict) -> str:
    return f"{_peak(cell) / 2**20:.1f} MiB"


def reading(state: dict) -> str:
    """What the run shows, in words, from its figures: which method trains the best students
    (at each scored T), which needs the least memory (at the largest T) and how memory grows
    with T, the seconds per meta-step, and the trade-off between them."""
    cells = list(state["cells"].values())
    if not cells:
        return ""
    out: list[str] = []
    winners: dict[int, dict] = {}
    tied: dict[int, dict] = {}
    for t in sorted({c["T"] for c in cells if _scored(c)}):
        at = sorted((c for c in cells if c["T"] == t and _scored(c)),
                    key=lambda c: -c["few_step_mean"])
        best = winners[t] = at[0]
        its = best.get("meta_iterations", state["budget"]["meta_iterations"])
        others = ", ".join(f"{c['method']} {c['few_step_mean']:.1f} % "
                           f"({best['few_step_mean'] - c['few_step_mean']:.1f} points behind)"
                           for c in at[1:])
        text = (f"Accuracy at T = {t} after {its} meta-iterations (few-step students): "
                f"{best['method']} trains the best students, {best['few_step_mean']:.1f} %"
                + (f"; {others}" if others else "") + ".")
        if len(at) > 1:  # error bars that overlap: a tie
            second = at[1]
            if best["few_step_mean"] - second["few_step_mean"] <= \
                    best["few_step_std"] + second["few_step_std"]:
                tied[t] = second
                text += (f" {best['method']} and {second['method']} are within the spread of "
                         f"their students (± {best['few_step_std']:.1f} and "
                         f"± {second['few_step_std']:.1f}): a tie at this budget.")
        out.append(text)
    top = max(c["T"] for c in cells)
    at_top = sorted((c for c in cells if c["T"] == top), key=_peak)
    low = at_top[0]
    if len(at_top) > 1:
        rest = ", ".join(f"{c['method']} {_mib(c)} ({_peak(c) / max(_peak(low), 1):.1f}x)"
                         for c in at_top[1:])
        out.append(f"Memory at T = {top}: {low['method']} needs the least, {_mib(low)}; "
                   f"{rest}.")
    else:
        out.append(f"Memory at T = {top}: {low['method']} {_mib(low)}.")
    bottom = min(c["T"] for c in cells)
    if bottom < top:
        grows = []
        for m in sorted({c["method"] for c in cells}):
            first = state["cells"].get(cell_key(m, bottom))
            last = state["cells"].get(cell_key(m, top))
            if first and last:
                grows.append(f"{m} {_peak(last) / max(_peak(first), 1):.1f}x")
        if grows:
            out.append(f"From T = {bottom} to {top} memory grows: {', '.join(grows)}.")
    if winners:
        t = max(winners, key=lambda t: sum(c["T"] == t and _scored(c) for c in cells))
        at = sorted((c for c in cells if c["T"] == t), key=lambda c: c["seconds_per_meta_step"])
        out.append(f"Seconds per meta-step at T = {t}: " + ", ".join(
            f"{c['method']} {c['seconds_per_meta_step']:.2f}" for c in at) + ".")
        best = winners[t]
        mem_best = state["cells"].get(cell_key(best["method"], top))
        lead = (f"{best['method']} and {tied[t]['method']} tie on accuracy" if t in tied
                else f"{best['method']} wins on accuracy")
        if low["method"] == best["method"]:
            out.append(f"In short: {lead}, and {best['method']} wins on memory.")
        else:
            out.append(f"In short: {lead}, {low['method']} wins on memory.")
            for c in sorted((c for c in cells if c["T"] == t and _scored(c)
                             and c["method"] != best["method"]),
                            key=lambda c: -c["few_step_mean"]):
                mine = state["cells"].get(cell_key(c["method"], top))
                if mine and mem_best:
                    gap = best["few_step_mean"] - c["few_step_mean"]
                    out[-1] += (f" {c['method']} is {gap:.1f} points behind {best['method']} at "
                                f"{_peak(mine) / max(_peak(mem_best), 1):.2g}x its memory "
                                f"at T = {top}.")
    return "\n".join(f"- {line}" for line in out)


STYLES = {"unrolled": ("o", "-"), "implicit": ("s", "--"), "matching": ("^", ":"),
          "unrolled-recompute": ("v", "-."), "first-order-tail": ("P", "--")}


def plot(state: dict, path: Path) -> bool:
    """Peak memory against T per method on log axes (implicit and matching, flat and small,
    stay apart from each other), and the two accuracies per method and T: few-step students
    (solid) and students trained on a fixed generated set (dashed); where accuracy was
    trained at one T only, bars per method at that T. The titles name the data set, the
    budget, the T the accuracy was trained at and its meta-iterations. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter
    except ImportError:
        return False
    cells = list(state["cells"].values())
    methods = sorted({c["method"] for c in cells})
    scored = [c for c in cells if _scored(c)]
    scored_t = sorted({c["T"] for c in scored})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = len(scored_t) == 1 and len(scored) < len(cells)
    for i, m in enumerate(methods):
        marker, style = STYLES.get(m, ("D", "-."))
        color = colors[i % len(colors)]
        cs = sorted((c for c in cells if c["method"] == m), key=lambda c: c["T"])
        ax1.plot([c["T"] for c in cs], [_peak(c) / 2**20 for c in cs], marker=marker,
                 linestyle=style, color=color, label=m)
        acc = [c for c in cs if _scored(c)]
        if not acc:
            continue
        if bars:
            c = acc[0]
            ax2.bar(i - 0.2, c["few_step_mean"], 0.4, yerr=c["few_step_std"], color=color,
                    capsize=3, label="few-step" if i == 0 else None)
            ax2.bar(i + 0.2, c["fixed_set_mean"], 0.4, yerr=c["fixed_set_std"], color=color,
                    capsize=3, alpha=0.45, hatch="//",
                    label="fixed set" if i == 0 else None)
            ax2.annotate(f"{c['few_step_mean']:.1f}", (i - 0.2, c["few_step_mean"]),
                         textcoords="offset points", xytext=(0, 6), ha="center",
                         fontsize="small")
            continue
        ts = [c["T"] for c in acc]
        ax2.errorbar(ts, [c["few_step_mean"] for c in acc], [c["few_step_std"] for c in acc],
                     marker=marker, linestyle="-", color=color, capsize=3,
                     label=f"{m}: few-step")
        ax2.errorbar(ts, [c["fixed_set_mean"] for c in acc],
                     [c["fixed_set_std"] for c in acc], marker=marker, linestyle="--",
                     color=color, capsize=3, mfc="none", label=f"{m}: fixed set")
    if state.get("plain_step_saved_bytes"):
        ax1.axhline(state["plain_step_saved_bytes"] / 2**20, color="grey", linewidth=0.8,
                    linestyle=":", label="one plain student step")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.set(xlabel="inner steps T", ylabel="peak memory (MiB, log scale)",
            title="memory of a meta-step")
    budget = state.get("budget", {})
    its = sorted({c.get("meta_iterations", budget.get("meta_iterations", "?")) for c in scored}
                 or {budget.get("meta_iterations", "?")})
    its_text = "/".join(map(str, its))
    all_t = sorted({c["T"] for c in cells})
    axes = [ax1]
    if bars:  # the methods differ by points: the axis shows the range they span
        low = min(min(c["few_step_mean"], c["fixed_set_mean"]) for c in scored)
        high = max(max(c["few_step_mean"], c["fixed_set_mean"]) for c in scored)
        ax2.set_ylim(max(0.0, low - 8.0), min(100.0, high + 3.0))
        ax2.set_xticks(range(len(methods)), methods)
        ax2.set(ylabel="test accuracy (%)",
                title=f"students trained on generated data\n(accuracy trained at "
                      f"T = {scored_t[0]} only, {its_text} meta-iterations)")
    else:
        ax2.set(xlabel="inner steps T", ylabel="test accuracy (%)",
                title="students trained on generated data")
        axes.append(ax2)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_t, [str(t) for t in all_t])
        ax.xaxis.set_minor_locator(NullLocator())
    ax1.legend(fontsize="small")
    ax2.legend(fontsize="small", loc="lower center" if bars else "best")
    where = (f"accuracy at T = {scored_t[0]} ({its_text} meta-iterations), memory at every T "
             f"({budget.get('memory_cell_iterations', '?')} meta-iterations)" if bars
             else f"{its_text} meta-iterations")
    fig.suptitle(f"GTN on {state.get('dataset', '?')}, budget {budget.get('name', '?')}: "
                 f"{where}; curriculum {state.get('curriculum', '?')}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True
