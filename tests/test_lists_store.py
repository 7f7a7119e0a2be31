"""List data (model.reward_model_type=listwise) in memory-mapped Arrow files, as pairs: the cache entry is a directory
(data.arrow + report.json), ListDataset.ids a TokenColumn of views of the mapped buffers, cold and warm the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import rated_rows as conftest_rated
from conftest import write_jsonl
from safetensors.torch import load_file

import rewardforge.data.lists as lists_mod
from rewardforge.config import load_config
from rewardforge.data.lists import LIST_CACHE_VERSION, ListDataset, build_list_dataset
from rewardforge.data.store import DATA_FILE, REPORT_FILE, TokenColumn
from rewardforge.data.synthetic import generate_lists
from rewardforge.data.template import setup_template
from rewardforge.models.reward_model import load_tokenizer


@pytest.fixture
def list_tok(tiny_model):
    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    return tok


def _build(tok, data: list, cache):
    cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=listwise",
                             f"data.train=[{', '.join(str(p) for p in data)}]", f"data.cache_dir={cache}"])
    return build_list_dataset(cfg, tok, cfg.data.train)


def _rows(tag: str, n: int, seed: int) -> list[dict]:
    rows = generate_lists(n, seed=seed, k=4)
    for i, r in enumerate(rows):
        r["id"] = f"{tag}{i}"
    # one list dropped (one response), one with a repeated response (kept, with one response fewer)
    return rows + [{"prompt": "q", "responses": ["x"], "scores": [1]},
                   {"prompt": f"{tag} dup", "responses": ["same", "same", "other"], "scores": [2, 1, 0], "id": f"{tag}-dup"}]


def _items(ds: ListDataset) -> list[tuple]:
    return [([x.tolist() for x in ds[i]["responses"]], ds[i]["scores"].tolist(), int(ds.source[i]), ds.prompt_keys[i],
             ds.extra[i], ds[i]["row_start"]) for i in range(len(ds))]


def _mapping_of(address: int) -> str | None:
    """The file (a path, as /proc/self/maps names it) whose mapping holds ``address``; None: anonymous memory (heap)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= address < end:
            return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
    return None


def _buffer_of(x: np.ndarray):
    """The pyarrow Buffer at the end of a numpy array's base chain (None: the array owns its memory or another does)."""
    b = x
    while b is not None and not isinstance(b, pa.Buffer):
        b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
    return b


@pytest.fixture
def two_entries(tmp_path):
    return [write_jsonl(tmp_path / "a.jsonl", _rows("a", 9, seed=1)), write_jsonl(tmp_path / "b.jsonl", _rows("b", 5, seed=2))]


def test_a_cold_build_and_a_cached_load_give_the_same_lists(list_tok, two_entries, tmp_path, monkeypatch):
    monkeypatch.setattr(lists_mod, "LIST_BATCH", 4)  # several record batches: offsets across chunks
    cold, rc = _build(list_tok, two_entries, tmp_path / "cache")
    warm, rw = _build(list_tok, two_entries, tmp_path / "cache")
    assert LIST_CACHE_VERSION == 3 and not rc.from_cache and rw.from_cache
    (entry,) = (tmp_path / "cache").iterdir()  # one directory, renamed into place: no .npz, no leftover temporary
    assert entry.is_dir() and entry.name.startswith("lists-") and sorted(p.name for p in entry.iterdir()) == [DATA_FILE, REPORT_FILE]
    table = pa.ipc.open_file(pa.memory_map(str(entry / DATA_FILE))).read_all()
    assert table.num_rows == len(cold) == rc.examples == 16 and table.to_batches()[0].num_rows == 4
    assert table.schema.field("responses").type == pa.large_list(pa.large_list(pa.int32()))
    assert rc.excluded == rw.excluded == {"lists_under_2_responses": 2, "duplicate_responses": 2}
    assert rw.per_source == rc.per_source and [r["examples"] for r in rc.per_source] == [10, 6]
    assert _items(warm) == _items(cold)
    assert warm.offsets.tolist() == cold.offsets.tolist() and warm.lengths().tolist() == cold.lengths().tolist()
    assert warm.source.tolist() == [0] * 10 + [1] * 6 and [e["id"] for e in warm.extra][-1] == "b-dup"
    assert warm.sizes().tolist()[9] == 2  # the list with a repeated response
    # the same lists with the cache off (a scratch file) and in one record batch
    monkeypatch.setattr(lists_mod, "LIST_BATCH", 4096)
    off, ro = _build(list_tok, two_entries, "none")
    assert not ro.from_cache and _items(off) == _items(cold)
    # lengths: each list's responses padded to its longest, as the per-response loop gave it
    want = [(b - a) * max(len(warm.ids[r]) for r in range(a, b)) for a, b in zip(warm.offsets[:-1], warm.offsets[1:])]
    assert warm.lengths().tolist() == want


