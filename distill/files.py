"""The primitives of every file gtnkit writes and reads: atomic writes, JSON that holds tensors
and non-finite floats, the NaN/inf count every read is checked with, and the reader of gtnkit's
tagged torch files (``weights_only``: no code runs). :mod:`distill.store` re-exports them.

Every file is written to a temporary name in the same folder, flushed to disk and renamed over
the target, so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import StoreError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "count_non_finite",
           "read_tagged", "to_jsonable"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Raises:
        OSError: the file cannot be written; its ``filename`` is ``path`` (never the temporary
            name), so a caller can say which file failed. No temporary file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep them readable
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Pretty, key-sorted JSON written atomically; tensors become lists, inf/nan strings."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_tagged(path: str | os.PathLike, tag: str, what: str,
                error: type[Exception] = StoreError, missing: str | None = None) -> dict:
    """Read a torch file written by gtnkit whose ``format`` entry is ``tag``.

    ``weights_only``: our files hold tensors and plain metadata, never code to run. Any problem
    (missing, unreadable, another kind of file) is one line of ``error`` naming the file;
    ``missing`` (formatted with ``path``) overrides the message for a file that is not there.
    """
    path = Path(path)
    if not path.is_file():
        raise error((missing or "no {what} at {path}").format(what=what, path=path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise error(f"{path} is not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != tag:
        raise error(f"{path} is not a {what} file (missing format tag {tag!r})")
    bad, total = count_non_finite(obj)
    if bad:
        raise error(f"{path} holds {bad} non-finite value(s) (NaN or inf) among {total}; "
                    f"refusing to use this {what}")
    return obj


def count_non_finite(obj: Any) -> tuple[int, int]:
    """``(bad, total)``: NaN/inf entries and all entries of the floating-point tensors in
    ``obj`` (a tensor, or dicts / lists / tuples of them, nested)."""
    if isinstance(obj, torch.Tensor):
        if not (obj.is_floating_point() or obj.is_complex()):
            return 0, 0
        return int((~torch.isfinite(obj)).sum()), obj.numel()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        counts = [count_non_finite(v) for v in obj]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return 0, 0
