"""The last transformer layer, computed only at the tokens the reward reads.

A reward model reads one hidden state per sequence from the last layer: the first token ([CLS]) of
a pooled encoder, the last real token of a decoder, or the two reward tokens of a packed
shared-prompt row (:mod:`rewardforge.data.packing`). The last layer's output at every other position is
thrown away, yet the plain forward pass computes it. Only the keys and values of the last layer
need every position; its query, attention output projection, MLP and norms need only the read
positions. Computing just those removes about ``(1 - 2 / 12) / num_layers`` of a BERT-style
model's linear-layer work (about 14% for MiniLM's 6 layers) in the forward and the backward pass,
plus the last layer's attention scores for all other queries. The result is the same computation
on fewer rows: rewards and gradients match the full layer to float rounding (tests/test_lastlayer.py).

:func:`install` replaces the ``forward`` of the model's last layer (on the instance; weights, state
dict and export are untouched). The new forward takes one extra keyword, ``rf_read_positions``
(``[batch, K]`` token indices), which transformers passes down from the model's forward call. It
returns the hidden states at those positions only, ``[batch, K, hidden]``. Without the keyword the
layer runs as before. Families whose layer structure is known (BERT/RoBERTa/ELECTRA encoders;
Llama, Mistral, Qwen2, Qwen3 decoders) get the reduced path; where a case is not covered (another
attention kernel, a sliding window without an explicit mask, feed-forward chunking) the layer runs
in full and the read positions are gathered afterwards, which is exact too.
"""

from __future__ import annotations

import sys
from functools import partial
from types import MethodType

import torch
from torch import nn

from rewardforge.models import families

READ_POSITIONS = "rf_read_positions"



def _layers(hf: nn.Module) -> nn.ModuleList | None:
    base = hf.base_model
    for path in ("encoder.layer", "layers"):
        obj = base
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


def _family(hf: nn.Module, layer: nn.Module) -> str | None:
    mt = hf.config.model_type
    if mt in families.ENCODERS:
        attn = getattr(layer, "attention", None)
        sa = getattr(attn, "self", None)
        ok = all(hasattr(sa, n) for n in ("query", "key", "value", "scaling", "attention_head_size"))
        ok = ok and all(hasattr(layer, n) for n in ("intermediate", "output")) and hasattr(attn, "output")
        return "encoder" if ok and not getattr(layer, "add_cross_attention", False) else None
    if mt in families.DECODERS:
        sa = getattr(layer, "self_attn", None)
        ok = all(hasattr(sa, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        ok = ok and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
        return "decoder" if ok else None
    return None


def install(hf: nn.Module) -> str | None:
    """Give ``hf``'s last layer the ``rf_read_positions`` keyword; returns the family (``encoder``:
    its sequence-classification head reads only the first token; ``decoder``), None where the
    layer structure is not known. Idempotent.
    """
    layers = _layers(hf)
    if layers is None:
        return None
    layer = layers[-1]
    if getattr(layer, "_rf_family", None):
        return layer._rf_family
    family = _family(hf, layer)
    if family is None:
        return None
    layer.forward = MethodType(partial(_forward, family=family), layer)
    layer._rf_family = family
    return family


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, k]]`` for ``x`` ``[B, L, ...]`` and ``positions`` ``[B, K]`` -> ``[B, K, ...]``."""
    if x.shape[0] != positions.shape[0]:
        x = x.expand(positions.shape[0], *x.shape[1:])
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    return x[rows, positions]


def _query_rows(mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The rows of a 4D attention mask ``[B, 1, Lq, L]`` for the read queries: ``[B, 1, K, L]``."""
    if mask is None or mask.dim() != 4 or mask.shape[2] == 1:
        return mask
    return _gather(mask.transpose(1, 2), positions).transpose(1, 2)


