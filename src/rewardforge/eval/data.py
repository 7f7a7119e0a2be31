"""Evaluation inputs: data files parsed into :class:`EvalDataset` (pairs, rated responses or best-of-N
rows, every bad row counted as training counts it), the subset and strength fields of a pair, and
telling model directories from data on the command line."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rewardforge.data.formats import (
    ParseReport,
    PreferencePair,
    detect_format,
    is_best_of_n,
    parse_best_of_n,
    parse_rows,
)
from rewardforge.data.lists import is_list_row, parse_lists
from rewardforge.data.readers import DataError, Row, expand_sources, read_rows
from rewardforge.errors import ConfigError

SUBSET_FIELDS = ("subset", "category")
STRENGTH_FIELDS = ("margin", "preference_strength", "strength", "score_diff", "agreement")
NO_SUBSET = "(none)"


@dataclass
class EvalDataset:
    """One evaluation file, parsed. ``items`` holds what is scored (pairs with identical sides left out)."""

    name: str
    path: str
    kind: str  # "pairs" | "rated" | "best_of_n" | "lists" | "empty"
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


def dataset_name(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) or path
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base or path


def unique_names(paths: Sequence[str], name_of) -> list[str]:
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
        fmt: ``auto`` (detected per file), ``best_of_n``, ``lists`` (``{prompt, responses, scores | ranking | best}``)
            or any ``data.format`` of the core.
        attributes: a regression model's attribute names (needed for rated data only).
        limit: keep at most this many examples per file (0: all).

    Raises:
        DataError: naming file, line and field, exactly as training does (unless ``skip_bad_rows``).
    """
    if not paths:
        raise DataError("no evaluation data given; pass one or more data files")
    files = expand_sources(list(paths))
    out = []
    for name, path in zip(unique_names(files, dataset_name), files):
        head, rows = _head(iter(read_rows(path, split)))
        first = next((r for r in head if not isinstance(r.data, DataError)), None)
        probe = first.data if first is not None else None
        if isinstance(probe, dict) and field_map:
            probe = {**probe, **{ours: probe[theirs] for ours, theirs in field_map.items() if theirs in probe}}
        ds = EvalDataset(name, path, "empty", [], fmt)
        if head:
            report = ParseReport()
            rows = itertools.chain(head, rows)
            if fmt == "lists" or (fmt == "auto" and is_list_row(probe) and not is_best_of_n(probe)):
                # {prompt, responses, scores | ranking} (best-of-N rows keep their own kind unless --format lists)
                _read_lists(ds, rows, report, field_map=field_map, skip_bad_rows=skip_bad_rows, limit=limit)
            elif fmt == "best_of_n" or (fmt == "auto" and is_best_of_n(probe)):
                _read_best_of_n(ds, rows, report, field_map=field_map, skip_bad_rows=skip_bad_rows, limit=limit)
            else:
                _read_parsed(ds, rows, report, first, probe, attributes=attributes, skip_bad_rows=skip_bad_rows,
                             field_map=field_map, limit=limit, subset_field=subset_field)
            ds.rows_read, ds.skipped, ds.skip_messages = report.rows_read, dict(report.skipped), list(report.examples)
        out.append(ds)
    return out


def _head(rows) -> tuple[list[Row], Any]:
    """The rows up to the first readable one (which tells the kind of data, at most 1000), and the rest."""
    head: list[Row] = []
    for row in rows:
        head.append(row)
        if not isinstance(row.data, DataError) or len(head) >= 1000:
            break
    return head, rows


