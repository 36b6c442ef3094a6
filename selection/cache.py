"""The on-disk signal cache: one folder per fingerprint of (data, signal network, schedule, seed).

Training the signal network is the expensive part of every learned selection rule; the rules
themselves take seconds. So the signals of one training run (embeddings, forgetting counts,
EL2N, entropy, and the early-training weights GraNd is computed from) are stored under a
fingerprint of everything that determines them, and every later rule, IPC and fraction with the
same fingerprint reads them instead of training again. While the network trains, its
checkpoint lives in the same folder, so a killed run resumes where it stopped.

Layout of ``<root>/<fingerprint>/``: ``key.json`` (what the fingerprint hashes, readable),
``signals.pt`` (finished signals), ``checkpoint.pt`` (only while training).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distill.store import atomic_write_bytes, atomic_write_json, to_jsonable

__all__ = ["SignalCache", "default_cache_root", "signal_fingerprint"]

#: Bump when the stored signals change meaning (invalidates every older cache entry).
CACHE_VERSION = 1


def default_cache_root() -> Path:
    """``$GTNKIT_CACHE``, else ``$XDG_CACHE_HOME/gtnkit``, else ``~/.cache/gtnkit``."""
    if os.environ.get("GTNKIT_CACHE"):
        return Path(os.environ["GTNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gtnkit"


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A content hash of a pool (so a changed or re-normalised data set misses the cache)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def signal_fingerprint(dataset_name: str, digest: str, config: Any, seed: int) -> tuple[str, dict]:
    """The cache key: a short hash of (data, signal network and schedule, seed) and its parts."""
    key = {"version": CACHE_VERSION, "dataset": dataset_name, "data": digest,
           "config": to_jsonable(asdict(config)), "seed": int(seed)}
    # grand_chunk changes memory use, not the signals.
    key["config"].pop("grand_chunk", None)
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24], key


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class SignalCache:
    """Reads and writes the signals and training checkpoint of one fingerprint."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, key: dict) -> None:
        self.folder = Path(root) / fingerprint
        self.fingerprint, self.key = fingerprint, key

    @property
    def signals_path(self) -> Path:
        return self.folder / "signals.pt"

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def _load(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            return None   # a torn or foreign file: treat as absent, it is rebuilt
        if not isinstance(obj, dict) or obj.get("key") != self.key:
            return None
        return obj["payload"]

    def _save(self, path: Path, payload: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "key.json").exists():
            atomic_write_json(self.folder / "key.json", self.key)
        atomic_write_bytes(path, _to_bytes({"key": self.key, "payload": payload}))

    def load_signals(self) -> dict | None:
        return self._load(self.signals_path)

    def save_signals(self, signals: dict) -> None:
        self._save(self.signals_path, signals)

    def load_checkpoint(self) -> dict | None:
        return self._load(self.checkpoint_path)

    def save_checkpoint(self, state: dict) -> None:
        self._save(self.checkpoint_path, state)

    def drop_checkpoint(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)
