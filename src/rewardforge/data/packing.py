"""Shared-prompt packing (``train.share_prompt``): both responses of a pair in one row, the prompt once.

The chosen and rejected token sequences of a pair start with the same tokens (the prompt as
tokenized, possibly a few tokens less where BPE merges across the prompt/response boundary). With
causal attention the hidden states of that common prefix are the same in both sequences, so it is
computed once::

    row  = [prefix (P) | chosen suffix (C) | rejected suffix (R) | padding]
    pos  = [0 .. P-1   | P .. P+C-1        | P .. P+R-1          | 0 ...  ]
    mask : a token attends causally to the prefix and to earlier tokens of its own branch only
           (rejected never sees chosen); padding attends only to itself and nothing attends to it.

The reward of each side is read at the last token of its branch (``reward_positions [B, 2]``), and
:class:`rewardforge.models.RewardModel` returns the usual ``[2B, N]`` outputs, chosen rows first, so
losses are unchanged. Decoders (``last_token`` pooling) with sdpa or eager attention only.

The same holds for K branches (:func:`pack_branches`, :class:`PackedListCollator`): the K responses of
a list share the tokens common to all of them, computed once, and each branch sees only that prefix
and itself::

    row  = [prefix (P) | suffix 0 | suffix 1 | ... | suffix K-1 | padding]      segments 0, 1, 2, ..., K

``reward_positions [B, K_max]`` (lists shorter than ``K_max`` repeat position 0 there), outputs
``[K_max * B, N]`` branch-major (row ``j * B + b`` is response ``j`` of list ``b``) and
``list_index`` says which rows are real (-1: padding branch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rewardforge.data.formats import common_prefix_length
from rewardforge.models.families import MASK_KERNELS as ATTN_IMPLEMENTATIONS

# Batch keys (besides input_ids / attention_mask) that RewardModel.forward takes as keywords.
MODEL_KEYS = ("position_ids", "reward_positions", "attn_mask_4d")


def pack_branches(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One packed row of K sequences: (ids, position_ids, segment [0 prefix, 1..K branches], last position of each).

    The prefix is the tokens all K share, capped so each branch keeps at least one token of its own
    (its reward token); every sequence needs at least one token.

    Example:
        >>> ids, pos, seg, ends = pack_branches([np.array([1, 2, 3]), np.array([1, 2, 4, 5]), np.array([1, 6])])
        >>> ids.tolist(), pos.tolist(), seg.tolist(), ends
        ([1, 2, 3, 2, 4, 5, 6], [0, 1, 2, 1, 2, 3, 1], [0, 1, 1, 2, 2, 2, 3], [2, 5, 6])
    """
    if any(len(s) == 0 for s in seqs):
        raise ValueError("a sequence with no tokens cannot be packed")
    p = min([len(s) - 1 for s in seqs] + [common_prefix_length(seqs[0], s) for s in seqs[1:]])
    ids, pos, seg, ends = [np.asarray(seqs[0][:p])], [np.arange(p)], [np.zeros(p)], []
    at = p
    for j, s in enumerate(seqs):
        n = len(s) - p
        ids.append(np.asarray(s[p:])), pos.append(np.arange(p, p + n)), seg.append(np.full(n, j + 1))
        at += n
        ends.append(at - 1)
    cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    return cat(ids), cat(pos), cat(seg), ends


