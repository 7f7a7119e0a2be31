"""Reward model losses, their adapters to the training loop, and the one rule that combines outputs.

Each loss's docstring states the formula; tests check them against hand numbers. An adapter has the
signature the registry's specs use: ``fn(outputs [rows, N], batch, cfg) -> (loss, stats)``; for pair
data ``outputs`` holds the chosen rows first, then the rejected rows; for list data each row's list is
``batch["list_index"]`` and its score ``batch["scores"]`` (:func:`dense_lists` lays them out ``[lists, K]``).

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


# ------------------------------------------------------------------ lists of K responses (listwise)


def dense_lists(values: torch.Tensor, list_index: torch.Tensor, *others: torch.Tensor):
    """Rows ``[R]`` of lists (``list_index [R]``, -1 = a padding row, ignored) -> ``[B, K]`` per list.

    Returns ``(values [B, K], mask [B, K], *others [B, K])`` with each list's rows in their order in
    the batch; ``K`` is the longest list and ``mask`` marks real entries. Differentiable in ``values``.
    """
    keep = list_index >= 0
    li = list_index[keep]
    order = torch.argsort(li, stable=True)
    li = li[order]
    b = int(li.max()) + 1 if li.numel() else 0
    counts = torch.bincount(li, minlength=b)
    pos = torch.arange(li.numel(), device=li.device) - (torch.cumsum(counts, 0) - counts)[li]
    k = int(counts.max()) if b else 0

    def scatter(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.full((b, k), fill, dtype=x.dtype, device=x.device).index_put((li, pos), x[keep][order])

    mask = torch.zeros(b, k, dtype=torch.bool, device=values.device).index_put((li, pos), torch.ones_like(li, dtype=torch.bool))
    return (scatter(values, 0.0), mask, *(scatter(o, float("nan")) for o in others))


def plackett_luce_loss(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of each list's ranking under Plackett–Luce, ties by Breslow's rule.

    For a list with rewards ``r_i`` and scores ``y_i`` (higher is better), every response ``i`` is
    "chosen" against its risk set, itself and every response not above it::

        nll = sum_i [ log sum_{j: y_j <= y_i} exp(r_j) - r_i ]

    ``L = sum_lists nll / sum_lists (K - 1)``: the mean over a list's K - 1 choices, so two responses
    give exactly Bradley–Terry, ``-log sigmoid(r_best - r_other)``. Ties (Breslow, as in Cox regression):
    tied responses are not ordered among themselves; each of them meets the whole tie group and
    everything below it, which approximates the average of the likelihood over the tie-consistent
    orderings (exact when no score ties; a strictly last response adds ``log exp(r) - r = 0``).

    With per-list weights ``w`` (``[B]``, an ensemble's bootstrap weights): ``L = sum_b w_b nll_b / sum_b w_b (K_b - 1)``.

    Args:
        rewards, scores: ``[B, K]``; mask: ``[B, K]`` bool, True on real responses (see :func:`dense_lists`).
    """
    y = torch.where(mask, scores, torch.zeros_like(scores))  # compared in their own dtype: a bf16 cast could merge scores
    risk = mask[:, None, :] & mask[:, :, None] & (y[:, None, :] <= y[:, :, None])  # [B, i, j]: j in i's risk set
    # a padding entry's own set is itself, so its (unused) term stays finite and its gradient 0, not nan
    risk = risk | torch.eye(risk.shape[-1], dtype=torch.bool, device=risk.device)
    logden = torch.logsumexp(rewards[:, None, :].expand_as(risk).masked_fill(~risk, float("-inf")), dim=-1)
    nll = torch.where(mask, logden - rewards, torch.zeros_like(rewards)).sum(-1)  # [B]
    choices = (mask.sum(-1) - mask.any(-1).long()).to(nll.dtype)  # K_b - 1
    if weight is None:
        return nll.sum() / choices.sum().clamp(min=1)
    w = weight.to(nll.dtype)
    return (w * nll).sum() / (w * choices).sum().clamp(min=torch.finfo(nll.dtype).tiny)


def list_pairs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` bool: ``(i, j)`` is an ordered pair of a list, ``y_i > y_j``."""
    return mask[:, :, None] & mask[:, None, :] & (scores[:, :, None] > scores[:, None, :])


def listwise_bradley_terry_loss(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, gap_weight: bool = False,
                                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry over every ordered pair of each list (``y_i > y_j``; ties make no pair).

    ``L = sum_(i,j) w_ij * -log sigmoid(r_i - r_j) / sum_(i,j) w_ij`` with ``w_ij = 1`` (the mean over
    pairs: the same loss as expanding the lists to all their pairs for ``bradley_terry``) or, with
    ``gap_weight``, ``w_ij = y_i - y_j`` (a pair counts by its score gap; the weighted mean keeps the scale).
    Per-list weights ``weight`` (``[B]``, an ensemble's bootstrap weights) multiply every ``w_ij`` of their list.
    """
    pairs = list_pairs(scores, mask)
    y = scores.to(rewards.dtype)
    w = torch.where(pairs, (y[:, :, None] - y[:, None, :]) if gap_weight else torch.ones_like(pairs, dtype=rewards.dtype),
                    torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    if weight is not None:
        w = w * weight.to(rewards.dtype)[:, None, None]
    nll = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    return (w * nll).sum() / w.sum().clamp(min=torch.finfo(rewards.dtype).tiny)


def _list_inputs(outputs: torch.Tensor, batch: dict, cfg: Any):
    r = combine(outputs, attribute_weights(cfg))
    rewards, mask, scores = dense_lists(r, batch["list_index"], batch["scores"])
    return r, rewards, mask, scores


def _list_stats(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    pairs = list_pairs(scores, mask)
    diff = (rewards[:, :, None] - rewards[:, None, :]).detach()[pairs]
    return {"accuracy": win_rate(diff), "margin": diff.mean()}


def _center(r: torch.Tensor, batch: dict, cfg: Any) -> torch.Tensor | float:
    coef = cfg.loss.center_rewards_coef
    return coef * (r[batch["list_index"] >= 0] ** 2).mean() if coef else 0.0


@takes_example_weight
def plackett_luce_list_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Plackett–Luce (Breslow ties) on the lists of a list batch, plus ``center_rewards_coef * mean(r^2)``;
    ``batch["example_weight"]`` weighs each list."""
    r, rewards, mask, scores = _list_inputs(outputs, batch, cfg)
    return plackett_luce_loss(rewards, scores, mask, batch.get("example_weight")) + _center(r, batch, cfg), _list_stats(rewards, scores, mask)


@takes_example_weight
def listwise_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Any):
    """Bradley–Terry over each list's ordered pairs (``loss.gap_weight``), plus ``center_rewards_coef * mean(r^2)``;
    ``batch["example_weight"]`` weighs each list."""
    r, rewards, mask, scores = _list_inputs(outputs, batch, cfg)
    loss = listwise_bradley_terry_loss(rewards, scores, mask, cfg.loss.gap_weight, batch.get("example_weight"))
    return loss + _center(r, batch, cfg), _list_stats(rewards, scores, mask)


# loss name -> adapter, for lists of K ranked or rated responses
LIST_LOSSES = {"plackett_luce": plackett_luce_list_loss, "listwise_bradley_terry": listwise_bt_loss}
