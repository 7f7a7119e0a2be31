"""Reward functions for TRL's ``GRPOTrainer`` that call a running ``rewardforge serve``.

    from trl import GRPOConfig, GRPOTrainer
    from rewardforge.integrations.trl import RewardForgeReward

    reward = RewardForgeReward("http://127.0.0.1:8000")            # or AsyncRewardForgeReward(...)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=ds)

TRL calls a custom reward function as ``func(prompts=..., completions=..., completion_ids=...,
**reward_kwargs)`` (the dataset's other columns plus ``trainer_state``, ``log_extra``,
``log_metric``) and expects one float per completion; an ``async def __call__`` is awaited on the
trainer's event loop (``trl.trainer.utils.is_async_callable``). The function's name in TRL's logs
(``rewards/<name>/mean``) is its ``__name__``: ``"rewardforge"`` by default, ``name=`` to change it.

Inputs: conversational prompts/completions (lists of ``{"role", "content"}``) are scored as one
conversation, ``prompt + completion``, whose last message is the completion; plain strings are sent
as ``{"prompt", "response"}`` and rendered by the server with the reward model's template
(``strings="pair"``), or as ``{"text": prompt + completion}`` verbatim (``strings="text"``, for
strings already in the reward model's format). TRL itself applies no chat template to plain-string
prompts, so the policy sees them raw: prefer a conversational dataset.

Errors: an unreachable server, a refused API key, a too-large request, a queue that stays full
after ``retries`` or rejected inputs raise :class:`RewardFunctionError`, one line naming the
problem and the fix. With ``log_truncation`` the share of inputs the server truncated to the
model's ``max_length`` is logged through TRL's ``log_metric`` as ``<name>/truncated_frac``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any, Sequence

from rewardforge.serve.client import AsyncRewardClient, RewardClient, RewardServerError, ScoreResult
from rewardforge.integrations import RewardFunctionError, explain, make_items, pick_rewards, resolve_url

__all__ = ["RewardForgeReward", "AsyncRewardForgeReward", "RewardFunctionError"]


class _RewardFunction:
    def __init__(self, url: str | None = None, *, normalized: bool = False, attribute: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0, retries: int = 8, chunk_size: int = 256,
                 strings: str = "pair", log_truncation: bool = True, name: str | None = None):
        if normalized and attribute is not None:
            raise ValueError("normalized=True applies to the combined reward; pass either normalized or attribute")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        make_items([], [], strings=strings)  # validates `strings`
        self.url = resolve_url(url)
        self.normalized, self.attribute = normalized, attribute
        self.api_key, self.timeout, self.retries, self.chunk_size = api_key, timeout, retries, chunk_size
        self.strings, self.log_truncation = strings, log_truncation
        self.__name__ = name or ("rewardforge" if attribute is None else f"rewardforge_{attribute}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, name={self.__name__!r})"

    def _client_kwargs(self) -> dict[str, Any]:
        return {"api_key": self.api_key, "timeout": self.timeout, "chunk_size": self.chunk_size, "retries": self.retries}

    def _error(self, err: RewardServerError) -> RewardFunctionError:
        return explain(err, who=f"reward function {self.__name__!r}", url=self.url,
                       chunk_size=self.chunk_size, retries=self.retries)

    def _finish(self, results: Sequence[ScoreResult], n: int, kwargs: dict[str, Any]) -> list[float]:
        if len(results) != n:
            raise RewardFunctionError(0, "wrong count", f"reward function {self.__name__!r}: the server at {self.url} "
                                      f"returned {len(results)} results for {n} inputs; check that url points at rewardforge serve")
        rewards = pick_rewards(results, normalized=self.normalized, attribute=self.attribute,
                               who=f"reward function {self.__name__!r}")
        log_metric = kwargs.get("log_metric")
        if self.log_truncation and callable(log_metric) and results:
            log_metric(f"{self.__name__}/truncated_frac", sum(r.truncated for r in results) / len(results))
        return rewards


class RewardForgeReward(_RewardFunction):
    """A synchronous TRL reward function: ``RewardForgeReward(url)(prompts=..., completions=...)``.

    Args:
        url: the server, e.g. ``http://10.0.0.5:8000`` (default: ``$REWARDFORGE_URL``, else
            ``http://127.0.0.1:8000``).
        normalized: return ``(reward - mean) / std`` with the statistics stored at export.
        attribute: for regression models, return this attribute instead of the weighted combination
            (one function per attribute gives TRL one logged reward each).
        api_key: bearer token (default: ``$REWARDFORGE_API_KEY``).
        timeout: seconds per HTTP request.
        retries: how many times a 503 (queue full) is retried, after the server's ``Retry-After``.
        chunk_size: completions per request; keep it at or under the server's ``--max-items-per-request``.
        strings: how plain-string pairs are sent: ``"pair"`` (templated by the server) or ``"text"`` (verbatim).
        log_truncation: log the share of truncated inputs through TRL's ``log_metric``.
        name: the ``__name__`` TRL logs the reward under.
    """

    def __init__(self, url: str | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._client: RewardClient | None = None
        self._pid = None
        self._lock = threading.Lock()

    def _get_client(self) -> RewardClient:
        with self._lock:
            if self._client is None or self._pid != os.getpid():  # a forked worker gets its own connections
                self._client = RewardClient(self.url, **self._client_kwargs())
                self._pid = os.getpid()
            return self._client

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        items = make_items(prompts, completions, strings=self.strings)
        if not items:
            return []
        try:
            results = self._get_client().score_items(items)
        except RewardServerError as e:
            raise self._error(e) from None
        return self._finish(results, len(items), kwargs)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[float]:
        return self.score(prompts, completions, **kwargs)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None

    def __enter__(self) -> "RewardForgeReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable: connections are per process
        state = self.__dict__.copy()
        state.update(_client=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class AsyncRewardForgeReward(_RewardFunction):
    """The asyncio version of :class:`RewardForgeReward` (same arguments, plus ``max_concurrency``:
    chunks in flight at once). TRL awaits it on its own event loop, alongside other async reward
    functions; one HTTP client is kept per event loop."""

    def __init__(self, url: str | None = None, *, max_concurrency: int = 8, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.max_concurrency = max_concurrency
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRewardClient]" = weakref.WeakKeyDictionary()

    def _get_client(self) -> AsyncRewardClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = AsyncRewardClient(self.url, max_concurrency=self.max_concurrency, **self._client_kwargs())
            self._clients[loop] = client
        return client

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        items = make_items(prompts, completions, strings=self.strings)
        if not items:
            return []
        try:
            results = await self._get_client().score_items(items)
        except RewardServerError as e:
            raise self._error(e) from None
        return self._finish(results, len(items), kwargs)

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **kwargs: Any) -> list[float]:
        return await self.score(prompts, completions, **kwargs)

    async def aclose(self) -> None:
        """Close the client of the running event loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_clients"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clients = weakref.WeakKeyDictionary()
