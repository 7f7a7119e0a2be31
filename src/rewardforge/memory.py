"""Resident memory of the training process: how much it holds now and at its peak.

``rss_mb`` and ``peak_rss_mb`` go into every metrics.jsonl record (and so to the trackers), the
progress bar and ``summary.json``. Both are MiB (2**20 bytes) of this process, not of its children.

Example:
    >>> from rewardforge.memory import rss_mb, peak_rss_mb
    >>> 0 < rss_mb() <= peak_rss_mb() + 1
    True
"""

from __future__ import annotations

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

