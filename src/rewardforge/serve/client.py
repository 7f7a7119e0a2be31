"""Clients for ``rewardforge serve``'s native endpoint, synchronous and asyncio, on httpx.

Example:
    >>> from rewardforge.serve.client import RewardClient
    >>> with RewardClient("http://127.0.0.1:8000") as client:               # doctest: +SKIP
    ...     client.score(["How do I boil an egg?"], ["Boil it for 8 minutes."])
    [1.93]

Large inputs are sent in chunks of ``chunk_size`` items (concurrently in the async client); results
always come back in input order. A 503 (queue full) is retried after the server's ``Retry-After``,
up to ``retries`` times; every other error raises :class:`RewardServerError`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import httpx

from rewardforge.serve.config import API_KEY_ENV

Conversation = Any  # a string or a list of {"role", "content"} messages


class RewardServerError(Exception):
    """The server answered with an error (``status``, ``message``) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message = status, message


@dataclass
class ScoreResult:
    """One item's score, as returned by ``POST /v1/score``."""

    reward: float
    reward_normalized: float
    num_tokens: int
    truncated: bool
    attributes: dict[str, float] | None = None
    text: str | None = None
    # ensembles (model.ensemble_size=K): the members' mean and standard deviation, and each member's reward
    # (``reward`` is ``reward_mean - uncertainty_penalty x reward_std``); None for a single model
    reward_mean: float | None = None
    reward_std: float | None = None
    members: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ScoreResult":
        known = {"reward", "reward_normalized", "num_tokens", "truncated", "attributes", "text", "reward_mean",
                 "reward_std", "members"}
        opt = lambda k: None if d.get(k) is None else float(d[k])  # noqa: E731
        return cls(
            reward=float(d["reward"]), reward_normalized=float(d["reward_normalized"]),
            num_tokens=int(d["num_tokens"]), truncated=bool(d["truncated"]),
            attributes=d.get("attributes"), text=d.get("text"),
            reward_mean=opt("reward_mean"), reward_std=opt("reward_std"),
            members=None if d.get("members") is None else [float(v) for v in d["members"]],
            extra={k: v for k, v in d.items() if k not in known},
        )


def pair_items(prompts: Sequence[Conversation], responses: Sequence[Conversation]) -> list[dict[str, Any]]:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


def _score_body(items: list, return_text: bool, normalize: bool | None) -> dict[str, Any]:
    """The /v1/score body; ``normalize`` None leaves the server's --normalize-inputs in charge."""
    body: dict[str, Any] = {"items": items, "return_text": return_text}
    if normalize is not None:
        body["normalize"] = normalize
    return body


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error(resp: httpx.Response) -> RewardServerError:
    try:
        message = resp.json().get("error") or resp.text
    except Exception:  # noqa: BLE001 - not JSON
        message = resp.text
    return RewardServerError(resp.status_code, str(message))


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    try:
        return max(0.05, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return min(5.0, 0.1 * 2**attempt)


class _Base:
    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, chunk_size: int, retries: int):
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.headers = _headers(api_key)
        self.timeout, self.chunk_size, self.retries = timeout, chunk_size, retries


