"""The export's ``README.md``: a Hugging Face model card (YAML metadata + what a user of the model needs).

Written with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` (so the Hub and
``ModelCard.load`` read it): ``base_model``, ``library_name: transformers``, ``pipeline_tag``, ``tags``,
``datasets`` where known, and ``model-index`` with the validation metrics; then the model type, attributes
and weights, template, max length and truncation, the data report, the reward statistics, and the commands to
load, score and serve it. ``rewardforge eval --update-card`` adds an evaluation table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

_READ_AT = {"last_token": "the last real token", "pooled": "the pooled first token",
            "mean": "the mean of the last hidden states over the real tokens"}

CARD_FILE = "README.md"
EVAL_START, EVAL_END = "<!-- rewardforge eval -->", "<!-- /rewardforge eval -->"


def _datasets(sources: Sequence[str]) -> list[str]:
    """Hub dataset ids among the training sources (local files are not named in the metadata)."""
    out = []
    for s in sources:
        if "/" in s and not Path(s).exists() and not s.startswith((".", "/", "~")) and s.count("/") == 1:
            out.append(s)
    return out


def render_card(meta: Mapping[str, Any], *, name: str, validation: Mapping[str, Any] | None = None,
                data: Mapping[str, Any] | None = None, sources: Sequence[str] = ()) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    evals = []
    if validation and validation.get("accuracy") is not None:
        evals.append(EvalResult(task_type="text-classification", dataset_type="validation", dataset_name="validation split",
                                metric_type="accuracy", metric_value=round(float(validation["accuracy"]), 4)))
    if validation and validation.get("pearson") is not None:
        evals.append(EvalResult(task_type="text-classification", dataset_type="validation", dataset_name="validation split",
                                metric_type="pearsonr", metric_value=round(float(validation["pearson"]), 4)))
    card = ModelCardData(
        base_model=meta.get("base_model") or None, library_name="transformers", pipeline_tag="text-classification",
        tags=["reward-model", "rlhf", "rewardforge"], datasets=_datasets(sources) or None, model_name=name,
        eval_results=evals or None,
    )
    attrs = meta.get("attributes") or ["reward"]
    weights = meta.get("attribute_weights") or [1.0]
    fmt = meta.get("input_format") or {}
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {name}", "",
        f"A **{meta['reward_model_type']}** reward model trained with [rewardforge](https://pypi.org/project/rewardforge/)"
        + (f" from `{meta['base_model']}`." if meta.get("base_model") else "."), "",
        "| | |", "|---|---|",
        f"| reward read at | {_READ_AT.get(meta['pooling'], meta['pooling'])} ({meta['pooling']}) |",
        f"| outputs | {', '.join(f'{a} (weight {w:g})' for a, w in zip(attrs, weights))} |",
        f"| template | {meta.get('template')}; special tokens written by the chat template: "
        f"{fmt.get('lead') or 'none'} … {fmt.get('trail') or 'none'} |",
        f"| max length | {meta['max_length']} tokens, truncation `{meta.get('truncation')}` (the end of turn is always kept) |",
        f"| reward mean / std | {meta.get('reward_mean', 0):.4f} / {meta.get('reward_std', 1):.4f} "
        f"({meta.get('reward_stats_source') or 'no statistics measured'}) |",
    ]
    ens = meta.get("ensemble")
    lora = bool(ens) and ens.get("members_kind") == "lora"
    if lora:
        lines.append(f"| plain transformers | **does not give this model's reward alone**: it is {ens['size']} LoRA members on one "
                     f"base model; score it with `rewardforge.load(dir)` or `rewardforge serve`. One member with peft: "
                     f"`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(dir), dir/"
                     f"'{ens.get('adapters_dir', 'adapters')}/member_k')`, its outputs k * N .. k * N + N - 1 |")
    elif meta.get("plain_transformers_reward") is False:
        lines.append("| plain transformers | **does not give this model's reward**: `AutoModelForSequenceClassification` reads the "
                     "pooled first token, this model the mean of the tokens; score it with `rewardforge.load(dir)`, "
                     "`rewardforge serve` or rewardforge's TRL/verl integrations |")
    if ens:
        lines.append(f"| ensemble | {ens['size']} {'LoRA adapters' if lora else 'heads'} on one backbone ({ens.get('bootstrap')} "
                     "bootstrap); reward = their mean, uncertainty = their std"
                     + ("" if lora else "; `reward/` holds the mean head (num_labels=1)") + " |")
    if validation:
        lines.append("| validation | " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()
                                                   if isinstance(v, float) and k in ("accuracy", "loss", "mse", "pearson")) + " |")
    if data:
        tr = data.get("train", {})
        excluded = tr.get("excluded") or {}
        lines.append(f"| data | {data.get('train_examples', 0)} train / {data.get('validation_examples', 0)} validation "
                     f"examples from {tr.get('rows_read', 0)} rows; excluded: {', '.join(f'{k} {v}' for k, v in excluded.items()) or 'none'}; "
                     f"bad rows skipped {tr.get('skipped_bad_rows', 0)} |")
    lines += [
        "", "## Use", "",
        "```python", "import rewardforge", "scorer = rewardforge.load(\"PATH\")",
        "scorer.score([[{\"role\": \"user\", \"content\": \"How do I boil an egg?\"}]], [\"Boil it for 9 minutes.\"])", "```", "",
        "```bash",
        "echo '{\"prompt\": \"How do I boil an egg?\", \"response\": \"Boil it for 9 minutes.\"}' | rewardforge score PATH",
        "rewardforge serve PATH --port 8000   # native /v1/score, OpenRLHF /get_reward, KServe v2 / Triton",
        "```", "",
    ]
    if meta.get("plain_transformers_reward") is not False:
        lines += ["Plain transformers reads the same reward: `AutoModelForSequenceClassification.from_pretrained(PATH)` on "
                  "`tokenizer.apply_chat_template(messages, tokenize=True)`"
                  + (" (`reward/` holds the one-output model with the attribute weights folded in, for `num_labels=1` loaders)."
                     if len(attrs) > 1 else "."), ""]
    return "\n".join(lines) + "\n"


def write_card(out_dir: str | Path, meta: Mapping[str, Any], **kw: Any) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_card(meta, name=kw.pop("name", Path(out_dir).name), **kw), encoding="utf-8")
    return path


def add_eval_table(model_dir: str | Path, result: Mapping[str, Any], model_name: str) -> Path:
    """Put (or replace) the evaluation table of ``result`` (``rewardforge eval``'s metrics) in the model's card."""
    path = Path(model_dir) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# {Path(model_dir).name}\n"
    rows = ["| dataset | pairs | accuracy | 95% interval | seen in training |", "|---|---|---|---|---|"]
    for ds, d in result["results"][model_name]["datasets"].items():
        o = d.get("overall") or {}
        if o.get("accuracy") is None:
            continue
        seen = d.get("training_overlap")
        rows.append(f"| {ds} | {o['n']} | {o['accuracy']:.4f} | {o['ci_low']:.3f}–{o['ci_high']:.3f} | "
                    + (f"{seen['in_training']} ({seen['share_in_training']:.0%})" if seen else "unknown") + " |")
    block = "\n".join([EVAL_START, "## Evaluation", "", f"`rewardforge eval` on {result.get('created')}:", "", *rows, EVAL_END])
    if EVAL_START in text and EVAL_END in text:
        a, b = text.index(EVAL_START), text.index(EVAL_END) + len(EVAL_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path
