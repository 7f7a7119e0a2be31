"""Reward model losses, their adapters to the training loop, and the one rule that combines outputs.

Each loss's docstring states the formula; tests check them against hand numbers. An adapter has the
signature the registry's specs use: ``fn(outputs [rows, N], batch, cfg) -> (loss, stats)``; for pair
data ``outputs`` holds the chosen rows first, then the rejected rows.

Per-example weights: an adapter marked with :func:`takes_example_weight` reads ``batch["example_weight"]``
(``[B]``, one weight per example of the batch, in the order of ``batch["index"]``; absent = every weight 1)
and returns ``mean_i(w_i * l_i)`` instead of ``mean_i(l_i)``. Model ensembles
(:mod:`rewardforge.ensemble`) train each head on its own bootstrap weighting through it, so any type whose
losses take the weight can be trained as an ensemble.
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


def weighted_mean(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(x)``, or with per-example weights ``mean(w * x)`` (divided by the number of examples, not by
    ``sum(w)``: a bootstrap weight has mean 1, and a batch whose weights are all 0 gives 0, not nan)."""
    return x.mean() if weight is None else (weight.to(x.dtype) * x).mean()


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley–Terry pairwise loss.

    ``L = mean(-log sigmoid(r_c - r_r - m)) + coef * mean((r_c + r_r)^2)``; with per-pair weights ``w``
    both means are ``mean(w * .)`` (:func:`weighted_mean`).

    Args:
        chosen, rejected: rewards ``[B]``.
        margin: optional ``[B]``; nan entries count as 0 (pairs without a margin).
        center_coef: weight of the centering term that keeps rewards near 0 (0 disables it).
        weight: optional ``[B]`` per-pair weights (bootstrap weights of an ensemble head).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.nan_to_num(margin.to(diff.dtype), nan=0.0)
    loss = weighted_mean(-F.logsigmoid(diff), weight)
    if center_coef:
        loss = loss + center_coef * weighted_mean((chosen + rejected) ** 2, weight)
    return loss


def scaled_bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center_coef: float = 0.0,
                              weight: torch.Tensor | None = None) -> torch.Tensor:
    """NeMo's scaled Bradley–Terry: each pair's loss weighted by its margin.

    ``L = mean(|m| * -log sigmoid(r_c - r_r)) + coef * mean((r_c + r_r)^2)``, pairs without a
    margin (nan) weigh 1; per-pair weights ``w`` multiply inside both means.
    """
    scale = torch.nan_to_num(margin.to(chosen.dtype), nan=1.0).abs()
    loss = weighted_mean(scale * -F.logsigmoid(chosen - rejected), weight)
    if center_coef:
        loss = loss + center_coef * weighted_mean((chosen + rejected) ** 2, weight)
    return loss


def masked_mse_loss(pred: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over present attributes only.

    ``L = sum(mask * (pred - y)^2) / sum(mask)`` with ``mask = isfinite(y)``; missing labels are nan.
    With per-row weights ``w`` [B]: ``L = sum_i w_i * sum_j mask_ij * (pred_ij - y_ij)^2 / sum(mask)``.
    Returns 0 (with a gradient path) when no label is present.
    """
    mask = torch.isfinite(labels)
    diff = torch.where(mask, pred - torch.nan_to_num(labels.to(pred.dtype)), torch.zeros_like(pred))
    sq = diff**2 if weight is None else weight.to(pred.dtype)[:, None] * diff**2
    return sq.sum() / mask.sum().clamp(min=1)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``r_c > r_r``; ties count one half (:func:`~rewardforge.eval.metrics.win_rate`)."""
    return win_rate(chosen - rejected)


# ------------------------------------------------------------------ adapters: fn(outputs, batch, cfg)


def takes_example_weight(fn):
    """Mark a loss adapter that honours ``batch["example_weight"]`` (see the module docstring)."""
    fn.takes_example_weight = True
    return fn


def accepts_example_weight(fn) -> bool:
    """Whether the adapter ``fn`` was marked with :func:`takes_example_weight`."""
    return bool(getattr(fn, "takes_example_weight", False))


def _pair_rewards(outputs: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    r = combine(outputs, attribute_weights(cfg))
    b = r.shape[0] // 2
    return r[:b], r[b:]


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": pairwise_accuracy(chosen.detach(), rejected.detach()), "margin": (chosen - rejected).detach().mean()}


@takes_example_weight
def bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Bradley–Terry on the (combined) reward, with the pair's margin when present and enabled."""
    c, r = _pair_rewards(outputs, cfg)
    margin = batch.get("margin") if cfg.loss.use_margin else None
    return bradley_terry_loss(c, r, margin, cfg.loss.center_rewards_coef, batch.get("example_weight")), _pair_stats(c, r)


@takes_example_weight
def plain_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Bradley–Terry ignoring margins (NeMo's regular BT)."""
    c, r = _pair_rewards(outputs, cfg)
    return bradley_terry_loss(c, r, None, cfg.loss.center_rewards_coef, batch.get("example_weight")), _pair_stats(c, r)


@takes_example_weight
def scaled_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """NeMo's scaled BT: each pair's loss weighted by |margin|."""
    c, r = _pair_rewards(outputs, cfg)
    return (scaled_bradley_terry_loss(c, r, batch["margin"], cfg.loss.center_rewards_coef, batch.get("example_weight")),
            _pair_stats(c, r))


@takes_example_weight
def mse_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Masked MSE over the attributes present in each row."""
    labels = batch["labels"]
    loss = masked_mse_loss(outputs, labels, batch.get("example_weight"))
    mask = torch.isfinite(labels)
    mae = (torch.where(mask, (outputs.detach() - torch.nan_to_num(labels)).abs(), 0.0).sum() / mask.sum().clamp(min=1))
    return loss, {"mae": mae}


# loss name -> adapter, for preference pairs (``margin_bradley_terry`` is ``bradley_terry``'s other name)
PAIR_LOSSES = {"bradley_terry": bt_loss, "margin_bradley_terry": bt_loss, "regular_bradley_terry": plain_bt_loss,
               "scaled_bradley_terry": scaled_bt_loss}
# loss name -> adapter, for rated responses
RATED_LOSSES = {"mse": mse_loss}
