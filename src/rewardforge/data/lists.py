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
import itertools
import json
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

# 3: a memory-mapped Arrow entry (a directory: data.arrow + report.json, as pairs), no longer an .npz;
# 2: each list's data.train entry (source) and the entries' max_rows in the key
LIST_CACHE_VERSION = 3
LIST_BATCH = 4096  # lists per record batch of the Arrow file
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
    the data entry list ``i`` came from (what :func:`rewardforge.data.mixing.mix_sources` weighs). As for pairs,
    ``ids`` is a :class:`~rewardforge.data.store.TokenColumn` over the (memory-mapped) Arrow file, each response a
    read-only int32 view (no copy); ``prompt_keys``/``extra`` are sequences of str/dict (one per list), ``offsets``,
    ``scores`` (one per response) and ``source`` private numpy arrays. Lists work too:
    ``ListDataset([ids...], offsets, scores, keys, extras)``.

    The Arrow file has one row per list (:func:`list_schema`): ``responses`` (``large_list<large_list<int32>>``: its
    responses' token ids, one inner row per response; the outer offsets are ``offsets``), ``scores``
    (``large_list<float32>``), ``prompt_key``, ``extra`` (JSON) and ``source``.
    """

    kind = "lists"

    def __init__(self, ids, offsets, scores, prompt_keys, extra, source=None):
        from rewardforge.data.datasets import _objects, _sources, _texts, _tokens

        self.ids, self.offsets = _tokens(ids), np.asarray(offsets, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.prompt_keys, self.extra = _texts(prompt_keys), _objects(extra)
        self.source = _sources(source, len(self))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"responses": [self.ids[r] for r in range(a, b)], "scores": self.scores[a:b], "index": i, "row_start": a}

    def sizes(self) -> np.ndarray:
        """Responses per list."""
        return np.diff(self.offsets)

    def lengths(self) -> np.ndarray:
        """Tokens a list costs in a padded batch: its K responses padded to the longest."""
        sizes = self.sizes()
        longest = np.zeros(len(sizes), np.int64)
        full = sizes > 0
        if full.any():  # the longest response of each (non-empty) list, from the column's lengths
            longest[full] = np.maximum.reduceat(self.ids.lengths(), self.offsets[:-1][full])
        return sizes * longest

    def subset(self, idx) -> "ListDataset":
        """The lists ``idx`` (a sequence or numpy index array; repeats allowed): views of the same token buffers through
        an index array of their responses, no copy of the data."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        sizes = self.sizes()[idx]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = np.repeat(self.offsets[idx] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return ListDataset(self.ids.take(rows), offsets, self.scores[rows], self.prompt_keys.take(idx), self.extra.take(idx),
                           self.source[idx])

    @classmethod
    def from_table(cls, table, meta: dict[str, Any]) -> "ListDataset":
        """The dataset of a (mapped) table of :func:`list_schema`: token ids stay views of its buffers."""
        from rewardforge.data.store import JSONColumn, TextColumn, TokenColumn, nested, numbers

        responses, offsets = nested(table["responses"])
        scores, score_offsets = nested(table["scores"])
        if not np.array_equal(offsets, score_offsets):
            raise ValueError("the lists' scores do not match their responses")
        return cls(TokenColumn._of(responses), offsets, numbers(scores, np.float32), TextColumn._of(table["prompt_key"]),
                   JSONColumn._of(table["extra"]), numbers(table["source"], np.int32))


