"""An exponential moving average of the trainable weights (``train.ema_decay``), validated and exported
in place of the last weights.

After every optimizer step each averaged tensor moves toward its parameter:

    avg <- avg + (1 - d_t) * (param - avg),   d_t = min(decay, (1 + t) / (10 + t))

where ``t`` is the number of updates so far (the warm-up of ``d_t``, as in TensorFlow's and timm's EMA,
keeps the random head's first values from dominating the average of a short run). The averages are
fp32 whatever the training precision, live beside the parameters (same device), and are saved with
every checkpoint (``ema.safetensors``), so a resumed run continues the same average bitwise.

Frozen parameters never change, so they are not averaged. One process or DDP (every process holds the
same parameters, so the same average); FSDP's sharded parameters are refused by the config check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

EMA_FILE = "ema.safetensors"


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        odd = [n for n, p in zip(self.names, self.params) if p.dtype != torch.float32]
        if odd:  # the swap in and out is exact only between fp32 tensors (rewardforge's trainable weights are)
            raise ValueError(f"train.ema_decay averages fp32 parameters; {odd[0]} is {self.params[self.names.index(odd[0])].dtype}")
        self.average = [p.detach().float().clone() for p in self.params]
        self.updates = 0
        self._swapped = False

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average toward its parameter (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside: the model's parameters hold the averages (for validation and export), the averages the
        training weights; swapped back on exit. One parameter's copy at a time, never a second model."""
        if self._swapped:  # nested (export inside the final validation's context): already in
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)
        self._swapped = not self._swapped

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert not self._swapped, "the averages are in the model now"
        state = {n: a.detach().cpu().contiguous() for n, a in zip(self.names, self.average)}
        state["__updates__"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load(self, path: Path) -> None:
        """Restore the averages a checkpoint saved; a checkpoint without them is an error naming the fix."""
        from safetensors.torch import load_file

        from rewardforge.errors import CheckpointError

        if not path.is_file():
            raise CheckpointError(f"{path.parent} has no {EMA_FILE}: it was trained without train.ema_decay; resume it "
                                  "with train.ema_decay=0 (its value then), or start a new run")
        state = load_file(str(path))
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"{path} lacks the averages of {len(missing)} trainable parameter(s) (first: {missing[0]}); "
                                  "it was saved by a run with other trainable parameters")
        with torch.no_grad():
            for n, a in zip(self.names, self.average):
                a.copy_(state[n])
        self.updates = int(state["__updates__"])
