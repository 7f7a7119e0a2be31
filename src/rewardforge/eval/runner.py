"""Load evaluation data, score it with one or more exported models and compute every metric.

Data kinds (detected per file from its first row):

* **pairs** — any pairwise format the core reads (explicit, implicit_prompt/HH-RLHF,
  conversational, NeMo comparison); parsed by :func:`rewardforge.data.formats.parse_rows`.
* **rated** — regression rows (``prompt/response/labels`` or NeMo ``text/label``), for regression
  models: per-attribute MSE, MAE, Pearson, Spearman.
* **best_of_n** — ``{"prompt": ..., "responses": [r_0, ..., r_{K-1}], "best": i}`` (K >= 2; the
  prompt and each response a string or a list of messages, like the explicit format; any other
  field, e.g. ``subset``, is kept): top-1 accuracy.

Texts are rendered exactly as in training (the model's own :class:`~rewardforge.data.template.TextRenderer`)
and scored with :meth:`RewardScorer.score_rendered`, in chunks of similar length so padding stays small.

**Length** is the number of tokens of the rendered response (the text after the prompt,
tokenized without special tokens, before truncation); characters when the scorer has no tokenizer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rewardforge.config import ConfigError
from rewardforge.data.formats import (
    ParseReport,
    PreferencePair,
    RatedResponse,
    _conversation,
    detect_format,
    parse_rows,
)
from rewardforge.data.readers import DataError, Row, expand_sources, read_rows
from rewardforge.eval import metrics as M

SUBSET_FIELDS = ("subset", "category")
STRENGTH_FIELDS = ("margin", "preference_strength", "strength", "score_diff", "agreement")
NO_SUBSET = "(none)"


# ------------------------------------------------------------------ data


@dataclass
class BestOfN:
    """A prompt with K responses and the index of the best one."""

    prompt: Any
    responses: list
    best: int
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass
class EvalDataset:
    """One evaluation file, parsed. ``items`` holds what is scored (pairs with identical sides left out)."""

    name: str
    path: str
    kind: str  # "pairs" | "rated" | "best_of_n" | "empty"
    items: list
    format: str = "auto"
    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_messages: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    all_groups: list[str] = field(default_factory=list)  # every subset label seen, incl. excluded pairs

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "kind": self.kind, "format": self.format, "rows_read": self.rows_read,
                "examples": len(self.items), "skipped_bad_rows": sum(self.skipped.values()),
                "bad_row_messages": self.skip_messages[:5], "excluded": dict(self.excluded)}


def _dataset_name(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) or path
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base or path


def _unique_names(paths: Sequence[str], name_of) -> list[str]:
    """Short distinct names: the basename, extended by parent directories where two collide."""
    names = [name_of(p) for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 6:
        depth += 1
        for i, p in enumerate(paths):
            if names.count(names[i]) > 1:
                parts = Path(os.path.abspath(p)).parts
                names[i] = "/".join(parts[-depth:-1] + (name_of(p),))
    for i in range(len(names)):  # identical paths given twice
        if names.count(names[i]) > 1:
            names[i] = f"{names[i]}#{i + 1}"
    return names


def _is_best_of_n(record: Any) -> bool:
    return isinstance(record, dict) and "responses" in record and "best" in record


def _parse_best_of_n(row: Row) -> BestOfN:
    rec, where = row.data, row.where
    if isinstance(rec, DataError):
        raise rec
    if not _is_best_of_n(rec):
        raise DataError(f"{where}: best-of-N rows need fields 'responses' and 'best' (fields present: {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})")
    responses = rec["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 responses, got {str(responses)[:60]!r}")
    best = rec["best"]
    if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < len(responses):
        raise DataError(f"{where}: field 'best' must be the index (0..{len(responses) - 1}) of the best response, got {best!r}")
    raw_prompt = rec.get("prompt")
    # Only a missing, null or empty-list prompt means "no prompt"; 0, False or "" are errors named by _conversation.
    prompt = [] if raw_prompt is None or raw_prompt == [] else _conversation(raw_prompt, where, "prompt", "user")
    resp = [_conversation(r, where, f"responses[{i}]", "assistant") for i, r in enumerate(responses)]
    extra = {k: v for k, v in rec.items() if k not in ("prompt", "responses", "best")}
    return BestOfN(prompt, resp, best, extra, where)


def load_eval_data(
    paths: Sequence[str],
    *,
    fmt: str = "auto",
    attributes: Sequence[str] | None = None,
    skip_bad_rows: bool = False,
    field_map: Mapping[str, str] | None = None,
    split: str = "train",
    limit: int = 0,
    subset_field: str | None = None,
) -> list[EvalDataset]:
    """Read and parse each data file (glob, directory or hub name) into an :class:`EvalDataset`.

    Args:
        fmt: ``auto`` (detected per file), ``best_of_n`` or any ``data.format`` of the core.
        attributes: a regression model's attribute names (needed for rated data only).
        limit: keep at most this many examples per file (0: all).

    Raises:
        DataError: naming file, line and field, exactly as training does (unless ``skip_bad_rows``).
    """
    if not paths:
        raise DataError("no evaluation data given; pass one or more data files")
    files = expand_sources(list(paths))
    names = _unique_names(files, _dataset_name)
    out = []
    for name, path in zip(names, files):
        rows = iter(read_rows(path, split))
        head: list[Row] = []  # rows up to the first readable one, which tells the kind of data
        for row in rows:
            head.append(row)
            if not isinstance(row.data, DataError) or len(head) >= 1000:
                break
        first = next((r for r in head if not isinstance(r.data, DataError)), None)
        probe = first.data if first is not None else None
        if isinstance(probe, dict) and field_map:
            probe = {**probe, **{ours: probe[theirs] for ours, theirs in field_map.items() if theirs in probe}}
        ds = EvalDataset(name, path, "empty", [], fmt)
        if not head:
            out.append(ds)
            continue
        rows = itertools.chain(head, rows)
        report = ParseReport()
        if fmt == "best_of_n" or (fmt == "auto" and _is_best_of_n(probe)):
            ds.kind, ds.format = "best_of_n", "best_of_n"
            for row in rows:
                report.rows_read += 1
                if field_map and isinstance(row.data, dict):
                    row = Row({**{k: v for k, v in row.data.items() if k not in field_map.values()},
                               **{o: row.data[t] for o, t in field_map.items() if t in row.data}}, row.source, row.index, row.lines)
                try:
                    ds.items.append(_parse_best_of_n(row))
                except DataError as e:
                    if not skip_bad_rows:
                        raise
                    report.skip("bad_row", str(e))
                if limit and len(ds.items) >= limit:
                    break
        else:
            if fmt == "auto" and isinstance(probe, dict):
                try:
                    ds.format = detect_format(probe, first.where if first else path)
                except DataError:
                    ds.format = "auto"  # parse_rows raises the error with its context
            kind_rated = ds.format in ("regression", "nemo_regression") or fmt in ("regression", "nemo_regression")
            if kind_rated and not attributes:
                raise DataError(
                    f"{path}: these are rated responses ({ds.format}); they can only be evaluated with a regression "
                    "model (one with attributes), but this model predicts a single reward. Evaluate preference pairs instead."
                )
            parsed = parse_rows(rows, fmt, attributes=list(attributes or []), skip_bad_rows=skip_bad_rows,
                                field_map=dict(field_map or {}), report=report)
            seen_groups: dict[str, None] = {}
            for ex in parsed:
                if isinstance(ex, PreferencePair):
                    ds.kind = "pairs"
                    seen_groups[_group_of(ex.extra, subset_field)] = None
                    if _same(ex.chosen, ex.rejected):
                        ds.excluded["identical_responses"] = ds.excluded.get("identical_responses", 0) + 1
                        continue
                else:
                    ds.kind = "rated"
                ds.items.append(ex)
                if limit and len(ds.items) >= limit:
                    break
            ds.all_groups = list(seen_groups)
        ds.rows_read = report.rows_read
        ds.skipped = dict(report.skipped)
        ds.skip_messages = list(report.examples)
        out.append(ds)
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _subset_key(extra: Mapping[str, Any], subset_field: str | None) -> str | None:
    if subset_field:
        return subset_field
    for f in SUBSET_FIELDS:
        if f in extra:
            return f
    return None


def _group_of(extra: Mapping[str, Any], subset_field: str | None) -> str:
    key = _subset_key(extra, subset_field)
    if key is None or extra.get(key) is None:
        return NO_SUBSET
    v = extra[key]
    return v if isinstance(v, str) else json.dumps(v)


def _strength_of(ex: PreferencePair, fieldname: str) -> float:
    v = ex.margin if fieldname == "margin" else ex.extra.get(fieldname)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _pick_strength_field(pairs: Sequence[PreferencePair], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    for f in STRENGTH_FIELDS:
        if any(np.isfinite(_strength_of(p, f)) for p in pairs):
            return f
    return None


# ------------------------------------------------------------------ scoring


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


@dataclass
class BestOfNScores:
    rewards: list[np.ndarray]
    best: list[int]
    groups: list[str]
    truncated: int


@dataclass
class RatedScores:
    pred: np.ndarray  # [n, N]
    labels: np.ndarray  # [n, N], nan where missing
    attributes: list[str]
    truncated: int


def _render(scorer, prompt, response, where: str) -> tuple[str, int]:
    renderer = getattr(scorer, "renderer", None)
    if renderer is not None:
        return renderer.render(prompt, response, where)
    return scorer.render(prompt, response)


_OVERALL: list = []  # the one bar of a whole evaluation (every model, every file), when evaluate_model shows one


def _score_all(scorer, texts: list[str], starts: list[int], *, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Rewards ``[n]`` and outputs ``[n, N]`` of every text; chunks of similar length (little padding)."""
    from tqdm.auto import tqdm

    n = len(texts)
    reward = np.zeros(n, np.float64)
    outputs: np.ndarray | None = None
    truncated = 0
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunk = max(1, int(getattr(scorer, "batch_size", 16)) * 8)
    overall = _OVERALL[-1] if _OVERALL else None
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


