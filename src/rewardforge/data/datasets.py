"""Build tokenized datasets: read -> parse -> render -> tokenize/truncate -> exclude -> split.

Every row that does not become a training example is counted by reason in a :class:`DataReport`;
nothing is dropped silently. The build streams: rows are read, parsed and rendered a chunk at a time
(:data:`CHUNK_EXAMPLES`), tokenized here or in ``num_proc`` worker processes, and written as record batches
to a memory-mapped Arrow file (:mod:`rewardforge.data.store`), so no stage holds all rows. The file is the
on-disk cache, keyed by the data's content, the tokenizer, the template, the format and the truncation settings:
built once by the main process, mapped by the others, which share its pages.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from rewardforge.data.formats import ParseReport, PreferencePair, RatedResponse, parse_rows
from rewardforge.data.inputs import InputFormat
from rewardforge.data.readers import DataError, expand_sources, fingerprint_sources, read_rows
from rewardforge.data.store import (
    FLOATS, TOKENS, JSONColumn, TableWriter, TextColumn, TokenColumn, float_matrix, float_rows, numbers, open_table,
    plain_array, text_array, token_array,
)
from rewardforge.data.template import TextRenderer
from rewardforge.data.tokenize import ChunkTokenizer, TruncationStats, add_stats

# 3: memory-mapped Arrow entries (a directory: data.arrow + report.json) with each example's source;
# 2: truncation keeps the template's end-of-turn suffix (InputFormat.ends)
CACHE_VERSION = 3
CHUNK_EXAMPLES = 4096  # examples read, rendered and tokenized together (the same chunks whatever num_proc)


@dataclass
class DataReport:
    """What happened to every input row, for the run summary."""

    sources: list[str] = field(default_factory=list)
    rows_read: int = 0
    examples: int = 0
    skipped_bad_rows: int = 0
    bad_row_messages: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    truncation: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # each source's row format (detected or data.format)
    # one record per data entry: source (path or glob), files, rows_read, examples (+ max_rows when set; training
    # adds train_examples and taken: what mixing took of it, rewardforge.data.mixing)
    per_source: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1  # processes that tokenized (1: the building process)
    from_cache: bool = False
    seconds: float = 0.0

    def exclude(self, reason: str, n: int = 1) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tokens(x) -> TokenColumn:
    return x if isinstance(x, TokenColumn) else TokenColumn.from_arrays(x)


def _texts(x) -> TextColumn:
    return x if isinstance(x, TextColumn) else TextColumn.from_strings(x)


def _objects(x) -> JSONColumn:
    return x if isinstance(x, JSONColumn) else JSONColumn.from_objects(json_safe(e) for e in x)


def _sources(source, n: int) -> np.ndarray:
    return np.zeros(n, np.int32) if source is None else np.asarray(source, np.int32)


class PairDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs. Item: chosen/rejected token ids (read-only int32 arrays), margin (nan if none), index.

    ``chosen``/``rejected`` are :class:`~rewardforge.data.store.TokenColumn` sequences over (memory-mapped) Arrow
    buffers, ``prompt_keys``/``extra`` sequences of str/dict, ``margin`` and ``source`` (the data entry each pair
    came from) numpy arrays. Lists work too: ``PairDataset([ids...], [ids...], margins, keys, extras)``.
    """

    kind = "pairs"

    def __init__(self, chosen, rejected, margin, prompt_keys, extra, source=None):
        self.chosen, self.rejected, self.margin = _tokens(chosen), _tokens(rejected), np.asarray(margin, dtype=np.float32)
        self.prompt_keys, self.extra, self.source = _texts(prompt_keys), _objects(extra), _sources(source, len(self.chosen))

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"chosen": self.chosen[i], "rejected": self.rejected[i], "margin": float(self.margin[i]), "index": i}

    def lengths(self) -> np.ndarray:
        """Tokens a pair costs in a padded batch: both sides are padded to the longer one."""
        return 2 * np.maximum(self.chosen.lengths(), self.rejected.lengths())

    def subset(self, idx) -> "PairDataset":
        """The pairs ``idx`` (repeats allowed): views of the same buffers through an index array, no copy of the data."""
        idx = np.asarray(idx, dtype=np.int64)
        return PairDataset(self.chosen.take(idx), self.rejected.take(idx), self.margin[idx], self.prompt_keys.take(idx),
                           self.extra.take(idx), self.source[idx])

    SCHEMA = pa.schema([("chosen", TOKENS), ("rejected", TOKENS), ("margin", pa.float32()), ("prompt_key", pa.large_string()),
                        ("extra", pa.large_string()), ("source", pa.int32())])

    @classmethod
    def from_table(cls, table: pa.Table, meta: dict[str, Any]) -> "PairDataset":
        return cls(TokenColumn._of(table["chosen"]), TokenColumn._of(table["rejected"]), numbers(table["margin"], np.float32),
                   TextColumn._of(table["prompt_key"]), JSONColumn._of(table["extra"]), numbers(table["source"], np.int32))


