"""Weighted mixing of data.train entries: shares, fractions, repeats, determinism, and the counts a run reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import synthetic_pairs, write_jsonl

from rewardforge.config import DataSource, load_config
from rewardforge.data.datasets import PairDataset
from rewardforge.data.mixing import describe_sources, mix_sources
from rewardforge.data.readers import DataError


def _dataset(sizes: list[int]) -> PairDataset:
    """Entry k holds sizes[k] pairs; pair j's chosen ids are [j] so a selection can be read back."""
    n = sum(sizes)
    return PairDataset([np.array([j], np.int32) for j in range(n)], [np.array([n + j], np.int32) for j in range(n)],
                       np.full(n, np.nan), [f"p{j}" for j in range(n)], [{}] * n,
                       source=np.repeat(np.arange(len(sizes)), sizes))


def _picked(ds: PairDataset) -> list[int]:
    return [int(ds.chosen[i][0]) for i in range(len(ds))]


def test_weights_set_each_entrys_share_of_as_many_examples_as_all_entries_hold():
    ds = _dataset([60, 30, 10])
    entries = [DataSource("a", weight=1), DataSource("b", weight=1), DataSource("c", weight=2)]
    mixed, records = mix_sources(ds, entries, seed=3)
    assert len(mixed) == 100 and [r["taken"] for r in records] == [25, 25, 50]
    assert [r["train_examples"] for r in records] == [60, 30, 10] and [r["weight"] for r in records] == [1, 1, 2]
    picked = _picked(mixed)
    a, b, c = picked[:25], picked[25:50], picked[50:]
    assert len(set(a)) == 25 and set(a) <= set(range(60))  # more than its share: a random subset, no repeats
    assert len(set(b)) == 25 and set(b) <= set(range(60, 90))
    assert sorted(c) == sorted(list(range(90, 100)) * 5)  # less than its share: every example 5 times
    assert mixed.source.tolist() == [0] * 25 + [1] * 25 + [2] * 50


def test_a_share_between_whole_copies_adds_a_random_part():
    mixed, records = mix_sources(_dataset([10, 30]), [DataSource("a", weight=3), DataSource("b", weight=1)], seed=0)
    assert [r["taken"] for r in records] == [30, 10]
    small = _picked(mixed)[:30]
    assert all(small.count(j) == 3 for j in range(10))
    mixed, records = mix_sources(_dataset([8, 32]), [DataSource("a", weight=1), DataSource("b", weight=1)], seed=0)
    small = _picked(mixed)[:20]  # 20 of 8: two whole copies and 4 more, 4 distinct pairs a third time
    assert sorted(np.bincount(small, minlength=8).tolist()) == [2, 2, 2, 2, 3, 3, 3, 3]


def test_fraction_takes_part_of_one_entry_and_leaves_the_others_whole():
    ds = _dataset([60, 20])
    mixed, records = mix_sources(ds, [DataSource("a", fraction=0.25), "b"], seed=1)
    assert [r["taken"] for r in records] == [15, 20] and records[0]["fraction"] == 0.25 and "fraction" not in records[1]
    picked = _picked(mixed)
    assert len(set(picked[:15])) == 15 and set(picked[:15]) <= set(range(60)) and picked[15:] == list(range(60, 80))


def test_the_seed_fixes_the_selection():
    ds = _dataset([200, 50])
    entries = [DataSource("a", weight=1), DataSource("b", weight=1)]
    first, second = (_picked(mix_sources(ds, entries, seed=7)[0]) for _ in range(2))
    other = _picked(mix_sources(ds, entries, seed=8)[0])
    assert first == second and first != other
    for picked in (first, other):  # b's 125 of 50: two whole copies, then 25 chosen by the seed
        assert sorted(np.bincount(np.array(picked[125:]) - 200).tolist()) == [2] * 25 + [3] * 25