def score_dataset(scorer, ds: EvalDataset, *, subset_field: str | None = None, strength_field: str | None = None,
                  progress: bool = False, desc: str = "") -> tuple[Any, str]:
    """Score one dataset; returns (PairScores | BestOfNScores | RatedScores | None, length unit)."""
    desc = desc or ds.name
    if ds.kind == "pairs":
        pairs: list[PreferencePair] = ds.items
        texts, starts = [], []
        for side in ("chosen", "rejected"):
            for p in pairs:
                t, s = _render(scorer, p.prompt, getattr(p, side), p.where)
                texts.append(t), starts.append(s)
        reward, _, trunc = _score_all(scorer, texts, starts, progress=progress, desc=desc)
        lengths, unit = response_lengths(scorer, texts, starts)
        n = len(pairs)
        sf = _pick_strength_field(pairs, strength_field)
        strength = np.array([_strength_of(p, sf) for p in pairs], np.float64) if sf else None
        return PairScores(reward[:n], reward[n:], lengths[:n], lengths[n:], [_group_of(p.extra, subset_field) for p in pairs],
                          strength, sf, trunc, _prompt_keys(scorer, texts[:n], starts[:n])), unit
    if ds.kind == "best_of_n":
        items: list[BestOfN] = ds.items
        texts, starts, owner = [], [], []
        for i, it in enumerate(items):
            for r in it.responses:
                t, s = _render(scorer, it.prompt, r, it.where)
                texts.append(t), starts.append(s), owner.append(i)
        reward, _, trunc = _score_all(scorer, texts, starts, progress=progress, desc=desc)
        owner_a = np.asarray(owner)
        rewards = [reward[owner_a == i] for i in range(len(items))]
        return BestOfNScores(rewards, [it.best for it in items], [_group_of(it.extra, subset_field) for it in items], trunc), "tokens"
    if ds.kind == "rated":
        items_r: list[RatedResponse] = ds.items
        attrs = list(items_r[0].labels) if items_r else []
        texts, starts = [], []
        for it in items_r:
            t, s = _render(scorer, it.prompt, it.response, it.where)
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


