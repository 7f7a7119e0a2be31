"""Resident memory of the training process: how much it holds now and at its peak, and keeping it flat.

``rss_mb`` and ``peak_rss_mb`` go into every metrics.jsonl record (and so to the trackers), the
progress bar and ``summary.json``. Both are MiB (2**20 bytes) of this process, not of its children.
``release_free_memory`` is what ``train.malloc_trim_steps`` calls (see its docstring for why).

Example:
    >>> from rewardforge.memory import rss_mb, peak_rss_mb
    >>> 0 < rss_mb() <= peak_rss_mb() + 1
    True
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import psutil

_MIB = 2**20
_processes: dict[int, psutil.Process] = {}


def _process() -> psutil.Process:
    pid = os.getpid()  # a forked child measures itself, not its parent
    if pid not in _processes:
        _processes.clear()
        _processes[pid] = psutil.Process(pid)
    return _processes[pid]


def rss_mb() -> float:
    """This process's resident set size now, in MiB (psutil: ``/proc/self/statm`` on Linux)."""
    return _process().memory_info().rss / _MIB


def peak_rss_mb() -> float:
    """The largest resident set size this process has had since it started, in MiB
    (``getrusage``'s ``ru_maxrss``: KiB on Linux, bytes on macOS; Windows: psutil's peak working set)."""
    try:
        import resource
    except ImportError:
        info = _process().memory_info()
        return getattr(info, "peak_wset", info.rss) / _MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Hand the memory that glibc's malloc holds free back to the OS (``malloc_trim(0)``).

    Why training needs it: a step's activations are many large tensors whose sizes change with the
    batch's length. glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB),
    so after the first steps those tensors come from malloc's heaps instead of their own mappings, and
    once freed they stay resident as free chunks scattered between live ones: only the top of a heap
    is ever returned by itself. ``malloc_trim(0)`` returns every free page of every heap (arena).
    Live memory is not touched, so results do not change. Returns False where the C library is not
    glibc (nothing is done there).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
