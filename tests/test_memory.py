"""Resident memory: measured in every metrics.jsonl record, the progress bar and the summary."""

from __future__ import annotations

import json

import numpy as np

from conftest import synthetic_pairs, write_jsonl
from rewardforge.config import load_config
from rewardforge.memory import peak_rss_mb, rss_mb
from rewardforge.train import run_training


def _args(model_dir, data, out, *extra):
    return [f"model.name_or_path={model_dir}", f"data.train=[{data}]", "data.cache_dir=none", "train.batch_size=8",
            "train.learning_rate=1e-3", "train.max_steps=6", "train.log_steps=2", "train.eval_steps=3",
            "train.precision=fp32", f"output_dir={out}", *extra]


def test_rss_is_this_process_and_grows_with_what_it_holds():
    before = rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page written
    assert rss_mb() - before > 48
    assert peak_rss_mb() >= rss_mb() - 1  # ru_maxrss is the peak (KiB), rss the current (pages)
    del block


def test_every_metrics_record_and_the_summary_carry_resident_memory(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    summary = run_training(load_config(None, _args(tiny_model("gpt2"), data, tmp_path / "run")), progress=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "validation"} and len(records) >= 5
    for r in records:
        assert 50 < r["rss_mb"] <= r["peak_rss_mb"] + 1, r
    peaks = [r["peak_rss_mb"] for r in records]
    assert peaks == sorted(peaks)  # a process's peak never goes down
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["peak_rss_mb"] == summary["peak_rss_mb"] >= max(peaks) - 1
    assert "rss_mb=" in capsys.readouterr().err  # the progress bar shows it next to the loss
