"""Metric functions for reward model evaluation: pure numpy, no model, no I/O.

Notation: a pair has rewards ``r_c`` (chosen) and ``r_r`` (rejected); its margin is
``d = r_c - r_r``. The model's probability that the chosen response is preferred is the
Bradley–Terry probability ``p = sigmoid(d) = 1 / (1 + exp(-d))``.

Every function accepts empty inputs and then reports ``n = 0`` (and ``None`` for undefined
numbers) rather than raising, so an empty dataset or subset shows up in a report instead of
crashing it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# RewardBench (Lambert et al. 2024) subsets per section.
REWARDBENCH_SECTIONS: dict[str, list[str]] = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}

# Signed length-difference buckets (chosen minus rejected, in length units) as (low, high), inclusive.
LENGTH_BUCKETS: list[tuple[float, float]] = [
    (-math.inf, -64), (-63, -16), (-15, -4), (-3, -1), (0, 0), (1, 3), (4, 15), (16, 63), (64, math.inf),
]


def _f(x: Any) -> float | None:
    """A JSON-friendly float: None for nan/inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))``, computed without overflow."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion ``p = successes / n``.

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``.
    ``successes`` may be fractional (ties count one half). Stays inside [0, 1] and is sensible
    for small n and for p = 0 or 1, unlike the normal-approximation interval.

    Example:
        >>> [round(v, 4) for v in wilson_interval(8, 10)]
        [0.4902, 0.9433]
    """
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    # clamp: rounding must not put p itself outside its interval (p = 0 or 1)
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


# ------------------------------------------------------------------ pairwise accuracy


def win_rate(diff):
    """The pairwise-accuracy rule, the one definition every caller uses: ``mean(1[d > 0] + 0.5·1[d = 0])``
    for score differences ``d = r_c - r_r``. Works on numpy arrays and torch tensors alike (training reads
    it on the device); an empty input gives nan.

    Example:
        >>> float(win_rate(np.array([1.0, -1.0, 0.0, 2.0])))
        0.625
    """
    return ((diff > 0) * 1.0 + (diff == 0) * 0.5).mean()


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Accuracy of pairs with ties counted as half.

    ``accuracy = (#{r_c > r_r} + 0.5·#{r_c = r_r}) / n`` with a 95% Wilson interval
    (:func:`wilson_interval`) on that proportion.

    Example:
        >>> pairwise_accuracy([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0])["accuracy"]
        0.625
    """
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    n = int(len(c))
    wins, ties = int((c > r).sum()), int((c == r).sum())
    if n == 0:
        return {"n": 0, "accuracy": None, "ci_low": None, "ci_high": None, "wins": 0, "ties": 0, "losses": 0}
    acc = float(win_rate(c - r))
    lo, hi = wilson_interval(acc * n, n)
    return {"n": n, "accuracy": acc, "ci_low": lo, "ci_high": hi, "wins": wins, "ties": ties, "losses": n - wins - ties}