class RatedDataset(torch.utils.data.Dataset):
    """Tokenized rated responses. Item: token ids (a read-only int32 array) and labels (nan where missing)."""

    kind = "rated"

    def __init__(self, ids, labels, prompt_keys, extra, attributes: list[str], source=None):
        self.ids = _tokens(ids)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(self.ids), len(attributes))
        self.prompt_keys, self.extra, self.attributes = _texts(prompt_keys), _objects(extra), attributes
        self.source = _sources(source, len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": i}

    def lengths(self) -> np.ndarray:
        return self.ids.lengths()

    def subset(self, idx) -> "RatedDataset":
        """The responses ``idx`` (repeats allowed), sharing the same buffers."""
        idx = np.asarray(idx, dtype=np.int64)
        return RatedDataset(self.ids.take(idx), self.labels[idx], self.prompt_keys.take(idx), self.extra.take(idx),
                            self.attributes, self.source[idx])

    SCHEMA = pa.schema([("input_ids", TOKENS), ("labels", FLOATS), ("prompt_key", pa.large_string()),
                        ("extra", pa.large_string()), ("source", pa.int32())])

    @classmethod
    def from_table(cls, table: pa.Table, meta: dict[str, Any]) -> "RatedDataset":
        attributes = list(meta["attributes"])
        return cls(TokenColumn._of(table["input_ids"]), float_matrix(table["labels"], len(attributes)),
                   TextColumn._of(table["prompt_key"]), JSONColumn._of(table["extra"]), attributes,
                   numbers(table["source"], np.int32))


_KINDS = {"pairs": PairDataset, "rated": RatedDataset}


# ------------------------------------------------------------------ cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("REWARDFORGE_CACHE", Path.home() / ".cache" / "rewardforge"))


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = _backend_parts(backend) if backend is not None else None
    if parts is not None:
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    elif backend is not None:
        # Without the truncation/padding state: transformers resets it on the first call, and the
        # same tokenizer must hit the cache before and after that.
        state = json.loads(backend.to_str())
        state.pop("truncation", None), state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token)]).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()


def _backend_parts(backend) -> list[bytes] | None:
    """Everything in the backend's tokenizer.json except the truncation/padding state (which transformers
    resets on the first call: the same tokenizer must hit the cache before and after that), each part
    serialized by the Rust library itself. Hashing the whole JSON through Python's json (sorted keys, a
    30k-entry vocabulary) cost 0.02-0.25 s per build, most of a cached run. None: a part cannot be serialized."""
    try:
        parts = [b"v2"]
        for component in (backend.normalizer, backend.pre_tokenizer, backend.post_processor, backend.decoder, backend.model):
            state = b"null" if component is None else component.__getstate__()
            parts.append(state.encode() if isinstance(state, str) else bytes(state))
        added = sorted(backend.get_added_tokens_decoder().items())
        parts.append(json.dumps([[i, t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special] for i, t in added]).encode())
        return parts
    except Exception:
        return None