def test_loaded_list_token_ids_are_views_of_the_memory_mapped_file(list_tok, two_entries, tmp_path):
    _build(list_tok, two_entries, tmp_path / "cache")
    for ds, _ in (_build(list_tok, two_entries, tmp_path / "cache"), _build(list_tok, two_entries, "none")):
        assert isinstance(ds.ids, TokenColumn)
        first, last = ds[0]["responses"][0], ds[len(ds) - 1]["responses"][-1]
        for x in (first, last):
            assert x.dtype == np.int32 and not x.flags.writeable and not x.flags.owndata
            assert isinstance(_buffer_of(x), pa.Buffer)  # the Arrow buffer, not a numpy copy
        assert np.shares_memory(first, _buffer_of(first)) and _buffer_of(first).parent is not None
        where = _mapping_of(first.ctypes.data)  # the address lies in a mapping of the Arrow file (not in the heap)
        assert where is not None and Path(where.removesuffix(" (deleted)")).name == DATA_FILE, where
        assert _mapping_of(last.ctypes.data) == where
        # a subset (as mixing and the validation split take) shares the same memory, not a copy
        sub = ds.subset([len(ds) - 1, 0, 0])
        assert isinstance(sub.ids, TokenColumn) and len(sub.ids) == int(sub.sizes().sum())
        assert np.shares_memory(sub[0]["responses"][-1], last) and np.shares_memory(sub[2]["responses"][0], first)
        assert sub[1]["responses"][0].ctypes.data == first.ctypes.data
        assert sub.lengths().tolist() == ds.lengths()[[len(ds) - 1, 0, 0]].tolist()


def test_a_damaged_list_cache_entry_is_rebuilt(list_tok, two_entries, tmp_path):
    cold = _items(_build(list_tok, two_entries, tmp_path / "cache")[0])
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / DATA_FILE).unlink()  # (a new file: truncating the mapped one in place would fault the mapping above)
    (entry / DATA_FILE).write_bytes(b"not arrow")
    again, report = _build(list_tok, two_entries, tmp_path / "cache")
    assert not report.from_cache and _items(again) == cold
    assert _build(list_tok, two_entries, tmp_path / "cache")[1].from_cache


def test_a_listwise_run_exports_bitwise_the_same_weights_with_the_cache_cold_and_warm(tiny_model, tmp_path):
    from rewardforge.train import run_training

    train = write_jsonl(tmp_path / "train.jsonl", generate_lists(24, k=4))
    val = write_jsonl(tmp_path / "val.jsonl", generate_lists(6, seed=9, k=3))
    weights, cached = {}, {}
    for name in ("cold", "warm"):
        out = tmp_path / name
        cfg = load_config(None, [f"model.name_or_path={tiny_model('bert')}", "model.reward_model_type=listwise",
                                 f"data.train=[{train}]", f"data.validation=[{val}]", "train.batch_size=4",
                                 "train.learning_rate=1e-3", "train.max_steps=4", f"data.cache_dir={tmp_path / 'cache'}",
                                 f"output_dir={out}", "train.precision=fp32"])
        summary = run_training(cfg, progress=False)
        cached[name] = (summary["data"]["train"]["from_cache"], summary["data"]["validation"]["from_cache"])
        weights[name] = load_file(out / "model/model.safetensors")
    assert cached == {"cold": (False, False), "warm": (True, True)}
    a, b = weights["cold"], weights["warm"]
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].view(-1).equal(b[k].view(-1)) for k in a)
    assert sum(p.name.startswith("lists-") for p in (tmp_path / "cache").iterdir()) == 2  # train and validation


