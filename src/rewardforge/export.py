"""Export a trained reward model as a plain Hugging Face directory plus ``rewardforge.json``.

The directory loads with ``AutoModelForSequenceClassification.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)``; ``rewardforge.json`` carries what serving needs: the model
type, where the reward is read, max length and truncation, attribute names and weights, and the
reward mean/std measured on the validation set (so served rewards can be normalised).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardforge import __version__
from rewardforge.faults import fault_point
from rewardforge.models import RewardModel, merged_hf_model

METADATA_FILE = "rewardforge.json"
FORMAT_VERSION = 1


@torch.no_grad()
def reward_statistics(pred: dict[str, np.ndarray], weights: list[float]) -> dict[str, Any]:
    """Mean/std of the combined reward (and of each output) over every scored sequence.

    Args:
        pred: output of :func:`rewardforge.evaluate.predict` on the validation set.
        weights: attribute weights of the combined reward.
    """
    outputs = np.concatenate([pred["chosen"], pred["rejected"]]) if "chosen" in pred else pred.get("pred")
    if outputs is None or len(outputs) == 0:
        return {"reward_mean": 0.0, "reward_std": 1.0, "sequences": 0}
    outputs = outputs.astype(np.float64)
    combined = outputs @ np.asarray(weights, np.float64) if outputs.shape[1] > 1 else outputs[:, 0]
    std = float(combined.std())
    return {
        "reward_mean": float(combined.mean()),
        "reward_std": std if std > 0 else 1.0,
        "output_mean": outputs.mean(0).tolist(),
        "output_std": outputs.std(0).tolist(),
        "sequences": int(len(combined)),
    }


def write_model_dir(
    model: RewardModel,
    tokenizer,
    out_dir: str | Path,
    *,
    reward_model_type: str,
    attributes: list[str],
    attribute_weights: list[float],
    max_length: int,
    truncation: str,
    template: str,
    stats: dict[str, Any],
    base_model: str = "",
    save_adapter: bool = False,
) -> Path:
    """Write the HF directory atomically: a reader never sees a half-written export.

    LoRA adapters are merged into the weights; ``save_adapter`` also writes the unmerged adapter
    (and the trained head) to ``adapter/`` for ``peft.PeftModel.from_pretrained(base, dir / "adapter")``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf = merged_hf_model(model)
        hf.config.pad_token_id = tokenizer.pad_token_id
        hf.save_pretrained(tmp, safe_serialization=True)
        if save_adapter and hasattr(model.model, "peft_config"):
            # peft saves the adapter weights and modules_to_save, i.e. the trained reward head
            model.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        fault_point("export_write")
        tokenizer.save_pretrained(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "rewardforge_version": __version__,
            "reward_model_type": reward_model_type,
            "pooling": model.pooling,
            "attributes": list(attributes),
            "attribute_weights": list(attribute_weights),
            "max_length": max_length,
            "truncation": truncation,
            "template": template,
            "base_model": base_model,
            **stats,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