def _cache_path(cache_dir, entries: list["_Entry"], st: "_Settings", tokenizer) -> Path:
    """The cache entry of this build: a hash of the data's content, the entries and every setting that changes the output."""
    files = [f for e in entries for f in e.files]
    root = Path(cache_dir or default_cache_dir())
    key = json.dumps(
        {
            "v": CACHE_VERSION, "data": fingerprint_sources(files, root / "fingerprints"), "kind": st.kind, "fmt": st.fmt, "max_length": st.max_length,
            "truncation": st.truncation, "attributes": st.attributes, "skip": st.skip_bad_rows, "field_map": st.field_map,
            "split": st.split, "tokenizer": tokenizer_fingerprint(tokenizer), "dedup": st.drop_duplicates,
            "entries": [[e.path, len(e.files), e.max_rows] for e in entries],
        },
        sort_keys=True,
    )
    return root / hashlib.sha256(key.encode()).hexdigest()[:32]


def _open_built(path: Path, kinds: dict[str, Any] | None = None):
    """(dataset, report) of a complete entry, mapped; a damaged entry is removed (and rebuilt), never trusted.

    ``kinds``: the dataset classes by the entry's ``kind`` (default: pairs and rated; list data passes its own), each
    with ``from_table(table, meta)``; a table row is an example (a pair, a rated response, a list).
    """
    kinds = _KINDS if kinds is None else kinds
    try:
        table, meta = open_table(path)
        if table.num_rows != meta["report"]["examples"] or meta["kind"] not in kinds:
            raise ValueError("row count does not match the report")
        return kinds[meta["kind"]].from_table(table, meta), DataReport(**meta["report"])
    except Exception:  # noqa: BLE001 - any unreadable entry is rebuilt
        shutil.rmtree(path, ignore_errors=True)
        return None


@contextlib.contextmanager
def build_target(path: Path | None):
    """Where a cold build writes its entry: ``path`` (the cache), or with no cache (``None``) a scratch directory of its
    own, deleted on leaving, once the entry is mapped (the mapping stays valid)."""
    if path is not None:
        yield Path(path)
        return
    scratch = Path(tempfile.mkdtemp(prefix="rewardforge-data-"))
    try:
        yield scratch / "dataset"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_PROGRESS: "contextvars.ContextVar[bool]" = contextvars.ContextVar("rewardforge_data_progress", default=False)


@contextlib.contextmanager
def show_progress(on: bool = True):
    """Inside, :func:`build_dataset` shows progress bars for its phases (reading, rendering, tokenizing)."""
    token = _PROGRESS.set(bool(on))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_bar(total: int | None, desc: str, unit: str):
    """A tqdm bar for a data phase, shown while :func:`show_progress` is on (one bar per phase that takes time)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not _PROGRESS.get(), leave=False, dynamic_ncols=True,
                mininterval=1.0)


def prompt_key(text: str) -> str:
    """The key of a rendered prompt: what the validation split hashes and exports fingerprint (no text kept)."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


_prompt_key = prompt_key


def json_safe(extra: dict) -> dict:
    """``extra`` as JSON can hold it (values JSON cannot hold become their repr)."""
    try:
        json.dumps(extra)
        return extra
    except (TypeError, ValueError):
        return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in extra.items()}


def resolve_num_proc(num_proc: int | None) -> int:
    """Worker processes of a cold build (1: this process). ``None``: one per CPU core this process may use, except on 1-2
    cores, where this process alone was faster (its Rust tokenizer threads each batch over both cores, and workers
    cost ~25% more CPU per pair: bench/data_scale.py)."""
    if num_proc is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return cores if cores > 2 else 1
    if num_proc < 0:
        raise DataError(f"data.num_proc={num_proc} is not valid; give a number of processes >= 0 (0 or 1: this process) or null (the default)")
    return max(1, int(num_proc))