def list_schema():
    """The Arrow schema of a list dataset's file: one row per list (see :class:`ListDataset`)."""
    import pyarrow as pa

    from rewardforge.data.store import FLOATS, TOKEN_LISTS

    return pa.schema([("responses", TOKEN_LISTS), ("scores", FLOATS), ("prompt_key", pa.large_string()),
                      ("extra", pa.large_string()), ("source", pa.int32())])


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
    pairs and rated responses, in a memory-mapped Arrow file (a directory ``lists-<key>`` in ``data.cache_dir`` with
    ``data.arrow`` and ``report.json``, renamed into place when complete; keyed by the data, each entry's ``max_rows``,
    tokenizer and settings; ``data.cache_dir=none`` disables it: the file is then a scratch one, deleted once mapped).

    A cold build streams, so its memory does not grow with the data: lists are parsed as the rows are read and
    rendered, deduplicated, tokenized and written in chunks of :data:`LIST_BATCH` lists, each chunk freed once written
    (the file's record batches hold :data:`LIST_BATCH` kept lists each, as if all were written at once). What stays
    per list is a 16-byte digest of its texts and scores for ``data.drop_duplicates``. With ``data.group_by`` an
    entry's rows are held, grouped, until the whole entry is read (any of its rows may join a group); its lists then
    stream as the others do. The dataset and report are the same for any chunk size.

    Returns:
        ``(dataset, DataReport)``; the dataset's token ids are memory-mapped from its Arrow file.
    """
    from rewardforge.data.datasets import DataReport, _Entry, _entry_records, _open_built, progress_bar

    d = cfg.data
    t0 = time.perf_counter()
    if not sources:
        raise DataError("no data given; set data.train (and optionally data.validation)")
    entries = [_Entry.of(s) for s in sources]
    cache_path = None if str(d.cache_dir).lower() == "none" else _list_cache_path(d, entries, tokenizer)
    built = _open_built(cache_path, {"lists": ListDataset}) if cache_path is not None and cache_path.is_dir() else None
    if built is not None:  # (a damaged entry is removed by _open_built and rebuilt here, never trusted)
        built[1].from_cache = True
        built[1].seconds = time.perf_counter() - t0
        return built

    from rewardforge.data.tokenize import TruncationStats

    report = DataReport(sources=[f for e in entries for f in e.files], per_source=_entry_records(entries))
    parse_report = ParseReport()
    stats = TruncationStats()

    def complete(examples: list[int]) -> None:  # after the last list, before the report is written beside the file
        for k, n in enumerate(examples):
            report.per_source[k]["examples"] = n
        report.rows_read = parse_report.rows_read
        report.formats = dict(parse_report.formats)
        report.skipped_bad_rows = sum(parse_report.skipped.values())
        report.bad_row_messages = parse_report.examples
        report.examples = sum(examples)
        report.truncation = stats.as_dict()

    with progress_bar(None, "data: read", "rows") as read_bar, progress_bar(None, "data: write", "lists") as write_bar:
        lists = _read_lists(entries, d, report, parse_report, read_bar)
        chunks = _tokenized(lists, tokenizer, d, report, stats)
        ds = _write(cache_path, chunks, len(entries), report, complete, write_bar)
    report.seconds = time.perf_counter() - t0
    return ds, report


def _list_cache_path(d, entries: list, tokenizer) -> Path:
    """The cache entry of a list build (a directory: ``data.arrow`` + ``report.json``): a hash of the data, the entries
    (with their ``max_rows``), tokenizer and settings."""
    from rewardforge.data.datasets import default_cache_dir, tokenizer_fingerprint

    key = json.dumps({"v": LIST_CACHE_VERSION, "kind": "lists", "data": fingerprint_sources([f for e in entries for f in e.files]),
                      "entries": [[e.path, len(e.files), e.max_rows] for e in entries],
                      "max_length": d.max_length, "truncation": d.truncation, "skip": d.skip_bad_rows,
                      "field_map": dict(d.field_map), "split": d.split, "group_by": d.group_by, "score_label": d.score_label,
                      "dedup": d.drop_duplicates, "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return Path(d.cache_dir or default_cache_dir()) / f"lists-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _read_lists(entries: list, d, report, parse_report: ParseReport, bar) -> Iterator[tuple[ResponseList, int]]:
    """Every entry's lists with the entry's index, entry after entry, parsed as the rows are read (``data.group_by``
    groups within an entry: its lists come once the entry is read)."""
    for k, entry in enumerate(entries):
        for lst in parse_lists(_counted(entry.rows(d.split), report.per_source[k], bar), group_by=d.group_by,
                               score_label=d.score_label, skip_bad_rows=d.skip_bad_rows, field_map=dict(d.field_map),
                               report=parse_report, excluded=report.excluded):
            yield lst, k


def _counted(rows: Iterable[Row], record: dict, bar) -> Iterator[Row]:
    """``rows``, each counted in its entry's ``rows_read`` and on the bar."""
    for row in rows:
        record["rows_read"] += 1
        bar.update(1)
        yield row


@dataclass
class _Tokenized:
    """Kept lists before they are written: token ids and scores per response, the rest per list."""

    ids: list = field(default_factory=list)  # int32 arrays, list after list
    scores: list = field(default_factory=list)
    sizes: list = field(default_factory=list)  # responses per list
    keys: list = field(default_factory=list)
    extras: list = field(default_factory=list)  # JSON
    sources: list = field(default_factory=list)

    def extend(self, other: "_Tokenized") -> None:
        for name in ("ids", "scores", "sizes", "keys", "extras", "sources"):
            getattr(self, name).extend(getattr(other, name))

    def split(self, n: int) -> tuple["_Tokenized", "_Tokenized"]:
        """(the first ``n`` lists, the rest)."""
        r = sum(self.sizes[:n])
        return (_Tokenized(self.ids[:r], self.scores[:r], self.sizes[:n], self.keys[:n], self.extras[:n], self.sources[:n]),
                _Tokenized(self.ids[r:], self.scores[r:], self.sizes[n:], self.keys[n:], self.extras[n:], self.sources[n:]))


def _signature(texts: list[str], scores: list[float]) -> bytes:
    """A 16-byte digest of a list's rendered texts and scores: what ``data.drop_duplicates`` remembers of a list
    (equal texts and scores, equal digests; a collision is as likely as 2^-64 among 2^32 lists)."""
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    h.update((np.asarray(scores, np.float64) + 0.0).tobytes())  # (+ 0.0: -0.0 becomes 0.0; they compare equal)
    return h.digest()


def _tokenized(lists: Iterable[tuple[ResponseList, int]], tokenizer, d, report, stats) -> Iterator[_Tokenized]:
    """Render, deduplicate and tokenize the lists, :data:`LIST_BATCH` of them at a time (the kept ones of each chunk);
    what is dropped is counted in ``report``, truncation in ``stats``."""
    from rewardforge.data.datasets import json_safe, prompt_key
    from rewardforge.data.inputs import InputFormat
    from rewardforge.data.template import TextRenderer
    from rewardforge.data.tokenize import tokenize_texts

    renderer = TextRenderer(tokenizer)
    ends = InputFormat.of(tokenizer).ends
    seen: set[bytes] = set()
    lists = iter(lists)
    while chunk := list(itertools.islice(lists, LIST_BATCH)):
        texts, starts, scores, sizes, keys, extras, srcs = [], [], [], [], [], [], []
        for lst, src in chunk:
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
                sig = _signature(t_list, sc_list)
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
        del chunk
        # a list's responses side by side: their shared prompt is tokenized once where that is exact; per text, so
        # chunks give the ids one call would
        ids = tokenize_texts(tokenizer, texts, starts, d.max_length, d.truncation, stats, ends=ends)[0]
        out = _Tokenized()
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
            out.ids += kept_ids
            out.scores += kept_sc
            out.sizes.append(len(kept_ids))
            out.keys.append(key), out.extras.append(json.dumps(extra)), out.sources.append(src)
        yield out


def _usable(scores: list[float], report) -> bool:
    """A list trains only with 2+ responses that are not all tied; otherwise it is counted and dropped."""
    if len(scores) < 2:
        report.exclude("lists_under_2_responses")
        return False
    if len(set(scores)) == 1:
        report.exclude("lists_all_tied")
        return False
    return True


def _write(path: Path | None, chunks: Iterable[_Tokenized], n_entries: int, report, complete, bar) -> ListDataset:
    """Write the chunks' lists to an Arrow file in record batches of :data:`LIST_BATCH` lists (the cache entry ``path``,
    or a scratch file when the cache is off), each batch as soon as it is full, and return the dataset mapped from it,
    as pairs are. ``complete(examples)`` (the lists kept per entry) finishes ``report`` before it is written beside."""
    from rewardforge.data.datasets import build_target
    from rewardforge.data.store import TableWriter, open_table

    schema = list_schema()
    examples = [0] * n_entries
    with build_target(path) as target:
        with TableWriter(target, schema) as writer:
            pending = _Tokenized()
            for chunk in chunks:
                for src in chunk.sources:
                    examples[src] += 1
                pending.extend(chunk)
                while len(pending.sizes) >= LIST_BATCH:
                    full, pending = pending.split(LIST_BATCH)
                    writer.write(_record_batch(full, schema))
                    bar.update(len(full.sizes))
            if pending.sizes:  # (no empty batch after a full one, as when all were written at once)
                writer.write(_record_batch(pending, schema))
                bar.update(len(pending.sizes))
            complete(examples)
            writer.finish({"kind": "lists", "report": report.as_dict()})
        table, meta = open_table(target)
        return ListDataset.from_table(table, meta)


def _record_batch(lists: _Tokenized, schema):
    """One record batch of :func:`list_schema` holding ``lists``."""
    import pyarrow as pa

    from rewardforge.data.store import list_array, plain_array, text_array, token_array

    sizes = np.asarray(lists.sizes, np.int64)
    lengths = np.array([len(x) for x in lists.ids], np.int64)
    values = np.concatenate(lists.ids).astype(np.int32, copy=False) if lists.ids else np.zeros(0, np.int32)
    return pa.record_batch([
        list_array(token_array(values, lengths), sizes),
        list_array(plain_array(np.asarray(lists.scores, np.float32), pa.float32()), sizes),
        text_array(lists.keys), text_array(lists.extras), plain_array(np.asarray(lists.sources, np.int32), pa.int32()),
    ], schema=schema)
