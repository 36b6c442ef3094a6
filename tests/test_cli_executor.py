"""`--executor` on the sweeping commands: the same numbers from Ray as from this process, Ray-only
options refused with the local executor, and a missing Ray is one line."""

from __future__ import annotations

import json
import sys

import pytest

from .test_cli import assert_one_line_error, run
from .test_cli_nas import tiny_mnist  # noqa: F401 - the fixture

NAS = ["-q", "nas", "--dataset", "mnist", "--n-candidates", 3, "--proxy", "real-subset",
       "--proxy", "real-steps", "--budget", "smoke", "--families", "mlp", "--seed", 1]


@pytest.mark.parametrize("command", [NAS, ["gtn", "compare", "--dataset", "mnist"]])
@pytest.mark.parametrize("extra,needle", [
    (["--ray-address", "auto"], "--ray-address applies to --executor ray only"),
    (["--gpus-per-item", "1"], "--gpus-per-item applies to --executor ray only"),
    (["--executor", "spark"], "local"),
    (["--workers", "0"], "--workers"),
    (["--executor", "ray", "--cpus-per-item", "nan"], "--cpus-per-item"),
])
def test_executor_options_are_checked_in_one_line(tmp_path, command, extra, needle):
    out = tmp_path / "o"
    r = run(*command, *extra, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_a_missing_ray_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch,
                                                             tiny_mnist):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "o"
    r = run(*NAS, "--executor", "ray", "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, "pip install 'gtnkit[ray]'")
    assert not (out / "results.json").exists()


@pytest.mark.ray
def test_nas_on_ray_gives_the_numbers_of_this_process(tmp_path, tiny_mnist):  # noqa: F811
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install "
                        "'gtnkit[ray]'); make install installs it")
    runs = {}
    for name, extra in {"local": [], "ray": ["--executor", "ray", "--workers", 2]}.items():
        out = tmp_path / name
        r = run(*NAS, *extra, "--data-root", tmp_path, "--out", out)
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((out / "results.json").read_text())
    local, ray = runs["local"], runs["ray"]
    assert {c["id"]: c["truth"] for c in ray["candidates"]} == \
        {c["id"]: c["truth"] for c in local["candidates"]}
    for proxy, q in local["proxies"].items():
        assert ray["proxies"][proxy]["spearman"] == q["spearman"], proxy
    cfg = json.loads((tmp_path / "ray" / "config.json").read_text())
    assert cfg["executor"]["kind"] == "ray" and cfg["executor"]["workers"] == 2
