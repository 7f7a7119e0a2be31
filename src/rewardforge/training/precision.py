"""How a training step computes: fp32, bf16 autocast, or bf16 over fp32 master weights.

``train.precision``:

* ``auto`` (the default): :func:`resolve_precision` picks one of the three below for the hardware.
* ``fp32``: everything in fp32.
* ``bf16``: ``torch.autocast`` (what TRL and the HF Trainer do): fp32 weights; matmuls in bf16,
  softmax, layer norms and the residual stream in fp32, so activations are cast back and forth.
* ``bf16_master``: NeMo/Megatron's "O2": forward and backward run entirely in bf16 (weights,
  activations, attention scores, gradients), while the model's parameters between steps, the
  gradient accumulation, clipping, the AdamW state, checkpoints and the export stay fp32.
  One process: :class:`MasterWeights` below. FSDP: ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``, which is the same scheme with sharded masters.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn


class MasterWeights:
    """bf16 compute over the model's fp32 parameters (the master copy), for one process.

    Inside ``with master.compute():`` each parameter holds a bf16 copy of its fp32 value, so the
    forward and backward passes and their activations are bf16. On exit every parameter gets its
    fp32 value back and the bf16 gradient of the pass is added, in fp32, to the parameter's fp32
    ``.grad`` (so micro-batches accumulate in fp32). Outside the context nothing differs from
    fp32 training: the optimizer, gradient clipping, checkpoints and export see fp32 tensors only.

    Frozen parameters (LoRA's base weights, ``model.freeze_layers_fraction``) never change, so
    their bf16 copies are made at the first pass (after any checkpoint was loaded) and reused.
    The modules in ``keep_fp32`` (the reward head: one dot product per sequence) stay fp32 and get
    their input cast to fp32, so rewards carry fp32 resolution instead of bf16's 3 significant
    digits, which would tie close pairs.

    Embedding tables stay fp32 too, and the rows they return are cast to bf16: the forward values
    are those of a lookup in a bf16 copy, but no copy of the table is made per pass, and the
    backward pass adds each row's gradient (duplicate tokens summed) in fp32 straight into
    ``.grad``. A word embedding is half of a small encoder's weights while a batch reads a few
    thousand of its rows (MiniLM training steps: 2-4% faster).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_fp32: tuple[nn.Module, ...] = ()):
        self.dtype = dtype
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        kept = {id(p) for m in (*keep_fp32, *tables) for p in m.parameters()}
        self.params = [p for p in model.parameters() if p.is_floating_point() and id(p) not in kept]
        self._frozen: dict[int, torch.Tensor] = {}
        self._active = False
        for m in keep_fp32:
            m.register_forward_pre_hook(self._cast_input)
        for m in tables:
            m.register_forward_hook(self._cast_output)

    def _cast_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self._active:
            return None
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def _cast_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output.to(self.dtype) if self._active else None

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        if self._active:  # nested (validation inside a step's context): already bf16
            yield
            return
        masters, grads = [], []
        for i, p in enumerate(self.params):
            masters.append(p.data)
            grads.append(p.grad)
            p.grad = None
            if p.requires_grad:
                p.data = p.data.to(self.dtype)
            else:
                if i not in self._frozen:
                    self._frozen[i] = p.data.to(self.dtype)
                p.data = self._frozen[i]
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for p, master, acc in zip(self.params, masters, grads):
                g = p.grad
                p.grad = None
                p.data = master
                if g is not None:
                    g = g.to(master.dtype)
                    p.grad = g if acc is None else acc.add_(g)
                else:
                    p.grad = acc


def native_bf16(device_type: str) -> bool:
    """Whether bf16 math is native here: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX (elsewhere oneDNN emulates bf16, no faster than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(bool(check()) for check in checks if check is not None)
    return False


def resolve_precision(precision: str, *, device_type: str, ddp: bool) -> str:
    """``train.precision=auto`` made concrete: bf16_master where bf16 is native on a CPU (bf16
    autocast under DDP, which bf16_master does not run with), bf16 autocast on a CUDA GPU with bf16,
    fp32 elsewhere. Other values are returned as they are."""
    if precision != "auto":
        return precision
    if not native_bf16(device_type):
        return "fp32"
    return "bf16_master" if device_type == "cpu" and not ddp else "bf16"


def precision_reason(requested: str, resolved: str, *, device_type: str, ddp: bool) -> str:
    """Why a run computes in ``resolved`` (for the run's first lines): the setting, or what ``auto`` saw."""
    if requested != "auto":
        return f"train.precision={requested}, as set"
    if resolved == "fp32":
        where = "this CPU has no native bf16 math (no AVX512-BF16 or AMX)" if device_type == "cpu" else "this GPU has no bf16"
        return (f"auto: {where}, where bf16 is emulated and slower than fp32; on CPUs with AVX512-BF16/AMX auto picks "
                "bf16_master, 2-3x faster")
    if resolved == "bf16" and device_type == "cpu":
        return "auto: native bf16 on this CPU, and bf16 autocast because DDP does not run bf16_master"
    if resolved == "bf16":
        return "auto: this GPU computes in bf16"
    return "auto: this CPU has native bf16 math (AVX512-BF16 or AMX): bf16 forward/backward over fp32 master weights"


def fsdp_mixed_precision(precision: str, dtype: torch.dtype = torch.bfloat16):
    """FSDP2's policy for ``precision`` (None: the parameters' own dtype, fp32); ``dtype=float32``
    gives the policy of the modules kept in fp32 (the reward head), which casts their input up."""
    if precision != "bf16_master":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def effective_precision(cfg, processes: int | None = None) -> str:
    """``train.precision`` for this machine and a launch of ``processes`` (default: this launch's
    ``WORLD_SIZE``), with ``auto`` resolved (see :func:`resolve_precision`)."""
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = processes > 1 and cfg.train.strategy != "fsdp"
    return resolve_precision(cfg.train.precision, device_type="cuda" if torch.cuda.is_available() else "cpu", ddp=ddp)
