"""Training checkpoints: model, optimizer, scheduler, RNG states and data position.

A checkpoint is written to a temporary directory and renamed into place only when complete, so
``train.resume_from=auto`` never picks up a half-written one. ``trainer_state.json`` is the last
file written; a directory without it is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rewardforge.config import CONFIG_FILE, read_config_file, write_config
from rewardforge.errors import CheckpointError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where the run is: optimizer steps done, epoch, and micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_seen: int = 0
    skipped_steps: int = 0


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, config: dict, tokenizer, *, model,
                    optimizer, scheduler, strategy: str = "single", keep: int = 0,
                    tensors: dict[str, dict] | None = None) -> Path:
    """Save everything needed to resume, atomically; prune to the newest ``keep`` checkpoints.

    ``tensors``: more state the main process writes, file name -> tensors (safetensors), e.g. the weight
    average of ``train.ema_decay``.

    Called by every process: weights and optimizer state go through ``torch.distributed.checkpoint``
    (each process writes its shards; any number of processes and either strategy can load them),
    each process saves its RNG state, and the main process writes the rest and renames the
    finished directory into place.
    """
    from accelerate.checkpointing import save_accelerator_state

    from rewardforge.training.distributed import MODEL_STATE_DIR, save_model_state
    from rewardforge.training.faults import fault_point

    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.partial"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        save_model_state(tmp / MODEL_STATE_DIR, model, optimizer)
        fault_point("checkpoint_write")
        save_accelerator_state(str(tmp), [], [], [scheduler], [], accelerator.process_index, step=state.step)
        accelerator.wait_for_everyone()
        if main:
            tokenizer.save_pretrained(tmp / "tokenizer")
            write_config(config, tmp)
            for name, t in (tensors or {}).items():
                from safetensors.torch import save_file

                save_file(t, str(tmp / name))
            with open(tmp / STATE_FILE, "w") as fh:
                json.dump({**asdict(state), "world_size": accelerator.num_processes, "strategy": strategy,
                           "global_batch_size": config["train"]["batch_size"] * accelerator.num_processes}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            old = root / f".step-{state.step}.old"
            if final.exists():  # the same step saved again: keep the old one until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
            if keep > 0:
                for old in list_checkpoints(output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            kept = list_checkpoints(output_dir)
            raise CheckpointError(
                f"could not write checkpoint {final} ({e.strerror or e}); nothing was removed: the latest complete "
                f"checkpoint is {kept[-1] if kept else 'none'}. Free space in {root} (or move output_dir) and resume "
                "with train.resume_from=auto"
            ) from e
        raise
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> the latest complete checkpoint in output_dir (or None); a path must be a checkpoint."""
    if not resume_from:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume_from)
    if not (p / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume_from={resume_from!r} is not a complete checkpoint (no {STATE_FILE})")
    return p


def read_state(checkpoint: Path) -> tuple[TrainerState, int, int]:
    """The saved position, the number of processes that saved it and their global batch size."""
    raw = json.loads((checkpoint / STATE_FILE).read_text())
    world = int(raw.pop("world_size"))
    raw.pop("strategy", None)
    global_batch = int(raw.pop("global_batch_size"))
    return TrainerState(**raw), world, global_batch


def read_config(checkpoint: Path) -> dict:
    path = Path(checkpoint) / CONFIG_FILE
    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint} does not exist; give a checkpoint directory (OUTPUT_DIR/checkpoints/step-N)")
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a rewardforge checkpoint (no config.yaml); give a checkpoint "
                              "directory (OUTPUT_DIR/checkpoints/step-N)")
    return read_config_file(checkpoint)
