"""The one typed home of every setting, its default and its help text.

A run is configured by a YAML file and ``section.key=value`` overrides, both fed into
:class:`Config`. Unknown keys and badly typed values are errors that name the key.

Example:
    >>> cfg = load_config(None, ["model.name_or_path=gpt2", "train.batch_size=4"])
    >>> cfg.train.batch_size
    4
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rewardforge.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "Hugging Face model id or local directory of the backbone (decoder or encoder).")
    reward_model_type: str = _f("binary_ranking", "Registered reward model type: binary_ranking, regression, listwise (K ranked or rated responses per prompt), or one you registered.")
    attributes: list[str] = _f([], "Regression only: names of the predicted attributes, one output each.")
    attribute_weights: list[float] = _f([], "Weights of the attributes in the combined reward (default: the mean of all attributes).")
    pooling: str = _f("auto", "Where the reward is read: last_token (decoders), pooled (encoders' pooled output, as transformers' sequence-classification head reads it), mean (encoders: the head on the mean of the last hidden states over the real tokens, a sentence-embedding model's own pooling; rewardforge.load, serve and the integrations read it, plain transformers would read the pooled output instead) or auto (last_token for decoders, pooled for encoders).")
    freeze_layers_fraction: float = _f(0.0, "Freeze the embeddings and this lowest fraction of transformer layers (trlx uses 0.7).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    lora_r: int = _f(0, "LoRA rank through peft; 0 trains all (unfrozen) weights.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = _f([], "Module names LoRA adapts (default: peft's choice for the architecture).")
    lora_save_adapter: bool = _f(False, "Also save the LoRA adapter (with the trained reward head) in the export's adapter/ folder, loadable with peft on the base model; the export itself always has the adapters merged.")
    dropout: float | None = _f(0.0, "Dropout probability set on the backbone; 0 (as TRL and OpenRLHF do) keeps the chosen/rejected difference free of dropout noise. None keeps the checkpoint's.")
    attn_implementation: str = _f("auto", "Attention kernel for training: auto (for train.precision=bf16_master on CPU, where PyTorch's flash-attention backward in bf16 is slower than eager math: rf_eager, rewardforge's eager in fewer passes, for BERT/RoBERTa/ELECTRA/Llama/Mistral/Qwen2/Qwen3, else eager; otherwise transformers' default, sdpa), rf_eager, eager, sdpa, flash_attention_2, ... The export does not keep it.")
    sparse_last_layer: bool = _f(True, "Compute the last transformer layer only at the tokens the reward reads ([CLS] of an encoder, the last real token of a decoder); its keys and values still see every token, so rewards and gradients are the same to float rounding. Known families: BERT/RoBERTa/ELECTRA, Llama/Mistral/Qwen2/Qwen3; others run the full layer. false computes it at every position.")
    trust_remote_code: bool = _f(False, "Allow model code shipped with the checkpoint to run.")
    ensemble_size: int = _f(1, "K reward heads on the one shared backbone (1 = a single model). Each head is trained on its own bootstrap weighting of the examples (model.ensemble_bootstrap); the reward is the mean of the K members, and their standard deviation (the ensemble's disagreement) is served and evaluated as the reward's uncertainty. Exported with num_labels = K x outputs (id2label member_k, or member_k/ATTRIBUTE for regression) and a one-output reward/ folder holding the mean head.")
    ensemble_init: str = _f("independent", "How the ensemble's heads start: independent (each head its own random initialisation, as separately trained models would) or shared (every head starts from the same weights, so the members differ only by their bootstrap weighting; needs model.ensemble_bootstrap=poisson).")
    ensemble_members: str = _f("heads", "What an ensemble's members are: heads (K linear heads on the one shared backbone; cheap: one forward pass) or lora (K LoRA adapters of rank model.lora_r on the frozen backbone, each with its own head: more diverse members, at K forward passes a step; Zhang et al. 2024). A lora ensemble's export is the base model plus adapters/member_k (peft), which plain transformers cannot merge into one model: rewardforge.load, serve and the integrations read it, and its model card shows how to load one member with peft.")
    ensemble_bootstrap: str = _f("poisson", "How each ensemble head weighs the examples: poisson (an independent Poisson(1) weight per example and head, from train.seed and the example's index, so runs and resumes are exact) or none (every head sees every example with weight 1; heads differ by their initialisation only).")


@dataclass
class DataSource:
    """An entry of ``data.train`` / ``data.validation`` given as a mapping; its keys are documented in ``data.train``'s help."""

    path: str = ""
    weight: float | None = None
    fraction: float | None = None
    max_rows: int | None = None

    def __str__(self) -> str:
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def source_path(entry: "str | DataSource | dict") -> str:
    """The path of a data entry (a path, a :class:`DataSource` or its mapping as a saved config holds it)."""
    return str(entry.get("path", "")) if isinstance(entry, dict) else str(entry)


