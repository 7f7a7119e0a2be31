"""Reward functions for RL trainers that call a running ``rewardforge serve`` over HTTP.

* :mod:`rewardforge.integrations.trl`: ``RewardForgeReward`` / ``AsyncRewardForgeReward`` for TRL's
  ``GRPOTrainer(reward_funcs=[...])``;
* :mod:`rewardforge.integrations.verl`: ``compute_score`` / ``compute_score_batch`` for verl's
  ``custom_reward_function``.

Both post to the native ``POST /v1/score`` endpoint through :mod:`rewardforge.serve.client` (chunking,
retries on 503 + ``Retry-After``, timeouts). What they share lives here: turning trainer inputs into
score items, and turning a failed request into one line that names the problem and the fix
(:class:`RewardFunctionError`). ``docs/rl_clients.md`` shows the trainer-side configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Sequence

from rewardforge.serve.client import RewardServerError, ScoreResult

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "REWARDFORGE_URL"
STRING_MODES = ("pair", "text")

__all__ = ["DEFAULT_URL", "URL_ENV", "RewardFunctionError", "resolve_url", "make_items", "pick_rewards", "explain"]


class RewardFunctionError(RewardServerError):
    """A reward function could not get rewards; the message is one line: what went wrong and the fix.

    ``status`` is the HTTP status (0: the server could not be reached), as in :class:`RewardServerError`.
    """

    def __init__(self, status: int, message: str, text: str):
        Exception.__init__(self, text)
        self.status, self.message = status, message


def resolve_url(url: str | None) -> str:
    """``url``, else ``$REWARDFORGE_URL``, else ``http://127.0.0.1:8000``."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def explain(err: RewardServerError, *, who: str, url: str, chunk_size: int, retries: int) -> RewardFunctionError:
    """The one-line error for a failed request to ``url`` (``who``: the function's name)."""
    status, msg = err.status, " ".join(str(err.message).split())
    head = f"{who}: "
    if status == 0:
        fix = (f"cannot reach the reward server at {url} ({msg}); start it with "
               f"`rewardforge serve EXPORT_DIR --host HOST --port PORT` or pass the right url (or ${URL_ENV})")
    elif status in (401, 403):
        fix = (f"the reward server at {url} refused the request (HTTP {status}: {msg}); pass api_key= or set "
               "$REWARDFORGE_API_KEY to the key the server was started with")
    elif status == 413:
        fix = (f"the reward server at {url} refused a request as too large (HTTP 413: {msg}); lower chunk_size "
               f"(now {chunk_size}) to at most the server's --max-items-per-request, or raise the server's limits")
    elif status == 503:
        fix = (f"the reward server at {url} stayed busy after {retries} retries (HTTP 503: {msg}); raise retries=, "
               "lower chunk_size, or give the server a larger --max-queue-items / more replicas")
    elif 400 <= status < 500:
        fix = (f"the reward server at {url} rejected the inputs (HTTP {status}: {msg}); prompts and completions "
               "must be strings or chat messages ({role, content}) ending with the assistant turn")
    else:
        fix = f"the reward server at {url} failed (HTTP {status}: {msg}); see the server log"
    return RewardFunctionError(status, str(err.message), head + fix)


# ---------------------------------------------------------------- inputs


def _listify(x: Any) -> Any:
    """numpy arrays (verl reads parquet lists as object arrays) -> lists; everything else unchanged."""
    tolist = getattr(x, "tolist", None)
    if tolist is not None and not isinstance(x, (str, bytes)) and hasattr(x, "ndim"):
        return tolist()
    return x


def _content(content: Any) -> str:
    content = _listify(content)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # content blocks, e.g. [{"type": "text", "text": "..."}]
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
            else:
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                raise ValueError(f"rewardforge scores text only; a message has a {kind!r} content part")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def to_messages(conversation: Any) -> list[dict[str, Any]]:
    """A list of chat messages as the server takes them: ``role`` and string ``content`` (text parts
    joined, ``None`` as ""); other keys (``tool_calls``, ``name``...) kept unless ``None``."""
    out = []
    for m in _listify(conversation):
        m = _listify(m)
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"a chat message must be a mapping with 'role' and 'content', got {m!r:.80}")
        msg = {str(k): _listify(v) for k, v in m.items() if v is not None and k not in ("role", "content")}
        msg["role"] = str(m["role"])
        msg["content"] = _content(m.get("content"))
        out.append(msg)
    return out


def make_items(prompts: Sequence[Any], completions: Sequence[Any], *, strings: str = "pair") -> list[dict[str, Any]]:
    """``/v1/score`` items for (prompt, completion) pairs.

    Conversational pairs (lists of messages) become ``{"messages": prompt + completion}``: the last
    message, the assistant's completion, is what is scored. Plain strings become
    ``{"prompt", "response"}`` (rendered by the server as one user turn and one assistant turn with
    the model's template) with ``strings="pair"``, or ``{"text": prompt + completion}`` used verbatim
    with ``strings="text"`` (for strings already in the reward model's format). A string on one side
    and messages on the other is a user (prompt) or assistant (completion) message.
    """
    if strings not in STRING_MODES:
        raise ValueError(f"strings must be one of {', '.join(STRING_MODES)}, got {strings!r}")
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion")
    items = []
    for p, c in zip(prompts, completions):
        p, c = _listify(p), _listify(c)
        if isinstance(p, str) and isinstance(c, str):
            items.append({"prompt": p, "response": c} if strings == "pair" else {"text": p + c})
            continue
        pm = [{"role": "user", "content": p}] if isinstance(p, str) else to_messages(p)
        cm = [{"role": "assistant", "content": c}] if isinstance(c, str) else to_messages(c)
        messages = pm + cm
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing"
            raise ValueError(f"the conversation must end with the assistant's completion, but it ends with {last!r}")
        items.append({"messages": messages})
    return items


def pick_rewards(results: Sequence[ScoreResult], *, normalized: bool, attribute: str | None, who: str) -> list[float]:
    """The reward of each result: raw, normalised, or one attribute of a regression model."""
    if attribute is None:
        return [float(r.reward_normalized if normalized else r.reward) for r in results]
    out = []
    for r in results:
        if not r.attributes or attribute not in r.attributes:
            have = ", ".join(r.attributes) if r.attributes else "none: it has a single output"
            raise RewardFunctionError(400, f"no attribute {attribute!r}",
                                      f"{who}: the served model has no attribute {attribute!r} (attributes: {have}); "
                                      "pass one of those, or attribute=None for the combined reward")
        out.append(float(r.attributes[attribute]))
    return out
