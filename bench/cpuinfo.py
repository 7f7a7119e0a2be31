"""The CPU line every bench prints first: model, cores, avx2 / avx512 / AMX flags and torch's kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_features() -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo (``("unknown CPU", set())`` where there is none)."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # no /proc/cpuinfo (not Linux): the flags print as 'no', the name as unknown
        pass
    return name, flags


def cpu_flags() -> str:
    """The CPU's model name and which of avx2 / avx512_bf16 / amx it has (from /proc/cpuinfo), and torch's kernels."""
    import torch

    name, flags = cpu_features()
    have = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}
    return (f"CPU: {name}, {os.cpu_count()} cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
            + f"; torch {torch.__version__} kernels {torch.backends.cpu.get_cpu_capability()}")