def _read_lists(ds: EvalDataset, rows, report: ParseReport, *, field_map, skip_bad_rows: bool, limit: int) -> None:
    """Lists of K ranked or rated responses; lists with fewer than 2 responses or every score tied are excluded
    and counted."""
    ds.kind, ds.format = "lists", "lists"
    excluded: dict[str, int] = {}
    for lst in parse_lists(rows, skip_bad_rows=skip_bad_rows, field_map=dict(field_map or {}), report=report,
                           excluded=excluded):
        if len(lst.responses) < 2 or len(set(lst.scores)) < 2:
            reason = "lists_under_2_responses" if len(lst.responses) < 2 else "lists_all_tied"
            ds.excluded[reason] = ds.excluded.get(reason, 0) + 1
            continue
        ds.items.append(lst)
        if limit and len(ds.items) >= limit:
            break
    for reason, n in excluded.items():  # what parsing left out of the lists, counted as well
        ds.excluded[reason] = ds.excluded.get(reason, 0) + n


def _read_best_of_n(ds: EvalDataset, rows, report: ParseReport, *, field_map, skip_bad_rows: bool, limit: int) -> None:
    ds.kind, ds.format = "best_of_n", "best_of_n"
    for row in rows:
        report.rows_read += 1
        if field_map and isinstance(row.data, dict):
            row = Row({**{k: v for k, v in row.data.items() if k not in field_map.values()},
                       **{o: row.data[t] for o, t in field_map.items() if t in row.data}}, row.source, row.index, row.lines)
        try:
            ds.items.append(parse_best_of_n(row))
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skip("bad_row", str(e))
        if limit and len(ds.items) >= limit:
            break


def _read_parsed(ds: EvalDataset, rows, report: ParseReport, first, probe, *, attributes, skip_bad_rows: bool,
                 field_map, limit: int, subset_field) -> None:
    """Pairs or rated responses, parsed as training parses them; pairs with identical sides excluded and counted."""
    fmt, path = ds.format, ds.path
    if fmt == "auto" and isinstance(probe, dict):
        try:
            ds.format = detect_format(probe, first.where if first else path)
        except DataError:
            ds.format = "auto"  # parse_rows raises the error with its context
    if (ds.format in ("regression", "nemo_regression") or fmt in ("regression", "nemo_regression")) and not attributes:
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
            seen_groups[group_of(ex.extra, subset_field)] = None
            if _same(ex.chosen, ex.rejected):
                ds.excluded["identical_responses"] = ds.excluded.get("identical_responses", 0) + 1
                continue
        else:
            ds.kind = "rated"
        ds.items.append(ex)
        if limit and len(ds.items) >= limit:
            break
    ds.all_groups = list(seen_groups)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _subset_key(extra: Mapping[str, Any], subset_field: str | None) -> str | None:
    if subset_field:
        return subset_field
    for f in SUBSET_FIELDS:
        if f in extra:
            return f
    return None


def group_of(extra: Mapping[str, Any], subset_field: str | None) -> str:
    key = _subset_key(extra, subset_field)
    if key is None or extra.get(key) is None:
        return NO_SUBSET
    v = extra[key]
    return v if isinstance(v, str) else json.dumps(v)


def strength_of(ex: PreferencePair, fieldname: str) -> float:
    v = ex.margin if fieldname == "margin" else ex.extra.get(fieldname)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def pick_strength_field(pairs: Sequence[PreferencePair], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    for f in STRENGTH_FIELDS:
        if any(np.isfinite(strength_of(p, f)) for p in pairs):
            return f
    return None


def model_names(model_dirs: Sequence[str]) -> list[str]:
    def base(p: str) -> str:
        parts = Path(os.path.abspath(p)).parts
        # runs/x/model -> x/model reads better than "model"
        return "/".join(parts[-2:]) if parts and parts[-1] == "model" and len(parts) >= 2 else parts[-1]

    return unique_names(list(model_dirs), base)


def split_models_and_data(paths: Sequence[str], data: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Tell model directories from data among positional arguments.

    A model is an exported model directory or a training output directory holding one
    (:func:`~rewardforge.export.model_dir.is_model_dir`); with ``data`` given explicitly every positional must be a model.
    Everything else is data: files, globs, saved datasets or hub names.
    """
    from rewardforge.export.model_dir import is_model_dir

    models, rest = [], []
    for p in paths:
        q = Path(p)
        is_model = is_model_dir(q)
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
