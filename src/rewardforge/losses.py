"""Reward model losses, their adapters to the training loop, and the one rule that combines outputs.

Each loss's docstring states the formula; tests check them against hand numbers. An adapter has the
signature the registry's specs use: ``fn(outputs [rows, N], batch, cfg) -> (loss, stats)``; for pair
data ``outputs`` holds the chosen rows first, then the rejected rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewardforge.eval.metrics import win_rate


# ------------------------------------------------------------------ combining outputs


def default_weights(n: int) -> list[float]:
    """The weights of ``n`` outputs when none are given: their mean."""
    return [1.0 / n] * n


def output_names(cfg: Any) -> list[str]:
    """Names of the model outputs: ``model.attributes``, or ``['reward']`` for a scalar model."""
    return list(cfg.model.attributes) if cfg.model.attributes else ["reward"]


def attribute_weights(cfg: Any) -> list[float]:
    """``model.attribute_weights``, or :func:`default_weights` of the outputs."""
    return list(cfg.model.attribute_weights) if cfg.model.attribute_weights else default_weights(len(output_names(cfg)))


def combine(outputs, weights: Sequence[float]):
    """The scalar reward of outputs ``[..., N]``: ``outputs @ weights`` (a single output is itself).

    The one home of the rule, for torch tensors (training, in the outputs' dtype) and numpy arrays
    (scoring, serving, export statistics and validation, in float64).
    """
    if outputs.shape[-1] == 1:
        return outputs[..., 0] if isinstance(outputs, torch.Tensor) else np.asarray(outputs[..., 0], np.float64)
    if isinstance(outputs, torch.Tensor):
        return outputs @ torch.tensor(list(weights), dtype=outputs.dtype, device=outputs.device)
    return np.asarray(outputs, np.float64) @ np.asarray(weights, np.float64)


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry pairwise loss.

    ``L = mean(-log sigmoid(r_c - r_r - m)) + coef * mean((r_c + r_r)^2)``

    Args:
        chosen, rejected: rewards ``[B]``.
        margin: optional ``[B]``; nan entries count as 0 (pairs without a margin).
        center_coef: weight of the centering term that keeps rewards near 0 (0 disables it).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.nan_to_num(margin.to(diff.dtype), nan=0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def scaled_bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """NeMo's scaled Bradley–Terry: each pair's loss weighted by its margin.

    ``L = mean(|m| * -log sigmoid(r_c - r_r)) + coef * mean((r_c + r_r)^2)``, pairs without a
    margin (nan) weigh 1.
    """
    weight = torch.nan_to_num(margin.to(chosen.dtype), nan=1.0).abs()
    loss = (weight * -F.logsigmoid(chosen - rejected)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def masked_mse_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE over present attributes only.

    ``L = sum(mask * (pred - y)^2) / sum(mask)`` with ``mask = isfinite(y)``; missing labels are nan.
    Returns 0 (with a gradient path) when no label is present.
    """
    mask = torch.isfinite(labels)
    diff = torch.where(mask, pred - torch.nan_to_num(labels.to(pred.dtype)), torch.zeros_like(pred))
    return (diff**2).sum() / mask.sum().clamp(min=1)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``r_c > r_r``; ties count one half (:func:`~rewardforge.eval.metrics.win_rate`)."""
    return win_rate(chosen - rejected)


# ------------------------------------------------------------------ adapters: fn(outputs, batch, cfg)


def _pair_rewards(outputs: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    r = combine(outputs, attribute_weights(cfg))
    b = r.shape[0] // 2
    return r[:b], r[b:]


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": pairwise_accuracy(chosen.detach(), rejected.detach()), "margin": (chosen - rejected).detach().mean()}


def bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Bradley–Terry on the (combined) reward, with the pair's margin when present and enabled."""
    c, r = _pair_rewards(outputs, cfg)
    margin = batch.get("margin") if cfg.loss.use_margin else None
    return bradley_terry_loss(c, r, margin, cfg.loss.center_rewards_coef), _pair_stats(c, r)


def plain_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Bradley–Terry ignoring margins (NeMo's regular BT)."""
    c, r = _pair_rewards(outputs, cfg)
    return bradley_terry_loss(c, r, None, cfg.loss.center_rewards_coef), _pair_stats(c, r)


def scaled_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """NeMo's scaled BT: each pair's loss weighted by |margin|."""
    c, r = _pair_rewards(outputs, cfg)
    return scaled_bradley_terry_loss(c, r, batch["margin"], cfg.loss.center_rewards_coef), _pair_stats(c, r)


def mse_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Masked MSE over the attributes present in each row."""
    labels = batch["labels"]
    loss = masked_mse_loss(outputs, labels)
    mask = torch.isfinite(labels)
    mae = (torch.where(mask, (outputs.detach() - torch.nan_to_num(labels)).abs(), 0.0).sum() / mask.sum().clamp(min=1))
    return loss, {"mae": mae}


# loss name -> adapter, for preference pairs (``margin_bradley_terry`` is ``bradley_terry``'s other name)
PAIR_LOSSES = {"bradley_terry": bt_loss, "margin_bradley_terry": bt_loss, "regular_bradley_terry": plain_bt_loss,
               "scaled_bradley_terry": scaled_bt_loss}
# loss name -> adapter, for rated responses
RATED_LOSSES = {"mse": mse_loss}
