"""Evaluate models: the metrics of scored data (``eval.metrics`` holds the formulas), comparisons between
models, evaluation during training, and :func:`evaluate_model`, the whole run behind ``rewardforge eval``
(data from :mod:`rewardforge.eval.data`, scores from :mod:`rewardforge.eval.scores`, the report from
:mod:`rewardforge.eval.report`).

Data kinds (detected per file from its first row):

* **pairs** — any pairwise format the core reads (explicit, implicit_prompt/HH-RLHF,
  conversational, NeMo comparison); parsed by :func:`rewardforge.data.formats.parse_rows`.
* **rated** — regression rows (``prompt/response/labels`` or NeMo ``text/label``), for regression
  models: per-attribute MSE, MAE, Pearson, Spearman.
* **best_of_n** — ``{"prompt": ..., "responses": [r_0, ..., r_{K-1}], "best": i}`` (K >= 2; the
  prompt and each response a string or a list of messages, like the explicit format; any other
  field, e.g. ``subset``, is kept): top-1 accuracy.
* **lists** — ``{"prompt", "responses": [...], "scores": [...]}`` or ``"ranking": [i, ...]`` (best first,
  nested lists for ties): pairwise accuracy over every ordered pair, top-1, Kendall tau, NDCG
  (:func:`rewardforge.eval.metrics.ranking_metrics`).

Texts are rendered exactly as in training (the model's own :class:`~rewardforge.data.template.TextRenderer`)
and scored with :meth:`RewardScorer.score_rendered`, in chunks of similar length so padding stays small.

**Length** is the number of tokens of the rendered response (the text after the prompt,
tokenized without special tokens, before truncation); characters when the scorer has no tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rewardforge.data.formats import PreferencePair
from rewardforge.data.readers import DataError
from rewardforge.errors import ConfigError
from rewardforge.eval import metrics as M
from rewardforge.eval.data import NO_SUBSET, EvalDataset, load_eval_data, model_names
from rewardforge.eval.scores import (
    OVERALL_BAR,
    BestOfNScores,
    ListScores,
    PairScores,
    RatedScores,
    keep_validation_pairs,
    score_dataset,
    training_fingerprint,
    training_overlap,
)


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
        # ensembles: accuracy by uncertainty quintile, AUROC of the std for wrong pairs, calibration with/without
        "ensemble": (M.ensemble_pair_report(ps.members_chosen - ps.members_rejected)
                     if ps.members_chosen is not None else None),
    }


def list_dataset_metrics(ls: ListScores) -> dict[str, Any]:
    out = {"kind": "lists", **M.ranking_metrics(ls.rewards, ls.scores), "truncated_sequences": ls.truncated}
    groups = sorted(set(ls.groups) - {NO_SUBSET})
    out["subsets"] = {g: M.ranking_metrics([r for r, gg in zip(ls.rewards, ls.groups) if gg == g],
                                           [s for s, gg in zip(ls.scores, ls.groups) if gg == g]) for g in groups}
    return out


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
    if scores and all(p.members_chosen is not None for p in scores):
        pooled.members_chosen, pooled.members_rejected = cat("members_chosen"), cat("members_rejected")
    return pooled, groups


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
            fingerprint = training_fingerprint(scorer)
            if fingerprint is not None:
                metrics["datasets"][ds.name]["training_overlap"] = training_overlap(res, fingerprint)
        elif isinstance(res, BestOfNScores):
            metrics["datasets"][ds.name] = best_of_n_metrics(res)
        elif isinstance(res, ListScores):
            metrics["datasets"][ds.name] = list_dataset_metrics(res)
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
        elif m["kind"] == "lists":
            for x in ("accuracy", "pairs", "lists", "top1", "kendall_tau", "ndcg"):
                out[f"{key}/{x}"] = m[x]
        elif m["kind"] == "rated":
            for a, s in m["attributes"].items():
                out[f"{key}/{a}/mse"], out[f"{key}/{a}/pearson"] = s["mse"], s["pearson"]
    return out


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
    t0 = time.perf_counter()
    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    paths = [data_paths] if isinstance(data_paths, str) else [str(p) for p in data_paths]
    if not dirs:
        raise ConfigError("no model given; pass one or more exported model directories")
    if batch_size < 1 or limit < 0 or n_bins < 1 or top < 0:
        raise ConfigError(f"batch_size ({batch_size}) and bins ({n_bins}) must be >= 1, limit ({limit}) and top ({top}) >= 0")
    if sections not in (None, "auto", "none", "rewardbench") and not isinstance(sections, Mapping):
        sections = resolve_sections(sections, ())  # a bad mapping file fails before any scoring
    if not paths:
        raise DataError("no evaluation data given; pass one or more data files")
    resolved, metas, datasets = _models_and_data(dirs, paths, fmt=fmt, skip_bad_rows=skip_bad_rows, field_map=field_map,
                                                 split=split, limit=limit, subset_field=subset_field)
    if out_dir is not None:  # before scoring: an unwritable directory fails fast
        from rewardforge.config import ensure_writable_dir

        ensure_writable_dir(out_dir, "--out")
    if validation_split:
        from rewardforge.scoring import load

        keep_validation_pairs(load(resolved[0], batch_size=batch_size, device="cpu"), datasets)
    evals = _score_models(model_names([str(d) for d in dirs]), resolved, datasets, batch_size=batch_size, device=device,
                          progress=progress, subset_field=subset_field, strength_field=strength_field, sections=sections,
                          n_bins=n_bins)
    result = _result(evals, resolved, metas, datasets, top=top)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result = _json_safe(result)
    if out_dir is not None:
        out = Path(out_dir)
        if report:
            from rewardforge.eval.report import write_report

            write_report(result, evals, datasets, out)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return result


def _models_and_data(dirs: Sequence, paths: Sequence[str], **read: Any) -> tuple[list[Path], list[dict], list[EvalDataset]]:
    """The model directories, their metadata, and the datasets read for them (rated data needs models that
    predict the same attributes)."""
    from rewardforge.export.model_dir import find_model_dir, read_metadata

    resolved = [find_model_dir(d) for d in dirs]
    metas = [read_metadata(d) for d in resolved]
    attr_lists = [list(m.get("attributes") or []) if m.get("reward_model_type") != "binary_ranking" else [] for m in metas]
    datasets = load_eval_data(paths, attributes=attr_lists[0] or None, **read)
    if any(d.kind == "rated" for d in datasets) and any(a != attr_lists[0] for a in attr_lists):
        raise ConfigError(f"the models predict different attributes {attr_lists}; rated data can only be compared "
                          "across models with the same attributes")
    return resolved, metas, datasets


def _score_models(names: Sequence[str], resolved: Sequence[Path], datasets: Sequence[EvalDataset], *, batch_size: int,
                  device: str | None, progress: bool, **metrics: Any) -> list[ModelEval]:
    """Every model's :class:`ModelEval`, loaded one at a time, under one progress bar (one ETA) for the whole run."""
    from tqdm.auto import tqdm

    from rewardforge.scoring import load

    per_model = sum(2 * len(ds.items) if ds.kind == "pairs" else sum(len(it.responses) for it in ds.items)
                    if ds.kind in ("best_of_n", "lists") else len(ds.items) if ds.kind == "rated" else 0 for ds in datasets)
    overall = tqdm(total=per_model * len(resolved), desc=f"eval ({len(resolved)} model(s), {len(datasets)} file(s))",
                   unit="seq", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    OVERALL_BAR.append(overall)
    evals: list[ModelEval] = []
    try:
        for name, d in zip(names, resolved):
            scorer = load(d, batch_size=batch_size, device=device)
            ev = evaluate_scorer(scorer, datasets, name=name, progress=progress, **metrics)
            for ds in datasets:
                if isinstance(ev.raw.get(ds.name), PairScores):
                    ev.metrics["datasets"][ds.name]["worst_mistakes"] = worst_mistakes(ev.raw[ds.name], ds.items, top=5)
            evals.append(ev)
            del scorer
    finally:
        OVERALL_BAR.remove(overall)
        overall.close()
    return evals


def _result(evals: Sequence[ModelEval], resolved: Sequence[Path], metas: Sequence[dict], datasets: Sequence[EvalDataset],
            top: int) -> dict[str, Any]:
    """The content of ``metrics.json`` (before ``seconds``)."""
    import rewardforge

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
    return result
