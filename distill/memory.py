"""Memory accounting for meta-training: what autograd keeps alive, and the process peak.

The toolkit compares meta-gradient strategies by peak memory. On CUDA the allocator's peak is
the honest figure (``torch.cuda.max_memory_allocated``). On CPU there is no allocator peak, so
we count the bytes autograd *saves for backward* with ``torch.autograd.graph.saved_tensors_hooks``:
each saved tensor is counted once per storage while some graph still holds it, and the peak of
that live total is reported, next to the process peak RSS (``resource.getrusage``), which also
includes the interpreter, the data set and the allocator's slack.
"""

from __future__ import annotations

import resource
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["SavedTensorMeter", "saved_tensor_hooks_active", "MemoryReport", "MemoryBudgetError",
           "available_bytes", "check_fits", "peak_rss_bytes"]


class MemoryBudgetError(ConfigError):
    """A run whose estimated peak memory exceeds what the device has free (one line)."""


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a run on ``device`` may still take: CUDA's free bytes on that device, or on a
    CPU the kernel's ``MemAvailable`` (Linux); ``None`` where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(estimate: int, device: torch.device | str, what: str, advice: str,
               available: int | None = None) -> None:
    """Refuse, before any work, what would take ``estimate`` bytes when that exceeds the
    memory ``available`` on ``device`` (default: :func:`available_bytes`; unknown: allowed).

    Raises:
        MemoryBudgetError: one line naming ``what``, the estimate, the memory free and
            ``advice`` (what would fit).
    """
    available = available_bytes(device) if available is None else available
    if available is None or estimate <= available:
        return
    gib = 2 ** 30
    raise MemoryBudgetError(
        f"{what} needs about {estimate / gib:.1f} GiB, but {available / gib:.1f} GiB are "
        f"free on {torch.device(device).type}. What fits: {advice}; --no-memory-check runs "
        f"it anyway")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


@dataclass(frozen=True)
class MemoryReport:
    saved_peak_bytes: int       # peak live bytes saved by autograd inside the meter
    rss_peak_bytes: int         # process peak RSS at exit (monotone over the process life)
    cuda_peak_bytes: int | None  # CUDA allocator peak inside the meter, when on CUDA

    def as_dict(self) -> dict:
        return {"saved_peak_bytes": self.saved_peak_bytes, "rss_peak_bytes": self.rss_peak_bytes,
                "cuda_peak_bytes": self.cuda_peak_bytes}


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are set (e.g. :class:`SavedTensorMeter`'s): ``torch.func``
    transforms and ``torch.compile`` refuse to run under them, so the metered meta-steps take
    the eager, per-class paths (which save the same activations)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class SavedTensorMeter:
    """Context manager: peak bytes autograd saves for backward while it is active.

    >>> with SavedTensorMeter() as meter:          # doctest: +SKIP
    ...     loss = unrolled_loss(...); loss.backward()
    >>> meter.report().saved_peak_bytes            # doctest: +SKIP
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[int, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._cuda_peak: int | None = None

    def _release(self, key: tuple[int, int]) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= key[1]

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._refs:
            self._refs[key] = 0
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        holder = _Saved(tensor)
        weakref.finalize(holder, self._release, key)  # the graph dropped this saved tensor
        return holder

    @staticmethod
    def _unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    def __enter__(self) -> SavedTensorMeter:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        if self.device is not None and self.device.type == "cuda":
            self._cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    def report(self) -> MemoryReport:
        return MemoryReport(self.peak, peak_rss_bytes(), self._cuda_peak)
