"""Named fault points, for the tests that prove a crash or a full disk loses no finished work.

Set ``REWARDFORGE_FAULT=POINT[:N][=ACTION]`` and the N-th time (default: the first) the process
passes ``POINT`` it either kills itself with SIGKILL (``kill``, the default: a real ``kill -9``, no
cleanup runs) or raises ``OSError(ENOSPC)`` (``enospc``: the disk filled up there). Unset, a fault
point costs one dictionary lookup.

Points: ``train_step`` (after the backward pass, before the optimizer step), ``checkpoint_write``
(model and optimizer state written to the temporary checkpoint, the rest not yet),
``export_write`` (weights written to the temporary export directory, not yet renamed into place).
"""

from __future__ import annotations

import errno
import os
import signal

_ENV = "REWARDFORGE_FAULT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(_ENV)
    if not spec:
        return
    target, _, action = spec.partition("=")
    point, _, nth = target.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if (action or "kill") == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {_ENV}={spec})")
    os.kill(os.getpid(), signal.SIGKILL)
