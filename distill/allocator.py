"""Keep freed memory in the process (glibc): no page faults for every large tensor.

PyTorch's CPU allocator takes every tensor from ``malloc``. With glibc's defaults a large
block (above a threshold that adapts between 128 KiB and 32 MiB) is mapped fresh from the
kernel and unmapped when freed, and the heap's free top is returned beyond a trim threshold;
a meta-step, which allocates and frees the same few-MiB activations thousands of times,
then pays a page fault per 4 KiB page on every first write: about 300,000 faults and a fifth
of the CPU time of a GTN matching meta-step on MNIST (1 thread), and up to 2.5 ms on each
25 MiB tensor. :func:`keep_freed_memory` tells glibc to serve every block from the heap and
never to return the heap's top, so freed blocks are reused. The process keeps its peak
resident size until it exits (the peak itself does not grow); nothing that is computed
changes.

It is a process-wide setting: the front end (the command line, a benchmark) calls it once,
at start; library code never does, except that the executor's worker processes (a local pool,
Ray tasks) take the setting of the process that started the sweep (:func:`kept`), since they
run the same meta-steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "kept"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_STATE = {"kept": False}


def kept() -> bool:
    """Whether :func:`keep_freed_memory` took in this process."""
    return _STATE["kept"]


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc ``mallopt``); returns
    whether the setting took (``False`` off Linux / glibc: nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _STATE["kept"] = bool(mallopt(_M_MMAP_MAX, 0)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _STATE["kept"]