class RewardClient(_Base):
    """Synchronous client.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: bearer token (default: ``$REWARDFORGE_API_KEY``).
        timeout: seconds per HTTP request.
        chunk_size: items per request (keep it at or under the server's ``--max-items-per-request``).
        retries: how many times a 503 (queue full) is retried.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 chunk_size: int = 256, retries: int = 5):
        super().__init__(base_url, api_key=api_key, timeout=timeout, chunk_size=chunk_size, retries=retries)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.post(path, json=payload)
            except httpx.HTTPError as e:
                raise RewardServerError(0, f"cannot reach {self.base_url}{path}: {e}") from None
            if resp.status_code == 503 and attempt < self.retries:
                time.sleep(_retry_after(resp, attempt))
                continue
            if resp.status_code != 200:
                raise _error(resp)
            return resp.json()
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        """``GET /health``; raises :class:`RewardServerError` when the server is not ready."""
        try:
            resp = self._http.get("/health")
        except httpx.HTTPError as e:
            raise RewardServerError(0, f"cannot reach {self.base_url}/health: {e}") from None
        if resp.status_code != 200:
            raise _error(resp)
        return resp.json()

    def score_items(self, items: Iterable[dict[str, Any]], *, return_text: bool = False,
                    normalize: bool | None = None) -> list[ScoreResult]:
        """Score raw items (``{prompt, response}``, ``{messages}``, ``{text}`` or ``{input_ids}``), in order."""
        out: list[ScoreResult] = []
        for chunk in _chunks(list(items), self.chunk_size):
            if not chunk:
                continue
            body = self._post("/v1/score", _score_body(chunk, return_text, normalize))
            out.extend(ScoreResult.from_json(r) for r in body["results"])
        return out

    def score_detailed(self, prompts: Sequence[Conversation], responses: Sequence[Conversation]) -> list[ScoreResult]:
        return self.score_items(pair_items(prompts, responses))

    def score(self, prompts: Sequence[Conversation], responses: Sequence[Conversation], *, normalized: bool = False) -> list[float]:
        """Rewards of each (prompt, response): raw, or normalized with the exported mean/std."""
        return [r.reward_normalized if normalized else r.reward for r in self.score_detailed(prompts, responses)]

    def score_texts(self, texts: Sequence[str], *, normalized: bool = False) -> list[float]:
        """Rewards of texts already in the model's format."""
        res = self.score_items({"text": t} for t in texts)
        return [r.reward_normalized if normalized else r.reward for r in res]


class AsyncRewardClient(_Base):
    """Asyncio client; the same methods as :class:`RewardClient`, awaited. Chunks go out concurrently
    (at most ``max_concurrency`` at a time)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 chunk_size: int = 256, retries: int = 5, max_concurrency: int = 8):
        super().__init__(base_url, api_key=api_key, timeout=timeout, chunk_size=chunk_size, retries=retries)
        limits = httpx.Limits(max_connections=max(max_concurrency, 1) * 2, max_keepalive_connections=max(max_concurrency, 1))
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout, limits=limits)
        self._sem = asyncio.Semaphore(max(max_concurrency, 1))

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        async with self._sem:
            for attempt in range(self.retries + 1):
                try:
                    resp = await self._http.post(path, json=payload)
                except httpx.HTTPError as e:
                    raise RewardServerError(0, f"cannot reach {self.base_url}{path}: {e}") from None
                if resp.status_code == 503 and attempt < self.retries:
                    await asyncio.sleep(_retry_after(resp, attempt))
                    continue
                if resp.status_code != 200:
                    raise _error(resp)
                return resp.json()
        raise AssertionError("unreachable")

    async def health(self) -> dict[str, Any]:
        try:
            resp = await self._http.get("/health")
        except httpx.HTTPError as e:
            raise RewardServerError(0, f"cannot reach {self.base_url}/health: {e}") from None
        if resp.status_code != 200:
            raise _error(resp)
        return resp.json()

    async def score_items(self, items: Iterable[dict[str, Any]], *, return_text: bool = False,
                          normalize: bool | None = None) -> list[ScoreResult]:
        chunks = [c for c in _chunks(list(items), self.chunk_size) if c]
        bodies = await asyncio.gather(*(self._post("/v1/score", _score_body(c, return_text, normalize)) for c in chunks))
        return [ScoreResult.from_json(r) for b in bodies for r in b["results"]]

    async def score_detailed(self, prompts: Sequence[Conversation], responses: Sequence[Conversation]) -> list[ScoreResult]:
        return await self.score_items(pair_items(prompts, responses))

    async def score(self, prompts: Sequence[Conversation], responses: Sequence[Conversation], *, normalized: bool = False) -> list[float]:
        return [r.reward_normalized if normalized else r.reward for r in await self.score_detailed(prompts, responses)]

    async def score_texts(self, texts: Sequence[str], *, normalized: bool = False) -> list[float]:
        res = await self.score_items({"text": t} for t in texts)
        return [r.reward_normalized if normalized else r.reward for r in res]