def pack_pair(chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """One packed row: (ids, position_ids, segment [0 prefix, 1 chosen, 2 rejected], chosen_pos, rejected_pos).

    :func:`pack_branches` of the two sides; pairs need at least one token per side.
    """
    if len(chosen) == 0 or len(rejected) == 0:
        raise ValueError("a pair with an empty side cannot be packed")
    ids, pos, seg, (c_end, r_end) = pack_branches([chosen, rejected])
    return ids, pos, seg, c_end, r_end


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask (True = may attend) from segment ids ``[B, L]`` (-1 = padding)."""
    length = segments.shape[-1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)  # padding rows are never empty
    return allowed[:, None]


class PackedPairCollator:
    """Collate pairs into one packed row each (see the module docstring).

    Keys: ``input_ids [B, L]``, ``attention_mask [B, L]`` (1 on real tokens), ``position_ids``,
    ``attn_mask_4d [B, 1, L, L]`` (bool), ``reward_positions [B, 2]`` (chosen, rejected),
    ``margin``, ``index``, and ``tokens_plain`` / ``tokens_packed`` (real tokens without / with sharing).
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [pack_pair(np.asarray(it["chosen"]), np.asarray(it["rejected"])) for it in items]
        longest = max(len(r[0]) for r in rows)
        b = len(rows)
        ids = np.full((b, longest), self.pad_id, dtype=np.int64)
        pos = np.zeros((b, longest), dtype=np.int64)
        seg = np.full((b, longest), -1, dtype=np.int64)
        for i, (row_ids, row_pos, row_seg, _, _) in enumerate(rows):
            n = len(row_ids)
            ids[i, :n], pos[i, :n], seg[i, :n] = row_ids, row_pos, row_seg
        segments = torch.from_numpy(seg)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": (segments >= 0).to(torch.int64),
            "position_ids": torch.from_numpy(pos),
            "attn_mask_4d": packed_mask(segments),
            "reward_positions": torch.tensor([[r[3], r[4]] for r in rows], dtype=torch.int64),
            "margin": torch.tensor([it["margin"] for it in items], dtype=torch.float32),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "tokens_plain": torch.tensor(sum(len(it["chosen"]) + len(it["rejected"]) for it in items), dtype=torch.int64),
            "tokens_packed": torch.tensor(sum(len(r[0]) for r in rows), dtype=torch.int64),
        }


def _pad_rows(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(r[0]) for r in rows)
    b = len(rows)
    ids = np.full((b, longest), pad_id, dtype=np.int64)
    pos = np.zeros((b, longest), dtype=np.int64)
    seg = np.full((b, longest), -1, dtype=np.int64)
    for i, (row_ids, row_pos, row_seg) in enumerate(r[:3] for r in rows):
        n = len(row_ids)
        ids[i, :n], pos[i, :n], seg[i, :n] = row_ids, row_pos, row_seg
    segments = torch.from_numpy(seg)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": (segments >= 0).to(torch.int64),
            "position_ids": torch.from_numpy(pos), "attn_mask_4d": packed_mask(segments)}


class PackedListCollator:
    """Collate lists of K responses into one packed row each, the shared prompt once (module docstring).

    Keys: those of :class:`PackedPairCollator` with ``reward_positions [B, K_max]``, and the list keys of
    :func:`rewardforge.data.lists.list_keys` laid out branch-major like the outputs: ``list_index``
    (-1 on padding branches), ``scores``, ``row_index`` ``[K_max * B]``, ``index [B]``.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [pack_branches([np.asarray(s) for s in it["responses"]]) for it in items]
        b, k = len(items), max(len(it["responses"]) for it in items)
        ends = np.zeros((b, k), dtype=np.int64)
        li = np.full((k, b), -1, dtype=np.int64)
        scores = np.full((k, b), np.nan, dtype=np.float32)
        row_index = np.full((k, b), -1, dtype=np.int64)
        for i, (it, r) in enumerate(zip(items, rows)):
            n = len(it["responses"])
            ends[i, :n] = r[3]
            li[:n, i], scores[:n, i] = i, np.asarray(it["scores"], np.float32)
            row_index[:n, i] = it["row_start"] + np.arange(n)
        return {
            **_pad_rows(rows, self.pad_id),
            "reward_positions": torch.from_numpy(ends),
            "list_index": torch.from_numpy(li.reshape(-1)),
            "scores": torch.from_numpy(scores.reshape(-1)),
            "row_index": torch.from_numpy(row_index.reshape(-1)),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "tokens_plain": torch.tensor(sum(len(s) for it in items for s in it["responses"]), dtype=torch.int64),
            "tokens_packed": torch.tensor(sum(len(r[0]) for r in rows), dtype=torch.int64),
        }


def model_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed-batch keys RewardModel.forward takes (empty for a plain batch)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def check_share_prompt(model) -> None:
    """Raise ConfigError unless ``model`` (a RewardModel) can run packed pairs."""
    from rewardforge.errors import ConfigError

    if model.pooling != "last_token":
        raise ConfigError("train.share_prompt=true needs a decoder backbone (pooling last_token); "
                          f"this model uses pooling {model.pooling!r}: set train.share_prompt=false")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"train.share_prompt=true needs sdpa, eager or rf_eager attention (a custom 4D mask); this model uses "
                          f"{impl!r}: set train.share_prompt=false")