# ------------------------------------------------------------------ metrics


def pair_dataset_metrics(ps: PairScores, all_groups: Sequence[str] = (), n_bins: int = 10) -> dict[str, Any]:
    """Every pairwise metric of one model on one dataset (see :mod:`rewardforge.eval.metrics`)."""
    subsets = M.grouped_accuracy(ps.chosen, ps.rejected, ps.groups)
    for g in all_groups:  # subsets whose pairs were all excluded: reported with n = 0
        subsets.setdefault(g, M.pairwise_accuracy([], []))
    if set(subsets) == {NO_SUBSET}:
        subsets = {}
    strength = None
    if ps.strength_field:
        strength = {"field": ps.strength_field, "levels": M.accuracy_by_strength(ps.chosen, ps.rejected, ps.strength)}
    return {
        "kind": "pairs",
        "overall": M.pairwise_accuracy(ps.chosen, ps.rejected),
        "subsets": dict(sorted(subsets.items())),
        "calibration": M.calibration(ps.chosen - ps.rejected, n_bins),
        "length": M.length_bias(ps.chosen, ps.rejected, ps.len_chosen, ps.len_rejected),
        "rewards": M.reward_summary(ps.chosen, ps.rejected),
        "strength": strength,
        "truncated_sequences": ps.truncated,
    }


