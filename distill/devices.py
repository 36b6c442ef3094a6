"""Choosing the compute device once, at the edge: CUDA when present, CPU otherwise."""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["CPU_REAL_CHUNK", "DeviceError", "available_devices", "deterministic_cuda",
           "real_chunk_for", "resolve_device", "silence_cuda_home_warning"]


class _DropCudaHomeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_CUDA_HOME_FILTER = _DropCudaHomeWarning()


def silence_cuda_home_warning() -> None:
    """Drop torch's ``No CUDA runtime is found, using CUDA_HOME=...`` warning, and only it.

    ``torch.utils.cpp_extension`` logs it when it is imported (``torch.compile`` imports it) on
    a machine that has a CUDA toolkit installed but no GPU: a fact about the machine the user
    did not ask about, printed on every ``gtnkit distill``. Every other record of that logger
    still shows. Idempotent.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _CUDA_HOME_FILTER not in logger.filters:
        logger.addFilter(_CUDA_HOME_FILTER)


class DeviceError(ValueError):
    """An unusable ``--device`` value."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None picks ``cuda`` when available, else ``cpu``; other names are validated."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; this machine runs on: {choices}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available on this "
                          f"machine; it runs on: {choices}")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} does not exist; this machine runs on: {choices}")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} (Apple GPU) is not available on this machine; it "
                          f"runs on: {choices}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"gtnkit does not run on {device.type!r} devices; this machine runs "
                          f"on: {choices}")
    if device.type == "cuda":
        deterministic_cuda()
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The ``--device`` values this build and machine can run on."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def deterministic_cuda() -> None:
    """Same seed, same result on CUDA too: cuDNN's deterministic kernels without autotuning
    (the autotuner may pick another convolution algorithm, and some backward algorithms add
    with atomics in a varying order), and cuBLAS's fixed workspace (its documented condition
    for reproducible results). Called where a CUDA device is chosen, before any CUDA work.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


#: Images per piece of the real side (a gradient-matching gradient, a DM embedding mean) on
#: a CPU. The DC ConvNet's
#: activations for 16 images (128 channels at 32 x 32: 8 MiB) stay near the caches: its real
#: side of one MNIST IPC 1 iteration (10 classes x 256 images, 1 thread) took 10.1 CPU s in
#: pieces of 16 against 15.6 s whole (eager), 8.5 against 10.8 s compiled (pieces of 64:
#: 13.0 and 9.7 s); DM's real embeddings of the same images 3.7 against 6.1 s (eager), 2.8
#: against 4.2 s (compiled). A GPU wants the whole batch.
CPU_REAL_CHUNK = 16


def real_chunk_for(device: torch.device | str) -> int | None:
    """The default piece size of the real side of dc / dsa / dm on ``device``
    (:data:`CPU_REAL_CHUNK` on a CPU, ``None``: the whole batch, elsewhere)."""
    return CPU_REAL_CHUNK if torch.device(device).type == "cpu" else None