@dataclass
class DataConfig:
    train: list[str | DataSource] = _f([], "Training data: entries, each a path (.jsonl/.json/.parquet file, optionally .gz, a glob, a saved dataset directory or a hub name) or a mapping {path: P, weight: W or fraction: F, max_rows: N}. max_rows: read only the entry's first N rows (reading stops there). fraction (0 < F <= 1): train on a random F of the entry's training examples. weight (> 0, on every entry or on none; not with fraction): the training examples are mixed so that each entry supplies W / (sum of the weights) of them, as many in all as the entries hold together: an entry with more than its share gives a random subset, one with less is repeated (whole copies, then a random part). Random choices are fixed by train.seed. Weights and fractions apply to training examples only: the validation split is made first (by prompt hash) and never weighted. Rows read and examples taken per entry are in the data report and summary.json. The same for list data (model.reward_model_type=listwise): an example is a list, max_rows counts rows read (with data.group_by, rated rows, which group into lists only within their own entry).")
    validation: list[str | DataSource] = _f([], "Validation data (entries as in data.train; only max_rows applies: validation is never weighted); if empty, validation_fraction of train is held out by prompt hash.")
    validation_fraction: float = _f(0.1, "Fraction of train prompts held out for validation when data.validation is empty.")
    field_map: dict[str, str] = _f({}, "Rename columns to rewardforge's names, e.g. {prompt: source, response: system_output, labels: scores}.")
    format: str = _f("auto", "Row format: auto, explicit, implicit_prompt, conversational, nemo_comparison, regression, nemo_regression.")
    split: str = _f("train", "Split to read from a Hugging Face dataset dict or hub dataset.")
    max_length: int = _f(512, "Maximum tokens per sequence; longer ones are truncated (never dropped).")
    truncation: str = _f("prompt_left", "prompt_left: cut the prompt's oldest tokens first, then the response's end; response_right: only the response's end.")
    template: str = _f("auto", "auto: the tokenizer's chat template if it has one, else 'plain' (Human:/Assistant: turns).")
    skip_bad_rows: bool = _f(False, "Skip and count malformed rows instead of stopping with an error.")
    drop_duplicates: bool = _f(True, "Exclude (and count as duplicate_pairs) a pair whose rendered chosen and rejected texts repeat an earlier pair's; false keeps them, each weighted again.")
    cache_dir: str = _f("", "Where tokenized data is cached (default: ~/.cache/rewardforge): one memory-mapped Arrow file per dataset, built by the main process and mapped by the others, which share its pages. 'none' disables the cache (each process then builds its own copy in a temporary file).")
    num_proc: int | None = _f(None, "Processes that tokenize a cold build (null, the default: one per CPU core this process may use, but the building process alone on a machine of 1-2 cores, where that measured faster; 0 or 1: the building process alone, where the Rust tokenizer's own threads use the cores). The dataset is byte for byte the same whatever the number; a dataset of one chunk (4,096 examples) is always tokenized in the building process.")
    group_by_length: bool = _f(True, "Batch sequences of similar length together so padding stays small.")
    group_by: str = _f("", "Listwise only: group per-response rated rows (format regression, e.g. Topical-Chat) into one list per value of this field (after data.field_map, e.g. prompt or a dialogue id), scored by the label data.score_label; empty: every row is a list already ({prompt, responses, scores | ranking | best}). Rows group within their own data.train entry: the same value in two entries makes two lists.")
    score_label: str = _f("", "Listwise with data.group_by: the label of the rated rows that scores a response within its list (e.g. overall); higher is better, equal values are ties.")


