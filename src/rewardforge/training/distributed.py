"""Several processes: which strategy a run uses, FSDP sharding, and model/optimizer state I/O.

rewardforge has no distribution layer of its own. ``ddp`` is accelerate's DistributedDataParallel
(``accelerator.prepare``). ``fsdp`` is PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) with
each transformer block of the backbone (its ``_no_split_modules``) as a unit and the whole model
as the root; an accelerate FSDP config selects it too. FSDP2 is applied here directly, not through
``accelerator.prepare``, because accelerate turns FSDP on only for accelerators, while FSDP2 also
runs on CPU with gloo, which is what the tests use: one code path, tested.

Model and optimizer state are saved with ``torch.distributed.checkpoint`` (DCP) under the same
parameter names for every strategy, so a checkpoint written by N processes (DDP or FSDP) resumes
with M processes and either strategy.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rewardforge.config import Config, ConfigError

MODEL_STATE_DIR = "model_and_optimizer"


def resolve_strategy(cfg: Config, accelerator) -> str:
    """``single``, ``ddp`` or ``fsdp`` for this run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "accelerate is configured for DeepSpeed, which rewardforge does not drive; use train.strategy=fsdp "
            "(FSDP2 full sharding, the ZeRO-3 equivalent) with a plain multi-GPU accelerate config"
        )
    if accelerator.num_processes == 1:
        return "single"  # nothing to shard across; the checkpoint format is the same for every strategy
    # An accelerate FSDP config (accelerate launch --use_fsdp ...) selects fsdp as well; the sharding is ours.
    if cfg.train.strategy == "fsdp" or accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp"


def block_classes(model: nn.Module) -> set[type]:
    """Classes of the backbone's transformer blocks (transformers' ``_no_split_modules``)."""
    hf = getattr(model, "hf", model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(
            f"train.strategy=fsdp needs the backbone's transformer block class; {type(hf).__name__} declares "
            f"_no_split_modules={sorted(names) or None} and none is in the model. Use train.strategy=ddp"
        )
    return found


def shard_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Apply FSDP2: every transformer block is a unit, the rest (embeddings, head) goes in the root.

    Weights are kept in fp32 (the master copy); ``train.precision=bf16`` computes in bf16 through
    autocast, as on the other strategies, and ``bf16_master`` through FSDP's mixed-precision policy
    (bf16 gathered weights and compute, fp32 gradient reduction and shards).
    ``train.fsdp_cpu_offload`` keeps the shards in CPU memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from rewardforge.training.precision import fsdp_mixed_precision

    model.to(device)
    kw = {"offload_policy": CPUOffloadPolicy()} if cfg.train.fsdp_cpu_offload and device.type != "cpu" else {}
    mp = fsdp_mixed_precision(cfg.train.precision)
    if mp is not None:
        kw["mp_policy"] = mp
        # the reward head stays fp32 (its own unit, input cast up), as on one process
        fully_shard(model.head(), **{**kw, "mp_policy": fsdp_mixed_precision(cfg.train.precision, torch.float32)})
    classes = tuple(block_classes(model))
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


def grad_norm_value(norm) -> float:
    """A total gradient norm as a float (a DTensor's is gathered first)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _state(model: nn.Module, optimizer, **options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(**options))
    return {"model": model_sd, "optimizer": optim_sd}


@contextmanager
def _quiet_single_process():
    # DCP warns that it assumes one process when no process group exists: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_model_state(path: Path, model: nn.Module, optimizer) -> None:
    """Save weights and optimizer state with DCP (each process writes its shards). Collective."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(_state(model, optimizer), checkpoint_id=str(path))


def load_model_state(path: Path, model: nn.Module, optimizer) -> None:
    """Load what :func:`save_model_state` wrote, resharding to this run's processes. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on the main process only (others get {}). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