@dataclass(frozen=True)
class _Entry:
    """One data entry: its path (file, glob, dataset directory or hub name), the files it names, the rows to read at most."""

    path: str
    files: tuple[str, ...]
    max_rows: int | None = None

    @classmethod
    def of(cls, source) -> "_Entry":
        """From a path, a mapping ``{path, max_rows, ...}`` or a :class:`rewardforge.config.DataSource`."""
        if isinstance(source, (str, os.PathLike)):
            path, max_rows = os.fspath(source), None
        elif isinstance(source, dict):
            path, max_rows = source.get("path"), source.get("max_rows")
        else:
            path, max_rows = source.path, getattr(source, "max_rows", None)
        return cls(str(path), tuple(expand_sources([str(path)])), max_rows)

    def rows(self, split: str):
        """The entry's rows, file after file, stopping after ``max_rows`` without reading further."""
        rows = itertools.chain.from_iterable(read_rows(f, split) for f in self.files)
        return rows if self.max_rows is None else itertools.islice(rows, self.max_rows)


def _entry_records(entries: list[_Entry]) -> list[dict[str, Any]]:
    """The data report's ``per_source``, counts at 0: one record per entry (``max_rows`` only where set)."""
    return [{"source": e.path, "files": len(e.files), "rows_read": 0, "examples": 0,
             **({"max_rows": e.max_rows} if e.max_rows is not None else {})} for e in entries]


@dataclass
class _Settings:
    kind: str
    fmt: str
    max_length: int
    truncation: str
    attributes: list[str] | None
    skip_bad_rows: bool
    field_map: dict[str, str] | None
    split: str
    drop_duplicates: bool


def build_dataset(
    sources: list,
    tokenizer,
    *,
    kind: str,
    fmt: str = "auto",
    max_length: int = 512,
    truncation: str = "prompt_left",
    attributes: list[str] | None = None,
    skip_bad_rows: bool = False,
    field_map: dict[str, str] | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
    drop_duplicates: bool = True,
    num_proc: int | None = None,
):
    """Read, parse, render and tokenize ``sources`` into a :class:`PairDataset` or :class:`RatedDataset`.

    Args:
        sources: data entries: files, globs, dataset directories or hub names, or mappings / ``DataSource`` with a
            ``path`` and optionally ``max_rows`` (read only the first rows of that entry). Each example records its
            entry (``dataset.source``) for :func:`rewardforge.data.mixing.mix_sources`, which applies weights.
        tokenizer: a fast tokenizer with its template installed (see ``setup_template``).
        kind: ``"pairs"`` or ``"rated"``.
        cache_dir: directory of the tokenization cache; ``"none"`` disables it.
        drop_duplicates: exclude a pair whose rendered texts repeat an earlier pair's (counted as
            ``duplicate_pairs``).
        num_proc: processes that tokenize a cold build (``None``: one per core, this process alone on 1-2 cores;
            0 or 1: this process). The dataset is the same byte for byte whatever the number.

    Returns:
        ``(dataset, DataReport)``; the dataset's token ids are memory-mapped from its Arrow file.

    Raises:
        DataError: naming file, line and field of the first bad row (unless ``skip_bad_rows``).
    """
    t0 = time.perf_counter()
    if not sources:
        raise DataError("no data given; set data.train (and optionally data.validation)")
    entries = [_Entry.of(s) for s in sources]
    st = _Settings(kind, fmt, max_length, truncation, attributes, skip_bad_rows, field_map, split, drop_duplicates)
    path = None if str(cache_dir).lower() == "none" else _cache_path(cache_dir, entries, st, tokenizer)
    built = _open_built(path) if path is not None and path.is_dir() else None
    if built is not None:
        built[1].from_cache = True
    else:
        built = _build(entries, tokenizer, st, path, resolve_num_proc(num_proc))
    built[1].seconds = time.perf_counter() - t0
    return built


