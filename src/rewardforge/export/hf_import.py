"""Bring your own reward model: any Hugging Face sequence-classification directory as a rewardforge model.

A reward model trained by TRL's ``RewardTrainer``, OpenRLHF or published on the Hub is a plain
``AutoModelForSequenceClassification`` directory. :func:`import_model` writes it as a rewardforge model
directory (the same export format as training's: self-sufficient tokenizer, ``rewardforge.json``), so
``score``, ``eval`` and ``serve`` take it, with the reward's mean/std measured on data you give.

    rewardforge import path/to/trl-rm runs/imported --data val.jsonl --max-length 512
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rewardforge.errors import ModelError
from rewardforge.losses import default_weights


def import_model(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    template: str = "auto",
    pooling: str = "auto",
    max_length: int | None = None,
    truncation: str = "prompt_left",
    data: list[str] | None = None,
    attribute_weights: list[float] | None = None,
) -> dict[str, Any]:
    """Write ``hf_dir`` (a sequence-classification model) to ``out_dir`` as a rewardforge model directory.

    Args:
        template: ``auto`` (the tokenizer's chat template, else ``plain``), ``plain`` or ``tokenizer``: how
            conversations are rendered; use the one the model was trained with.
        pooling: ``auto`` (decoders: the last real token; encoders: the pooled output), or either explicitly.
        max_length: tokens the model reads (default: the tokenizer's ``model_max_length``, at most 4096).
        data: files (any format ``rewardforge train`` reads) to measure the reward mean/std on.
        attribute_weights: for several outputs, the weights of the combined reward (default: their mean).

    Returns: the written ``rewardforge.json``.
    Raises: ModelError (with the fix) when ``hf_dir`` is not such a model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rewardforge.data.template import setup_template
    from rewardforge.export.model_dir import write_model_dir
    from rewardforge.models.reward_model import RewardModel, detect_pooling, ensure_pad_token, load_tokenizer

    hf_dir = str(hf_dir)
    if not Path(hf_dir).is_dir():
        raise ModelError(f"{hf_dir} does not exist; give a directory saved with save_pretrained")
    if (Path(hf_dir) / "rewardforge.json").is_file():
        raise ModelError(f"{hf_dir} is already a rewardforge model directory; use it as it is")
    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise ModelError(f"{hf_dir} has no readable config.json ({str(e).splitlines()[0]}); give a directory saved "
                         "with save_pretrained") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(f"{hf_dir} holds a {archs[0]}, not a sequence-classification (reward) model; train a reward "
                         "model from it with `rewardforge train` (model.name_or_path)")
    tokenizer = load_tokenizer(hf_dir)
    pooling = detect_pooling(config) if pooling == "auto" else pooling
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if ensure_pad_token(tokenizer, pooling):  # a decoder's pad equal to its EOS: rewardforge reads by the mask
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    hf.config.pad_token_id = tokenizer.pad_token_id
    n = int(hf.config.num_labels)
    labels = [hf.config.id2label.get(i, f"output_{i}") for i in range(n)] if n > 1 else ["reward"]
    weights = list(attribute_weights) if attribute_weights else default_weights(n)
    if len(weights) != n:
        raise ModelError(f"--attribute-weights has {len(weights)} values but the model has {n} outputs ({', '.join(labels)})")
    used = setup_template(tokenizer, template)
    if max_length is None:
        max_length = int(min(getattr(tokenizer, "model_max_length", 512) or 512, 4096))
    model = RewardModel(hf, pooling, sparse_last_layer=False)
    common = dict(reward_model_type="regression" if n > 1 else "binary_ranking", attributes=labels, attribute_weights=weights,
                  max_length=max_length, truncation=truncation, template=used, base_model=hf_dir)
    out = write_model_dir(model, tokenizer, out_dir, stats={"reward_mean": 0.0, "reward_std": 1.0, "sequences": 0}, **common)
    meta_path = Path(out) / "rewardforge.json"
    meta = json.loads(meta_path.read_text())
    meta["imported_from"] = hf_dir
    if data:
        import rewardforge

        stats = measure_statistics(rewardforge.load(out, device="cpu"), data, weights)
        meta.update(stats)
        meta["statistics_from"] = list(data)
    else:
        meta["statistics_from"] = None  # mean 0 / std 1: normalised rewards are the raw ones
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    from rewardforge.export.card import write_card

    write_card(out, meta, name=Path(out).name)
    return meta


def measure_statistics(scorer, data: list[str], weights: list[float]) -> dict[str, Any]:
    """Reward mean/std (and per output) over every response in ``data`` (pairs: both sides)."""
    from rewardforge.data.formats import PreferencePair, parse_rows
    from rewardforge.data.readers import expand_sources, read_rows
    from rewardforge.export.model_dir import reward_statistics

    prompts, responses = [], []
    for f in expand_sources(list(data)):
        for ex in parse_rows(read_rows(f), "auto"):
            if isinstance(ex, PreferencePair):
                prompts += [ex.prompt, ex.prompt]
                responses += [ex.chosen, ex.rejected]
            else:
                prompts.append(ex.prompt)
                responses.append(ex.response)
    texts = [scorer.renderer.render(p, r) for p, r in zip(prompts, responses)]
    outputs = scorer.score_rendered([t for t, _ in texts], [s for _, s in texts]).outputs
    return reward_statistics({"pred": np.asarray(outputs)}, weights)
