"""Validation: run the model over a dataset and compute the metrics of its kind.

* pairs: pairwise accuracy (ties count one half), Bradley–Terry loss, mean margin, reward mean/std
* rated: MSE, MAE and Pearson correlation per attribute (only where the label is present)
* lists: pairwise accuracy over every ordered pair of a list, top-1, Kendall tau, NDCG
  (:func:`rewardforge.eval.metrics.ranking_metrics`)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewardforge.data.packing import model_kwargs
from rewardforge.eval.metrics import win_rate


@torch.no_grad()
def predict(model, loader, progress: bool = False, desc: str = "validate", columns=None) -> dict[str, np.ndarray]:
    """Model outputs for every example of ``loader``, in dataset order.

    Returns for pair batches ``{"chosen": [n, N], "rejected": [n, N], "index": [n]}`` and for rated
    batches ``{"pred": [n, N], "labels": [n, N], "index": [n]}``; with ``columns`` (a data kind's
    ``fn(outputs, batch) -> {name: tensor}``, :attr:`rewardforge.registry.DataKind.columns`) what it returns.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out = model(batch["input_ids"], batch["attention_mask"], **model_kwargs(batch))
        if columns is not None:
            cols = columns(out, batch)
        elif "margin" in batch:  # pair batch: chosen rows first, then rejected rows
            b = out.shape[0] // 2
            cols = {"chosen": out[:b], "rejected": out[b:], "index": batch["index"]}
        else:
            cols = {"pred": out, "labels": batch["labels"], "index": batch["index"]}
        for k, v in cols.items():
            parts.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
    model.train(was_training)
    result = {k: torch.cat(v).numpy() for k, v in parts.items()}
    if "index" in result:
        order = np.argsort(result["index"], kind="stable")
        result = {k: v[order] for k, v in result.items()}
    return result


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Metrics of scalar rewards of pairs.

    Example:
        >>> pair_metrics(np.array([2.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]))["accuracy"]
        0.5
    """
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    n = len(chosen)
    if n == 0:
        return {"pairs": 0}
    diff = chosen - rejected
    ties = float((diff == 0).sum())
    rewards = np.concatenate([chosen, rejected])
    loss = float(-F.logsigmoid(torch.from_numpy(diff)).mean())
    return {
        "pairs": n,
        "accuracy": float(win_rate(diff)),
        "ties": int(ties),
        "loss": loss,
        "mean_margin": float(diff.mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
    }


def list_metrics(rewards: np.ndarray, scores: np.ndarray, lists: np.ndarray) -> dict[str, Any]:
    """:func:`~rewardforge.eval.metrics.ranking_metrics` of rewards ``[R]`` of responses grouped by ``lists [R]``,
    with ``loss``: the Bradley–Terry loss over the ordered pairs (what ``listwise_bradley_terry`` minimises).

    Example:
        >>> m = list_metrics(np.array([0.5, 2.0, 1.0, 1.0, 0.0]), np.array([3, 1, 1, 1, 0]), np.array([0, 0, 0, 4, 4]))
        >>> m["lists"], m["pairs"], round(m["accuracy"], 4)
        (2, 3, 0.3333)
    """
    from rewardforge.eval.metrics import list_pair_margins, ranking_metrics

    rewards, scores, lists = np.asarray(rewards, np.float64), np.asarray(scores, np.float64), np.asarray(lists)
    if len(rewards) == 0:
        return {"lists": 0, "pairs": 0}
    _, start = np.unique(lists, return_index=True)
    bounds = [*np.sort(start).tolist(), len(lists)]  # rows of a list are contiguous (sorted by dataset row)
    r = [rewards[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    y = [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    out = ranking_metrics(r, y)
    d = np.concatenate([list_pair_margins(a, b) for a, b in zip(r, y)])
    out["loss"] = float(-F.logsigmoid(torch.from_numpy(d)).mean()) if len(d) else float("nan")
    out["reward_mean"], out["reward_std"] = float(rewards.mean()), float(rewards.std())
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; nan when fewer than 2 points or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def regression_metrics(pred: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-attribute MSE, MAE and Pearson over present labels, and their means across attributes."""
    out: dict[str, Any] = {"examples": int(len(pred))}
    mses, maes, rs = [], [], []
    for j, name in enumerate(names):
        mask = np.isfinite(labels[:, j])
        p, y = pred[mask, j].astype(np.float64), labels[mask, j].astype(np.float64)
        if mask.sum() == 0:
            out[name] = {"n": 0}
            continue
        mse, mae, r = float(((p - y) ** 2).mean()), float(np.abs(p - y).mean()), pearson(p, y)
        out[name] = {"n": int(mask.sum()), "mse": mse, "mae": mae, "pearson": r}
        mses.append(mse), maes.append(mae)
        if not math.isnan(r):
            rs.append(r)
    out["mse"] = float(np.mean(mses)) if mses else float("nan")
    out["mae"] = float(np.mean(maes)) if maes else float("nan")
    out["pearson"] = float(np.mean(rs)) if rs else float("nan")
    return out


def pair_verdict(chosen: np.ndarray, rejected: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict[str, Any]:
    """Is a validation accuracy a result? Its 95% Wilson interval, chance, and the length baseline on the same pairs.

    The baseline picks the side with more tokens (the two sides share the prompt, so it is the longer response;
    ties count one half). ``beats_chance``: the interval lies above 0.5. ``beats_length_baseline``: the accuracy is
    above the baseline's and an exact McNemar test of the two on the same pairs gives p < 0.05.
    """
    from rewardforge.eval.metrics import compare_pairs, wilson_interval

    d = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    n = len(d)
    if n == 0:
        return {"pairs": 0}
    acc = float(win_rate(d))
    lo, hi = wilson_interval(acc * n, n)
    length = np.sign(np.asarray(chosen_tokens, np.float64) - np.asarray(rejected_tokens, np.float64))
    base = float(win_rate(length))
    blo, bhi = wilson_interval(base * n, n)
    cmp = compare_pairs(d, length)
    beats_base = acc > base and cmp["mcnemar_p"] < 0.05
    if lo > 0.5 and beats_base:
        verdict = "better than chance and than picking the longer response"
    elif lo > 0.5:
        verdict = "better than chance, but not shown better than picking the longer response"
    else:
        verdict = "not distinguishable from chance (the 95% interval includes 0.5)"
    return {"pairs": n, "accuracy": acc, "ci95": [lo, hi], "beats_chance": bool(lo > 0.5),
            "length_baseline": {"accuracy": base, "ci95": [blo, bhi], "mcnemar_p": cmp["mcnemar_p"],
                                "model_only": cmp["a_only"], "baseline_only": cmp["b_only"]},
            "beats_length_baseline": bool(beats_base), "verdict": verdict}