def best_of_n_metrics(bs: BestOfNScores) -> dict[str, Any]:
    out = {"kind": "best_of_n", **M.best_of_n_accuracy(bs.rewards, bs.best), "truncated_sequences": bs.truncated}
    groups = sorted(set(bs.groups) - {NO_SUBSET})
    out["subsets"] = {g: M.best_of_n_accuracy([r for r, gg in zip(bs.rewards, bs.groups) if gg == g],
                                              [b for b, gg in zip(bs.best, bs.groups) if gg == g]) for g in groups}
    return out


def rated_metrics(rs: RatedScores) -> dict[str, Any]:
    return {"kind": "rated", "n": int(len(rs.labels)), "attributes": M.regression_report(rs.pred, rs.labels, rs.attributes),
            "truncated_sequences": rs.truncated}


def resolve_sections(sections: Any, groups: Iterable[str]) -> dict[str, list[str]] | None:
    """``None``/``"auto"``: RewardBench's mapping when a subset name matches one of its subsets;
    ``"none"``: no sections; ``"rewardbench"``; a mapping ``{section: [subset, ...]}``; or a
    JSON/YAML file holding one."""
    if sections is None or sections == "auto":
        known = {s for v in M.REWARDBENCH_SECTIONS.values() for s in v}
        return M.REWARDBENCH_SECTIONS if known & set(groups) else None
    if sections == "none":
        return None
    if sections == "rewardbench":
        return M.REWARDBENCH_SECTIONS
    if isinstance(sections, Mapping):
        mapping = sections
    else:
        p = Path(str(sections))
        if not p.is_file():
            raise ConfigError(f"sections={sections!r}: use auto, none, rewardbench or a JSON/YAML file mapping section -> [subsets]")
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                mapping = yaml.safe_load(p.read_text())
            else:
                mapping = json.loads(p.read_text())
        except Exception as e:
            raise ConfigError(f"{p}: cannot read the section mapping ({e})") from None
    if not isinstance(mapping, Mapping) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in mapping.values()):
        raise ConfigError(f"sections: expected a mapping {{section: [subset, ...]}}, got {str(mapping)[:80]!r}")
    return {str(k): list(v) for k, v in mapping.items()}


def _pool(scores: Sequence[PairScores], names: Sequence[str]) -> tuple[PairScores, list[str]]:
    """All pairs of several datasets as one; each pair's group is its subset (or dataset name)."""
    groups = []
    for ps, name in zip(scores, names):
        groups += [g if g != NO_SUBSET else name for g in ps.groups]
    cat = lambda k: np.concatenate([getattr(p, k) for p in scores]) if scores else np.zeros(0)  # noqa: E731
    pooled = PairScores(cat("chosen"), cat("rejected"), cat("len_chosen"), cat("len_rejected"), groups, None, None,
                        sum(p.truncated for p in scores))
    return pooled, groups


# ------------------------------------------------------------------ one model, in memory


@dataclass
class ModelEval:
    """Metrics (JSON-safe) and the raw scores (for plots and comparisons) of one model."""

    name: str
    metrics: dict[str, Any]
    raw: dict[str, Any]
    length_unit: str = "tokens"
    seconds: float = 0.0


