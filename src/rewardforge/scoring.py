"""Score texts with an exported reward model.

Example:
    >>> scorer = rewardforge.load("runs/quickstart/model")                 # doctest: +SKIP
    >>> scorer.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])  # doctest: +SKIP
    array([1.93], dtype=float32)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rewardforge.data.batching import pad_sequences
from rewardforge.data.formats import Conversation
from rewardforge.data.inputs import ModelInputs
from rewardforge.export.model_dir import load_reward_model
from rewardforge.losses import combine
from rewardforge.models.reward_model import RewardModel


@dataclass
class Scores:
    """Scores of n inputs, in input order.

    Attributes:
        reward: combined raw reward ``[n]``; of an ensemble, the members' mean minus the scorer's
            ``uncertainty_penalty`` times their standard deviation (:func:`rewardforge.ensemble.summarize`).
        normalized: ``(reward - mean) / std`` with the statistics stored at export ``[n]``.
        outputs: every model output ``[n, N]`` (one per attribute for regression models); of an ensemble, the
            members' mean of each output.
        num_tokens: tokens fed to the model per input ``[n]``.
        truncated: whether each input was truncated to ``max_length`` ``[n]``.
        texts: the text the model read (rendered with the template; for truncated inputs only the part kept,
            so ``tokenizer(text)`` gives the ids scored).
        ids: the token ids the model read.
    """

    reward: np.ndarray
    normalized: np.ndarray
    outputs: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray
    texts: list[str]
    ids: list[np.ndarray] | None = None
    mean: np.ndarray | None = None  # ensembles: the members' mean reward [n] (reward without the penalty)
    std: np.ndarray | None = None  # ensembles: the members' standard deviation [n] (ddof=0)
    members: np.ndarray | None = None  # ensembles: every member's combined reward [n, K]


class RewardScorer:
    """Batched scoring with an exported reward model (see :func:`load`)."""

    def __init__(self, model: RewardModel, tokenizer, meta: dict[str, Any], *, device: str | torch.device = "cpu", batch_size: int = 16,
                 uncertainty_penalty: float = 0.0):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = torch.device(device)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.batch_size = batch_size
        self.attributes: list[str] = list(meta.get("attributes") or ["reward"])
        self.weights = np.asarray(meta.get("attribute_weights") or [1.0], np.float64)
        self.max_length: int = int(meta["max_length"])
        self.truncation: str = meta.get("truncation", "prompt_left")
        # an ensemble (rewardforge.ensemble): its members, and the reward mean - penalty * std
        self.ensemble_size: int = int((meta.get("ensemble") or {}).get("size", 1))
        if not uncertainty_penalty >= 0:
            raise ValueError(f"uncertainty_penalty must be a number >= 0, got {uncertainty_penalty}")
        if uncertainty_penalty and self.ensemble_size == 1:
            from rewardforge.errors import ModelError

            raise ModelError(f"an uncertainty penalty ({uncertainty_penalty}) needs an ensemble, and this model has one "
                             "member (train with model.ensemble_size=K > 1); drop the penalty")
        self.uncertainty_penalty = float(uncertainty_penalty)
        # what the model reads: the one path from items to ids (rewardforge.data.inputs)
        self.inputs = ModelInputs(tokenizer, self.max_length, self.truncation)
        self.renderer = self.inputs.renderer

    # --------------------------------------------------------- rendering

    def render(self, prompt: Conversation, response: Conversation) -> tuple[str, int]:
        """The exact text for (prompt, response) and where the response starts.

        ``prompt`` is a string (one user turn) or a list of messages; ``response`` a string (one
        assistant turn) or messages. Use :meth:`score_texts` for text that is already templated.
        """
        return self.inputs.render(prompt, response)

    def render_messages(self, messages: list[dict]) -> tuple[str, int]:
        """Render a whole conversation whose last message is the assistant response being scored."""
        return self.inputs.render_messages(messages)

    # --------------------------------------------------------- scoring

    @torch.no_grad()
    def score_rendered(self, texts: Sequence[str], response_starts: Sequence[int] | None = None) -> Scores:
        """Score exact texts. ``response_starts`` marks where each response begins (for truncation);
        by default the whole text counts as prompt, so truncation keeps its end."""
        texts = list(texts)
        starts = [len(t) for t in texts] if response_starts is None else list(response_starts)
        ids, full = self.inputs.encode(texts, starts)
        return self.score_ids(ids, full, [self.inputs.read_text(t, s) if f > len(x) else t
                                          for t, s, f, x in zip(texts, starts, full, ids)])

    @torch.no_grad()
    def score_ids(self, ids: Sequence[np.ndarray], full_lengths: Sequence[int] | None = None,
                  texts: Sequence[str] | None = None) -> Scores:
        """Score token ids exactly as given (already in the model's format and within max_length)."""
        ids = list(ids)
        n = len(ids)
        full = np.asarray([len(x) for x in ids] if full_lengths is None else full_lengths, np.int64)
        outputs = np.zeros((n, self.model.num_outputs), np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # similar lengths together: little padding
        for s in range(0, n, self.batch_size):
            idx = order[s : s + self.batch_size]
            input_ids, mask = pad_sequences([ids[i] for i in idx], self.tokenizer.pad_token_id)
            out = self.model(input_ids.to(self.device), mask.to(self.device))
            outputs[idx] = out.float().cpu().numpy()
        ens = None
        if self.ensemble_size > 1:
            from rewardforge.ensemble import summarize

            ens = summarize(outputs, self.weights, self.ensemble_size, self.uncertainty_penalty)
            reward, outputs = ens.reward, ens.outputs.astype(np.float32)
        else:
            reward = combine(outputs, self.weights)
        mean, std = float(self.meta.get("reward_mean", 0.0)), float(self.meta.get("reward_std", 1.0)) or 1.0
        num_tokens = np.array([len(x) for x in ids], np.int64)
        scores = Scores(reward.astype(np.float32), ((reward - mean) / std).astype(np.float32), outputs, num_tokens,
                        full > num_tokens, list(texts) if texts is not None else [None] * n, ids)
        if ens is not None:
            scores.mean, scores.std, scores.members = ens.mean.astype(np.float32), ens.std.astype(np.float32), ens.members.astype(np.float32)
        return scores

    def score_items(self, items: Sequence[dict[str, Any]], *, normalize: bool = True,
                    where: Sequence[str] | None = None) -> Scores:
        """Score items of every form the server takes (``{"prompt", "response"}``, ``{"messages"}``, ``{"text"}``,
        ``{"input_ids"}``) through the same path as ``rewardforge serve`` (:class:`~rewardforge.data.inputs.ModelInputs`);
        text and token ids are normalised to the model's input format unless ``normalize=False``."""
        p = self.inputs.prepare(list(items), normalize=normalize, where=where)
        texts = [self.inputs.read_text(t, s) if (t is not None and tr) else t for t, s, tr in zip(p.texts, p.starts, p.truncated)]
        return self.score_ids(p.seqs, p.full_lengths, texts)

    def score_texts(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """Rewards of texts already in the model's format (with or without its special tokens: normalised)."""
        return self.score_items([{"text": t} for t in texts], normalize=normalize).reward

    def score_detailed(self, prompts: Sequence[Conversation], responses: Sequence[Conversation]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        rendered = [self.render(p, r) for p, r in zip(prompts, responses)]
        return self.score_rendered([t for t, _ in rendered], [s for _, s in rendered])

    def score(self, prompts: Sequence[Conversation], responses: Sequence[Conversation]) -> np.ndarray:
        """Raw combined rewards of each (prompt, response)."""
        return self.score_detailed(prompts, responses).reward

    def score_pairs(self, prompts: Sequence[Conversation], chosen: Sequence[Conversation], rejected: Sequence[Conversation]) -> tuple[np.ndarray, np.ndarray]:
        """Rewards of both sides of each pair, scored in one batched pass."""
        n = len(prompts)
        if not (len(chosen) == len(rejected) == n):
            raise ValueError(f"got {n} prompts, {len(chosen)} chosen and {len(rejected)} rejected; they must match")
        r = self.score(list(prompts) * 2, list(chosen) + list(rejected))
        return r[:n], r[n:]


def load(model_dir: str | Path, *, device: str | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 16,
         uncertainty_penalty: float = 0.0) -> RewardScorer:
    """Load an exported reward model directory as a :class:`RewardScorer`.

    ``uncertainty_penalty``: for an ensemble, the reward is ``mean - uncertainty_penalty * std`` of its members.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, meta = load_reward_model(model_dir, dtype=dtype)
    scorer = RewardScorer(model, tok, meta, device=device, batch_size=batch_size, uncertainty_penalty=uncertainty_penalty)
    scorer.model_dir = Path(meta.get("_dir", model_dir))  # where the export's other files are (training_prompts.json)
    return scorer
