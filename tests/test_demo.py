"""The demo's shape of comparison (``gtn compare --budget demo``): accuracy trained at one T,
memory-only cells at the other T, on tiny synthetic data in seconds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gtn.compare import BUDGETS, Budget, comparison_table, reading, run_comparison
from gtn.train import GTNConfig
from tests.conftest import make_tiny_set

METHODS = ["unrolled", "implicit", "matching"]


def _budget(**changes: object) -> Budget:
    base = Budget("tiny-demo", 3, replace(GTNConfig().generator, noise_dim=4, width_fc=8,
                                            width_conv=4), "convnet:width=4,depth=1",
                  batch_size=20, real_batch=20, students=1, fixed_epochs=1, test_limit=None,
                  validation=20, notes="tiny", accuracy_steps=3, memory_cell_iterations=1)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    data = make_tiny_set(per_class=8)
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    state = run_comparison(data, data, METHODS, [2, 4], _budget(), out, log=lines.append)
    return state, out, lines


def test_demo_budget_has_the_shape():
    demo = BUDGETS["demo"]
    assert demo.accuracy_steps == 10 and demo.memory_cell_iterations == 2
    assert demo.batch_size == 32 and demo.meta_iterations >= 200


def test_every_method_and_t_has_a_row_and_accuracy_only_where_trained(demo_run):
    state, out, lines = demo_run
    cells = state["cells"]
    # the T asked for and the accuracy T, in the table's order
    assert list(cells) == [f"{m}/T={t}" for m in METHODS for t in (2, 3, 4)]
    for key, cell in cells.items():
        assert cell["memory"]["saved_peak_bytes"] > 0, key
        assert cell["seconds_per_meta_step"] > 0, key
        if cell["T"] == 3:
            assert cell["scored"] and cell["meta_iterations"] == 3, key
            assert len(cell["few_step"]) == 1 and cell["few_step_mean"] is not None
            assert cell["fixed_set_mean"] is not None
        else:  # memory-only: the meta-iterations asked for, no students
            assert not cell["scored"] and cell["meta_iterations"] == 1, key
            assert cell["few_step"] == [] and cell["few_step_mean"] is None
            assert cell["fixed_set_mean"] is None
    # a line per finished cell, after the line saying what runs
    assert "trained for accuracy at T = 3" in lines[0]
    assert sum("T=" in line for line in lines[1:]) == 9
    assert sum("memory and time only" in line for line in lines) == 6
    assert json.loads((out / "gtn-compare.json").read_text())["cells"] == cells


def test_the_table_and_the_reading_say_where_accuracy_was_trained(demo_run):
    state, out, _ = demo_run
    table = (out / "gtn-compare.md").read_text()
    assert table == comparison_table(state)
    assert "trained at T = 3 only, for 3 meta-iterations" in table
    rows = [r for r in table.splitlines() if r.startswith("| ") and "|---" not in r][1:]
    assert len(rows) == 9
    assert sum(r.endswith("| — | — | 1 |") for r in rows) == 6
    assert sum(r.endswith(" | 3 |") and "—" not in r for r in rows) == 3
    said = reading(state)
    assert said and said in table
    best = max((c for c in state["cells"].values() if c["scored"]),
               key=lambda c: c["few_step_mean"])
    least = min((c for c in state["cells"].values() if c["T"] == 4),
                key=lambda c: c["memory"]["saved_peak_bytes"])
    assert f"{best['method']} trains the best students" in said
    assert f"Memory at T = 4: {least['method']} needs the least" in said


def test_the_demo_plot_names_the_accuracy_t(demo_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import gtn.compare as compare
    import gtn.compare_report as compare_report

    figures = []
    monkeypatch.setattr(compare_report, "save_figure",
                        lambda fig, path, dpi=100: figures.append(fig))
    state, _, _ = demo_run
    assert compare.plot(state, tmp_path / "p.png")
    (fig,) = figures
    _, accuracy = fig.axes
    assert "T = 3" in accuracy.get_title() and "3 meta-iterations" in accuracy.get_title()
    assert "T = 3" in fig._suptitle.get_text()


def test_resume_keeps_the_cells_also_of_a_state_written_before_the_demo_fields(tmp_path):
    data = make_tiny_set(per_class=8)
    first = run_comparison(data, data, ["implicit"], [2], _budget(), tmp_path)
    again = run_comparison(data, data, ["implicit"], [2], _budget(), tmp_path, resume=True)
    assert again["cells"] == first["cells"]
    plain = _budget(accuracy_steps=None, memory_cell_iterations=2)
    old = tmp_path / "old"
    state = run_comparison(data, data, ["implicit"], [2], plain, old)
    written = json.loads((old / "gtn-compare.json").read_text())
    for name in ("accuracy_steps", "memory_cell_iterations"):
        del written["budget"][name]
    (old / "gtn-compare.json").write_text(json.dumps(written))
    kept = run_comparison(data, data, ["implicit"], [2], plain, old, resume=True)
    assert kept["cells"] == state["cells"]
    assert kept["cells"]["implicit/T=2"]["scored"]


class _Recorder:
    """A Progress that records every task and the updates it got."""

    def __init__(self) -> None:
        self.tasks: list[list] = []

    def task(self, description: str, total: int):
        import contextlib

        record = [description, total, []]
        self.tasks.append(record)

        class _Task:
            def update(self, n: int = 1) -> None:
                record[2].append(n)

        return contextlib.nullcontext(_Task())


def test_two_workers_report_progress_over_the_estimated_work(tmp_path):
    # the demo's executor: cells in 2 processes; the bar over the cells reaches 100 % and the
    # files through which the workers report their meta-iterations are gone afterwards
    from distill.executor import ExecutorConfig

    data = make_tiny_set(per_class=8)
    progress = _Recorder()
    lines: list[str] = []
    state = run_comparison(data, data, ["unrolled", "implicit"], [2], _budget(), tmp_path,
                           progress=progress, log=lines.append,
                           executor=ExecutorConfig(workers=2, threads=1))
    assert set(state["cells"]) == {"unrolled/T=2", "unrolled/T=3", "implicit/T=2",
                                   "implicit/T=3"}
    (bar,) = progress.tasks
    assert bar[1] == 100 and sum(bar[2]) == 100 and all(n > 0 for n in bar[2])
    assert "on 2 worker(s)" in lines[0] and len(lines) == 5
    assert not (tmp_path / "progress").exists()
