"""From request items to rewards: rendering and tokenization (before queuing), limits, combination.

Text goes through the core scorer's own :meth:`~rewardforge.scoring.RewardScorer.render` /
``render_messages`` and :func:`~rewardforge.data.tokenize.tokenize_texts` with the exported
``max_length`` and truncation, so served scores equal ``RewardScorer.score_rendered``'s.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rewardforge.data.inputs import ChatFormat, ModelInputs, Prepared
from rewardforge.data.readers import DataError
from rewardforge.losses import combine
from rewardforge.serve.batcher import DynamicBatcher
from rewardforge.serve.config import ServeConfig

# Requests with more text than this are tokenized on a helper thread instead of the event loop.
INLINE_TOKENIZE_CHARS = 32_000


class ServeError(Exception):
    """An error answered to the client: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, reason: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers or {}, reason


async def unless_disconnected(receive, aw):
    """Await ``aw`` (the scoring of a request whose body has been read) unless the client disconnects first.

    ``receive`` is the request's ASGI receive: once the body is in, its next message is
    ``http.disconnect``. On a disconnect ``aw`` is cancelled, so the request's sequences still
    queued are skipped rather than scored for nobody, and starlette's ``ClientDisconnect`` is raised.
    """
    from starlette.requests import ClientDisconnect

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    if watch.cancelled() or watch.exception() is not None:  # cannot tell: just wait for the result
        return await task
    task.cancel()
    raise ClientDisconnect()


@dataclass
class Scored:
    reward: np.ndarray  # raw combined reward [n]
    normalized: np.ndarray  # (reward - mean) / std [n]
    outputs: np.ndarray  # every model output [n, N] (an ensemble's: the members' mean)
    prepared: Prepared
    mean: np.ndarray | None = None  # ensembles: the members' mean reward [n]
    std: np.ndarray | None = None  # ensembles: their standard deviation [n]
    members: np.ndarray | None = None  # ensembles: each member's reward [n, K]


