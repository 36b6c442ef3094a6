"""FLOPs of whatever runs under it, and the kernel floor of that work.

:class:`FlopCount`: a ``TorchDispatchMode`` over ``torch.utils.flop_counter``'s formula
registry (matrix products and convolutions, forward and backward; elementwise work counts
zero); ``FlopCounterMode`` itself fails on gtnkit's functional students (its module tracker
asserts). :class:`KernelRecorder`: every such call with its shapes, replayed alone. Imports
torch only, so a benchmark can measure other code (a reference implementation) in a process
that must not import gtnkit."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopCount", "KernelRecorder"]


class FlopCount(TorchDispatchMode):
    """FLOPs of every operator ``torch.utils.flop_counter`` has a formula for."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def _describe(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_describe(x) for x in a)
    return a


def _build(d: Any) -> Any:
    if isinstance(d, tuple) and len(d) == 4 and d[0] == "tensor":
        shape, stride, dtype = d[1:]
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 1
        return torch.randn(size, dtype=dtype).as_strided(shape, stride)
    if isinstance(d, tuple):
        return [_build(x) for x in d]
    return d


class KernelRecorder(TorchDispatchMode):
    """Every call of an operator with a FLOP formula, by signature (operator, shapes,
    strides, other arguments): how many times each was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func._overloadpacket in flop_registry:
            key = (func, _describe(args), tuple(sorted((k, _describe(v))
                                                       for k, v in kwargs.items())))
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **kwargs)

    def floor_seconds(self, repeats: int = 5) -> float:
        """CPU seconds of every recorded call replayed alone (best of ``repeats`` each)."""
        total = 0.0
        for (func, args, kwargs), count in self.calls.items():
            a = [_build(x) for x in args]
            kw = {k: _build(v) for k, v in kwargs}
            func(*a, **kw)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.thread_time()
                func(*a, **kw)
                best = min(best, time.thread_time() - t0)
            total += count * best
        return total