def _causal_rows(positions: torch.Tensor, length: int, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    """Causal mask rows ``[B, 1, K, L]`` for queries at ``positions`` (used when transformers passed none)."""
    keys = torch.arange(length, device=positions.device)
    allowed = (keys[None, None, :] <= positions[:, :, None])[:, None]
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _attention_fn(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kernel = module.config._attn_implementation
    if kernel == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[kernel]


def _encoder_layer(layer, hidden: torch.Tensor, attention_mask, positions: torch.Tensor) -> torch.Tensor:
    sa = layer.attention.self
    b, length, _ = hidden.shape
    k = positions.shape[1]
    picked = _gather(hidden, positions)
    q = sa.query(picked).view(b, k, -1, sa.attention_head_size).transpose(1, 2)
    key = sa.key(hidden).view(b, length, -1, sa.attention_head_size).transpose(1, 2)
    value = sa.value(hidden).view(b, length, -1, sa.attention_head_size).transpose(1, 2)
    out, _ = _attention_fn(sa)(
        sa, q, key, value, _query_rows(attention_mask, positions),
        dropout=sa.dropout.p if sa.training else 0.0, scaling=sa.scaling,
    )
    attended = layer.attention.output(out.reshape(b, k, -1), picked)
    return layer.output(layer.intermediate(attended), attended)


def _decoder_layer(layer, hidden: torch.Tensor, attention_mask, positions: torch.Tensor, position_embeddings) -> torch.Tensor:
    sa = layer.self_attn
    rope = sys.modules[type(sa).__module__].apply_rotary_pos_emb
    b, length, _ = hidden.shape
    k = positions.shape[1]
    residual = _gather(hidden, positions)
    normed = layer.input_layernorm(hidden)
    picked = _gather(normed, positions)
    q = sa.q_proj(picked).view(b, k, -1, sa.head_dim)
    key = sa.k_proj(normed).view(b, length, -1, sa.head_dim)
    if hasattr(sa, "q_norm"):
        q, key = sa.q_norm(q), sa.k_norm(key)
    q, key = q.transpose(1, 2), key.transpose(1, 2)
    value = sa.v_proj(normed).view(b, length, -1, sa.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = rope(q, q, _gather(cos, positions), _gather(sin, positions))
    _, key = rope(key, key, cos, sin)
    kernel = sa.config._attn_implementation
    mask = _query_rows(attention_mask, positions)
    if mask is None:
        mask = _causal_rows(positions, length, q.dtype, kernel)
    out, _ = _attention_fn(sa)(
        sa, q, key, value, mask, dropout=sa.attention_dropout if sa.training else 0.0, scaling=sa.scaling,
    )
    attended = residual + sa.o_proj(out.reshape(b, k, -1))
    return attended + layer.mlp(layer.post_attention_layernorm(attended))


def _reduced_ok(layer, family: str, attention_mask) -> bool:
    sa = layer.attention.self if family == "encoder" else layer.self_attn
    if sa.config._attn_implementation not in families.MASK_KERNELS:
        return False
    if family == "encoder":
        return not getattr(layer, "chunk_size_feed_forward", 0)
    # A sliding window lives in the mask transformers builds; without one, run the layer in full.
    return attention_mask is not None or getattr(sa, "sliding_window", None) is None


def _forward(self, hidden_states: torch.Tensor, *args, family: str, **kwargs) -> torch.Tensor:
    positions = kwargs.pop(READ_POSITIONS, None)
    full = type(self).forward  # the class's forward, with transformers' gradient checkpointing
    if positions is None:
        return full(self, hidden_states, *args, **kwargs)
    mask = args[0] if args else kwargs.get("attention_mask")
    if not _reduced_ok(self, family, mask):
        return _gather(full(self, hidden_states, *args, **kwargs), positions)
    if family == "encoder":
        fn = partial(_encoder_layer, self, attention_mask=mask, positions=positions)
    else:
        fn = partial(_decoder_layer, self, attention_mask=mask, positions=positions,
                     position_embeddings=kwargs["position_embeddings"])
    if getattr(self, "gradient_checkpointing", False) and self.training:
        return self._gradient_checkpointing_func(fn, hidden_states)
    return fn(hidden_states)
