"""Lists of K responses to one prompt, ranked or rated: the data of ``model.reward_model_type=listwise``.

Row formats (one list per row)::

    {"prompt": ..., "responses": [r_0, ..., r_{K-1}], "scores": [s_0, ..., s_{K-1}]}   higher is better
    {"prompt": ..., "responses": [...], "ranking": [i, j, [k, l], ...]}               best first; a nested
                                                                                       list holds ties
    {"prompt": ..., "responses": [...], "best": i}                                    best-of-N: i above
                                                                                       the others, tied

or, with ``data.group_by=FIELD`` and ``data.score_label=LABEL``, rated rows of format ``regression``
(``{"prompt", "response", "labels": {...}}``, after ``data.field_map``) grouped into one list per value
of ``FIELD`` (every row of a group must have the same prompt), each response scored by
``labels[LABEL]`` (Topical-Chat: six rated responses per dialogue). A ranking becomes scores
``G - g`` for the ``g``-th of ``G`` tie groups; best-of-N becomes scores 1 (best) and 0 (the rest).
Equal scores are ties and stay ties.

What is dropped is counted in the data report's ``excluded`` (nothing is dropped silently):

* ``duplicate_responses``: a response whose rendered text repeats an earlier one of its list (the
  first is kept, with its score); ``identical_after_truncation``: the same for token ids after truncation;
* ``responses_without_score``: a grouped row whose ``labels[LABEL]`` is missing or null;
* ``lists_under_2_responses``: a list left with fewer than 2 responses;
* ``lists_all_tied``: a list whose responses all have the same score (it says nothing about order);
* ``duplicate_lists``: a list whose rendered texts and scores repeat an earlier list (``data.drop_duplicates``).

The list collator flattens a batch of lists to rows, every response encoded once in one forward
pass::

    lists [(a0, a1, a2), (b0, b1)]  ->  input_ids   = [a0, a1, a2, b0, b1]  (right-padded)
                                        list_index  = [0, 0, 0, 1, 1]       (the row's list in the batch)
                                        scores      = [s_a0, s_a1, s_a2, s_b0, s_b1]
                                        row_index   = the rows' positions in the dataset's flat responses
                                        index       = [i_a, i_b]            (the lists' dataset indices)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from rewardforge.data.batching import pad_sequences
from rewardforge.data.formats import (
    _SKIP_HINT,
    ParseReport,
    _apply_field_map,
    _conversation,
    _describe,
    _number,
    _unicode,
)
from rewardforge.data.readers import DataError, Row, fingerprint_sources

# 2: each list's data.train entry (source) and the entries' max_rows in the key
LIST_CACHE_VERSION = 2
LIST_FIELDS = ("scores", "ranking", "best")


@dataclass
class ResponseList:
    """K responses to one prompt with a score each (higher is better; equal scores are ties)."""

    prompt: Any
    responses: list
    scores: list[float]
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def is_list_row(record: Any) -> bool:
    """A row of one of the list formats: ``responses`` and one of ``scores``, ``ranking``, ``best``."""
    return isinstance(record, dict) and "responses" in record and any(k in record for k in LIST_FIELDS)


def ranking_scores(ranking: Any, k: int, where: str) -> list[float]:
    """Scores of a best-first ranking of ``k`` responses: ``G - g`` for the ``g``-th of ``G`` groups.

    An entry is an index or a list of tied indices; every index 0..k-1 appears exactly once.

    Example:
        >>> ranking_scores([2, [0, 3], 1], 4, "f:1")
        [2.0, 1.0, 3.0, 2.0]
    """
    if not isinstance(ranking, list) or not ranking:
        raise DataError(f"{where}: field 'ranking' must be a non-empty list of response indices, best first, got {_describe(ranking)}")
    scores: list[float | None] = [None] * k
    groups = len(ranking)
    for g, entry in enumerate(ranking):
        members = entry if isinstance(entry, list) else [entry]
        for i in members:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
                raise DataError(f"{where}: field 'ranking' holds {i!r}; entries must be indices 0..{k - 1} of 'responses' "
                                "(or lists of tied indices)")
            if scores[i] is not None:
                raise DataError(f"{where}: field 'ranking' names response {i} twice; each response appears once")
            scores[i] = float(groups - g)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise DataError(f"{where}: field 'ranking' leaves out response {missing[0]} of {k}; rank every response "
                        "(put unranked ones tied last, e.g. [..., [3, 4]])")
    return scores  # type: ignore[return-value]


def parse_list_row(record: Any, where: str) -> ResponseList:
    """One list row (``scores``, ``ranking`` or ``best``) -> :class:`ResponseList`; bad rows raise :class:`DataError`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_describe(record)}")
    given = [k for k in LIST_FIELDS if k in record]
    if "responses" not in record or not given:
        raise DataError(f"{where}: a list row needs 'responses' and one of 'scores', 'ranking' or 'best' (fields present: "
                        f"{sorted(record)}); for rated rows with one response each set data.group_by and data.score_label")
    if len(given) > 1:
        raise DataError(f"{where}: the row has {' and '.join(repr(g) for g in given)}; give one of them")
    raw = record["responses"]
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'responses' must be a list of responses, got {_describe(raw)}")
    responses = [_conversation(r, where, f"responses[{i}]", "assistant") for i, r in enumerate(raw)]
    k = len(responses)
    how = given[0]
    if how == "scores":
        s = record["scores"]
        if not isinstance(s, list) or len(s) != k:
            raise DataError(f"{where}: field 'scores' must be a list of {k} numbers (one per response), got {_describe(s)}")
        scores = [_number(v, where, f"scores[{i}]") for i, v in enumerate(s)]
    elif how == "ranking":
        scores = ranking_scores(record["ranking"], k, where)
    else:
        b = record["best"]
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < max(k, 1):
            raise DataError(f"{where}: field 'best' must be the index (0..{k - 1}) of the best response, got {b!r}")
        scores = [1.0 if i == b else 0.0 for i in range(k)]
    raw_prompt = record.get("prompt")
    prompt = [] if raw_prompt is None or raw_prompt == [] else _conversation(raw_prompt, where, "prompt", "user")
    extra = {k_: v for k_, v in record.items() if k_ not in ("prompt", "responses", *LIST_FIELDS)}
    return ResponseList(prompt, responses, scores, extra, where)


