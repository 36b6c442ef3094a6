"""Choosing the compute device once, at the edge: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """An unusable ``--device`` value."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None picks ``cuda`` when available, else ``cpu``; other names are validated."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine")
    return device
