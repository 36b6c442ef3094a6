"""Saved sets round-trip; writes are atomic; a folder holding a run is refused."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import pytest
import torch

from distill.store import (
    ADDED_LATER,
    SavedSet,
    StoreError,
    atomic_write_bytes,
    atomic_write_json,
    check_run_dir,
    fingerprint_of,
    fingerprint_repr,
    load_set,
    save_set,
)


def test_saved_set_round_trip(tmp_path):
    s = SavedSet(torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 1, 0]),
                 {"dataset": "mnist", "method": "herding", "ipc": 2, "indices": [3, 1, 7, 9]})
    save_set(tmp_path / "a.pt", s)
    t = load_set(tmp_path / "a.pt")
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
    assert t.meta == s.meta and t.dataset == "mnist"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "x.bin", b"abc")
    atomic_write_json(tmp_path / "r.json", {"acc": float("inf"), "t": torch.tensor([1, 2])})
    assert sorted(os.listdir(tmp_path)) == ["r.json", "x.bin"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc": "inf", "t": [1, 2]}


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.json"
    atomic_write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["keep.json"]


@pytest.mark.parametrize("content", [b"", b"not a torch file", None])
def test_unreadable_set_is_one_line_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"images": torch.zeros(1)}, path)  # readable but not our format
    else:
        path.write_bytes(content)
    with pytest.raises(StoreError) as err:
        load_set(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_set(tmp_path):
    with pytest.raises(StoreError, match="no saved set"):
        load_set(tmp_path / "nope.pt")


def test_inconsistent_set_refused():
    with pytest.raises(StoreError):
        SavedSet(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))


def test_run_dir_guard(tmp_path):
    assert check_run_dir(tmp_path / "new") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # nothing created by the check
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(StoreError, match="--force"):
        check_run_dir(tmp_path / "run")
    assert check_run_dir(tmp_path / "run", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        check_run_dir(tmp_path / "file")


def test_atomic_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from distill.store import atomic_write_text

    p = atomic_write_text(tmp_path / "r.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask  # what open() would have made
    assert (tmp_path / "plain").write_text("x") and \
        stat.S_IMODE((tmp_path / "plain").stat().st_mode) == stat.S_IMODE(p.stat().st_mode)


@dataclass
class _Inner:
    a: int = 1
    new: str = field(default="off", metadata=ADDED_LATER)


@dataclass
class _Outer:
    x: float = 0.5
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = field(default=False, metadata=ADDED_LATER)


def test_fingerprints_leave_out_options_added_later_only_at_their_default():
    # at the default: what the dataclass wrote before the field existed
    assert fingerprint_repr(_Outer()) == "_Outer(x=0.5, inner=_Inner(a=1))"
    assert fingerprint_of(_Outer()) == {"x": 0.5, "inner": {"a": 1}}
    # set: exactly the dataclass's own repr and asdict
    on = _Outer(flag=True, inner=_Inner(new="on"))
    assert fingerprint_repr(on) == repr(on) and fingerprint_of(on) == asdict(on)
    assert fingerprint_repr(3.0) == "3.0" and fingerprint_of([_Inner()]) == [{"a": 1}]