def _build(entries: list[_Entry], tokenizer, st: _Settings, path: Path | None, num_proc: int):
    """Stream the entries through parsing, rendering and tokenization into an Arrow file; return it mapped."""
    report = DataReport(sources=[f for e in entries for f in e.files], per_source=_entry_records(entries))
    with build_target(path) as target:
        with TableWriter(target, _KINDS[st.kind].SCHEMA) as writer:
            _write_examples(entries, tokenizer, st, writer, report, num_proc)
            writer.finish({"kind": st.kind, "attributes": list(st.attributes or []), "report": report.as_dict()})
        table, meta = open_table(target)
        return _KINDS[st.kind].from_table(table, meta), report


def _write_examples(entries: list[_Entry], tokenizer, st: _Settings, writer: TableWriter, report: DataReport, num_proc: int) -> None:
    """Examples -> rendered chunks -> tokenized chunks (in order) -> record batches; fills ``report``."""
    parse_report, stats = ParseReport(), TruncationStats()
    examples = _read_examples(entries, st, parse_report, report)
    render, to_batch = (_render_pairs, _pair_batch) if st.kind == "pairs" else (_render_rated, _rated_batch)
    tokenize = ChunkTokenizer(tokenizer, st.max_length, st.truncation, InputFormat.of(tokenizer).ends, num_proc)
    for rendered, chunk in tokenize.map(render(examples, TextRenderer(tokenizer), st, report)):
        add_stats(stats, chunk.stats)
        batch = to_batch(rendered, chunk, report)
        for k, n in zip(*np.unique(numbers(batch.column("source"), np.int32), return_counts=True)):
            report.per_source[int(k)]["examples"] += int(n)
        writer.write(batch)
    report.rows_read = parse_report.rows_read
    report.formats = dict(parse_report.formats)
    report.skipped_bad_rows = sum(parse_report.skipped.values())
    report.bad_row_messages = parse_report.examples
    report.truncation = stats.as_dict()
    report.examples = writer.rows
    report.processes = tokenize.processes


def _read_examples(entries: list[_Entry], st: _Settings, parse_report: ParseReport, report: DataReport) -> Iterator:
    """``(entry index, example)`` of every entry in order, streamed; each must be of the kind the model needs."""
    current = [0]  # the entry of the row read last: parse_rows yields an example right after reading its last row

    def rows():
        with progress_bar(None, "data: read, render, tokenize", "rows") as bar:  # one streamed pipeline, one bar
            for k, entry in enumerate(entries):
                current[0] = k
                for row in entry.rows(st.split):
                    report.per_source[k]["rows_read"] += 1
                    bar.update(1)
                    yield row

    want = PreferencePair if st.kind == "pairs" else RatedResponse
    for ex in parse_rows(rows(), st.fmt, attributes=st.attributes, skip_bad_rows=st.skip_bad_rows, field_map=st.field_map,
                         report=parse_report):
        if not isinstance(ex, want):
            raise DataError(
                f"{ex.where}: this is {'a preference pair' if isinstance(ex, PreferencePair) else 'a rated response'}, "
                f"but the model type needs {'preference pairs' if st.kind == 'pairs' else 'rated responses'}; "
                "check model.reward_model_type and data.format"
            )
        yield current[0], ex


@dataclass
class _Rendered:
    """What a chunk keeps beside its texts, one value per example, until its token ids come back."""

    keys: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # JSON
    sources: list[int] = field(default_factory=list)
    values: list = field(default_factory=list)  # margins (pairs) or label rows (rated)

    def add(self, key: str, value, extra: dict, source: int) -> None:
        self.keys.append(key), self.values.append(value), self.extras.append(json.dumps(json_safe(extra)))
        self.sources.append(source)


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, n)):
        yield chunk


def _pair_digest(chosen: str, rejected: str) -> bytes:
    """128 bits of the pair's two texts: what duplicate detection keeps per pair instead of the texts."""
    a, b = chosen.encode("utf-8", "surrogatepass"), rejected.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(len(a).to_bytes(8, "little"), digest_size=16)
    h.update(a), h.update(b)
    return h.digest()


