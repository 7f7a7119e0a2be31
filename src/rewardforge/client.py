"""Compatibility path: the client lives in :mod:`rewardforge.serve.client` (``from rewardforge.client import RewardClient`` keeps working)."""

from rewardforge.serve.client import AsyncRewardClient, RewardClient, RewardServerError, ScoreResult, pair_items

__all__ = ["AsyncRewardClient", "RewardClient", "RewardServerError", "ScoreResult", "pair_items"]
