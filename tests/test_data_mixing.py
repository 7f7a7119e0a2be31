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