def test_without_weights_or_fractions_the_dataset_is_unchanged():
    ds = _dataset([3, 4])
    mixed, records = mix_sources(ds, ["a", {"path": "b", "max_rows": 10}], seed=0)
    assert mixed is ds and [r["taken"] for r in records] == [3, 4]
    assert describe_sources([{"source": "a", "rows_read": 3, "examples": 3, "train_examples": 3, "taken": 3}]) == []


def test_a_weighted_entry_without_training_examples_is_an_error():
    with pytest.raises(DataError, match=r"data\.train\[1\] \(b\.jsonl\) has no training examples, but its weight asks for 5"):
        mix_sources(_dataset([10, 0]), [DataSource("a.jsonl", weight=1), DataSource("b.jsonl", weight=1)], seed=0)


def test_a_run_reports_rows_read_and_taken_per_entry_and_never_weights_validation(tiny_model, tmp_path):
    from rewardforge.train import run_training

    a = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(60, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", synthetic_pairs(30, seed=2))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(12, seed=3))
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model('bert')}", f"data.train=[{{path: {a}, weight: 1, max_rows: 40}}, {{path: {b}, weight: 3}}]",
        f"data.validation=[{val}]", "train.max_steps=1", "train.batch_size=4", "data.cache_dir=none", f"output_dir={out}",
    ])
    summary = run_training(cfg, progress=False)
    per_source = json.loads((out / "summary.json").read_text())["data"]["train"]["per_source"]
    assert per_source == summary["data"]["train"]["per_source"]
    (ra, rb) = per_source
    assert (ra["rows_read"], ra["max_rows"], rb["rows_read"]) == (40, 40, 30)
    assert (ra["train_examples"], rb["train_examples"]) == (40, 30)
    assert (ra["taken"], rb["taken"]) == (18, 52)  # 70 in all: 17.5 and 52.5, the tie's extra one to the first
    assert summary["data"]["train_examples"] == 70
    assert summary["data"]["validation_examples"] == summary["data"]["validation"]["examples"]  # read whole, unweighted
    assert "weight: 1" in (out / "config.yaml").read_text()  # the entries as given


# ------------------------------------------------------------------ lists (model.reward_model_type=listwise)


def _list_rows(tag: str, n: int) -> list[dict]:
    """n lists of 3 distinct responses (nothing is excluded), each naming itself in 'id' (kept in the dataset's extra)."""
    return [{"prompt": f"{tag} question {i}", "responses": [f"good {tag} {i}", f"bad {tag} {i}", "so so"],
             "scores": [2, 0, 1], "id": f"{tag}{i}"} for i in range(n)]


@pytest.fixture
def list_tok(tiny_model):
    from rewardforge.data.template import setup_template
    from rewardforge.models.reward_model import load_tokenizer

    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    return tok


def _build_lists(tok, train: str, *extra: str):
    from rewardforge.data.lists import build_list_dataset

    cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=listwise", f"data.train={train}",
                             "data.cache_dir=none", *extra])
    return build_list_dataset(cfg, tok, cfg.data.train)


def _ids(ds) -> list[str]:
    return [e["id"] for e in ds.extra]


def test_a_list_subset_takes_a_numpy_index_array_with_repeats():
    from rewardforge.data.lists import ListDataset

    ids = [np.array([j], np.int32) for j in range(7)]  # list 0: rows 0-1, list 1: rows 2-4, list 2: rows 5-6
    ds = ListDataset(ids, [0, 2, 5, 7], [1, 0, 3, 2, 1, 1, 0], ["a", "b", "c"], [{"i": 0}, {"i": 1}, {"i": 2}], source=[0, 1, 1])
    sub = ds.subset(np.array([2, 0, 2]))
    assert sub.offsets.tolist() == [0, 2, 4, 6] and [int(x[0]) for x in sub.ids] == [5, 6, 0, 1, 5, 6]
    assert sub.scores.tolist() == [1, 0, 1, 0, 1, 0] and sub.source.tolist() == [1, 0, 1]
    assert sub.prompt_keys == ["c", "a", "c"] and [e["i"] for e in sub.extra] == [2, 0, 2]
    assert len(ds.subset(np.zeros(0, np.int64))) == 0 and ListDataset(ids, [0, 7], [0] * 7, ["a"], [{}]).source.tolist() == [0]