def evaluate_scorer(
    scorer,
    datasets: Sequence[EvalDataset],
    *,
    name: str = "model",
    subset_field: str | None = None,
    strength_field: str | None = None,
    sections: Any = None,
    n_bins: int = 10,
    progress: bool = False,
) -> ModelEval:
    """Score every dataset with a scorer-like object and compute all metrics.

    ``scorer`` needs ``score_rendered(texts, response_starts)`` returning an object with
    ``reward`` (and ``outputs`` for regression data), plus ``renderer`` (a
    :class:`~rewardforge.data.template.TextRenderer`) or ``render(prompt, response)``; a
    ``tokenizer`` attribute makes lengths count tokens. :class:`~rewardforge.scoring.RewardScorer` fits.
    """
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"datasets": {}}
    raw: dict[str, Any] = {}
    unit = "tokens"
    for ds in datasets:
        if ds.kind == "empty":
            metrics["datasets"][ds.name] = {"kind": "empty", "overall": M.pairwise_accuracy([], [])}
            continue
        res, u = score_dataset(scorer, ds, subset_field=subset_field, strength_field=strength_field, progress=progress,
                               desc=f"{name}: {ds.name}")
        raw[ds.name] = res
        if isinstance(res, PairScores):
            unit = u
            metrics["datasets"][ds.name] = pair_dataset_metrics(res, ds.all_groups, n_bins)
            fingerprint = _fingerprint(scorer)
            if fingerprint is not None:
                metrics["datasets"][ds.name]["training_overlap"] = training_overlap(res, fingerprint)
        elif isinstance(res, BestOfNScores):
            metrics["datasets"][ds.name] = best_of_n_metrics(res)
        elif isinstance(res, RatedScores):
            metrics["datasets"][ds.name] = rated_metrics(res)
    pair_names = [ds.name for ds in datasets if isinstance(raw.get(ds.name), PairScores)]
    if pair_names:
        pooled, groups = _pool([raw[n] for n in pair_names], pair_names)
        per_group = M.grouped_accuracy(pooled.chosen, pooled.rejected, groups)
        for n in pair_names:  # datasets as groups too, so a mapping can name whole files
            per_group.setdefault(n, metrics["datasets"][n]["overall"])
        mapping = resolve_sections(sections, per_group)
        if len(pair_names) > 1:
            metrics["pooled"] = pair_dataset_metrics(pooled, (), n_bins)
            metrics["pooled"]["datasets"] = pair_names
            raw["__pooled__"] = pooled
        if mapping:
            metrics["sections"] = M.section_scores(per_group, mapping)
    metrics["length_unit"] = unit
    return ModelEval(name, metrics, raw, unit, time.perf_counter() - t0)


def _keep_validation_pairs(scorer, datasets: Sequence[EvalDataset]) -> None:
    """Keep, in each pair dataset, only the pairs whose prompt the model's run held out for validation."""
    from rewardforge.export.model_dir import KEY_CHARS, PROMPTS_FILE

    fingerprint = _fingerprint(scorer)
    if fingerprint is None:
        raise ConfigError(f"{scorer.model_dir} has no {PROMPTS_FILE} (exported by an older rewardforge), so its "
                          "validation split is not known; pass the data to evaluate with --data")
    val = set(fingerprint["validation"])
    for ds in datasets:
        if ds.kind != "pairs":
            continue
        rendered = [_render(scorer, p.prompt, p.chosen, p.where) for p in ds.items]
        keys = _prompt_keys(scorer, [t for t, _ in rendered], [s for _, s in rendered])
        ds.items = [p for p, k in zip(ds.items, keys) if k[:KEY_CHARS] in val]
        if not ds.items:
            ds.kind = "empty"


def _fingerprint(scorer) -> dict[str, Any] | None:
    """The export's training_prompts.json (None for models without one: older exports, models in memory)."""
    from rewardforge.export.model_dir import PROMPTS_FILE

    d = getattr(scorer, "model_dir", None)
    if d is None or not (Path(d) / PROMPTS_FILE).is_file():
        return None
    return json.loads((Path(d) / PROMPTS_FILE).read_text())


def evaluate_pairs_during_training(
    scorer,
    data: Sequence[str] | Sequence[EvalDataset],
    *,
    subset_field: str | None = None,
    prefix: str = "eval",
    progress: bool = False,
) -> dict[str, float | None]:
    """Evaluate a live model on extra datasets; returns flat numbers for ``metrics.jsonl``
    (``None`` where a number is undefined, e.g. the accuracy of a subset with no pairs).

    ``scorer`` is scorer-like (see :func:`evaluate_scorer`), e.g. ``scorer_from_model(model,
    tokenizer, max_length=..., truncation=...)``; the model's train/eval mode is restored
    afterwards. ``data`` are paths or datasets from :func:`load_eval_data` (load once, call often).

    Keys: ``{prefix}/{dataset}/accuracy``, ``.../pairs``, ``.../ties``, ``.../ece``,
    ``.../bt_loss``, ``.../longer_baseline``, ``{prefix}/{dataset}/{subset}/accuracy``;
    best-of-N: ``.../top1``; rated: ``{prefix}/{dataset}/{attribute}/mse`` and ``/pearson``.
    """
    datasets = list(data)
    if datasets and not isinstance(datasets[0], EvalDataset):
        attrs = getattr(scorer, "attributes", None)
        datasets = load_eval_data([str(d) for d in datasets], attributes=attrs if attrs and attrs != ["reward"] else None,
                                  subset_field=subset_field)
    model = getattr(scorer, "model", None)
    was_training = bool(getattr(model, "training", False))
    if model is not None and hasattr(model, "eval"):
        model.eval()
    try:
        ev = evaluate_scorer(scorer, datasets, subset_field=subset_field, sections="none", progress=progress)
    finally:
        if model is not None and hasattr(model, "train"):
            model.train(was_training)
    out: dict[str, float | None] = {}
    for name, m in ev.metrics["datasets"].items():
        key = f"{prefix}/{name}"
        if m["kind"] == "pairs":
            o = m["overall"]
            out.update({f"{key}/accuracy": o["accuracy"], f"{key}/pairs": o["n"], f"{key}/ties": o["ties"],
                        f"{key}/ece": m["calibration"]["ece"], f"{key}/bt_loss": m["rewards"].get("bt_loss"),
                        f"{key}/longer_baseline": m["length"]["longer_baseline"]})
            for g, s in m["subsets"].items():
                out[f"{key}/{g}/accuracy"] = s["accuracy"]
        elif m["kind"] == "best_of_n":
            out[f"{key}/top1"], out[f"{key}/prompts"] = m["top1"], m["n"]
        elif m["kind"] == "rated":
            for a, s in m["attributes"].items():
                out[f"{key}/{a}/mse"], out[f"{key}/{a}/pearson"] = s["mse"], s["pearson"]
    return out