def _group_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def parse_lists(
    rows: Iterable[Row],
    *,
    group_by: str = "",
    score_label: str = "",
    skip_bad_rows: bool = False,
    field_map: dict[str, str] | None = None,
    report: ParseReport | None = None,
    excluded: dict[str, int] | None = None,
) -> Iterator[ResponseList]:
    """Rows -> lists: list rows as they are, or (``group_by``) rated rows grouped by that field.

    Grouped lists keep the order of their first row; rows without the score label are counted in
    ``excluded['responses_without_score']``.
    """
    report = report if report is not None else ParseReport()
    excluded = excluded if excluded is not None else {}

    def bad(err: DataError) -> None:
        if not skip_bad_rows:
            raise err if _SKIP_HINT in str(err) else DataError(f"{err}; {_SKIP_HINT}")
        report.skip("bad_row", str(err))

    groups: dict[str, ResponseList] = {}
    for row in rows:
        report.rows_read += 1
        report.formats.setdefault(str(row.source), f"grouped rated rows (data.group_by={group_by})" if group_by else "lists")
        try:
            if isinstance(row.data, DataError):
                raise row.data
            row = _apply_field_map(row, field_map or {})
            rec, where = row.data, row.where
            if not group_by:
                yield parse_list_row(rec, where)
                continue
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {_describe(rec)}")
            for name in (group_by, "response", "labels"):
                if name not in rec:
                    raise DataError(f"{where}: missing field {name!r} needed to group rated rows with data.group_by={group_by} "
                                    f"(fields present: {sorted(rec)}); map your column names with data.field_map")
            labels = rec["labels"]
            if not isinstance(labels, dict):
                raise DataError(f"{where}: field 'labels' must be an object {{label: value}}, got {_describe(labels)}")
            raw_prompt = rec.get("prompt")
            prompt = [] if raw_prompt is None or raw_prompt == [] else _conversation(raw_prompt, where, "prompt", "user")
            response = _conversation(rec["response"], where, "response", "assistant")
            key = _group_key(rec[group_by])
            if isinstance(rec[group_by], str):
                _unicode(key, where, repr(group_by))
            if labels.get(score_label) is None:
                excluded["responses_without_score"] = excluded.get("responses_without_score", 0) + 1
                continue
            score = _number(labels[score_label], where, f"labels.{score_label}")
            lst = groups.get(key)
            if lst is None:
                extra = {k: v for k, v in rec.items() if k not in ("prompt", "response", "labels")}
                groups[key] = ResponseList(prompt, [response], [score], extra, where)
            else:
                if prompt != lst.prompt:
                    raise DataError(f"{where}: this row's prompt differs from that of {lst.where}, the first row with "
                                    f"{group_by}={key[:60]!r}; a list has one prompt: group by a field that identifies the prompt")
                lst.responses.append(response)
                lst.scores.append(score)
        except DataError as err:
            bad(err)
    yield from groups.values()