def _render_pairs(examples: Iterator, renderer: TextRenderer, st: _Settings, report: DataReport) -> Iterator:
    """``(texts, starts, _Rendered)`` per chunk; chosen and rejected side by side (a shared prompt is tokenized once)."""
    seen: set[bytes] = set()
    for chunk in _chunks(examples, CHUNK_EXAMPLES):
        texts, starts, rendered = [], [], _Rendered()
        for source, ex in chunk:
            tc, sc, tr, sr = renderer.render_pair(ex.prompt, ex.chosen, ex.rejected, ex.where)
            if tc == tr:
                report.exclude("identical_texts")
                continue
            if st.drop_duplicates:
                digest = _pair_digest(tc, tr)
                if digest in seen:
                    report.exclude("duplicate_pairs")
                    continue
                seen.add(digest)
            texts += (tc, tr)
            starts += (sc, sr)
            rendered.add(_prompt_key(tc[:sc]), np.nan if ex.margin is None else ex.margin, ex.extra, source)
        if texts:
            yield texts, starts, rendered


def _pair_batch(rendered: _Rendered, chunk, report: DataReport) -> pa.RecordBatch:
    """The chunk's pairs as a record batch, without those whose two sides are the same after truncation (counted)."""
    lengths = chunk.lengths
    first = np.cumsum(lengths) - lengths
    keep = np.ones(len(lengths) // 2, bool)
    for i in np.flatnonzero(lengths[0::2] == lengths[1::2]):
        a, b, n = first[2 * i], first[2 * i + 1], lengths[2 * i]
        keep[i] = not np.array_equal(chunk.values[a : a + n], chunk.values[b : b + n])
    if not keep.all():
        report.exclude("identical_after_truncation", int((~keep).sum()))
    kept_seqs, chosen = np.repeat(keep, 2), np.tile(np.array([True, False]), len(keep))

    def side(mask: np.ndarray) -> pa.Array:
        return token_array(chunk.values[np.repeat(mask, lengths)], lengths[mask])

    k = np.flatnonzero(keep)
    return pa.record_batch([
        side(kept_seqs & chosen), side(kept_seqs & ~chosen), plain_array(np.asarray(rendered.values, np.float32)[k], pa.float32()),
        text_array(rendered.keys[i] for i in k), text_array(rendered.extras[i] for i in k),
        plain_array(np.asarray(rendered.sources, np.int32)[k], pa.int32()),
    ], schema=PairDataset.SCHEMA)


def _render_rated(examples: Iterator, renderer: TextRenderer, st: _Settings, report: DataReport) -> Iterator:
    """``(texts, starts, _Rendered)`` per chunk of rated responses; labels in ``attributes`` order, nan where missing."""
    attributes = list(st.attributes or [])
    for chunk in _chunks(examples, CHUNK_EXAMPLES):
        texts, starts, rendered = [], [], _Rendered()
        for source, ex in chunk:
            t, s = renderer.render(ex.prompt, ex.response, ex.where)
            texts.append(t), starts.append(s)
            rendered.add(_prompt_key(t[:s] if s else t), [np.nan if ex.labels[a] is None else ex.labels[a] for a in attributes],
                         ex.extra, source)
        yield texts, starts, rendered


def _rated_batch(rendered: _Rendered, chunk, report: DataReport) -> pa.RecordBatch:
    labels = np.asarray(rendered.values, np.float32)
    labels = labels.reshape(len(rendered.keys), labels.size // max(len(rendered.keys), 1))
    return pa.record_batch([
        token_array(chunk.values, chunk.lengths), float_rows(labels), text_array(rendered.keys), text_array(rendered.extras),
        plain_array(np.asarray(rendered.sources, np.int32), pa.int32()),
    ], schema=RatedDataset.SCHEMA)


def split_by_prompt(ds, fraction: float, seed: int = 0):
    """Deterministically hold out ``fraction`` of prompts: every example of a prompt lands on one side."""
    val, train = [], []
    for i, key in enumerate(ds.prompt_keys):
        h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < fraction else train).append(i)
    return ds.subset(train), ds.subset(val)