@dataclass
class LossConfig:
    name: str = _f("auto", "auto (the type's default), bradley_terry (uses a pair's margin when present), margin_bradley_terry (the same), regular_bradley_terry (never the margin), scaled_bradley_terry or mse; for model.reward_model_type=listwise: plackett_luce (the default) or listwise_bradley_terry.")
    center_rewards_coef: float = _f(0.0, "Adds coef * mean((r_chosen + r_rejected)^2) to keep rewards centred at 0.")
    use_margin: bool = _f(True, "Use a pair's 'margin' field in margin_bradley_terry / bradley_terry when present.")
    gap_weight: bool = _f(False, "listwise_bradley_terry only: weight each ordered pair of a list by its score gap (s_i - s_j) instead of 1.")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "Number of passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run the epochs).")
    batch_size: int = _f(8, "Pairs (or rated responses, or lists for listwise) per micro-batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(1e-5, "Peak learning rate of AdamW.")
    head_lr_multiplier: float = _f(1.0, "The reward head's learning rate is train.learning_rate times this (the head starts random while the backbone is pretrained; bench/reward_quality.py measures it).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up linearly (0, as TRL and transformers: bench/reward_quality.py measured cosine with 3% warmup 2.5 points below linear without, on HH-RLHF).")
    lr_scheduler: str = _f("linear", "Decay after warmup: linear (the default, as TRL and transformers), cosine or constant.")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the trainable weights with this decay (e.g. 0.99) and validate, export and report it instead of the last weights; 0 (default): off. One process or DDP, not FSDP.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables clipping).")
    precision: str = _f("auto", "auto (default: bf16_master on one process or FSDP, bf16 with DDP, on a CPU with native bf16 math, AVX512-BF16 or AMX; bf16 on a CUDA GPU with bf16; fp32 elsewhere; resolved when training starts and recorded in the run's config); fp32; bf16 (autocast: fp32 weights, matmuls in bf16, as TRL and the HF Trainer); or bf16_master (forward and backward entirely in bf16 over fp32 master weights, accumulation and AdamW state: NeMo/Megatron's O2; fastest on CPUs with avx512_bf16/AMX and on GPUs). Not with train.strategy=ddp.")
    seed: int = _f(42, "Seed for weights of the head, data order and dropout.")
    eval_steps: int = _f(0, "Validate every N optimizer steps (0: only at the end).")
    save_steps: int = _f(0, "Checkpoint every N optimizer steps and at the end (0: no checkpoints; the export is written either way).")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (0 keeps all).")
    resume_from: str = _f("", "Checkpoint directory to resume from, or 'auto' for the latest complete one in output_dir.")
    log_steps: int = _f(10, "Append training metrics to metrics.jsonl every N optimizer steps.")
    report_to: list[str] = _f([], "Experiment trackers (through accelerate) that get every metric metrics.jsonl gets, with the same names (split/metric) and steps, plus the resolved config and the data report as hyperparameters, from the main process: tensorboard, wandb, mlflow, or none; each an optional extra (pip install 'rewardforge[tensorboard]'). They write under output_dir/trackers (wandb and mlflow: unless WANDB_DIR / MLFLOW_TRACKING_URI say otherwise).")
    eval_batch_size: int = _f(0, "Pairs per validation batch (0: 2 x batch_size; read it as train.validation_batch_size).")
    threads: int = _f(0, "torch CPU threads (0 keeps torch's default).")
    malloc_trim_steps: int = _f(10, "Every N optimizer steps, return the memory glibc's malloc holds free to the OS (malloc_trim), so a long run's resident memory stays flat: freed activations of batches of varying length otherwise stay resident in malloc's heaps (rewardforge.training.memory; bench/memory.py measures it). The same results; 0 turns it off; nothing is done where the C library is not glibc.")
    malloc_trim_growth: float = _f(0.03, "With malloc_trim_steps > 0, also release after any step that leaves the resident memory more than this fraction above what it was just after the last release (0: only every malloc_trim_steps steps). A step of long batches can leave hundreds of MiB of freed activations resident; this bounds that between the periodic releases for the cost of reading RSS once a step.")
    nonfinite: str = _f("stop", "On a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the optimizer step.")
    max_skipped_steps: int = _f(10, "With nonfinite=skip, stop once this many steps have been skipped in the run.")
    strategy: str = _f("auto", "Several processes: ddp (replicate; the default, 'auto') or fsdp (shard weights, gradients and optimizer state; the backbone's transformer block is the wrap unit).")
    fsdp_cpu_offload: bool = _f(False, "With strategy=fsdp: keep sharded weights, gradients and optimizer state in CPU memory.")
    share_prompt: bool = _f(False, "Pairs and lists (listwise), decoders (last_token pooling) with sdpa/eager attention: compute the tokens the responses of a pair (or all K of a list) share (the prompt) once, in one packed row with a branch attention mask; same rewards and gradients, fewer tokens computed.")

    @property
    def validation_batch_size(self) -> int:
        """Pairs per validation (and in-training eval) batch: ``eval_batch_size``, or 2 x ``batch_size``."""
        return self.eval_batch_size or 2 * self.batch_size