class ScoringService:
    """Everything the endpoints share: the scorer, the batcher and the limits."""

    def __init__(self, scorer, config: ServeConfig, batcher: DynamicBatcher):
        self.scorer, self.config, self.batcher = scorer, config, batcher
        self.tokenizer = scorer.tokenizer
        self.attributes: list[str] = list(scorer.attributes)
        self.weights = np.asarray(scorer.weights, np.float64)
        self.ensemble_size = int(getattr(scorer, "ensemble_size", 1))
        if config.uncertainty_penalty and self.ensemble_size == 1:
            from rewardforge.errors import ModelError

            raise ModelError(f"--uncertainty-penalty {config.uncertainty_penalty} needs an ensemble, and this model has "
                             "one member (rewardforge.json has no 'ensemble'; train with model.ensemble_size=K > 1); "
                             "drop --uncertainty-penalty")
        self.mean = float(scorer.meta.get("reward_mean", 0.0))
        self.std = float(scorer.meta.get("reward_std", 1.0)) or 1.0
        self.max_length = int(scorer.max_length)
        self.vocab_size = int(scorer.model.hf.get_input_embeddings().num_embeddings)
        self.pad_token: str | None = self.tokenizer.pad_token
        self.inputs: ModelInputs = scorer.inputs
        if config.policy_tokenizer:
            self.inputs = ModelInputs(self.tokenizer, scorer.max_length, scorer.truncation,
                                      policy=ChatFormat.learn(_load_tokenizer(config.policy_tokenizer)))
        self.on_normalized = lambda counts: None  # set by the app: counts go to /metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardforge-tokenize")

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------ limits

    def check_count(self, n: int, field: str = "items") -> None:
        if n == 0:
            raise ServeError(422, f"{field} is empty; send at least one item", reason="empty")
        limit = self.config.max_items_per_request
        if n > limit:
            raise ServeError(
                413, f"{field} has {n} entries; the limit is max_items_per_request={limit} (--max-items-per-request)",
                reason="too_many_items",
            )

    def _too_long(self, where: str, n: int) -> ServeError:
        limit = self.config.max_item_tokens
        return ServeError(
            413, f"{where} has {n} tokens; the limit is max_item_tokens={limit} (--max-item-tokens)", reason="too_many_tokens"
        )

    # ------------------------------------------------------------ preparation

    def check_ids(self, ids: Sequence[int] | np.ndarray, where: str) -> np.ndarray:
        """Token ids of the model's vocabulary; at most max_item_tokens (longer than max_length: truncated)."""
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            raise ServeError(422, f"{where}: token ids must be integers that fit in 64 bits") from None
        if arr.ndim != 1 or arr.size == 0:
            raise ServeError(422, f"{where}: token ids must be a non-empty list of integers")
        if arr.size > self.config.max_item_tokens:
            raise self._too_long(where, int(arr.size))
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ServeError(422, f"{where}: token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        return arr

    def _prepare_sync(self, items: list[dict[str, Any]], field: str, normalize: bool) -> Prepared:
        try:
            prepared = self.inputs.prepare(items, field, normalize=normalize, check_ids=self.check_ids)
        except DataError as e:
            raise ServeError(422, str(e)) from None
        for i, n in enumerate(prepared.full_lengths):
            if n > self.config.max_item_tokens:
                raise self._too_long(f"{field}[{i}]", int(n))
        self.on_normalized(prepared.counts())
        return prepared

    async def prepare(self, items: list[dict[str, Any]], field: str = "items", normalize: bool | None = None) -> Prepared:
        """Items -> model inputs (:meth:`rewardforge.data.inputs.ModelInputs.prepare`), on the event loop or on a
        helper thread when the request is large. ``normalize``: None = the server's --normalize-inputs."""
        normalize = self.config.normalize_inputs if normalize is None else bool(normalize)
        if not items:
            return Prepared([], np.zeros(0, np.int64), np.zeros(0, bool), [], [], [], np.zeros(0, np.int64))
        self.check_count(len(items), field)
        chars = 0
        for item in items:
            for key in ("text", "prompt", "response", "messages"):
                v = item.get(key)
                if isinstance(v, str):
                    chars += len(v)
                elif isinstance(v, list):
                    chars += sum(len(m.get("content") or "") if isinstance(m, dict) else 0 for m in v)
        if chars <= INLINE_TOKENIZE_CHARS:
            return self._prepare_sync(items, field, normalize)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._prepare_sync, items, field, normalize)

    # ------------------------------------------------------------ scoring

    def combine(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw combined reward, normalized reward), exactly as ``RewardScorer.score_rendered``."""
        reward = combine(outputs, self.weights)
        return reward.astype(np.float32), ((reward - self.mean) / self.std).astype(np.float32)

    def summarize(self, outputs: np.ndarray):
        """An ensemble's reward (mean - --uncertainty-penalty x std), mean, std and members, exactly as
        ``RewardScorer.score_ids`` with the same penalty (:func:`rewardforge.ensemble.summarize`)."""
        from rewardforge.ensemble import summarize

        return summarize(outputs, self.weights, self.ensemble_size, self.config.uncertainty_penalty)

    async def score(self, prepared: Prepared, ticket=None) -> Scored:
        if not prepared.seqs:
            empty = np.zeros(0, np.float32)
            width = self.scorer.model.num_outputs // self.ensemble_size
            if self.ensemble_size > 1:
                return Scored(empty, empty, np.zeros((0, width), np.float32), prepared, empty, empty,
                              np.zeros((0, self.ensemble_size), np.float32))
            return Scored(empty, empty, np.zeros((0, width), np.float32), prepared)
        outputs = await self.batcher.submit(prepared.seqs, ticket)
        if self.ensemble_size > 1:
            e = self.summarize(outputs)
            f32 = lambda x: x.astype(np.float32)  # noqa: E731
            return Scored(f32(e.reward), f32((e.reward - self.mean) / self.std), f32(e.outputs), prepared,
                          f32(e.mean), f32(e.std), f32(e.members))
        reward, normalized = self.combine(outputs)
        return Scored(reward, normalized, outputs, prepared)

    def compat(self, scored: Scored) -> np.ndarray:
        """The single reward the OpenRLHF and Triton endpoints return (``compat_reward``)."""
        return scored.normalized if self.config.compat_reward == "normalized" else scored.reward

    def read_text(self, prepared: Prepared, i: int) -> str | None:
        """The text item ``i`` became and the model read (only the kept part when it was truncated)."""
        t = prepared.texts[i]
        if t is None or not prepared.truncated[i]:
            return t
        return self.inputs.read_text(t, prepared.starts[i])


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for a directory without a tokenizer
        raise DataError(f"policy_tokenizer={path!r} holds no tokenizer that transformers can load "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give the policy's tokenizer "
                        "directory") from None