def test_list_weights_3_to_1_give_the_planned_counts_and_the_seed_fixes_the_choice(list_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _list_rows("a", 10))
    b = write_jsonl(tmp_path / "b.jsonl", _list_rows("b", 30))
    ds, report = _build_lists(list_tok, f"[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]")
    assert ds.source.tolist() == [0] * 10 + [1] * 30 and [r["examples"] for r in report.per_source] == [10, 30]
    entries = [DataSource(str(a), weight=3), DataSource(str(b), weight=1)]
    mixed, records = mix_sources(ds, entries, seed=0, per_source=report.per_source)
    # 40 lists in all: a's share 30 of its 10 (three whole copies), b's 10 of its 30 (a random subset)
    assert [(r["train_examples"], r["taken"], r["weight"]) for r in records] == [(10, 30, 3), (30, 10, 1)]
    assert mixed.source.tolist() == [0] * 30 + [1] * 10
    picked = _ids(mixed)
    assert sorted(picked[:30]) == sorted([f"a{i}" for i in range(10)] * 3)
    assert len(set(picked[30:])) == 10 and set(picked[30:]) <= {f"b{i}" for i in range(30)}
    for j, name in enumerate(picked):  # every list keeps its own responses and scores
        i = _ids(ds).index(name)
        assert mixed[j]["scores"].tolist() == [2, 0, 1]
        assert all(np.array_equal(x, y) for x, y in zip(mixed[j]["responses"], ds[i]["responses"]))
    assert _ids(mix_sources(ds, entries, seed=0)[0]) == picked and _ids(mix_sources(ds, entries, seed=1)[0])[30:] != picked[30:]
    lines = describe_sources(records)
    assert lines[0] == f"  data.train[0] {a}: 10 rows read, 10 examples, 10 for training, 30 taken (weight 3)"


def test_a_list_fraction_takes_half_of_its_entry(list_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _list_rows("a", 10))
    b = write_jsonl(tmp_path / "b.jsonl", _list_rows("b", 4))
    ds, report = _build_lists(list_tok, f"[{{path: {a}, fraction: 0.5}}, {b}]")
    mixed, records = mix_sources(ds, [DataSource(str(a), fraction=0.5), str(b)], seed=2, per_source=report.per_source)
    assert [r["taken"] for r in records] == [5, 4] and records[0]["fraction"] == 0.5
    picked = _ids(mixed)
    assert len(set(picked[:5])) == 5 and set(picked[:5]) <= {f"a{i}" for i in range(10)}
    assert picked[5:] == ["b0", "b1", "b2", "b3"] and mixed.source.tolist() == [0] * 5 + [1] * 4


def test_list_max_rows_caps_the_rows_read_per_entry_and_is_reported(list_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _list_rows("a", 10))
    b = write_jsonl(tmp_path / "b.jsonl", _list_rows("b", 3))
    ds, report = _build_lists(list_tok, f"[{{path: {a}, max_rows: 4}}, {b}]")
    assert report.per_source == [{"source": str(a), "files": 1, "rows_read": 4, "examples": 4, "max_rows": 4},
                                 {"source": str(b), "files": 1, "rows_read": 3, "examples": 3}]
    assert report.rows_read == 7 and report.examples == 7 and _ids(ds) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert ds.source.tolist() == [0] * 4 + [1] * 3