@dataclass
class EvalConfig:
    datasets: list[str] = _f([], "Extra datasets (any format `rewardforge eval` reads) evaluated at every validation; metrics go to metrics.jsonl.")
    subset_field: str = _f("", "Field that names a pair's subset/category for per-subset accuracy (default: subset or category).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = _f("runs/reward_model", "Directory for metrics, checkpoints, summary and the exported model.")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("train", "validation"):  # an entry as written: a path, or a mapping of the keys it sets
            out["data"][name] = [e.to_dict() if isinstance(e, DataSource) else e for e in getattr(self.data, name)]
        return out


TRACKERS = ("tensorboard", "wandb", "mlflow", "none")

_CHOICES = {
    ("model", "pooling"): ("auto", "last_token", "pooled", "mean"),
    ("model", "ensemble_bootstrap"): ("poisson", "none"),
    ("model", "ensemble_init"): ("independent", "shared"),
    ("model", "ensemble_members"): ("heads", "lora"),
    ("data", "truncation"): ("prompt_left", "response_right"),
    ("train", "lr_scheduler"): ("cosine", "linear", "constant"),
    ("train", "precision"): ("auto", "fp32", "bf16", "bf16_master"),
    ("train", "nonfinite"): ("stop", "skip"),
    ("train", "strategy"): ("auto", "ddp", "fsdp"),
}


def choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """Every setting with a fixed list of values, and the list (the data formats and templates come from
    their modules in ``data/``, which import without torch)."""
    from rewardforge.data.formats import FORMATS
    from rewardforge.data.template import TEMPLATES

    return {**_CHOICES, ("data", "format"): FORMATS, ("data", "template"): TEMPLATES}


def validate(cfg: Config) -> None:
    """Reject bad values and conflicting options, naming the key and the fix."""
    for (section, key), choices_ in choices().items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices_:
            raise ConfigError(f"{section}.{key}={value!r} is not valid; choose one of {', '.join(choices_)}")
    for t in cfg.train.report_to:
        if t not in TRACKERS:
            raise ConfigError(f"train.report_to has {t!r}; choose from {', '.join(TRACKERS)}")
    if cfg.train.malloc_trim_steps < 0:
        raise ConfigError(f"train.malloc_trim_steps must be >= 0 (0 turns it off), got {cfg.train.malloc_trim_steps}")
    if not 0.0 <= cfg.train.malloc_trim_growth < 10.0:
        raise ConfigError(f"train.malloc_trim_growth must be a fraction >= 0 (0.03 = 3%; 0 turns the check off), got {cfg.train.malloc_trim_growth}")
    positive = [("train", "batch_size"), ("train", "gradient_accumulation_steps"), ("data", "max_length")]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {getattr(getattr(cfg, section), key)}")
    if not 0.0 <= cfg.model.freeze_layers_fraction <= 1.0:
        raise ConfigError(f"model.freeze_layers_fraction must be in [0, 1], got {cfg.model.freeze_layers_fraction}")
    if not 0.0 < cfg.data.validation_fraction < 1.0 and not cfg.data.validation:
        raise ConfigError(
            f"data.validation_fraction must be in (0, 1) when data.validation is empty, got {cfg.data.validation_fraction}"
        )
    if not 0.0 < cfg.train.learning_rate < float("inf"):  # also rejects nan
        raise ConfigError(f"train.learning_rate must be a finite number > 0, got {cfg.train.learning_rate}")
    if not 0.0 < cfg.train.head_lr_multiplier < float("inf"):
        raise ConfigError(f"train.head_lr_multiplier must be a finite number > 0, got {cfg.train.head_lr_multiplier}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: off; e.g. 0.99), got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.model.attribute_weights and cfg.model.attributes and len(cfg.model.attribute_weights) != len(cfg.model.attributes):
        raise ConfigError(
            f"model.attribute_weights has {len(cfg.model.attribute_weights)} values but model.attributes names "
            f"{len(cfg.model.attributes)}; give one weight per attribute"
        )
    if cfg.train.share_prompt and cfg.model.pooling in ("pooled", "mean"):
        raise ConfigError(f"train.share_prompt=true needs a decoder backbone (last_token pooling), not model.pooling={cfg.model.pooling}; "
                          "set train.share_prompt=false")
    if cfg.data.group_by and not cfg.data.score_label:
        raise ConfigError(f"data.group_by={cfg.data.group_by!r} needs data.score_label, the label that scores each response "
                          "of a group (e.g. data.score_label=overall)")
    if cfg.data.score_label and not cfg.data.group_by:
        raise ConfigError("data.score_label is read only when data.group_by groups rated rows into lists; set data.group_by "
                          "(e.g. data.group_by=prompt) or remove data.score_label")
    if cfg.model.ensemble_size < 1:
        raise ConfigError(f"model.ensemble_size must be >= 1 (1 = a single model), got {cfg.model.ensemble_size}")
    if cfg.model.ensemble_size > 1 and cfg.model.ensemble_init == "shared" and cfg.model.ensemble_bootstrap == "none":
        raise ConfigError("model.ensemble_init=shared with model.ensemble_bootstrap=none trains K identical heads; "
                          "choose one: set model.ensemble_bootstrap=poisson or model.ensemble_init=independent")
    if cfg.model.ensemble_members == "lora":
        if cfg.model.ensemble_size < 2:
            raise ConfigError("model.ensemble_members=lora needs an ensemble: set model.ensemble_size=K (K >= 2), "
                              "or remove model.ensemble_members")
        if cfg.model.lora_r <= 0:
            raise ConfigError("model.ensemble_members=lora needs the members' LoRA rank: set model.lora_r (e.g. 8)")
        if cfg.train.strategy == "fsdp":
            raise ConfigError("model.ensemble_members=lora is not supported with train.strategy=fsdp; use "
                              "train.strategy=ddp or model.ensemble_members=heads")
    if len(set(cfg.model.attributes)) != len(cfg.model.attributes):
        raise ConfigError(f"model.attributes has duplicate names: {cfg.model.attributes}")
    if cfg.data.num_proc is not None and cfg.data.num_proc < 0:
        raise ConfigError(f"data.num_proc must be >= 0 (0 or 1: one process) or null (one per core), got {cfg.data.num_proc}")
    _validate_sources(cfg.data)


def _validate_sources(data: DataConfig) -> None:
    """The mapping entries of data.train / data.validation: values in range, weights on all entries or none."""
    for name in ("train", "validation"):
        for i, e in enumerate(getattr(data, name)):
            if not isinstance(e, DataSource):
                continue
            key = f"data.{name}[{i}]"
            if not e.path:
                raise ConfigError(f"{key} has no path; give one, e.g. {{path: pairs.jsonl, weight: 2}}")
            if e.weight is not None and not 0.0 < e.weight < float("inf"):
                raise ConfigError(f"{key}.weight must be a finite number > 0, got {e.weight}; to leave an entry out, remove it")
            if e.fraction is not None and not 0.0 < e.fraction <= 1.0:
                raise ConfigError(f"{key}.fraction must be in (0, 1], got {e.fraction}; to repeat an entry's examples, give every entry a weight")
            if e.max_rows is not None and e.max_rows <= 0:
                raise ConfigError(f"{key}.max_rows must be > 0, got {e.max_rows}")
            if name == "validation" and (e.weight is not None or e.fraction is not None):
                what = "weight" if e.weight is not None else "fraction"
                raise ConfigError(f"{key}.{what}: validation data is never weighted (each example counts once); remove {what} "
                                  "(max_rows is allowed)")
    weighted = [i for i, e in enumerate(data.train) if isinstance(e, DataSource) and e.weight is not None]
    if weighted:
        unweighted = [i for i in range(len(data.train)) if i not in weighted]
        if unweighted:
            raise ConfigError(
                f"data.train[{unweighted[0]}] has no weight but data.train[{weighted[0]}] has one; weights set each entry's "
                f"share of the mixture: give every entry a weight (e.g. {{path: {source_path(data.train[unweighted[0]])}, weight: 1}}) or none"
            )
        fraction = next((i for i, e in enumerate(data.train) if e.fraction is not None), None)
        if fraction is not None:
            raise ConfigError(f"data.train[{fraction}].fraction with weights on data.train: choose one (weights set each "
                              "entry's share of the mixture; fraction takes part of one entry)")


# ---------------------------------------------------------------- loading


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: tp for name, tp in hints.items() if name != "output_dir"}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if DataSource in args:
            return value if isinstance(value, DataSource) else _data_source(value, key) if isinstance(value, dict) else _coerce(value, str, key)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if typing.get_origin(inner) in (typing.Union, types.UnionType) and DataSource in typing.get_args(inner):
            if isinstance(value, (dict, DataSource)):
                value = [value]
            elif not isinstance(value, (list, tuple, str)):
                raise ConfigError(f"{key} expects a list of paths or {{path: ...}} mappings, got {value!r}")
            if isinstance(value, (list, tuple)):
                return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            elif text == "":
                value = []
            else:
                value = [v.strip() for v in text.split(",")]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping like {{a: b}}, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    return value


def _data_source(value: dict, key: str) -> DataSource:
    """A mapping entry of data.train / data.validation; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(DataSource)
    for k in value:
        if k not in hints:
            close = difflib.get_close_matches(str(k), list(hints), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key '{key}.{k}'{hint} An entry takes {', '.join(hints)}, "
                              "e.g. {path: pairs.jsonl, weight: 2}")
    if "path" not in value:
        raise ConfigError(f"{key} has no path; give one, e.g. {{path: pairs.jsonl, weight: 2}}")
    return DataSource(**{k: _coerce(v, hints[k], f"{key}.{k}") for k, v in value.items()})


# Names TRL / transformers' TrainingArguments (and OpenRLHF) use, and what rewardforge calls them.
FOREIGN_NAMES = {
    "per_device_train_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "micro_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "num_train_epochs": "train.epochs",
    "max_epochs": "train.epochs",
    "lr": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_ratio (a fraction of the steps)",
    "lr_warmup_ratio": "train.warmup_ratio",
    "logging_steps": "train.log_steps",
    "bf16": "train.precision=bf16 (or bf16_master)",
    "fp16": "train.precision (fp16 is not supported on CPU: use bf16)",
    "center_rewards_coefficient": "loss.center_rewards_coef",
    "disable_dropout": "model.dropout=0 (the default)",
    "model_name_or_path": "model.name_or_path",
    "pretrain": "model.name_or_path",
    "max_len": "data.max_length",
    "dataset": "data.train",
    "report_to": "train.report_to",
}


def _unknown(key: str, valid: list[str]) -> ConfigError:
    name = key.split(".")[-1]
    if name in FOREIGN_NAMES:
        return ConfigError(f"unknown config key {key!r}: rewardforge calls it {FOREIGN_NAMES[name]}")
    if "." not in key:  # a misspelt section (or output_dir)
        close = difflib.get_close_matches(key, [*_sections(), "output_dir"], n=1)
        suggestion = close[0] if close else None
        listed = [*_sections(), "output_dir"]
        what = "Sections"
    else:
        section = key.split(".")[0]
        in_section = [v for v in valid if v.startswith(section + ".")]
        close = difflib.get_close_matches(name, [v.split(".")[-1] for v in valid], n=1)  # any section: a key put in the wrong one
        suggestion = next(v for v in valid if v.endswith("." + close[0]) or v == close[0]) if close else None
        listed = in_section or valid
        what = f"Keys of {section}" if in_section else "Valid keys"
    hint = f"; did you mean {suggestion!r}?" if suggestion else "."
    return ConfigError(f"unknown config key {key!r}{hint} {what}: {', '.join(listed)}")


def valid_keys() -> list[str]:
    keys = []
    for section, cls in _sections().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys + ["output_dir"]


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts, rejecting unknown keys by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    sections = _sections()
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "output_dir":
            kwargs[name] = _coerce(value, str, name)
            continue
        if name not in sections:
            raise _unknown(name, valid_keys())
        cls = sections[name]
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {value!r}")
        types_ = _field_types(cls)
        sub = {}
        for key, v in value.items():
            if key not in types_:
                raise _unknown(f"{name}.{key}", valid_keys())
            sub[key] = _coerce(v, types_[key], f"{name}.{key}")
        kwargs[name] = cls(**sub)
    return Config(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in _sections():
            raise ConfigError(f"override {item!r} sets a whole section; set one key with {parts[0]}.KEY=value")
        if len(parts) == 1 and parts[0] != "output_dir" or len(parts) > 2:
            raise _unknown(key, valid_keys())
        value: Any = yaml.safe_load(text) if text.strip() else ""
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the YAML file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {p!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or none), apply dotted overrides, validate and return it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def ensure_writable_dir(path: str | Path, setting: str) -> Path:
    """Create ``path`` and prove it writable before any work starts; the error names ``setting``."""
    import os

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{setting}={str(out)!r} is not writable ({e.strerror}); choose another {setting}") from None
    return out


CONFIG_FILE = "config.yaml"  # a run's and a checkpoint's resolved config


def dump_config(cfg: Config | dict) -> str:
    """The YAML of a config (or of its ``to_dict()``): what ``--print-config`` shows and ``config.yaml`` holds."""
    return yaml.safe_dump(cfg.to_dict() if isinstance(cfg, Config) else cfg, sort_keys=False)


def write_config(cfg: Config | dict, directory: str | Path) -> Path:
    """Write ``directory/config.yaml`` (the one writer of a run's and a checkpoint's config)."""
    path = Path(directory) / CONFIG_FILE
    path.write_text(dump_config(cfg))
    return path


def read_config_file(directory: str | Path) -> dict:
    """The raw mapping in ``directory/config.yaml`` (as written by :func:`write_config`)."""
    return yaml.safe_load((Path(directory) / CONFIG_FILE).read_text())


def describe() -> str:
    """Every key with its default and help, for ``rewardforge train --help-config``."""
    lines = []
    for section, cls in _sections().items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} = {default!r}")
            lines += textwrap.wrap(f.metadata.get("help", ""), 100, initial_indent="      ", subsequent_indent="      ")
    lines.append(f"output_dir = {Config.__dataclass_fields__['output_dir'].default!r}")
    lines += textwrap.wrap(Config.__dataclass_fields__["output_dir"].metadata["help"], 100, initial_indent="      ",
                           subsequent_indent="      ")
    return "\n".join(lines)
