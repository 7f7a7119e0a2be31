"""The model: a pretrained backbone plus a linear reward head read at the last real token.

``reward_model`` holds the model, its building and loading, and the one reward-token rule; ``attention``
and ``lastlayer`` are the exact CPU speed kernels it installs (each tested against transformers' own
path); ``families`` is the one list of the model families those kernels support.
"""

from rewardforge.errors import ModelError
from rewardforge.models.reward_model import (
    RewardModel,
    build_model,
    detect_pooling,
    ensure_pad_token,
    load_tokenizer,
    merged_hf_model,
    reward_token_index,
)

__all__ = [
    "ModelError", "RewardModel", "build_model", "detect_pooling", "ensure_pad_token",
    "load_tokenizer", "merged_hf_model", "reward_token_index",
]
