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
from rewardforge.training.faults import fault_point
from rewardforge.errors import ModelError
from rewardforge.losses import combine
from rewardforge.models.reward_model import PLAIN_TRANSFORMERS_POOLINGS, RewardModel, merged_hf_model

METADATA_FILE = "rewardforge.json"
RUN_EXPORT = "model"  # a training run writes its export to OUTPUT_DIR/model
PROMPTS_FILE = "training_prompts.json"  # hashes of the training and validation prompts, never their text
KEY_CHARS = 16
FORMAT_VERSION = 1


@torch.no_grad()
def reward_statistics(pred: dict[str, np.ndarray], weights: list[float]) -> dict[str, Any]:
    """Mean/std of the combined reward (and of each output) over every scored sequence.

    Args:
        pred: output of :func:`rewardforge.training.validation.predict` on the validation set.
        weights: attribute weights of the combined reward.
    """
    outputs = np.concatenate([pred["chosen"], pred["rejected"]]) if "chosen" in pred else pred.get("pred")
    if outputs is None or len(outputs) == 0:
        return {"reward_mean": 0.0, "reward_std": 1.0, "sequences": 0}
    outputs = outputs.astype(np.float64)
    combined = combine(outputs, weights)
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
    single_reward: bool = True,
    prompt_fingerprint: dict[str, Any] | None = None,
    card_info: dict[str, Any] | None = None,
    ensemble: dict[str, Any] | None = None,
) -> Path:
    """Write the HF directory atomically: a reader never sees a half-written export.

    LoRA adapters are merged into the weights; ``save_adapter`` also writes the unmerged adapter
    (and the trained head) to ``adapter/`` for ``peft.PeftModel.from_pretrained(base, dir / "adapter")``.

    The tokenizer is written self-sufficient (:func:`save_tokenizer`). A regression model (several
    attributes) with ``single_reward`` also gets ``reward/``: the same model with the attribute weights
    folded into a one-output head, for loaders that ask for ``num_labels=1`` (TRL, verl).

    ``ensemble`` (:func:`rewardforge.ensemble.metadata`) marks a model of ``size`` members with
    ``size * len(attributes)`` outputs; it is stored in ``rewardforge.json`` and its ``reward/`` holds the
    members' mean reward as one head (with ``single_reward``).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf = merged_hf_model(model)
        hf.config.pad_token_id = tokenizer.pad_token_id
        hf.save_pretrained(tmp, safe_serialization=True)
        if model.members:  # a LoRA ensemble: the base model above, each member's adapter in adapters/member_k
            from rewardforge.ensemble import LORA_ADAPTERS_DIR

            # the embeddings (resized for a new pad token) are the base model's, saved above, not K copies
            model.model.save_pretrained(tmp / LORA_ADAPTERS_DIR, safe_serialization=True, save_embedding_layers=False)
            (tmp / LORA_ADAPTERS_DIR / "README.md").unlink(missing_ok=True)  # peft's empty template card
        elif save_adapter and hasattr(model.model, "peft_config"):
            # peft saves the adapter weights and modules_to_save, i.e. the trained reward head
            model.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        fault_point("export_write")
        input_format = save_tokenizer(tokenizer, tmp, max_length, truncation)
        meta = {
            "format_version": FORMAT_VERSION,
            "rewardforge_version": __version__,
            "reward_model_type": reward_model_type,
            "pooling": model.pooling,
            # False (model.pooling=mean): AutoModelForSequenceClassification reads another token; use rewardforge
            # False also for a LoRA ensemble: its members are the base model with adapters (peft), not one model
            "plain_transformers_reward": model.pooling in PLAIN_TRANSFORMERS_POOLINGS and not model.members,
            "attributes": list(attributes),
            "attribute_weights": list(attribute_weights),
            "max_length": max_length,
            "truncation": truncation,
            "template": template,
            "base_model": base_model,
            "input_format": input_format,
            **stats,
        }
        if prompt_fingerprint is not None:
            (tmp / PROMPTS_FILE).write_text(json.dumps(prompt_fingerprint) + "\n")
        size = int(ensemble["size"]) if ensemble else 1
        if ensemble:
            meta["ensemble"] = dict(ensemble)
        if (len(attributes) > 1 or size > 1) and single_reward and not model.members:
            # an ensemble's reward is the mean of its members: weights w / K on every member's outputs
            weights = np.tile(np.asarray(attribute_weights, np.float64) / size, size).tolist()
            meta["single_reward_dir"] = write_single_reward_model(hf, tmp, weights)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        from rewardforge.export.card import write_card

        write_card(tmp, meta, name=out_dir.name if out_dir.name != "model" else out_dir.parent.name or "model",
                   **(card_info or {}))
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


def prompt_fingerprint(train_keys, validation_keys) -> dict[str, Any]:
    """The export's record of which prompts it was trained and validated on: truncated SHA-1 hashes of each
    rendered prompt (``rewardforge.data.datasets.prompt_key``), no text. ``rewardforge eval`` reports the overlap."""
    short = lambda keys: sorted({k[:KEY_CHARS] for k in keys})  # noqa: E731
    return {"key": f"sha1 of the rendered prompt, first {KEY_CHARS} hex digits", "train": short(train_keys),
            "validation": short(validation_keys)}


PARITY_PROBES = (
    [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Put it in boiling water for nine minutes."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is gravity?"},
     {"role": "assistant", "content": "It keeps planets in orbit."}, {"role": "user", "content": "And light?"},
     {"role": "assistant", "content": "Photosynthesis makes sugar from light."}],
)


def save_tokenizer(tokenizer, out_dir: Path, max_length: int, truncation: str) -> dict[str, Any]:
    """Save an export's tokenizer so that every reader gets the ids the model was trained on.

    The chat template writes the special tokens the training tokenizer added ([CLS]/[SEP], BOS) and the saved
    tokenizer adds none (:func:`rewardforge.data.inputs.make_self_sufficient`). Checked on probe conversations:
    rewardforge's own path (training tokenizer), ``apply_chat_template(messages, tokenize=True)``,
    ``tokenizer(text, add_special_tokens=False)`` and ``tokenizer(text)`` with the saved tokenizer. Where a
    tokenizer cannot be changed that way it is saved as it is, and the returned record says why.

    Returns: the input format record for ``rewardforge.json``.
    """
    import copy

    from transformers import AutoTokenizer

    from rewardforge.data.inputs import InputFormat, ModelInputs, finish_saved_tokenizer, make_self_sufficient

    reference = ModelInputs(tokenizer, 1 << 30, truncation)
    export_tok = copy.deepcopy(tokenizer)
    done, reason = make_self_sufficient(export_tok) if getattr(tokenizer, "chat_template", None) else (False, "no template")
    export_tok.save_pretrained(out_dir)
    if done:
        finish_saved_tokenizer(out_dir)
    saved = AutoTokenizer.from_pretrained(out_dir)
    fmt = InputFormat.of(saved)
    mismatches = []
    if done:
        ours = ModelInputs(saved, 1 << 30, truncation)
        for k, messages in enumerate(PARITY_PROBES):
            t, s = reference.render_messages(list(messages))
            want = [int(x) for x in reference.encode([t], [s])[0][0]]
            text = saved.apply_chat_template(list(messages), tokenize=False)
            t2, s2 = ours.render_messages(list(messages))
            paths = {
                "rewardforge": [int(x) for x in ours.encode([t2], [s2])[0][0]],
                "apply_chat_template": list(_ids(saved.apply_chat_template(list(messages), tokenize=True))),
                "tokenizer_no_special": saved(text, add_special_tokens=False)["input_ids"],
                "tokenizer": saved(text)["input_ids"],
            }
            mismatches += [f"probe {k}: {name}" for name, got in paths.items() if list(got) != want]
    if mismatches:
        # the changed tokenizer does not reproduce training: keep the one training used
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (out_dir / f).unlink(missing_ok=True)
        tokenizer.save_pretrained(out_dir)
        fmt = InputFormat.of(AutoTokenizer.from_pretrained(out_dir))
        done, reason = False, "the self-sufficient tokenizer gave other ids (" + "; ".join(mismatches) + ")"
    record = fmt.as_dict()
    record["self_sufficient"] = bool(done)
    if not done:
        record["why_not"] = reason
    return record


def _ids(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns ids, or a BatchEncoding in newer transformers."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(x) for x in out]


@torch.no_grad()
def write_single_reward_model(hf, out_dir: Path, weights: list[float]) -> str:
    """Write ``out_dir/reward``: ``hf`` with its N-output head replaced by one output, ``w @ head`` (exact: the
    head is linear), plus the tokenizer files. Returns the folder name."""
    import copy

    single = copy.deepcopy(hf)
    head = single.score if hasattr(single, "score") else single.classifier
    w = torch.as_tensor(weights, dtype=head.weight.dtype).reshape(1, -1)
    new = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype)
    new.weight.copy_(w @ head.weight)
    if head.bias is not None:
        new.bias.copy_(w @ head.bias)
    if hasattr(single, "score"):
        single.score = new
    else:
        single.classifier = new
    single.config.num_labels = 1
    single.config.id2label = {0: "reward"}
    single.config.label2id = {"reward": 0}
    sub = out_dir / "reward"
    single.save_pretrained(sub, safe_serialization=True)
    for f in out_dir.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "vocab.txt")):
            shutil.copy2(f, sub / f.name)
    return "reward"


# ------------------------------------------------------------------ reading


def find_model_dir(path: str | Path) -> Path:
    """The model directory ``path`` names: itself, or a training run's export (``OUTPUT_DIR/model``); anything
    else is a :class:`ModelError` that says what to run (export a checkpoint, import a Hugging Face model)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if (path / RUN_EXPORT / METADATA_FILE).is_file():  # OUTPUT_DIR of a run: its export
        return path / RUN_EXPORT
    # write_model_dir swaps directories with two renames; a kill between them leaves the old one beside it
    old = sorted(path.parent.glob(f".{path.name}.old-*")) if not path.exists() and path.parent.is_dir() else []
    if old:
        raise ModelError(f"{path} does not exist, but an export interrupted while replacing it left the previous "
                         f"one at {old[-1]}; rename it back to {path} or export again")
    if not path.exists():
        raise ModelError(f"{path} does not exist; give an exported model directory (OUTPUT_DIR/model)")
    if (path / "trainer_state.json").is_file() and (path / "config.yaml").is_file():
        raise ModelError(f"{path} is a training checkpoint, not a model directory; export it first: "
                         f"rewardforge export {path} OUT_DIR")
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        raise ModelError(f"{path} is a training run without an export (the run did not finish); export its latest "
                         f"checkpoint: rewardforge export {path}/checkpoints/step-N OUT_DIR")
    config = path / "config.json"
    if config.is_file():
        try:
            archs = json.loads(config.read_text()).get("architectures") or []
        except ValueError:
            archs = []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelError(f"{path} is a Hugging Face reward model, not yet a rewardforge one; import it: "
                             f"rewardforge import {path} OUT_DIR [--data FILE to measure its reward mean/std]")
    raise ModelError(f"{path} is not a rewardforge model directory (no rewardforge.json); export one with "
                     "`rewardforge export` or import a Hugging Face reward model with `rewardforge import`")


