"""Crashes, signals and non-finite values: a run loses at most the work since its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_pairs, write_jsonl
from rewardforge.training.checkpoint import list_checkpoints, resolve_resume
from rewardforge.config import load_config
from rewardforge.registry import PAIR_LOSSES, RewardModelSpec, register_reward_model_type, unregister_reward_model_type
from rewardforge.train import run_training


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(160))
    args = [f"model.name_or_path={tiny_model('llama')}", f"data.train=[{data}]", "train.batch_size=8",
            "train.learning_rate=1e-3", "data.cache_dir=none", "train.max_steps=10", "train.save_steps=2",
            "train.save_total_limit=0", "model.dropout=0.1"]
    run_training(load_config(None, args + [f"output_dir={root / 'reference'}"]), progress=False)
    return root, args


def _start(args: list[str], out: Path, fault: str | None = None) -> subprocess.Popen:
    # Same thread count as this process, so float reductions (and so the weights) match bitwise.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if fault:
        env["REWARDFORGE_FAULT"] = fault  # rewardforge.training.faults: SIGKILL itself at that point
    return subprocess.Popen([sys.executable, "-m", "rewardforge", "train", *args, f"output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model/model.safetensors"), load_file(b / "model/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_kill_9_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(setup):
    root, args = setup
    out = root / "killed"
    proc = _start(args, out)
    _wait_for(out / "checkpoints/step-4/trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    latest = resolve_resume("auto", out)
    assert latest is not None and (latest / "trainer_state.json").is_file()
    s = run_training(load_config(None, args + [f"output_dir={out}", "train.resume_from=auto"]), progress=False)
    assert s["resumed_from"] == str(latest)
    _same_weights(root / "reference", out)
    ref = json.loads((root / "reference/summary.json").read_text())
    assert s["final_validation"] == ref["final_validation"]


def _killed_at(args: list[str], out: Path, fault: str) -> None:
    proc = _start(args, out, fault)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def _resume_and_compare(root: Path, args: list[str], out: Path, expect_from: str) -> None:
    s = run_training(load_config(None, args + [f"output_dir={out}", "train.resume_from=auto"]), progress=False)
    assert s["resumed_from"] == str(out / "checkpoints" / expect_from)
    _same_weights(root / "reference", out)
    ref = json.loads((root / "reference/summary.json").read_text())
    assert s["final_validation"] == ref["final_validation"] and s["steps"] == ref["steps"]


def test_kill_9_mid_step_loses_only_the_steps_since_the_last_checkpoint(setup):
    root, args = setup
    out = root / "killed_mid_step"
    _killed_at(args, out, "train_step:7")  # after step 7's backward pass, before its optimizer step
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4", "step-6"]
    _resume_and_compare(root, args, out, "step-6")


def test_kill_9_mid_checkpoint_write_leaves_no_half_checkpoint(setup):
    root, args = setup
    out = root / "killed_mid_checkpoint"
    _killed_at(args, out, "checkpoint_write:3")  # step-6's weights written, the rest not
    assert (out / "checkpoints/.step-6.partial").is_dir() and not (out / "checkpoints/step-6").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4"]
    _resume_and_compare(root, args, out, "step-4")
    assert not (out / "checkpoints/.step-6.partial").exists()  # cleaned when step-6 was saved again


def test_kill_9_mid_export_keeps_the_previous_export_and_the_checkpoint_exports_again(setup):
    import shutil

    from rewardforge.train import export_checkpoint

    root, args = setup
    out = root / "killed_mid_export"
    shutil.copytree(root / "reference/model", out / "model")  # an earlier export in place
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.is_file()}
    _killed_at(args, out, "export_write")  # training done and checkpointed; killed while writing the export
    after = {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.is_file()}
    assert after == before  # the earlier export is untouched, never half replaced
    assert list_checkpoints(out)[-1].name == "step-10"
    export_checkpoint(out / "checkpoints/step-10", out / "model")
    _same_weights(root / "reference", out)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(leftovers) == 1  # the killed export's temporary dir, which no reader ever opens


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(setup, tmp_path, monkeypatch):
    from rewardforge.training import faults
    from rewardforge.training.checkpoint import CheckpointError

    root, args = setup
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("REWARDFORGE_FAULT", "checkpoint_write:2=enospc")  # the second save (step-4) hits a full disk
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-4 \(No space left on device.*nothing was "
                                              r"removed: the latest complete checkpoint is .*step-2.*train.resume_from=auto"):
        run_training(load_config(None, args + [f"output_dir={tmp_path}"]), progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]  # no partial left behind
    monkeypatch.delenv("REWARDFORGE_FAULT")
    _resume_and_compare(root, args, tmp_path, "step-2")


def test_too_little_disk_space_is_refused_before_training(setup, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from rewardforge.training.checkpoint import CheckpointError

    _, args = setup
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError, match=r"has 0.00 GiB free, but 3 checkpoints .* lower train.save_total_limit"):
        run_training(load_config(None, args + [f"output_dir={tmp_path}", "train.save_total_limit=2"]), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(setup):
    root, args = setup
    out = root / "terminated"
    proc = _start(args + ["train.save_steps=0", "train.log_steps=1"], out)  # no periodic checkpoints: the signal must save one
    _wait_for(out / "metrics.jsonl", proc)  # first step logged
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "Resume with train.resume_from=auto" in err
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1
    s = run_training(load_config(None, args + [f"output_dir={out}", "train.resume_from=auto"]), progress=False)
    assert s["resumed_from"] == str(ckpts[0])
    _same_weights(root / "reference", out)


def test_half_written_checkpoints_are_never_resumed_from(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(root / "reference/checkpoints/step-4", out / "checkpoints/step-4")
    shutil.copytree(root / "reference/checkpoints/step-6", out / "checkpoints/.step-8.partial")  # crash mid-save
    shutil.copytree(root / "reference/checkpoints/step-6", out / "checkpoints/step-6")
    (out / "checkpoints/step-6/trainer_state.json").unlink()  # written last: its absence marks it incomplete
    assert resolve_resume("auto", out) == out / "checkpoints/step-4"


class _NaNAt:
    """Bradley–Terry, but the loss is NaN on the given calls (1-based)."""

    def __init__(self, calls: set[int]):
        self.calls, self.n = calls, 0

    def __call__(self, outputs, batch, cfg):
        self.n += 1
        loss, stats = PAIR_LOSSES["bradley_terry"](outputs, batch, cfg)
        return (loss * float("nan") if self.n in self.calls else loss), stats


@pytest.fixture
def nan_type():
    fn = _NaNAt({3})
    register_reward_model_type(RewardModelSpec(name="nan_test", losses={"bt": fn}, default_loss="bt", loss_data={"bt": "pairs"}))
    yield fn
    unregister_reward_model_type("nan_test")


def test_nonfinite_loss_stops_naming_the_step_and_the_last_checkpoint(setup, nan_type, tmp_path):
    _, args = setup
    cfg = load_config(None, args + [f"output_dir={tmp_path}", "model.reward_model_type=nan_test", "train.save_steps=2"])
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan on batch 2 of epoch 0 .* at step 3 .*"
                                                 r"The last good checkpoint is .*step-2"):
        run_training(cfg, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]


def test_nonfinite_loss_can_skip_the_step(setup, nan_type, tmp_path):
    _, args = setup
    cfg = load_config(None, args + [f"output_dir={tmp_path}", "model.reward_model_type=nan_test", "train.nonfinite=skip",
                                    "train.max_steps=5", "train.log_steps=1"])
    s = run_training(cfg, progress=False)
    assert s["steps"] == 5
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 1 and "at step 3" in skipped[0]["reason"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["split"] == "train" and "loss" in r)
    w = load_file(tmp_path / "model/model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
