"""Build tokenized datasets: read -> parse -> render -> tokenize/truncate -> exclude -> split.

Every row that does not become a training example is counted by reason in a :class:`DataReport`;
nothing is dropped silently. Tokenized data is cached on disk, keyed by the data's content, the
tokenizer, the template, the format and the truncation settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardforge.data.formats import ParseReport, PreferencePair, RatedResponse, parse_rows
from rewardforge.data.readers import DataError, expand_sources, fingerprint_sources, read_rows
from rewardforge.data.inputs import InputFormat
from rewardforge.data.template import TextRenderer
from rewardforge.data.tokenize import TruncationStats, tokenize_texts

CACHE_VERSION = 2  # 2: truncation keeps the template's end-of-turn suffix (InputFormat.ends)


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
    from_cache: bool = False
    seconds: float = 0.0

    def exclude(self, reason: str, n: int = 1) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PairDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs. Item: chosen/rejected token ids, margin (nan if none), index."""

    kind = "pairs"

    def __init__(self, chosen: list[np.ndarray], rejected: list[np.ndarray], margin: np.ndarray, prompt_keys: list[str], extra: list[dict]):
        self.chosen, self.rejected, self.margin = chosen, rejected, np.asarray(margin, dtype=np.float32)
        self.prompt_keys, self.extra = prompt_keys, extra

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"chosen": self.chosen[i], "rejected": self.rejected[i], "margin": float(self.margin[i]), "index": i}

    def lengths(self) -> np.ndarray:
        """Tokens a pair costs in a padded batch: both sides are padded to the longer one."""
        return np.array([2 * max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)

    def subset(self, idx: list[int]) -> "PairDataset":
        return PairDataset([self.chosen[i] for i in idx], [self.rejected[i] for i in idx], self.margin[idx], [self.prompt_keys[i] for i in idx], [self.extra[i] for i in idx])

    def _columns(self):
        return {"chosen": self.chosen, "rejected": self.rejected}, {"margin": self.margin}

    @classmethod
    def _from_columns(cls, seqs, arrays, meta):
        return cls(seqs["chosen"], seqs["rejected"], arrays["margin"], meta["prompt_keys"], meta["extra"])


class RatedDataset(torch.utils.data.Dataset):
    """Tokenized rated responses. Item: token ids and labels (nan where missing)."""

    kind = "rated"

    def __init__(self, ids: list[np.ndarray], labels: np.ndarray, prompt_keys: list[str], extra: list[dict], attributes: list[str]):
        self.ids, self.labels = ids, np.asarray(labels, dtype=np.float32).reshape(len(ids), len(attributes))
        self.prompt_keys, self.extra, self.attributes = prompt_keys, extra, attributes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": i}

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def subset(self, idx: list[int]) -> "RatedDataset":
        return RatedDataset([self.ids[i] for i in idx], self.labels[idx], [self.prompt_keys[i] for i in idx], [self.extra[i] for i in idx], self.attributes)

    def _columns(self):
        return {"input_ids": self.ids}, {"labels": self.labels}

    @classmethod
    def _from_columns(cls, seqs, arrays, meta):
        return cls(seqs["input_ids"], arrays["labels"], meta["prompt_keys"], meta["extra"], meta["attributes"])


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


def _save_cache(path: Path, ds, report: DataReport) -> None:
    seqs, arrays = ds._columns()
    flat: dict[str, np.ndarray] = {}
    for name, col in seqs.items():
        lengths = np.array([len(x) for x in col], dtype=np.int64)
        flat[f"seq_{name}_ids"] = np.concatenate(col) if col else np.zeros(0, np.int32)
        flat[f"seq_{name}_len"] = lengths
    for name, arr in arrays.items():
        flat[f"arr_{name}"] = arr
    meta = {"kind": ds.kind, "prompt_keys": ds.prompt_keys, "extra": ds.extra, "report": report.as_dict()}
    if ds.kind == "rated":
        meta["attributes"] = ds.attributes
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **flat, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def _load_cache(path: Path):
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        seqs, arrays = {}, {}
        for key in z.files:
            if key.startswith("seq_") and key.endswith("_ids"):
                name = key[4:-4]
                flat, lengths = z[key], z[f"seq_{name}_len"]
                ends = np.cumsum(lengths).tolist()
                seqs[name] = [flat[e - n : e] for e, n in zip(ends, lengths.tolist())]  # views, as np.split gives
            elif key.startswith("arr_"):
                arrays[key[4:]] = z[key]
    cls = PairDataset if meta["kind"] == "pairs" else RatedDataset
    report = DataReport(**meta["report"])
    report.from_cache = True
    return cls._from_columns(seqs, arrays, meta), report


# ------------------------------------------------------------------ building


_PROGRESS: "contextvars.ContextVar[bool]" = contextvars.ContextVar("rewardforge_data_progress", default=False)


@contextlib.contextmanager
def show_progress(on: bool = True):
    """Inside, :func:`build_dataset` shows progress bars for its phases (reading, rendering, tokenizing)."""
    token = _PROGRESS.set(bool(on))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _bar(total: int | None, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not _PROGRESS.get(), leave=False, dynamic_ncols=True,
                mininterval=1.0)


def prompt_key(text: str) -> str:
    """The key of a rendered prompt: what the validation split hashes and exports fingerprint (no text kept)."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


_prompt_key = prompt_key


def _json_safe(extra: dict) -> dict:
    try:
        json.dumps(extra)
        return extra
    except (TypeError, ValueError):
        return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in extra.items()}


def build_dataset(
    sources: list[str],
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
):
    """Read, parse, render and tokenize ``sources`` into a :class:`PairDataset` or :class:`RatedDataset`.

    Args:
        sources: files, globs, dataset directories or hub names.
        tokenizer: a fast tokenizer with its template installed (see ``setup_template``).
        kind: ``"pairs"`` or ``"rated"``.
        cache_dir: directory of the tokenization cache; ``"none"`` disables it.
        drop_duplicates: exclude a pair whose rendered texts repeat an earlier pair's (counted as
            ``duplicate_pairs``).

    Returns:
        ``(dataset, DataReport)``.

    Raises:
        DataError: naming file, line and field of the first bad row (unless ``skip_bad_rows``).
    """
    t0 = time.perf_counter()
    if not sources:
        raise DataError("no data given; set data.train (and optionally data.validation)")
    files = expand_sources(list(sources))
    use_cache = str(cache_dir).lower() != "none"
    cache_path = None
    if use_cache:
        key = json.dumps(
            {
                "v": CACHE_VERSION, "data": fingerprint_sources(files), "kind": kind, "fmt": fmt, "max_length": max_length,
                "truncation": truncation, "attributes": attributes, "skip": skip_bad_rows, "field_map": field_map,
                "split": split, "tokenizer": tokenizer_fingerprint(tokenizer), "dedup": drop_duplicates,
            },
            sort_keys=True,
        )
        cache_path = Path(cache_dir or default_cache_dir()) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
        if cache_path.is_file():
            try:
                ds, report = _load_cache(cache_path)
                report.seconds = time.perf_counter() - t0
                return ds, report
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                cache_path.unlink(missing_ok=True)

    report = DataReport(sources=files)
    parse_report = ParseReport()

    def rows():
        for f in files:
            yield from read_rows(f, split)

    renderer = TextRenderer(tokenizer)
    ends = InputFormat.of(tokenizer).ends  # what truncation keeps: the same rule as scoring and serving
    stats = TruncationStats()
    with _bar(None, "data: read", "rows") as bar:
        def counted():
            for row in rows():
                bar.update(1)
                yield row

        examples = list(parse_rows(counted(), fmt, attributes=attributes, skip_bad_rows=skip_bad_rows, field_map=field_map,
                                   report=parse_report))
    want = PreferencePair if kind == "pairs" else RatedResponse
    for ex in examples:
        if not isinstance(ex, want):
            raise DataError(
                f"{ex.where}: this is {'a preference pair' if isinstance(ex, PreferencePair) else 'a rated response'}, "
                f"but the model type needs {'preference pairs' if kind == 'pairs' else 'rated responses'}; "
                "check model.reward_model_type and data.format"
            )

    if kind == "pairs":
        texts_c, texts_r, starts_c, starts_r, keys, margins, extras = [], [], [], [], [], [], []
        seen: set[tuple[str, str]] = set()
        for ex in _iter_bar(examples, "data: render", "pairs"):
            tc, sc, tr, sr = renderer.render_pair(ex.prompt, ex.chosen, ex.rejected, ex.where)
            if tc == tr:
                report.exclude("identical_texts")
                continue
            if drop_duplicates:
                if (tc, tr) in seen:
                    report.exclude("duplicate_pairs")
                    continue
                seen.add((tc, tr))
            texts_c.append(tc), texts_r.append(tr), starts_c.append(sc), starts_r.append(sr)
            keys.append(_prompt_key(tc[:sc])), margins.append(np.nan if ex.margin is None else ex.margin)
            extras.append(_json_safe(ex.extra))
        # chosen and rejected side by side: a pair's shared prompt is tokenized once where that is exact
        texts, starts = [None] * (2 * len(texts_c)), [0] * (2 * len(texts_c))
        texts[0::2], texts[1::2], starts[0::2], starts[1::2] = texts_c, texts_r, starts_c, starts_r
        ids = _tokenize_with_bar(tokenizer, texts, starts, max_length, truncation, stats, ends)
        ids_c, ids_r = ids[0::2], ids[1::2]
        keep = []
        for i, (a, b) in enumerate(zip(ids_c, ids_r)):
            if len(a) == len(b) and np.array_equal(a, b):
                report.exclude("identical_after_truncation")
            else:
                keep.append(i)
        ds = PairDataset([ids_c[i] for i in keep], [ids_r[i] for i in keep], np.asarray([margins[i] for i in keep], np.float32), [keys[i] for i in keep], [extras[i] for i in keep])
    else:
        attributes = list(attributes or [])
        texts, starts, keys, labels, extras = [], [], [], [], []
        for ex in _iter_bar(examples, "data: render", "rows"):
            t, s = renderer.render(ex.prompt, ex.response, ex.where)
            texts.append(t), starts.append(s), keys.append(_prompt_key(t[:s] if s else t))
            labels.append([np.nan if ex.labels[a] is None else ex.labels[a] for a in attributes])
            extras.append(_json_safe(ex.extra))
        ids = _tokenize_with_bar(tokenizer, texts, starts, max_length, truncation, stats, ends)
        ds = RatedDataset(ids, np.asarray(labels, np.float32).reshape(len(ids), len(attributes)), keys, extras, attributes)

    report.rows_read = parse_report.rows_read
    report.formats = dict(parse_report.formats)
    report.skipped_bad_rows = sum(parse_report.skipped.values())
    report.bad_row_messages = parse_report.examples
    report.truncation = stats.as_dict()
    report.examples = len(ds)
    if cache_path is not None:
        _save_cache(cache_path, ds, report)
    report.seconds = time.perf_counter() - t0
    return ds, report


def _iter_bar(items: list, desc: str, unit: str):
    with _bar(len(items), desc, unit) as bar:
        for it in items:
            yield it
            bar.update(1)


def _tokenize_with_bar(tokenizer, texts, starts, max_length, truncation, stats, ends, chunk: int = 8192) -> list:
    """``tokenize_texts`` in chunks (the same ids: tokenization is per text), with a bar over the sequences."""
    if not _PROGRESS.get() or len(texts) <= chunk:
        return tokenize_texts(tokenizer, texts, starts, max_length, truncation, stats, ends=ends)[0]
    out: list = []
    with _bar(len(texts), "data: tokenize", "seq") as bar:
        for a in range(0, len(texts), chunk):
            out += tokenize_texts(tokenizer, texts[a : a + chunk], starts[a : a + chunk], max_length, truncation, stats,
                                  ends=ends)[0]
            bar.update(len(texts[a : a + chunk]))
    return out


def split_by_prompt(ds, fraction: float, seed: int = 0):
    """Deterministically hold out ``fraction`` of prompts: every example of a prompt lands on one side."""
    val, train = [], []
    for i, key in enumerate(ds.prompt_keys):
        h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < fraction else train).append(i)
    return ds.subset(train), ds.subset(val)
