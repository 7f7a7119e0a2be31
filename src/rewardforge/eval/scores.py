"""Scoring evaluation data: every item rendered and scored through the model's scorer, into
:class:`PairScores` / :class:`BestOfNScores` / :class:`RatedScores`; the overlap of a dataset with
the model's training prompts (``training_prompts.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rewardforge.data.formats import BestOfN, PreferencePair, RatedResponse
from rewardforge.data.readers import DataError
from rewardforge.errors import ConfigError
from rewardforge.eval import metrics as M
from rewardforge.eval.data import EvalDataset, group_of, pick_strength_field, strength_of


@dataclass
class PairScores:
    chosen: np.ndarray
    rejected: np.ndarray
    len_chosen: np.ndarray
    len_rejected: np.ndarray
    groups: list[str]
    strength: np.ndarray | None
    strength_field: str | None
    truncated: int
    prompt_keys: list[str] | None = None  # sha1 of each pair's rendered prompt, as training keys it
    members_chosen: np.ndarray | None = None  # ensembles: every member's reward [n, K]
    members_rejected: np.ndarray | None = None


@dataclass
class BestOfNScores:
    rewards: list[np.ndarray]
    best: list[int]
    groups: list[str]
    truncated: int


@dataclass
class ListScores:
    rewards: list[np.ndarray]
    scores: list[list[float]]
    groups: list[str]
    truncated: int


@dataclass
class RatedScores:
    pred: np.ndarray  # [n, N]
    labels: np.ndarray  # [n, N], nan where missing
    attributes: list[str]
    truncated: int


def render_item(scorer, prompt, response, where: str) -> tuple[str, int]:
    renderer = getattr(scorer, "renderer", None)
    if renderer is not None:
        return renderer.render(prompt, response, where)
    return scorer.render(prompt, response)


OVERALL_BAR: list = []  # the one bar of a whole evaluation (every model, every file), when evaluate_model shows one


def _score_all(scorer, texts: list[str], starts: list[int], *, progress: bool, desc: str,
               members: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Rewards ``[n]`` and outputs ``[n, N]`` of every text; chunks of similar length (little padding).
    An ensemble's members' rewards ``[n, K]`` go to ``members["members"]`` when a dict is given."""
    from tqdm.auto import tqdm

    n = len(texts)
    reward = np.zeros(n, np.float64)
    outputs: np.ndarray | None = None
    truncated = 0
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunk = max(1, int(getattr(scorer, "batch_size", 16)) * 8)
    overall = OVERALL_BAR[-1] if OVERALL_BAR else None
    with tqdm(total=n, desc=desc, unit="seq", disable=not progress or overall is not None, leave=False,
              dynamic_ncols=True) as bar:
        for s in range(0, n, chunk):
            idx = order[s : s + chunk]
            sc = scorer.score_rendered([texts[i] for i in idx], [starts[i] for i in idx])
            reward[idx] = np.asarray(sc.reward, np.float64)
            out = np.asarray(getattr(sc, "outputs", np.asarray(sc.reward)[:, None]), np.float64)
            if outputs is None:
                outputs = np.zeros((n, out.shape[1]), np.float64)
            outputs[idx] = out
            if members is not None and getattr(sc, "members", None) is not None:
                members.setdefault("members", np.zeros((n, sc.members.shape[1]), np.float64))[idx] = sc.members
            truncated += int(np.asarray(getattr(sc, "truncated", np.zeros(len(idx), bool))).sum())
            bar.update(len(idx))
            if overall is not None:
                overall.set_postfix_str(desc, refresh=False)
                overall.update(len(idx))
    return reward, outputs if outputs is not None else np.zeros((0, 1)), truncated


def response_lengths(scorer, texts: Sequence[str], starts: Sequence[int]) -> tuple[np.ndarray, str]:
    """Length of each rendered response (``text[start:]``): tokens without special tokens, or characters."""
    parts = [t[s:] for t, s in zip(texts, starts)]
    tok = getattr(scorer, "tokenizer", None)
    if tok is None:
        return np.array([len(p) for p in parts], np.float64), "characters"
    lengths: list[int] = []
    for s in range(0, len(parts), 1024):
        enc = tok(parts[s : s + 1024], add_special_tokens=False, return_attention_mask=False, verbose=False)
        lengths += [len(x) for x in enc["input_ids"]]
    return np.array(lengths, np.float64), "tokens"