def grouped_accuracy(chosen: Sequence[float], rejected: Sequence[float], groups: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """:func:`pairwise_accuracy` per group label (labels converted to str, sorted)."""
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    labels = np.asarray([str(g) for g in groups], dtype=object)
    return {g: pairwise_accuracy(c[labels == g], r[labels == g]) for g in sorted(set(labels.tolist()))}


def section_scores(per_subset: Mapping[str, Mapping[str, Any]], sections: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """RewardBench-style section scores: count-weighted accuracy of each section's subsets.

    ``score(section) = Σ_s n_s·acc_s / Σ_s n_s`` over the section's subsets present in the data;
    ``score(overall)`` is the unweighted mean of the section scores that have data. Subsets the
    mapping names but the data lacks are listed in ``missing`` (a section with none present gets
    ``score = None``); subsets of the data in no section are listed in ``unmapped``.

    Example:
        >>> s = section_scores({"a": {"n": 3, "accuracy": 1.0}, "b": {"n": 1, "accuracy": 0.0}}, {"X": ["a", "b"]})
        >>> s["sections"]["X"]["score"]
        0.75
    """
    out: dict[str, Any] = {}
    mapped: set[str] = set()
    for name, subsets in sections.items():
        present = [s for s in subsets if s in per_subset and per_subset[s].get("n", 0) > 0]
        missing = [s for s in subsets if s not in present]
        mapped.update(subsets)
        n = sum(int(per_subset[s]["n"]) for s in present)
        score = sum(per_subset[s]["n"] * per_subset[s]["accuracy"] for s in present) / n if n else None
        out[name] = {"score": score, "n": n, "subsets": present, "missing": missing}
    scores = [v["score"] for v in out.values() if v["score"] is not None]
    return {
        "sections": out,
        "overall": float(np.mean(scores)) if scores else None,
        "unmapped": sorted(s for s in per_subset if s not in mapped),
    }


# ------------------------------------------------------------------ calibration


def calibration(margins: Sequence[float], n_bins: int = 10) -> dict[str, Any]:
    """Reliability of ``P(chosen > rejected) = sigmoid(d)``.

    Every pair is labelled "chosen wins", so the probabilities are folded onto the predicted
    winner: ``confidence = sigmoid(|d|)`` in [0.5, 1] and ``correct = 1`` if ``d > 0``, ``0.5`` if
    ``d = 0``, else 0. The confidences are binned in ``n_bins`` equal-width bins over [0.5, 1]
    (the last bin includes 1) and

        ``ECE = Σ_b (n_b / n) · |mean(correct)_b − mean(confidence)_b|``.

    Also returned: the Bradley–Terry log-loss ``NLL = mean(−log sigmoid(d))`` and the
    temperature ``T`` minimising ``mean(−log sigmoid(d / T))`` (:func:`fit_temperature`) with the
    ECE and NLL after dividing the margins by it. ``T > 1``: the model is over-confident. When the
    best ``T`` is infinite, ``temperature`` is None and ``temperature_note`` says why.

    Example:
        >>> round(calibration([2.0, -1.0, 0.0], n_bins=2)["ece"], 4)
        0.2834
    """
    d = np.asarray(margins, np.float64)
    n = int(len(d))
    if n == 0:
        return {"n": 0, "ece": None, "nll": None, "temperature": None, "ece_calibrated": None, "nll_calibrated": None, "bins": []}
    ece, bins = _ece(d, n_bins)
    t = fit_temperature(d)
    ece_t, _ = _ece(d / t, n_bins) if t is not None else (None, None)
    out = {
        "n": n,
        "ece": ece,
        "nll": _nll(d),
        "temperature": t,
        "ece_calibrated": ece_t,
        "nll_calibrated": _nll(d / t) if t is not None else None,
        "bins": bins,
    }
    if t is not None and math.isinf(t):
        out["temperature"] = None  # JSON has no infinity
        out["temperature_note"] = "margins anti-correlated with the preferences: no positive temperature helps (T -> infinity)"
    return out


def _ece(d: np.ndarray, n_bins: int) -> tuple[float, list[dict[str, Any]]]:
    conf = sigmoid(np.abs(d))
    correct = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        m = idx == b
        nb = int(m.sum())
        acc = float(correct[m].mean()) if nb else None
        cf = float(conf[m].mean()) if nb else None
        if nb:
            ece += nb / len(d) * abs(acc - cf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": nb, "accuracy": acc, "confidence": cf})
    return float(ece), bins


def _nll(d: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -d)))  # -log sigmoid(d) = log(1 + exp(-d))


def fit_temperature(margins: Sequence[float], t_min: float = 1e-3, t_max: float = 1e3) -> float | None:
    """The temperature ``T`` minimising ``mean(log(1 + exp(−d / T)))`` over ``[t_min, t_max]``.

    The loss is convex in ``β = 1/T``, hence unimodal in ``log β``: a golden-section search on
    ``log β`` finds it. When no margin is negative the optimum is ``T → 0`` and ``t_min`` is
    returned. ``inf`` when the best is ``T → ∞`` (``P = 0.5`` everywhere): the margins are
    anti-correlated with the preferences, so no positive temperature helps. ``None`` when there
    are no pairs or every margin is 0.
    """
    d = np.asarray(margins, np.float64)
    if len(d) == 0 or not np.any(d != 0):
        return None
    if not np.any(d < 0):  # separable: the loss falls as T -> 0
        return float(t_min)
    if d.mean() <= 0:  # the loss's slope in β = 1/T at 0 is −mean(d)/2 >= 0: convex, so T -> infinity
        return math.inf
    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)
    g = (math.sqrt(5) - 1) / 2
    f = lambda lb: float(np.mean(np.logaddexp(0.0, -d * math.exp(lb))))  # noqa: E731
    a, b = lo, hi
    x1, x2 = b - g * (b - a), a + g * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(100):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - g * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + g * (b - a)
            f2 = f(x2)
        if b - a < 1e-7:
            break
    if (a + b) / 2 - lo < 1e-4:  # at the upper bound of T: the margins point the wrong way on average
        return math.inf
    return float(1.0 / math.exp((a + b) / 2))


