"""verl custom reward functions that call a running ``rewardforge serve``.

verl loads a custom reward function from a file path (``custom_reward_function.path``, imported
with ``importlib``) and a name (``custom_reward_function.name``); point it at this file::

    custom_reward_function.path=$(python -c "import rewardforge.integrations.verl as m; print(m.__file__)")
    custom_reward_function.name=compute_score            # reward_model.reward_manager=naive (default)
    # or: custom_reward_function.name=compute_score_batch reward_model.reward_manager=batch

The server comes from ``$REWARDFORGE_URL`` (default ``http://127.0.0.1:8000``) or from
``custom_reward_function.reward_kwargs.url=...`` (verl passes ``reward_kwargs`` as keyword
arguments); ``normalized``, ``attribute``, ``api_key``, ``timeout``, ``retries``, ``chunk_size`` and
``prompt_key`` can be given the same way (``normalized`` also as ``$REWARDFORGE_NORMALIZED=1``).

What the data must hold: verl passes ``solution_str``, the decoded response only, so **the prompt
must be in each row's ``extra_info``**: ``extra_info["prompt"]`` (or the key ``prompt_key`` names),
either a string (one user turn, rendered with the reward model's template) or a list of chat
messages ``[{"role", "content"}, ...]`` (the response is appended as the assistant turn). When you
build the parquet, copy the row's prompt there, e.g. ``"extra_info": {"prompt": row["prompt"]}``.
``data_source`` and ``ground_truth`` are ignored (verl's naive reward manager still reads
``reward_model.ground_truth`` from every row, so keep that column, even if empty).

The functions return the raw reward (``normalized`` for the export's mean/std normalisation; for
regression models ``attribute`` picks one attribute instead of the weighted combination). One HTTP
client per process and setting is kept at module level and reused; this module pickles (Ray ships
it to workers by value) because the clients are made on first use in each process.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from rewardforge.serve.client import RewardClient, RewardServerError
from rewardforge.integrations import (
    URL_ENV,
    RewardFunctionError,
    _listify,
    explain,
    make_items,
    pick_rewards,
    resolve_url,
)

NORMALIZED_ENV = "REWARDFORGE_NORMALIZED"
PROMPT_KEY = "prompt"

__all__ = ["compute_score", "compute_score_batch", "RewardFunctionError", "URL_ENV", "NORMALIZED_ENV"]


class _Clients:
    """Per-process cache of clients; pickles empty (a connection pool never crosses processes)."""

    def __init__(self) -> None:
        self.clients: dict[tuple, RewardClient] = {}
        self.lock = threading.Lock()

    def get(self, url: str, api_key: str | None, timeout: float, retries: int, chunk_size: int) -> RewardClient:
        key = (os.getpid(), url, api_key, float(timeout), int(retries), int(chunk_size))
        with self.lock:
            client = self.clients.get(key)
            if client is None:
                client = RewardClient(url, api_key=api_key, timeout=float(timeout), retries=int(retries),
                                      chunk_size=int(chunk_size))
                self.clients[key] = client
            return client

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


_CLIENTS = _Clients()


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _prompt_of(extra_info: Any, prompt_key: str, index: int | None) -> Any:
    where = "" if index is None else f" (row {index} of the batch)"
    info = _listify(extra_info)
    if not hasattr(info, "get") or info.get(prompt_key) is None:
        raise RewardFunctionError(
            400, "no prompt",
            f"rewardforge verl reward: extra_info[{prompt_key!r}] is missing{where}; verl passes only the response, so add "
            f"each row's prompt (a string or chat messages) to its extra_info when building the dataset, "
            f"e.g. \"extra_info\": {{\"{prompt_key}\": row[\"prompt\"]}}",
        )
    return _listify(info[prompt_key])


def _score(prompts: Sequence[Any], responses: Sequence[str], *, url: str | None, normalized: Any, attribute: str | None,
           api_key: str | None, timeout: float, retries: int, chunk_size: int) -> list[float]:
    base = resolve_url(url)
    norm = _truthy(os.environ.get(NORMALIZED_ENV, "0")) if normalized is None else _truthy(normalized)
    if norm and attribute is not None:
        raise ValueError("normalized applies to the combined reward; pass either normalized or attribute")
    items = make_items(prompts, [str(r) for r in responses])
    if not items:
        return []
    client = _CLIENTS.get(base, api_key, timeout, retries, chunk_size)
    try:
        results = client.score_items(items)
    except RewardServerError as e:
        raise explain(e, who="rewardforge verl reward", url=base, chunk_size=int(chunk_size), retries=int(retries)) from None
    return pick_rewards(results, normalized=norm, attribute=attribute, who="rewardforge verl reward")


def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None, extra_info: Any = None, *,
                  url: str | None = None, normalized: Any = None, attribute: str | None = None,
                  api_key: str | None = None, timeout: float = 120.0, retries: int = 8, chunk_size: int = 256,
                  prompt_key: str = PROMPT_KEY, **kwargs: Any) -> float:
    """verl's single-sample custom reward: the reward of ``extra_info[prompt_key]`` + ``solution_str``.

    ``data_source`` and ``ground_truth`` are accepted and ignored, as are verl's other keyword
    arguments (e.g. the reward loop's ``reward_router_address``). Raises
    :class:`~rewardforge.integrations.RewardFunctionError` (one line: problem and fix) when the
    prompt is missing or the server cannot be reached or answers an error.
    """
    prompt = _prompt_of(extra_info, prompt_key, None)
    return _score([prompt], [solution_str], url=url, normalized=normalized, attribute=attribute, api_key=api_key,
                  timeout=timeout, retries=retries, chunk_size=chunk_size)[0]


def compute_score_batch(data_sources: Sequence[Any] | None = None, solution_strs: Sequence[str] = (),
                        ground_truths: Sequence[Any] | None = None, extra_infos: Sequence[Any] | None = None, *,
                        url: str | None = None, normalized: Any = None, attribute: str | None = None,
                        api_key: str | None = None, timeout: float = 120.0, retries: int = 8, chunk_size: int = 256,
                        prompt_key: str = PROMPT_KEY, **kwargs: Any) -> list[float]:
    """verl's batch custom reward (``reward_model.reward_manager=batch``): one reward per
    ``solution_strs[i]``, with the prompt from ``extra_infos[i][prompt_key]``; sent in chunks of
    ``chunk_size`` per request, results in input order."""
    solution_strs = list(_listify(solution_strs))
    infos = list(_listify(extra_infos)) if extra_infos is not None else [None] * len(solution_strs)
    if len(infos) != len(solution_strs):
        raise ValueError(f"got {len(solution_strs)} solution_strs but {len(infos)} extra_infos")
    prompts = [_prompt_of(info, prompt_key, i) for i, info in enumerate(infos)]
    return _score(prompts, solution_strs, url=url, normalized=normalized, attribute=attribute, api_key=api_key,
                  timeout=timeout, retries=retries, chunk_size=chunk_size)