def load_reward_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, Any, dict]:
    """Load an exported model directory: (RewardModel, tokenizer, rewardforge.json metadata)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = find_model_dir(model_dir)
    meta = read_metadata(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
    ens = meta.get("ensemble") or {}
    members = list(ens.get("member_adapters") or []) if ens.get("members_kind") == "lora" else []
    if members:  # a LoRA ensemble: every member's adapter on the one base model (rewardforge.ensemble.metadata)
        from peft import PeftModel

        where = model_dir / ens.get("adapters_dir", "adapters")
        absent = [m for m in members if not (where / m / "adapter_config.json").is_file()]
        if absent:
            raise ModelError(f"{model_dir} is a LoRA ensemble but {where} lacks the adapters of {', '.join(absent)}; "
                             "export the run again (rewardforge export CHECKPOINT OUT_DIR)")
        hf = PeftModel.from_pretrained(hf, where / members[0], adapter_name=members[0])
        for name in members[1:]:
            hf.load_adapter(where / name, adapter_name=name)
    hf.eval()
    return RewardModel(hf, meta["pooling"], members=members), tok, meta


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is an exported model directory or a training run's directory holding one."""
    p = Path(path)
    return (p / METADATA_FILE).is_file() or (p / RUN_EXPORT / METADATA_FILE).is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``rewardforge.json`` of the model directory ``path`` names (see :func:`find_model_dir`), with ``_dir``:
    the directory read."""
    model_dir = find_model_dir(path)
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    meta["_dir"] = str(model_dir)
    return meta