# ------------------------------------------------------------------ length bias


def length_bias(
    chosen: Sequence[float], rejected: Sequence[float], len_chosen: Sequence[float], len_rejected: Sequence[float],
) -> dict[str, Any]:
    """How much the rewards follow response length.

    * ``longer_baseline``: accuracy of always preferring the longer response,
      ``(#{ℓ_c > ℓ_r} + 0.5·#{ℓ_c = ℓ_r}) / n`` — the accuracy a pure length heuristic gets.
    * ``chosen_longer_fraction``: ``#{ℓ_c > ℓ_r} / n``.
    * ``by_longer_side``: the model's :func:`pairwise_accuracy` on pairs where the chosen
      response is longer, where the rejected one is, and where they are equally long. A model that
      rewards length does well on the first and badly on the second.
    * ``by_length_difference``: accuracy per bucket of ``ℓ_c − ℓ_r`` (:data:`LENGTH_BUCKETS`).
    * ``reward_length_pearson`` / ``reward_length_spearman``: correlation of reward with length
      over all 2n scored responses; ``margin_length_pearson``: of ``r_c − r_r`` with ``ℓ_c − ℓ_r``.

    Example:
        >>> length_bias([1, 1, 1], [0, 0, 0], [10, 5, 7], [3, 9, 7])["longer_baseline"]
        0.5
    """
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    lc, lr = np.asarray(len_chosen, np.float64), np.asarray(len_rejected, np.float64)
    n = int(len(c))
    if n == 0:
        return {"n": 0, "longer_baseline": None, "chosen_longer_fraction": None, "by_longer_side": {},
                "by_length_difference": [], "reward_length_pearson": None, "reward_length_spearman": None,
                "margin_length_pearson": None, "mean_length_chosen": None, "mean_length_rejected": None}
    longer, equal = lc > lr, lc == lr
    base = (longer.sum() + 0.5 * equal.sum()) / n
    lo, hi = wilson_interval(float(longer.sum() + 0.5 * equal.sum()), n)
    sides = {
        "chosen_longer": pairwise_accuracy(c[longer], r[longer]),
        "rejected_longer": pairwise_accuracy(c[lr > lc], r[lr > lc]),
        "same_length": pairwise_accuracy(c[equal], r[equal]),
    }
    diff = lc - lr
    buckets = []
    for low, high in LENGTH_BUCKETS:
        m = (diff >= low) & (diff <= high)
        buckets.append({"low": _f(low), "high": _f(high), "label": _bucket_label(low, high), **pairwise_accuracy(c[m], r[m])})
    rewards, lengths = np.concatenate([c, r]), np.concatenate([lc, lr])
    return {
        "n": n,
        "longer_baseline": float(base),
        "longer_baseline_ci": [lo, hi],
        "chosen_longer_fraction": float(longer.mean()),
        "by_longer_side": sides,
        "by_length_difference": buckets,
        "reward_length_pearson": _f(pearson(rewards, lengths)),
        "reward_length_spearman": _f(spearman(rewards, lengths)),
        "margin_length_pearson": _f(pearson(c - r, diff)),
        "mean_length_chosen": float(lc.mean()),
        "mean_length_rejected": float(lr.mean()),
    }