def scorer_from_model(model, tokenizer, *, max_length: int, truncation: str = "prompt_left",
                      attributes: Sequence[str] | None = None, attribute_weights: Sequence[float] | None = None,
                      batch_size: int = 32, device=None):
    """A :class:`~rewardforge.scoring.RewardScorer` around an in-memory model, leaving its train mode as it was.

    ``tokenizer`` must have the training template installed (``setup_template``).
    """
    from rewardforge.scoring import RewardScorer

    attrs = list(attributes or [])
    weights = list(attribute_weights or ([1.0 / len(attrs)] * len(attrs) if attrs else [1.0]))
    meta = {"max_length": max_length, "truncation": truncation, "attributes": attrs, "attribute_weights": weights}
    was_training = model.training
    if device is None:
        device = next(model.parameters()).device
    scorer = RewardScorer(model, tokenizer, meta, device=device, batch_size=batch_size)
    model.train(was_training)
    return scorer


# ------------------------------------------------------------------ comparisons


def compare_models(evals: Sequence[ModelEval], datasets: Sequence[EvalDataset], top: int = 10) -> dict[str, Any]:
    """Each model against the first, per pair dataset: McNemar counts and the pairs they disagree on most.

    Disagreement strength is ``|d_a/σ_a − d_b/σ_b|`` over pairs where the two pick different sides,
    with ``σ`` each model's reward std on that dataset (so margins of different scales compare).
    """
    base = evals[0]
    out: dict[str, Any] = {"reference": base.name, "against": {}}
    by_name = {d.name: d for d in datasets}
    for other in evals[1:]:
        per_ds = {}
        for name, a in base.raw.items():
            b = other.raw.get(name)
            if name == "__pooled__" or not isinstance(a, PairScores) or not isinstance(b, PairScores):
                continue
            da, db = a.chosen - a.rejected, b.chosen - b.rejected
            cmp = M.compare_pairs(da, db)
            sa = np.concatenate([a.chosen, a.rejected]).std() or 1.0
            sb = np.concatenate([b.chosen, b.rejected]).std() or 1.0
            za, zb = da / sa, db / sb
            disagree = np.nonzero(np.sign(da) != np.sign(db))[0]
            order = disagree[np.argsort(-np.abs(za - zb)[disagree], kind="stable")][:top]
            pairs = by_name[name].items
            cmp["disagreements"] = [
                {"index": int(i), "where": pairs[i].where, "subset": a.groups[i], "margin_a": float(da[i]),
                 "margin_b": float(db[i]), "z_a": float(za[i]), "z_b": float(zb[i]),
                 **preview(pairs[i])}
                for i in order
            ]
            per_ds[name] = cmp
        out["against"][other.name] = per_ds
    return out


def preview(pair: PreferencePair, limit: int = 4000) -> dict[str, str]:
    """Readable prompt/chosen/rejected strings (messages as ``role: content`` lines)."""
    return {"prompt": as_text(pair.prompt, limit), "chosen": as_text(pair.chosen, limit), "rejected": as_text(pair.rejected, limit)}


def as_text(conv: Any, limit: int = 4000) -> str:
    if isinstance(conv, str):
        text = conv
    else:
        text = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in conv)
    return text if len(text) <= limit else text[:limit] + " […]"