def _prompt_keys(scorer, texts: Sequence[str], starts: Sequence[int]) -> list[str]:
    """The key training gave each prompt (``datasets.prompt_key`` of the rendered prompt as the training tokenizer
    renders it: without the special tokens an export's template writes and the training tokenizer added)."""
    from rewardforge.data.datasets import prompt_key

    fmt = getattr(getattr(scorer, "inputs", None), "format", None)
    lead = fmt.lead if fmt is not None and fmt.written else ""
    keys = []
    for t, s in zip(texts, starts):
        head = t[:s]
        keys.append(prompt_key(head[len(lead):] if lead and head.startswith(lead) else head))
    return keys


def training_overlap(ps: PairScores, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """How many pairs of a dataset the model was trained (or validated) on, and its accuracy on each part."""
    from rewardforge.export.model_dir import KEY_CHARS

    train, val = set(fingerprint.get("train", ())), set(fingerprint.get("validation", ()))
    keys = [k[:KEY_CHARS] for k in ps.prompt_keys or []]
    seen = np.array([k in train for k in keys], bool)
    in_val = np.array([k in val for k in keys], bool)
    n = len(keys)
    acc = lambda m: M.pairwise_accuracy(ps.chosen[m], ps.rejected[m])  # noqa: E731
    return {"pairs": n, "in_training": int(seen.sum()), "share_in_training": float(seen.mean()) if n else 0.0,
            "in_validation": int(in_val.sum()), "accuracy_in_training": acc(seen) if seen.any() else None,
            "accuracy_unseen": acc(~seen) if (~seen).any() else None}


def _score_groups(scorer, groups, *, progress: bool, desc: str) -> tuple[list[np.ndarray], int]:
    """The rewards of every response of each group (a best-of-N row or a list: ``prompt``, ``responses``), scored
    together, and the number of truncated sequences."""
    texts, starts = [], []
    for it in groups:
        for r in it.responses:
            t, s = render_item(scorer, it.prompt, r, it.where)
            texts.append(t), starts.append(s)
    reward, _, trunc = _score_all(scorer, texts, starts, progress=progress, desc=desc)
    bounds = np.cumsum([len(it.responses) for it in groups])[:-1]
    return (np.split(reward, bounds) if len(groups) else []), trunc


def score_dataset(scorer, ds: EvalDataset, *, subset_field: str | None = None, strength_field: str | None = None,
                  progress: bool = False, desc: str = "") -> tuple[Any, str]:
    """Score one dataset; returns (PairScores | BestOfNScores | RatedScores | None, length unit)."""
    desc = desc or ds.name
    if ds.kind == "pairs":
        pairs: list[PreferencePair] = ds.items
        texts, starts = [], []
        for side in ("chosen", "rejected"):
            for p in pairs:
                t, s = render_item(scorer, p.prompt, getattr(p, side), p.where)
                texts.append(t), starts.append(s)
        kept: dict = {}
        reward, _, trunc = _score_all(scorer, texts, starts, progress=progress, desc=desc, members=kept)
        lengths, unit = response_lengths(scorer, texts, starts)
        n = len(pairs)
        sf = pick_strength_field(pairs, strength_field)
        strength = np.array([strength_of(p, sf) for p in pairs], np.float64) if sf else None
        m = kept.get("members")
        return PairScores(reward[:n], reward[n:], lengths[:n], lengths[n:], [group_of(p.extra, subset_field) for p in pairs],
                          strength, sf, trunc, _prompt_keys(scorer, texts[:n], starts[:n]),
                          m[:n] if m is not None else None, m[n:] if m is not None else None), unit
    if ds.kind == "best_of_n":
        items: list[BestOfN] = ds.items
        rewards, trunc = _score_groups(scorer, items, progress=progress, desc=desc)
        return BestOfNScores(rewards, [it.best for it in items], [group_of(it.extra, subset_field) for it in items], trunc), "tokens"
    if ds.kind == "lists":
        lists = ds.items
        rewards, trunc = _score_groups(scorer, lists, progress=progress, desc=desc)
        return ListScores(rewards, [it.scores for it in lists],
                          [group_of(it.extra, subset_field) for it in lists], trunc), "tokens"
    if ds.kind == "rated":
        items_r: list[RatedResponse] = ds.items
        attrs = list(items_r[0].labels) if items_r else []
        texts, starts = [], []
        for it in items_r:
            t, s = render_item(scorer, it.prompt, it.response, it.where)
            texts.append(t), starts.append(s)
        _, outputs, trunc = _score_all(scorer, texts, starts, progress=progress, desc=desc)
        model_attrs = list(getattr(scorer, "attributes", None) or attrs)
        missing = [a for a in attrs if a not in model_attrs]
        if missing:
            raise DataError(f"{ds.path}: label {missing[0]!r} is not an attribute the model predicts ({model_attrs})")
        outputs = outputs[:, [model_attrs.index(a) for a in attrs]] if len(outputs) else np.zeros((0, len(attrs)))
        labels = np.array([[np.nan if it.labels[a] is None else it.labels[a] for a in attrs] for it in items_r], np.float64)
        return RatedScores(outputs, labels.reshape(len(items_r), len(attrs)), attrs, trunc), "tokens"
    return None, "tokens"


def scorer_from_model(model, tokenizer, *, max_length: int, truncation: str = "prompt_left",
                      attributes: Sequence[str] | None = None, attribute_weights: Sequence[float] | None = None,
                      batch_size: int = 32, device=None, ensemble_size: int = 1):
    """A :class:`~rewardforge.scoring.RewardScorer` around an in-memory model, leaving its train mode as it was.

    ``tokenizer`` must have the training template installed (``setup_template``); ``ensemble_size``: the model's
    members (``model.ensemble_size``).
    """
    from rewardforge.losses import default_weights
    from rewardforge.scoring import RewardScorer

    attrs = list(attributes or [])
    weights = list(attribute_weights or default_weights(max(len(attrs), 1)))
    meta = {"max_length": max_length, "truncation": truncation, "attributes": attrs, "attribute_weights": weights}
    if ensemble_size > 1:
        meta["ensemble"] = {"size": ensemble_size}
    was_training = model.training
    if device is None:
        device = next(model.parameters()).device
    scorer = RewardScorer(model, tokenizer, meta, device=device, batch_size=batch_size)
    model.train(was_training)
    return scorer


def keep_validation_pairs(scorer, datasets: Sequence[EvalDataset]) -> None:
    """Keep, in each pair dataset, only the pairs whose prompt the model's run held out for validation."""
    from rewardforge.export.model_dir import KEY_CHARS, PROMPTS_FILE

    fingerprint = training_fingerprint(scorer)
    if fingerprint is None:
        raise ConfigError(f"{scorer.model_dir} has no {PROMPTS_FILE} (exported by an older rewardforge), so its "
                          "validation split is not known; pass the data to evaluate with --data")
    val = set(fingerprint["validation"])
    for ds in datasets:
        if ds.kind != "pairs":
            continue
        rendered = [render_item(scorer, p.prompt, p.chosen, p.where) for p in ds.items]
        keys = _prompt_keys(scorer, [t for t, _ in rendered], [s for _, s in rendered])
        ds.items = [p for p, k in zip(ds.items, keys) if k[:KEY_CHARS] in val]
        if not ds.items:
            ds.kind = "empty"


def training_fingerprint(scorer) -> dict[str, Any] | None:
    """The export's training_prompts.json (None for models without one: older exports, models in memory)."""
    from rewardforge.export.model_dir import PROMPTS_FILE

    d = getattr(scorer, "model_dir", None)
    if d is None or not (Path(d) / PROMPTS_FILE).is_file():
        return None
    return json.loads((Path(d) / PROMPTS_FILE).read_text())