def _bucket_label(low: float, high: float) -> str:
    if low == high:
        return f"{int(low)}"
    if math.isinf(low):
        return f"≤{int(high)}"
    if math.isinf(high):
        return f"≥{int(low)}"
    return f"{int(low)}..{int(high)}"


# ------------------------------------------------------------------ distributions, strength


def reward_summary(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Mean/std of chosen and rejected rewards and mean/median/std of the margin ``d``."""
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if len(c) == 0:
        return {"n": 0}
    d = c - r
    return {
        "n": int(len(c)),
        "chosen_mean": float(c.mean()), "chosen_std": float(c.std()),
        "rejected_mean": float(r.mean()), "rejected_std": float(r.std()),
        "margin_mean": float(d.mean()), "margin_median": float(np.median(d)), "margin_std": float(d.std()),
        "bt_loss": _nll(d),
    }


def accuracy_by_strength(chosen: Sequence[float], rejected: Sequence[float], strength: Sequence[float], max_levels: int = 8) -> list[dict[str, Any]]:
    """Accuracy per level of a preference-strength field (e.g. ``margin``).

    With at most ``max_levels`` distinct values, one group per value; otherwise quantile bins
    (up to ``max_levels``, edges from the data). Pairs whose strength is nan are left out.
    """
    c, r, s = (np.asarray(x, np.float64) for x in (chosen, rejected, strength))
    ok = np.isfinite(s)
    c, r, s = c[ok], r[ok], s[ok]
    if len(s) == 0:
        return []
    values = np.unique(s)
    out = []
    if len(values) <= max_levels:
        for v in values:
            m = s == v
            out.append({"label": f"{v:g}", "low": float(v), "high": float(v), **pairwise_accuracy(c[m], r[m])})
        return out
    edges = np.unique(np.quantile(s, np.linspace(0, 1, max_levels + 1)))
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        m = (s >= lo) & ((s < hi) if i < len(edges) - 2 else (s <= hi))
        out.append({"label": f"{lo:.3g}..{hi:.3g}", "low": float(lo), "high": float(hi), **pairwise_accuracy(c[m], r[m])})
    return out


# ------------------------------------------------------------------ best-of-N


def best_of_n_accuracy(rewards: Sequence[Sequence[float]], best: Sequence[int]) -> dict[str, Any]:
    """Top-1 accuracy on prompts with K responses each and the index of the best one.

    A prompt scores 1 if the best response gets the strictly highest reward, ``1/k`` if it ties
    with ``k − 1`` others for the highest, else 0; ``top1 = mean(score)`` with a Wilson interval.
    ``random_baseline = mean(1/K)`` is what picking at random gets. ``best_vs_rest`` is the
    :func:`pairwise_accuracy` of the best response against every other one.

    Example:
        >>> best_of_n_accuracy([[0.1, 0.9, 0.3], [2.0, 2.0], [1.0, 0.0, 5.0, 2.0]], [1, 0, 0])["top1"]
        0.5
    """
    n = len(rewards)
    if n == 0:
        return {"n": 0, "top1": None, "ci_low": None, "ci_high": None, "random_baseline": None, "mean_k": None,
                "best_vs_rest": pairwise_accuracy([], [])}
    scores, inv_k, bc, rc = [], [], [], []
    for rw, b in zip(rewards, best):
        rw = np.asarray(rw, np.float64)
        top = rw.max()
        k = int((rw == top).sum())
        scores.append(1.0 / k if rw[b] == top else 0.0)
        inv_k.append(1.0 / len(rw))
        others = np.delete(rw, b)
        bc += [rw[b]] * len(others)
        rc += others.tolist()
    s = float(np.sum(scores))
    lo, hi = wilson_interval(s, n)
    return {
        "n": n, "top1": s / n, "ci_low": lo, "ci_high": hi, "random_baseline": float(np.mean(inv_k)),
        "mean_k": float(np.mean([len(x) for x in rewards])), "best_vs_rest": pairwise_accuracy(bc, rc),
    }


# ------------------------------------------------------------------ lists of K rated responses


def list_pair_margins(rewards: Sequence[float], scores: Sequence[float]) -> np.ndarray:
    """``r_i - r_j`` for every ordered pair ``(i, j)`` of one list, ``y_i > y_j`` (score ties make no pair).

    Example:
        >>> list_pair_margins([0.5, 2.0, 1.0], [3, 1, 1]).tolist()
        [-1.5, -0.5]
    """
    r, y = np.asarray(rewards, np.float64), np.asarray(scores, np.float64)
    above = y[:, None] > y[None, :]
    return (r[:, None] - r[None, :])[above]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: ``sum_{i<j} sx_ij sy_ij / sqrt(sum sx_ij^2 * sum sy_ij^2)`` with ``sx_ij = sign(x_i - x_j)``
    (ties in either side lower the denominator, as ``scipy.stats.kendalltau``); nan when a side is constant.

    Example:
        >>> kendall_tau([1, 2, 3], [1, 3, 2])
        0.3333333333333333
        >>> round(kendall_tau([1, 1, 2], [1, 2, 3]), 4)
        0.8165
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    iu = np.triu_indices(len(x), 1)
    sx, sy = np.sign(x[:, None] - x[None, :])[iu], np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float((sx * sx).sum() * (sy * sy).sum()))
    return float((sx * sy).sum() / den) if den > 0 else float("nan")


def ndcg(rewards: Sequence[float], scores: Sequence[float]) -> float:
    """NDCG of the order the rewards give, with gains ``g_i = y_i - min(y)`` (the worst response gains 0).

    ``DCG = sum_i g_i * mean_{p in P_i} 1 / log2(p + 1)`` where ``P_i`` are the 1-based positions the
    responses tied with ``i`` in reward occupy (the expected DCG over the orders of model ties);
    ``NDCG = DCG / IDCG``, IDCG the DCG of the responses sorted by score. nan when all scores tie.

    Example:
        >>> ndcg([0.1, 0.9], [1, 0])   # gains [1, 0]; the model puts the worse first: (1 / log2 3) / 1
        0.6309297535714575
        >>> ndcg([0.0, 0.0], [1, 0])   # a model tie: the mean discount of positions 1 and 2
        0.8154648767857288
    """
    r, y = np.asarray(rewards, np.float64), np.asarray(scores, np.float64)
    if len(y) == 0:
        return float("nan")
    g = y - y.min()
    disc = 1.0 / np.log2(np.arange(2, len(y) + 2))
    ideal = float((np.sort(g)[::-1] * disc).sum())
    if ideal == 0:
        return float("nan")
    order = np.argsort(-r, kind="stable")
    rs = r[order]
    dcg, i = 0.0, 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[i]:
            j += 1
        dcg += float(g[order[i : j + 1]].sum() * disc[i : j + 1].mean())
        i = j + 1
    return dcg / ideal


def top1(rewards: Sequence[float], scores: Sequence[float]) -> float:
    """1 if the highest-reward response has the list's best score; with ``k`` responses tied for the highest
    reward, the fraction of them that have it (what breaking the tie at random gets on average).

    Example:
        >>> top1([0.2, 0.9, 0.9], [1, 3, 2])
        0.5
    """
    r, y = np.asarray(rewards, np.float64), np.asarray(scores, np.float64)
    top = r == r.max()
    return float((y[top] == y.max()).mean())


def ranking_metrics(rewards: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Metrics of lists of K responses with true scores (higher is better, ties allowed).

    * ``accuracy``: the :func:`win_rate` of ``r_i - r_j`` over every ordered pair of every list
      (``y_i > y_j``), pooled; ``pairs`` counts them, ``mean_margin`` is their mean ``r_i - r_j``;
    * ``top1``: the mean of :func:`top1` over lists, ``random_top1`` what a random pick gets;
    * ``kendall_tau``: the mean of :func:`kendall_tau` over lists where it is defined (``tau_lists``);
    * ``ndcg``: the mean of :func:`ndcg` over lists whose scores are not all tied.

    Example:
        >>> m = ranking_metrics([[0.5, 2.0, 1.0], [1.0, 0.0]], [[3, 1, 1], [1, 0]])
        >>> m["pairs"], m["accuracy"], m["top1"]
        (3, 0.3333333333333333, 0.5)
    """
    n = len(rewards)
    if n == 0:
        return {"lists": 0, "pairs": 0, "accuracy": None, "top1": None, "kendall_tau": None, "ndcg": None}
    margins = [list_pair_margins(r, y) for r, y in zip(rewards, scores)]
    d = np.concatenate(margins) if margins else np.zeros(0)
    taus = [t for t in (kendall_tau(r, y) for r, y in zip(rewards, scores)) if not math.isnan(t)]
    ndcgs = [v for v in (ndcg(r, y) for r, y in zip(rewards, scores)) if not math.isnan(v)]
    acc = float(win_rate(d)) if len(d) else None
    lo, hi = wilson_interval(acc * len(d), len(d)) if acc is not None else (None, None)
    y_top = [float((np.asarray(y) == np.max(y)).mean()) for y in scores]
    return {
        "lists": n, "responses": int(sum(len(r) for r in rewards)), "pairs": int(len(d)), "accuracy": acc,
        "ci_low": lo, "ci_high": hi, "mean_margin": float(d.mean()) if len(d) else None,
        "top1": float(np.mean([top1(r, y) for r, y in zip(rewards, scores)])), "random_top1": float(np.mean(y_top)),
        "kendall_tau": float(np.mean(taus)) if taus else None, "tau_lists": len(taus),
        "ndcg": float(np.mean(ndcgs)) if ndcgs else None,
    }


# ------------------------------------------------------------------ regression


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """``cov(x, y) / (std(x)·std(y))``; nan with fewer than 2 points or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the ranks (average ranks for ties)."""
    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def regression_report(pred: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per attribute, over rows whose label is present (not nan):
    ``MSE = mean((ŷ − y)²)``, ``MAE = mean(|ŷ − y|)``, Pearson and Spearman correlation.
    """
    pred, labels = np.asarray(pred, np.float64), np.asarray(labels, np.float64)
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        m = np.isfinite(labels[:, j]) if len(labels) else np.zeros(0, bool)
        p, y = pred[m, j] if len(pred) else np.zeros(0), labels[m, j] if len(labels) else np.zeros(0)
        if len(y) == 0:
            out[name] = {"n": 0, "mse": None, "mae": None, "pearson": None, "spearman": None}
            continue
        out[name] = {
            "n": int(len(y)), "mse": float(np.mean((p - y) ** 2)), "mae": float(np.mean(np.abs(p - y))),
            "pearson": _f(pearson(p, y)), "spearman": _f(spearman(p, y)),
            "label_mean": float(y.mean()), "pred_mean": float(p.mean()), "label_std": float(y.std()), "pred_std": float(p.std()),
        }
    return out


# ------------------------------------------------------------------ comparing two models


def compare_pairs(margin_a: Sequence[float], margin_b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of two models on the same pairs.

    ``a_only`` / ``b_only``: pairs only model A / only model B gets right (``d > 0``);
    ``agreement``: fraction of pairs where both pick the same side; ``mcnemar_p``: exact two-sided
    McNemar (binomial) p-value of ``a_only`` vs ``b_only`` — small means the accuracy difference
    is unlikely to be chance.
    """
    a, b = np.asarray(margin_a, np.float64), np.asarray(margin_b, np.float64)
    n = int(len(a))
    if n == 0:
        return {"n": 0, "agreement": None, "a_only": 0, "b_only": 0, "both": 0, "neither": 0, "mcnemar_p": None}
    ra, rb = a > 0, b > 0
    a_only, b_only = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    return {
        "n": n,
        "agreement": float((np.sign(a) == np.sign(b)).mean()),
        "a_only": a_only, "b_only": b_only, "both": int((ra & rb).sum()), "neither": int((~ra & ~rb).sum()),
        "mcnemar_p": mcnemar_p(a_only, b_only),
    }


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``min(1, 2·P(X ≤ min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    # log-space binomial tail, stable for large m
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
    mx = max(logs)
    tail = math.exp(mx) * sum(math.exp(v - mx) for v in logs)
    return float(min(1.0, 2 * tail))


# ------------------------------------------------------------------ ensembles: uncertainty


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive ``labels``: the probability that a random
    positive scores above a random negative, ties counting one half (Mann–Whitney):

        ``AUROC = (Σ_{i positive} rank_i − n₊(n₊ + 1)/2) / (n₊ · n₋)`` with average ranks for ties.

    None when either class is empty.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def accuracy_by_uncertainty(margins: Sequence[float], uncertainty: Sequence[float], n_bins: int = 5) -> list[dict[str, Any]]:
    """Pairwise accuracy (ties one half) in ``n_bins`` equal-count bins of ``uncertainty``, least uncertain first
    (quintiles by default).

    The pairs are sorted by uncertainty (stable, so equal uncertainties keep their order) and cut into
    ``n_bins`` consecutive groups whose sizes differ by at most one (``numpy.array_split``). Each bin gives
    ``n``, the uncertainty range ``[low, high]``, ``accuracy`` and its 95% Wilson interval ``[ci_low, ci_high]``.

    Example:
        >>> [b["accuracy"] for b in accuracy_by_uncertainty([1, 1, -1, -1], [0.1, 0.2, 0.3, 0.4], n_bins=2)]
        [1.0, 0.0]
    """
    d = np.asarray(margins, np.float64)
    u = np.asarray(uncertainty, np.float64)
    if len(d) == 0:
        return []
    order = np.argsort(u, kind="stable")
    out = []
    for b, idx in enumerate(np.array_split(order, min(n_bins, len(d)))):
        acc = float(win_rate(d[idx]))
        lo, hi = wilson_interval(acc * len(idx), len(idx))
        out.append({"bin": b, "n": int(len(idx)), "low": float(u[idx].min()), "high": float(u[idx].max()),
                    "accuracy": acc, "ci_low": lo, "ci_high": hi})
    return out


def ensemble_probability_margin(member_margins: np.ndarray) -> np.ndarray:
    """The margin whose sigmoid is the ensemble's probability ``p = mean_k sigmoid(d_k)`` (the members'
    average Bradley–Terry probability): ``logit(p)``, with ``p`` clipped to ``[1e-12, 1 - 1e-12]``."""
    p = np.clip(sigmoid(np.asarray(member_margins, np.float64)).mean(-1), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def flip_probability(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``Phi(-|mean| / std)``: the chance a normal with this mean and std has the other sign; 0.5 at a zero
    mean, 0 where ``std`` is 0 and the mean is not.

    Example:
        >>> flip_probability([0.0, 1.0, 1.0, -2.0], [1.0, 1.0, 0.0, 1.0]).round(4).tolist()
        [0.5, 0.1587, 0.0, 0.0228]
    """
    from math import erfc, sqrt

    d, u = np.abs(np.asarray(mean, np.float64)), np.asarray(std, np.float64)
    z = np.divide(d, u, out=np.where(d > 0, np.inf, 0.0), where=u > 0)
    return np.array([0.5 * erfc(v / sqrt(2.0)) for v in z.ravel()]).reshape(z.shape)


def ensemble_pair_report(member_margins: Sequence[Sequence[float]], n_bins: int = 5, calibration_bins: int = 10) -> dict[str, Any]:
    """What an ensemble's disagreement says about pairs, from every member's margin ``d_ik`` ``[n, K]``.

    * ``d_i = mean_k d_ik`` (the margin of the ensemble's mean reward) and the uncertainty
      ``u_i = std_k d_ik`` (population, ``ddof=0``): how much the members disagree on the preference;
    * ``accuracy``: of ``d`` (ties one half), with its 95% Wilson interval; ``member_accuracy``: of each ``d_·k``;
    * ``uncertainty_bins``: :func:`accuracy_by_uncertainty` of ``d`` by ``u`` (quintiles; the first is the 20%
      least uncertain pairs, the last the 20% most uncertain);
    * ``auroc_std_wrong``: :func:`auroc` of ``u`` for the wrong pairs (``d_i ≤ 0``): 0.5 = the uncertainty says
      nothing, 1 = every wrong pair is more uncertain than every right one;
    * ``flip_bins`` / ``auroc_flip_wrong``: the same for the scale-free disagreement ``f_i = Phi(-|d_i| / u_i)``,
      the chance that the preference flips sign if the members' margins were normal around ``d_i`` (0.5 where
      ``d_i = 0``; 0 where every member agrees exactly). The std grows with the size of the margin, and a large
      margin is more often right, so ``u`` alone can even rank the right pairs as the uncertain ones; ``f``
      divides that out;
    * ``auroc_margin_wrong``: :func:`auroc` of ``-|d_i|`` for the wrong pairs: what the mean margin's own size
      (any single model's confidence) already says, the reference an ensemble's uncertainty should beat;
    * ``calibration``: :func:`calibration` (ECE, NLL) of ``P(chosen > rejected)`` three ways: ``member_0``
      (``sigmoid(d_·0)``, one model without the ensemble), ``mean_reward`` (``sigmoid(d)``) and ``ensemble``
      (``mean_k sigmoid(d_ik)``, the members' average probability, through :func:`ensemble_probability_margin`).
    """
    m = np.asarray(member_margins, np.float64)
    if m.ndim != 2 or len(m) == 0:
        return {"pairs": 0}
    d, u = m.mean(1), m.std(1)
    flip = flip_probability(d, u)
    acc = float(win_rate(d))
    lo, hi = wilson_interval(acc * len(d), len(d))
    wrong = d <= 0
    cal = lambda x: {k: v for k, v in calibration(x, calibration_bins).items() if k != "bins"}  # noqa: E731
    return {
        "pairs": int(len(d)),
        "accuracy": acc,
        "ci_low": lo,
        "ci_high": hi,
        "member_accuracy": [float(win_rate(m[:, k])) for k in range(m.shape[1])],
        "std_mean": float(u.mean()),
        "std_median": float(np.median(u)),
        "uncertainty_bins": accuracy_by_uncertainty(d, u, n_bins),
        "auroc_std_wrong": _f(auroc(u, wrong)),
        "flip_bins": accuracy_by_uncertainty(d, flip, n_bins),
        "auroc_flip_wrong": _f(auroc(flip, wrong)),
        "auroc_margin_wrong": _f(auroc(-np.abs(d), wrong)),
        "wrong_pairs": int(wrong.sum()),
        "calibration": {"member_0": cal(m[:, 0]), "mean_reward": cal(d), "ensemble": cal(ensemble_probability_margin(m))},
    }