def worst_mistakes(ps: PairScores, pairs: Sequence[PreferencePair], top: int = 5) -> list[dict[str, Any]]:
    """The pairs the model gets wrong with the largest (most confident) negative margin."""
    d = ps.chosen - ps.rejected
    wrong = np.nonzero(d < 0)[0]
    order = wrong[np.argsort(d[wrong], kind="stable")][:top]
    return [{"index": int(i), "where": pairs[i].where, "subset": ps.groups[i], "margin": float(d[i]),
             "p_chosen": float(M.sigmoid(np.array([d[i]]))[0]), **preview(pairs[i])} for i in order]


# ------------------------------------------------------------------ the whole run


def _model_names(model_dirs: Sequence[str]) -> list[str]:
    def base(p: str) -> str:
        parts = Path(os.path.abspath(p)).parts
        # runs/x/model -> x/model reads better than "model"
        return "/".join(parts[-2:]) if parts and parts[-1] == "model" and len(parts) >= 2 else parts[-1]

    return _unique_names(list(model_dirs), base)


def resolve_model_dir(path: str | Path) -> Path:
    """An exported model directory, or a training output directory holding ``model/``."""
    p = Path(path)
    if (p / "rewardforge.json").is_file():
        return p
    if (p / "model" / "rewardforge.json").is_file():
        return p / "model"
    if p.is_dir() and (p / "trainer_state.json").is_file():
        raise ConfigError(f"{p} is a training checkpoint; export it first: rewardforge export {p} OUT_DIR")
    raise ConfigError(f"{p} is not an exported rewardforge model directory (no rewardforge.json)")


