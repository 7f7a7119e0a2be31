"""Memory: the per-process estimate printed before training, the free-space check of output_dir, and the
resident memory of the training process (how much it holds now and at its peak, and keeping it flat).

``rss_mb`` and ``peak_rss_mb`` go into every metrics.jsonl record (and so to the trackers), the
progress bar and ``summary.json``. Both are MiB (2**20 bytes) of this process, not of its children.
``release_free_memory`` is what ``train.malloc_trim_steps`` and ``train.malloc_trim_growth`` call, through
``MemoryReleaser`` (see their docstrings for why).

Example:
    >>> from rewardforge.training.memory import rss_mb, peak_rss_mb
    >>> 0 < rss_mb() <= peak_rss_mb() + 1
    True
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
from pathlib import Path

import psutil

from rewardforge.config import Config
from rewardforge.errors import CheckpointError
from rewardforge.training.precision import effective_precision

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


class MemoryReleaser:
    """When the training loop calls ``release_free_memory``: after every ``steps``-th optimizer step, and after
    any step that leaves this process's RSS more than ``growth`` (a fraction) above what it was just after
    the last release. ``steps`` 0 turns both off.

    Why both: a release every 10 steps keeps the run's resident memory flat on average, but what those 10
    steps' batches free stays resident until the next one, so RSS read between releases swings with their
    lengths (+15% on MiniLM, bench/memory.py); a release every step holds it within a step's worth for the
    cost of re-faulting those pages every step. Reading RSS once a step (``/proc/self/statm``, microseconds)
    and releasing only when it has grown bounds the swing at about ``growth`` plus one step's worth.

    >>> r = MemoryReleaser(steps=10, growth=0.03)
    >>> r.base = 100.0  # MiB just after the last release
    >>> r.due(10, rss=100.0), r.due(11, rss=102.0), r.due(12, rss=104.0)
    ('periodic', None, 'growth')
    """

    def __init__(self, steps: int, growth: float):
        self.steps, self.growth = steps, growth
        self.base: float | None = None  # RSS (MiB) just after the last release
        self.released = 0  # releases so far, periodic and growth-triggered
        self.by_growth = 0  # of which triggered by growth

    def due(self, step: int, rss: float | None) -> str | None:
        """Why a release is due after step ``step`` at ``rss`` MiB (``periodic`` or ``growth``), or None."""
        if not self.steps:
            return None
        if step % self.steps == 0:
            return "periodic"
        if self.growth and self.base is not None and rss is not None and rss > self.base * (1.0 + self.growth):
            return "growth"
        return None

    def after_step(self, step: int) -> bool:
        """Release if due after optimizer step ``step``; True when it did."""
        if not self.steps:
            return False
        now = rss_mb() if self.growth else None  # RSS is read only for the growth check
        if self.base is None:
            self.base = now
        why = self.due(step, now)
        if why is None:
            return False
        release_free_memory()
        self.released += 1
        self.by_growth += why == "growth"
        self.base = rss_mb() if self.growth else None
        return True


def estimate_memory(model, cfg: Config, max_tokens: int, shards: int = 1) -> dict[str, float]:
    """A rough per-process memory estimate in GiB for training ``model`` with ``cfg``.

    weights (4 B/param, fp32 master copy) + gradients and AdamW moments (4 + 8 B per trainable
    param), divided by ``shards`` under FSDP (plus one gathered block at a time),
    + activations of one micro-batch of 2 x batch_size sequences of ``max_tokens``, per layer
    ``s*b*h*(34 + 5*a*s/h)`` bytes at 16 bits (Korthikanti et al. 2022), doubled in fp32, and only
    ~2 layers' worth with gradient checkpointing; times K for a LoRA ensemble of K members (one backbone pass
    each, all kept for the backward pass).
    """
    hf = getattr(model, "hf", model)
    c = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    b, s_len = 2 * cfg.train.batch_size, max_tokens
    precision = effective_precision(cfg)
    half = precision in ("bf16", "bf16_master")
    per_layer = s_len * b * h * (34 + 5 * heads * s_len / h) * (1 if half else 2)
    act = per_layer * (2 if cfg.model.gradient_checkpointing else layers) * max(len(getattr(model, "members", ())), 1)
    gib = 1024**3
    gathered = 2 * 4 * total / max(layers, 1) if shards > 1 else 0.0  # a block's full weights and grads
    out = {"parameters": total, "trainable_parameters": trainable, "shards": shards,
           # bf16_master adds a bf16 copy of the weights (gathered per block under FSDP)
           "weights_gib": ((4 + 2 * (precision == "bf16_master" and shards == 1)) * total / shards + gathered) / gib,
           "grads_and_optimizer_gib": 12 * trainable / shards / gib, "activations_gib": act / gib}
    out["total_gib"] = out["weights_gib"] + out["grads_and_optimizer_gib"] + out["activations_gib"]
    return out


def check_free_space(output_dir: str | Path, parameters: int, trainable: int, keep: int) -> None:
    """Refuse to start when ``output_dir`` cannot hold the checkpoints and the export of this model.

    A checkpoint holds fp32 weights and AdamW's two moments (4 + 8 B per trainable parameter);
    ``keep`` of them stay, one more is written before the oldest is removed, and the export needs
    another copy of the weights. Less free space than that is known to fail, so it fails now.
    """
    checkpoint = 4 * parameters + 8 * trainable
    n = (keep if keep > 0 else 1) + 1
    need = n * checkpoint + 4 * parameters
    free = shutil.disk_usage(output_dir).free
    if free < need:
        gib = 1024**3
        raise CheckpointError(
            f"output_dir={str(output_dir)!r} has {free / gib:.2f} GiB free, but {n} checkpoints of {checkpoint / gib:.2f} GiB "
            f"and the export ({4 * parameters / gib:.2f} GiB) need {need / gib:.2f} GiB; free space, choose another "
            "output_dir or lower train.save_total_limit"
        )