def _mixed_rows(tag: str, n: int, seed: int) -> list:
    """List rows with every kind of drop, spread so that chunks of a few lists split them: repeated lists (one far
    back), ties, one-response lists, repeated responses, responses alike once truncated, and bad rows."""
    long = "paris is the capital of france and a large city. " * 6
    rows: list = []
    for i, r in enumerate(generate_lists(n, seed=seed, k=4)):
        r["id"] = f"{tag}{i}"
        kind = i % 7
        if kind == 1:
            r = {"prompt": r["prompt"], "responses": [long + "good", long + "bad", "c"], "scores": [2, 1, 0], "id": r["id"]}
        elif kind == 2:
            r["scores"] = [1, 1, 1, 1]
        elif kind == 3:
            r["responses"][1] = r["responses"][0]
        elif kind == 4:
            r = {"prompt": r["prompt"], "responses": r["responses"], "ranking": [2, [0, 3], 1], "id": r["id"]}
        rows.append(r)
        if i % 5 == 0:
            rows.append(dict(r))  # a repeated list, right after
        if i % 11 == 10:
            rows += ["{not json", {"prompt": "q", "responses": ["only"], "scores": [1]}]
    return rows + [dict(rows[0])]  # and the first again, chunks later


@pytest.mark.parametrize("grouped", [False, True])
def test_a_cold_build_gives_the_same_lists_and_report_for_any_chunk_size(list_tok, tmp_path, monkeypatch, grouped):
    # the build streams LIST_BATCH lists at a time; one list per chunk, a few, and all in one must agree exactly
    if grouped:
        rows = conftest_rated(160)  # grouped by prompt: lists of 1-5 responses, some all tied
        rows[7]["labels"] = {"safety": 1.0}  # a response without a score
        data = [write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", conftest_rated(30, seed=1))]
        extra = ["data.group_by=prompt", "data.score_label=helpfulness"]
    else:
        data = [write_jsonl(tmp_path / "a.jsonl", _mixed_rows("a", 40, seed=1)),
                write_jsonl(tmp_path / "b.jsonl", _mixed_rows("b", 25, seed=2))]
        extra = ["data.skip_bad_rows=true"]
    cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=listwise", "data.cache_dir=none",
                             f"data.train=[{', '.join(str(p) for p in data)}]", "data.max_length=24",
                             "data.truncation=response_right", *extra])
    got = {}
    for batch in (1, 3, 4096):
        monkeypatch.setattr(lists_mod, "LIST_BATCH", batch)
        ds, report = build_list_dataset(cfg, list_tok, cfg.data.train)
        got[batch] = (_items(ds), {k: v for k, v in report.as_dict().items() if k != "seconds"})
    items, report = got[4096]
    assert got[1] == got[3] == got[4096]
    assert len(items) == report["examples"] == sum(r["examples"] for r in report["per_source"]) > 3
    assert [r["examples"] for r in report["per_source"]] == [sum(it[2] == k for it in items) for k in (0, 1)]
    assert report["truncation"]["sequences"] > 0
    if grouped:
        assert report["excluded"]["responses_without_score"] == 1 and report["rows_read"] == 190
    else:
        assert set(report["excluded"]) == {"duplicate_responses", "lists_under_2_responses", "lists_all_tied",
                                           "duplicate_lists", "identical_after_truncation"}
        assert report["skipped_bad_rows"] == 5 and report["excluded"]["duplicate_lists"] == 14
