"""Resident memory: measured in every metrics.jsonl record and the summary, and kept flat by
``train.malloc_trim_steps`` without changing what is trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_pairs, write_jsonl
from rewardforge.config import ConfigError, load_config
from rewardforge.training import memory
from rewardforge.training.memory import MemoryReleaser, peak_rss_mb, release_free_memory, rss_mb
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


def test_release_free_memory_returns_freed_heap_blocks_to_the_os():
    if not release_free_memory():
        pytest.skip("the C library is not glibc: nothing to release")
    # 64 KiB blocks come from malloc's heap; freeing all but every 16th leaves free chunks between live
    # ones, which glibc keeps resident (only a heap's top is returned by itself) until malloc_trim.
    blocks = [np.ones(8192) for _ in range(3200)]  # 200 MiB
    keep = blocks[::16]
    del blocks
    held = rss_mb()
    assert release_free_memory()
    assert held - rss_mb() > 100, "malloc_trim returned less than half of the 187 MiB freed"
    assert all(float(b[0]) == 1.0 for b in keep)  # live blocks untouched


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


def test_releasing_memory_every_step_trains_the_same_weights(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    weights = {}
    for steps in (0, 1):
        out = tmp_path / f"trim-{steps}"
        run_training(load_config(None, _args(tiny_model("llama"), data, out, f"train.malloc_trim_steps={steps}",
                                             "model.dropout=0.1")), progress=False)
        weights[steps] = load_file(out / "model" / "model.safetensors")
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_a_negative_malloc_trim_steps_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.malloc_trim_steps must be >= 0 \(0 turns it off\), got -1"):
        load_config(None, ["train.malloc_trim_steps=-1"])


def test_the_releaser_releases_every_n_steps_and_after_a_step_that_grew_rss_past_the_bound(monkeypatch):
    trace = iter([1000.0,            # step 1: first reading, the base
                  1020.0,            # step 2: +2%, under the 3% bound
                  1040.0, 990.0,     # step 3: +4% -> released, 990 after it (the new base)
                  1015.0,            # step 4: +2.5% of 990: kept
                  1100.0, 1000.0])   # step 5: the periodic release (every 5), 1000 after it
    released = []
    monkeypatch.setattr(memory, "rss_mb", lambda: next(trace))
    monkeypatch.setattr(memory, "release_free_memory", lambda: released.append(True) or True)
    r = MemoryReleaser(steps=5, growth=0.03)
    assert [r.after_step(s) for s in range(1, 6)] == [False, False, True, False, True]
    assert (r.released, r.by_growth, r.base, len(released)) == (2, 1, 1000.0, 2)


def test_malloc_trim_steps_0_turns_the_growth_check_off_too(monkeypatch):
    monkeypatch.setattr(memory, "rss_mb", lambda: pytest.fail("RSS read with the release off"))
    r = MemoryReleaser(steps=0, growth=0.03)
    assert not any(r.after_step(s) for s in range(1, 30)) and r.released == 0


def test_a_run_reports_its_memory_releases_in_the_summary(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    summary = run_training(load_config(None, _args(tiny_model("gpt2"), data, tmp_path / "run", "train.malloc_trim_steps=2",
                                                   "train.malloc_trim_growth=0")), progress=False)
    assert summary["memory_releases"] == {"total": 3, "by_growth": 0}  # steps 2, 4 and 6 of 6


def test_a_negative_malloc_trim_growth_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.malloc_trim_growth must be a fraction >= 0 \(0.03 = 3%"):
        load_config(None, ["train.malloc_trim_growth=-0.1"])