def test_grouped_rows_group_within_their_entry_and_max_rows_counts_rows(list_tok, tmp_path):
    def rated(d, i, score):
        return {"prompt": "q", "response": f"answer {d} {i}", "labels": {"overall": score}, "dialog": d}

    # a: d1 d1 | d2 d2 d2 (max_rows 3 reads d1 d1 d2: d2 keeps one response and is dropped); b: d1 d1, its own list
    a = write_jsonl(tmp_path / "a.jsonl", [rated("d1", 0, 2), rated("d1", 1, 1), rated("d2", 0, 3), rated("d2", 1, 1),
                                           rated("d2", 2, 2)])
    b = write_jsonl(tmp_path / "b.jsonl", [rated("d1", 7, 1), rated("d1", 8, 0)])
    ds, report = _build_lists(list_tok, f"[{{path: {a}, max_rows: 3}}, {b}]", "data.group_by=dialog", "data.score_label=overall")
    assert [(r["rows_read"], r["examples"]) for r in report.per_source] == [(3, 1), (2, 1)]
    assert report.excluded == {"lists_under_2_responses": 1}
    assert ds.source.tolist() == [0, 1] and ds.sizes().tolist() == [2, 2] and ds.scores.tolist() == [2, 1, 1, 0]


def test_the_list_cache_keeps_source_and_a_changed_max_rows_is_not_served_from_it(list_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _list_rows("a", 6))
    b = write_jsonl(tmp_path / "b.jsonl", _list_rows("b", 3))
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    first, r1 = _build_lists(list_tok, f"[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]", cache)
    again, r2 = _build_lists(list_tok, f"[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]", cache)
    assert not r1.from_cache and r2.from_cache
    assert again.source.tolist() == first.source.tolist() == [0] * 6 + [1] * 3 and r2.per_source == r1.per_source
    assert _ids(again) == _ids(first) and again.offsets.tolist() == first.offsets.tolist()
    capped, r3 = _build_lists(list_tok, f"[{{path: {a}, weight: 1, max_rows: 2}}, {{path: {b}, weight: 1}}]", cache)
    assert not r3.from_cache and r3.per_source[0]["rows_read"] == 2 and capped.source.tolist() == [0, 0, 1, 1, 1]
    capped_again, r4 = _build_lists(list_tok, f"[{{path: {a}, weight: 1, max_rows: 2}}, {{path: {b}, weight: 1}}]", cache)
    assert r4.from_cache and capped_again.source.tolist() == [0, 0, 1, 1, 1] and r4.per_source[0]["max_rows"] == 2


def test_a_listwise_run_mixes_weighted_entries_and_reports_them(tiny_model, tmp_path):
    from rewardforge.train import run_training

    a = write_jsonl(tmp_path / "a.jsonl", _list_rows("a", 8))
    b = write_jsonl(tmp_path / "b.jsonl", _list_rows("b", 24))
    val = write_jsonl(tmp_path / "val.jsonl", _list_rows("v", 4))
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model('bert')}", "model.reward_model_type=listwise",
        f"data.train=[{{path: {a}, weight: 3, max_rows: 6}}, {{path: {b}, weight: 1}}]", f"data.validation=[{val}]",
        "train.max_steps=2", "train.batch_size=4", "data.cache_dir=none", "train.precision=fp32", f"output_dir={out}",
    ])
    summary = run_training(cfg, progress=False)
    per_source = json.loads((out / "summary.json").read_text())["data"]["train"]["per_source"]
    assert per_source == summary["data"]["train"]["per_source"]
    ra, rb = per_source
    assert (ra["rows_read"], ra["max_rows"], ra["examples"], rb["rows_read"], rb["examples"]) == (6, 6, 6, 24, 24)
    assert (ra["train_examples"], rb["train_examples"]) == (6, 24)
    assert (ra["taken"], rb["taken"], ra["weight"], rb["weight"]) == (23, 7, 3, 1)  # 30 in all: 22.5 and 7.5, the tie to the first
    assert summary["data"]["train_examples"] == 30 and summary["data"]["validation_examples"] == 4
    assert summary["steps"] == 2
