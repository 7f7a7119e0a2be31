"""Data at scale: memory-mapped Arrow datasets, parallel cold builds identical to one-process builds, streaming reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_jsonl

from rewardforge.data import datasets as D
from rewardforge.data import readers as R
from rewardforge.data import tokenize as T
from rewardforge.data.datasets import build_dataset, split_by_prompt
from rewardforge.data.readers import DataError
from rewardforge.data.store import DATA_FILE, REPORT_FILE, TokenColumn
from rewardforge.data.template import setup_template
from rewardforge.models import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
HH = ROOT.parent / "shared" / "data" / "hh_rlhf"


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def tok(request, tiny_model):
    """bert: prompt and response tokenized apart (WordPiece); gpt2: whole texts (byte-level BPE)."""
    t = load_tokenizer(str(tiny_model(request.param)))
    setup_template(t, "auto")
    return t


def _rows(n: int) -> list:
    """Pairs with everything a build counts: truncation, identical texts, duplicates of pairs several chunks back,
    bad rows, margins and extra fields."""
    rows = []
    for i in range(n):
        if i % 71 == 70:
            rows.append({"prompt": f"question {i}", "chosen": "no rejected field"})  # bad row
        elif i % 53 == 52:
            rows.append({"prompt": f"question {i}", "chosen": "same", "rejected": "same"})
        elif i % 37 == 36 and i > 300:
            rows.append(rows[i - 300])  # a duplicate from chunks before
        else:
            long = " ".join(["and the water boils"] * (i % 9))
            rows.append({"prompt": f"How do I boil egg number {i}? {long}", "chosen": f"Put it in boiling water {i} {long}",
                         "rejected": "Go away.", **({"margin": float(i % 5)} if i % 3 else {}), "subset": f"s{i % 4}"})
    return rows


def _entry(cache_dir: str) -> Path:
    (entry,) = Path(cache_dir).glob(f"*/{DATA_FILE}")
    return entry.parent


def _assert_same_build(dir_a: str, dir_b: str) -> None:
    """Every column the same, byte for byte (the whole Arrow file), and the same report but for who tokenized."""
    a, b = _entry(dir_a), _entry(dir_b)
    ta = pa.ipc.open_file(pa.memory_map(str(a / DATA_FILE))).read_all()
    tb = pa.ipc.open_file(pa.memory_map(str(b / DATA_FILE))).read_all()
    assert ta.schema == tb.schema and ta.num_rows == tb.num_rows
    for name in ta.column_names:  # every buffer of every record batch (Arrow's equals() would call nan != nan)
        ca, cb = ta[name].chunks, tb[name].chunks
        assert [len(c) for c in ca] == [len(c) for c in cb], name
        for x, y in zip(ca, cb):
            assert [b and b.to_pybytes() for b in x.buffers()] == [b and b.to_pybytes() for b in y.buffers()], name
    assert (a / DATA_FILE).read_bytes() == (b / DATA_FILE).read_bytes()
    ra, rb = (json.loads((d / REPORT_FILE).read_text()) for d in (a, b))
    assert ra["report"].pop("processes") == 1 and rb["report"].pop("processes") == 2  # the workers really ran
    assert ra == rb


def test_parallel_build_gives_the_same_bytes_and_counts(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 128)  # 900 rows: 8 chunks, so the workers share them
    f = write_jsonl(tmp_path / "pairs.jsonl", _rows(900))
    kw = dict(kind="pairs", max_length=24, skip_bad_rows=True)
    one, rep_one = build_dataset([str(f)], tok, cache_dir=str(tmp_path / "one"), num_proc=1, **kw)
    two, rep_two = build_dataset([str(f)], tok, cache_dir=str(tmp_path / "two"), num_proc=2, **kw)
    _assert_same_build(str(tmp_path / "one"), str(tmp_path / "two"))
    # the data exercises every count
    assert set(rep_one.excluded) >= {"identical_texts", "duplicate_pairs"} and rep_one.skipped_bad_rows == 12
    assert rep_one.truncation["truncated_prompt"] > 0 and rep_one.examples == len(one) == len(two)


def test_parallel_build_of_rated_rows_gives_the_same_bytes(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 64)
    rows = [{"prompt": f"q {i} " + "word " * (i % 11), "response": f"answer {i}", "labels": {"a": float(i), **({"b": 1.0} if i % 2 else {})}}
            for i in range(300)]
    f = write_jsonl(tmp_path / "rated.jsonl", rows)
    kw = dict(kind="rated", attributes=["a", "b"], max_length=16)
    one, _ = build_dataset([str(f)], tok, cache_dir=str(tmp_path / "one"), num_proc=1, **kw)
    build_dataset([str(f)], tok, cache_dir=str(tmp_path / "two"), num_proc=2, **kw)
    _assert_same_build(str(tmp_path / "one"), str(tmp_path / "two"))
    assert one.labels.shape == (300, 2) and np.isnan(one.labels[0, 1]) and one.labels[1, 1] == 1.0


def test_an_error_in_a_worker_is_the_same_one_line_error(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 64)
    special = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    if not special:
        pytest.skip("this tokenizer adds no special tokens: no max_length leaves too little room for them")
    f = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows(300) if "rejected" in r])
    for num_proc in (1, 2):
        with pytest.raises(DataError, match=rf"^data\.max_length={special} leaves no room for content after the {special} special tokens$"):
            build_dataset([str(f)], tok, kind="pairs", max_length=special, cache_dir=str(tmp_path / f"c{num_proc}"), num_proc=num_proc)
        assert not list((tmp_path / f"c{num_proc}").glob("*/data.arrow"))  # nothing half-built left behind


def _die(texts, starts):
    os._exit(9)  # as a worker the kernel's OOM killer ends


def test_a_worker_that_dies_is_a_data_error_naming_the_fix(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 64)
    monkeypatch.setattr(T, "_work", _die)
    f = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows(300) if "rejected" in r])
    with pytest.raises(DataError, match=r"a tokenizer worker process died .* set data\.num_proc lower than 2, or to 1"):
        build_dataset([str(f)], tok, kind="pairs", max_length=64, cache_dir="none", num_proc=2)


@pytest.mark.skipif(not HH.is_dir(), reason="needs the HH-RLHF files in ../shared/data/hh_rlhf (see its README)")
def test_parallel_build_of_hh_rlhf_gives_the_same_bytes(tmp_path, tiny_model, monkeypatch):
    tok = load_tokenizer(str(tiny_model("bert")))  # (WordPiece, prompt and response apart; the BPE path: the tests above)
    setup_template(tok, "auto")
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 100)  # 5 chunks
    entries = [{"path": str(HH / "harmless-base.test.jsonl.gz"), "max_rows": 250},
               {"path": str(HH / "helpful-online.test.jsonl.gz"), "max_rows": 250}]
    _, rep = build_dataset(entries, tok, kind="pairs", max_length=64, cache_dir=str(tmp_path / "one"), num_proc=1)
    build_dataset(entries, tok, kind="pairs", max_length=64, cache_dir=str(tmp_path / "two"), num_proc=2)
    _assert_same_build(str(tmp_path / "one"), str(tmp_path / "two"))
    assert rep.rows_read == 500 and [s["rows_read"] for s in rep.per_source] == [250, 250]
    assert rep.truncation["truncated_prompt"] > 0


# ------------------------------------------------------------------ mapped, shared, no copies


def test_cached_dataset_is_memory_mapped_and_not_copied(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs.jsonl", _rows(2000))
    cache = str(tmp_path / "cache")
    built, _ = build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir=cache)
    size = (_entry(cache) / DATA_FILE).stat().st_size
    before = pa.total_allocated_bytes()
    ds, rep = build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir=cache)
    assert rep.from_cache and len(ds) == len(built)
    assert pa.total_allocated_bytes() - before < size / 10  # the token ids stay in the mapped file
    if os.path.exists("/proc/self/maps"):
        assert str(_entry(cache) / DATA_FILE) in Path("/proc/self/maps").read_text()
    item = ds[5]
    assert item["chosen"].dtype == np.int32 and not item["chosen"].flags.writeable
    assert item["chosen"].tolist() == built[5]["chosen"].tolist()


def test_subset_and_split_share_the_buffers(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs.jsonl", _rows(400))
    ds, _ = build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir="none")
    train, val = split_by_prompt(ds, 0.2)
    assert len(train) + len(val) == len(ds) and len(val) > 0
    idx = [7, 3, 3, 200]  # repeats allowed
    sub = ds.subset(idx)
    for j, i in enumerate(idx):
        assert np.shares_memory(sub.chosen[j], ds.chosen[i]) and np.shares_memory(sub.rejected[j], ds.rejected[i])
        assert sub.prompt_keys[j] == ds.prompt_keys[i] and sub.extra[j] == ds.extra[i]
        np.testing.assert_array_equal(sub.margin[j], ds.margin[i])  # (nan where the pair has no margin)
    np.testing.assert_array_equal(sub.lengths(), ds.lengths()[idx])
    # a subset of a subset indexes the original buffers
    assert np.shares_memory(sub.subset([3])[0]["chosen"], ds.chosen[200])
    with pytest.raises(IndexError):
        ds.subset([len(ds)])


def test_token_column_reads_across_record_batches():
    chunks = [TokenColumn.from_arrays([np.arange(k, dtype=np.int32) for k in range(n)]) for n in (3, 1, 4)]
    col = TokenColumn([p for c in chunks for p in c._parts])  # three record batches' buffers
    assert len(col) == 8 and col.lengths().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert [x.tolist() for x in col] == [[], [0], [0, 1], [], [], [0], [0, 1], [0, 1, 2]]
    assert col[-1].tolist() == [0, 1, 2] and [x.tolist() for x in col.take([7, 2])] == [[0, 1, 2], [0, 1]]
    with pytest.raises(IndexError):
        col[8]


def test_no_cache_build_leaves_no_file(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    f = write_jsonl(tmp_path / "pairs.jsonl", _rows(50))
    ds, _ = build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir="none")
    assert list((tmp_path / "tmp").iterdir()) == []  # removed once mapped; the mapping stays readable
    assert all(len(ds[i]["chosen"]) > 0 for i in range(len(ds)))


def test_old_cache_entries_are_not_read(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs.jsonl", _rows(20))
    cache = tmp_path / "cache"
    build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir=str(cache))
    key = _entry(str(cache)).name
    assert D.CACHE_VERSION == 3 and len(key) == 32
    (cache / f"{key}.npz").write_bytes(b"a version 2 entry")  # the old layout beside it is ignored
    assert build_dataset([str(f)], tok, kind="pairs", max_length=64, skip_bad_rows=True, cache_dir=str(cache))[1].from_cache


# ------------------------------------------------------------------ streaming


def test_build_streams_rows_a_chunk_at_a_time(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_EXAMPLES", 50)
    f = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows(1000) if "rejected" in r])
    read = {"rows": 0}
    real_rows, real_chunk = R.read_rows, T.tokenize_chunk

    def counting_rows(*a, **k):
        for row in real_rows(*a, **k):
            read["rows"] += 1
            yield row

    at_tokenize = []

    def recording_chunk(*a, **k):
        at_tokenize.append(read["rows"])
        return real_chunk(*a, **k)

    monkeypatch.setattr(D, "read_rows", counting_rows)
    monkeypatch.setattr(T, "tokenize_chunk", recording_chunk)
    _, rep = build_dataset([str(f)], tok, kind="pairs", max_length=64, cache_dir="none", num_proc=1)
    assert read["rows"] == rep.rows_read > 900
    assert len(at_tokenize) == -(-rep.rows_read // 50)
    assert at_tokenize[0] <= 2 * 50 + 1  # the first chunk was tokenized with two chunks read, not the whole file


def test_max_rows_stops_reading_and_is_in_the_cache_key(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows(300) if "rejected" in r])
    cache = str(tmp_path / "cache")
    ds, rep = build_dataset([{"path": str(f), "max_rows": 40}], tok, kind="pairs", max_length=64, cache_dir=cache)
    assert rep.rows_read == 40 and rep.per_source == [{"source": str(f), "files": 1, "rows_read": 40,
                                                       "examples": rep.examples, "max_rows": 40}]
    _, rep2 = build_dataset([{"path": str(f), "max_rows": 41}], tok, kind="pairs", max_length=64, cache_dir=cache)
    assert not rep2.from_cache and rep2.rows_read == 41
    assert build_dataset([{"path": str(f), "max_rows": 40}], tok, kind="pairs", max_length=64, cache_dir=cache)[1].from_cache


def test_examples_record_their_entry(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "yes", "rejected": "no"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "yes", "rejected": "no"} for i in range(3)])
    ds, rep = build_dataset([str(a), str(b)], tok, kind="pairs", max_length=64, cache_dir="none")
    assert ds.source.tolist() == [0] * 5 + [1] * 3
    assert [(s["rows_read"], s["examples"]) for s in rep.per_source] == [(5, 5), (3, 3)]


def test_parquet_is_read_in_record_batches(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(R, "PARQUET_BATCH_ROWS", 10)
    texts = [f"answer {i}" for i in range(95)]
    raw = pa.array([t.encode() for t in texts[:57]] + [b"\xff bad"] + [t.encode() for t in texts[58:]], pa.binary())
    table = pa.table({"prompt": pa.array([f"q{i}" for i in range(95)]), "chosen": raw.view(pa.string()),
                      "rejected": pa.array(["no"] * 95)})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=30)
    consumed = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **k):
        for batch in real(self, *a, **k):
            consumed.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    rows = R.read_rows(str(tmp_path / "p.parquet"))
    first = next(rows)
    assert first.data == {"prompt": "q0", "chosen": "answer 0", "rejected": "no"} and consumed == [10]
    rest = list(rows)
    assert len(rest) == 94 and sum(consumed) == 95
    bad = [r for r in rest if isinstance(r.data, DataError)]
    assert [r.index for r in bad] == [57] and "p.parquet[57]: field 'chosen' is not valid UTF-8" in str(bad[0].data)
    assert rest[-1].index == 94 and rest[-1].data["chosen"] == "answer 94"


def test_a_cached_load_does_not_hash_the_data_again_but_sees_any_change(tmp_path, tok, monkeypatch):
    import time

    monkeypatch.setattr(R, "_SETTLED_NS", -1)  # memoize at once (a real file is memoized once unchanged for 3 s)
    f = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows(60) if "rejected" in r])
    cache = str(tmp_path / "cache")
    build_dataset([str(f)], tok, kind="pairs", max_length=64, cache_dir=cache)
    opened = []
    real_open = open
    monkeypatch.setattr(R, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k), raising=False)
    assert build_dataset([str(f)], tok, kind="pairs", max_length=64, cache_dir=cache)[1].from_cache
    assert str(f) not in opened  # the content hash came from the memo
    # the same size, the old mtime put back: the ctime still changes, so the file is hashed again and misses
    st = f.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    text = f.read_text()
    f.write_text(text.replace("Go away.", "Go AWAY."))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    ds, rep = build_dataset([str(f)], tok, kind="pairs", max_length=64, cache_dir=cache)
    assert not rep.from_cache and str(f) in opened
