"""Serving options: one typed dataclass; each field's help is written once and becomes a CLI flag.

    >>> cfg = ServeConfig(max_batch_items=32)
    >>> cfg.validate().max_batch_items
    32
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

API_KEY_ENV = "REWARDFORGE_API_KEY"
COMPAT_REWARDS = ("raw", "normalized")
DTYPES = ("fp32", "bf16", "fp16")
V2_REWARDS = ("combined", "per_attribute")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServeConfig:
    """Everything ``rewardforge serve`` can be told; the defaults suit one CPU or GPU replica."""

    host: str = _opt("127.0.0.1", "address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface")
    port: int = _opt(8000, "TCP port to listen on")
    api_key: str | None = _opt(
        None, f"require 'Authorization: Bearer KEY' on every endpoint but the health checks (default: ${API_KEY_ENV}; "
        "prefer the variable: a command line is visible to other users)"
    )
    model_name: str = _opt("reward_model", "model name in the KServe v2 / Triton routes (/v2/models/NAME/...)")
    max_batch_items: int = _opt(64, "most sequences in one forward pass (1 = score one at a time, no batching)")
    max_batch_tokens: int = _opt(16384, "most padded tokens (sequences x longest) in one forward pass")
    max_padding: float | None = _opt(
        None, "largest share of a batch's padded tokens that may be padding (default: 0.15 on CPU, where a pad token "
        "costs as much as a real one; 0.5 on GPU, where it is cheap)"
    )
    max_wait_ms: float = _opt(
        5.0, "longest time the oldest queued sequence waits for requests still being tokenized to join its batch "
        "(a lone request never waits)"
    )
    max_queue_items: int = _opt(4096, "sequences allowed to wait for the model; past it requests get 503 + Retry-After")
    max_body_bytes: int = _opt(16 * 1024 * 1024, "largest request body accepted, in bytes (413 beyond)")
    body_timeout_s: float = _opt(
        60.0, "longest time a client may take to send its request body, counted from the end of its headers "
        "(408 beyond); a request joins the batcher only once its body is in, so slow clients never hold up a batch"
    )
    max_items_per_request: int = _opt(1024, "most items (sequences) in one request (413 beyond)")
    max_item_tokens: int = _opt(
        8192,
        "longest item accepted, in tokens before truncation (413 beyond); accepted text longer than the "
        "model's max_length is truncated exactly as the offline scorer does",
    )
    compat_reward: str = _opt(
        "raw",
        "which reward /get_reward and the v2 'rewards' output return: raw, or normalized with the exported mean/std",
        choices=COMPAT_REWARDS,
    )
    normalize_inputs: bool = _opt(
        True, "bring text and token ids from RL trainers to the model's input format before scoring: strip padding "
        "(either side, the model's or the policy's pad), a doubled BOS/[CLS] and trailing EOS the model never saw, "
        "add a missing BOS/[CLS] and complete the template's end-of-turn suffix; each change is counted in /metrics "
        "(rewardforge_normalized_total) and reported per item. A request's \"normalize\": false turns it off for "
        "that request; --no-normalize-inputs for the server"
    )
    policy_tokenizer: str | None = _opt(
        None, "the policy's tokenizer directory: /get_reward queries in the policy's chat format are parsed into "
        "messages and rendered with the reward model's own template (default: none; queries are normalised as text)"
    )
    v2_rewards: str = _opt(
        "combined", "the v2 'rewards' output of a regression model: combined ([B, 1], the weighted reward) or "
        "per_attribute ([B, N], one column per attribute, as NeMo-Aligner's SteerLM annotation reads it)",
        choices=V2_REWARDS,
    )
    max_connections: int = _opt(
        1024, "most open client connections; while more are open, requests get uvicorn's plain-text 503 (and the "
        "connection is closed) until some close. Keep it above the clients' total connection pool"
    )
    device: str | None = _opt(None, "cpu or cuda (default: cuda if available)")
    dtype: str = _opt(
        "fp32", "the model's weights and compute: fp32 (scores equal the offline scorer's), or bf16 (faster on CPUs "
        "with AVX512-BF16 or AMX, 2-3x on an AVX512-BF16 EPYC, and usually on GPUs; rewards differ from fp32 by a few "
        "percent of their standard deviation at most) or fp16 (GPU)", choices=DTYPES,
    )
    threads: int | None = _opt(
        None, "most torch intra-op threads for the model's forward passes (default: torch's choice, one per "
        "physical core)"
    )
    tokens_per_thread: int = _opt(
        256, "a forward pass gets one intra-op thread per this many padded tokens, up to --threads, so a lone short "
        "sequence runs on one core and leaves the others to HTTP and tokenization while large batches use them all; "
        "0 = always --threads"
    )
    uncertainty_penalty: float = _opt(
        0.0, "ensembles (model.ensemble_size > 1): every endpoint's reward is mean - LAMBDA * std of the members' "
        "rewards (a pessimistic reward where the members disagree, against reward hacking; Coste et al. 2023); "
        "0 serves their mean. The mean, the std and each member are returned beside it. Needs an ensemble"
    )
    graceful_timeout_s: float = _opt(30.0, "on shutdown, how long in-flight requests may take to finish")
    log_level: str = _opt("info", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug", "trace"))

    def validate(self) -> "ServeConfig":
        """Check the limits against each other; return self. Raises ValueError naming the option."""
        for name in ("max_batch_items", "max_batch_tokens", "max_queue_items", "max_body_bytes",
                     "max_items_per_request", "max_item_tokens", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_padding is not None and not (0.0 <= self.max_padding <= 1.0):
            raise ValueError(f"max_padding must be in [0, 1], got {self.max_padding}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_items_per_request > self.max_queue_items:
            raise ValueError(
                f"max_items_per_request={self.max_items_per_request} exceeds max_queue_items={self.max_queue_items}; "
                "such a request could never be queued"
            )
        if self.compat_reward not in COMPAT_REWARDS:
            raise ValueError(f"compat_reward must be one of {', '.join(COMPAT_REWARDS)}, got {self.compat_reward!r}")
        if self.policy_tokenizer and not os.path.isdir(self.policy_tokenizer):
            raise ValueError(f"policy_tokenizer={self.policy_tokenizer!r} does not exist; give the directory the "
                             "policy's tokenizer was saved to (AutoTokenizer.from_pretrained(DIR) loads it)")
        if self.v2_rewards not in V2_REWARDS:
            raise ValueError(f"v2_rewards must be one of {', '.join(V2_REWARDS)}, got {self.v2_rewards!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.tokens_per_thread < 0:
            raise ValueError(f"tokens_per_thread must be >= 0, got {self.tokens_per_thread}")
        if not self.uncertainty_penalty >= 0:  # also rejects nan
            raise ValueError(f"uncertainty_penalty must be a number >= 0, got {self.uncertainty_penalty}")
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        return self

    def resolved_max_padding(self, device: str) -> float:
        """``max_padding``, or its default for ``device`` (cpu / cuda...)."""
        if self.max_padding is not None:
            return self.max_padding
        return 0.15 if str(device).startswith("cpu") else 0.5

    def torch_dtype(self):
        """The ``torch.dtype`` for ``dtype``."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def resolved_threads(self, device: str) -> int | None:
        """``threads``, or on CPU torch's choice (read on this thread); None on GPU: leave torch's setting alone."""
        if self.threads is not None:
            return self.threads
        if not str(device).startswith("cpu"):
            return None
        import torch

        return torch.get_num_threads()

    def resolved_api_key(self) -> str | None:
        """The API key from the option, else from the environment; None (no auth) when neither is set."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per :class:`ServeConfig` field, with its help and default."""
    for f in fields(ServeConfig):
        default = f.default if f.default is not MISSING else None
        kind = {int: int, float: float}.get(type(default)) if default is not None else None
        if kind is None and f.name == "threads":
            kind = int
        if kind is None and f.name == "max_padding":
            kind = float
        text = f.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=text,
                                dest=f.name)
            continue
        if "default:" not in text:
            text += f" (default: {default})"
        kw: dict[str, Any] = {"default": default, "help": text, "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind is not None:
            kw["type"] = kind
        parser.add_argument(_flag(f.name), **kw)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Build a validated :class:`ServeConfig` from parsed ``add_serve_arguments`` flags."""
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    return replace(ServeConfig(), **values).validate()