def split_models_and_data(paths: Sequence[str], data: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Tell model directories from data among positional arguments.

    A model is a directory holding ``rewardforge.json`` (or a training output directory holding
    ``model/rewardforge.json``); with ``data`` given explicitly every positional must be a model.
    Everything else is data: files, globs, saved datasets or hub names.
    """
    models, rest = [], []
    for p in paths:
        q = Path(p)
        is_model = (q / "rewardforge.json").is_file() or (q / "model" / "rewardforge.json").is_file()
        if is_model and not rest:
            models.append(p)
        elif is_model:
            raise ConfigError(f"{p} is a model directory but comes after data {rest[0]!r}; put model directories first")
        elif data or not models:
            if q.is_dir() and (q / "trainer_state.json").is_file():
                raise ConfigError(f"{p} is a training checkpoint; export it first: rewardforge export {p} OUT_DIR")
            raise ConfigError(
                f"{p} is not an exported model directory (no rewardforge.json)"
                + ("" if q.exists() else ": it does not exist")
                + "; usage: rewardforge eval MODEL_DIR [MODEL_DIR ...] --data FILE [FILE ...]"
            )
        else:
            rest.append(p)
    data_paths = list(data) + rest
    if not models:
        raise ConfigError("no model directory given; usage: rewardforge eval MODEL_DIR [MODEL_DIR ...] --data FILE [FILE ...]")
    if not data_paths:
        raise ConfigError("no evaluation data given; usage: rewardforge eval MODEL_DIR [MODEL_DIR ...] --data FILE [FILE ...]")
    return models, data_paths


def parse_field_map(items: Sequence[str]) -> dict[str, str]:
    """``["prompt=source,response=system_output", "labels=scores"]`` -> ``{"prompt": "source", ...}``."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, (x.strip() for x in item.split(","))):
            if "=" not in part:
                raise ConfigError(f"--field-map {part!r}: expected OURS=THEIRS, e.g. prompt=question")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluate_model(
    model_dirs: str | Path | Sequence[str | Path],
    data_paths: str | Sequence[str],
    out_dir: str | Path | None = None,
    *,
    fmt: str = "auto",
    field_map: Mapping[str, str] | None = None,
    subset_field: str | None = None,
    strength_field: str | None = None,
    sections: Any = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    limit: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    n_bins: int = 10,
    top: int = 10,
    progress: bool = True,
    report: bool = True,
    validation_split: bool = False,
) -> dict[str, Any]:
    """Evaluate one or more exported models on one or more data files.

    ``validation_split``: keep only the pairs whose prompts the first model held out for validation
    (its ``training_prompts.json``): with a run's training files as data, its validation split.

    Writes ``out_dir/metrics.json``, ``out_dir/report.html`` (self-contained) and
    ``out_dir/plots/*.png`` when ``out_dir`` is given. Returns the metrics dictionary (the
    content of ``metrics.json``).

    Example:
        >>> from rewardforge.eval import evaluate_model
        >>> m = evaluate_model("runs/quickstart/model", ["examples/quickstart/validation.jsonl"], "runs/eval")  # doctest: +SKIP
        >>> m["results"]["quickstart/model"]["datasets"]["validation"]["overall"]["accuracy"]  # doctest: +SKIP
        0.93
    """
    import rewardforge
    from rewardforge.scoring import load

    t0 = time.perf_counter()
    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    paths = [data_paths] if isinstance(data_paths, str) else [str(p) for p in data_paths]
    if not dirs:
        raise ConfigError("no model given; pass one or more exported model directories")
    if batch_size < 1 or limit < 0 or n_bins < 1 or top < 0:
        raise ConfigError(f"batch_size ({batch_size}) and bins ({n_bins}) must be >= 1, limit ({limit}) and top ({top}) >= 0")
    if sections not in (None, "auto", "none", "rewardbench") and not isinstance(sections, Mapping):
        sections = resolve_sections(sections, ())  # a bad mapping file fails before any scoring
    resolved = [resolve_model_dir(d) for d in dirs]
    metas = [json.loads((d / "rewardforge.json").read_text()) for d in resolved]
    attr_lists = [list(m.get("attributes") or []) if m.get("reward_model_type") != "binary_ranking" else [] for m in metas]
    rated_attrs = attr_lists[0] or None
    if not paths:
        raise DataError("no evaluation data given; pass one or more data files")
    datasets = load_eval_data(paths, fmt=fmt, attributes=rated_attrs, skip_bad_rows=skip_bad_rows, field_map=field_map,
                              split=split, limit=limit, subset_field=subset_field)
    if any(d.kind == "rated" for d in datasets) and any(a != attr_lists[0] for a in attr_lists):
        raise ConfigError(f"the models predict different attributes {attr_lists}; rated data can only be compared "
                          "across models with the same attributes")
    if out_dir is not None:  # before scoring: an unwritable directory fails fast
        from rewardforge.config import ensure_writable_dir

        ensure_writable_dir(out_dir, "--out")
    if validation_split:
        _keep_validation_pairs(load(resolved[0], batch_size=batch_size, device="cpu"), datasets)
    names = _model_names([str(d) for d in dirs])
    evals: list[ModelEval] = []
    from tqdm.auto import tqdm

    per_model = sum(2 * len(ds.items) if ds.kind == "pairs" else sum(len(it.responses) for it in ds.items)
                    if ds.kind == "best_of_n" else len(ds.items) if ds.kind == "rated" else 0 for ds in datasets)
    overall = tqdm(total=per_model * len(dirs), desc=f"eval ({len(dirs)} model(s), {len(datasets)} file(s))", unit="seq",
                   disable=not progress, dynamic_ncols=True, mininterval=1.0)
    _OVERALL.append(overall)  # one bar, one ETA for the whole evaluation
    try:
        for name, d, meta in zip(names, resolved, metas):
            scorer = load(d, batch_size=batch_size, device=device)
            ev = evaluate_scorer(scorer, datasets, name=name, subset_field=subset_field, strength_field=strength_field,
                                 sections=sections, n_bins=n_bins, progress=progress)
            for ds in datasets:
                if isinstance(ev.raw.get(ds.name), PairScores):
                    ev.metrics["datasets"][ds.name]["worst_mistakes"] = worst_mistakes(ev.raw[ds.name], ds.items, top=5)
            evals.append(ev)
            del scorer
    finally:
        _OVERALL.remove(overall)
        overall.close()
    result: dict[str, Any] = {
        "rewardforge_version": rewardforge.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "length_unit": evals[0].length_unit,
        "models": [{"name": e.name, "path": str(d), "reward_model_type": m.get("reward_model_type"),
                    "base_model": m.get("base_model"), "attributes": m.get("attributes") or [],
                    "max_length": m.get("max_length"), "seconds": round(e.seconds, 2)}
                   for e, d, m in zip(evals, resolved, metas)],
        "datasets": [d.summary() for d in datasets],
        "results": {e.name: e.metrics for e in evals},
    }
    if len(evals) > 1:
        result["comparison"] = compare_models(evals, datasets, top=top)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result = _json_safe(result)
    if out_dir is not None:
        out = Path(out_dir)
        if report:
            from rewardforge.eval.report import write_report

            write_report(result, evals, datasets, out)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return result