# ------------------------------------------------------------------ dataset


class ListDataset(torch.utils.data.Dataset):
    """Tokenized lists. Item: the list's response token ids, their scores, its index and first row.

    Responses are stored flat (``ids``), list ``i`` holding rows ``offsets[i]:offsets[i + 1]``; ``source[i]`` is
    the data entry list ``i`` came from (what :func:`rewardforge.data.mixing.mix_sources` weighs).
    """

    kind = "lists"

    def __init__(self, ids: list[np.ndarray], offsets: np.ndarray, scores: np.ndarray, prompt_keys: list[str], extra: list[dict],
                 source=None):
        self.ids, self.offsets = ids, np.asarray(offsets, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.prompt_keys, self.extra = prompt_keys, extra
        self.source = np.zeros(len(self), np.int32) if source is None else np.asarray(source, np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"responses": self.ids[a:b], "scores": self.scores[a:b], "index": i, "row_start": a}

    def sizes(self) -> np.ndarray:
        """Responses per list."""
        return np.diff(self.offsets)

    def lengths(self) -> np.ndarray:
        """Tokens a list costs in a padded batch: its K responses padded to the longest."""
        return np.array([(b - a) * max(len(x) for x in self.ids[a:b]) for a, b in zip(self.offsets[:-1], self.offsets[1:])],
                        dtype=np.int64)

    def subset(self, idx) -> "ListDataset":
        """The lists ``idx`` (a sequence or numpy index array; repeats allowed), sharing the token arrays."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        sizes = self.sizes()[idx]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = np.repeat(self.offsets[idx] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return ListDataset([self.ids[r] for r in rows.tolist()], offsets, self.scores[rows],
                           [self.prompt_keys[i] for i in idx.tolist()], [self.extra[i] for i in idx.tolist()], self.source[idx])


class ListCollator:
    """Collate lists into one batch of all their responses (see the module docstring for the keys)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [s for it in items for s in it["responses"]]
        ids, mask = pad_sequences(seqs, self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            **list_keys(items),
        }


def list_keys(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``list_index``, ``scores``, ``row_index`` (rows in list order) and ``index`` of a batch of list items."""
    sizes = [len(it["responses"]) for it in items]
    return {
        "list_index": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(sizes)),
        "scores": torch.from_numpy(np.concatenate([np.asarray(it["scores"], np.float32) for it in items])),
        "row_index": torch.tensor([it["row_start"] + j for it, k in zip(items, sizes) for j in range(k)], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
    }


def list_columns(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What validation keeps of a list batch, one entry per response (row): its outputs, score, list and
    dataset row (``index``, unique per response, so the rows of several processes gather as examples do)."""
    li = batch["list_index"]
    keep = li >= 0  # packed batches may hold padding branches (list_index -1)
    return {"pred": out[keep], "scores": batch["scores"][keep], "list": batch["index"][li[keep]],
            "index": batch["row_index"][keep]}


# ------------------------------------------------------------------ building


def build_list_dataset(cfg, tokenizer, sources: list):
    """Read, parse (or group), render and tokenize list data into a :class:`ListDataset`.

    The signature of :attr:`rewardforge.registry.DataKind.build`. ``sources`` are data entries as in ``data.train``
    (paths, mappings or :class:`~rewardforge.config.DataSource`), each read on its own, as pairs are: its
    ``max_rows`` caps the rows read from it (reading stops there; with ``data.group_by`` these are rated rows, not
    lists), rows group into lists only within their own entry (the same ``group_by`` value in two entries makes two
    lists), and every list records its entry in ``dataset.source`` for
    :func:`~rewardforge.data.mixing.mix_sources`. The report's ``per_source`` has one record per entry (``source``,
    ``files``, ``rows_read``, ``examples``: lists kept, and ``max_rows`` when set). Tokenized lists are cached like
    pairs and rated responses (keyed by the data, each entry's ``max_rows``, tokenizer and settings;
    ``data.cache_dir=none`` disables it).

    Returns:
        ``(dataset, DataReport)``.
    """
    from rewardforge.data.datasets import DataReport, _Entry, _entry_records, progress_bar

    d = cfg.data
    t0 = time.perf_counter()
    if not sources:
        raise DataError("no data given; set data.train (and optionally data.validation)")
    entries = [_Entry.of(s) for s in sources]
    cache_path = None if str(d.cache_dir).lower() == "none" else _list_cache_path(d, entries, tokenizer)
    if cache_path is not None and cache_path.is_file():
        try:
            ds, report = _load(cache_path, DataReport)
            report.seconds = time.perf_counter() - t0
            return ds, report
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cache_path.unlink(missing_ok=True)

    report = DataReport(sources=[f for e in entries for f in e.files], per_source=_entry_records(entries))
    parse_report = ParseReport()
    lists, list_sources = _read_lists(entries, d, report, parse_report, progress_bar)
    ds = _tokenized(lists, list_sources, tokenizer, d, report, progress_bar)
    for k, n in enumerate(np.bincount(ds.source, minlength=len(entries)).tolist()):
        report.per_source[k]["examples"] = n
    report.rows_read = parse_report.rows_read
    report.formats = dict(parse_report.formats)
    report.skipped_bad_rows = sum(parse_report.skipped.values())
    report.bad_row_messages = parse_report.examples
    report.examples = len(ds)
    if cache_path is not None:
        _save(cache_path, ds, report)
    report.seconds = time.perf_counter() - t0
    return ds, report


def _list_cache_path(d, entries: list, tokenizer) -> Path:
    """The cache file of a list build: a hash of the data, the entries (with their ``max_rows``), tokenizer and settings."""
    from rewardforge.data.datasets import default_cache_dir, tokenizer_fingerprint

    key = json.dumps({"v": LIST_CACHE_VERSION, "kind": "lists", "data": fingerprint_sources([f for e in entries for f in e.files]),
                      "entries": [[e.path, len(e.files), e.max_rows] for e in entries],
                      "max_length": d.max_length, "truncation": d.truncation, "skip": d.skip_bad_rows,
                      "field_map": dict(d.field_map), "split": d.split, "group_by": d.group_by, "score_label": d.score_label,
                      "dedup": d.drop_duplicates, "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return Path(d.cache_dir or default_cache_dir()) / f"lists-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _read_lists(entries: list, d, report, parse_report: ParseReport, bar_of) -> tuple[list[ResponseList], list[int]]:
    """Every entry's lists, entry after entry (``data.group_by`` groups within an entry), and each list's entry."""
    lists: list[ResponseList] = []
    sources: list[int] = []
    with bar_of(None, "data: read", "rows") as bar:
        for k, entry in enumerate(entries):
            got = list(parse_lists(_counted(entry.rows(d.split), report.per_source[k], bar), group_by=d.group_by,
                                   score_label=d.score_label, skip_bad_rows=d.skip_bad_rows, field_map=dict(d.field_map),
                                   report=parse_report, excluded=report.excluded))
            lists += got
            sources += [k] * len(got)
    return lists, sources


def _counted(rows: Iterable[Row], record: dict, bar) -> Iterator[Row]:
    """``rows``, each counted in its entry's ``rows_read`` and on the bar."""
    for row in rows:
        record["rows_read"] += 1
        bar.update(1)
        yield row


def _tokenized(lists: list[ResponseList], list_sources: list[int], tokenizer, d, report, bar_of) -> ListDataset:
    """Render, deduplicate and tokenize the lists; what is dropped is counted in ``report``."""
    from rewardforge.data.datasets import json_safe, prompt_key
    from rewardforge.data.inputs import InputFormat
    from rewardforge.data.template import TextRenderer
    from rewardforge.data.tokenize import TruncationStats

    renderer = TextRenderer(tokenizer)
    texts, starts, scores, sizes, keys, extras, srcs = [], [], [], [], [], [], []
    seen: set = set()
    for lst, src in _iter_bar(list(zip(lists, list_sources)), "data: render", "lists", bar_of):
        t_list, s_list, sc_list = [], [], []
        for resp, score in zip(lst.responses, lst.scores):
            t, s = renderer.render(lst.prompt, resp, lst.where)
            if t in t_list:
                report.exclude("duplicate_responses")
                continue
            t_list.append(t), s_list.append(s), sc_list.append(score)
        if not _usable(sc_list, report):
            continue
        if d.drop_duplicates:
            sig = (tuple(t_list), tuple(sc_list))
            if sig in seen:
                report.exclude("duplicate_lists")
                continue
            seen.add(sig)
        texts += t_list
        starts += s_list
        scores.append(sc_list)
        sizes.append(len(t_list))
        keys.append(prompt_key(t_list[0][: s_list[0]] if s_list[0] else t_list[0]))
        extras.append(json_safe(lst.extra))
        srcs.append(src)
    stats = TruncationStats()
    # a list's responses side by side: their shared prompt is tokenized once where that is exact
    ids = _tokenize_with_bar(tokenizer, texts, starts, d.max_length, d.truncation, stats, InputFormat.of(tokenizer).ends, bar_of)
    out_ids, out_scores, offsets, out_keys, out_extra, out_src = [], [], [0], [], [], []
    pos = 0
    for sc_list, k, key, extra, src in zip(scores, sizes, keys, extras, srcs):
        kept_ids: list[np.ndarray] = []
        kept_sc: list[float] = []
        for x, s in zip(ids[pos : pos + k], sc_list):
            if any(len(x) == len(y) and np.array_equal(x, y) for y in kept_ids):
                report.exclude("identical_after_truncation")
                continue
            kept_ids.append(x), kept_sc.append(s)
        pos += k
        if not _usable(kept_sc, report):
            continue
        out_ids += kept_ids
        out_scores += kept_sc
        offsets.append(offsets[-1] + len(kept_ids))
        out_keys.append(key), out_extra.append(extra), out_src.append(src)
    report.truncation = stats.as_dict()
    return ListDataset(out_ids, np.asarray(offsets), np.asarray(out_scores, np.float32), out_keys, out_extra,
                       np.asarray(out_src, np.int32))


def _usable(scores: list[float], report) -> bool:
    """A list trains only with 2+ responses that are not all tied; otherwise it is counted and dropped."""
    if len(scores) < 2:
        report.exclude("lists_under_2_responses")
        return False
    if len(set(scores)) == 1:
        report.exclude("lists_all_tied")
        return False
    return True


def _save(path: Path, ds: ListDataset, report) -> None:
    lengths = np.array([len(x) for x in ds.ids], dtype=np.int64)
    meta = {"prompt_keys": ds.prompt_keys, "extra": ds.extra, "report": report.as_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, ids=np.concatenate(ds.ids) if ds.ids else np.zeros(0, np.int32), lengths=lengths, offsets=ds.offsets,
                 scores=ds.scores, source=ds.source, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def _load(path: Path, report_cls):
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        flat, lengths = z["ids"], z["lengths"]
        ends = np.cumsum(lengths).tolist()
        ids = [flat[e - n : e] for e, n in zip(ends, lengths.tolist())]
        ds = ListDataset(ids, z["offsets"], z["scores"], meta["prompt_keys"], meta["extra"], z["source"])
    report = report_cls(**meta["report"])
    report.from_cache = True
    return ds, report


def _iter_bar(items: list, desc: str, unit: str, bar_of):
    with bar_of(len(items), desc, unit) as bar:
        for it in items:
            yield it
            bar.update(1)


def _tokenize_with_bar(tokenizer, texts, starts, max_length, truncation, stats, ends, bar_of, chunk: int = 8192) -> list:
    """``tokenize_texts`` in chunks (the same ids: tokenization is per text), with a bar over the sequences."""
    from rewardforge.data.tokenize import tokenize_texts

    out: list = []
    with bar_of(len(texts), "data: tokenize", "seq") as bar:
        for s in range(0, len(texts), chunk):
            out += tokenize_texts(tokenizer, texts[s : s + chunk], starts[s : s + chunk], max_length, truncation, stats,
                                  ends=ends)[0]
            bar.update(min(chunk, len(texts) - s))
    return out
