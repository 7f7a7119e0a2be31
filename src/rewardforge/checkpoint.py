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

import yaml

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


class CheckpointError(ValueError):
    """A path given as a checkpoint is not a complete rewardforge checkpoint."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, config: dict, tokenizer, *, model,
                    optimizer, scheduler, strategy: str = "single", keep: int = 0) -> Path:
    """Save everything needed to resume, atomically; prune to the newest ``keep`` checkpoints.

    Called by every process: weights and optimizer state go through ``torch.distributed.checkpoint``
    (each process writes its shards; any number of processes and either strategy can load them),
    each process saves its RNG state, and the main process writes the rest and renames the
    finished directory into place.
    """
    from accelerate.checkpointing import save_accelerator_state

    from rewardforge.distributed import MODEL_STATE_DIR, save_model_state

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
        save_accelerator_state(str(tmp), [], [], [scheduler], [], accelerator.process_index, step=state.step)
        accelerator.wait_for_everyone()
        if main:
            tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            with open(tmp / STATE_FILE, "w") as fh:
                json.dump({**asdict(state), "world_size": accelerator.num_processes, "strategy": strategy,
                           "global_batch_size": config["train"]["batch_size"] * accelerator.num_processes}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep > 0:
                for old in list_checkpoints(output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


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
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a rewardforge checkpoint (no config.yaml)")
    return yaml.safe_load(path.read_text())
